"""The results database on a PostgreSQL server: train, a smoke sweep and the leaderboard through
`store.url=postgresql+psycopg://...`, concurrent writers, read-only opens, and the one-paragraph
errors of a server the harness cannot use.

The server: `HARNESS_TEST_POSTGRES_URL` (what `.ci/run` starts on loopback and exports), else a
throwaway server this module starts from the PostgreSQL binaries it finds (PATH,
/usr/lib/postgresql/*/bin; as the unprivileged user `postgres` when the tests run as root), else the
tests skip and say why. With `HARNESS_REQUIRE_POSTGRES=1` (set by `.ci/run`) they fail instead of
skipping. Every test gets a database of its own, dropped afterwards.
"""
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from harness.config import PROJECT_ROOT, load_config
from harness.store import ResultsStore, StoreError

REQUIRED = os.environ.get("HARNESS_REQUIRE_POSTGRES", "") not in ("", "0")


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"HARNESS_REQUIRE_POSTGRES is set but {reason}", pytrace=False)
    pytest.skip(reason)


# ------------------------------------------------------------------ the server


def _binaries() -> str | None:
    """A folder holding initdb, pg_ctl and postgres: PATH first, then Debian's versioned folders."""
    found = shutil.which("pg_ctl")
    candidates = [os.path.dirname(os.path.realpath(found))] if found else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0, reverse=True)
    for folder in candidates:
        if all(os.access(os.path.join(folder, b), os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A throwaway PostgreSQL on 127.0.0.1: trust authentication, its own data folder, stopped and
    removed at the end of the session."""

    def __init__(self, folder: str):
        self.bin = folder
        self.user = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("the tests run as root and there is no unprivileged user 'postgres' to run "
                                   "PostgreSQL as (.ci/run creates one)") from None
        self.dir = tempfile.mkdtemp(prefix="harness-pg-")
        if self.user:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.data = os.path.join(self.dir, "data")
        self.port = None

    def _run(self, *args: str, timeout: float = 120) -> None:
        kwargs = dict(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[]) if self.user else {}
        done = subprocess.run([os.path.join(self.bin, args[0]), *args[1:]], capture_output=True, text=True,
                              timeout=timeout, cwd=self.dir, env={**os.environ, "LC_ALL": "C"}, **kwargs)
        if done.returncode:
            raise RuntimeError(f"{args[0]} failed: {(done.stderr or done.stdout).strip()[-800:]}")

    def start(self) -> str:
        self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale")
        for _attempt in range(3):  # a port taken between choosing and binding: choose again
            self.port = _free_port()
            options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir} "
                       f"-c fsync=off -c max_connections=200")
            try:
                self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "log"), "-w", "-t", "60",
                          "-o", options, "start")
                return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
            except RuntimeError:
                last = Path(self.dir, "log").read_text()[-800:] if Path(self.dir, "log").exists() else ""
        raise RuntimeError(f"the throwaway PostgreSQL did not start: {last}")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_admin():
    """The URL of a database on a PostgreSQL server this session may create databases from."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable('psycopg is not installed (pip install -e ".[test,postgres]")')
    url = os.environ.get("HARNESS_TEST_POSTGRES_URL")
    server = None
    if not url:
        folder = _binaries()
        if folder is None:
            _unavailable("no PostgreSQL server: HARNESS_TEST_POSTGRES_URL is not set and no initdb/pg_ctl was found "
                         "on PATH or in /usr/lib/postgresql/*/bin (apt-get install postgresql)")
        try:
            server = _Server(folder)
            url = server.start()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            if server:
                server.stop()
            _unavailable(f"could not start a throwaway PostgreSQL from {folder}: {exc}")
    import sqlalchemy as sa

    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:
        shown = engine.url.render_as_string(hide_password=True)
        _unavailable(f"the PostgreSQL server at {shown} does not answer: {' '.join(str(exc.orig or exc).split())[:300]}")
    yield engine
    engine.dispose()
    if server:
        server.stop()


@pytest.fixture
def pg_url(postgres_admin):
    """A fresh, empty database of its own for one test; dropped afterwards."""
    import sqlalchemy as sa

    name = f"harness_t_{uuid.uuid4().hex[:12]}"
    with postgres_admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield postgres_admin.url.set(database=name).render_as_string(hide_password=False)
    with postgres_admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _tables(url: str) -> list:
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        return sorted(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------ the store on a server


def test_every_column_round_trips_and_rows_come_back_in_stored_order(pg_url):
    from test_store import full_record

    store = ResultsStore(pg_url)
    rec = full_record(final_miou=float("nan"), extra_json={"unicode": "ü→∞", "big": 2**40})
    store.append(rec)
    got = store.get("run-full-1")
    assert got["config_json"] == rec["config_json"] and got["extra_json"] == rec["extra_json"]
    assert got["methods"] == "at,kd" and got["seed"] == 3 and got["final_miou"] is None
    assert got["co2_kg"] == 3.8e-5 and got["carbon_intensity_g_per_kwh"] == 380.95  # floats exact
    for run_id in ("b", "B", "a-1", "a_1", "a.1"):  # same created_at: run_id decides, bytewise as in SQLite
        store.append({"run_id": run_id, "created_at": "2026-02-01T00:00:00+00:00"})
    later = [r["run_id"] for r in store.query() if r["created_at"].startswith("2026-02")]
    assert later == sorted(later)
    store.update("b", status="failed", failure_reason="x")
    assert store.count(status="failed") == 1 and store.schema_version() == ResultsStore.SCHEMA_VERSION
    with pytest.raises(Exception):  # a duplicate run_id is refused, never a second row
        store.append({"run_id": "b"})
    assert store.count(run_id="b") == 1
    store.close()


_WRITER = """
import os, sys, time
from harness.store import ResultsStore
url, worker, n_rows, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
open(f"{go}.{worker}", "w").close()
while not os.path.exists(go):  # every process opens the empty database (and creates the schema) at once
    time.sleep(0.01)
store = ResultsStore(url)
for i in range(n_rows):
    store.append({"run_id": f"w{worker}-{i}", "arm": "student-only", "trial_id": f"w{worker}-{i}",
                  "history_json": [{"iteration": i, "miou": 0.1}]})
store.close()
"""


def test_concurrent_writers_from_processes(pg_url, tmp_path):
    n_proc, n_rows = 4, 25
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, pg_url, str(w), str(n_rows), str(go)],
                              cwd=PROJECT_ROOT, stderr=subprocess.PIPE, text=True) for w in range(n_proc)]
    deadline = time.time() + 120
    while not all(Path(f"{go}.{w}").exists() for w in range(n_proc)) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * n_proc, errors
    rows = ResultsStore(pg_url, readonly=True).query()
    assert len(rows) == n_proc * n_rows == len({r["run_id"] for r in rows})
    assert {r["trial_id"] for r in rows} == {f"w{w}-{i}" for w in range(n_proc) for i in range(n_rows)}
    assert _tables(pg_url) == ["meta", "runs"]


