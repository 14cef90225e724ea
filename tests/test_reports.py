"""Energy report, plots, qualitative grid, reproduce, `report`: numbers recomputed from the rows.

Most tests read synthetic rows appended through ResultsStore (a fake sweep with known energies and
mIoUs); `reproduce` and `show` train real tiny runs (the `tiny` fixture)."""
import copy
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.config import load_config
from harness.engine.record import store_record
from harness.engine.teacher import teacher_for
from harness.engine.train import run
from harness.measure import energy as measure_energy
from harness.report import energy as energy_mod
from harness.report.blocks import load_blocks
from harness.store import ResultsStore

from golden_reports import INTENSITY, fake_inference  # 400 g/kWh stored with every synthetic run

torch.set_num_threads(1)

KD_KWH = [0.30, 0.34, 0.32]
SO_KWH = [0.10, 0.12, 0.11]
TEACHER_KWH = 0.9


def energy_report(store, cfg, measure=fake_inference):
    """reports/energy.md's text as the CLI composes it: blocks, then their inference, then the report."""
    blocks = load_blocks(store)
    return energy_mod.energy_report(store, cfg, blocks, measure_energy.inference_for_blocks(cfg, blocks, measure))


def _row(cfg, arm, stage, seed, miou, kwh, sweep_id, params=None, **extra):
    cfg = copy.deepcopy(cfg)
    cfg["seed"] = seed
    methods = ",".join(sorted(cfg["method"]))
    return {"config_json": cfg, "arm": arm, "methods": methods, "dataset": cfg["dataset"]["name"],
            "student": cfg["student"]["name"], "teacher": cfg["teacher"]["name"] if cfg["method"] else None,
            "seed": seed, "split": "val" if stage == "reruns" else "tune", "status": extra.pop("status", "completed"),
            "stage": stage, "sweep_id": sweep_id, "params_json": params or {}, "final_miou": miou,
            "history_json": [{"iteration": 2, "miou": miou / 2, "loss": 1.0, "pixel_accuracy": 0.5},
                             {"iteration": 4, "miou": miou, "loss": 0.5, "pixel_accuracy": 0.6}],
            "energy_kwh": kwh, "co2_kg": None if kwh is None else kwh * INTENSITY / 1000,
            "carbon_intensity_g_per_kwh": None if kwh is None else INTENSITY,
            "energy_json": extra.pop("energy_json", {"tracker": "codecarbon-offline" if kwh is not None else "disabled",
                                                     "gpu_energy_flag": None}),
            "git_commit": "abc123", "extra_json": extra.pop("extra_json", {"device": "cpu"}), **extra}


@pytest.fixture(scope="module")
def fake_configs(tmp_path_factory):
    """Resolved configs of the three arms, loaded once (Hydra's compose costs a second each)."""
    base = ["budget=smoke", "teacher=pspnet_resnet34", "teacher.head_channels=16", "student.head_channels=16",
            "dataset.sizes.train=24", "dataset.sizes.tune=8", "dataset.sizes.val=8", "progress=false"]
    return [load_config([*base, *extra]) for extra in ((), ("+method=kd",), ("+method=cwd",))]


