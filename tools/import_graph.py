"""Counts the package's structure from its own source: import loops, imports against the layering,
Namespace reads below the command line, and long functions.

    python tools/import_graph.py            # the report
    python tools/import_graph.py --json     # the same numbers, for tests/test_layering.py

Every import statement counts, including those inside functions; ``from . import x`` is an edge to the
module ``x`` (not to the package). The layers are those of docs (LAYOUT): the command line
(``tdm_fast.cli*``, ``tdm_fast.__main__``, ``tdm_fast.export.cli``) over the tools (``demos``, ``eval``,
``perf``) over the library (everything else) over the kernels; ``tdm_fast.usage`` is a leaf every layer
may import. An import from a lower layer into a higher one is "against the layering".
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {"tdm_fast": "tdm_fast", "kernels": "tdm_fast.kernels", "export": "tdm_fast.export"}
LEAVES = ("tdm_fast.usage",)
LONG_FUNCTION_LINES = 80
# functions allowed over LONG_FUNCTION_LINES, and why
LONG_FUNCTION_ALLOWED: dict[str, str] = {}
# folders whose code must not read an argparse Namespace (the command line does)
NO_NAMESPACE = ("tdm_fast/demos", "tdm_fast/eval", "tdm_fast/perf", "tdm_fast/backbones", "export")
NAMESPACE_FACES = ("export/cli.py",)
# ``python -m`` mains allowed to read the Namespace they parse (file::function), and why
NAMESPACE_MAINS: dict[str, str] = {
    "tdm_fast/demos/t2i_layouts.py::main": "python -m face of run_layouts: parses its argv, calls it with values",
    "tdm_fast/demos/t2i_ablations.py::main": "python -m face of run_pipeline_ablations: parses its argv, calls it with values",
    "tdm_fast/eval/stability.py::main": "python -m face of run_stability/run_curve: parses its argv, calls them with values",
}
NAMESPACE_READ = re.compile(r"getattr\(args\b|(?<![\w.])args\.\w")


def layer(module: str) -> int:
    """3 command line, 2 tools, 1 library, 0 kernels; leaves get -1 (importable from anywhere)."""
    if module in LEAVES:
        return -1
    if module in ("tdm_fast.cli", "tdm_fast.__main__", "tdm_fast.export.cli") or module.startswith("tdm_fast.cli."):
        return 3
    if module.split(".")[:2] in (["tdm_fast", "demos"], ["tdm_fast", "eval"], ["tdm_fast", "perf"]):
        return 2
    if module.startswith("tdm_fast.kernels"):
        return 0
    return 1


def source_files() -> dict[str, Path]:
    """module name -> file, for every module of the installed package."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if any(p in ("kernels", "export") for p in parts) and folder == "tdm_fast":
                continue  # a stray copy under tdm_fast/ would shadow the real one
            modules[".".join([package, *parts])] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom | ast.Import, known: set[str]) -> list[str]:
    """The package modules one import statement reaches (submodules named in ``from X import y`` included)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    edges = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        if sub in known:
            edges.append(sub)
        elif target in known:
            edges.append(target)
    return sorted(set(edges))


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}."""
    known = set(modules)
    graph = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(module, path.name == "__init__.py", node, known):
                    if target != module:
                        edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def loops(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def against_layering(graph, modules) -> list[str]:
    out = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            if layer(target) > layer(module) >= 0 or (layer(module) == -1 and target not in LEAVES):
                out.append(f"{modules[module].relative_to(ROOT)}:{line} {module} -> {target}")
    return out


def _allowed_main_lines(rel: str, source: str) -> set[int]:
    """The lines of the file's top-level functions that NAMESPACE_MAINS allows to read a Namespace."""
    return {number for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)
            and f"{rel}::{node.name}" in NAMESPACE_MAINS for number in range(node.lineno, node.end_lineno + 1)}


def namespace_reads() -> list[str]:
    out = []
    for folder in NO_NAMESPACE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in NAMESPACE_FACES:
                continue
            source = path.read_text()
            allowed = _allowed_main_lines(rel, source)
            for number, line in enumerate(source.splitlines(), 1):
                if number not in allowed and NAMESPACE_READ.search(line.split("#")[0]):
                    out.append(f"{rel}:{number} {line.strip()}")
    return out


def long_functions(modules: dict[str, Path]) -> list[dict]:
    out = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))

        def walk(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}.{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        lines = child.end_lineno - child.lineno + 1
                        if lines > LONG_FUNCTION_LINES:
                            out.append({"function": name, "lines": lines,
                                        "where": f"{path.relative_to(ROOT)}:{child.lineno}",
                                        "allowed": LONG_FUNCTION_ALLOWED.get(name)})
                    walk(child, name)

        walk(tree, module)
    return sorted(out, key=lambda f: -f["lines"])


def report() -> dict:
    modules = source_files()
    graph = import_graph(modules)
    return {
        "modules": len(modules),
        "imports": sum(len(e) for e in graph.values()),
        "loops": loops(graph),
        "against_layering": against_layering(graph, modules),
        "namespace_reads": namespace_reads(),
        "namespace_mains": NAMESPACE_MAINS,
        "long_functions": long_functions(modules),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = report()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['modules']} modules, {result['imports']} module-to-module imports")
    print(f"import loops: {len(result['loops'])}")
    for component in result["loops"]:
        print(f"  {len(component)} modules: {', '.join(component)}")
    print(f"imports against the layering: {len(result['against_layering'])}")
    for line in result["against_layering"]:
        print(f"  {line}")
    print(f"Namespace reads below the command line: {len(result['namespace_reads'])} "
          f"(besides {len(NAMESPACE_MAINS)} python -m mains allowed)")
    for line in result["namespace_reads"]:
        print(f"  {line}")
    for main_function, why in NAMESPACE_MAINS.items():
        print(f"  allowed: {main_function}: {why}")
    long = result["long_functions"]
    print(f"functions over {LONG_FUNCTION_LINES} lines: {len(long)} ({sum(1 for f in long if f['allowed'])} allowed)")
    for f in long:
        print(f"  {f['lines']:4d} {f['function']} ({f['where']}){' allowed: ' + f['allowed'] if f['allowed'] else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
