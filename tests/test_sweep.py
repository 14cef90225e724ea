"""The fair tuning protocol end to end on Ray Tune: stages, reuse, resume after SIGKILL, failures,
bad input. Sweeps run on tiny data so that each takes seconds of training."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.config import PROJECT_ROOT, load_config
from harness.errors import ConfigError
from harness.store import ResultsStore
from harness.sweep.budget import (Budget, arm_budget, parity_prefix, student_prefix, student_reruns_for, unequal,
                                  winner)
from harness.sweep.protocol import expand_space, load_protocol, parse_protocol

pytestmark = pytest.mark.slow


def protocol_file(tmp_path, stages, name="p"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "sampler_seed": 0, "stages": stages}))
    return str(path)


def rows(overrides, **equals):
    return ResultsStore(load_config(overrides)["store"]["url"]).query(**equals)


# ------------------------------------------------------------------------------ protocol only
def test_default_protocol_expands_for_each_method():
    protocol = load_protocol("default")
    assert [s.name for s in protocol.stages] == ["lr_wd", "temperature", "weights", "together", "reruns",
                                                     "compute_matched"]
    cfg = load_config(["+method=[kd,cwd]"])
    temperature = next(s for s in protocol.stages if s.name == "temperature")
    assert set(expand_space(temperature.space, cfg)) == {"method.kd.tau", "method.cwd.tau"}
    with_feature = load_config(["+method=[kd,cwd]", "method.cwd.feature_weight=50"])
    assert "method.cwd.feature_tau" in expand_space(temperature.space, with_feature)
    weights = next(s for s in protocol.stages if s.name == "weights")
    space = expand_space(weights.space, cfg)
    assert space["method.kd.weight"] == {"grid": [0.1, 1.0, 10.0]}
    assert "method.cwd.feature_weight" not in space  # a term switched off (default 0) is not searched
    cirkd = expand_space(temperature.space, load_config(["+method=cirkd"]))
    assert cirkd["method.cirkd.batch_p2p_tau"] == {"grid": [0.1, 0.2, 0.4, 0.8]}   # similarity temperature
    assert cirkd["method.cirkd.contrast_kd_tau"] == {"grid": [1, 2, 4, 8]}        # softening temperature


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "arms": ["student-only"], "search": "tpe", "trials": 2, "space": {}}], "empty search space"),
    ([{"name": "a", "arms": ["distilled"], "search": "grid", "space": {"optim.lr": {"grid": []}}}], "empty search space"),
    ([{"name": "a", "arms": ["distilled"], "inherits": ["nope"], "search": "grid",
       "space": {"optim.lr": {"grid": [0.1]}}}], "inherits from 'nope', which is not an earlier stage"),
    ([{"name": "a", "arms": ["teachers"], "seeds": 2}], "arms must be a non-empty subset"),
    ([{"name": "a", "arms": ["distilled"], "search": "tpe", "trials": 2,
       "space": {"optim.lr": {"grid": [0.1]}}}], "does not fit search 'tpe'"),
    ([{"name": "a", "arms": ["distilled"], "serach": "tpe"}], "Did you mean 'search'"),
])
def test_bad_protocols_are_config_errors(tmp_path, stages, message):
    with pytest.raises(ConfigError) as info:
        load_protocol(protocol_file(tmp_path, stages))
    assert message in str(info.value)


def test_bad_sweep_input_exits_2_and_writes_nothing(tmp_path, tiny, capsys):
    cases = [
        (["sweep.protocol=nosuch"], "unknown sweep protocol 'nosuch'"),
        ([f"sweep.protocol={protocol_file(tmp_path, [{'name': 'a', 'arms': ['distilled'], 'search': 'tpe', 'trials': 1, 'space': {}}])}"],
         "empty search space"),
        ([f"sweep.protocol={protocol_file(tmp_path, [{'name': 'a', 'arms': ['distilled'], 'search': 'grid', 'space': {'optim.lrr': {'grid': [1]}}}], 'q')}"],
         "'optim.lrr' is not a config path"),
        (["sweep.ray.address=127.0.0.1:1"], "no Ray cluster reachable"),
    ]
    for extra, message in cases:
        assert main(["sweep", "+method=kd", *tiny(*extra)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not (tmp_path / "results").exists(), "a refused sweep must not write anything"
    assert main(["sweep", *tiny()]) == 2
    assert "add +method=NAME" in capsys.readouterr().err


# ------------------------------------------------------------------------------ real sweeps
@pytest.mark.timeout(1200)  # two sweeps, and the student-only arm grows in several Ray launches
def test_smoke_sweep_runs_every_stage_and_grows_and_reuses_the_student_arm(ray_local, tiny, capsys):
    overrides = tiny("+method=kd")
    assert main(["sweep", *overrides, "report.after_sweep=false"]) == 0   # the second sweep regenerates them
    out = capsys.readouterr().out
    db = rows(overrides)
    stages = {(r["arm"], r["stage"]) for r in db if r["stage"]}
    assert {("student-only", "lr_wd"), ("distilled", "lr_wd"), ("distilled", "temperature[method.kd.tau]"),
            ("distilled", "weights[method.kd.weight]"), ("student-only", "reruns"), ("distilled", "reruns")} <= stages
    reruns = [r for r in db if r["stage"] == "reruns"]
    assert all(r["split"] == "val" and r["status"] == "completed" for r in reruns)
    # tuning trials choose on tune; the reruns and the compute-matched control report on val
    controls = [r for r in db if (r["extra_json"] or {}).get("stage_kind") == "compute_matched"]
    assert controls and all(r["split"] == "val" and r["arm"] == "student-only" for r in controls)
    assert all(r["split"] == "tune" for r in db if r["stage"] and r["stage"] != "reruns" and r not in controls)
    assert len({r["run_id"] for r in db}) == len(db)
    assert "lift of the distilled arm over the tuned student-only arm" in out and "== stage lr_wd" in out
    # a rerun stage's line gives the mean over its seeds, and says so (it is not a best)
    for arm in ("student-only", "distilled"):
        values = [r["final_miou"] for r in reruns if r["arm"] == arm]
        mean = 100 * sum(values) / len(values)
        assert f"== stage reruns ({arm}): 2 done, 0 pruned, 0 failed; mean val mIoU over 2 seeds {mean:.2f};" in out
    # the distilled reruns carry every winner forward (lineage of the protocol)
    d = next(r for r in reruns if r["arm"] == "distilled")
    assert {"optim.lr", "optim.weight_decay", "method.kd.tau", "method.kd.weight", "seed"} <= set(d["params_json"])
    assert all(r["extra_json"]["stage_kind"] for r in db if r["stage"])
    assert all(r["extra_json"]["first_cut"] == {"evaluation": 1, "iteration": 2, "pruning": r["stage"] == "lr_wd"}
               for r in db if r["stage"] and r["stage"] != "reruns" and r not in controls)
    # budget parity: the student-only arm grew its lr_wd sequence to the distilled arm's budget
    extra = d["extra_json"]
    mine, theirs = (Budget.from_dict(extra["tuning_budget"][a]) for a in ("student-only", "distilled"))
    assert extra["unequal_tuning_budget"] is None and unequal(mine, theirs) is None and theirs.started >= 6
    n = extra["student_arm"]["trials"]
    assert n >= theirs.started and extra["student_arm"]["arm_id"].startswith("student-only:")
    sequence = rows(overrides, arm="student-only", stage="lr_wd")
    assert len(sequence) == n and arm_budget(student_prefix(sequence, n)) == mine
    assert parity_prefix(sequence, theirs, start=2) == n                  # the smallest prefix that reaches it
    assert winner(sequence)["run_id"] == extra["student_arm"]["winner_run_id"]
    student_reruns = student_reruns_for(d, [r for r in reruns if r["arm"] == "student-only"])
    assert len(student_reruns) == 2 and all(r["extra_json"]["tuned_trials"] == n for r in student_reruns)
    assert "tuning budget" in out and f"{theirs.started} trials started" in out
    assert "rank agreement first cut (iteration 2) vs end" in out
    # a larger composition on the same database grows the same sequence: no trial run twice
    assert main(["sweep", *tiny("+method=[kd,cwd]")]) == 0
    out = capsys.readouterr().out
    assert "student-only: 2/2 trials already in the database" in out and "reused" in out
    grown = rows(overrides, arm="student-only", stage="lr_wd")
    assert [r["run_id"] for r in grown[:n]] == [r["run_id"] for r in sequence]     # the same rows, not rerun
    assert grown[:n] == sequence
    from harness.report.blocks import method_label

    both = next(r for r in rows(overrides, stage="reruns", arm="distilled")
                if method_label(r["methods"]) == "cwd+kd")["extra_json"]
    n2 = both["student_arm"]["trials"]
    assert len(grown) == n2 > n and both["unequal_tuning_budget"] is None
    assert len({(r["params_json"]["optim.lr"], r["params_json"]["optim.weight_decay"]) for r in grown}) == n2
    # the earlier comparison keeps its N and its winner
    assert parity_prefix(grown, theirs, start=2) == n
    assert winner(student_prefix(grown, n))["run_id"] == extra["student_arm"]["winner_run_id"]
    # each sweep regenerated the evidence, with every method of the database in the leaderboard
    cfg = load_config(overrides)
    board = (Path(cfg["paths"]["results"]) / "leaderboard.md").read_text()
    assert "regenerating the leaderboard" in out and "kd" in board and "cwd" in board
    assert (Path(cfg["paths"]["reports"]) / "significance.md").exists()


def test_failed_trials_never_win_and_crashes_are_retried_once(ray_local, tiny, tmp_path, capsys):
    protocol = protocol_file(tmp_path, [
        {"name": "lr", "arms": ["student-only", "distilled"], "search": "grid",
         "space": {"optim.lr": {"grid": [0.01, 900.0]}}},  # 900: in range, diverges at once
        {"name": "batch", "arms": ["student-only"], "inherits": ["lr"], "search": "grid",
         "space": {"budget.batch_size": {"grid": [4, 100000]}}},
        {"name": "reruns", "arms": ["student-only", "distilled"], "inherits": ["lr", "batch"], "seeds": 1},
    ])
    # lr 900 with weight decay 10: each step multiplies the weights by 1 - 9000, a certain overflow
    overrides = tiny("+method=kd", f"sweep.protocol={protocol}", "budget.iterations=6", "optim.weight_decay=10")
    assert main(["sweep", *overrides]) == 0
    db = rows(overrides)
    diverged = [r for r in db if r["stage"] == "lr" and r["params_json"]["optim.lr"] > 1]
    assert len(diverged) == 2 and all(r["status"] == "failed" and "loss became" in r["failure_reason"] for r in diverged), [(r["status"], r["failure_reason"]) for r in diverged]
    crashed = [r for r in db if r["stage"] == "batch" and r["params_json"]["budget.batch_size"] == 100000]
    assert len(crashed) == 1 and crashed[0]["status"] == "failed" and "crashed 2 time(s)" in crashed[0]["failure_reason"]
    for r in (r for r in db if r["stage"] == "reruns"):
        assert r["params_json"]["optim.lr"] == 0.01 and r["params_json"].get("budget.batch_size", 4) == 4


def test_killed_sweep_resumes_without_rerunning_or_duplicating(tiny, tmp_path):
    """SIGKILL the driver in the middle of a stage, run the same command again."""
    protocol = protocol_file(tmp_path, [
        {"name": "lr", "arms": ["student-only", "distilled"], "search": "grid",
         "space": {"optim.lr": {"grid": [0.005, 0.01, 0.02, 0.04]}}},
        {"name": "reruns", "arms": ["student-only", "distilled"], "inherits": ["lr"], "seeds": 1},
    ])
    overrides = tiny("+method=kd", f"sweep.protocol={protocol}", "budget.iterations=8", "budget.eval_interval=4", "budget.sweep_max_trials=null",
                     "sweep.ray.num_cpus=2")
    command = [sys.executable, "-m", "harness", "sweep", *overrides]
    driver = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    url = load_config(overrides)["store"]["url"]
    deadline = time.time() + 240
    finished_before = []
    while time.time() < deadline:
        time.sleep(1)
        if Path(url.replace("sqlite:///", "")).exists():
            finished_before = ResultsStore(url).query(stage="lr")
            if len(finished_before) >= 2:
                break
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert 2 <= len(finished_before) < 8, "the kill must land in the middle of the first stage"
    kept = {r["run_id"] for r in ResultsStore(url).query(stage="lr")}

    resumed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "already in the database" in resumed.stdout
    lr_rows = ResultsStore(url).query(stage="lr")
    assert kept <= {r["run_id"] for r in lr_rows}                  # nothing finished was lost
    per_point = {(r["arm"], r["params_json"]["optim.lr"]) for r in lr_rows}
    assert len(per_point) == len(lr_rows) == 8                     # every point once: none re-run, none lost
    assert len(ResultsStore(url).query(stage="reruns")) == 2


def test_resumed_tpe_sampler_continues_the_uninterrupted_search():
    """The replayed sampler proposes, after k finished trials, exactly the (k+1)-th point of the
    uninterrupted search, for every k; a sampler merely re-created with the seed would repeat the
    first point (the bug this replaces)."""
    import math
    from types import SimpleNamespace

    import optuna

    from harness.sweep.runner import replayed_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"optim.lr": optuna.distributions.FloatDistribution(0.002, 0.1, log=True),
             "optim.weight_decay": optuna.distributions.CategoricalDistribution([5e-6, 5e-5, 5e-4])}
    protocol = SimpleNamespace(sampler_seed=0, tpe_startup_trials=3)

    def score(p):
        return -abs(math.log(p["optim.lr"] / 0.02)) + (p["optim.weight_decay"] == 5e-5)

    def study(sampler, points=(), values=()):
        s = optuna.create_study(direction="maximize", sampler=sampler)
        for p, v in zip(points, values):  # what OptunaSearch does with points_to_evaluate + rewards
            s.add_trial(optuna.trial.create_trial(params=p, distributions=space, value=v))
        return s

    uninterrupted = study(replayed_sampler(protocol, space, [], []))
    points, values = [], []
    for _ in range(7):
        trial = uninterrupted.ask(fixed_distributions=space)
        points.append(trial.params)
        values.append(score(trial.params))
        uninterrupted.tell(trial, values[-1])
    for k in range(1, 7):
        resumed = study(replayed_sampler(protocol, space, points[:k], values[:k]), points[:k], values[:k])
        assert resumed.ask(fixed_distributions=space).params == points[k], k
    naive = study(optuna.samplers.TPESampler(seed=0, n_startup_trials=3), points[:1], values[:1])
    assert naive.ask(fixed_distributions=space).params == points[0]  # the old resume: a repeat


def test_a_resumed_tpe_stage_runs_the_points_of_the_uninterrupted_sweep(ray_local, tiny, tmp_path):
    """Run a one-trial-at-a-time TPE stage to the end, take the last two trials out of the database
    (a sweep killed after its second trial), run the command again: it runs the same two points,
    no point twice, with the same tune mIoU: the winner is the uninterrupted sweep's."""
    import sqlalchemy as sa

    protocol = protocol_file(tmp_path, [
        {"name": "lr", "arms": ["student-only"], "search": "tpe", "trials": 4,
         "space": {"optim.lr": {"loguniform": [0.002, 0.1]}}},
        {"name": "reruns", "arms": ["student-only"], "inherits": ["lr"], "seeds": 1},
    ], name="resume")
    overrides = tiny("+method=kd", f"sweep.protocol={protocol}", "sweep.max_concurrent_trials=1",
                     "budget.sweep_max_trials=null", "report.after_sweep=false")
    assert main(["sweep", *overrides]) == 0
    first = sorted(rows(overrides, stage="lr"), key=lambda r: r["created_at"])
    rerun = rows(overrides, stage="reruns")
    assert len(first) == 4 and len(rerun) == 1
    url = load_config(overrides)["store"]["url"]
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM runs WHERE run_id IN :ids").bindparams(sa.bindparam("ids", expanding=True)),
                     {"ids": [r["run_id"] for r in first[2:]]})
    engine.dispose()
    assert main(["sweep", *overrides]) == 0
    second = sorted(rows(overrides, stage="lr"), key=lambda r: r["created_at"])
    lrs = [r["params_json"]["optim.lr"] for r in second]
    assert lrs == [r["params_json"]["optim.lr"] for r in first]   # the same points, in the same order
    assert len(set(lrs)) == 4                                       # none twice
    assert [r["final_miou"] for r in second] == [r["final_miou"] for r in first]
    assert rows(overrides, stage="reruns") == rerun                 # the reruns were kept, not run again


