"""The report commands write exactly the golden outputs, and the report layer reads only.

The golden files in tests/data/reports_golden/ were written from the same deterministic database
built here, first by the code before the report/measure split (7f84c7c), then once more on purpose
when the tables changed what they say (see tests/golden_reports.py); they are compared after masking
only what differs between two runs (the Generated line and code commit, the temporary directory;
the latency and inference energy, measured live by the commands, are switched off and faked in
both). A change in any table's text fails here until the goldens are rewritten deliberately."""
import subprocess
import sys
from pathlib import Path

import pytest

import golden_reports as golden

GOLDEN = Path(__file__).parent / "data" / "reports_golden"


def test_report_commands_write_what_the_old_tables_wrote(tmp_path, monkeypatch):
    from harness.cli import main
    from harness.measure import efficiency as measure_efficiency
    from harness.measure import energy as measure_energy

    monkeypatch.setattr(measure_energy, "measure_inference", golden.fake_inference)
    monkeypatch.setattr(measure_efficiency, "measure_from_row", golden.without_latency(measure_efficiency.measure_from_row))
    golden.build_db(tmp_path)
    produced = golden.run_commands(tmp_path, main)
    names = sorted(p.name for p in GOLDEN.iterdir())
    assert sorted(produced) == names
    for name in names:
        assert produced[name] == (GOLDEN / name).read_text(), name


REPORT_MODULES = ("blocks", "filters", "render", "verdicts", "leaderboard", "significance", "energy", "literature", "figures", "names",
                  "tuning", "across")
FORBIDDEN = ("torch", "harness.engine", "harness.models", "harness.data", "harness.methods", "harness.measure",
             "harness.cli")


def test_the_report_layer_imports_no_model_code():
    code = ("import sys\n"
            + "".join(f"import harness.report.{m}\n" for m in REPORT_MODULES)
            + "import harness.report\n"
            + f"bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {FORBIDDEN!r}))\n"
            + "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the report layer imported {out.stdout.strip()}"
    pkg = Path(__file__).parents[1] / "harness" / "report"
    assert {p.stem for p in pkg.glob("*.py")} == {"__init__", *REPORT_MODULES}


@pytest.mark.parametrize("module", ["harness.report", "harness.measure.efficiency, harness.measure.energy, "
                                   "harness.measure.entropy, harness.measure.show", "harness.reproduce", "harness.store",
                                   "harness.sweep.protocol"])
def test_nothing_below_the_cli_imports_it(module):
    code = f"import sys, {module}\nprint('harness.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "False", out.stderr
