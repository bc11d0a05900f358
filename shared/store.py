"""Durable run state: run documents, per-iteration records and the step requests of a run, in SQLite or Redis.

Documents are JSON-serialisable dicts, opaque to the store; steps are opaque binary blobs. Every method is
synchronous (the orchestrator calls them through ``asyncio.to_thread``) and safe to call from several threads.

- ``SqliteStore``: one file (by default ``<runs_dir>/state.sqlite3``), WAL journal with ``synchronous=FULL``, so an
  acknowledged write survives a kill -9 of the process (and a power cut). Several processes may open the same file.
- ``RedisStore``: a Redis server (run it with ``--appendonly yes --appendfsync always`` for the same guarantee).
  While the server is unreachable (restarting, loading its AOF), a call retries with backoff for up to
  ``outage_budget_s`` and then raises ``StoreUnavailable``. Every write sets keys to values, so a write retried after
  a lost reply changes nothing.
"""

from __future__ import annotations

import json
import logging
import random
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import redis
from prometheus_client import Gauge
from pydantic import Field, field_validator, model_validator
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.retry import Retry

from shared.config import StrictModel
from shared.errors import InvalidInput

log = logging.getLogger(__name__)

T = TypeVar("T")

STORE_UP = Gauge("rlhf_store_up", "1 while the run store answers, 0 while a call waits for it.")

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SQLITE_PREFIX = "sqlite:///"
REDIS_SCHEMES = ("redis", "rediss", "unix")


class StoreConfig(StrictModel):
    """Where run state lives."""

    url: str = Field(
        "",
        description="run state store: '' = SQLite file <runs_dir>/state.sqlite3; sqlite:///PATH = that file "
        "(sqlite:////abs/path for an absolute one); redis://[:PASSWORD@]HOST:PORT/DB (or rediss://, unix://) = "
        "a Redis server",
    )
    outage_budget_s: float = Field(
        300.0, gt=0, description="how long a call waits for an unreachable Redis (restarting) before failing, seconds"
    )
    key_prefix: str = Field("rlhf", min_length=1, description="Redis: namespace of the store's keys")
    url_file: str = Field(
        "",
        description="a file holding the URL (a mounted Secret, so that a Redis password stays out of the config); "
        "read when the store opens, instead of url",
    )

    @model_validator(mode="after")
    def _one_source(self):
        if self.url_file and self.url:
            raise ValueError("url and url_file are exclusive: the URL comes from one of them")
        return self

    def resolved_url(self) -> str:
        """``url``, or the content of ``url_file`` checked as ``url`` is (ValueError naming the file, never the
        URL: it may hold a password)."""
        if not self.url_file:
            return self.url
        try:
            url = Path(self.url_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"store.url_file: cannot read {self.url_file} ({exc.strerror})") from None
        if not url:
            raise ValueError(f"store.url_file: {self.url_file} is empty")
        try:
            return self._known_scheme(url)
        except ValueError as exc:
            raise ValueError(f"store.url_file {self.url_file}: {exc}") from None

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if url == "":
            return url
        if url.startswith(SQLITE_PREFIX):
            if not url.removeprefix(SQLITE_PREFIX):
                raise ValueError("sqlite:/// needs a file path")
            return url
        scheme = urlparse(url).scheme
        if scheme not in REDIS_SCHEMES:
            # Only the scheme is echoed: the URL may hold a password.
            raise ValueError(
                f"unsupported scheme {scheme!r}: use '' (SQLite under the runs directory), sqlite:///PATH, "
                "or redis://[:PASSWORD@]HOST:PORT/DB (rediss://, unix://)"
            )
        parse_url(url)  # raises ValueError naming what is wrong
        return url


class StoreUnavailable(RuntimeError):
    """The store did not answer within its outage budget."""