def test_a_reader_never_creates_the_schema_nor_waits_for_a_writer(pg_url):
    import sqlalchemy as sa

    from harness.store import SCHEMA_LOCK_KEY

    with pytest.raises(StoreError, match="not a harness results database"):
        ResultsStore(pg_url, readonly=True)
    assert _tables(pg_url) == []                                    # an empty database stays empty
    writer = ResultsStore(pg_url)
    writer.append({"run_id": "a", "arm": "student-only"})
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with engine.connect() as lock:                                  # a writer mid-transaction holds
        lock.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEMA_LOCK_KEY})  # the schema lock,
        lock.execute(sa.text("LOCK TABLE runs IN EXCLUSIVE MODE"))  # every write lock on the rows' table
        lock.execute(sa.text("INSERT INTO runs (run_id) VALUES ('uncommitted')"))
        started = time.time()
        reader = ResultsStore(pg_url, readonly=True)
        assert [r["run_id"] for r in reader.query()] == ["a"] and reader.count() == 1
        assert time.time() - started < 5
        with pytest.raises(StoreError, match="read-only"):
            reader.append({"run_id": "b"})
        lock.rollback()
    engine.dispose()
    with reader.engine.connect() as conn:                           # the server refuses its writes too
        with pytest.raises(sa.exc.DBAPIError, match="read-only transaction"):
            conn.execute(sa.text("INSERT INTO runs (run_id) VALUES ('x')"))


