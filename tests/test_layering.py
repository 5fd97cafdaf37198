"""The package layering stays as docs/extending.md ("Layers") describes it: each package imports only packages
of lower layers (imports inside functions included), so there is no import cycle, the two backends
are siblings, and the config schema needs no backend. `tools/import_graph.py` prints the graph."""

from __future__ import annotations

from pathlib import Path

import pytest
from script_loader import load_script

ROOT = Path(__file__).resolve().parent.parent
import_graph = load_script(ROOT / "tools" / "import_graph.py")

#: Lowest first; a package may import packages of lower layers only (same layer: not each other).
LAYERS = [
    {"lazy"},
    {"core"},
    {"agent"},
    {"config"},
    {"models"},
    {"run"},
    {"data"},
    {"eval"},
    {"export"},
    {"local", "nemo"},  # the backends: siblings
    {"engines"},
    {"cli", "__init__"},
]
LAYER = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
MAX_LINES = 600


@pytest.fixture(scope="module")
def graph():
    edges, why = import_graph.package_graph()
    return edges, why


def test_every_package_has_a_layer(graph):
    edges, _ = graph
    packages = set(edges) | {d for targets in edges.values() for d in targets}
    assert packages <= set(LAYER), f"add {sorted(packages - set(LAYER))} to LAYERS"


def test_packages_import_only_lower_layers(graph):
    edges, why = graph
    bad = [
        f"{a} -> {b} ({', '.join(sorted(why[(a, b)]))})"
        for a in sorted(edges)
        for b in sorted(edges[a])
        if LAYER.get(b, 99) >= LAYER.get(a, -1)
    ]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    assert import_graph.cycles(graph[0]) == []


def test_the_cycle_finder_finds_a_three_package_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_graph.cycles(edges) == [["a", "b", "c"]]


def test_no_module_is_longer_than_600_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in sorted((ROOT / "axpo_nemo").rglob("*.py"))
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"
