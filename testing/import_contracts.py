"""import-linter's ``forbidden`` and ``layers`` contract types (pyproject.toml registers these under the same names),
checked over a graph that also holds the project's top-level modules.

``service.py``, ``settings.py`` and ``errors.py`` are single files, which grimp cannot take as root packages (it
raises NotATopLevelModule), so its graph knows them only as imported names: what they import themselves was never
checked, and a chain through them (the engine reaching BentoML through ``settings``) was invisible. Here each file's
imports (every ``import``, at any depth, as grimp reads them) are added to the graph before the contract is checked.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from grimp import ImportGraph
from importlinter.contracts import forbidden, layers
from importlinter.domain.contract import ContractCheck

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL_MODULES = ("service", "settings", "errors")


def _imported(graph: ImportGraph, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The graph's names for what ``node`` imports: the deepest module the graph holds (a package's module, or an
    external package's top-level name), nothing for the standard library."""
    if isinstance(node, ast.Import):
        candidates = [[a.name] for a in node.names]
    elif node.level == 0 and node.module:
        candidates = [[f"{node.module}.{a.name}", node.module] for a in node.names]
    else:
        return []
    out = []
    for names in candidates:
        for name in names:
            parts = name.split(".")
            while parts and ".".join(parts) not in graph.modules:
                parts.pop()
            if parts:
                out.append(".".join(parts))
                break
        else:
            top = names[-1].split(".")[0]
            if top not in sys.stdlib_module_names and top != "__future__":
                out.append(top)  # an external package no root package imports: a node of its own
    return out


def add_top_level_modules(graph: ImportGraph, root: Path = ROOT) -> None:
    """Add the imports of each top-level module file to ``graph``."""
    for name in TOP_LEVEL_MODULES:
        source = (root / f"{name}.py").read_text(encoding="utf-8")
        lines = source.splitlines()
        if name not in graph.modules:
            graph.add_module(name)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for imported in _imported(graph, node):
                    if imported != name:
                        graph.add_import(
                            importer=name,
                            imported=imported,
                            line_number=node.lineno,
                            line_contents=lines[node.lineno - 1].strip(),
                        )


class ForbiddenContract(forbidden.ForbiddenContract):
    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        add_top_level_modules(graph)
        return super().check(graph, verbose)


class LayersContract(layers.LayersContract):
    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        add_top_level_modules(graph)
        return super().check(graph, verbose)
