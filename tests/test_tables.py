"""Tables from a results database built here row by row: every number is recomputed from the rows."""
import math
import re
import shutil
import statistics
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from harness import stats
from harness.config import load_config
from harness.store import ResultsStore
from harness.report import blocks as blk
from harness.report import leaderboard
from harness.report.filters import Filters

torch.set_num_threads(1)

STUDENT = "pspnet_resnet18_small"
VALUES = {  # method label -> per-seed final mIoU (seeds 1..len)
    "student-only": [0.500, 0.512, 0.495, 0.507, 0.503],
    "kd": [0.511, 0.509, 0.522, 0.515, 0.508],
    "cwd": [0.530, 0.541, 0.528, 0.536, 0.533],
    "cwd,gskd": [0.533, 0.526, 0.545, 0.531, 0.539],
}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return load_config([f"paths.results={tmp_path_factory.mktemp('results')}", "progress=false"])


def conf_json(cfg, budget="quick"):
    out = {k: cfg[k] for k in ("dataset", "student", "sweep")}
    out["budget"] = {**cfg["budget"], "name": budget}
    return out


def add_arm(store, cfg, label, values, teacher="deeplabv3_resnet18_small", budget="quick", energy=True,
            stage="reruns", status="completed", sweep_id=None, seed0=1, **extra):
    student_only = label == "student-only"
    for i, v in enumerate(values):
        store.append(dict(
            arm="student-only" if student_only else "distilled", methods=[] if student_only else label,
            dataset="synthetic", student=STUDENT, teacher=None if student_only else teacher, seed=seed0 + i,
            split="val", status=status, stage=stage, final_miou=v, config_json=conf_json(cfg, budget),
            sweep_id=sweep_id or f"{'student-only' if student_only else 'distilled:' + label}:{budget}",
            energy_kwh=(0.002 + 0.0001 * i) if energy else None, co2_kg=(0.0008 + 0.00004 * i) if energy else None,
            git_commit="abc123", **extra))


@pytest.fixture
def store(tmp_path, cfg):
    s = ResultsStore(tmp_path / "db.sqlite")
    for label, values in VALUES.items():
        add_arm(s, cfg, label, values)
    # noise that must be ignored: tuning rows, a failed rerun, another budget's reruns
    add_arm(s, cfg, "kd", [0.9], stage="lr_wd", sweep_id="distilled:kd:quick")
    add_arm(s, cfg, "kd", [0.99], status="failed", seed0=9)
    add_arm(s, cfg, "kd", [0.2, 0.21], budget="smoke")
    add_arm(s, cfg, "student-only", [0.1, 0.11], budget="smoke")
    return s


def cfg_for(cfg, store):
    return {**cfg, "store": {"url": store.url}, "paths": {**cfg["paths"], "results": str(store.url).rsplit("/", 1)[0].replace("sqlite:///", "")}}


# ------------------------------------------------------------------------------------ blocks
def test_row_id_is_stable_and_normalises_methods():
    a = blk.row_id("synthetic", "s", "t", "gskd,cwd", "quick")
    assert a == blk.row_id("synthetic", "s", "t", ["cwd", "gskd"], "quick") == blk.row_id("synthetic", "s", "t", "cwd+gskd", "quick")
    assert re.fullmatch(r"[0-9a-f]{8}", a)
    assert blk.row_id("synthetic", "s", "t", "", "quick") == blk.row_id("synthetic", "s", "t", None, "quick")
    assert len({blk.row_id("synthetic", "s", "t", m, b) for m in ("", "kd", "cwd") for b in ("quick", "smoke")}) == 6
    from harness.config import stable_hash
    assert blk.row_id("d", "s", "t", "kd") == stable_hash(["d", "s", "t", "kd"], 8)


def test_blocks_group_rerun_rows_and_separate_budgets(store):
    blocks = blk.load_blocks(store)
    assert [(b.budget, list(b.arms)) for b in blocks] == [
        ("quick", ["student-only", "cwd", "cwd+gskd", "kd"]), ("smoke", ["student-only", "kd"])]
    quick = blocks[0]
    for label, values in VALUES.items():
        assert quick.arms[blk.method_label(label)].values == values     # no tuning / failed rows
    assert blk.load_blocks(store, budget="smoke")[0].arms["kd"].values == [0.2, 0.21]
    assert list(blk.load_blocks(store, budget="quick", methods=["kd"])[0].arms) == ["student-only", "kd"]
    assert blk.load_blocks(store, dataset="cityscapes") == []


def test_student_only_rows_serve_every_teacher(tmp_path, cfg):
    s = ResultsStore(tmp_path / "t.db")
    add_arm(s, cfg, "student-only", [0.5, 0.51])
    add_arm(s, cfg, "kd", [0.52, 0.53], teacher="t1")
    add_arm(s, cfg, "kd", [0.54, 0.55], teacher="t2")
    blocks = blk.load_blocks(s)
    assert [b.teacher for b in blocks] == ["t1", "t2"]
    assert all(b.baseline.values == [0.5, 0.51] for b in blocks)
    ids = {b.row_id("student-only") for b in blocks} | {b.row_id("kd") for b in blocks}
    assert len(ids) == 4


def test_find_row_returns_the_rows_behind_an_id(store):
    rid = blk.row_id("synthetic", STUDENT, "deeplabv3_resnet18_small", "cwd+gskd", "quick")
    rows = blk.find_row(store, rid)
    assert [r["final_miou"] for r in rows] == VALUES["cwd,gskd"] and {r["methods"] for r in rows} == {"cwd,gskd"}
    base = blk.find_row(store, blk.row_id("synthetic", STUDENT, "deeplabv3_resnet18_small", "", "quick"))
    assert [r["final_miou"] for r in base] == VALUES["student-only"]
    assert blk.find_row(store, "00000000") == []
    assert rid in blk.known_row_ids(store)


