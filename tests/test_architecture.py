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


def _import_graph(package: pathlib.Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source (function-level imports included)."""
    def name(path: pathlib.Path) -> str:
        parts = path.relative_to(package.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name(p): p for p in package.rglob("*.py")}

    def module_of(dotted: str) -> str | None:  # `pkg.mod.attr` -> `pkg.mod`
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph = {}
    for module, path in modules.items():
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package `level - 1` above this one
                    parents = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join([*parents, *([base] if base else [])])
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[module] = {m for m in map(module_of, targets) if m and m != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    """Dependencies go one way, function-level imports included (a lazy import hides a cycle, it does not remove
    it): e.g. `checkpoint` imports `workdir` (the layout), never the reverse. A submodule importing its own
    package's `__init__` is not counted (Python runs the package first)."""
    graph = _import_graph(PACKAGE)
    assert "harmoclip_jax.workdir" in graph["harmoclip_jax.checkpoint"]
    assert _cycles(graph) == []


def test_the_cycle_scan_sees_function_level_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from .sub import c\n    return c\n")
    (package / "sub" / "c.py").write_text("def g():\n    import pkg.a.thing\n")
    (package / "d.py").write_text("from pkg.sub import c\n")
    graph = _import_graph(package)
    assert graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert _cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