@pytest.fixture
def fake_db(fake_configs, tmp_path):
    """A fake smoke sweep of kd and cwd (student-only arm shared) in a fresh database."""
    paths = {"results": str(tmp_path / "results"), "reports": str(tmp_path / "reports"),
             "cache": str(tmp_path / "cache")}
    store_cfg = {"url": f"sqlite:///{tmp_path / 'results' / 'harness.db'}"}
    so_cfg, kd_cfg, cwd_cfg = ({**copy.deepcopy(c), "paths": paths, "store": store_cfg} for c in fake_configs)
    store = ResultsStore(so_cfg["store"]["url"])
    teacher_run = store.append(_row(so_cfg, "teacher", None, 0, 0.6, TEACHER_KWH, None,
                                    student=kd_cfg["teacher"]["name"]))
    tinfo = {"device": "cpu", "teacher": {"source": "trained", "trained_by_run": teacher_run, "val_miou": 0.61}}
    so, kd, cwd = "student-only:s1", "distilled:kd:k1", "distilled:cwd:c1"
    for i, lr in enumerate([0.01, 0.02, 0.05]):
        store.append(_row(so_cfg, "student-only", "lr_wd", 0, 0.20 + 0.01 * i, 0.05, so, {"optim.lr": lr}))
        store.append(_row(kd_cfg, "distilled", "lr_wd", 0, 0.22 + 0.01 * i, 0.1, kd, {"optim.lr": lr}, extra_json=tinfo))
    store.append(_row(kd_cfg, "distilled", "lr_wd", 0, 0.05, 0.02, kd, {"optim.lr": 0.1}, status="pruned",
                      extra_json=tinfo))
    for tau, m in zip([1, 2, 4, 8], [0.25, 0.27, 0.26, 0.24]):
        store.append(_row(kd_cfg, "distilled", "temperature[method.kd.tau]", 0, m, 0.1, kd,
                          {"optim.lr": 0.05, "method.kd.tau": tau}, extra_json=tinfo))
    for w, m in zip([0.1, 1.0, 10.0], [0.23, 0.27, 0.21]):
        store.append(_row(kd_cfg, "distilled", "weights[method.kd.weight]", 0, m, 0.1, kd,
                          {"optim.lr": 0.05, "method.kd.tau": 2, "method.kd.weight": w}, extra_json=tinfo))
    for seed, (m, k) in enumerate(zip([0.30, 0.32, 0.31], SO_KWH), start=1):
        store.append(_row(so_cfg, "student-only", "reruns", seed, m, k, so, {"optim.lr": 0.05, "seed": seed}))
    for seed, (m, k) in enumerate(zip([0.34, 0.35, 0.37], KD_KWH), start=1):
        store.append(_row(kd_cfg, "distilled", "reruns", seed, m, k, kd,
                          {"optim.lr": 0.05, "method.kd.tau": 2, "seed": seed}, extra_json=tinfo))
    # cwd: one rerun without energy, one flagged (zero GPU energy on a busy GPU), one measured
    store.append(_row(cwd_cfg, "distilled", "reruns", 1, 0.33, None, cwd, extra_json=tinfo))
    store.append(_row(cwd_cfg, "distilled", "reruns", 2, 0.31, 0.2, cwd, extra_json=tinfo,
                      energy_json={"tracker": "codecarbon-offline", "gpu_energy_flag": "zero GPU energy"}))
    store.append(_row(cwd_cfg, "distilled", "reruns", 3, 0.32, 0.25, cwd, extra_json=tinfo))
    return store, so_cfg


def tables(text):
    """Every Markdown table of `text` as a list of rows (lists of stripped cells), header first."""
    out, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                out.append(current)
            if not set(line) <= set("|-: "):
                current.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            current = None
    return out


def by_first_cell(table):
    return {row[0]: row[1:] for row in table[1:]}


