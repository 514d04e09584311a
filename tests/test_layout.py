"""The layout's rules, read from the source with `ast`: imports flow one way among fuyou's modules (no
cycle, lazy imports inside functions included), the scheduler knows nothing of fuyou, functions stay
under ~80 lines unless a comment right above says why, and modules under ~400 lines."""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400
LONG_REASON = "# long:"  # a comment line right above a longer function (or its decorators) says why


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(package: str) -> Dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(path: pathlib.Path, module: str) -> Set[str]:
    """Every module `module` imports, at any depth of its code (lazy imports included)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    out: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return out


def _edges(modules: Dict[str, pathlib.Path]) -> Dict[str, Set[str]]:
    """module -> the fuyou modules it makes Python execute (an import also runs its parent packages)."""
    edges: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imp in _imports(path, name):
            parts = imp.split(".")
            for k in range(1, len(parts) + 1):
                prefix = ".".join(parts[:k])
                if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                    targets.add(prefix)
        edges[name] = targets
    return edges


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_fuyou_modules():
    assert _cycles(_edges(_sources("fuyou"))) == []


def test_the_checker_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_scheduler_imports_nothing_of_fuyou():
    for name, path in _sources("scheduler").items():
        bad = sorted(i for i in _imports(path, name) if i == "fuyou" or i.startswith("fuyou."))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def _long_functions(path: pathlib.Path) -> List[str]:
    lines = path.read_text().splitlines()
    out = []
    for node in ast.walk(ast.parse("\n".join(lines), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            above = lines[first - 2].strip() if first >= 2 else ""
            if length > MAX_FUNCTION_LINES and not above.startswith(LONG_REASON):
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_functions_are_short_or_say_why():
    long = [f for path in _sources("fuyou").values() for f in _long_functions(path)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines without a '{LONG_REASON} ...' comment above them: {long}"


def test_modules_are_small():
    big = {str(p.relative_to(ROOT)): n for p in _sources("fuyou").values() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"
