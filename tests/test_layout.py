"""The layout's promises, checked on the source tree (README "Layout"):

- no source file over 600 lines outside tests/;
- no import cycle between mim_hf modules (module-level imports);
- mim_hf/common (shared plumbing) imports no stage; mim_hf never imports training/;
- modeling/ imports only the standard library, torch, transformers and its own files (Hub remote code).

``python tests/test_layout.py`` prints the module graph (one line per module) for a reader.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 600


def source_files() -> list[Path]:
    roots = ("mim_hf", "modeling", "training", "benchmarks", "examples")
    return sorted(path for root in roots for path in (REPO / root).rglob("*.py"))


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for mim_hf and modeling (installed as mim_hf.modeling)."""
    found = {}
    for base, package in ((REPO / "mim_hf", "mim_hf"), (REPO / "modeling", "mim_hf.modeling")):
        for path in base.rglob("*.py"):
            parts = [part for part in path.relative_to(base).with_suffix("").parts if part != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imported_names(module: str, path: Path, tree: ast.AST) -> list[str]:
    """Every dotted name the import statements in ``tree`` (part of ``path``) reach, made absolute."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def module_level_graph() -> dict[str, set[str]]:
    """Edges between package modules from imports outside functions (deferred imports break no cycle
    at import time). An import of a module's own parent package is left out: Python runs a parent's
    ``__init__`` before any of its submodules anyway."""
    found = modules()
    graph = {}
    for module, path in found.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = [node for node in tree.body if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        names = imported_names(module, path, ast.Module(body=top, type_ignores=[]))
        graph[module] = {name for name in names if name in found and name != module and not module.startswith(name + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_source_file_over_the_limit():
    long = {str(path.relative_to(REPO)): n for path in source_files()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_no_import_cycle():
    assert cycles(module_level_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_common_imports_no_stage_and_nothing_imports_training():
    every_import = {module: imported_names(module, path, ast.parse(path.read_text(encoding="utf-8")))
                    for module, path in modules().items()}
    upward = {module: sorted({name for name in names if name.startswith("mim_hf.")
                              and name.split(".")[1] not in ("common", "modeling")})
              for module, names in every_import.items() if module.startswith("mim_hf.common")}
    assert not any(upward.values()), upward
    assert not [module for module, names in every_import.items() if any(n.split(".")[0] == "training" for n in names)]


def test_modeling_imports_only_torch_transformers_and_itself():
    allowed = {"torch", "transformers", "mim_hf"} | set(sys.stdlib_module_names)
    bad = {module: sorted({name.split(".")[0] for name in imported_names(module, path, ast.parse(path.read_text()))
                           if name and name.split(".")[0] not in allowed})
           for module, path in modules().items() if module.startswith("mim_hf.modeling")}
    assert not any(bad.values()), bad


if __name__ == "__main__":
    for module, targets in sorted(module_level_graph().items()):
        print(f"{module} -> {', '.join(sorted(targets)) or '-'}")
