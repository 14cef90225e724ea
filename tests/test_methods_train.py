"""Every registered method trains at its DEFAULTS (its yaml, the protocol's default lr 0.01) through
the one training path, `harness.engine.train.run`, without diverging and with the student learning.

For each method of the `harness.methods` registry (single method, nothing switched on or off): a
tiny smoke run (the `tiny` overrides: 32x32 crops, small heads, a shared briefly trained teacher)
of ITERATIONS iterations, asserting
* the run completed (a non-finite total loss ends it as failed),
* every loss term is finite at every logged step (the loop logs every 10 iterations and at each
  evaluation; the hook is injected here because `run` only logs to TensorBoard),
* the final val mIoU is above the untrained student's: the student `run` built (same seed, same
  data order) is copied before its first step and measured with the run's evaluator.
BRD at its defaults diverged here before its fused maps were normalised (brd.py, "Fusion").
"""
import copy
import math

import pytest
import torch

import harness.methods
from harness.config import load_config
from harness.engine import train
from harness.engine.teacher import teacher_for

ITERATIONS = 20
METHODS = sorted(harness.methods.METHODS)


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_method_trains_at_its_defaults_above_the_untrained_student(name, tiny, monkeypatch):
    cfg = load_config(tiny(f"+method={name}", f"budget.iterations={ITERATIONS}",
                           f"budget.eval_interval={ITERATIONS}", "budget.teacher_iterations=8",
                           "checkpoint.final=false"))
    teacher = teacher_for(cfg)  # before the hooks below: a teacher trained here is no student
    untrained = {}
    build = train.build_segmenter

    def capture(*args, **kwargs):
        model = build(*args, **kwargs)
        untrained["model"] = copy.deepcopy(model)
        return model

    logged = []
    fit = train.fit

    def fit_with_log(*args, **kwargs):
        inner = kwargs.get("log")

        def log(step, terms, scalars):
            logged.append((step, dict(terms)))
            if inner is not None:
                inner(step, terms, scalars)
        kwargs["log"] = log
        return fit(*args, **kwargs)

    monkeypatch.setattr(train, "build_segmenter", capture)
    monkeypatch.setattr(train, "fit", fit_with_log)
    record = train.run(cfg, teacher=teacher).record

    assert record["status"] == "completed", f"{name}: {record['failure_reason']}"
    assert record["iterations"] == ITERATIONS
    assert logged and logged[-1][0] == ITERATIONS
    for step, terms in logged:
        assert any(k.startswith(f"{name}.") for k in terms), f"{name}: no term of the method logged at {step}"
        bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
        assert not bad, f"{name}: non-finite loss terms at iteration {step}: {bad}"
    before = train.evaluate_model(cfg, untrained["model"].eval())["miou"]
    after = record["final_miou"]
    assert after > before, f"{name}: final mIoU {after:.4f} not above the untrained student's {before:.4f}"
