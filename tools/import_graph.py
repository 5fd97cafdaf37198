"""Print the package-level import graph of ``axpo_nemo`` and its cycles.

Every import counts, those inside functions too (a lazy import is still a dependency). Usage::

    python tools/import_graph.py            # the graph, one package per line, then the cycles
    python tools/import_graph.py --modules  # also the modules behind each cycle's edges

`tests/test_layering.py` asserts the layering rules on the same graph.
"""

from __future__ import annotations

import argparse
import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "axpo_nemo"


def package_of(path: Path) -> str:
    """The first-level package of a module file (for a module directly in axpo_nemo/: its name)."""
    parts = path.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else path.stem


def imported_modules(path: Path) -> set[str]:
    """Every ``axpo_nemo.*`` module a file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("axpo_nemo."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("axpo_nemo."):
            found.add(node.module)
    return found


def package_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], set[str]]]:
    """``(edges, why)``: package -> packages it imports, and (a, b) -> the files of a importing b."""
    edges: dict[str, set[str]] = collections.defaultdict(set)
    why: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for path in sorted(ROOT.rglob("*.py")):
        src = package_of(path)
        for module in imported_modules(path):
            dst = module.split(".")[1]
            if dst != src:
                edges[src].add(dst)
                why[(src, dst)].add(str(path.relative_to(ROOT.parent)))
    return edges, why


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: every strongly connected group of two or more packages, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the graph has a dozen nodes
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(set(edges) | {d for targets in edges.values() for d in targets}):
        if node not in index:
            visit(node)
    return sorted(found)


def main() -> None:
    """Print the graph and the cycles."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", action="store_true", help="name the modules behind each cycle's edges")
    args = parser.parse_args()
    edges, why = package_graph()
    for pkg in sorted(edges):
        print(f"{pkg} -> {', '.join(sorted(edges[pkg]))}")
    found = cycles(edges)
    print(f"cycles: {len(found)}")
    for group in found:
        print(f"  {' <-> '.join(group)}")
        if args.modules:
            for a in group:
                for b in group:
                    if b in edges.get(a, ()):
                        print(f"    {a} -> {b}: {', '.join(sorted(why[(a, b)]))}")


if __name__ == "__main__":
    main()
