import multiprocessing as mp
import os
import sqlite3

import numpy as np
import pytest

from harness.store import COLUMNS, JSON_COLUMNS, ResultsStore


def full_record(**over):
    rec = {
        "run_id": "run-full-1",
        "created_at": "2026-01-01T00:00:00+00:00",
        "command": "python -m harness.run arm=distilled",
        "config_json": {"b": 2, "a": {"nested": [1, 2, 3]}},
        "config_hash": "abc123",
        "arm": "distilled",
        "methods": ["kd", "at"],
        "dataset": "synthetic",
        "student": "tiny_unet",
        "teacher": "deeplab",
        "seed": 3,
        "split": "val",
        "status": "completed",
        "failure_reason": None,
        "sweep_id": "sweep-1",
        "stage": "refine",
        "trial_id": "t7",
        "params_json": {"lr": 0.01, "temperature": 4.0},
        "final_miou": 0.5,
        "best_miou": 0.55,
        "best_iteration": 200,
        "pixel_accuracy": 0.9,
        "per_class_iou_json": [0.1, 0.2, None],
        "history_json": [{"iteration": 100, "miou": 0.4, "loss": 1.5}, {"iteration": 200, "miou": 0.55, "loss": 1.1}],
        "iterations": 300,
        "wall_time_s": 12.5,
        "train_time_s": 10.0,
        "energy_kwh": 1e-4,
        "co2_kg": 3.8e-5,
        "carbon_intensity_g_per_kwh": 380.95,
        "energy_json": {"tracker": "codecarbon-offline", "cpu_kwh": 5e-5},
        "git_commit": "deadbeef",
        "versions_json": {"torch": "2.x", "python": "3.11"},
        "host": "node1",
        "extra_json": {"note": "x"},
    }
    rec.update(over)
    return rec


def test_columns_complete():
    rec = full_record()
    assert set(rec) == set(COLUMNS)
    assert len(COLUMNS) == len(set(COLUMNS))
    assert set(JSON_COLUMNS) == {c for c in COLUMNS if c.endswith("_json")}


def test_roundtrip_every_column(tmp_path):
    store = ResultsStore(f"sqlite:///{tmp_path}/r.db")
    rec = full_record()
    rid = store.append(rec)
    assert rid == "run-full-1"
    got = store.get(rid)
    assert set(got) == set(COLUMNS)
    for k, v in rec.items():
        if k == "methods":
            assert got[k] == "at,kd"  # comma-joined, sorted
        else:
            assert got[k] == v, k
    assert isinstance(got["seed"], int) and isinstance(got["final_miou"], float)
    assert store.get("nope") is None
    # JSON stored canonically (sorted keys)
    con = sqlite3.connect(tmp_path / "r.db")
    raw = con.execute("select config_json from runs").fetchone()[0]
    con.close()
    assert raw == '{"a": {"nested": [1, 2, 3]}, "b": 2}'


def test_defaults_and_generated_ids(tmp_path):
    store = ResultsStore(str(tmp_path / "d.db"))
    rid = store.append({"arm": "teacher", "methods": ""})
    assert len(rid) == 32 and int(rid, 16) >= 0
    got = store.get(rid)
    assert got["status"] == "completed"
    assert got["created_at"].endswith("+00:00")
    assert got["methods"] == ""
    assert got["config_json"] is None and got["final_miou"] is None
    rid2 = store.append({"arm": "teacher"})
    assert rid2 != rid
    rid3 = store.append({"methods": "kd, at", "trial_id": 7, "final_miou": np.float32(0.25), "seed": np.int64(4)})
    got3 = store.get(rid3)
    assert got3["methods"] == "at,kd" and got3["trial_id"] == "7"
    assert got3["final_miou"] == 0.25 and got3["seed"] == 4


