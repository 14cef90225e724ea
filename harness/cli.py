"""`python -m harness <command> [hydra overrides]`.

The subcommand is taken off the argument list before Hydra sees the rest (Hydra's override parser
would reject it). Mistakes in the input (unknown command, unknown option of a config group,
misspelt key, wrong type, unusable checkpoint) print one paragraph naming the valid choices and
exit with code 2, without a traceback; bugs still show their traceback.
"""
from __future__ import annotations

import os
import shlex
import sys
from typing import Callable, Dict, List, Tuple

os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")

from harness.config import GROUPS, available_options, load_config, run_hash  # noqa: E402
from harness.errors import EXIT_USAGE, ConfigError, Terminated, UsageError  # noqa: E402


def cmd_train(overrides: List[str]) -> int:
    cfg = load_config(overrides)
    from harness.engine.record import open_store, store_record
    from harness.engine.teacher import teacher_for
    from harness.engine.train import run

    open_store(cfg)  # a database that cannot take the record is refused before any training
    command = _command_line()
    record = run(cfg, teacher=teacher_for(cfg, command), command=command).record
    print(format_result(record))  # first: a store that fails cannot take the result with it
    if store_record(cfg, record):
        from harness.store import shown_url

        print(f"  stored in   {shown_url(cfg['store']['url'])}  (config hash {record['config_hash']})")
    return 0 if record["status"] == "completed" else 1


def cmd_teacher(overrides: List[str]) -> int:
    cfg = load_config(overrides)
    from harness.engine.record import open_store
    from harness.engine.teacher import get_teacher
    from harness.engine.train import resolve_device

    open_store(cfg)  # the teacher's training run is stored: check the database first
    _, info = get_teacher(cfg, device=resolve_device(cfg["device"]), command=_command_line())
    print(f"teacher {cfg['teacher']['name']} on {cfg['dataset']['name']} (budget {cfg['budget']['name']})")
    print(f"  source      {info['source']}: {info['checkpoint']}")
    print(f"  sha256      {info['sha256']}")
    print(f"  val mIoU    {100 * info['val_miou']:.2f}  (re-measured by the harness's evaluator, "
          f"{info['val_images']} images)")
    print(_per_class_table(info["val_per_class_iou"]))
    return 0


def cmd_sweep(overrides: List[str]) -> int:
    dry_run = "--dry-run" in overrides
    cfg = load_config([o for o in overrides if o != "--dry-run"], check_data=not dry_run)
    if dry_run:
        from harness.sweep.plan import describe

        print(describe(cfg))
        return 0
    from harness.engine.teacher import check_teacher
    from harness.sweep.runner import SweepError, run_sweep

    check_teacher(cfg)  # a corrupt cached or given teacher: exit 2 before the sweep creates its database
    try:
        from harness.sweep.plan import planned_trials

        run_sweep(cfg, command=_command_line(), planned_trials=planned_trials(cfg))
    except SweepError as e:
        print(f"sweep stopped: {e}", file=sys.stderr)
        return 1
    if cfg["report"]["after_sweep"]:
        # the whole evidence, not just this sweep's block: keep only where things are and how
        # energy is counted, drop what selects the runs (method, dataset, models, budget)
        where = [o for o in overrides if o.lstrip("+").startswith(("paths.", "store.", "energy.", "report."))]
        print(f"\n[harness] regenerating the leaderboard and reports (report.after_sweep=false skips this)")
        report_all(*report_inputs(where))
    return 0


def cmd_config(overrides: List[str]) -> int:
    import yaml

    cfg = load_config(overrides)
    print(yaml.safe_dump(cfg, sort_keys=False).rstrip())
    print(f"# run hash: {run_hash(cfg)}")
    return 0


