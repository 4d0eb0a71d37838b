"""The package's layering, checked on the source: the trainer is a leaf, imported by the entry points only."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "harmoclip_jax"


def _imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


ENTRY_POINTS = ["aot.py", "main.py"]  # `main` trains; `aot` compiles what main would run for a TPU/GPU target


def test_only_entry_points_import_the_trainer():
    importers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                       if "harmoclip_jax.train" in _imported_modules(p))
    assert importers == ENTRY_POINTS


def test_nothing_imports_an_entry_point():
    names = {f"harmoclip_jax.{p.removesuffix('.py')}" for p in ENTRY_POINTS}
    importers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if names & _imported_modules(p))
    assert importers == []


def test_the_scan_sees_every_import_form(tmp_path):
    """The checker above has power: each way of importing the trainer is found."""
    for source in ("import harmoclip_jax.train", "from harmoclip_jax import train",
                   "from harmoclip_jax.train import train_and_evaluate",
                   "def f():\n    from harmoclip_jax import train"):
        path = tmp_path / "m.py"
        path.write_text(source + "\n")
        assert "harmoclip_jax.train" in _imported_modules(path), source