# --------------------------------------------------------------------------------------- energy
def test_energy_report_recomputes_table_8_from_the_rows(fake_db):
    store, cfg = fake_db
    text = energy_report(store, cfg)
    main_table, break_even, tuning = (by_first_cell(t) for t in tables(text))
    so = main_table["S (student-only, tuned)"]
    assert so[0] == f"{100 * statistics.fmean([0.30, 0.32, 0.31]):.2f} +- {100 * statistics.stdev([0.30, 0.32, 0.31]):.2f} (n=3)"
    assert so[1] == f"{statistics.fmean(SO_KWH):.3g} +- {statistics.stdev(SO_KWH):.2g}"
    assert so[2] == f"{statistics.fmean(SO_KWH) * INTENSITY / 1000:.3g}"
    assert so[3:] == ["0.1", f"{0.1 * INTENSITY / 1000:.3g}"]
    kd = main_table["S + kd"]
    assert kd[1].startswith(f"{statistics.fmean(KD_KWH):.3g} +- ") and kd[3] == "0.1"
    teacher = main_table["T (pspnet_resnet34)"]
    assert teacher[0].startswith("61.00") and teacher[1] == f"{TEACHER_KWH:.3g}" and teacher[3] == "0.3"
    # cwd: the run without energy and the flagged one are left out of the mean, and said so
    assert main_table["S + cwd"][1] == "0.25 (1 of 3 runs; 1 without energy, 1 flagged)"
    # break-even N = E_train(S + M) / (e_T - e_S), e per image
    per_image_saving = (0.3 - 0.1) / 10_000
    assert break_even["S + kd"][0] == f"{statistics.fmean(KD_KWH) / per_image_saving:,.0f} images"
    kd_sweep = 3 * 0.1 + 0.02 + 4 * 0.1 + 3 * 0.1 + sum(KD_KWH)
    assert break_even["S + kd"][1] == f"{kd_sweep / per_image_saving:,.0f} images"
    assert break_even["S + cwd"][1].startswith(f"at least {0.25 / per_image_saving:,.0f} images (2 of 3")
    # tuning cost = every row of the arm's sweep
    assert tuning["kd"][:2] == ["14", f"{kd_sweep:.3g}"]
    assert tuning["student-only"][:2] == ["6", f"{3 * 0.05 + sum(SO_KWH):.3g}"]
    assert "Source:" in text and "abc123" in text and "Seeds: 1, 2, 3" in text
    assert "training runs: 400 g/kWh" in text


def test_forced_carbon_intensity_recomputes_every_co2(fake_db):
    store, cfg = fake_db
    cfg = {**cfg, "energy": {**cfg["energy"], "carbon_intensity_g_per_kwh": 100.0}}
    text = energy_report(store, cfg)
    main_table = by_first_cell(tables(text)[0])
    assert main_table["S + kd"][2] == f"{statistics.fmean(KD_KWH) * 0.1:.3g}"
    assert main_table["T (pspnet_resnet34)"][4] == f"{0.3 * 0.1:.3g}"
    assert "100 g CO2/kWh for every CO2 number" in text


def test_flagged_inference_and_missing_arm_are_said_not_zeroed(fake_db):
    store, cfg = fake_db
    for r in store.query(arm="student-only", stage="reruns"):
        store.update(r["run_id"], stage="gone")

    def flagged_teacher(model_cfg, *args, **kwargs):
        out = fake_inference(model_cfg, *args, **kwargs)
        if model_cfg["name"] != "pspnet_resnet18_small":
            out.update(kwh_10k=None, co2_10k=None, reason="flagged: zero GPU energy while a GPU was in use")
        return out

    text = energy_report(store, cfg, measure=flagged_teacher)
    main_table, break_even = (by_first_cell(t) for t in tables(text)[:2])
    assert main_table["S (student-only, tuned)"][0] == "n/a (no student-only rerun in the database)"
    assert main_table["T (pspnet_resnet34)"][3].startswith("flagged")
    assert break_even["S + kd"][0] == "n/a (no inference energy)"


def test_empty_database_energy_command_says_so(tiny, tmp_path, capsys):
    overrides = tiny(f"paths.reports={tmp_path / 'reports'}")
    ResultsStore(load_config(overrides)["store"]["url"])  # an empty harness database (a read never creates one)
    assert main(["energy", *overrides]) == 0
    text = (tmp_path / "reports" / "energy.md").read_text()
    assert "No completed rerun rows" in text and "python -m harness sweep" in text and "Source:" in text