def check_run_id(run_id: str) -> str:
    """Returns ``run_id`` if it is a valid run id (letters, digits, '.', '_', '-'; 1..128 characters, starting with
    a letter or digit), else raises InvalidInput naming ``run_id``."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise InvalidInput(
            "run_id", f"{run_id!r} is not a valid run id (1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit)"
        )
    return run_id


def _check_iteration(iteration: int) -> int:
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise InvalidInput("iteration", f"{iteration!r} is not a non-negative integer")
    return iteration


def _dumps(doc: dict) -> str:
    if not isinstance(doc, dict):
        raise TypeError(f"a store document must be a dict, got {type(doc).__name__}")
    return json.dumps(doc, separators=(",", ":"))


class Store(ABC):
    """Run documents, iteration records and step blobs, keyed by run id."""

    @abstractmethod
    def put_run(self, run_id: str, doc: dict) -> None:
        """Creates or replaces the run's document."""

    @abstractmethod
    def get_run(self, run_id: str) -> dict | None:
        """The run's document, or None if there is no such run."""

    @abstractmethod
    def list_runs(self) -> list[dict]:
        """Every run document, in creation order (the first put_run of each id)."""

    @abstractmethod
    def commit_iteration(self, run_id: str, iteration: int, record: dict, doc: dict) -> None:
        """Stores the iteration's record (replacing one of the same iteration) and replaces the run's document,
        atomically: both or neither."""

    @abstractmethod
    def iterations(self, run_id: str) -> list[dict]:
        """The run's iteration records, by iteration number."""

    @abstractmethod
    def put_step(self, run_id: str, iteration: int, data: bytes) -> None:
        """Stores (or replaces) the step blob of an iteration."""

    @abstractmethod
    def get_step(self, run_id: str, iteration: int) -> bytes | None:
        """The step blob of an iteration, or None."""

    @abstractmethod
    def steps(self, run_id: str) -> list[int]:
        """The iteration numbers that have a step blob, ascending."""

    @abstractmethod
    def prune_steps(self, run_id: str, up_to: int) -> None:
        """Deletes the step blobs of iterations <= ``up_to``."""

    @abstractmethod
    def delete_run(self, run_id: str) -> None:
        """Deletes the run's document, records and steps."""

    @abstractmethod
    def describe(self) -> str:
        """What and where the store is, for logs (no password)."""

    @abstractmethod
    def close(self) -> None:
        """Releases the connection; the data stays."""


