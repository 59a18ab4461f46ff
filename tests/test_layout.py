"""The package's layout: no import circles inside fastlora/ (with triton_kernels/, installed as
fastlora.triton_kernels), and no long module without a reason.

Imports are read from the source (AST), at module level and inside functions alike: a lazy
import inside a function still ties two modules together, so it counts. A package's
``__init__`` re-exporting its own submodules is not a circle (Python imports the package first).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "fastlora"
# triton_kernels/ installs as fastlora.triton_kernels (setup.py): one package, one graph
PACKAGES = {"fastlora": ROOT, "fastlora.triton_kernels": ROOT.parent / "triton_kernels"}
MAX_LINES = 400
# a module over MAX_LINES says why in its docstring with this phrase
REASON = "long module:"


def _modules() -> dict[str, Path]:
    mods = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The fastlora modules ``name`` imports (``from .x import y`` counts x.y when y is a module)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # "fastlora.quant.nf4.NF4Weight" -> "fastlora.quant.nf4"
                t = t.rpartition(".")[0]
            if t and t != name and not (is_pkg and t.startswith(name + ".")):
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_in_the_package():
    cycles = _cycles(_graph())
    assert not cycles, f"import circles inside fastlora/: {cycles}"


def test_the_circle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", sorted(_modules()))
def test_long_modules_say_why(name):
    path = _modules()[name]
    text = path.read_text(encoding="utf-8")
    n = len(text.splitlines())
    if n <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert REASON in doc.lower(), (
        f"{path.relative_to(ROOT.parent)} has {n} lines (> {MAX_LINES}): split it, or say why it is one module "
        f"in its docstring ('{REASON} ...')"
    )