SEEDS_PROTOCOL = """
name: seeded
stages:
  - {name: lr_wd, arms: [student-only, distilled], search: tpe, trials: 2, space: {optim.lr: {loguniform: [0.001, 0.1]}}}
  - {name: seeds, arms: [student-only, distilled], inherits: [lr_wd], seeds: 3, split: val}
"""


def with_protocol(cfg, protocol):
    return {**cfg, "sweep": {**cfg["sweep"], "protocol": protocol}}


def test_rerun_stage_is_found_by_its_kind_not_its_name(tmp_path, cfg):
    from harness.report import significance

    proto = tmp_path / "seeded.yaml"
    proto.write_text(SEEDS_PROTOCOL)
    c = with_protocol(cfg, str(proto))
    s = ResultsStore(tmp_path / "k.db")
    add_arm(s, c, "student-only", [0.50, 0.51, 0.49], stage="seeds")
    add_arm(s, c, "kd", [0.55, 0.56, 0.57], stage="seeds")
    add_arm(s, c, "kd", [0.9, 0.9], stage="reruns", teacher="t2")     # not this protocol's rerun stage
    add_arm(s, c, "kd", [0.8], stage="lr_wd")                          # a tuning stage
    # rows that carry their stage kind are decided by it, whatever their protocol and stage name
    add_arm(s, with_protocol(cfg, "no-such-protocol"), "cwd", [0.52, 0.53], stage="final",
            extra_json={"stage_kind": "rerun"})
    add_arm(s, c, "cwd", [0.1], stage="seeds", extra_json={"stage_kind": "tpe"})
    blocks = blk.load_blocks(s)
    assert [(b.teacher, list(b.arms)) for b in blocks] == [("deeplabv3_resnet18_small", ["student-only", "cwd", "kd"])]
    assert blocks[0].arms["kd"].values == [0.55, 0.56, 0.57] and blocks[0].arms["cwd"].values == [0.52, 0.53]
    assert blocks[0].notes == []
    table = leaderboard.build(blocks, s)[0]
    assert [r.label for r in table.rows] == ["student-only", "cwd", "kd"] and table.rows[2].lift > 0
    md = leaderboard.to_markdown([table], ["Source: test"])
    assert "| kd " in md and "No completed rerun rows" not in md
    assert significance.build(blocks)[0].labels == ["student-only", "cwd", "kd"]
    rid = blocks[0].row_id("kd")
    assert [r["final_miou"] for r in blk.find_row(s, rid)] == [0.55, 0.56, 0.57]


def test_an_unloadable_protocol_falls_back_to_reruns_and_says_so(tmp_path, cfg):
    s = ResultsStore(tmp_path / "f.db")
    c = with_protocol(cfg, "gone")
    add_arm(s, c, "student-only", [0.50, 0.51, 0.49])
    add_arm(s, c, "kd", [0.55, 0.56, 0.57])
    add_arm(s, c, "kd", [0.9], stage="seeds")
    block, = blk.load_blocks(s)
    assert block.arms["kd"].values == [0.55, 0.56, 0.57]
    note, = block.notes
    assert "protocol 'gone'" in note and "'reruns'" in note and "unknown sweep protocol" in note
    t = leaderboard.build([block], s)[0]
    assert note in leaderboard.to_markdown([t], ["Source: test"])


def test_filters_are_parsed_once_in_command_line_order():
    f, rest = Filters.parse(["paths.results=x", "budget=quick", "+method=[gskd,cwd]", "dataset=synthetic",
                             "+method=kd", "test=permutation", "store.url=sqlite:///y"])
    assert rest == ["paths.results=x", "store.url=sqlite:///y"]
    assert f.methods == ["cwd+gskd", "kd"] and f.test == "permutation" and f.get("budget") == "quick"
    assert f.selection() == {"budget": "quick", "dataset": "synthetic", "methods": ["cwd+gskd", "kd"]}
    assert f.shown() == "budget=quick, dataset=synthetic, method=['cwd+gskd', 'kd']"
    assert f.shown_all() == "budget=quick, method=['cwd+gskd', 'kd'], dataset=synthetic, test=permutation"
    assert Filters.parse([])[0].shown() == "none" and Filters().test == "t" and Filters().selection() == {}
    assert Filters.of(budget="quick", method=["kd"]).selection() == {"budget": "quick", "methods": ["kd"]}
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown test 'z'"):
        Filters.parse(["test=z"])


def test_source_lines_state_database_protocol_budget_seeds_date_commit(store):
    rows = blk.load_blocks(store, budget="quick")[0].rows
    text = "\n".join(blk.source_lines(store.url, rows))
    for needle in (store.url, "Protocol: default", "budget: quick", "Seeds: 1, 2, 3, 4, 5", "abc123", "Generated:"):
        assert needle in text


# ---------------------------------------------------------------------------------- efficiency
def test_efficiency_counts_params_and_flops_independently(cfg):
    from harness.models import build_segmenter
    from harness.measure.efficiency import measure

    student = {**cfg["student"], "head_channels": 16}
    h, w = 37, 45   # odd size
    rng_before = torch.random.get_rng_state()
    e = measure(student, 9, [h, w], repetitions=3, warmup=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    model = build_segmenter({**student, "aux": False}, 9).eval()
    assert e.params == sum(p.numel() for p in model.parameters())
    assert e.params_train > e.params   # the aux head is counted for training only
    flops = []

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            flops.append(2 * out.numel() * k)
        elif isinstance(mod, torch.nn.Linear):
            flops.append(2 * out.numel() * mod.in_features)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(1, 3, h, w))
    for hd in handles:
        hd.remove()
    assert e.flops == sum(flops) and e.input_size == (h, w)
    assert e.latency_ms > 0 and e.device == "cpu" and e.batch == 1 and e.repetitions == 3
    assert "37x45" in e.describe() and "median of 3" in e.describe()


