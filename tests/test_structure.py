"""The package's structure: every import points down, and errors live in one module.

The import graph is read from the source (``ast``), module-level and function-level imports
alike, so a circle hidden inside a function is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cmw_vllm"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports, anywhere in the file (TYPE_CHECKING aside)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for b in node.body for n in ast.walk(b))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            # The longest known module the name starts with: `cmw_vllm.paths.x` -> paths.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != this and name != "cmw_vllm":
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_the_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    # server_manager imports health_check only inside functions.
    assert "cmw_vllm.health_check" in graph["cmw_vllm.server_manager"]
    assert "cmw_vllm.server_record" in graph["cmw_vllm.server_manager"]


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_import_points_down() -> None:
    cycles = _cycles(import_graph())
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


LEAVES = ["cmw_vllm.errors", "cmw_vllm.paths", "cmw_vllm.vocab", "cmw_vllm.server_record"]
ALLOWED_BELOW_LEAVES = {"cmw_vllm.errors", "cmw_vllm.paths", "cmw_vllm.vocab"}


@pytest.mark.parametrize("module", LEAVES)
def test_the_bottom_layer_imports_only_the_bottom_layer(module: str) -> None:
    assert import_graph()[module] <= ALLOWED_BELOW_LEAVES - {module}


def _error_classes(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b) for b in node.bases}
            if any(b.endswith(("Error", "Exception", "Problem")) for b in bases):
                out.append(node.name)
    return out


def test_error_classes_live_in_errors_py() -> None:
    strays = {}
    for name, path in _modules().items():
        if name == "cmw_vllm.errors":
            continue
        found = _error_classes(ast.parse(path.read_text(encoding="utf-8")))
        if found:
            strays[name] = found
    assert not strays


def test_nothing_raises_the_base_error_class() -> None:
    offenders = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("CmwVllmError"):
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders


def _is_cli(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return leaf in ("cli", "__main__") or leaf.startswith("cli_")


def test_the_core_never_imports_the_cli() -> None:
    upward = {name: sorted(d for d in deps if _is_cli(d))
              for name, deps in import_graph().items() if not _is_cli(name)}
    assert not {name: deps for name, deps in upward.items() if deps}


def test_the_core_never_imports_a_subsystem() -> None:
    upward = {}
    for name, deps in import_graph().items():
        if _is_cli(name) or name.startswith("cmw_vllm.gateway"):
            continue
        found = sorted(d for d in deps if d.startswith("cmw_vllm.gateway"))
        if found:
            upward[name] = found
    assert not upward
