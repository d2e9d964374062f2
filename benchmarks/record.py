"""A benchmark's table as a record the documentation is rendered from.

``write_table("planner_screening", columns, rows, command)`` writes
``docs/results/tables/planner_screening.json``: the table (its cells as the
benchmark formats them), the command that measured it, when, from which
commit, and the machine. ``docs/generate.py`` renders each such record into
``docs/results/tables/<name>.md`` (the table and one line saying where it
comes from), and a guide shows it with ``--8<-- "docs/results/tables/<name>.md"``
— no measured figure is copied into a page by hand.
"""
from __future__ import annotations

import json
import pathlib
import shlex
import sys

from norton.checkpoints import atomic_write_text
from norton.core.devices import machine_record, provenance, provenance_text

TABLES = pathlib.Path(__file__).resolve().parent.parent / "docs" / "results" / "tables"


def write_table(name: str, columns: list[str], rows: list[list], command: str | None = None, note: str = "") -> str:
    """Record a table under ``docs/results/tables/<name>.json`` (``command``: the
    one that reproduces it, by default this process's own command line)."""
    if not rows or any(len(row) != len(columns) for row in rows):
        raise ValueError(f"table {name!r}: every row needs {len(columns)} cells ({', '.join(columns)})")
    command = command or " ".join([".venv/bin/python", *map(shlex.quote, sys.argv)])
    record = {"name": name, "columns": columns, "rows": [[str(cell) for cell in row] for row in rows], "note": note,
              **provenance(command), "machine": machine_record("cpu")}
    TABLES.mkdir(parents=True, exist_ok=True)
    path = TABLES / f"{name}.json"
    atomic_write_text(str(path), json.dumps(record, indent=1) + "\n")
    print(f"recorded: {path} (render the site's table with .venv/bin/python docs/generate.py)")
    return str(path)


def header(columns: list[str]) -> str:
    """A markdown table's header and rule."""
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def render_table(record: dict) -> str:
    """The markdown a guide includes: the table, then where it comes from."""
    machine = record.get("machine") or {}
    lines = [header(record["columns"]), *(markdown_row(row) for row in record["rows"])]
    made = provenance_text(record, machine.get("cpu") and f"{machine['cpu']}, torch {machine.get('torch')}")
    source = (f"\n*Measured by `{record['command']}` ({made}); recorded in "
              f"`docs/results/tables/{record['name']}.json`.*")
    return "\n".join(lines) + "\n" + (f"\n{record['note']}\n" if record.get("note") else "") + source + "\n"


class Table:
    """A benchmark's table as it is measured: each row printed at once (markdown),
    kept, and recorded at the end with ``record`` (``--record``)."""

    def __init__(self, columns: list[str]):
        self.columns, self.rows = columns, []
        print(header(columns), flush=True)

    def add(self, cells: list) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"a row needs {len(self.columns)} cells, got {len(cells)}")
        self.rows.append([str(c) for c in cells])
        print(markdown_row(self.rows[-1]), flush=True)

    def record(self, name: str, note: str = "") -> str:
        return write_table(name, self.columns, self.rows, note=note)