# --------------------------------------------------------------------------------- leaderboard
def holm_by_hand(ps):
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def test_leaderboard_values_recomputed_from_rows(store):
    from scipy import stats as st

    tables = leaderboard.build(blk.load_blocks(store, budget="quick"), store)
    assert len(tables) == 1
    rows = {r.label: r for r in tables[0].rows}
    assert [r.label for r in tables[0].rows] == ["student-only", "cwd", "kd", "cwd+gskd"]
    base = VALUES["student-only"]
    labels = ["cwd", "kd", "cwd+gskd"]
    raw = []
    for label in labels:
        v = VALUES[label.replace("+", ",")]
        r = rows[label]
        assert r.mean == pytest.approx(statistics.fmean(v), rel=1e-12)
        assert r.std == pytest.approx(statistics.stdev(v), rel=1e-12)
        ref = st.ttest_rel(v, base)                          # same seeds 1..5 in both arms: paired
        ci = ref.confidence_interval(0.95)
        assert r.verdict.design == "paired" and r.verdict.seeds == [1, 2, 3, 4, 5]
        assert r.lift == pytest.approx(statistics.fmean(v) - statistics.fmean(base), rel=1e-9)
        assert (r.verdict.low, r.verdict.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
        assert r.p_raw == pytest.approx(ref.pvalue, rel=1e-9)
        raw.append(ref.pvalue)
        assert r.energy_kwh == pytest.approx(statistics.fmean(0.002 + 0.0001 * i for i in range(5)))
    for label, adj in zip(labels, holm_by_hand(raw)):
        assert rows[label].p_holm == pytest.approx(adj, rel=1e-9)
        assert rows[label].comparison.family_size == 3
    # the failed kd rerun (seed 9) is not silently lost: kd says 5 of 6 seeds and why
    assert rows["kd"].arm.runs == 6 and rows["kd"].arm.n == 5
    assert any("seed 9: failed" in n for n in rows["kd"].notes)
    # best = cwd+gskd (53.48); cwd (53.36) within its std (0.73); kd and student-only not
    assert rows["cwd+gskd"].best and rows["cwd"].within_one_std
    assert not rows["kd"].within_one_std and not rows["student-only"].best
    assert rows["kd"].sweep_energy_kwh == pytest.approx(sum(0.002 + 0.0001 * i for i in range(5)) + 0.002 * 2)


def test_a_filter_hides_rows_and_never_changes_a_number(store):
    full = {r.label: r for r in leaderboard.build(blk.load_blocks(store, budget="quick"), store)[0].rows}
    only = {r.label: r for r in leaderboard.build(blk.load_blocks(store, budget="quick", methods=["cwd"]), store)[0].rows}
    assert list(only) == ["student-only", "cwd"]
    assert only["cwd"].p_holm == full["cwd"].p_holm and only["cwd"].verdict.low == full["cwd"].verdict.low
    assert only["cwd"].comparison.family_size == 3


def test_leaderboard_and_significance_print_the_same_numbers_for_one_comparison(store):
    from harness.report import significance

    block = blk.load_blocks(store, budget="quick")[0]
    t = leaderboard.build([block], store)[0]
    m = significance.build([block])[0]
    for r in t.rows[1:]:
        pair, sign = m.pair(r.label, "student-only")
        assert sign == 1 and pair.p_holm == r.p_holm and pair.verdict.low == r.verdict.low
        assert significance.diff_text(m, r.label, "student-only") == leaderboard._lift_cell(r)


def test_reruns_of_two_sweeps_are_never_pooled(tmp_path, cfg):
    s = ResultsStore(tmp_path / "two.db")
    add_arm(s, cfg, "student-only", [0.50, 0.51, 0.49], sweep_id="student-only:A")
    add_arm(s, cfg, "student-only", [0.40, 0.41, 0.39], sweep_id="student-only:B")
    add_arm(s, cfg, "kd", [0.52, 0.53, 0.55], sweep_id="distilled:kd:A")
    add_arm(s, cfg, "kd", [0.60, 0.61, 0.62], sweep_id="distilled:kd:B")
    blocks = blk.load_blocks(s)
    assert len(blocks) == 2                                  # one per student arm, never n = 6
    for b in blocks:
        assert b.baseline.n == 3 and b.baseline.sweep_ids in (["student-only:A"], ["student-only:B"])
        kd = [a for l, a in b.arms.items() if l.startswith("kd")]
        assert len(kd) == 2 and all(a.n == 3 for a in kd)   # two kd sweeps: two rows, not one of 6
        assert any("never pooled" in n for n in b.notes)
    assert len({b.row_id("student-only") for b in blocks}) == 2


def test_a_distilled_row_that_names_its_student_arm_is_compared_with_that_one_only(tmp_path, cfg):
    s = ResultsStore(tmp_path / "link.db")
    add_arm(s, cfg, "student-only", [0.50, 0.51, 0.49], sweep_id="student-only:A")
    add_arm(s, cfg, "student-only", [0.40, 0.41, 0.39], sweep_id="student-only:B")
    add_arm(s, cfg, "kd", [0.52, 0.53, 0.55], sweep_id="distilled:kd:A",
            extra_json={"stage_kind": "rerun", "student_arm": {"arm_id": "student-only:B"}})
    blocks = [b for b in blk.load_blocks(s) if "kd" in b.arms]
    assert len(blocks) == 1 and blocks[0].student_arm == "student-only:B"


def test_leaderboard_permutation_option(store):
    t = leaderboard.build(blk.load_blocks(store, budget="quick"), store, test="permutation")[0]
    r = {r.label: r for r in t.rows}
    d = {s: VALUES["cwd"][s - 1] for s in range(1, 6)}
    b = {s: VALUES["student-only"][s - 1] for s in range(1, 6)}
    assert r["cwd"].p_raw == pytest.approx(stats.permutation_test(d, b).p)
    assert r["cwd"].p_raw >= 2 / 32                       # 5 sign flips: never below 2 / 2^5
    with pytest.raises(ValueError, match="unknown test"):
        leaderboard.build(blk.load_blocks(store), store, test="t-test")


def test_leaderboard_files_md_csv_tex(store, cfg, tmp_path):
    c = {**cfg, "store": {"url": store.url}, "paths": {**cfg["paths"], "results": str(tmp_path / "out")}}
    from harness.measure.efficiency import for_blocks

    f = Filters.of(budget="quick")
    blocks = blk.load_blocks(store, **f.selection())
    paths = leaderboard.write(c, store, f, blocks, efficiency=for_blocks(blocks, latency=False), quiet=True)
    md = paths["md"].read_text()
    rid = blk.row_id("synthetic", STUDENT, "deeplabv3_resnet18_small", "cwd+gskd", "quick")
    assert f"**{100 * statistics.fmean(VALUES['cwd,gskd']):.2f} +- {100 * statistics.stdev(VALUES['cwd,gskd']):.2f} (5/5)**" in md
    assert "(5/6) !" in md and "seed 9: failed" in md     # kd: one rerun seed did not complete
    assert rid in md and "(reference)" in md and "budget=quick" in md and "Seeds: 1, 2, 3, 4, 5" in md
    assert "FLOPs = torch.utils.flop_counter at 96x96" in md

    df = pd.read_csv(paths["csv"])
    assert len(df) == 4 and df["n"].dtype == np.int64 and df["best"].dtype == bool
    for col in ("miou_mean_pct", "lift_pct", "p_holm", "energy_kwh_per_run"):
        assert df[col].dtype == np.float64, col
    assert df["params"].dtype == np.int64 and df["flops"].dtype == np.int64
    row = df[df.row_id == rid].iloc[0]
    assert row.miou_mean_pct == pytest.approx(100 * statistics.fmean(VALUES["cwd,gskd"]), abs=1e-6)
    assert row.methods == "cwd+gskd" and row.arm == "distilled" and bool(row.best)
    base = df[df.arm == "student-only"].iloc[0]
    assert math.isnan(base.lift_pct) and math.isnan(base.p_holm)     # the reference has no lift: empty, not 0
    typed = leaderboard.read_csv(paths["csv"])
    assert typed["row_id"].dtype == "string" and typed["params"].dtype == "Int64"

    check_latex(paths["tex"].read_text(), ncol=11)


def check_latex(text, ncol):
    body = "\n".join(l for l in text.splitlines() if not l.startswith("%"))
    for env in ("table", "tabular"):
        assert body.count(rf"\begin{{{env}}}") == body.count(rf"\end{{{env}}}") == 1
    assert body.index(r"\toprule") < body.index(r"\midrule") < body.index(r"\bottomrule")
    assert re.search(r"\\begin\{tabular\}\{l" + "r" * (ncol - 1) + "}", body)
    start, end = body.index(r"\toprule"), body.index(r"\bottomrule")
    for line in body[start:end].splitlines()[1:]:
        if line.startswith((r"\midrule", r"\multicolumn")):
            continue
        assert len(re.findall(r"(?<!\\)&", line)) == ncol - 1, line
        assert line.endswith(r"\\")
    opened = len(re.findall(r"(?<!\\)\{", body))
    closed = len(re.findall(r"(?<!\\)\}", body))
    assert opened == closed
    assert "_" not in re.sub(r"\\_|\$[^$]*\$", "", body)   # every underscore escaped or in math
    if shutil.which("pdflatex"):
        doc = "\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n" + text + "\\end{document}\n"
        import tempfile
        from pathlib import Path
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "t.tex").write_text(doc)
            res = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=d,
                                 capture_output=True, timeout=120)
            assert res.returncode == 0, res.stdout[-2000:]