def test_someone_elses_database_is_refused_and_left_alone(pg_url):
    import sqlalchemy as sa

    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE invoices (id INTEGER)"))
    engine.dispose()
    with pytest.raises(StoreError, match="not a harness results database"):
        ResultsStore(pg_url)
    assert _tables(pg_url) == ["invoices"]


def test_a_server_the_harness_cannot_use_is_one_paragraph(pg_url):
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    closed = _free_port()
    cases = [
        (url.set(port=closed), ["cannot use the results database", "Check that the server runs"]),
        (url.set(database="harness_no_such_db"), ['"harness_no_such_db" does not exist', "CREATE DATABASE"]),
        (url.set(username="harness_no_such_user", password="secret-pw"), ["harness_no_such_user", "user and password"]),
        (url.set(drivername="postgresql+nonexistentdriver"),
         ["driver this URL names is not installed", 'pip install -e ".[postgres]"', "postgresql+psycopg://"]),
    ]
    for bad, needles in cases:
        started = time.time()
        for readonly in (False, True):
            with pytest.raises(StoreError) as err:
                ResultsStore(bad.render_as_string(hide_password=False), readonly=readonly)
            text = str(err.value)
            assert "\n" not in text and all(n in text for n in needles), text
            assert "secret-pw" not in text
        assert time.time() - started < 30
    # the CLI: exit 2, one paragraph, nothing written
    done = _cli("leaderboard", f"store.url={url.set(port=closed).render_as_string(hide_password=False)}")
    assert done.returncode == 2 and "Traceback" not in done.stderr and "Check that the server runs" in done.stderr


def test_a_bare_postgresql_url_uses_the_installed_driver(pg_url):
    from harness.store import _importable

    bare = pg_url.replace("postgresql+psycopg://", "postgresql://")
    if _importable("psycopg2"):
        pytest.skip("psycopg2 is installed: postgresql:// means psycopg2, SQLAlchemy's default")
    store = ResultsStore(bare)
    assert store.url.startswith("postgresql+psycopg://")
    store.append({"run_id": "x"})
    assert ResultsStore(pg_url, readonly=True).count() == 1


# ------------------------------------------------------------------ the harness on a server


