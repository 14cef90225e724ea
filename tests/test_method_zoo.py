"""Every method and every composition of the papers' tables, on real (small) models.

For each combination: two training steps the way the train loop does them (student and teacher
forward, the methods' weighted terms summed, backward, the shared optimiser's step, the methods'
`extra_step`), asserting that
* every term is finite,
* the distillation terms ALONE send a non-zero gradient into the student (GSKD's released code did
  not: spec 10.3),
* every trainable parameter of every method gets a non-zero gradient (the shared ones from the
  terms, the ones with their own optimiser, e.g. SKD's discriminator, in `extra_step`, checked by
  their values changing),
and, end to end through `harness train` on the smoke budget, that each composition runs.
"""
import math

import pytest
import torch

from harness.cli import main
from harness.config import load_config
from harness.engine.loop import task_terms
from harness.methods import METHODS, Batch, MethodContext, Progress, build_methods
from harness.models import build_segmenter

torch.set_num_threads(1)

SINGLE = sorted(METHODS)
# the compositions of the papers' tables: SKD / IFVD / CIRKD / HeteroAKD with pixel KD (their
# papers' totals), GSKD standalone (with kd) and as a plug-in to every host method (paper 000, Eq. 9)
COMPOSITIONS = [
    ["kd", "skd"], ["kd", "ifvd"], ["kd", "skd", "ifvd"], ["kd", "cirkd"], ["kd", "heteroakd"],
    ["kd", "gskd"], ["skd", "gskd"], ["cwd", "gskd"], ["cirkd", "gskd"], ["dist", "gskd"], ["afdcd", "gskd"],
    ["kd", "afdcd"], ["kd", "skd", "gskd"], ["kd", "cirkd", "gskd"], ["kd", "afdcd", "gskd"],
]
COMBOS = [[m] for m in SINGLE] + [c for c in COMPOSITIONS if all(m in METHODS for m in c)]


def models(student_preset="pspnet_resnet18_small", teacher_preset="deeplabv3_resnet18_small", k=5):
    cfg = load_config([f"student={student_preset}", f"teacher={teacher_preset}", "student.head_channels=16",
                       "teacher.head_channels=24"])
    torch.manual_seed(0)
    student = build_segmenter(cfg["student"], k).train()
    teacher = build_segmenter(cfg["teacher"], k).eval()
    return cfg, student, teacher


def method_config(names):
    cfg = load_config([f"+method=[{','.join(names)}]"])["method"]
    for name, params in cfg.items():          # switch on every optional term at a moderate weight
        for key in params:
            if (key == "weight" or key.endswith("_weight")) and params[key] == 0:
                params[key] = 1.0
    return cfg