def test_leaderboard_missing_pieces_are_explained_not_zero(tmp_path, cfg):
    s = ResultsStore(tmp_path / "m.db")
    add_arm(s, cfg, "kd", [0.52, 0.53, 0.51], energy=False)         # no student-only arm, no energy
    add_arm(s, cfg, "cwd", [0.55])                                  # one seed
    t = leaderboard.build(blk.load_blocks(s), s)[0]
    r = {r.label: r for r in t.rows}
    assert "student-only" not in r and r["kd"].lift is None and r["kd"].p_holm is None
    assert any("no tuned student-only arm" in n for n in t.notes)
    assert r["kd"].energy_kwh is None and any("no energy" in n for n in r["kd"].notes)
    assert r["cwd"].std is None and any("one seed" in n for n in r["cwd"].notes)
    md = leaderboard.to_markdown([t], ["Source: test"])
    assert "n/a" in md and "no tuned student-only arm" in md and "one seed" in md
    kd_line = next(l for l in md.splitlines() if "| kd " in l)
    cells = [c.strip() for c in kd_line.strip("|").split("|")]
    assert cells[3:12] == ["n/a"] * 9   # lift, p, d_z, P, MDE, seeds, kWh, CO2, sweep kWh: missing, never 0

    add_arm(s, cfg, "student-only", [0.5, 0.5, 0.5])
    add_arm(s, cfg, "kd", [0.5, 0.5], teacher="flat")                   # both arms zero variance
    flat = leaderboard.build(blk.load_blocks(s, teacher="flat"), s)[0]
    kd = {r.label: r for r in flat.rows}["kd"]
    assert kd.p_holm is None and any("zero variance" in n for n in kd.notes) and kd.lift == 0.0


