"""The structure the rest builds on: import graph without loops, errors below the CLI, bad input
refused before any work, and identities (hashes, arm ids, stage names) that resume and reuse
depend on, pinned from before the restructuring.

`tests/data/pinned_runs.json` holds one stored row per (arm, stage kind, method) of the shipped
evidence sweeps (gskd, kd, cwd, cwd+gskd; paths replaced by placeholders), written by the code of
commit 7f84c7c. A hash, arm id or stage name that changes would make an existing database look
empty to `sweep` (no resume, no student-arm reuse) and to `reproduce`.
"""
import ast
import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.config import PROJECT_ROOT, load_config, run_hash
from harness.sweep.protocol import load_protocol, parse_stage_name, rerun_stages, sub_stage_name
from harness.sweep.runner import arm_ids, stage_runs

PACKAGE = PROJECT_ROOT / "harness"
PINNED_RUNS = json.loads((Path(__file__).parent / "data" / "pinned_runs.json").read_text())


# --------------------------------------------------------------------------------- import graph
def imports_of(path: Path) -> set:
    """Every `harness.*` module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("harness")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("harness"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from harness.x import module`
        elif isinstance(node, ast.ImportFrom) and node.level > 0:  # relative: from .backbones import ...
            package = module_name(path).rsplit(".", node.level if path.name != "__init__.py" else node.level - 1)[0]
            found.add(f"{package}.{node.module}" if node.module else package)
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: sorted(m for m in imports_of(path) if m in modules and m != name) for name, path in modules.items()}


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_loop():
    assert cycles(import_graph()) == []


def test_nothing_below_the_cli_imports_the_cli():
    graph = import_graph()
    assert [m for m, deps in graph.items() if "harness.cli" in deps and m != "harness.__main__"] == []


def test_cycle_finder_finds_a_loop():
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]


def test_layers_point_down():
    """The report layer reads; it never reaches the engine, models, data, methods or the measure layer."""
    graph = import_graph()
    below = ("harness.engine", "harness.models", "harness.data", "harness.methods", "harness.measure", "harness.cli")
    for module, deps in graph.items():
        if module.startswith("harness.report"):
            assert not [d for d in deps if d.startswith(below)], module
        if module.startswith(("harness.engine", "harness.methods", "harness.models", "harness.data")):
            assert not [d for d in deps if d.startswith(("harness.sweep", "harness.report", "harness.measure"))], module


# ----------------------------------------------------------------------------- pinned identities
@pytest.mark.parametrize("row", PINNED_RUNS, ids=[f"{r['arm']}-{r['stage']}-{r['methods']}" for r in PINNED_RUNS])
def test_stored_configurations_hash_as_they_did(row):
    assert run_hash(row["config_json"]) == row["config_hash"]


def test_arm_ids_and_stage_names_of_the_shipped_sweeps_are_unchanged(tmp_path):
    """Recompute, from today's config and protocol, the arm id and stage names the stored rows carry."""
    stored = {}
    for row in PINNED_RUNS:
        stored.setdefault(row["methods"] or "", set()).add((row["sweep_id"], row["stage"]))
    protocol = load_protocol("default")
    for methods in ("gskd", "kd", "cwd", "cwd,gskd"):
        cfg = load_config([f"+method=[{methods}]", f"paths.results={tmp_path}"])
        ids = arm_ids(cfg, protocol)
        names = {(ids[arm], run.name) for stage in protocol.stages if stage.search != "combine"
                 for arm in stage.arms for run in stage_runs(cfg, stage, arm, ids[arm])}
        names |= {(ids[arm], stage.name) for stage in protocol.stages if stage.search == "combine" for arm in stage.arms}
        assert stored[methods] <= names, stored[methods] - names
        assert {s for s, _ in stored[""]} == {ids["student-only"]}
        assert {(s, n) for s, n in stored[""]} <= names


def test_sub_stage_names_are_formatted_and_parsed_in_one_place():
    name = sub_stage_name("weights", "method.kd.weight")
    assert name == "weights[method.kd.weight]" and parse_stage_name(name) == ("weights", "method.kd.weight")
    assert parse_stage_name("lr_wd") == ("lr_wd", None)
    assert rerun_stages(load_protocol("default")) == ["reruns"]


# -------------------------------------------------------------------- bad input: exit 2, no work
def written(tmp_path: Path) -> list:
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("command, overrides", [
    ("config", ["+method=gskd", "method.gskd.mode=foo"]),
    ("train", ["+method=gskd", "method.gskd.mode=foo"]),
    ("train", ["+method=kd", "method.kd.tau=-1"]),
    ("train", ["+method=cwd", "method.cwd.feature_tau=0"]),
    ("teacher", ["+method=gskd", "method.gskd.mode=foo"]),
    ("sweep", ["+method=gskd", "method.gskd.nosuch=1"]),
    ("sweep", ["+method=gskd", "+method.gskd.nosuch=1"]),
    ("sweep", ["+method=kd", "method.kd.tau=0"]),
])
def test_a_bad_method_value_is_refused_before_anything_is_written(command, overrides, tmp_path, capsys):
    paths = [f"paths.results={tmp_path / 'results'}", f"paths.reports={tmp_path / 'reports'}",
             f"paths.cache={tmp_path / 'cache'}", "budget=smoke"]
    assert main([command, *overrides, *paths]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1, err
    assert "method." in err
    assert written(tmp_path) == []  # no teacher trained, no database, no report
