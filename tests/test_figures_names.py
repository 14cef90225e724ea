"""Figures a paper could print: paper names from one mapping (harness.report.names), no best-so-far
line over independent rerun seeds, footers without absolute paths at a readable size."""
from pathlib import Path

import pytest

from harness.report import figures, names

EVIDENCE = Path(__file__).parents[1] / "evidence" / "runs.jsonl"


def test_names_mapping():
    assert names.model_name("pspnet_resnet18_small") == "PSPNet-R18 (¼ width)"
    assert names.model_name("deeplabv3_resnet18_small") == "DeepLabV3-R18 (½ width)"
    assert names.model_name("pspnet_resnet101") == "PSPNet-R101"
    assert names.model_name("deeplabv3_mobilenetv2") == "DeepLabV3-MobileNetV2"
    assert names.model_name("segformer_b1") == "SegFormer-B1"
    assert names.model_name("my_new_net") == "my_new_net"  # unknown: shown as it is
    assert [names.method_name(m) for m in ("kd", "cwd", "gskd", "cwd+gskd", "student-only")] == \
        ["KD", "CWD", "GSKD", "CWD+GSKD", "Student only"]
    assert names.param_name("method.cwd.tau") == "CWD temperature τ"
    assert names.stage_name("weights[method.gskd.weight]") == "GSKD loss weight"
    assert names.stage_name("lr_wd") == "learning rate × weight decay"


def test_history_series_of_reruns_has_no_best_so_far():
    rows = [{"final_miou": v, "status": "completed"} for v in (0.30, 0.34, 0.32)]
    search = figures.history_series(rows)
    assert search["best_so_far"] == pytest.approx([30, 34, 34]) and search["mean"] is None
    reruns = figures.history_series(rows, rerun=True)
    assert reruns["best_so_far"] is None
    assert reruns["mean"] == pytest.approx(32.0) and reruns["sd"] == pytest.approx(2.0)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """Every figure of the shipped evidence, captured before saving: {file name: (figure texts,
    the figure)}; the store is opened by its absolute path, which no footer may show."""
    from harness.report.blocks import load_blocks
    from harness.store import ResultsStore

    store = ResultsStore(str(EVIDENCE.resolve()), readonly=True)
    blocks = load_blocks(store)
    captured = {}
    real_save = figures.save

    def capture(fig, path, lines):
        out = real_save(fig, path, lines)
        texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
        captured[Path(path).name] = (texts, fig)
        return out

    import harness.report.tuning as tuning
    real_tsave = tuning._save
    mp = pytest.MonkeyPatch()
    mp.setattr(figures, "save", capture)
    mp.setattr(tuning, "_save", lambda fig, path, lines: (captured.__setitem__(
        Path(path).name, ([t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))], fig)),
        real_tsave(fig, path, lines))[1])
    out = tmp_path_factory.mktemp("figs")
    try:
        figures.optimisation_history(store, out)
        figures.seed_distributions(store, blocks, out)
        figures.pareto(store, blocks, out)
        figures.expected_best_figures(store, blocks, out)
    finally:
        mp.undo()
    return captured


def shipped_methods():
    """The distilled arms of the shipped evidence, as stored (`kd`, `cwd+gskd`, ...)."""
    import json

    return sorted({json.loads(line)["methods"] for line in EVIDENCE.read_text().splitlines()} - {None, ""})


def largest_history(drawn) -> str:
    """The optimisation-history figure of the distilled arm with the most methods (its name)."""
    names = [k for k in drawn if k.startswith("history_distilled-")]
    assert names, "no distilled history figure drawn"
    return max(names, key=lambda k: (k.count("-"), k))


def test_titles_and_legends_use_paper_names(drawn):
    for name in ("seeds_", "pareto_", "tuning_", largest_history(drawn)):
        texts, fig = next(v for k, v in drawn.items() if k.startswith(name))
        shown = "\n".join(texts)
        assert "PSPNet-R18 (¼ width)" in shown and "DeepLabV3-R18 (½ width)" in shown, name
        assert "pspnet_resnet18_small" not in shown and "deeplabv3_resnet18_small" not in shown, name
    # one figure per block: every shipped method is named in its block's seeds and Pareto figures
    seeds = "\n".join(t for k, v in drawn.items() if k.startswith("seeds_") for t in v[0])
    pareto = "\n".join(t for k, v in drawn.items() if k.startswith("pareto_") for t in v[0])
    methods = shipped_methods()
    assert methods
    for label in [names.method_name(m) for m in methods] + ["Student only"]:
        assert label in seeds and label in pareto, label


def test_no_point_labels_that_could_collide(drawn):
    from matplotlib.text import Annotation

    for prefix in ("seeds_", "pareto_"):
        _, fig = next(v for k, v in drawn.items() if k.startswith(prefix))
        assert not fig.findobj(Annotation), prefix
        assert fig.axes[0].get_legend() is not None


def test_rerun_panel_draws_no_best_so_far_line(drawn):
    _, fig = drawn[largest_history(drawn)]
    panels = {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.get_title()}
    rerun = panels["reruns (fresh seeds)"]
    assert not [l for l in rerun.get_lines() if l.get_drawstyle().startswith("steps")]
    assert [l for l in rerun.get_lines() if len(set(l.get_ydata())) == 1 and len(l.get_ydata()) == 2]  # the mean
    search = panels["learning rate × weight decay"]
    assert [l for l in search.get_lines() if l.get_drawstyle().startswith("steps")]


def test_footers_name_no_absolute_path_and_are_readable(drawn):
    root = str(Path(__file__).parents[1].resolve())
    for name, (texts, fig) in drawn.items():
        footer = [t for t in fig.texts if t.get_text().startswith("Source:")]
        assert footer, name
        assert root not in footer[0].get_text() and "evidence/runs.jsonl" in footer[0].get_text(), name
        assert footer[0].get_fontsize() >= 8, name