def test_leaderboard_only_student_arm_and_few_seeds(tmp_path, cfg):
    s = ResultsStore(tmp_path / "s.db")
    add_arm(s, cfg, "student-only", [0.5, 0.51])
    t = leaderboard.build(blk.load_blocks(s), s, min_seeds=3)[0]
    assert t.block.teacher is None and any("no distilled arm" in n for n in t.notes)
    assert any("2 seeds < report.min_seeds = 3" in n for n in t.rows[0].notes)


def test_leaderboard_cli_empty_database_and_filters(tmp_path, capsys, cfg):
    from harness.cli import main

    out = tmp_path / "empty"
    # a read command never creates a database: a missing one is exit 2, nothing written
    assert main(["leaderboard", f"paths.results={out}", "progress=false"]) == 2
    assert "no results database" in capsys.readouterr().err and not out.exists()
    ResultsStore(f"sqlite:///{out}/harness.db")  # an empty harness database (what `train` creates first)
    assert main(["leaderboard", f"paths.results={out}", "progress=false"]) == 0
    err = capsys.readouterr().err
    assert "No completed rerun rows" in err and "sweep +method=NAME" in err
    assert "No completed rerun rows" in (out / "leaderboard.md").read_text()
    assert pd.read_csv(out / "leaderboard.csv").empty
    check_latex((out / "leaderboard.tex").read_text(), ncol=11)
    s = ResultsStore(f"sqlite:///{out}/harness.db")
    add_arm(s, cfg, "student-only", [0.5, 0.51, 0.49])
    add_arm(s, cfg, "kd", [0.52, 0.53, 0.55])
    add_arm(s, cfg, "cwd", [0.52, 0.53, 0.55])
    assert main(["leaderboard", f"paths.results={out}", "+method=kd", "student=" + STUDENT]) == 0
    df = pd.read_csv(out / "leaderboard.csv")
    assert list(df["arm"]) == ["student-only", "distilled"] and df["methods"].iloc[1] == "kd"
    assert main(["leaderboard", f"paths.results={out}", "test=z"]) == 2
    assert "unknown test" in capsys.readouterr().err
    assert main(["leaderboard", f"paths.results={out}", "test=mann-whitney"]) == 2
    assert "replaced by test=permutation" in capsys.readouterr().err


# -------------------------------------------------------------------------------- significance
def test_significance_matrix_recomputed_from_rows(store):
    from harness.report import significance

    m = significance.build(blk.load_blocks(store, budget="quick"), min_seeds=3)[0]
    labels = ["student-only", "cwd", "kd", "cwd+gskd"]
    assert m.labels == labels and m.verdicts.family_sizes == (3, 3)
    vals = {l: dict(enumerate(VALUES[l.replace("+", ",")], start=1)) for l in labels}
    families = {"vs student": [(a, "student-only") for a in labels[1:]],
                "between methods": [(a, b) for i, a in enumerate(labels[1:]) for b in labels[i + 2:]]}
    for name, pairs in families.items():
        ts = [stats.compare_seeds(vals[a], vals[b]).p for a, b in pairs]
        ps = [stats.permutation_test(vals[a], vals[b]).p for a, b in pairs]
        for (a, b), pt, pp in zip(pairs, holm_by_hand(ts), holm_by_hand(ps)):
            pair, sign = m.pair(a, b)
            assert sign == 1 and pair.family == name
            assert pair.p_holm == pytest.approx(pt) and pair.p_perm_holm == pytest.approx(pp)
            d = statistics.fmean(vals[a].values()) - statistics.fmean(vals[b].values())
            assert significance.diff_text(m, a, b).startswith(f"{100 * d:+.2f} [")
            assert significance.diff_text(m, b, a).startswith(f"{-100 * d:+.2f} [")


def test_significance_few_seeds_are_marked_and_warned(tmp_path, cfg):
    from harness.report import significance

    s = ResultsStore(tmp_path / "few.db")
    add_arm(s, cfg, "student-only", [0.50, 0.51, 0.49])
    add_arm(s, cfg, "kd", [0.55, 0.56, 0.57])
    add_arm(s, cfg, "cwd", [0.58, 0.60])
    m = significance.build(blk.load_blocks(s), min_seeds=3)[0]
    text = " ".join(m.notes)
    assert "cwd: 2 seed(s) < report.min_seeds = 3" in text
    assert "smallest possible permutation p is 0.25" in text and "cannot reach 0.05" in text  # 3 sign flips
    assert significance.diff_text(m, "cwd", "kd").endswith(significance.DAGGER)
    assert not significance.diff_text(m, "kd", "student-only").endswith(significance.DAGGER)
    assert r"$^\dagger$" in significance.p_text(m, "cwd", "student-only", latex=True)


def test_significance_cli_files_and_empty(tmp_path, store, cfg, capsys):
    from harness.cli import main
    from harness.report import significance

    out = tmp_path / "reports"
    c = {**cfg, "store": {"url": store.url}, "paths": {**cfg["paths"], "reports": str(out)}}
    paths = significance.write(c, store, Filters.of(budget="quick"), quiet=True)
    md = paths["md"].read_text()
    assert "## synthetic: pspnet_resnet18_small <- deeplabv3_resnet18_small, budget quick" in md
    assert "p (t, Holm in its family) / p (permutation, Holm in its family)" in md and "Source: significance" in md
    tex_text = paths["tex"].read_text()
    body = "\n".join(l for l in tex_text.splitlines() if not l.startswith("%"))
    assert body.count(r"\begin{tabular}{lrrrr}") == 1 and body.count(r"\toprule") == 1
    for line in body.splitlines():
        if line.endswith(r"\\") and not line.startswith(r"\multicolumn"):
            assert len(re.findall(r"(?<!\\)&", line)) == 4, line
    assert len(re.findall(r"(?<!\\)\{", body)) == len(re.findall(r"(?<!\\)\}", body))
    empty = tmp_path / "e"
    ResultsStore(f"sqlite:///{empty}/harness.db")
    assert main(["significance", f"paths.results={empty}", f"paths.reports={empty}"]) == 0
    assert "No completed rerun rows" in capsys.readouterr().err
    assert "No completed rerun rows" in (empty / "significance.md").read_text()


