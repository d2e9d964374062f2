"""The documentation site: generated pages match the code, every CLI flag is documented, the README stays short,
and the site builds with --strict."""
import argparse
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))
import generate  # noqa: E402

sys.path.pop(0)


@pytest.mark.parametrize("page", sorted(generate.PAGES))
def test_generated_pages_are_what_the_code_generates(page):
    assert (ROOT / "docs" / page).read_text() == generate.PAGES[page](), \
        f"docs/{page} is stale: run .venv/bin/python docs/generate.py"


def test_the_readme_scoreboard_is_what_the_record_renders():
    readme = (ROOT / "README.md").read_text()
    assert readme == generate.readme_with_scoreboard(readme), \
        "the README's scoreboard is stale: run .venv/bin/python docs/generate.py"
    assert "| target | method | MACs ↓ |" in readme


def test_every_command_and_flag_is_in_the_cli_reference():
    from norton.cli import build_parser

    text = (ROOT / "docs" / "reference" / "cli.md").read_text()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        section = text.split(f"## norton {name}\n", 1)[1].split("\n## norton ", 1)[0]
        for action in command._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in section, f"norton {name} {flag}"


def test_the_api_reference_covers_every_export():
    import norton

    text = (ROOT / "docs" / "reference" / "api.md").read_text()
    assert all(f"::: norton.{name}\n" in text for name in norton.__all__ if not name.startswith("__"))


def test_the_readme_is_short_and_links_into_the_site():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for target in ("docs/reference/cli.md", "docs/reference/api.md", "docs/guides/planner.md", "docs/guides/deploy.md"):
        assert f"({target})" in readme and (ROOT / target).exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mkdocs", path=os.path.dirname(sys.executable)) is None,
                    reason="mkdocs is not installed in this environment (pip install -e '.[test]')")
def test_the_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable))
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "api" / "index.html").exists()


def test_a_benchmark_table_is_recorded_with_its_source_and_rendered_from_the_record(tmp_path, monkeypatch):
    import json

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import record

    sys.path.pop(0)
    monkeypatch.setattr(record, "TABLES", tmp_path)
    path = record.write_table("demo", ["model", "time"], [["ResNet-20", "1.5 s"], ["a|b", 2]], command="make it")
    saved = json.loads(pathlib.Path(path).read_text())
    assert saved["rows"] == [["ResNet-20", "1.5 s"], ["a|b", "2"]] and saved["command"] == "make it"
    assert saved["commit"] and saved["date"] and saved["machine"]["cpu"]
    text = record.render_table(saved)
    assert text.startswith("| model | time |\n|---|---|\n| ResNet-20 | 1.5 s |\n| a\\|b | 2 |\n")
    assert f"`make it` ({saved['date']}, commit {saved['commit']}" in text
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        record.write_table("bad", ["model", "time"], [["only one"]])


def test_every_figure_the_comparison_guide_quotes_from_the_scoreboard_is_in_its_record():
    """The guide's reading of the scoreboard is prose, but each measured figure it quotes (a number with a
    decimal point) is one the recorded scoreboard page shows: a re-run that changes the record fails here
    until the prose says what the record says."""
    import re

    guide = (ROOT / "docs" / "guides" / "comparison.md").read_text()
    section = guide[guide.index("## The scoreboard"):guide.index("How the defaults behind this table were chosen")]
    record = (ROOT / "docs" / "results" / "scoreboard.md").read_text()
    quoted = re.findall(r"[-+]?\d+\.\d+", section)
    assert len(quoted) >= 15
    missing = [n for n in quoted if not re.search(r"(?<![\d.])" + re.escape(n) + r"(?![\d])", record)]
    assert not missing, f"figures in the comparison guide that docs/results/scoreboard.md does not show: {missing}"


def test_every_table_a_guide_includes_is_rendered_from_a_record():
    import re

    included_any = False
    for page in (ROOT / "docs").rglob("*.md"):
        for included in re.findall(r'--8<-- "([^"]+)"', page.read_text()):
            assert included.startswith("docs/") and included[len("docs/"):] in generate.PAGES, (page, included)
            assert (ROOT / included).exists(), (page, included)
            included_any = True
    assert included_any


def test_the_zoo_guides_complexity_table_is_counted_as_the_showcase_counts_it():
    """The zoo guide's table of published configs holds counts, not measurements: the page holds what
    ``norton demo --showcase`` counts now (the counts themselves are checked against the reference elsewhere)."""
    from norton.evidence.showcase import complexity_table

    assert complexity_table() in (ROOT / "docs" / "guides" / "zoo.md").read_text()