def test_collapsing_miou_ends_the_trial_as_failed_and_reports_zero(tiny, monkeypatch):
    """The trial function itself (outside Ray): tune-mIoU 0.30 -> 0.40 -> 0.05 -> 0.04 collapses at the
    fourth evaluation (below collapse_fraction=0.5 of the best so far twice in a row); the run stops
    there, its row says why, and Tune is told 0 so that the trial can never win."""
    import harness.engine.train as train_module
    from ray import tune

    from harness.sweep.trial import TrialSpec, trainable

    script = iter([0.30, 0.40, 0.05, 0.04, 0.50])
    real_evaluate = train_module.evaluate

    def scripted(*args, **kwargs):
        metrics = real_evaluate(*args, **kwargs)
        return {**metrics, "miou": next(script)}

    reports = []
    monkeypatch.setattr(train_module, "evaluate", scripted)
    monkeypatch.setattr(tune, "report", lambda metrics: reports.append(dict(metrics)))
    monkeypatch.setattr(tune, "get_context", lambda: type("Ctx", (), {"get_trial_id": lambda self: "t0"})())
    overrides = tiny("budget.iterations=10", "budget.eval_interval=2")
    cfg = load_config(overrides)
    spec = TrialSpec(base=cfg, fixed={}, arm_id="arm", stage="lr", stage_kind="tpe", split="tune", threads=1,
                     collapse_fraction=0.5, command="test")
    trainable({"optim.lr": 0.01}, spec)

    assert [r["miou"] for r in reports] == [0.30, 0.40, 0.05, 0.0]     # no 5th evaluation
    assert reports[-1]["failed"].startswith("tune mIoU collapsed from 0.4000 to 0.0400")
    assert reports[-1]["failed"].endswith("at iteration 8")
    row = rows(overrides, run_id="arm:lr:t0")[0]
    assert row["status"] == "failed" and row["failure_reason"] == reports[-1]["failed"]
    assert row["iterations"] == 8 and row["params_json"] == {"optim.lr": 0.01}
    assert row["extra_json"]["stage_kind"] == "tpe" and row["config_json"]["eval_split"] == "tune"