def test_inference_is_measured_by_codecarbon_and_extrapolated(tiny):
    cfg = load_config(tiny())
    m = measure_energy.measure_inference(cfg["student"], cfg["dataset"], cfg["energy"] | {"enabled": True}, "cpu",
                                         str(cfg["paths"]["results"]), batch_size=2, images=4, min_seconds=0.3)
    assert m["tracker"] == "codecarbon-offline" and m["images"] >= 4 and m["seconds"] >= 0.3
    assert m["kwh_10k"] == pytest.approx(m["energy_kwh"] * 10_000 / m["images"], rel=1e-12) and m["kwh_10k"] > 0
    off = measure_energy.measure_inference(cfg["student"], cfg["dataset"], cfg["energy"] | {"enabled": False},
                                           "cpu", str(cfg["paths"]["results"]), batch_size=2, images=2, min_seconds=0)
    assert off["kwh_10k"] is None and "energy.enabled=false" in off["reason"]


# ---------------------------------------------------------------------------------------- plots
def test_response_curves_read_the_searched_values_from_params():
    """Values from params_json; what a path is from the record's param_kinds, never from its name."""
    from harness.report.figures import response_data

    kinds = {"method.kd.tau": "temperature", "method.cwd.tau": "temperature", "method.cwd.weight": "weight",
             "method.brd.boundary_bce_weight": "aux_weight"}
    rows = [{"stage": "temperature[method.kd.tau]", "params_json": {"optim.lr": 0.05, "method.kd.tau": t},
             "final_miou": m, "status": s, "extra_json": {"param_kinds": kinds}}
            for t, m, s in [(1, 0.2, "completed"), (2, 0.3, "completed"), (4, 0.1, "pruned"), (8, None, "failed")]]
    rows += [{"stage": "together", "params_json": {"method.cwd.tau": 4, "method.cwd.weight": w, "optim.lr": lr},
              "final_miou": 0.25, "status": "completed", "extra_json": {"param_kinds": kinds}}
             for w, lr in [(3.0, 0.1), (30.0, 0.2)]]
    rows += [{"stage": "aux[method.brd.boundary_bce_weight]", "params_json": {"method.brd.boundary_bce_weight": w},
              "final_miou": 0.2, "status": "completed", "extra_json": {"param_kinds": kinds}} for w in (0.1, 1.0)]
    assert response_data(rows) == {
        ("temperature[method.kd.tau]", "method.kd.tau"): ("temperature", [(1.0, 0.2, "completed"),
                                                                          (2.0, 0.3, "completed"),
                                                                          (4.0, 0.1, "pruned")]),
        ("together", "method.cwd.weight"): ("weight", [(3.0, 0.25, "completed"), (30.0, 0.25, "completed")])}


def test_response_curves_of_rows_without_param_kinds_take_the_kind_from_the_protocol_stage():
    """Rows stored before records carried param_kinds: the stage's placeholder in the default
    protocol says temperature ($temperatures) or weight ($weights); lr_wd searched no method path."""
    from harness.report.figures import response_data

    def row(stage, params):
        return {"stage": stage, "params_json": params, "final_miou": 0.3, "status": "completed",
                "config_json": {"sweep": {"protocol": "default"}}, "extra_json": {}}

    rows = [row("temperature[method.gskd.tau]", {"method.gskd.tau": 2.0}),
            row("weights[method.gskd.weight]", {"method.gskd.weight": 1.0}),
            row("lr_wd", {"optim.lr": 0.01}), row("lr_wd", {"optim.lr": 0.02})]
    data = response_data(rows)
    assert {key: kind for key, (kind, _) in data.items()} == {
        ("temperature[method.gskd.tau]", "method.gskd.tau"): "temperature",
        ("weights[method.gskd.weight]", "method.gskd.weight"): "weight"}


def test_pareto_front():
    from harness.report.figures import pareto_front

    points = [(1.0, 30.0), (2.0, 29.0), (2.0, 35.0), (0.5, 20.0), (3.0, 35.0), (4.0, 40.0)]
    assert pareto_front(points) == [3, 0, 2, 5]


