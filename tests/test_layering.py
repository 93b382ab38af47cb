"""Layering: ``passes/`` imports nothing from ``sepfx/``, and the passes import no cycle."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("passes", "sepfx")
PASS_MODULES = [
    "passes",
    "passes.channels",
    "passes.rules",
    "passes.slim",
    "passes.gates",
    "passes.cost",
    "passes.export",
    "passes.trace",
]


def test_importing_passes_loads_no_sepfx_module():
    code = (
        "import sys\n"
        f"import {', '.join(PASS_MODULES)}\n"
        "loaded = sorted(m for m in sys.modules if m == 'sepfx' or m.startswith('sepfx.'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing passes loaded {result.stdout.strip()}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere (module level or inside functions)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from passes import rules`` imports the module passes.rules
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                # the longest known module the name starts with
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    found.add(name)
    return found


def _import_graph() -> dict[str, set[str]]:
    paths = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    known = {_module_name(p) for p in paths}
    return {_module_name(p): _imported_modules(p, known) for p in paths}


def test_passes_import_nothing_from_sepfx():
    graph = _import_graph()
    offending = {
        module: sorted(m for m in imports if m.split(".")[0] == "sepfx")
        for module, imports in graph.items()
        if module.split(".")[0] == "passes"
    }
    offending = {module: imports for module, imports in offending.items() if imports}
    assert not offending, f"passes modules importing sepfx: {offending}"


def test_no_import_cycle_among_passes():
    graph = _import_graph()
    passes_graph = {
        module: {m for m in imports if m.startswith("passes.")}
        for module, imports in graph.items()
        if module.startswith("passes.")
    }
    assert "passes.channels" in passes_graph and "passes.rules" in passes_graph
    state: dict[str, str] = {}  # module -> "open" while on the stack, "done" after
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(passes_graph.get(module, ())):
            if state.get(target) == "open":
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(passes_graph):
        if module not in state:
            visit(module)


def test_the_graph_sees_function_level_imports():
    """The checker itself: an import inside a function is an arrow too."""
    graph = _import_graph()
    assert "passes.rules" in graph["passes.channels"]  # imported inside analyze_channels
    assert "passes.errors" in graph["sepfx.errors"]
