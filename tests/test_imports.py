"""The package's import graph, read from the source: no cycles, no import of
another nsa_dsl module hidden inside a function, and every module imports on
its own.

Edges are every import of an nsa_dsl module anywhere in a file (module level,
inside functions or classes, under `if`): `from .x import y`, `from . import
x`, `import nsa_dsl.x`, `from nsa_dsl import x`, `importlib.import_module`
of a literal name. An import of a name the package itself defines (`from
nsa_dsl import compile`) is an edge to the package, nsa_dsl/__init__.py.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = "nsa_dsl"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# Imports of nsa_dsl modules that may stay inside a function, each with its
# reason: (importing module, imported module) -> why. Only a lazily loaded
# leaf belongs here, never an import placed there to dodge a cycle.
LAZY_ALLOWED: dict = {}


def module_files() -> dict:
    """{dotted module name: path} for every .py file of the package."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE,) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_package(name: str, modules: dict) -> bool:
    return modules[name].name == "__init__.py"


def _target(name: str, modules: dict) -> str:
    """The module an import of dotted `name` loads last: `name` itself when
    it is one of ours, else its longest known prefix (a function or class
    imported from a module)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _resolve(module: str, level: int, target: str, modules: dict) -> str:
    """The absolute name of a relative import inside `module`."""
    package = module if _is_package(module, modules) else module.rsplit(".", 1)[0]
    for _ in range(level - 1):
        package = package.rsplit(".", 1)[0]
    return f"{package}.{target}" if target else package


def imports_of(module: str, modules: dict) -> list:
    """[(imported module, line, inside a function)] for one module."""
    tree = ast.parse(modules[module].read_text(), str(modules[module]))
    found = []

    def add(name: str, node, in_function: bool) -> None:
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            target = _target(name, modules)
            if target != module and (target, node.lineno, in_function) not in found:
                found.append((target, node.lineno, in_function))

    def visit(node, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, in_function)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.level, node.module or "", modules) if node.level else node.module or ""
            for alias in node.names:
                # `from pkg import x`: the submodule pkg.x when there is one, else pkg
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base, node, in_function)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            name = node.args[0].value
            if name.startswith("."):
                dots = len(name) - len(name.lstrip("."))
                name = _resolve(module, dots, name.lstrip("."), modules)
            add(name, node, in_function)
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def import_graph() -> dict:
    modules = module_files()
    return {m: sorted({t for t, _, _ in imports_of(m, modules)}) for m in modules}


def find_cycle(graph: dict):
    """One cycle as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_every_kind_of_import():
    # The reader itself, on imports the package really has.
    graph = import_graph()
    assert "nsa_dsl.ir" in graph["nsa_dsl.parse"]  # from . import ir
    assert "nsa_dsl.plan" in graph["nsa_dsl.pipeline"]  # from .plan import ...
    assert "nsa_dsl" in graph["nsa_dsl.cli"]  # import nsa_dsl
    assert "nsa_dsl.verify" in graph["nsa_dsl.cli"]  # import nsa_dsl.verify
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None


def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nsa_dsl_modules_are_imported_at_the_top():
    modules = module_files()
    lazy = [f"{modules[m].relative_to(ROOT.parent)}:{line} imports {target} inside a function"
            for m in modules for target, line, in_function in imports_of(m, modules)
            if in_function and (m, target) not in LAZY_ALLOWED]
    assert not lazy, ("imports of nsa_dsl modules inside functions (move them to the top, or list a lazily"
                      " loaded leaf in LAZY_ALLOWED with its reason):\n  " + "\n  ".join(lazy))


# Run in a fresh interpreter: for each module, every nsa_dsl module is
# dropped from sys.modules and the one module imported anew, so the package
# initialises from that module's import alone (as in `python -c "import
# nsa_dsl.X"`); third-party packages (torch, sympy) stay loaded between
# modules, which keeps the test to one interpreter's start.
_IMPORT_EACH = r"""
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "nsa_dsl" or m.startswith("nsa_dsl.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
        pkg = sys.modules["nsa_dsl"]
        assert pkg.check is sys.modules["nsa_dsl.pipeline"].check, "nsa_dsl.check is not the function"
        assert pkg.reference is sys.modules["nsa_dsl.reference"].reference, "nsa_dsl.reference is not the function"
    except BaseException:
        failed.append(name + ":\n" + traceback.format_exc())
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own():
    names = sorted(module_files())
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], capture_output=True, text=True,
                          cwd=ROOT.parent, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