# ---------------------------------------------------------------------------------- literature
# paper 003, Table 1 as printed: method -> (ADE20K S only, +T, Cityscapes S only, +T); None = "-"
TABLE1_003 = {"skd": (33.82, 36.55, 69.10, 72.67), "ifvd": (None, None, 69.10, 74.54), "cwd": (24.65, 26.80, 70.09, 75.90),
              "dsd": (33.80, 38.00, 69.42, 73.20), "mgd": (None, None, 69.85, 74.10), "idd": (24.65, 27.69, 70.09, 77.59),
              "fakd": (29.42, 35.30, 68.99, 74.75), "sstkd": (24.65, 29.19, 69.10, 75.15),
              "apd": (37.19, 39.25, 74.15, 75.68), "cirkd": (None, None, 72.55, 74.73)}


def test_literature_data_file_holds_paper_003_table_1_and_the_seed_papers():
    from harness.report import literature

    entries = literature.load_entries()
    t1 = {(e["method"], e["dataset"]): (e["student_only"], e["distilled"]) for e in entries
          if e["paper"] == "003" and e["table"] == "1"}
    expected = {}
    for m, (a_s, a_t, c_s, c_t) in TABLE1_003.items():
        if a_s is not None:
            expected[(m, "ade20k")] = (a_s, a_t)
        expected[(m, "cityscapes")] = (c_s, c_t)
    assert t1 == expected
    assert {e["paper"] for e in entries} == {"000", "001", "002", "003", "004"}
    tuned = [e for e in entries if e["paper"] == "003" and e["table"] == "6" and e["dataset"] == "cityscapes"
             and e["student"] == "PSPNet-ResNet18"][0]
    assert (tuned["student_only"], tuned["student_only_std"], tuned["distilled"], tuned["distilled_std"]) == (70.45, 0.10, 72.75, 0.29)
    assert tuned["published_lift"] == pytest.approx(2.30) and tuned["method"] == "kd" and tuned["tuned_baseline"]
    gskd = [e for e in entries if e["paper"] == "000" and e["table"] == "1" and e["method"] == "cwd+gskd"]
    assert [(e["student"], e["distilled"]) for e in gskd] == [
        ("DeepLabV3-ResNet18", 76.93), ("DeepLabV3-MobileNetV2", 75.14), ("PSPNet-ResNet18", 75.86)]
    for e in entries:
        assert e["published_lift"] == pytest.approx(e["distilled"] - e["student_only"])
        assert e["method"] == blk.method_label(e["method"])


def test_literature_rejects_a_broken_entry(tmp_path):
    from harness.report import literature

    bad = tmp_path / "bad.yaml"
    bad.write_text("entries:\n  - {paper: '003', table: '1', dataset: x, student: s, teacher: t, method: kd, student_only: 60}\n")
    with pytest.raises(ValueError, match="lacks distilled"):
        literature.load_entries(bad)
    bad.write_text("entries:\n  - {paper: '003', table: '1', dataset: x, student: s, teacher: t, method: kd, "
                   "student_only: 0.6, distilled: 720}\n")
    with pytest.raises(ValueError, match="not an mIoU"):
        literature.load_entries(bad)


def test_literature_lift_inflation_from_our_rows(store, cfg, tmp_path, capsys):
    from harness.report import literature

    data = tmp_path / "lit.yaml"
    data.write_text("entries:\n"
                    "  - {paper: '003', table: '1', dataset: cityscapes, student: s, teacher: t, method: cwd, student_only: 70.09, distilled: 75.90}\n"
                    "  - {paper: '000', table: '1', dataset: synthetic, student: s, teacher: t, method: 'gskd + cwd', student_only: 72.55, distilled: 75.86}\n"
                    "  - {paper: '003', table: '1', dataset: cityscapes, student: s, teacher: t, method: apd, student_only: 74.15, distilled: 75.68}\n")
    c = {**cfg, "store": {"url": store.url}, "paths": {**cfg["paths"], "results": str(tmp_path / "out")}}
    md = literature.write(c, store, quiet=True, data_file=data).read_text()
    ours = {lbl: 100 * (statistics.fmean(VALUES[lbl]) - statistics.fmean(VALUES["student-only"])) for lbl in ("cwd", "cwd,gskd")}
    header = next(l for l in md.splitlines() if l.startswith("| dataset "))
    col = [c.strip() for c in header.strip("|").split("|")]
    same_i, infl_i, cross_i, from_i = (col.index(c) for c in ("our lift, same dataset [95% CI]", "inflation",
                                                               "cross-dataset lift (not comparable)", "ours from"))

    def cells(line):
        return [c.strip() for c in line.strip("|").split("|")]

    # our cwd lift is on synthetic data: next to a Cityscapes row it is cross-dataset, with no inflation
    cwd = cells(next(l for l in md.splitlines() if "| cwd " in l and "cityscapes" in l))
    assert cwd[same_i] == "n/a" and cwd[infl_i] == "n/a"
    assert cwd[cross_i].startswith(f"{ours['cwd']:+.2f} [")
    assert f"{5.81 - ours['cwd']:+.2f}" not in "|".join(cwd)
    assert cwd[from_i].startswith("synthetic: ") and "<-" in cwd[from_i] and "quick" in cwd[from_i]
    # a published synthetic row: same dataset, inflation computed, nothing in the cross-dataset column
    combo = cells(next(l for l in md.splitlines() if "| cwd+gskd " in l and "| synthetic " in l))
    assert combo[infl_i] == f"{3.31 - ours['cwd,gskd']:+.2f}" and combo[same_i].startswith(f"{ours['cwd,gskd']:+.2f} [")
    assert combo[cross_i] == ""
    assert "not comparable, no inflation" in md
    entry = {"method": "cwd", "dataset": "cityscapes", "published_lift": 5.81}
    assert literature.inflation(entry, literature.match(entry, literature.our_lifts(store))) is None
    apd = next(l for l in md.splitlines() if "| apd " in l)
    assert apd.count("n/a") == 2    # no comparison of ours: our lift and inflation say so
    assert "Source: our lifts" in md and "## Our tuned lifts" in md
    # the same-dataset comparison wins over one with more seeds elsewhere
    s = ResultsStore(tmp_path / "two.db")
    add_arm(s, cfg, "student-only", [0.5, 0.5, 0.51, 0.5, 0.52])
    add_arm(s, cfg, "cwd", [0.6, 0.61, 0.6, 0.62, 0.6])
    lifts = literature.our_lifts(s)
    entry = {"method": "cwd", "dataset": "synthetic"}
    assert literature.match(entry, lifts).block.dataset == "synthetic"
    assert literature.match({"method": "kd", "dataset": "synthetic"}, lifts) is None