def test_entropy_shares_match_a_loop_reference():
    from harness.measure.entropy import entropy_shares

    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 5, 3, 7, generator=g)
    logits[0, 2, 1, 1] = 60.0  # a confident pixel: entropy ~0 at tau = 1
    shares, edges = entropy_shares(logits, (1, 4), bins=6)
    assert edges[-1] == pytest.approx(math.log(5))
    for tau in (1, 4):
        counts = [0] * 6
        for b in range(2):
            for i in range(3):
                for j in range(7):
                    z = [float(logits[b, c, i, j]) / tau for c in range(5)]
                    zmax = max(z)
                    e = [math.exp(v - zmax) for v in z]
                    p = [v / sum(e) for v in e]
                    h = -sum(q * math.log(q) for q in p if q > 0)
                    counts[min(int(h / (math.log(5) / 6)), 5)] += 1
        assert shares[tau] == pytest.approx([c / 42 for c in counts], abs=1e-12)
    assert shares[1][0] > 0
    flat = entropy_shares(torch.zeros(1, 5, 2, 2), (1,), bins=4)[0][1]
    assert flat == [0.0, 0.0, 0.0, 1.0]  # uniform: every pixel at ln K


def test_plots_of_an_empty_database_say_why(tmp_path, fake_configs):
    from harness.measure.entropy import measure_entropy
    from harness.report.figures import write_figures

    cfg = {**fake_configs[0], "paths": {"results": str(tmp_path), "reports": str(tmp_path / "reports"),
                                        "cache": str(tmp_path / "cache")}}
    store = ResultsStore(tmp_path / "empty.db")
    blocks = load_blocks(store)
    outputs = write_figures(store, cfg, blocks, measure_entropy(cfg, blocks))
    assert all(p is None for p, _ in outputs) and len(outputs) == 6
    assert "no sweep rows" in outputs[0][1] and "not trained yet" in outputs[-1][1]


def test_report_regenerates_every_table_and_figure(fake_db, monkeypatch, capsys):
    import matplotlib.image

    store, cfg = fake_db
    monkeypatch.setattr(measure_energy, "measure_inference", fake_inference)
    overrides = [f"paths.{k}={v}" for k, v in cfg["paths"].items()] + ["budget=smoke"]
    assert main(["report", *overrides]) == 0
    out = capsys.readouterr().out
    results, reports = Path(cfg["paths"]["results"]), Path(cfg["paths"]["reports"])
    assert (results / "leaderboard.md").is_file() and "[report] figures" in out
    assert "S + kd" in (reports / "energy.md").read_text()
    # the figures: every one written with its source, or said missing (no teacher in this cache)
    block = "synthetic_pspnet_resnet18_small_pspnet_resnet34_smoke"
    written = {"history_student-only-s1.png", "history_distilled-kd-k1.png", "history_distilled-cwd-c1.png",
               "response_distilled-kd-k1.png", f"seeds_{block}.png", f"pareto_{block}.png", f"tuning_{block}.png"}
    assert {p.name for p in reports.glob("*.png")} == written
    for name in written:
        assert matplotlib.image.imread(reports / name).ndim == 3
    index = (reports / "figures.md").read_text()
    assert all(name in index for name in written) and "not drawn: entropy histogram" in index
    assert "not trained yet" in index and "python -m harness teacher" in index
    assert "Source:" in index and "Seeds: 1, 2, 3" in index


# ----------------------------------------------------------------------- reproduce and show
@pytest.fixture
def tiny_reruns(tiny, tmp_path):
    """Real tiny rerun rows (seed 1) of the student-only and the kd arm, as a sweep writes them."""
    overrides = tiny(f"paths.reports={tmp_path / 'reports'}", "threads=1")
    rows = {}
    for extra, sweep in (((), "student-only:t"), (("+method=kd",), "distilled:kd:t")):
        cfg = load_config([*overrides, *extra, "seed=1"])
        record = run(cfg, teacher=teacher_for(cfg)).record.replace(stage="reruns", sweep_id=sweep,
                                                                   params_json={"seed": 1})
        store_record(cfg, record)
        rows[sweep] = record
    return overrides, rows


