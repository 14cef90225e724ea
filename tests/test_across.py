"""Across blocks (reports/across.md, reports/cd_diagram.png): gap closed, its IQM with a stratified
bootstrap interval, Friedman + Nemenyi critical difference.

The databases are built row by row as in tests/test_reports.py, with the least a row needs for
`load_blocks`: the budget in its config and `extra_json.stage_kind` (no protocol is loaded).
"""
import numpy as np
import pytest

from harness.report import across
from harness.report.blocks import load_blocks
from harness.store import ResultsStore


def _row(dataset, student, teacher, arm, seed, miou, methods="", budget="smoke", extra=None):
    return {"config_json": {"budget": {"name": budget}, "sweep": {"protocol": "default"}}, "arm": arm,
            "methods": methods, "dataset": dataset, "student": student,
            "teacher": teacher if arm == "distilled" else None, "seed": seed, "split": "val",
            "status": "completed", "stage": "reruns" if arm != "teacher" else None, "final_miou": miou,
            "git_commit": "abc123", "created_at": f"2025-01-0{1 + seed % 9}T00:00:00",
            "extra_json": {"device": "cpu", **({"stage_kind": "rerun"} if arm != "teacher" else {}), **(extra or {})}}


def add_block(store, dataset, arms, teacher_miou=0.6, student="pspnet_resnet18", teacher="pspnet_resnet34",
              provenance=None):
    """A block: {'student-only': [mIoU per seed], 'kd': [...], ...} and a teacher row (None: no row)."""
    info = {}
    if teacher_miou is not None:
        run = store.append(_row(dataset, teacher, None, "teacher", 0, teacher_miou))
        info = {"teacher": {"source": "trained", "trained_by_run": run, "val_miou": teacher_miou + 0.01}}
    if provenance is not None:
        info = {"teacher": {"source": "checkpoint", "val_miou": provenance}}
    for label, values in arms.items():
        for seed, m in enumerate(values, start=1):
            if label == "student-only":
                store.append(_row(dataset, student, None, "student-only", seed, m))
            else:
                store.append(_row(dataset, student, teacher, "distilled", seed, m, methods=label, extra=info))


@pytest.fixture
def store(tmp_path):
    return ResultsStore(f"sqlite:///{tmp_path / 'results.db'}")


def cfg_of(tmp_path):
    return {"paths": {"reports": str(tmp_path / "reports")}}


# ------------------------------------------------------------------------------- IQM, bootstrap
def test_iqm_is_the_mean_of_the_middle_half():
    # 8 values sorted: 0.1 0.2 | 0.3 0.4 0.5 0.6 | 0.7 0.9 -> a quarter (2) cut from each end
    assert across.iqm([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.6, 0.4]) == pytest.approx((0.3 + 0.4 + 0.5 + 0.6) / 4)
    # 5 values: int(1.25) = 1 cut from each end
    assert across.iqm([5.0, 1.0, 2.0, 3.0, 100.0]) == pytest.approx((2 + 3 + 5) / 3)
    # fewer than 4 values: nothing is cut, the plain mean
    assert across.iqm([0.1, 0.2, 0.6]) == pytest.approx(0.3)
    assert across.iqm([0.42]) == pytest.approx(0.42)


def test_gap_closed_and_its_missing_cases():
    assert across.gap_closed(0.35, 0.30, 0.50).value == pytest.approx(0.25)
    assert across.gap_closed(0.28, 0.30, 0.50).value == pytest.approx(-0.10)  # worse than the student
    no_teacher = across.gap_closed(0.35, 0.30, None, "no teacher row")
    assert no_teacher.value is None and no_teacher.why == "no teacher row"
    for teacher in (0.30, 0.25):  # the teacher not above the tuned student: no denominator
        gap = across.gap_closed(0.35, 0.30, teacher)
        assert gap.value is None and "not above the tuned student" in gap.why
    assert across.gap_closed(0.35, None, 0.5).value is None


def test_the_bootstrap_resamples_within_blocks_only():
    deg_a = across.BlockSample([0.30, 0.30, 0.30], [0.40, 0.40, 0.40], 0.80)   # gap 0.2, no spread
    deg_b = across.BlockSample([0.20, 0.20, 0.20], [0.50, 0.50, 0.50], 0.80)   # gap 0.5, no spread
    # blocks whose seeds agree give every replicate the same IQM, however different the blocks are;
    # pooling seeds across blocks would mix 0.3s with 0.2s and spread it
    boot, dropped = across.stratified_bootstrap([deg_a, deg_b], reps=500, rng=np.random.default_rng(3))
    assert dropped == 0 and np.allclose(boot, (0.2 + 0.5) / 2)
    # a degenerate block adds a constant: swapping it for another degenerate block of the same size
    # shifts every replicate by the difference of their gaps / 2 (N = 2: the IQM is the mean)
    noisy = across.BlockSample([0.28, 0.30, 0.33, 0.31], [0.35, 0.41, 0.38, 0.40], 0.60)
    with_a, _ = across.stratified_bootstrap([deg_a, noisy], reps=500, rng=np.random.default_rng(7))
    with_b, _ = across.stratified_bootstrap([deg_b, noisy], reps=500, rng=np.random.default_rng(7))
    assert np.allclose(with_b - with_a, (0.5 - 0.2) / 2)
    assert with_a.std() > 0.01  # the noisy block's seeds do spread it


