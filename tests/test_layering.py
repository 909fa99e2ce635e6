"""Layering by rule: no import cycles between mmbatch modules, and the low layers import nothing from above.

Every ``import`` / ``from ... import`` in every module under ``mmbatch/`` counts, including the ones
inside functions (a lazy import is still a dependency). ``from pkg import name`` is an import of
``pkg.name`` when that is a module, else of ``pkg``. Dynamic imports (``importlib``) are not seen.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mmbatch"

# The low layers, lowest first. A module here may import only mmbatch modules in a LOWER layer
# (nothing from its own layer, nothing from above, nothing outside this list). ``mmbatch`` is the
# package itself (its __init__: the version).
LOW_LAYERS: tuple[tuple[str, ...], ...] = (
    ("mmbatch", "mmbatch.errors"),                       # exit codes, UsageError, __version__
    ("mmbatch.schema", "mmbatch.engine.storage"),               # the canonical schema; filesystem + JSON helpers
    ("mmbatch.media", "mmbatch.engine.runtime"),                # media bytes probe/decode; Ray/thread setup
)

# Known import cycles in modules that are being rewritten elsewhere, as (importer, imported) pairs.
# Each entry must still exist (the test fails on a stale one) so this list only shrinks; empty it
# once the rewrite is merged.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the mmbatch modules it imports}."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}

    def existing(name: str) -> str:
        while name not in files:           # mmbatch.x.function -> mmbatch.x
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(existing(a.name) for a in node.names if a.name.split(".")[0] == "mmbatch")
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:                   # relative: from . import x, from ..y import z
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                if base.split(".")[0] != "mmbatch":
                    continue
                for a in node.names:
                    full = f"{base}.{a.name}"
                    targets.add(full if full in files else existing(base))
        targets.discard(mod)
        graph[mod] = targets
    return graph


def cycle_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Every edge that lies on a cycle (both ends in the same strongly connected component)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    component: dict[str, int] = {}

    def visit(v: str) -> None:           # Tarjan; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component[w] = index[v]
                if w == v:
                    break

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return {(a, b) for a, targets in graph.items() for b in targets if component[a] == component[b]}


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "mmbatch.media" in graph["mmbatch.ingest.sources.common"]          # imported inside a function there
    assert "mmbatch.errors" in graph["mmbatch.cli"]
    assert {"mmbatch.errors", "mmbatch.ingest.sources.common"} <= graph["mmbatch.ingest.sources.timit"]
    # the cycle finder finds a planted cycle, and only its edges
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycle_edges(planted) == {("a", "b"), ("b", "c"), ("c", "a")}


def test_no_import_cycles():
    edges = cycle_edges(import_graph())
    assert not KNOWN_CYCLE_EDGES - edges, f"stale entries in KNOWN_CYCLE_EDGES: {KNOWN_CYCLE_EDGES - edges}"
    new = sorted(edges - KNOWN_CYCLE_EDGES)
    assert not new, "import cycles (importer -> imported):\n" + "\n".join(f"  {a} -> {b}" for a, b in new)


@pytest.mark.parametrize("layer", range(len(LOW_LAYERS)))
def test_low_layers_import_only_lower_layers(layer):
    graph = import_graph()
    allowed = {m for lower in LOW_LAYERS[:layer] for m in lower}
    for mod in LOW_LAYERS[layer]:
        assert mod in graph, f"{mod} is listed in LOW_LAYERS but does not exist"
        upward = sorted(graph[mod] - allowed)
        assert not upward, f"{mod} (layer {layer}) imports {upward}; it may import only {sorted(allowed) or 'nothing'}"


def test_no_test_hooks_in_shipped_code():
    """Fault injection and other test hooks live in tests/ (fault_hooks.py, loaded into Ray workers
    as a job's setup hook); no shipped module reads a test environment variable or names them."""
    hooks = [f"{p.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
             for p in sorted(PACKAGE.rglob("*.py"))
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if "MMBATCH_TEST" in line or "fault_hooks" in line]
    assert not hooks, "test hooks in mmbatch/:\n" + "\n".join(hooks)


STAGES = ("ingest", "preprocess", "train", "dedup", "audit", "convert", "ops", "demo")


def test_the_top_level_is_the_stages_plus_one_engine():
    """mmbatch/ holds the stage packages, the engine and a few shared modules (docs/architecture.md)."""
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert packages == sorted([*STAGES, "engine"])
    modules = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert modules == ["__init__", "cli", "config", "data", "errors", "media", "plots", "schema"]


def test_the_engine_imports_no_stage_and_ingest_no_other_stage():
    graph = import_graph()
    stage_of = {m: m.split(".")[1] for m in graph if m.count(".") >= 1 and m.split(".")[1] in STAGES}
    for mod, targets in graph.items():
        if mod.startswith("mmbatch.engine"):
            assert not [t for t in targets if t in stage_of], f"{mod} imports a stage: {sorted(targets)}"
        if stage_of.get(mod) == "ingest":
            others = sorted(t for t in targets if stage_of.get(t, "ingest") != "ingest")
            assert not others, f"{mod} imports another stage: {others}"


def test_no_function_is_longer_than_80_lines():
    """Issue #32: every function in mmbatch/ reads in one screen."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)