def train_steps(names, student_preset="pspnet_resnet18_small", teacher_preset="deeplabv3_resnet18_small",
                steps=2, k=5):
    cfg, student, teacher = models(student_preset, teacher_preset, k)
    ctx = MethodContext(num_classes=k, ignore_index=255, student_channels=student.feature_channels,
                        student_strides=student.feature_strides, teacher_channels=teacher.feature_channels,
                        teacher_strides=teacher.feature_strides, generator=torch.Generator().manual_seed(3))
    methods = build_methods(method_config(names), ctx)
    own = {id(p) for m in methods if m.own_optimizer() is not None for p in m.parameters()}
    shared = [p for m in methods for p in m.parameters() if id(p) not in own]
    optimizer = torch.optim.SGD(list(student.parameters()) + shared, lr=1e-3, momentum=0.9)
    before_own = {id(p): p.detach().clone() for m in methods for p in m.parameters() if id(p) in own}
    g = torch.Generator().manual_seed(0)
    report = {"terms": {}, "student_grad_from_kd": 0.0, "dead": []}
    for step in range(steps):
        image = torch.randn(2, 3, 65, 63, generator=g)
        mask = torch.randint(0, k, (2, 65, 63), generator=g)
        mask[:, :3] = 255                               # ignore pixels
        mask[0, 30, 30] = k - 1                          # (also) a single-pixel class somewhere
        batch = Batch(image, mask)
        progress = Progress(60 + step, 100)              # past every warm-up
        s_out = student(image)
        with torch.no_grad():
            t_out = teacher(image)
        distill = {}
        for m in methods:
            weights = m.weights()
            for term, value in m.terms(s_out, t_out, batch, progress).items():
                distill[f"{m.name}.{term}"] = weights[term] * value
        for name, value in distill.items():
            assert torch.isfinite(value).all(), f"{names}: term {name} = {value}"
            report["terms"][name] = float(value.detach())
        if step == 0:   # the distillation terms alone must reach the student
            student.zero_grad(set_to_none=True)
            sum(distill.values()).backward(retain_graph=True)
            report["student_grad_from_kd"] = sum(float(p.grad.abs().sum()) for p in student.parameters()
                                                 if p.grad is not None)
        loss = sum(task_terms(s_out, mask, 255, cfg["student"]).values()) + sum(distill.values())
        optimizer.zero_grad(set_to_none=True)
        for m in methods:
            m.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            for m in methods:
                for pname, p in m.named_parameters():
                    if id(p) not in own and (p.grad is None or float(p.grad.abs().sum()) == 0.0):
                        report["dead"].append(f"{m.name}.{pname}")
        optimizer.step()
        for m in methods:
            m.extra_step(s_out, t_out, batch, progress)
    # biases that shift every discriminator output by one constant cancel in its loss (exactly in
    # WGAN, in hinge while all outputs lie inside the margins): zero gradient, as in the reference
    cancelling = ("discriminator.last.bias", "discriminator.attn2.value.bias")
    report["own_unchanged"] = [f"{m.name}.{n}" for m in methods for n, p in m.named_parameters()
                               if id(p) in own and torch.equal(p.detach(), before_own[id(p)])
                               and n not in cancelling]
    report["own"] = len(own)
    return report


@pytest.mark.parametrize("names", COMBOS, ids=["+".join(c) for c in COMBOS])
def test_every_method_and_composition_trains_every_module(names):
    report = train_steps(names)
    assert report["terms"], f"{names} returned no terms"
    assert report["student_grad_from_kd"] > 0, f"{names}: no gradient reaches the student from the distillation terms"
    assert report["dead"] == [], f"{names}: method parameters without gradient: {report['dead'][:5]}"
    assert report["own_unchanged"] == [], f"{names}: own-optimiser parameters did not step: {report['own_unchanged'][:5]}"
    if "skd" in names:
        assert report["own"] > 0, "SKD's discriminator has its own optimiser"


def test_heterogeneous_pairs_with_a_transformer():
    """CNN -> SegFormer and SegFormer -> CNN, with every method whose terms make sense across
    architectures (the others adapt by resizing / projecting)."""
    for names in [[m] for m in SINGLE] + [["kd", "heteroakd"], ["cwd", "gskd"]]:
        if not all(m in METHODS for m in names):
            continue
        for student, teacher in (("segformer_b0_small", "deeplabv3_resnet18_small"),
                                 ("pspnet_resnet18_small", "segformer_b1_small")):
            report = train_steps(names, student, teacher, steps=1)
            assert report["student_grad_from_kd"] > 0 and report["dead"] == [], (names, student, teacher, report["dead"])


@pytest.mark.slow
@pytest.mark.parametrize("names", [["kd", "skd"], ["cwd", "gskd"], ["kd", "cirkd"]])
def test_compositions_run_through_harness_train(names, tiny, capsys):
    code = main(["train", *tiny(f"+method=[{','.join(names)}]")])
    out = capsys.readouterr().out
    assert code == 0 and "mIoU" in out
    db = load_config(tiny())["store"]["url"]
    from harness.store import ResultsStore

    row = ResultsStore(db).query()[-1]
    assert row["status"] == "completed" and row["methods"] == ",".join(sorted(names))
    assert all(math.isfinite(v) for v in row["extra_json"]["last_loss_terms"].values())
    assert {n.split(".")[0] for n in row["extra_json"]["last_loss_terms"]} >= set(names)
