"""The shipped evidence (evidence/) is recomputed from the repository: every table from the text
database evidence/runs.jsonl, by the one command evidence/README.md gives, byte for byte apart from
the line that says when and at which commit it was generated.

The regeneration runs with report.measure=false: latency, inference energy and the teacher's entropy
are measured live by the commands (harness/measure/) and would differ from machine to machine, so
the shipped tables do not contain them (they say "not measured"); params and FLOPs are counted from
the model's config and are the same everywhere.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EVIDENCE = ROOT / "evidence"
RUNS = "evidence/runs.jsonl"
# the maintainers' regeneration step, word for word in evidence/README.md (the only command that
# writes into evidence/); the test runs the same with the two output folders in a tmp dir
OUTPUTS = {"results": "evidence/results", "reports": "evidence/reports"}
SETTINGS = [f"store.url={RUNS}", "report.measure=false", "progress=false"]
REGENERATE = ("python -m harness report " + " ".join([SETTINGS[0]] + [f"paths.{k}={v}" for k, v in OUTPUTS.items()]
                                                      + SETTINGS[1:]))
GENERATED = re.compile(r"Generated: [^\n]*by git commit [^\n]*")
ABSOLUTE = ("/work/", "/tmp/", "/home/", "C:\\")


def masked(path: Path) -> str:
    """The file's text without the generation line(s) (time and code commit); in the CSV the same
    information is a column, generated_by_commit, masked the same way."""
    text = GENERATED.sub("Generated: <masked>", path.read_text())
    if path.suffix == ".csv":
        lines = text.splitlines(keepends=True)
        col = lines[0].rstrip("\n").split(",").index("generated_by_commit")
        # the commit is the last column and never quoted: cut it off each data row
        assert col == len(lines[0].rstrip("\n").split(",")) - 1
        text = lines[0] + "".join(line.rsplit(",", 1)[0] + ",<masked>\n" for line in lines[1:])
    return text


def shipped(folder: str):
    return sorted(p.relative_to(EVIDENCE / folder) for p in (EVIDENCE / folder).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("evidence")
    args = ["report", SETTINGS[0], *[f"paths.{k}={out / k}" for k in OUTPUTS], *SETTINGS[1:]]
    proc = subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_the_readme_gives_the_regeneration_command():
    readme = (EVIDENCE / "README.md").read_text()
    assert REGENERATE in readme
    assert f"rm -rf {OUTPUTS['results']} {OUTPUTS['reports']}" in readme


@pytest.mark.parametrize("folder", sorted(OUTPUTS))
def test_every_shipped_table_regenerates_from_runs_jsonl(regenerated, folder):
    produced = sorted(p.relative_to(regenerated / folder) for p in (regenerated / folder).rglob("*") if p.is_file())
    assert produced == shipped(folder), f"rerun `rm -rf ...; {REGENERATE}` (evidence/README.md)"
    for rel in produced:
        new, old = regenerated / folder / rel, EVIDENCE / folder / rel
        if rel.suffix == ".png":  # drawn by matplotlib: checked to be there, not byte for byte
            assert new.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and new.stat().st_size > 1000, rel
            continue
        assert masked(new) == masked(old), f"{folder}/{rel} differs: rerun {REGENERATE} (evidence/README.md)"


def png_text(data: bytes) -> bytes:
    """The text chunks of a PNG (its metadata; the pixels are compressed bytes that can hold any
    sequence by chance)."""
    import struct
    import zlib

    out, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt" or kind == b"iTXt":
            out.append(body)
        elif kind == b"zTXt":
            out.append(zlib.decompress(body.split(b"\0", 1)[1][1:]))
        pos += 12 + length
    return b"\n".join(out)


def test_no_absolute_path_of_any_machine_in_evidence():
    for path in sorted(p for p in EVIDENCE.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix == ".png":
            data = png_text(data)
        for marker in ABSOLUTE:
            assert marker.encode() not in data, f"{path.relative_to(ROOT)} contains {marker}"


def test_runs_jsonl_round_trips_byte_for_byte(tmp_path):
    from harness.cli import main

    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main(["export", f"store.url={EVIDENCE / 'runs.jsonl'}", f"out={first}"]) == 0
    assert first.read_bytes() == (EVIDENCE / "runs.jsonl").read_bytes()
    assert main(["export", f"store.url={first}", f"out={second}"]) == 0
    assert second.read_bytes() == first.read_bytes()


def shipped_rows() -> int:
    """The number of rows evidence/README.md says runs.jsonl holds (the test keeps the two in step)."""
    import re

    found = re.findall(r"^(\d+) rows, all `dataset=", (EVIDENCE / "README.md").read_text(), re.M)
    assert len(found) == 1, "evidence/README.md must state the row count once: '<N> rows, all `dataset=...'"
    return int(found[0])


def test_runs_jsonl_is_one_row_per_line_in_column_order():
    from harness.store import COLUMNS

    lines = (EVIDENCE / "runs.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == shipped_rows() and len({r["run_id"] for r in rows}) == len(rows)
    assert all(list(r) == list(COLUMNS) for r in rows)
    assert [(r["created_at"], r["run_id"]) for r in rows] == sorted((r["created_at"], r["run_id"]) for r in rows)


@pytest.mark.parametrize("command", ["leaderboard", "report", "significance", "energy"])
@pytest.mark.parametrize("missing", ["typo.db", "typo.jsonl"])
def test_a_read_command_on_a_missing_database_exits_2_and_writes_nothing(tmp_path, capsys, command, missing):
    from harness.cli import main

    rc = main([command, f"store.url={tmp_path / missing}", f"paths.results={tmp_path / 'results'}",
               f"paths.reports={tmp_path / 'reports'}", f"paths.cache={tmp_path / 'cache'}", "progress=false"])
    assert rc == 2
    assert "no results" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == []


def test_a_jsonl_store_is_read_only_and_names_the_file(tmp_path, capsys):
    from harness.cli import main
    from harness.store import ResultsStore, StoreError

    store = ResultsStore(RUNS if (Path.cwd() / RUNS).is_file() else EVIDENCE / "runs.jsonl", readonly=True)
    assert store.count() == shipped_rows() and store.count(stage="reruns", status="completed") > 0
    with pytest.raises(StoreError, match="runs.jsonl"):
        store.append({"run_id": "x"})
    with pytest.raises(StoreError, match="runs.jsonl"):
        store.update(store.query()[0]["run_id"], status="failed")
    with pytest.raises(StoreError, match="runs.jsonl"):
        ResultsStore(EVIDENCE / "runs.jsonl")  # a writer (train, teacher, sweep) is refused at once
    rc = main(["train", f"store.url={EVIDENCE / 'runs.jsonl'}", "budget=smoke", f"paths.results={tmp_path}/r",
               f"paths.cache={tmp_path}/c", "progress=false"])
    assert rc == 2 and "runs.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("line, why", [('{"run_id": "a", ', "not JSON"), ('[1, 2]', "JSON object"),
                                       ('{"run_id": "a", "colour": 1}', "unknown column"),
                                       ('{"run_id": "a", "seed": "one"}', "seed"),
                                       ('{"created_at": "x"}', "run_id")])
def test_a_malformed_line_names_file_and_line(tmp_path, line, why):
    from harness.store import ResultsStore, StoreError

    path = tmp_path / "bad.jsonl"
    good = (EVIDENCE / "runs.jsonl").read_text().splitlines()[:2]
    path.write_text("\n".join([*good, line]) + "\n")
    with pytest.raises(StoreError) as err:
        ResultsStore(path, readonly=True)
    assert "bad.jsonl line 3" in str(err.value) and why in str(err.value)


def test_a_duplicate_run_id_names_both_lines(tmp_path):
    from harness.store import ResultsStore, StoreError

    path = tmp_path / "dup.jsonl"
    first = (EVIDENCE / "runs.jsonl").read_text().splitlines()[0]
    path.write_text(f"{first}\n\n{first}\n")
    with pytest.raises(StoreError, match=r"dup.jsonl line 3 .*already on line 1"):
        ResultsStore(path, readonly=True)


def test_export_of_a_database_is_exact_and_adds_no_path(tmp_path):
    import sqlalchemy as sa

    from harness.cli import main
    from harness.store import ResultsStore, runs_table

    db = ResultsStore(tmp_path / "h.db")
    db.append({"run_id": "r1", "created_at": "2026-01-01T00:00:00+00:00", "arm": "student-only", "seed": 1,
               "final_miou": 0.1 + 0.2, "wall_time_s": 1e-300, "params_json": {"b": 1, "a": [0.1, None]},
               "methods": "kd,cwd", "command": "x"})
    db.append({"run_id": "r0", "created_at": "2026-01-01T00:00:00+00:00", "extra_json": '"text"'})  # a JSON string
    out = tmp_path / "out" / "x.jsonl"
    assert main(["export", f"store.url={tmp_path / 'h.db'}", f"out={out}"]) == 0
    text = out.read_text()
    assert str(tmp_path) not in text and [json.loads(x)["run_id"] for x in text.splitlines()] == ["r0", "r1"]
    loaded = ResultsStore(out, readonly=True)
    with db._read() as a, loaded._read() as b:
        q = sa.select(runs_table).order_by(runs_table.c.run_id)
        assert [tuple(r) for r in a.execute(q)] == [tuple(r) for r in b.execute(q)]
    assert loaded.get("r1")["final_miou"] == 0.1 + 0.2
