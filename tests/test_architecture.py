"""The layers hold: the library never imports the tools built on it, no module imports another command's CLI,
and no two modules import each other, directly or around a loop (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("fact_lightning", "data_tools", "benchmarks")
CLI_MODULES = {"fact_lightning.cli", "fact_lightning.inference.cli", "fact_lightning.evaluation.cli", "data_tools.cli"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules imported anywhere in the file (resolved to the longest known module name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.split(".")[0] in PACKAGES:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    known = set(files)
    graph = {}
    for name, path in files.items():
        # A package's __init__ is imported with any of its modules; edges to parent packages are not imports
        # of their code unless the __init__ has some, which ours do not (docstrings only, bar re-exports).
        graph[name] = {t for t in _imports(path, name, known) if not name.startswith(t + ".")}
    return graph


def test_the_library_never_imports_the_tools():
    offenders = {m: sorted(t for t in deps if t.startswith(("data_tools", "benchmarks")))
                 for m, deps in _graph().items() if m.startswith("fact_lightning")}
    assert not {m: d for m, d in offenders.items() if d}


def test_no_module_imports_another_commands_cli():
    graph = _graph()
    offenders = {m: sorted(deps & CLI_MODULES) for m, deps in graph.items()
                 if deps & CLI_MODULES and not m.endswith("__main__")}
    assert not offenders


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles[:5]


def test_the_inference_commands_parse_their_options_before_torch_loads():
    """fact-generate and fact-evaluate answer a mistake in their options in under a second: importing their CLI
    modules (options, help, the recipe, base types) loads no torch."""
    import subprocess
    import sys

    probe = ("import sys, fact_lightning.inference.cli, fact_lightning.evaluation.cli; "
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