def test_collapse_rule_ignores_noise_below_five_percent(tiny, monkeypatch):
    """A trial that never got above 5% mIoU is not 'collapsing' when it drops further."""
    import harness.engine.train as train_module
    from ray import tune

    from harness.sweep.trial import TrialSpec, trainable

    script = iter([0.04, 0.01, 0.02, 0.03])
    real_evaluate = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: {**real_evaluate(*a, **k), "miou": next(script)})
    reports = []
    monkeypatch.setattr(tune, "report", lambda metrics: reports.append(dict(metrics)))
    monkeypatch.setattr(tune, "get_context", lambda: type("Ctx", (), {"get_trial_id": lambda self: "t1"})())
    overrides = tiny("budget.iterations=8", "budget.eval_interval=2")
    spec = TrialSpec(base=load_config(overrides), fixed={}, arm_id="arm", stage="lr", stage_kind="tpe",
                     split="tune", threads=1, collapse_fraction=0.5, command="test")
    trainable({}, spec)
    assert [r["miou"] for r in reports] == [0.04, 0.01, 0.02, 0.03]
    assert rows(overrides, run_id="arm:lr:t1")[0]["status"] == "completed"


def _ray_processes(temp_dir_prefix):
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir_prefix in part for part in proc.info["cmdline"] or []):
                found.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_ctrl_c_stops_the_sweep_and_shuts_ray_down(tiny, tmp_path):
    """SIGINT to the driver's process group (what Ctrl-C in a terminal sends) while trials run: the
    sweep stops (no later stage starts), exits 130, and leaves no Ray process behind."""
    import hashlib

    protocol = protocol_file(tmp_path, [
        {"name": "lr", "arms": ["student-only"], "search": "grid",
         "space": {"optim.lr": {"grid": [0.005, 0.01, 0.02, 0.04, 0.08, 0.16]}}},
        {"name": "reruns", "arms": ["student-only"], "inherits": ["lr"], "seeds": 1},
    ])
    overrides = tiny("+method=kd", f"sweep.protocol={protocol}", "budget.iterations=30", "budget.eval_interval=10",
                     "budget.sweep_max_trials=null", "sweep.ray.num_cpus=2")
    cfg = load_config(overrides)
    temp = f"/tmp/hray-{hashlib.sha1(str(cfg['paths']['results']).encode()).hexdigest()[:8]}"
    driver = subprocess.Popen([sys.executable, "-m", "harness", "sweep", *overrides], cwd=PROJECT_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    db = Path(cfg["store"]["url"].replace("sqlite:///", ""))
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
        if db.exists() and ResultsStore(cfg["store"]["url"]).count(stage="lr") >= 1:
            break
    assert driver.poll() is None, "the sweep ended before it could be interrupted"
    assert _ray_processes(temp), "Ray should be running while trials run"
    os.killpg(driver.pid, signal.SIGINT)
    try:
        out, err = driver.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
        raise AssertionError("the sweep did not stop within 90 s of Ctrl-C")
    assert driver.returncode == 130, err[-2000:]
    assert "interrupted" in err
    assert ResultsStore(cfg["store"]["url"]).count(stage="reruns") == 0   # no later stage started
    interrupted = [r for r in ResultsStore(cfg["store"]["url"]).query() if r["status"] != "completed"]
    assert interrupted == [], "an interrupted trial must not be stored as failed (resume re-runs it)"
    for _ in range(20):                                                    # raylet may take a moment
        if not _ray_processes(temp):
            break
        time.sleep(0.5)
    assert _ray_processes(temp) == []


def test_dry_run_prints_the_plan_and_an_estimate_and_writes_nothing(tmp_path, capsys):
    results = tmp_path / "results"
    code = main(["sweep", "+method=[cwd,gskd]", "budget=paper", "student=pspnet_resnet18",
                 "teacher=deeplabv3_resnet101", "sweep.gpus_per_trial=0.5", "sweep.max_concurrent_trials=4",
                 f"paths.results={results}", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and not results.exists()
    assert "40000 iterations, batch 16, crop 512x512" in out
    # the runner's own expansion: one temperature sub-stage per method, each a 4-point grid
    assert "temperature[method.cwd.tau]" in out and "temperature[method.gskd.tau]" in out
    stage_lines = [l for l in out.splitlines() if l.startswith("  lr_wd") or l.startswith("  reruns")]
    assert len(stage_lines) == 4 and all(" 6  " in l or " 5  " in l for l in stage_lines if "student-only" not in l
                                         or "reruns" in l)
    # the student-only arm's lr_wd grows to the distilled arm's 21 trials (6 + 4 + 4 + 3 + 3 + 1)
    assert any("student-only" in l and " 21  " in l and "grows from the protocol's 6" in l for l in stage_lines)
    assert "tuning budget per arm" in out
    assert any(l.split()[:3] == ["distilled", "21", "trials,"] for l in out.splitlines())
    assert any(l.split()[:3] == ["student-only", "21", "trials,"] for l in out.splitlines())
    assert "4 concurrent trials x (1 CPU, 0.5 GPU)" in out
    assert "GPU-hours at 100 TFLOP/s" in out and "h wall with 2 GPUs busy" in out


def test_dry_run_estimate_scales_with_iterations(tmp_path):
    from harness.sweep.plan import estimate, plan

    cfg = load_config(["+method=kd", "sweep.gpus_per_trial=1", f"paths.results={tmp_path}"])
    longer = load_config(["+method=kd", "sweep.gpus_per_trial=1", "budget.iterations=1200", f"paths.results={tmp_path}"])
    a, b = estimate(cfg, plan(cfg)), estimate(longer, plan(longer))
    train = lambda e: e["total_flops"] - e["teacher_training_flops"]  # noqa: E731
    assert a["flops_per_iteration"]["distilled"] > a["flops_per_iteration"]["student-only"] > 0
    assert b["teacher_training_flops"] == a["teacher_training_flops"]
    assert train(b) > 1.9 * train(a) - 1e9   # twice the iterations, twice the training (evaluations aside)


def test_winners_come_from_the_stage_budget_only():
    """Rows beyond a stage's budget (e.g. left by a concurrent sweep sharing the student arm) cannot
    give one arm more trials: a TPE stage keeps its first `trials` rows, a grid its first row per point."""
    from harness.sweep.protocol import Stage
    from harness.sweep.runner import StageRun, pick_winner, within_budget

    def row(t, miou, **params):
        return {"created_at": f"2026-01-01T00:00:0{t}", "final_miou": miou, "status": "completed",
                "params_json": params}

    tpe = StageRun(arm="student-only", arm_id="a", stage=Stage("s", ["student-only"], "tpe", {"optim.lr": {}}, trials=2),
                   name="s", base={}, fixed={}, lineage={}, space={"optim.lr": {}}, points=[], trials=2)
    rows = [row(3, 0.9, **{"optim.lr": 0.3}), row(1, 0.5, **{"optim.lr": 0.1}), row(2, 0.6, **{"optim.lr": 0.2})]
    assert [r["final_miou"] for r in within_budget(rows, tpe)] == [0.5, 0.6]
    assert pick_winner(within_budget(rows, tpe), tpe).params == {"optim.lr": 0.2}
    grid = StageRun(arm="distilled", arm_id="b", stage=Stage("g", ["distilled"], "grid", {}), name="g", base={},
                    fixed={}, lineage={}, space={}, points=[{"method.kd.tau": 1.0}, {"method.kd.tau": 2.0}], trials=0)
    rows = [row(1, 0.4, **{"method.kd.tau": 1.0}), row(2, 0.7, **{"method.kd.tau": 2.0}),
            row(3, 0.9, **{"method.kd.tau": 2.0})]
    assert [r["final_miou"] for r in within_budget(rows, grid)] == [0.4, 0.7]