def test_reproduce_and_show_on_real_tiny_runs(tiny_reruns, tmp_path, capsys):
    overrides, rows = tiny_reruns
    store = ResultsStore(load_config(overrides)["store"]["url"])
    block = load_blocks(store)[0]
    kd_id = block.row_id("kd")
    assert main(["reproduce", kd_id, "--seed", "1", *overrides]) == 0
    out = capsys.readouterr().out
    stored = rows["distilled:kd:t"]["final_miou"]
    assert f"stored         val mIoU {100 * stored:.6f}" in out and f"reproduced     val mIoU {100 * stored:.6f}" in out
    assert "identical      yes" in out
    # a run id works too; a wrong seed or id is a usage error naming what exists
    assert main(["reproduce", "--seed=7", rows["student-only:t"]["run_id"], *overrides]) == 2
    assert "its seeds: 1" in capsys.readouterr().err
    assert main(["reproduce", "nosuchid", *overrides]) == 2
    err = capsys.readouterr().err
    assert kd_id in err and block.row_id("student-only") in err
    # show: the grid, from weights retrained by reproduce (identical to the stored runs)
    assert main(["show", *overrides]) == 0
    path = next((tmp_path / "reports").glob("show_*_kd.png"))
    import matplotlib.image

    h, w = matplotlib.image.imread(path).shape[:2]
    assert h > 200 and w > 400
    # every run saved its final student (checkpoint.final): show loads those, retraining none
    assert not list(Path(load_config(overrides)["paths"]["cache"], "show").glob("*.json"))
    for r in rows.values():
        assert (Path(load_config(overrides)["paths"]["results"]) / "checkpoints" / r["run_id"] / "final.pt").is_file()
    # with show.retrain=true the weights are retrained, and equal the stored runs
    assert main(["show", "show.retrain=true", *overrides]) == 0
    metas = list(Path(load_config(overrides)["paths"]["cache"], "show").glob("*.json"))
    infos = {json.loads(m.read_text())["run_id"]: json.loads(m.read_text()) for m in metas}
    for r in rows.values():
        assert infos[r["run_id"]]["identical"] and infos[r["run_id"]]["retrained_miou"] == r["final_miou"]
    # the teacher is in the cache now: its entropy histogram (paper 003 Figure 1) is drawn
    from harness.measure.entropy import measure_entropy
    from harness.report.figures import entropy_histograms

    measured = measure_entropy(load_config(overrides), load_blocks(store))
    (path, text), = entropy_histograms(store.url, measured, tmp_path / "reports")
    assert path is not None and path.is_file() and "tau 1, 2, 4, 8, 16" in text


def test_compare_names_what_differs():
    from harness.reproduce import compare, parse_args

    a = {"final_miou": 0.5, "per_class_iou_json": {"road": 0.5}, "history_json": [{"iteration": 2, "miou": 0.5}]}
    b = {**a, "final_miou": 0.5000001}
    assert compare(a, a) == {"final_miou": True, "per_class_iou": True, "history": True}
    assert compare(a, b)["final_miou"] is False
    assert parse_args(["abc", "--seed", "3", "paths.results=x"]) == ("abc", 3, ["paths.results=x"])


def test_show_on_an_empty_database_draws_what_it_can_and_says_why(tiny, tmp_path, capsys):
    overrides = tiny(f"paths.reports={tmp_path / 'reports'}", "teacher.train.seed=99")
    ResultsStore(load_config(overrides)["store"]["url"])  # an empty harness database
    assert main(["show", *overrides]) == 0
    out = capsys.readouterr().out
    assert "no completed rerun rows" in out and "written:" in out
    assert len(list((tmp_path / "reports").glob("show_*.png"))) == 1