def test_schema_compiles_for_postgres():
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateIndex, CreateTable

    from harness.store import runs_table

    ddl = str(CreateTable(runs_table).compile(dialect=postgresql.dialect()))
    assert "run_id VARCHAR(255) NOT NULL" in ddl and "PRIMARY KEY (run_id)" in ddl
    for idx in runs_table.indexes:
        str(CreateIndex(idx).compile(dialect=postgresql.dialect()))


def test_query_update_dataframe(tmp_path):
    store = ResultsStore(str(tmp_path / "q.db"))
    for i, (arm, ds) in enumerate(
        [("distilled", "synthetic"), ("distilled", "other"), ("student-only", "synthetic"), ("distilled", "synthetic")]
    ):
        store.append({"run_id": f"r{i}", "arm": arm, "dataset": ds, "seed": i, "final_miou": i / 10})
    rows = store.query(arm="distilled", dataset="synthetic")
    assert [r["run_id"] for r in rows] == ["r0", "r3"]
    assert len(store.query()) == 4
    assert {r["run_id"] for r in store.query(seed=[1, 2])} == {"r1", "r2"}
    assert store.query(sweep_id=None, arm="student-only")[0]["run_id"] == "r2"

    store.update("r1", status="failed", failure_reason="OOM", extra_json={"k": 1})
    got = store.get("r1")
    assert got["status"] == "failed" and got["failure_reason"] == "OOM" and got["extra_json"] == {"k": 1}
    assert [r["run_id"] for r in store.query(status="failed")] == ["r1"]
    with pytest.raises(KeyError):
        store.update("missing", status="failed")

    df = store.dataframe(arm="distilled")
    assert list(df.columns) == list(COLUMNS)
    assert sorted(df["run_id"]) == ["r0", "r1", "r3"]
    assert store.dataframe(arm="nobody").shape == (0, len(COLUMNS))


def test_unknown_keys_and_columns(tmp_path):
    store = ResultsStore(str(tmp_path / "u.db"))
    with pytest.raises(ValueError, match="bogus.*zzz|zzz.*bogus"):
        store.append({"arm": "teacher", "bogus": 1, "zzz": 2})
    with pytest.raises(ValueError, match="nonexistent"):
        store.query(nonexistent=1)
    with pytest.raises(ValueError, match="nonexistent"):
        store.update("x", nonexistent=1)
    with pytest.raises(ValueError, match="not valid JSON"):
        store.append({"config_json": "{not json"})
    assert store.query() == []  # nothing half-written


def test_plain_path_and_fresh_dir_schema(tmp_path):
    path = tmp_path / "results" / "deep" / "harness.db"
    assert not path.parent.exists()
    store = ResultsStore(str(path))
    assert store.url == "sqlite:///" + str(path)
    assert path.exists()
    assert store.schema_version() == 1
    con = sqlite3.connect(path)
    tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
    indexes = {r[0] for r in con.execute("select name from sqlite_master where type='index'")}
    journal = con.execute("pragma journal_mode").fetchone()[0]
    con.close()
    assert {"runs", "meta"} <= tables
    assert "ix_runs_config_hash" in indexes
    assert journal == "wal"
    # reopening an existing database is fine and keeps the data
    store.append({"run_id": "a"})
    store.close()
    assert ResultsStore(f"sqlite:///{path}").get("a")["run_id"] == "a"


def test_relative_sqlite_url_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = ResultsStore("sqlite:///sub/rel.db")
    assert store.url == f"sqlite:///{tmp_path}/sub/rel.db"
    assert (tmp_path / "sub" / "rel.db").exists()


def _writer(url, worker, n, barrier):
    store = ResultsStore(url)  # every process also races on schema creation
    barrier.wait()
    for i in range(n):
        store.append(
            {
                "arm": "distilled",
                "dataset": "synthetic",
                "seed": i,
                "trial_id": f"w{worker}-{i}",
                "history_json": [{"iteration": i, "miou": 0.1, "loss": 1.0}],
            }
        )
    store.close()