@pytest.mark.slow
def test_train_sweep_and_leaderboard_on_postgres(pg_url, tiny, tmp_path):
    """`train` stores its row, a smoke sweep (trials in Ray workers, each writing its own rows) fills
    both arms, and the leaderboard reads them back: everything through store.url, nothing in SQLite."""
    import yaml

    # a password in the URL (the loopback server trusts it, any password does) is never stored or shown
    pg_url = pg_url.replace("postgresql+psycopg://postgres@", "postgresql+psycopg://postgres:pw-secret@")
    store_url = f"store.url={pg_url}"
    train = _cli("train", *tiny(store_url))
    assert train.returncode == 0, train.stderr[-2000:]
    rows = ResultsStore(pg_url, readonly=True).query()
    assert len(rows) == 1 and rows[0]["status"] == "completed" and rows[0]["arm"] == "student-only"
    assert rows[0]["config_json"]["store"]["url"].startswith("postgresql+psycopg://postgres:***@127.0.0.1")

    protocol = tmp_path / "p.yaml"
    protocol.write_text(yaml.safe_dump({"name": "p", "sampler_seed": 0, "stages": [
        {"name": "lr", "arms": ["student-only", "distilled"], "search": "grid",
         "space": {"optim.lr": {"grid": [0.01]}}},
        {"name": "reruns", "arms": ["student-only", "distilled"], "inherits": ["lr"], "seeds": 2},
    ]}))
    overrides = tiny("+method=kd", f"sweep.protocol={protocol}", "sweep.ray.num_cpus=2", "report.after_sweep=false",
                     "report.measure=false", store_url)
    sweep = _cli("sweep", *overrides, timeout=400)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    store = ResultsStore(pg_url, readonly=True)
    lr = store.query(stage="lr")
    assert sorted((r["arm"], r["params_json"]["optim.lr"]) for r in lr) == [("distilled", 0.01), ("student-only", 0.01)]
    reruns = store.query(stage="reruns", status="completed")
    assert sorted(r["arm"] for r in reruns) == ["distilled"] * 2 + ["student-only"] * 2
    assert len({r["run_id"] for r in store.query()}) == store.count()
    cfg = load_config(overrides)
    assert not (Path(cfg["paths"]["results"]) / "harness.db").exists()  # nothing went to SQLite

    board = _cli("leaderboard", *overrides)
    assert board.returncode == 0, board.stderr[-2000:]
    table = (Path(cfg["paths"]["results"]) / "leaderboard.md").read_text()
    assert "kd" in table and "postgres:***@127.0.0.1" in table      # its rows, and where they came from
    for out in (sweep, board):
        assert "pw-secret" not in out.stdout + out.stderr
    assert not any("pw-secret" in r["config_json"]["store"]["url"] for r in store.query())
    again = _cli("sweep", *overrides, timeout=400)                  # resume: every row already there
    assert again.returncode == 0, again.stderr[-2000:]
    assert ResultsStore(pg_url, readonly=True).count() == store.count()


def _unstamped(text: str, kept_commits: set) -> str:
    """`text` without the time and the commit it was written at (the commit may move between two calls
    while others commit to the same checkout); the runs' own commits are kept."""
    import re

    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00", "TIME", text)
    return re.sub(r"\b[0-9a-f]{40}(-dirty)?", lambda m: m.group(0) if m.group(0) in kept_commits else "COMMIT", text)


@pytest.mark.slow
def test_the_shipped_evidence_in_postgres_gives_the_same_leaderboard(pg_url, tmp_path):
    """evidence/runs.jsonl copied row by row into PostgreSQL: the leaderboard read from the server is the
    one read from the file, byte for byte but for the name of the source and the time and commit of
    writing."""
    from sqlalchemy.engine import make_url

    rows = ResultsStore(str(Path(PROJECT_ROOT) / "evidence" / "runs.jsonl"), readonly=True).query()
    server = ResultsStore(pg_url)
    for row in rows:
        server.append(row)
    assert server.query() == rows                                    # same rows, same order, same values
    outputs = {}
    for name, url in (("file", "evidence/runs.jsonl"), ("server", pg_url)):
        done = _cli("leaderboard", f"store.url={url}", f"paths.results={tmp_path / name}",
                    f"paths.reports={tmp_path / name / 'reports'}", "report.measure=false", "progress=false")
        assert done.returncode == 0, done.stderr[-2000:]
        shown = url if name == "file" else make_url(url).render_as_string(hide_password=True)
        outputs[name] = {suffix: _unstamped((tmp_path / name / f"leaderboard.{suffix}").read_text().replace(shown, "SOURCE"),
                                            {r["git_commit"] for r in rows})
                         for suffix in ("md", "csv", "tex")}
    assert "SOURCE" in outputs["server"]["md"] and "SOURCE" in outputs["server"]["csv"]
    assert outputs["file"] == outputs["server"]