# -------------------------------------------------------------------------------------- reports
# A report command loads the config once, opens one results store and parses one Filters; the
# measure layer (harness.measure) runs what needs a model, and the report layer (harness.report,
# which only reads) gets config, store, filters, blocks and the measured values as plain data.
def report_inputs(overrides: List[str], database_optional: bool = False):
    """(config, results store opened read-only, filters) of a report command's overrides; with
    `database_optional` the store is None when the database does not exist yet."""
    from harness.report.filters import Filters
    from harness.store import ResultsStore, database_exists

    filters, rest = Filters.parse(overrides)
    cfg = load_config(rest)
    if database_optional and not database_exists(cfg["store"]["url"]):
        return cfg, None, filters
    return cfg, ResultsStore(cfg["store"]["url"], readonly=True), filters


def _blocks(store, filters, blocks=None):
    from harness.report.blocks import load_blocks

    return load_blocks(store, **filters.selection()) if blocks is None else blocks


def write_leaderboard(cfg, store, filters, blocks=None, quiet: bool = False):
    """The leaderboard; the latency is the stored one (<paths.cache>/efficiency/, measured once per
    model and device when missing; report.remeasure=true measures again; report.measure=false: none)."""
    from pathlib import Path

    from harness.measure.efficiency import for_blocks
    from harness.report import leaderboard

    blocks = _blocks(store, filters, blocks)
    rep = cfg["report"]
    latency = ("remeasure" if rep.get("remeasure") else "stored") if rep["measure"] else False
    efficiency = for_blocks(blocks, latency=latency, cache=Path(cfg["paths"]["cache"]) / "efficiency")
    return leaderboard.write(cfg, store, filters, blocks, efficiency=efficiency, quiet=quiet)


def write_significance(cfg, store, filters, blocks=None, quiet: bool = False):
    from harness.report import significance

    return significance.write(cfg, store, filters, _blocks(store, filters, blocks), quiet=quiet)


def write_literature(cfg, store, filters, blocks=None, quiet: bool = False):
    from harness.report import literature

    return literature.write(cfg, store, filters, quiet=quiet)  # our lifts come from every block, whatever the filters


def write_energy(cfg, store, filters, blocks=None, quiet: bool = False):
    from harness.measure.energy import inference_for_blocks
    from harness.report import energy

    blocks = _blocks(store, filters, blocks)
    return energy.write(cfg, store, blocks, inference_for_blocks(cfg, blocks), filters, quiet=quiet)


def write_figures(cfg, store, filters, blocks=None) -> None:
    from pathlib import Path

    from harness.measure.entropy import measure_entropy
    from harness.report import figures

    blocks = _blocks(store, filters, blocks)
    for path, text in figures.write_figures(store, cfg, blocks, measure_entropy(cfg, blocks), filters.selection()):
        print(f"  {path}: {text}" if path else f"  not drawn: {text}")
    print(f"  index: {Path(cfg['paths']['reports']) / 'figures.md'}")


def write_across(cfg, store, filters, blocks=None, quiet: bool = False):
    from harness.report import across

    return across.write(cfg, store, filters, _blocks(store, filters, blocks), quiet=quiet)


REPORT_PARTS = {"leaderboard": write_leaderboard, "significance": write_significance,
                "literature": write_literature, "energy": write_energy, "across": write_across}


def _written(paths) -> str:
    """The paths a report part returned (a path, or {ext: path}), relative to here where shorter."""
    from pathlib import Path

    items = list(paths.values()) if isinstance(paths, dict) else [paths] if paths else []
    out = []
    for p in items:
        try:
            out.append(str(Path(p).resolve().relative_to(Path.cwd())))
        except ValueError:
            out.append(str(p))
    return ", ".join(out)