def test_literature_cli_without_database(tmp_path, capsys):
    from harness.cli import main

    out = tmp_path / "r"
    assert main(["literature", f"paths.results={out}", "dataset=cityscapes", "+method=cwd"]) == 0
    captured = capsys.readouterr()
    assert "no tuned comparison" in captured.err
    md = (out / "literature.md").read_text()
    assert "No tuned comparison in the results database yet" in md and "| cityscapes" in md
    assert "| ade20k" not in md and "| skd" not in md


def test_unequal_tuning_budget_is_marked_with_both_numbers(tmp_path, cfg):
    s = ResultsStore(tmp_path / "budget.db")
    # tuning rows: the student-only arm 2 trials (1 pruned at 100 it.), the distilled arm 3 trials of 300 it.
    add_arm(s, cfg, "student-only", [0.40], stage="lr_wd", sweep_id="student-only:S", iterations=300,
            extra_json={"stage_kind": "search"})
    add_arm(s, cfg, "student-only", [0.30], stage="lr_wd", sweep_id="student-only:S", status="pruned",
            iterations=100, extra_json={"stage_kind": "search"})
    add_arm(s, cfg, "kd", [0.45, 0.46, 0.41], stage="lr_wd", sweep_id="distilled:kd:K", iterations=300,
            extra_json={"stage_kind": "search"})
    add_arm(s, cfg, "student-only", [0.50, 0.51, 0.49], sweep_id="student-only:S", extra_json={"stage_kind": "rerun"})
    add_arm(s, cfg, "kd", [0.52, 0.53, 0.55], sweep_id="distilled:kd:K", extra_json={"stage_kind": "rerun"})
    t = leaderboard.build(blk.load_blocks(s), s)[0]
    kd = {r.label: r for r in t.rows}["kd"]
    assert kd.tuning.student.started == 2 and kd.tuning.student.iterations == 400 and kd.tuning.student.pruned == 1
    assert kd.tuning.distilled.started == 3 and kd.tuning.distilled.iterations == 900
    assert "unequal tuning budget: student-only 2 trials, 400 iterations; distilled 3 trials, 900 iterations" in kd.notes
    md = leaderboard.to_markdown([t], ["Source: test"])
    assert "kd (unequal tuning budget)" in md and "UNEQUAL" in md
    # a sweep that recorded equal budgets on its rerun rows: no mark
    budget = {"student-only": {"started": 3, "iterations": 900}, "distilled": {"started": 3, "iterations": 900}}
    add_arm(s, cfg, "cwd", [0.52, 0.53, 0.55], sweep_id="distilled:cwd:C",
            extra_json={"stage_kind": "rerun", "tuning_budget": budget, "unequal_tuning_budget": None,
                        "student_arm": {"arm_id": "student-only:S", "trials": 3}})
    t = leaderboard.build(blk.load_blocks(s), s)[0]
    cwd = {r.label: r for r in t.rows}["cwd"]
    assert cwd.tuning.unequal is None and cwd.tuning.student_trials == 3 and cwd.tuning.source == "recorded by the sweep"


def test_lift_at_equal_compute_from_the_compute_matched_rows(tmp_path, cfg):
    from scipy import stats as st

    s = ResultsStore(tmp_path / "matched.db")
    student, kd, longer = [0.50, 0.51, 0.49, 0.50], [0.53, 0.53, 0.52, 0.54], [0.52, 0.53, 0.52, 0.52]
    add_arm(s, cfg, "student-only", student, sweep_id="student-only:S", train_time_s=10.0, iterations=100,
            extra_json={"stage_kind": "rerun"})
    add_arm(s, cfg, "kd", kd, sweep_id="distilled:kd:K", train_time_s=25.0, iterations=100, extra_json={"stage_kind": "rerun"})
    add_arm(s, cfg, "student-only", longer, sweep_id="student-only:S", stage="compute_matched", iterations=250,
            extra_json={"stage_kind": "compute_matched", "matched_to": "distilled:kd:K", "measure": "time",
                        "cost_ratio": 2.5, "iterations": 250, "device": "cpu"})
    t = leaderboard.build(blk.load_blocks(s), s)[0]
    assert [r.label for r in t.rows] == ["student-only", "kd"]      # the matched rows are not a leaderboard arm
    row = t.rows[1]
    m = row.matched["time"]
    ref = st.ttest_rel(kd, longer)
    assert m.verdict.lift == pytest.approx(np.mean(np.subtract(kd, longer))) and m.verdict.p == pytest.approx(ref.pvalue)
    assert m.ratio == 2.5 and m.iterations == 250 and "energy" not in row.matched
    assert row.tuning.student.started == 0          # a compute-matched control is no tuning trial
    assert leaderboard.cost_ratios(row.arm, t.block.baseline)["time"] == pytest.approx(2.5)
    md = leaderboard.to_markdown([t], ["Source: test"])
    assert "lift at equal compute: wall-clock" in md and "2.50x, 250 it." in md and "n/a (stage not run)" in md
    df = pd.DataFrame(leaderboard.csv_rows([t], "db", "c"))
    assert df.loc[1, "lift_equal_time_pct"] == pytest.approx(100 * m.verdict.lift, abs=1e-6)


