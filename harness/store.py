"""Results database: one row per run, through SQLAlchemy Core 2.x.

The store is addressed by an SQLAlchemy URL (``sqlite:////abs/path/results/harness.db``
by default, or a server: ``postgresql+psycopg://user@host:5432/db``, the driver from
``pip install -e ".[postgres]"``); a plain filesystem path is accepted too and turned into an
absolute ``sqlite:///`` URL.  The schema is created on first use.

Concurrency (SQLite): every connection gets WAL journal mode and a 60 s busy timeout from
a ``connect`` event, and every *write* transaction starts with ``BEGIN IMMEDIATE`` so that
concurrent writers queue on the busy timeout instead of failing with "database is locked"
when a deferred read transaction tries to upgrade to a write lock.  Each ``append`` /
``update`` is one transaction.  Schema creation runs in such a transaction with
``checkfirst`` and additionally tolerates the "already exists" race that other backends can
raise when two processes create the schema at the same moment.

A server (PostgreSQL, tested; ``tests/test_postgres.py``): every operation takes a connection of its
own and gives it back closed (no pool: a sweep's many short-lived stores never hold idle server
connections), with a 10 s connect timeout unless the URL sets one. Schema creation is serialised by
a transaction-scoped advisory lock; rows are plain INSERTs in their own transactions, so concurrent
writers (trials on every node of a Ray cluster) never wait for each other. A read-only store runs
READ ONLY transactions: it never creates or changes a table and, under MVCC, never waits for a
writer. ``postgresql://`` without a driver name uses psycopg (3) when psycopg2 is not installed.

A text export (JSON Lines, `export_lines`; ``python -m harness export``) holds one stored row per
line, in the table's column order, rows oldest first; ``store.url=<path>.jsonl`` opens such a file
as a **read-only** store (a private in-memory SQLite loaded from it): the shipped evidence
(``evidence/runs.jsonl``) is read this way, and any write names the file in a StoreError.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
import uuid
from typing import Any, Iterable

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError

from harness.errors import ConfigError

SCHEMA_VERSION = 1
TABLE_NAME = "runs"
META_TABLE_NAME = "meta"
SQLITE_BUSY_TIMEOUT_S = 60.0
SERVER_CONNECT_TIMEOUT_S = 10
SCHEMA_LOCK_KEY = 0x68_61_72_6E_65_73_73  # "harness": the advisory lock that serialises schema creation
POSTGRES_DRIVER_HINT = ('pip install -e ".[postgres]" installs psycopg (3); the URL then reads '
                        'postgresql+psycopg://USER[:PASSWORD]@HOST[:PORT]/DATABASE')
JSONL_SUFFIX = ".jsonl"
REDACTED = "<redacted>"

# (name, type) in the order they appear in the table and in COLUMNS.
_COLUMN_SPECS: tuple[tuple[str, Any], ...] = (
    ("run_id", sa.String(255)),  # VARCHAR: indexable on every backend; TEXT affinity in SQLite
    ("created_at", sa.Text),
    ("command", sa.Text),
    ("config_json", sa.Text),
    ("config_hash", sa.String(255)),
    ("arm", sa.Text),
    ("methods", sa.Text),
    ("dataset", sa.Text),
    ("student", sa.Text),
    ("teacher", sa.Text),
    ("seed", sa.Integer),
    ("split", sa.Text),
    ("status", sa.Text),
    ("failure_reason", sa.Text),
    ("sweep_id", sa.String(255)),
    ("stage", sa.Text),
    ("trial_id", sa.Text),
    ("params_json", sa.Text),
    ("final_miou", sa.Float),
    ("best_miou", sa.Float),
    ("best_iteration", sa.Integer),
    ("pixel_accuracy", sa.Float),
    ("per_class_iou_json", sa.Text),
    ("history_json", sa.Text),
    ("iterations", sa.Integer),
    ("wall_time_s", sa.Float),
    ("train_time_s", sa.Float),
    ("energy_kwh", sa.Float),
    ("co2_kg", sa.Float),
    ("carbon_intensity_g_per_kwh", sa.Float),
    ("energy_json", sa.Text),
    ("git_commit", sa.Text),
    ("versions_json", sa.Text),
    ("host", sa.Text),
    ("extra_json", sa.Text),
)

COLUMNS: tuple[str, ...] = tuple(name for name, _ in _COLUMN_SPECS)
JSON_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c.endswith("_json"))
INT_COLUMNS: tuple[str, ...] = tuple(n for n, t in _COLUMN_SPECS if t is sa.Integer)
FLOAT_COLUMNS: tuple[str, ...] = tuple(n for n, t in _COLUMN_SPECS if t is sa.Float)
TEXT_COLUMNS: tuple[str, ...] = tuple(
    c for c in COLUMNS if c not in INT_COLUMNS and c not in FLOAT_COLUMNS and c not in JSON_COLUMNS
)

_metadata = sa.MetaData()
runs_table = sa.Table(
    TABLE_NAME,
    _metadata,
    *[
        sa.Column(name, typ, primary_key=(name == "run_id"), nullable=(name != "run_id"))
        for name, typ in _COLUMN_SPECS
    ],
    sa.Index("ix_runs_config_hash", "config_hash"),
    sa.Index("ix_runs_sweep_id", "sweep_id"),
)
meta_table = sa.Table(
    META_TABLE_NAME,
    _metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=True),
)


class StoreError(ConfigError):
    """A results database the harness cannot use (missing for a read, in memory, not a database, not
    the harness's, unreachable, locked, newer schema); the message names it and why (exit 2)."""


class MissingDatabase(StoreError):
    """A command that only reads was pointed at a database file that does not exist."""


# --------------------------------------------------------------------------- helpers


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _json_default(obj: Any) -> Any:
    """Make numpy / torch scalars and arrays, sets and paths JSON-serialisable."""
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps_json(value: Any) -> str:
    """Canonical JSON text used for every *_json column."""
    return json.dumps(value, sort_keys=True, default=_json_default)


def normalize_url(url: str | os.PathLike, create: bool = True) -> str:
    """Return an SQLAlchemy URL; plain paths become absolute ``sqlite:///`` URLs.

    For SQLite file URLs a relative database path is made absolute and, with `create`, the parent
    directory is created; without it (a read) a missing database file is a StoreError. An in-memory
    SQLite database is refused: it would keep nothing of a run.
    """
    url = os.fspath(url)
    if "://" not in url:
        url = "sqlite:///" + os.path.abspath(os.path.expanduser(url))
    try:
        parsed = make_url(url)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy raises ArgumentError / ValueError
        raise StoreError(f"store.url '{url}' is not a database URL ({exc}); give a file path or a URL such as "
                         f"sqlite:////abs/path/harness.db or postgresql+psycopg://user@host/db") from None
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if not db or db == ":memory:" or "mode=memory" in url:
            raise StoreError(f"store.url '{url}' is an in-memory database, which keeps nothing of a run; "
                             f"give a file (sqlite:////abs/path/harness.db) or a server URL")
        if not db.startswith("file:"):
            path = os.path.abspath(os.path.expanduser(db))
            if create:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            elif not os.path.isfile(path):
                raise MissingDatabase(f"no results database at {path} (store.url): a command that only reads "
                                 f"never creates one; run a sweep or `train` first, or point store.url at "
                                 f"an existing database")
            return parsed.set(database=path).render_as_string(hide_password=False)
    if parsed.drivername == "postgresql" and not _importable("psycopg2") and _importable("psycopg"):
        # SQLAlchemy's default PostgreSQL driver is psycopg2; the [postgres] extra installs psycopg 3.
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def is_jsonl(url: str | os.PathLike) -> bool:
    """Whether `url` names a JSON Lines export (a path ending in .jsonl, not a URL)."""
    url = os.fspath(url)
    return "://" not in url and url.lower().endswith(JSONL_SUFFIX)


def database_exists(url: str | os.PathLike) -> bool:
    """False only for an SQLite file or a JSON Lines export that is not there (a server database is
    taken to exist)."""
    if is_jsonl(url):
        return os.path.isfile(os.path.expanduser(os.fspath(url)))
    try:
        normalize_url(url, create=False)
    except MissingDatabase:
        return False
    except StoreError:
        return True  # there, but unusable: opening it says why
    return True


def shown_url(url: str) -> str:
    """The URL as it may be printed: a password replaced by ***."""
    return _shown(url)


def _shown(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True) if "://" in url else url
    except Exception:  # noqa: BLE001 - not a URL: shown as given
        return url


def _explain(url: str, exc: BaseException) -> str:
    """One paragraph for a database that cannot be opened (no traceback)."""
    text = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
    shown = _shown(url)
    backend = make_url(url).get_backend_name() if "://" in url else "sqlite"
    if isinstance(exc, (ImportError, sa.exc.NoSuchModuleError)):
        hint = (f"the database driver this URL names is not installed ({text}); for PostgreSQL: "
                f"{POSTGRES_DRIVER_HINT}" if backend == "postgresql" else
                f"no installed database driver serves it ({text}); SQLite needs none (a file path or "
                f"sqlite:////abs/path/harness.db), PostgreSQL: {POSTGRES_DRIVER_HINT}")
        return f"cannot use the results database {shown} (store.url): {hint}"
    if backend != "sqlite" and isinstance(exc, sa.exc.OperationalError):
        return (f"cannot use the results database {shown} (store.url): {type(exc).__name__}: {text}. "
                f"Check that the server runs and is reachable from this machine at that host and port, "
                f"that the user and password are right and that the database exists (the harness creates "
                f"its tables, not the database: CREATE DATABASE name)")
    return (f"cannot use the results database {shown} (store.url): {type(exc).__name__}: {text}. "
            f"Give a harness database, a new path, or a reachable server URL whose driver is installed")


def _without_password(cfg: dict) -> dict:
    """`cfg` with the password of its store.url (a server's) masked: a row's config never carries it
    into the database, an export or a report."""
    url = (cfg.get("store") or {}).get("url") if isinstance(cfg.get("store"), dict) else None
    if not isinstance(url, str) or "://" not in url:
        return cfg
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not a URL: nothing to mask
        return cfg
    if parsed.password is None:
        return cfg
    return {**cfg, "store": {**cfg["store"], "url": parsed.render_as_string(hide_password=True)}}


def _is_already_exists(exc: BaseException) -> bool:
    msg = str(getattr(exc, "orig", exc)).lower()
    return (
        "already exists" in msg
        or "duplicate" in msg  # postgres pg_type unique violation / mysql duplicate key
        or "unique constraint" in msg
    )


# --------------------------------------------------------------------------- store


class ResultsStore:
    """One row per run in table ``runs``; see module docstring."""

    COLUMNS: tuple[str, ...] = COLUMNS
    JSON_COLUMNS: tuple[str, ...] = JSON_COLUMNS
    SCHEMA_VERSION: int = SCHEMA_VERSION

    def __init__(self, url: str | os.PathLike, readonly: bool = False):
        """Open (and, unless `readonly`, create the schema of) the database at `url`. `readonly`: a
        command that only reads; it never creates a database, never takes a write lock and so never
        waits for a writer. Anything that makes the database unusable is a StoreError. A path ending
        in .jsonl is a text export, loaded read-only (`_load_jsonl`)."""
        self.jsonl: str | None = None
        if is_jsonl(url):
            self._load_jsonl(os.fspath(url), readonly)
            return
        self.url = normalize_url(url, create=not readonly)
        self.readonly = readonly
        parsed = make_url(self.url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.is_postgres = parsed.get_backend_name() == "postgresql"
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        else:  # a server: no idle pooled connections, and an unreachable host fails in seconds
            kwargs["poolclass"] = sa.pool.NullPool
            if self.is_postgres and "connect_timeout" not in parsed.query:
                kwargs["connect_args"] = {"connect_timeout": SERVER_CONNECT_TIMEOUT_S}
        try:
            self.engine = sa.create_engine(self.url, **kwargs)
            if self.is_sqlite:
                self._install_sqlite_events(self.engine, readonly)
            elif self.is_postgres and readonly:
                self.engine = self.engine.execution_options(postgresql_readonly=True)
            self._retry_locked(self._check_is_harness_database)
            if not readonly:
                self._ensure_schema()
        except StoreError:
            raise
        except (sa.exc.SQLAlchemyError, OSError, ImportError, ValueError, RuntimeError) as exc:
            raise StoreError(_explain(self.url, exc)) from None

    @staticmethod
    def _retry_locked(check, attempts: int = 8) -> None:
        """Run `check`, again after a short wait while another process holds SQLite's lock to switch the
        journal mode or create the schema (processes opening a new database together)."""
        for attempt in range(attempts):
            try:
                return check()
            except sa.exc.OperationalError as exc:
                if "locked" not in str(exc) or attempt == attempts - 1:
                    raise
                time.sleep(0.1 * (attempt + 1))

    def _check_is_harness_database(self) -> None:
        """A harness database, or (for writing) an empty one; never someone else's tables."""
        tables = set(sa.inspect(self.engine).get_table_names())
        if {TABLE_NAME, META_TABLE_NAME} <= tables:
            columns = {c["name"] for c in sa.inspect(self.engine).get_columns(TABLE_NAME)}
            missing = [c for c in COLUMNS if c not in columns]
            if missing:
                raise StoreError(f"{self!r} has a '{TABLE_NAME}' table without the harness's columns "
                                 f"{', '.join(missing[:5])}: not a harness results database")
            return
        if tables or self.readonly:
            raise StoreError(f"{self!r} is not a harness results database (tables: "
                             f"{', '.join(sorted(tables)) or 'none'}); give the database a sweep or `train` wrote")

    # ---- engine setup -------------------------------------------------------------

    @staticmethod
    def _install_sqlite_events(engine: sa.Engine, readonly: bool = False) -> None:
        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # noqa: ANN001
            # Driver-level autocommit: SQLAlchemy's "begin" event below emits BEGIN itself,
            # so the pysqlite driver never opens implicit (deferred) transactions.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            try:
                # busy_timeout first, so that switching to WAL waits for other processes.
                cur.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
                if not readonly:  # a reader leaves the journal mode alone (changing it takes a lock)
                    cur.execute("PRAGMA journal_mode = WAL")
            finally:
                cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):  # noqa: ANN001
            if readonly or conn.get_execution_options().get("harness_readonly"):
                conn.exec_driver_sql("BEGIN")
            else:
                # Take the write lock up front: concurrent writers wait on busy_timeout
                # instead of hitting an unrecoverable lock upgrade (SQLITE_BUSY).
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    def _read(self):
        return self.engine.connect().execution_options(harness_readonly=True)

    # ---- JSON Lines export, loaded read-only ----------------------------------------------

    def _load_jsonl(self, path: str, readonly: bool) -> None:
        """A private in-memory SQLite database holding the rows of the JSON Lines file `path`."""
        from sqlalchemy.pool import StaticPool

        self.url = os.path.normpath(path)  # as given (relative to the current directory, or absolute)
        self.jsonl = os.path.abspath(os.path.expanduser(path))
        self.readonly, self.is_sqlite, self.is_postgres = True, True, False
        if not readonly:
            raise StoreError(f"store.url {self.url} is a JSON Lines export of a results database, which the "
                             f"harness only reads; a command that writes (train, teacher, sweep) needs a "
                             f"database: store.url=<path>.db or a server URL")
        if not os.path.isfile(self.jsonl):
            raise MissingDatabase(f"no results file at {self.jsonl} (store.url): a command that only reads "
                                  f"never creates one; point store.url at an existing .jsonl export or database")
        rows, seen, number = [], {}, 0
        try:
            with open(self.jsonl, encoding="utf-8") as fh:
                for number, line in enumerate(fh, start=1):
                    if line.strip():
                        row = line_to_row(line)
                        if row["run_id"] in seen:
                            raise ValueError(f"run_id {row['run_id']!r} already on line {seen[row['run_id']]}")
                        seen[row["run_id"]] = number
                        rows.append(row)
        except ValueError as exc:
            raise StoreError(f"{self.url} line {number} (store.url): {exc}") from None
        except OSError as exc:
            raise StoreError(f"cannot read {self.url} (store.url): {exc}") from None
        self.engine = sa.create_engine("sqlite://", poolclass=StaticPool,
                                       connect_args={"check_same_thread": False})
        with self.engine.begin() as conn:
            _metadata.create_all(conn)
            conn.execute(meta_table.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            if rows:
                conn.execute(runs_table.insert(), rows)
        self._install_sqlite_events(self.engine, readonly=True)

    # ---- schema ---------------------------------------------------------------------

    def _ensure_schema(self, attempts: int = 5) -> None:
        last: BaseException | None = None
        for attempt in range(attempts):
            try:
                with self.engine.begin() as conn:
                    if self.is_postgres:  # one creator at a time; the others then find the tables
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
                    _metadata.create_all(conn, checkfirst=True)
                    row = conn.execute(
                        sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")
                    ).first()
                    if row is None:
                        conn.execute(
                            meta_table.insert().values(key="schema_version", value=str(SCHEMA_VERSION))
                        )
                    elif int(row[0]) > SCHEMA_VERSION:
                        raise RuntimeError(
                            f"results database {self.url} has schema_version {row[0]}, "
                            f"this harness supports up to {SCHEMA_VERSION}"
                        )
                return
            except (DBAPIError, IntegrityError) as exc:
                # Another process created the tables / meta row at the same moment.
                if not _is_already_exists(exc):
                    raise
                last = exc
                time.sleep(0.05 * (attempt + 1))
        # Tables exist (created by someone else); make sure they are really there.
        insp = sa.inspect(self.engine)
        if not (insp.has_table(TABLE_NAME) and insp.has_table(META_TABLE_NAME)):
            raise RuntimeError(f"could not create schema in {self.url}") from last

    def schema_version(self) -> int:
        with self._read() as conn:
            row = conn.execute(
                sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")
            ).first()
        return int(row[0]) if row else 0

    # ---- encoding -------------------------------------------------------------------

    @staticmethod
    def _check_columns(keys: Iterable[str], what: str) -> None:
        unknown = sorted(k for k in keys if k not in COLUMNS)
        if unknown:
            raise ValueError(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(COLUMNS)})")

    @staticmethod
    def _encode_value(col: str, value: Any) -> Any:
        if value is None:
            return None
        if col in JSON_COLUMNS:
            if isinstance(value, str):
                try:
                    json.loads(value)
                except ValueError as exc:
                    raise ValueError(f"column {col}: string value is not valid JSON text") from exc
                return value
            return dumps_json(value)
        if col == "methods":
            names = value.split(",") if isinstance(value, str) else [str(m) for m in value]
            return ",".join(sorted(n.strip() for n in names if n.strip()))
        if col in INT_COLUMNS:
            if hasattr(value, "item"):
                value = value.item()
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(f"column {col}: expected an integer, got {value!r}")
            return int(value)
        if col in FLOAT_COLUMNS:
            if hasattr(value, "item"):
                value = value.item()
            return float(value)
        if isinstance(value, (_dt.datetime, _dt.date)):
            return value.isoformat()
        if not isinstance(value, str):
            return str(value)
        return value

    @classmethod
    def _encode(cls, record: dict) -> dict:
        record = dict(record)
        if isinstance(record.get("config_json"), dict):
            record["config_json"] = _without_password(record["config_json"])
        return {k: cls._encode_value(k, v) for k, v in record.items()}

    @staticmethod
    def _decode(row: sa.Row) -> dict:
        out = dict(row._mapping)
        for col in JSON_COLUMNS:
            v = out.get(col)
            if isinstance(v, str):
                out[col] = json.loads(v)
        for col in FLOAT_COLUMNS:
            v = out.get(col)
            if isinstance(v, float) and math.isnan(v):
                out[col] = None
        return out

    def _where(self, equals: dict):
        self._check_columns(equals, "column")
        clauses = []
        for k, v in equals.items():
            col = runs_table.c[k]
            if v is None:
                clauses.append(col.is_(None))
            elif isinstance(v, (list, tuple, set, frozenset)):
                clauses.append(col.in_([self._encode_value(k, x) for x in v]))
            else:
                clauses.append(col == self._encode_value(k, v))
        return clauses

    # ---- public API -----------------------------------------------------------------

    def _writable(self) -> None:
        if self.jsonl is not None:
            raise StoreError(f"{self.url} is a JSON Lines export loaded read-only (store.url): nothing is written "
                             f"to it; write to a database (store.url=<path>.db) instead")
        if self.readonly:
            raise StoreError(f"{self!r} was opened read-only")

    def append(self, record: dict) -> str:
        """Insert one row in one transaction; returns its run_id."""
        self._writable()
        self._check_columns(record, "keys")
        row = dict(record)
        if not row.get("run_id"):
            row["run_id"] = uuid.uuid4().hex
        if not row.get("created_at"):
            row["created_at"] = _now_iso()
        if row.get("status") is None:
            row["status"] = "completed"
        values = self._encode(row)
        with self.engine.begin() as conn:
            conn.execute(runs_table.insert().values(**values))
        return values["run_id"]

    def get(self, run_id: str) -> dict | None:
        with self._read() as conn:
            row = conn.execute(sa.select(runs_table).where(runs_table.c.run_id == run_id)).first()
        return None if row is None else self._decode(row)

    def query(self, **equals) -> list[dict]:
        """Rows whose columns equal the given values (None -> IS NULL, list -> IN),
        oldest first."""
        order = [runs_table.c.created_at, runs_table.c.run_id]
        if self.is_postgres:  # byte order, as SQLite sorts, whatever the server's collation
            order = [c.collate("C") for c in order]
        stmt = sa.select(runs_table).where(*self._where(equals)).order_by(*order)
        with self._read() as conn:
            return [self._decode(r) for r in conn.execute(stmt)]

    def update(self, run_id: str, **fields) -> None:
        """Change columns of an existing run in one transaction; KeyError if absent."""
        self._writable()
        self._check_columns(fields, "column")
        if "run_id" in fields:
            raise ValueError("run_id cannot be updated")
        if not fields:
            return
        values = self._encode(fields)
        with self.engine.begin() as conn:
            res = conn.execute(
                runs_table.update().where(runs_table.c.run_id == run_id).values(**values)
            )
            if res.rowcount == 0:
                raise KeyError(f"no run with run_id {run_id!r}")

    def count(self, **equals) -> int:
        stmt = sa.select(sa.func.count()).select_from(runs_table).where(*self._where(equals))
        with self._read() as conn:
            return int(conn.execute(stmt).scalar_one())

    def dataframe(self, **equals):
        import pandas as pd

        return pd.DataFrame(self.query(**equals), columns=list(COLUMNS))

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):  # picklable (e.g. for worker processes): reconnect by URL
        return (type(self), (self.url, self.readonly))

    def __repr__(self) -> str:
        if self.jsonl is not None:
            return f"ResultsStore({self.url!r})"
        return f"ResultsStore({_shown(self.url)!r})"