def lift_summary(paths) -> List[str]:
    """One line per comparison of the leaderboard just written (its CSV): the distilled arm's lift over
    the tuned student with its 95% interval, Holm p and seeds (and the lift at equal compute, if any)."""
    import csv
    import math

    csv_path = paths.get("csv") if isinstance(paths, dict) else None
    if not csv_path or not os.path.exists(csv_path):
        return []

    def num(row, key):
        try:
            v = float(row.get(key) or "nan")
        except ValueError:
            return None
        return None if math.isnan(v) else v

    lines = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            lift = num(row, "lift_pct")
            if row.get("arm") == "student-only" or lift is None:
                continue
            lo, hi, p = num(row, "lift_ci_low_pct"), num(row, "lift_ci_high_pct"), num(row, "p_holm")
            ci = f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None and hi is not None else ""
            text = (f"  {row.get('methods') or row.get('arm')}: {row.get('student')} <- {row.get('teacher')} on "
                    f"{row.get('dataset')} ({row.get('budget')}): lift {lift:+.2f}{ci} mIoU points, "
                    f"p(Holm) {'n/a' if p is None else f'{p:.3g}'}, n={row.get('n')}")
            eq = num(row, "lift_equal_time_pct")
            if eq is not None:
                text += f"; at equal time {eq:+.2f}"
            if (row.get("tuning_budget") or "").startswith("unequal"):
                text += "; unequal tuning budget"
            lines.append(text)
    return lines


def report_all(cfg, store, filters) -> int:
    """Every table, then the figures (`report`, and the end of `sweep`): a part that fails is
    reported and the others still run (exit 1); a ConfigError stops everything (exit 2). Prints the
    paths it wrote and one line per comparison, not the tables (`python -m harness leaderboard`
    prints the leaderboard itself)."""
    import traceback

    try:
        blocks = _blocks(store, filters)  # read once, shared by every part
    except Exception:  # noqa: BLE001 - then each part reads on its own and reports its failure
        blocks = None
    status, summary = 0, []
    for name, part in REPORT_PARTS.items():
        try:
            paths = part(cfg, store, filters, blocks, quiet=True)
            print(f"[report] {name}: {_written(paths)}", flush=True)
            if name == "leaderboard":
                summary = lift_summary(paths)
        except ConfigError:
            raise
        except Exception:  # noqa: BLE001 - one broken part must not hide the others
            traceback.print_exc()
            print(f"[report] {name} failed (traceback above); going on with the rest", file=sys.stderr)
            status = 1
    print("[report] figures", flush=True)
    write_figures(cfg, store, filters, blocks)
    print("[report] lifts (distilled arm - tuned student-only arm, paired 95% CI):" if summary else
          "[report] no comparison with completed reruns yet")
    for line in summary:
        print(line)
    return status


def _report_command(part: Callable[..., None]) -> Callable[[List[str]], int]:
    """The command of one report part: config, store and filters from the overrides, exit 0."""
    def command(overrides: List[str]) -> int:
        part(*report_inputs(overrides))
        return 0

    command.__name__ = f"cmd_{part.__name__.replace('write_', '')}"
    return command


def cmd_literature(overrides: List[str]) -> int:  # the published numbers need no database
    write_literature(*report_inputs(overrides, database_optional=True))
    return 0


cmd_significance = _report_command(write_significance)
cmd_leaderboard = _report_command(write_leaderboard)
cmd_energy = _report_command(write_energy)
cmd_across = _report_command(write_across)


def cmd_report(overrides: List[str]) -> int:
    return report_all(*report_inputs(overrides))


def cmd_show(overrides: List[str]) -> int:
    from harness.measure.show import predict_grid
    from harness.report.figures import qualitative_grid

    cfg, store, filters = report_inputs(overrides)
    grid = predict_grid(cfg, store, filters)
    path = qualitative_grid(store.url, grid, cfg["paths"]["reports"])
    for note in grid.notes:
        print(f"note: {note}")
    print(f"written: {path}")
    return 0