def test_one_control_run_for_both_measures_stands_for_both(tmp_path, cfg):
    """A compute-matched control whose rows list `also_measures` (the time and energy ratios agreed, so
    the sweep ran it once) gives both equal-compute columns, the shared one marked."""
    s = ResultsStore(tmp_path / "shared.db")
    add_arm(s, cfg, "student-only", [0.50, 0.51, 0.49], sweep_id="student-only:S", train_time_s=10.0, iterations=100,
            extra_json={"stage_kind": "rerun"})
    add_arm(s, cfg, "kd", [0.53, 0.53, 0.52], sweep_id="distilled:kd:K", train_time_s=19.4, iterations=100,
            extra_json={"stage_kind": "rerun"})
    add_arm(s, cfg, "student-only", [0.52, 0.54, 0.53], sweep_id="student-only:S", stage="compute_matched",
            iterations=194, extra_json={"stage_kind": "compute_matched", "matched_to": "distilled:kd:K",
                                        "measure": "time", "cost_ratio": 1.935, "iterations": 194, "device": "cpu",
                                        "also_measures": {"energy": {"cost_ratio": 1.934, "iterations": 194,
                                                                     "eval_interval": 97}}})
    t = leaderboard.build(blk.load_blocks(s), s)[0]
    row = t.rows[1]
    time_, energy = row.matched["time"], row.matched["energy"]
    assert time_.shared_with is None and energy.shared_with == "time" and energy.ratio == 1.934
    assert energy.verdict.lift == pytest.approx(time_.verdict.lift) and energy.runs == time_.runs == 3
    md = leaderboard.to_markdown([t], ["Source: test"])
    assert "1.93x, 194 it. (the time control's runs)" in md and "n/a (stage not run)" not in md


def test_two_student_winners_of_one_comparison_share_one_holm_family(tmp_path, cfg):
    """A larger composition grew the student arm and its winner changed: two blocks of one key, each
    titled and filed by its winner, the distilled ids unchanged, one Holm family over every test."""
    from statsmodels.stats.multitest import multipletests

    from harness.report import figures, significance

    s = ResultsStore(tmp_path / "winners.db")
    w1, w2 = "student-only:S:lr_wd:aaaa1111", "student-only:S:lr_wd:bbbb2222"
    add_arm(s, cfg, "student-only", [0.50, 0.51, 0.49, 0.505], sweep_id="student-only:S",
            extra_json={"stage_kind": "rerun", "winner_run_id": w1})
    add_arm(s, cfg, "student-only", [0.47, 0.48, 0.485, 0.49], sweep_id="student-only:S",
            extra_json={"stage_kind": "rerun", "winner_run_id": w2})
    add_arm(s, cfg, "kd", [0.515, 0.52, 0.50, 0.52], sweep_id="distilled:kd:S",
            extra_json={"stage_kind": "rerun", "student_arm": {"arm_id": "student-only:S", "winner_run_id": w1}})
    add_arm(s, cfg, "cwd,gskd", [0.52, 0.50, 0.51, 0.50], sweep_id="distilled:cwd+gskd:S",
            extra_json={"stage_kind": "rerun", "student_arm": {"arm_id": "student-only:S", "winner_run_id": w2}})
    blocks = blk.load_blocks(s)
    assert len(blocks) == 2
    by = {next(l for l in b.arms if l != "student-only"): b for b in blocks}
    kd_b, cg_b = by["kd"], by["cwd+gskd"]
    assert kd_b.title != cg_b.title and "aaaa1111" in kd_b.title and "bbbb2222" in cg_b.title
    assert figures.block_slug(kd_b) != figures.block_slug(cg_b)
    # distilled ids stay the plain ones (adding a sweep never renames a row); the student rows differ
    assert kd_b.row_id("kd") == blk.row_id("synthetic", STUDENT, "deeplabv3_resnet18_small", "kd", "quick")
    ids = {kd_b.row_id("student-only"), cg_b.row_id("student-only")}
    assert len(ids) == 2
    assert [r["final_miou"] for r in blk.find_row(s, cg_b.row_id("student-only"))] == [0.47, 0.48, 0.485, 0.49]
    # Holm over both tests, recomputed independently
    raw = [stats.compare_seeds(kd_b.arms["kd"].by_seed, kd_b.baseline.by_seed).p,
           stats.compare_seeds(cg_b.arms["cwd+gskd"].by_seed, cg_b.baseline.by_seed).p]
    expect = multipletests(raw, method="holm")[1]
    t = {b.arms and next(l for l in b.arms if l != "student-only"): leaderboard.build([b], s)[0] for b in blocks}
    assert t["kd"].rows[1].p_holm == pytest.approx(expect[0], rel=1e-9)
    assert t["cwd+gskd"].rows[1].p_holm == pytest.approx(expect[1], rel=1e-9)
    assert any("Holm over m = 2" in n for n in t["kd"].notes)
    assert significance.build([cg_b])[0].verdicts.family_sizes[0] == 2
    # a filter hides the other block's arm and never changes the p-value
    only = [b for b in blk.load_blocks(s, methods=["kd"]) if "kd" in b.arms]
    assert leaderboard.build(only, s)[0].rows[1].p_holm == t["kd"].rows[1].p_holm