def test_one_block_interval_is_over_its_seeds_and_na_blocks_never_count_as_zero(store):
    add_block(store, "city", {"student-only": [0.30, 0.32, 0.31], "kd": [0.35, 0.36, 0.34]}, teacher_miou=0.51)
    add_block(store, "voc", {"student-only": [0.40, 0.41], "kd": [0.42, 0.43]}, teacher_miou=None)   # no teacher
    add_block(store, "ade", {"student-only": [0.50, 0.52], "kd": [0.53, 0.55]}, teacher_miou=0.45)  # T <= S
    blocks = load_blocks(store)
    ided, summaries, _, _ = across.analyse(store, blocks, reps=2000)
    (kd,) = summaries
    gaps = {bid: g for bid, g in kd.gaps}
    by_ds = {b.dataset: bid for bid, b, _ in ided}
    assert gaps[by_ds["city"]].value == pytest.approx((0.35 - 0.31) / (0.51 - 0.31))
    assert gaps[by_ds["voc"]].value is None and "no teacher row" in gaps[by_ds["voc"]].why
    assert gaps[by_ds["ade"]].value is None and "not above the tuned student" in gaps[by_ds["ade"]].why
    # the IQM of one valid block is that block's value; its interval comes from its seeds alone
    assert kd.iqm == pytest.approx(gaps[by_ds["city"]].value)
    assert kd.low < kd.iqm < kd.high
    assert any("one block" in n for n in kd.notes)
    text = across.across_report(store, blocks, ["Source: test"], None, reps=2000)
    row = next(line for line in text.splitlines() if line.startswith("| kd "))
    assert "n/a (no teacher row" in row and "(+2 n/a)" in row and " 0.0 %" not in row


def test_the_teacher_comes_from_its_row_else_from_the_distilled_rows_provenance(store):
    add_block(store, "city", {"student-only": [0.30], "kd": [0.35]}, teacher_miou=0.5)
    add_block(store, "voc", {"student-only": [0.30], "kd": [0.35]}, teacher_miou=None, provenance=0.55)
    for b in load_blocks(store):
        t = across.teacher_miou(store, b)
        if b.dataset == "city":   # the row (0.5), not the re-measured value (0.51) of the provenance
            assert t.value == pytest.approx(0.5) and t.source.startswith("teacher row ")
        else:
            assert t.value == pytest.approx(0.55) and "provenance" in t.source


def test_the_interval_does_not_depend_on_the_other_methods_shown(store):
    for ds in ("a", "b"):
        add_block(store, ds, {"student-only": [0.30, 0.31, 0.29], "kd": [0.35, 0.33, 0.36], "cwd": [0.32, 0.34, 0.31]})
    all_ = {s.label: s for s in across.analyse(store, load_blocks(store), reps=1000)[1]}
    kd_only = {s.label: s for s in across.analyse(store, load_blocks(store, methods=["kd"]), reps=1000)[1]}
    assert (all_["kd"].low, all_["kd"].high) == (kd_only["kd"].low, kd_only["kd"].high)


# ------------------------------------------------------------------------------ Friedman, CD
# Demšar (2006), JMLR 7, Table 6: AUC of C4.5 with/without curtailment (m) and pruning (cf) on 14 data sets
DEMSAR = np.array([
    [0.763, 0.768, 0.771, 0.798], [0.599, 0.591, 0.590, 0.569], [0.954, 0.971, 0.968, 0.967],
    [0.628, 0.661, 0.654, 0.657], [0.882, 0.888, 0.886, 0.898], [0.936, 0.931, 0.916, 0.931],
    [0.661, 0.668, 0.609, 0.685], [0.583, 0.583, 0.563, 0.625], [0.775, 0.838, 0.866, 0.875],
    [1.000, 1.000, 1.000, 1.000], [0.940, 0.962, 0.965, 0.962], [0.619, 0.666, 0.614, 0.669],
    [0.972, 0.981, 0.975, 0.975], [0.957, 0.978, 0.946, 0.970]])
DEMSAR_NAMES = ["C4.5", "C4.5+m", "C4.5+cf", "C4.5+m+cf"]