def cmd_export(overrides: List[str]) -> int:
    """Every row of the store (read-only) as JSON Lines, to stdout or `out=PATH`; `redact=/a,/b`
    replaces those absolute directories by <redacted> (rows shipped without a machine's paths)."""
    from pathlib import Path

    from harness.store import ResultsStore, export_lines

    mine = {k: v for k, _, v in (o.partition("=") for o in overrides if o.startswith(("out=", "redact=")))}
    cfg = load_config([o for o in overrides if not o.startswith(("out=", "redact="))])
    store = ResultsStore(cfg["store"]["url"], readonly=True)
    text = "".join(line + "\n" for line in export_lines(store, [p for p in mine.get("redact", "").split(",") if p]))
    if not mine.get("out"):
        sys.stdout.write(text)
        return 0
    out = Path(mine["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)  # atomic: a reader never sees half a file
    print(f"written: {out} ({text.count(chr(10))} rows of {store.url})", file=sys.stderr)
    return 0


def cmd_reproduce(args: List[str]) -> int:
    from harness.reproduce import main as run

    return run(args)


COMMANDS: Dict[str, Tuple[Callable[[List[str]], int], str]] = {
    "sweep": (cmd_sweep, "the fair tuning protocol (sweeps/<protocol>.yaml) for the student-only and the "
                         "distilled arm on Ray Tune + Optuna; resumes where a killed sweep stopped; "
                         "--dry-run prints the plan and a GPU-hour estimate"),
    "train": (cmd_train, "one training run on the configured data (student-only, or distilled with "
                         "+method=NAME); prints mIoU and stores a record"),
    "teacher": (cmd_teacher, "train the configured teacher, or find it in the cache; prints its val mIoU"),
    "config": (cmd_config, "print the resolved configuration and its run hash, run nothing"),
    "energy": (cmd_energy, "reports/energy.md: training energy and CO2 per arm, inference per 10,000 images "
                           "(measured now), break-even images (paper 003 Table 8)"),
    "report": (cmd_report, "regenerate the leaderboard, significance, literature and energy reports and the "
                           "figures (optimisation history, response curves, seeds, Pareto, teacher entropy)"),
    "show": (cmd_show, "reports/show_*.png: input, ground truth, teacher, tuned student-only and distilled "
                       "predictions in the dataset's palette; filters dataset= student= teacher= +method="),
    "export": (cmd_export, "every row of the results database as JSON Lines (one row a line, oldest first, exact "
                           "floats), to stdout or out=PATH; read-only; redact=/abs/dir,... hides those directories; "
                           "store.url=<file>.jsonl reads such a file back (read-only)"),
    "reproduce": (cmd_reproduce, "reproduce <row-id | run-id> [--seed N]: re-run the configuration behind a leaderboard "
                                 "row or a stored run and compare with the stored value; a pruned or failed trial is "
                                 "replayed on its split to the iteration where it stopped"),
    "leaderboard": (cmd_leaderboard, "results/leaderboard.{md,csv,tex} from the rerun rows: mean +- std, paired lift with "
                                     "t interval, Holm-corrected p, effect size, P(improvement), detectable lift, energy, params/FLOPs/latency; filters "
                                     "dataset= student= teacher= budget= +method= test=t|permutation"),
    "significance": (cmd_significance, "reports/significance.{md,tex}: arm x arm paired lifts with t intervals, "
                                       "paired-t and permutation p-values Holm-adjusted in two fixed families "
                                       "(vs the tuned student = the leaderboard's numbers; between methods)"),
    "literature": (cmd_literature, "results/literature.md: published student-only and distilled mIoU (paper 003 "
                                   "Table 1, the seed papers' tables) next to our tuned lift and the lift inflation"),
    "across": (cmd_across, "reports/across.md: each method over blocks: gap closed (distilled - student) / (teacher "
                           "- student), its interquartile mean with a stratified bootstrap CI, Friedman + Nemenyi "
                           "critical difference and reports/cd_diagram.png (>= 3 blocks); filters as leaderboard"),
}


OWN_ARGUMENTS = ("reproduce",)  # commands that parse their own positional arguments and --options
FLAGS = {"sweep": ("--dry-run",)}  # the --options other commands accept besides Hydra overrides


def _on_sigterm(signum, frame):  # noqa: ARG001 - the signal handler's signature
    raise Terminated()


def main(argv: List[str] | None = None) -> int:
    import signal
    import threading

    argv = list(sys.argv[1:] if argv is None else argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: List[str]) -> int:
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(usage())
            return 0 if argv else EXIT_USAGE
        command, overrides = argv[0], argv[1:]
        if command not in COMMANDS:
            raise UsageError(f"unknown command '{command}'. Valid commands: {', '.join(COMMANDS)} "
                             f"(python -m harness --help describes each).")
        if any(a in ("-h", "--help") for a in overrides):
            print(command_help(command))
            return 0
        if command not in OWN_ARGUMENTS:
            hydra = _hydra_flags(command, overrides)
            if hydra is not None:
                return hydra
        flags = [a for a in overrides if a.startswith("-") and a not in FLAGS.get(command, ())]
        if flags and command not in OWN_ARGUMENTS:
            raise UsageError(f"unknown option {flags[0]}; '{command}' takes only Hydra overrides "
                             f"such as optim.lr=0.02, student=deeplabv3_mobilenetv2 or +method=kd")
        return COMMANDS[command][0](overrides)
    except (UsageError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Terminated:
        print("terminated (SIGTERM): stopped cleanly; run the same command again to resume", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _hydra_flags(command: str, overrides: List[str]):
    """Hydra's habits: ``--cfg job`` prints the composed config, ``--info`` the groups and options;
    ``-m``/``--multirun`` is refused with the command that tunes instead. None: no such flag."""
    if any(a in ("-m", "--multirun") for a in overrides):
        raise UsageError(f"'{command} -m/--multirun' is not supported: a product of values run as plain, untuned "
                         f"runs is not a fair comparison. To search values, put them in a protocol's space "
                         f"(sweeps/default.yaml) and run python -m harness sweep +method=NAME (both arms are "
                         f"tuned equally); to try a few fixed values, run '{command}' once per value.")
    if "--cfg" in overrides or any(a.startswith("--cfg=") for a in overrides):
        rest, what = [], "job"
        it = iter(overrides)
        for a in it:
            if a == "--cfg":
                what = next(it, "")
            elif a.startswith("--cfg="):
                what = a.split("=", 1)[1]
            elif a not in ("--resolve",):
                rest.append(a)
        if what not in ("job", "all"):
            raise UsageError(f"--cfg {what or '(nothing)'}: valid are --cfg job (the composed config, what "
                             f"'{command}' would use) and --cfg all (the same: the harness has no Hydra runtime "
                             f"config); nothing was run")
        if command in REPORT_COMMANDS:
            from harness.report.filters import Filters

            filters, rest = Filters.parse(rest)
            print(f"# filters: {filters.shown_all()}")
        return cmd_config([a for a in rest if a != "--dry-run"])
    if "--info" in overrides:
        from harness.config import CONF_DIR

        print(f"config directory: {CONF_DIR}  (config.yaml + one folder per group)")
        print("config groups and their options:")
        for group in (*GROUPS, "recipe"):
            prefix = "+" if group == "method" else ""
            print(f"  {prefix}{group}: {', '.join(available_options(group))}")
        print("protocols (sweep.protocol=NAME): " + ", ".join(sorted(p.stem for p in (CONF_DIR.parent / "sweeps").glob("*.yaml"))))
        return 0
    return None


REPORT_COMMANDS = ("leaderboard", "significance", "energy", "report", "literature", "show", "across", "export")

COMMAND_EXAMPLES: Dict[str, Tuple[List[str], str]] = {
    # command -> (examples, the config keys it reads besides the model/data groups)
    "sweep": (["python -m harness sweep +method=gskd", "python -m harness sweep +method=[kd,cwd] budget=smoke",
               "python -m harness sweep +method=kd --dry-run"],
              "sweep.* (protocol, max_concurrent_trials, cpus_per_trial, ray.address), budget.*, store.url, "
              "energy.*, report.after_sweep"),
    "train": (["python -m harness train budget=smoke", "python -m harness train +method=kd method.kd.tau=4 optim.lr=0.02 seed=3"],
              "optim.*, seed, budget.*, method.<name>.*, store.url, energy.*, progress"),
    "teacher": (["python -m harness teacher", "python -m harness teacher teacher.checkpoint=/path/teacher.pt"],
                "teacher.*, budget.teacher_iterations, paths.cache, store.url"),
    "leaderboard": (["python -m harness leaderboard", "python -m harness leaderboard +method=cwd test=permutation",
                     "python -m harness leaderboard store.url=evidence/runs.jsonl"],
                    "store.url, paths.results, report.min_seeds, report.measure; filters dataset= student= teacher= "
                    "budget= +method= test=t|permutation"),
    "significance": (["python -m harness significance", "python -m harness significance store.url=evidence/runs.jsonl"],
                     "store.url, paths.reports, report.min_seeds; filters as leaderboard"),
    "report": (["python -m harness report", "python -m harness report store.url=evidence/runs.jsonl report.measure=false"],
               "store.url, paths.results, paths.reports, report.*; filters as leaderboard"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m harness <command> [overrides ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "overrides: group=option (dataset, student, teacher, optim, budget, recipe), +method=NAME or "
              "+method=[a,b], key=value (optim.lr=0.02 seed=3 method.kd.tau=4)",
              "python -m harness <command> --help lists the options of every group."]
    return "\n".join(lines)


def command_help(command: str) -> str:
    lines = [f"usage: python -m harness {command} [overrides ...]", "", COMMANDS[command][1], "",
             "config groups and their options:"]
    for group in (*GROUPS, "recipe"):
        prefix = "+" if group == "method" else ""
        lines.append(f"  {prefix}{group}={{{','.join(available_options(group))}}}")
    examples, keys = COMMAND_EXAMPLES.get(command, ([f"python -m harness {command}"], "store.url, paths.*"))
    flags = FLAGS.get(command, ())
    lines += ["", f"keys it reads: {keys}"]
    if flags:
        lines.append(f"options: {', '.join(flags)}")
    lines += ["Hydra habits: --cfg job prints the composed config; --info lists groups and options; "
              "-m/--multirun is refused (sweep tunes instead)", "", "examples:"] + [f"  {e}" for e in examples]
    return "\n".join(lines)


def format_result(record) -> str:
    pct = lambda v: "  n/a" if v is None else f"{100 * v:5.2f}"  # noqa: E731
    head = (f"{record['arm']} run {record['run_id'][:8]}  {record['student']}"
            + (f" <- {record['teacher']} [{record['methods']}]" if record["teacher"] else "")
            + f"  {record['dataset']}/{record['split']}  seed {record['seed']}")
    lines = [head]
    if record["status"] != "completed":
        lines.append(f"  status      {record['status']}: {record['failure_reason']}")
    lines += [f"  mIoU        {pct(record['final_miou'])}  (best {pct(record['best_miou'])} at iteration "
              f"{record['best_iteration']})",
              f"  pixel acc   {pct(record['pixel_accuracy'])}",
              f"  iterations  {record['iterations']}  in {record['train_time_s']:.1f} s "
              f"(wall {record['wall_time_s']:.1f} s)"]
    if record["energy_kwh"] is not None:
        lines.append(f"  energy      {record['energy_kwh'] * 1000:.3f} Wh, {record['co2_kg'] * 1000:.3f} g CO2 "
                     f"at {record['carbon_intensity_g_per_kwh']:.0f} g/kWh")
    if record["per_class_iou_json"]:
        lines.append(_per_class_table(record["per_class_iou_json"]))
    return "\n".join(lines)


def _per_class_table(per_class: dict) -> str:
    width = max(map(len, per_class))
    rows = [f"    {name:<{width}}  {'  n/a' if v is None else f'{100 * v:5.2f}'}" for name, v in per_class.items()]
    return "  per-class IoU\n" + "\n".join(rows)


def _command_line() -> str:
    return "python -m harness " + " ".join(shlex.quote(a) for a in sys.argv[1:])