# --------------------------------------------------------------------------- JSON Lines


def row_to_line(row: dict) -> str:
    """One stored row (as `ResultsStore.query` returns it) as one JSON line: every column in the
    table's order, *_json columns as JSON values with sorted keys, floats as Python's repr (exact)."""
    return "{" + ", ".join(f"{json.dumps(c)}: {json.dumps(row.get(c), sort_keys=True, default=_json_default)}"
                           for c in COLUMNS) + "}"


def line_to_row(line: str) -> dict:
    """The column values of one JSON line, encoded as the table stores them; ValueError says why not."""
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"not JSON ({getattr(exc, 'msg', exc)} at column {getattr(exc, 'colno', '?')})") from None
    if not isinstance(data, dict):
        raise ValueError(f"a JSON object (one row) expected, got {type(data).__name__}")
    unknown = sorted(k for k in data if k not in COLUMNS)
    if unknown:
        raise ValueError(f"unknown column(s) {', '.join(unknown)}")
    if not isinstance(data.get("run_id"), str) or not data["run_id"]:
        raise ValueError("no run_id")
    out = {}
    for col in COLUMNS:
        value = data.get(col)
        if value is None:
            out[col] = None
        elif col in JSON_COLUMNS:
            out[col] = dumps_json(value)  # always a JSON value, even a string
        elif col in INT_COLUMNS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"column {col}: expected an integer, got {value!r}")
        elif col in FLOAT_COLUMNS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"column {col}: expected a number, got {value!r}")
        elif col in TEXT_COLUMNS and not isinstance(value, str):
            raise ValueError(f"column {col}: expected a string, got {value!r}")
        else:
            out[col] = ResultsStore._encode_value(col, value)
    return out


def export_lines(store: ResultsStore, redact: Iterable[str] = ()) -> Iterable[str]:
    """Every row of `store` as a JSON line (`row_to_line`), oldest first (created_at, then run_id).
    Each absolute path prefix in `redact` is replaced by REDACTED wherever it starts a path (to ship
    rows without the directories of the machine that made them); nothing else is changed."""
    import re

    patterns = [re.compile(re.escape(p.rstrip("/\\")) + r"(?=[/\\\"]|$)") for p in redact if p.strip("/\\")]
    for row in store.query():
        line = row_to_line(row)
        for pattern in patterns:
            line = pattern.sub(REDACTED, line)
        yield line
