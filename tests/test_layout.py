"""The package's shape: the public API after `import norton`, no private names
imported across modules, no module named like a public function, and the
checkpoints of earlier versions still load."""
import ast
import pathlib
import subprocess
import sys

import pytest
import torch

import norton

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = pathlib.Path(__file__).resolve().parent / "data"


def test_every_public_name_is_callable_right_after_import_norton():
    code = ("import norton\n"
            "bad = [n for n in norton.__all__ if n != '__version__' and not callable(getattr(norton, n))]\n"
            "print(','.join(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
    for name in ("prune", "deploy", "decompose", "compress", "complexity", "create_model", "tune_plans", "load_model"):
        assert name in norton.__all__ and callable(getattr(norton, name)), name


def _modules():
    return sorted((ROOT / "norton").rglob("*.py"))


def test_no_module_or_package_is_named_like_a_public_function():
    public = {n for n in norton.__all__ if callable(getattr(norton, n))}
    names = {p.stem for p in _modules()} | {p.parent.name for p in _modules()}
    assert not (public & names), public & names


@pytest.mark.parametrize("folder", ["norton", "tests", "benchmarks"])
def test_no_private_name_is_imported_from_another_module(folder):
    offenders = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("norton"):
                offenders += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def test_no_library_module_imports_norton_inside_a_function():
    """Imports of norton's own modules sit at the top of a module (the layers make that possible)."""
    offenders = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("norton"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                if isinstance(node, ast.Import) and any(a.name.startswith("norton") for a in node.names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_a_checkpoint_written_by_norton_0_1_0_loads_and_computes_the_same():
    """tests/data/v0_*.pt were written by the flat package before it was layered."""
    model, ckpt = norton.load_model(DATA / "v0_resnet20_r2_pruned.pt")
    io = torch.load(DATA / "v0_resnet20_r2_pruned_io.pt", weights_only=True)
    assert ckpt["norton_version"] == "0.1.0" and ckpt["extra"]["stage"] == "prune"
    assert any(isinstance(m, norton.CPDBlock) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(io["x"]), io["y"], rtol=1e-5, atol=1e-5)