class SqliteStore(Store):
    """A SQLite file: one connection shared by the process's threads under a lock."""

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS runs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order
            run_id TEXT NOT NULL UNIQUE,
            doc TEXT NOT NULL
        );
        CREATE TABLE IF NOT EXISTS iterations (
            run_id TEXT NOT NULL,
            iteration INTEGER NOT NULL,
            record TEXT NOT NULL,
            PRIMARY KEY (run_id, iteration)
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS steps (
            run_id TEXT NOT NULL,
            iteration INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (run_id, iteration)
        );
    """
    BUSY_TIMEOUT_S = 30.0  # another process holding the write lock

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Autocommit mode; transactions are explicit (BEGIN IMMEDIATE takes the write lock up front, so two
        # processes wait on the busy timeout instead of failing to upgrade a read lock).
        self._db = sqlite3.connect(
            self.path, timeout=self.BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(f"BEGIN IMMEDIATE; {self.SCHEMA} COMMIT;")
        STORE_UP.set(1)

    def _write(self, *statements: tuple[str, tuple]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    self._db.execute(sql, params)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, params: tuple) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    @staticmethod
    def _upsert_run(run_id: str, doc: dict) -> tuple[str, tuple]:
        return (
            "INSERT INTO runs (run_id, doc) VALUES (?, ?) ON CONFLICT (run_id) DO UPDATE SET doc = excluded.doc",
            (run_id, _dumps(doc)),
        )

    def put_run(self, run_id: str, doc: dict) -> None:
        self._write(self._upsert_run(check_run_id(run_id), doc))

    def get_run(self, run_id: str) -> dict | None:
        rows = self._read("SELECT doc FROM runs WHERE run_id = ?", (check_run_id(run_id),))
        return json.loads(rows[0][0]) if rows else None

    def list_runs(self) -> list[dict]:
        return [json.loads(doc) for (doc,) in self._read("SELECT doc FROM runs ORDER BY seq", ())]

    def commit_iteration(self, run_id: str, iteration: int, record: dict, doc: dict) -> None:
        check_run_id(run_id)
        self._write(
            (
                "INSERT OR REPLACE INTO iterations (run_id, iteration, record) VALUES (?, ?, ?)",
                (run_id, _check_iteration(iteration), _dumps(record)),
            ),
            self._upsert_run(run_id, doc),
        )

    def iterations(self, run_id: str) -> list[dict]:
        rows = self._read("SELECT record FROM iterations WHERE run_id = ? ORDER BY iteration", (check_run_id(run_id),))
        return [json.loads(record) for (record,) in rows]

    def put_step(self, run_id: str, iteration: int, data: bytes) -> None:
        self._write(
            (
                "INSERT OR REPLACE INTO steps (run_id, iteration, data) VALUES (?, ?, ?)",
                (check_run_id(run_id), _check_iteration(iteration), bytes(data)),
            )
        )

    def get_step(self, run_id: str, iteration: int) -> bytes | None:
        rows = self._read(
            "SELECT data FROM steps WHERE run_id = ? AND iteration = ?", (check_run_id(run_id), iteration)
        )
        return bytes(rows[0][0]) if rows else None

    def steps(self, run_id: str) -> list[int]:
        rows = self._read("SELECT iteration FROM steps WHERE run_id = ? ORDER BY iteration", (check_run_id(run_id),))
        return [iteration for (iteration,) in rows]

    def prune_steps(self, run_id: str, up_to: int) -> None:
        self._write(("DELETE FROM steps WHERE run_id = ? AND iteration <= ?", (check_run_id(run_id), up_to)))

    def delete_run(self, run_id: str) -> None:
        check_run_id(run_id)
        self._write(
            ("DELETE FROM steps WHERE run_id = ?", (run_id,)),
            ("DELETE FROM iterations WHERE run_id = ?", (run_id,)),
            ("DELETE FROM runs WHERE run_id = ?", (run_id,)),
        )

    def describe(self) -> str:
        return f"sqlite {self.path}"

    def close(self) -> None:
        with self._lock:
            self._db.close()


# Creates the run's entry in the creation-ordered index on its first put, then sets its document. A script runs
# atomically, and running it again with the same arguments changes nothing.
PUT_RUN_SCRIPT = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[2]), ARGV[1])
end
redis.call('SET', KEYS[3], ARGV[2])
"""


class RedisStore(Store):
    """A Redis server. Keys (P = key_prefix):

    - ``P:runs``: sorted set of run ids, scored by creation sequence (``P:runs:seq``, a counter);
    - ``P:run:ID``: the run document (JSON string);
    - ``P:run:ID:iterations``: hash, field = iteration number, value = record (JSON);
    - ``P:run:ID:steps``: hash, field = iteration number, value = step blob.
    """

    MAX_BACKOFF_S = 5.0
    FIRST_BACKOFF_S = 0.1
    # Errors of a server that is down, restarting or still loading its AOF (BusyLoadingError is a ConnectionError);
    # a refused password or command is a ConnectionError too, but waiting does not mend it.
    OUTAGE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
    NOT_OUTAGES = (AuthenticationError, AuthorizationError)

    def __init__(self, url: str, outage_budget_s: float = 300.0, key_prefix: str = "rlhf"):
        self.outage_budget_s = outage_budget_s
        self.prefix = key_prefix
        # The client's own retries are off: _call retries for the whole outage budget.
        self._client = redis.Redis.from_url(
            url,
            socket_connect_timeout=min(5.0, outage_budget_s),
            socket_timeout=30.0,
            retry=Retry(NoBackoff(), 0),
        )
        self._put_run_script = self._client.register_script(PUT_RUN_SCRIPT)
        kwargs = self._client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        self._description = f"redis {where}/{kwargs.get('db', 0)}"

    def _call(self, operation: Callable[[], T]) -> T:
        """Runs ``operation``, retrying it with backoff while the server is unreachable, up to the outage budget."""
        waiting_since = None
        delay = self.FIRST_BACKOFF_S
        while True:
            try:
                result = operation()
            except self.NOT_OUTAGES:
                raise
            except self.OUTAGE_ERRORS as exc:
                STORE_UP.set(0)
                now = time.monotonic()
                waiting_since = waiting_since or now
                waited = now - waiting_since
                if waited >= self.outage_budget_s:
                    raise StoreUnavailable(
                        f"run store {self._description} did not answer for {waited:.1f} s "
                        f"(store.outage_budget_s {self.outage_budget_s:g}): {type(exc).__name__}: {exc}"
                    ) from exc
                sleep = min(delay * random.uniform(0.5, 1.0), self.outage_budget_s - waited)
                log.warning(
                    "run store %s unreachable for %.1f s (%s: %s); retrying in %.2f s, giving up after %g s",
                    self._description,
                    waited,
                    type(exc).__name__,
                    exc,
                    sleep,
                    self.outage_budget_s,
                )
                time.sleep(sleep)
                delay = min(delay * 2, self.MAX_BACKOFF_S)
                continue
            STORE_UP.set(1)
            if waiting_since is not None:
                log.info("run store %s answers again after %.1f s", self._description, time.monotonic() - waiting_since)
            return result

    def _runs_key(self) -> str:
        return f"{self.prefix}:runs"

    def _run_key(self, run_id: str) -> str:
        return f"{self.prefix}:run:{check_run_id(run_id)}"

    def _put_run(self, run_id: str, doc_json: str, client) -> None:
        self._put_run_script(
            keys=[self._runs_key(), f"{self._runs_key()}:seq", self._run_key(run_id)],
            args=[run_id, doc_json],
            client=client,
        )

    def put_run(self, run_id: str, doc: dict) -> None:
        check_run_id(run_id)
        doc_json = _dumps(doc)
        self._call(lambda: self._put_run(run_id, doc_json, self._client))

    def get_run(self, run_id: str) -> dict | None:
        key = self._run_key(run_id)
        raw = self._call(lambda: self._client.get(key))
        return None if raw is None else json.loads(raw)

    def list_runs(self) -> list[dict]:
        def read() -> list:
            run_ids = self._client.zrange(self._runs_key(), 0, -1)
            if not run_ids:
                return []
            return self._client.mget([f"{self.prefix}:run:{run_id.decode()}" for run_id in run_ids])

        # A run deleted between the two reads has no document: left out.
        return [json.loads(raw) for raw in self._call(read) if raw is not None]

    def commit_iteration(self, run_id: str, iteration: int, record: dict, doc: dict) -> None:
        key = self._run_key(run_id)
        field, record_json, doc_json = _check_iteration(iteration), _dumps(record), _dumps(doc)

        def commit() -> None:
            with self._client.pipeline(transaction=True) as pipe:  # MULTI ... EXEC
                pipe.hset(f"{key}:iterations", field, record_json)
                self._put_run(run_id, doc_json, pipe)
                pipe.execute()

        self._call(commit)

    def iterations(self, run_id: str) -> list[dict]:
        key = f"{self._run_key(run_id)}:iterations"
        records = self._call(lambda: self._client.hgetall(key))
        return [json.loads(records[field]) for field in sorted(records, key=int)]

    def put_step(self, run_id: str, iteration: int, data: bytes) -> None:
        key = f"{self._run_key(run_id)}:steps"
        field, data = _check_iteration(iteration), bytes(data)
        self._call(lambda: self._client.hset(key, field, data))

    def get_step(self, run_id: str, iteration: int) -> bytes | None:
        key = f"{self._run_key(run_id)}:steps"
        return self._call(lambda: self._client.hget(key, iteration))

    def steps(self, run_id: str) -> list[int]:
        key = f"{self._run_key(run_id)}:steps"
        return sorted(int(field) for field in self._call(lambda: self._client.hkeys(key)))

    def prune_steps(self, run_id: str, up_to: int) -> None:
        key = f"{self._run_key(run_id)}:steps"

        def prune() -> None:
            old = [field for field in self._client.hkeys(key) if int(field) <= up_to]
            if old:
                self._client.hdel(key, *old)

        self._call(prune)

    def delete_run(self, run_id: str) -> None:
        key = self._run_key(run_id)

        def delete() -> None:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.zrem(self._runs_key(), run_id)
                pipe.delete(key, f"{key}:iterations", f"{key}:steps")
                pipe.execute()

        self._call(delete)

    def describe(self) -> str:
        return self._description

    def close(self) -> None:
        self._client.close()


def open_store(config: StoreConfig, runs_dir: str | Path) -> Store:
    """The store ``config.url`` (or ``url_file``) names; '' is the SQLite file ``<runs_dir>/state.sqlite3``."""
    url = config.resolved_url()
    if url == "":
        return SqliteStore(Path(runs_dir) / "state.sqlite3")
    if url.startswith(SQLITE_PREFIX):
        return SqliteStore(url.removeprefix(SQLITE_PREFIX))
    return RedisStore(url, config.outage_budget_s, config.key_prefix)