def test_nemenyi_critical_difference_matches_demsar():
    q, cd = across.nemenyi_cd(4, 14, 0.05)
    assert round(q, 3) == 2.569          # Demšar Table 5(a), k = 4
    assert round(cd, 2) == 1.25          # Section 3.2.2: CD = 2.569 sqrt(4 * 5 / (6 * 14)) = 1.25
    result = across.friedman_nemenyi(DEMSAR_NAMES, DEMSAR)
    assert result.cd == pytest.approx(cd) and result.q == pytest.approx(q)
    # the ranks of the table as printed (voting's 0.975 and 0.975 tie); the paper's 2.893 and 1.964
    # rank voting's C4.5+cf above C4.5+m+cf (unrounded AUC)
    assert np.round(result.ranks, 3).tolist() == [3.143, 2.000, 2.929, 1.929]
    untied = DEMSAR.copy()
    untied[12, 2] = 0.97501
    paper = across.friedman_nemenyi(DEMSAR_NAMES, untied)
    assert np.round(paper.ranks, 3).tolist() == [3.143, 2.000, 2.893, 1.964]
    n, k, r = 14, 4, np.array(paper.ranks)
    assert round(12 * n / (k * (k + 1)) * ((r ** 2).sum() - k * (k + 1) ** 2 / 4), 2) == 9.28   # chi2_F
    assert paper.statistic >= 9.28 and 0 < paper.p < 0.05   # scipy corrects for the tied rows
    # no pair is further apart than CD (3.143 - 1.964 = 1.18 < 1.25): one clique holds all four
    assert across.cliques(DEMSAR_NAMES, paper.ranks, paper.cd) == [["C4.5+m+cf", "C4.5+m", "C4.5+cf", "C4.5"]]


def test_cliques_split_where_ranks_differ_by_cd():
    groups = across.cliques(["a", "b", "c", "d"], [1.0, 1.5, 2.8, 3.2], 1.0)
    assert groups == [["a", "b"], ["c", "d"]]


def test_three_blocks_draw_the_cd_diagram(store, tmp_path):
    import matplotlib.image

    for i, ds in enumerate(("a", "b", "c")):
        arms = {"student-only": [0.30 + i / 100, 0.31 + i / 100], "kd": [0.34 + i / 100, 0.35 + i / 100],
                "cwd": [0.32 + i / 100, 0.33 + i / 100]}
        if ds == "a":
            arms["gskd"] = [0.40, 0.41]   # in one block only: left out of the Friedman test
        add_block(store, ds, arms)
    paths = across.write(cfg_of(tmp_path), store, quiet=True, reps=500)
    png = tmp_path / "reports" / "cd_diagram.png"
    assert png.is_file() and matplotlib.image.imread(png).ndim == 3
    text = paths["md"].read_text()
    assert "Friedman chi-square = 6.000" in text   # the same order in every block: 2 * (k - 1) ... N(k-1) = 6
    q, cd = across.nemenyi_cd(3, 3)
    assert f"CD = {cd:.3f}" in text and "Diagram: cd_diagram.png" in text
    assert "Left out of the Friedman test (not in every block used): gskd" in text
    assert "| gskd " in text and "| cwd " in text   # gap closed still summarises every method
    assert "Source: across blocks from 20 completed rerun row(s)" in text   # the same footer as every report


def test_fewer_than_three_blocks_say_why_there_is_no_diagram(store, tmp_path):
    for ds in ("a", "b"):
        add_block(store, ds, {"student-only": [0.30, 0.31], "kd": [0.34, 0.35], "cwd": [0.32, 0.33]})
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "cd_diagram.png").write_bytes(b"stale")
    across.write(cfg_of(tmp_path), store, quiet=True, reps=200)
    text = (reports / "across.md").read_text()
    assert "No Friedman test and no critical-difference diagram: 2 block(s) and 3 arm(s)" in text
    assert "need at least 3" in text and not (reports / "cd_diagram.png").exists()


def test_the_across_command_writes_the_report(store, tmp_path, capsys):
    from harness.cli import COMMANDS, REPORT_PARTS, main

    assert "across" in COMMANDS and "across" in REPORT_PARTS
    add_block(store, "a", {"student-only": [0.30, 0.31], "kd": [0.34, 0.35]})
    rc = main(["across", f"store.url={store.url}", f"paths.reports={tmp_path / 'reports'}",
               f"paths.results={tmp_path / 'results'}"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "# Across blocks" in out and "| kd " in out
    text = (tmp_path / "reports" / "across.md").read_text()
    gap = (0.345 - 0.305) / (0.6 - 0.305)
    assert f"{100 * gap:.1f} %" in text and "1 block(s) and 2 arm(s)" in text


def test_an_empty_database_says_so(store, tmp_path, capsys):
    across.write(cfg_of(tmp_path), store, reps=10)
    assert "Nothing to compare across blocks" in (tmp_path / "reports" / "across.md").read_text()
    assert "No block with a distilled arm" in capsys.readouterr().err