def test_concurrent_appends_from_processes(tmp_path):
    url = f"sqlite:///{tmp_path}/conc/harness.db"  # fresh dir, schema created concurrently
    ctx = mp.get_context("spawn")
    n_proc, n_rows = 4, 25
    barrier = ctx.Barrier(n_proc)
    procs = [ctx.Process(target=_writer, args=(url, w, n_rows, barrier)) for w in range(n_proc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * n_proc
    rows = ResultsStore(url).query()
    assert len(rows) == n_proc * n_rows
    assert len({r["run_id"] for r in rows}) == n_proc * n_rows
    assert {r["trial_id"] for r in rows} == {f"w{w}-{i}" for w in range(n_proc) for i in range(n_rows)}


def test_pickle_reconnects(tmp_path):
    import pickle

    store = ResultsStore(str(tmp_path / "p.db"))
    store.append({"run_id": "x"})
    clone = pickle.loads(pickle.dumps(store))
    assert clone.get("x")["run_id"] == "x"


# ------------------------------------------------------------------ a store the harness cannot use
@pytest.mark.parametrize("make, message", [
    (lambda d: "sqlite:///:memory:", "in-memory database"),
    (lambda d: (d / "notes.txt").write_text("not a database at all " * 100) and f"sqlite:///{d / 'notes.txt'}",
     "cannot use the results database"),
    (lambda d: str(d), "cannot use the results database"),             # a directory
    (lambda d: "foo://x", "cannot use the results database"),
])
def test_an_unusable_store_is_one_paragraph(tmp_path, make, message):
    from harness.store import StoreError

    with pytest.raises(StoreError) as err:
        ResultsStore(make(tmp_path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_someone_elses_database_is_refused_and_left_alone(tmp_path):
    import sqlite3

    from harness.store import StoreError

    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(StoreError, match="not a harness results database"):
        ResultsStore(f"sqlite:///{path}")
    with sqlite3.connect(path) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["invoices"]


def test_a_reader_never_creates_a_database_nor_waits_for_a_writer(tmp_path):
    import sqlite3
    import time

    from harness.store import MissingDatabase, StoreError

    path = tmp_path / "r" / "harness.db"
    with pytest.raises(MissingDatabase):
        ResultsStore(f"sqlite:///{path}", readonly=True)
    assert not path.parent.exists()
    writer = ResultsStore(f"sqlite:///{path}")
    writer.append({"run_id": "a", "arm": "student-only"})
    lock = sqlite3.connect(path, timeout=1, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")                     # a long writer holds the write lock
    try:
        started = time.time()
        reader = ResultsStore(f"sqlite:///{path}", readonly=True)
        assert [r["run_id"] for r in reader.query()] == ["a"]
        assert time.time() - started < 5
        with pytest.raises(StoreError, match="read-only"):
            reader.append({"run_id": "b"})
    finally:
        lock.execute("ROLLBACK")
        lock.close()


def test_a_record_the_store_cannot_take_is_kept_and_imported_by_the_next_command(tiny, monkeypatch, capsys):
    from harness.config import load_config
    from harness.engine.record import RunRecord, open_store, pending_dir, store_record

    cfg = load_config(tiny())
    record = RunRecord.of(cfg, "run-1", "pytest", final_miou=0.3)
    real = ResultsStore.append
    monkeypatch.setattr(ResultsStore, "append", lambda self, row: (_ for _ in ()).throw(OSError("disk full")))
    assert store_record(cfg, record) is False
    assert "disk full" in capsys.readouterr().err
    assert [p.name for p in pending_dir(cfg).iterdir()] == ["run-1.json"]
    monkeypatch.setattr(ResultsStore, "append", real)
    store = open_store(cfg)                              # the next command that writes
    assert store.get("run-1")["final_miou"] == 0.3 and not list(pending_dir(cfg).iterdir())
    assert "imported the record of run run-1" in capsys.readouterr().err
