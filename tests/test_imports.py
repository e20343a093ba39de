"""The package's import graph: every module imports, no import cycles, nothing imports the package root.

The graph is read with `ast` from em_interp/**/*.py (relative imports resolved; importing `a.b.c` also
imports the packages `a` and `a.b`, except those the importing module lies in, which are already
initialising; imports under `if TYPE_CHECKING:` do not run and are left out).
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from em_interp._moved import MOVED

ROOT = Path(__file__).resolve().parents[1] / "em_interp"

# Imports inside functions that point *up* the layers, each kept lazy on purpose (and listed, so that a new
# one fails this test): `.plot()` methods draw with the report's figures without making the layer below
# depend on plotly at import time; the CLI loads its subcommands' modules on use.
LAZY_ALLOWED = {
    ("em_interp.training.runs", "em_interp.report.figures"): "TrainRun.plot",
    ("em_interp.training.continuation", "em_interp.report.study_figures"): "Reversion.plot",
    ("em_interp.geometry.pca", "em_interp.report.figures"): "TrajectoryPCA.plot",
    ("em_interp.geometry.curves", "em_interp.report.figures"): "EfficiencyCurve / StabilityCurve .plot",
    ("em_interp.geometry.kl_norm", "em_interp.report.figures"): "KLNormCurve.plot",
    ("em_interp.geometry.similarity", "em_interp.report.figures"): "CosineMatrix.plot",
    ("em_interp.eval.contrastive", "em_interp.report.figures"): "ContrastiveResult.plot",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _targets(module: str, node: ast.Import | ast.ImportFrom, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
    out = []
    for name in names:
        while name and name not in MODULES:  # `from pkg.mod import function` -> pkg.mod
            name = name.rpartition(".")[0]
        parts = name.split(".")
        out += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # the packages above run first
    mine = module.split(".")
    own = {".".join(mine[:i]) for i in range(1, len(mine) + 1)}  # the module's own packages are initialising
    return [t for t in out if t.startswith("em_interp") and t not in own]


def _graph(lazy: bool) -> dict[str, set[str]]:
    """module -> modules it imports at import time (lazy=False) or inside functions (lazy=True)."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        edges: set[str] = set()

        def visit(node: ast.AST, in_function: bool, module: str = module, path: Path = path, edges: set[str] = edges) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                if isinstance(child, (ast.Import, ast.ImportFrom)) and inner == lazy:
                    edges.update(_targets(module, child, path.name == "__init__.py"))
                visit(child, inner)

        visit(ast.parse(path.read_text(encoding="utf-8")), False)
        graph[module] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (a list of modules, first == last), or None for a DAG."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_the_graph_reader_sees_imports():
    top = _graph(lazy=False)
    assert "em_interp.adapters.base" in top["em_interp.adapters.steering"]
    assert "em_interp.adapters" in top["em_interp.interventions"]  # the package above the imported module
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_import_cycle_at_import_time():
    assert _cycle(_graph(lazy=False)) is None


def test_no_import_cycle_with_imports_inside_functions():
    """Function-level imports join the graph, except the listed deliberate lazy ones; still no cycle."""
    top, lazy = _graph(lazy=False), _graph(lazy=True)
    found = {(m, t) for m, ts in lazy.items() for t in ts}
    listed = {(m, t) for m, t in found if any(m == a and (t == b or b.startswith(t + ".")) for a, b in LAZY_ALLOWED)}
    missing = [edge for edge in LAZY_ALLOWED if edge not in found]
    assert not missing, f"LAZY_ALLOWED lists imports that no longer exist: {missing}"
    combined = {m: top[m] | {t for t in lazy[m] if (m, t) not in listed} for m in MODULES}
    assert _cycle(combined) is None


def test_nothing_imports_the_package_root():
    graph = {m: _graph(lazy=False)[m] | _graph(lazy=True)[m] for m in MODULES}
    importers = sorted(m for m, ts in graph.items() if "em_interp" in ts and m.count(".") == 0)
    direct = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import) and any(a.name == "em_interp" for a in node.names):
                direct.append(module)
            if isinstance(node, ast.ImportFrom) and node.module == "em_interp" and not node.level:
                if any(f"em_interp.{a.name}" not in MODULES for a in node.names):  # a name, not a submodule
                    direct.append(module)
    assert not importers and not direct, f"modules importing the package root: {sorted(set(direct))}"


# Data flows one way: each module may import its own layer and those before it, never a later one (the
# report draws any runs and the study's results without importing the study, which writes its report).
LAYERS = (
    ("em_interp._version", "em_interp.errors", "em_interp.fileio", "em_interp.positions", "em_interp.stats"),
    ("em_interp.datasets",),
    ("em_interp.model",),
    ("em_interp.adapters", "em_interp.interventions", "em_interp.testing"),
    ("em_interp.config", "em_interp.training"),
    ("em_interp.geometry", "em_interp.eval", "em_interp.directions", "em_interp.inspect_task"),
    ("em_interp.report",),
    ("em_interp.study",),
    ("em_interp.cli",),
)
def _layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS; add it")


def test_lower_layers_never_import_higher_ones():
    top, lazy = _graph(lazy=False), _graph(lazy=True)
    upward = []
    for module in MODULES:
        if module == "em_interp":
            continue  # the package root gathers the public API
        for target in top[module] | lazy[module]:
            if target == "em_interp" or _layer(target) <= _layer(module):
                continue
            if any(module == a and (target == b or b.startswith(target + ".")) for a, b in LAZY_ALLOWED):
                continue
            upward.append(f"{module} -> {target}")
    assert not upward, "imports up the layers: " + ", ".join(sorted(upward))


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_old_module_paths_are_deprecated_aliases(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)  # the same module: its classes and state are shared
    assert old not in MODULES  # no file is left at the old path (so git follows the rename)


def test_python_dash_m_old_sweep_path_runs_the_moved_module():
    proc = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-m", "em_interp.sweep"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT.parent)})
    assert proc.returncode != 0 and "usage: python -m em_interp.cli.sweep CONFIG.toml" in proc.stderr
    assert "em_interp.sweep moved to em_interp.cli.sweep" in proc.stderr


def test_moved_names_still_reach_from_the_package_root():
    import em_interp as em

    assert em.models.hf_model_of is em.model.hf_model_of
    assert em.verdicts.narrowness_gate is em.study.verdicts.narrowness_gate
    assert em.study.group_shifts is importlib.import_module("em_interp.study.study").group_shifts
    assert em.report.build is importlib.import_module("em_interp.report.runs").build
