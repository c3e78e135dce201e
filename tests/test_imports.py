"""Import hygiene of the package, read from the source with `ast` (nothing is imported).

For every module of refit_engine:
- it is in no cycle of module-level imports among refit_engine modules;
- a library module never imports refit_engine.harness (the library is what training code
  imports; the harness is benchmarks, sweeps, CLIs: see STYLE.md);
- every import inside a function is of an optional dependency on `OPTIONAL`: a module that
  must import without it. torch is not optional: the library needs it (refit_engine.channel,
  refit.py and the CPU executor import it at module level, so `import refit_engine` does), so a
  function-level torch import only hides where the dependency is.

Harness modules are checked by the same rules. Run this file
directly for the list of offenders: `python tests/test_imports.py`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "refit_engine"
HARNESS = "refit_engine.harness"
# Thin `python -m refit_engine.<name>` entries of the harness, kept at the top for the CLI.
HARNESS_ENTRIES = {"refit_engine.bench", "refit_engine.sweep", "refit_engine.memory"}
# Top-level names that may be imported inside a function, each optional for the library.
# A package module that imports one of them at module level (say the harness's megatron model
# builder) is optional the same way.
OPTIONAL = {
    "megatron": "megatron-core: needed only for megatron models (the adapter, the baseline)",
    "cupy": "CuPy: only a caller holding CuPy arrays has it",
    "matplotlib": "plots of the harness's sweep only",
}
# Compiled modules of the package: imported, never parsed.
EXTENSIONS = {"refit_engine._core"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


MODULES = _modules()


def is_harness(module: str) -> bool:
    return module == HARNESS or module.startswith(HARNESS + ".") or module in HARNESS_ENTRIES


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The modules an import statement names (`from a import b` names a.b if that is a module
    of the package, else a)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    named = [f"{base}.{a.name}" for a in node.names]
    return [n if n in MODULES or n in EXTENSIONS else base for n in named]


def imports_of(module: str, source: str | None = None):
    """(module-level, function-level) imports of `module`: (target, line) each."""
    path = MODULES.get(module, Path(f"{module}.py"))
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    top, inner = [], []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out = inner if in_function else top
                out.extend((t, child.lineno) for t in _targets(child, module,
                                                                path.name == "__init__.py"))
            visit(child, in_function or isinstance(child, (ast.FunctionDef,
                                                           ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, inner


def cycles() -> dict[str, list[str]]:
    """Module -> the modules of its import cycle (strongly connected component), for every
    module in one."""
    graph = {m: sorted({t for t, _ in imports_of(m)[0] if t in MODULES and t != m} )
             for m in MODULES}
    self_loops = {m for m in MODULES if any(t == m for t, _ in imports_of(m)[0])}
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), {}, [0]

    def strongconnect(v):  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in self_loops:
                for w in component:
                    out[w] = sorted(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(MODULES)))
    for v in graph:
        if v not in index:
            strongconnect(v)
    return out


def optional_modules() -> set[str]:
    """Package modules whose module-level imports reach an optional dependency."""
    needs = {m: {t for t, _ in imports_of(m)[0]} for m in MODULES}
    optional = {m for m, targets in needs.items()
                if any(t.split(".")[0] in OPTIONAL for t in targets)}
    grown = True
    while grown:
        more = {m for m, targets in needs.items() if m not in optional and targets & optional}
        optional |= more
        grown = bool(more)
    return optional


def problems(module: str, in_cycle: dict[str, list[str]], optional: set[str]) -> list[str]:
    top, inner = imports_of(module)
    out = []
    if module in in_cycle:
        out.append(f"in an import cycle with {[m for m in in_cycle[module] if m != module]}")
    if not is_harness(module):
        for target, line in top + inner:
            if is_harness(target):
                out.append(f"line {line}: the library imports the harness ({target})")
    for target, line in inner:
        if target.split(".")[0] not in OPTIONAL and target not in optional:
            out.append(f"line {line}: function-level import of {target} (not an optional "
                       "dependency: import it at the top)")
    return out


_CYCLES = cycles()
_OPTIONAL_MODULES = optional_modules()


@pytest.mark.parametrize("module", MODULES)
def test_module_imports(module):
    found = problems(module, _CYCLES, _OPTIONAL_MODULES)
    assert not found, f"{module}:\n  " + "\n  ".join(found)


def test_the_check_reads_nested_and_relative_imports():
    source = ("import os\nfrom . import layouts\nfrom refit_engine import _core, dtypes\n"
              "class C:\n    def f(self):\n        def g():\n            import cupy\n"
              "        return g\n")
    top, inner = imports_of("refit_engine.example", source)
    assert [t for t, _ in top] == ["os", "refit_engine.layouts", "refit_engine._core",
                                   "refit_engine.dtypes"]
    assert inner == [("cupy", 7)]


if __name__ == "__main__":
    for name in MODULES:
        for problem in problems(name, _CYCLES, _OPTIONAL_MODULES):
            print(f"{'harness' if is_harness(name) else 'library'}  {name}: {problem}")