# ------------------------------------------------------------------- latency: measured once, stored
def test_latency_is_measured_once_per_model_and_device_and_read_back(tmp_path, fake_configs):
    """The first report measures and stores the latency (<paths.cache>/efficiency/), later ones read
    the stored number (they do not measure again), remeasure replaces it, and the table names the
    device and the date; latency=False neither reads nor measures."""
    from types import SimpleNamespace

    from harness.measure import efficiency as eff

    cfg = fake_configs[0]
    row = {"run_id": "r1", "config_json": {"student": {**cfg["student"], "head_channels": 8},
                                           "dataset": {"num_classes": 3, "image_size": [24, 24]}}}
    block = SimpleNamespace(key=("synthetic", "s", "t", "smoke"), rows=[row])
    cache = tmp_path / "cache" / "efficiency"
    kw = dict(repetitions=2, warmup=0, threads=1)

    eff._CACHE.clear()
    first = eff.for_blocks([block], latency="stored", cache=cache, **kw)[block.key]
    files = list(cache.glob("latency_*.json"))
    assert len(files) == 1 and first.latency_ms is not None
    stored = json.loads(files[0].read_text())
    assert stored["latency_ms"] == first.latency_ms and stored["key"]["device"] == "cpu"
    assert stored["key"]["device_name"] == eff.device_description("cpu") and stored["key"]["threads"] == 1
    assert first.device_name == eff.device_description("cpu") and first.measured_on == stored["measured_at"][:10]
    text = first.describe()
    assert eff.device_description("cpu") in text and f"measured {first.measured_on}" in text

    # read back, not re-measured: a sentinel in the file comes back as it is, in a fresh process cache
    stored["latency_ms"], stored["measured_at"] = 123.25, "2020-01-02T03:04:05+00:00"
    files[0].write_text(json.dumps(stored))
    eff._CACHE.clear()
    again = eff.for_blocks([block], latency=True, cache=cache, **kw)[block.key]
    assert again.latency_ms == 123.25 and again.measured_on == "2020-01-02" and "measured 2020-01-02" in again.describe()

    # forced: measured again and stored in place of the old number
    eff._CACHE.clear()
    forced = eff.for_blocks([block], latency="remeasure", cache=cache, **kw)[block.key]
    assert forced.latency_ms != 123.25
    assert json.loads(files[0].read_text())["latency_ms"] == forced.latency_ms
    assert list(cache.glob("latency_*.json")) == files

    # report.measure=false: no latency, nothing read or written
    eff._CACHE.clear()
    none = eff.for_blocks([block], latency=False, cache=tmp_path / "other", **kw)[block.key]
    assert none.latency_ms is None and "latency not measured" in none.describe() and not (tmp_path / "other").exists()
    # another thread count is another measurement
    eff._CACHE.clear()
    eff.for_blocks([block], latency="stored", cache=cache, **{**kw, "threads": 2})
    assert len(list(cache.glob("latency_*.json"))) == 2


def test_leaderboard_command_stores_the_latency_and_names_the_device(fake_db, tmp_path, monkeypatch):
    from harness.cli import write_leaderboard
    from harness.measure import efficiency as eff
    from harness.report.filters import Filters

    store, _ = fake_db
    c = load_config([f"paths.results={tmp_path / 'results'}", f"paths.cache={tmp_path / 'cache'}", "progress=false"])
    calls = []
    real = eff.measure

    def counting(*a, **kw):
        kw["repetitions"], kw["warmup"] = 1, 0
        calls.append(kw.get("store") is not None)
        return real(*a, **kw)

    monkeypatch.setattr(eff, "measure", counting)
    eff._CACHE.clear()
    write_leaderboard(c, store, Filters())
    assert calls and all(calls)  # measured through the store
    assert list((tmp_path / "cache" / "efficiency").glob("latency_*.json"))
    md = (tmp_path / "results" / "leaderboard.md").read_text()
    assert eff.device_description("cpu") in md and "measured 20" in md
