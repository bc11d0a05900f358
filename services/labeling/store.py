"""Where labelling tasks, assignments and labels live: the same store as the runs (``shared.store``): the SQLite file
``<runs_dir>/state.sqlite3`` on one box (its own table), or the same Redis server (its own keys).

The rules are written once (``LabelStore``), over three document kinds (task, assignment, label) and one
primitive each backend provides: ``_atomic(step)`` runs ``step`` (reads, then writes through ``_put``) as one atomic
step with respect to every process using the store. SQLite: under ``BEGIN IMMEDIATE`` (the file's write lock).
Redis: optimistically: the step's reads, then one Lua script that applies its writes only if the store's version
counter has not moved since the reads began, else the step runs again (no lock to expire, nothing held by a process
that dies). The rules:

- ``next_task`` gives an annotator their open assignment if they have one, else the oldest task that this annotator
  has not labelled and that has fewer than ``annotators_per_task`` labels plus live assignments of others. An
  assignment older than ``assignment_timeout_s`` without a label no longer counts: the task goes back to the pool,
  and the same annotator may take it again, with the same display order. The order in which the responses are
  shown is a random permutation drawn at the first assignment and recorded.
- ``submit`` refuses an unknown task (``UnknownTask``), a task this annotator was never assigned (``NotAssigned``), a
  second label for the same task (``AlreadyLabelled``), and a late label, past the timeout, for a task that has
  gone to other annotators meanwhile (``AssignmentExpired``): a task never gets more than ``annotators_per_task``
  labels. A label records what was shown where and the choice in terms of the original responses.

A write is acknowledged after it is durable (SQLite WAL with ``synchronous=FULL``; Redis as configured, e.g.
``appendfsync always``), so a restart loses no label. While Redis is unreachable (restarting), a call retries with
backoff for up to ``store.outage_budget_s``, then raises ``StoreUnavailable``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.errors import Conflict, InvalidInput
from shared.store import SQLITE_PREFIX, StoreConfig, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

PAIR = "pair"
RANKING = "ranking"
PAIR_CHOICES = ("a", "b", "tie", "both_bad")  # "a": responses[0] is better, "b": responses[1], in original terms
KINDS = ("task", "assignment", "label")


class UnknownTask(LookupError):
    pass


class NotAssigned(PermissionError):
    pass


class AlreadyLabelled(Conflict):
    pass


class AssignmentExpired(Conflict):
    pass


@dataclass
class Task:
    id: str
    batch: str
    prompt: str
    responses: list[str]
    kind: str  # "pair" (2 responses) or "ranking" (K > 2)
    created: float = 0.0


@dataclass
class Assignment:
    task_id: str
    annotator: str
    order: list[int]  # order[i] = the original index of the response shown at position i
    assigned_at: float


@dataclass
class Label:
    task_id: str
    batch: str
    annotator: str
    kind: str
    order: list[int]  # as shown (see Assignment.order)
    choice: str = ""  # pair tasks: one of PAIR_CHOICES, in terms of the original responses
    ranking: list[int] = field(default_factory=list)  # ranking tasks: original indices, best first
    comment: str = ""
    assigned_at: float = 0.0
    labelled_at: float = 0.0


def task_id(batch: str, prompt: str, responses: list[str]) -> str:
    """Stable id of a task: adding the same task to the same batch again changes nothing."""
    digest = hashlib.blake2b(json.dumps([batch, prompt, responses]).encode(), digest_size=8).hexdigest()
    return f"{batch}-{digest}" if batch else digest


def check_item(index: int, item: dict) -> tuple[str, list[str]]:
    """(prompt, responses) of one task row, or InvalidInput naming the row and the field."""
    if not isinstance(item, dict):
        raise InvalidInput(f"row {index + 1}", "must be an object with 'prompt' and 'responses'")
    prompt, responses = item.get("prompt"), item.get("responses")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidInput(f"row {index + 1}", "'prompt' must be a non-empty string")
    if not (isinstance(responses, list) and len(responses) >= 2 and all(isinstance(r, str) for r in responses)):
        raise InvalidInput(f"row {index + 1}", "'responses' must be a list of at least 2 strings")
    if len(set(responses)) < len(responses):
        raise InvalidInput(f"row {index + 1}", "'responses' lists the same response twice")
    return prompt, responses


class LabelStore(ABC):
    """Tasks, assignments and labels; see the module docstring for the rules."""

    def __init__(self, annotators_per_task: int = 2, assignment_timeout_s: float = 1800.0, seed: int | None = None):
        if annotators_per_task < 1:
            raise ValueError("annotators_per_task must be at least 1")
        self.annotators_per_task = annotators_per_task
        self.assignment_timeout_s = assignment_timeout_s
        self.rng = random.Random(seed)
        self._rng_lock = threading.Lock()

    # -- what a backend provides -------------------------------------------------------------------------------------

    @abstractmethod
    def _atomic(self, step: Callable[[], T]) -> T:
        """Runs ``step`` (its reads and its ``_put``s) as one atomic step; it may run more than once, so it must
        have no other effect. An exception from ``step`` leaves the store unchanged."""

    @abstractmethod
    def _put(self, kind: str, key: str, doc: dict) -> None:
        """Creates or replaces a document; only inside ``_atomic``."""

    @abstractmethod
    def _get(self, kind: str, key: str) -> dict | None: ...

    @abstractmethod
    def _all(self, kind: str) -> list[dict]:
        """Every document of ``kind``, in the order they were first put."""

    @abstractmethod
    def close(self) -> None: ...

    # -- the rules ---------------------------------------------------------------------------------------------------

    def add_tasks(self, batch: str, items: list[dict]) -> list[str]:
        """Adds ``{"prompt", "responses"}`` rows as tasks of ``batch`` (2 responses: a pair, more: a ranking); all
        rows are checked before any is stored, and all are stored or none. Returns their ids; a task already there
        is kept as it is."""
        checked = [check_item(i, item) for i, item in enumerate(items)]

        def step() -> list[str]:
            ids, now = [], time.time()
            for prompt, responses in checked:
                tid = task_id(batch, prompt, responses)
                if tid not in ids and self._get("task", tid) is None:
                    kind = PAIR if len(responses) == 2 else RANKING
                    self._put("task", tid, asdict(Task(tid, batch, prompt, responses, kind, now)))
                ids.append(tid)
            return ids

        return self._atomic(step)

    def task(self, tid: str) -> Task:
        doc = self._get("task", tid)
        if doc is None:
            raise UnknownTask(f"task {tid!r}: no such task")
        return Task(**doc)

    def tasks(self, batch: str | None = None) -> list[Task]:
        return [Task(**d) for d in self._all("task") if batch is None or d["batch"] == batch]

    def labels(self, batch: str | None = None) -> list[Label]:
        return [Label(**d) for d in self._all("label") if batch is None or d["batch"] == batch]

    def _live(self, assignment: dict, now: float) -> bool:
        return now - assignment["assigned_at"] < self.assignment_timeout_s

    def _places_taken(self, now: float, excluding: str) -> tuple[dict[str, int], set[str], dict[str, dict]]:
        """Per task: labels plus live assignments of annotators other than ``excluding`` (the places taken); the
        tasks ``excluding`` labelled; and their unlabelled assignments by task."""
        labelled = {(d["task_id"], d["annotator"]) for d in self._all("label")}
        taken: dict[str, int] = {}
        for tid, _ in labelled:
            taken[tid] = taken.get(tid, 0) + 1
        open_own = {}
        for d in self._all("assignment"):
            if (d["task_id"], d["annotator"]) in labelled:
                continue
            if d["annotator"] == excluding:
                open_own[d["task_id"]] = d
            elif self._live(d, now):
                taken[d["task_id"]] = taken.get(d["task_id"], 0) + 1
        return taken, {tid for tid, who in labelled if who == excluding}, open_own

    def next_task(self, annotator: str) -> tuple[Task, Assignment] | None:
        """The annotator's open assignment, else a new one (see the module docstring); None when nothing is left."""

        def step() -> tuple[Task, Assignment] | None:
            now = time.time()
            taken, mine, open_own = self._places_taken(now, excluding=annotator)
            for d in open_own.values():
                if self._live(d, now):
                    return self.task(d["task_id"]), Assignment(**d)
            for doc in self._all("task"):
                tid = doc["id"]
                if tid in mine or taken.get(tid, 0) >= self.annotators_per_task:
                    continue
                if tid in open_own:  # timed out, taken again: shown as before
                    order = open_own[tid]["order"]
                else:
                    with self._rng_lock:
                        order = self.rng.sample(range(len(doc["responses"])), len(doc["responses"]))
                assignment = Assignment(tid, annotator, order, now)
                self._put("assignment", f"{tid}/{annotator}", asdict(assignment))
                return Task(**doc), assignment
            return None

        return self._atomic(step)

    def assignment(self, annotator: str, tid: str) -> Assignment:
        """The annotator's assignment of task ``tid``: UnknownTask, NotAssigned or AlreadyLabelled otherwise."""
        self.task(tid)
        if self._get("label", f"{tid}/{annotator}") is not None:
            raise AlreadyLabelled(f"task {tid!r}: already labelled by {annotator}")
        doc = self._get("assignment", f"{tid}/{annotator}")
        if doc is None:
            raise NotAssigned(f"task {tid!r}: not assigned to {annotator}")
        return Assignment(**doc)

    def submit(
        self, annotator: str, tid: str, choice: str = "", ranking: list[int] | None = None, comment: str = ""
    ) -> Label:
        """Stores the annotator's label. ``choice`` (pair tasks) and ``ranking`` (ranking tasks, best first) are in
        terms of the positions shown: ``"a"`` is the response shown first, ranking ``[2, 0, 1]`` puts the response
        shown third first. The stored label is in terms of the original responses."""

        def step() -> Label:
            task = self.task(tid)
            assignment = self.assignment(annotator, tid)
            now = time.time()
            if not self._live(asdict(assignment), now):
                taken, _, _ = self._places_taken(now, excluding=annotator)
                if taken.get(tid, 0) >= self.annotators_per_task:
                    raise AssignmentExpired(
                        f"task {tid!r}: your assignment expired (no label within {self.assignment_timeout_s:g} s) "
                        "and the task has gone to other annotators; this label was not stored"
                    )
            order = assignment.order
            label = Label(tid, task.batch, annotator, task.kind, order, comment=comment[:2000])
            if task.kind == PAIR:
                if choice not in PAIR_CHOICES:
                    raise InvalidInput("choice", f"must be one of {', '.join(PAIR_CHOICES)}, got {choice!r}")
                # Shown A is original order[0]: "a" shown means original index order[0] is better.
                label.choice = choice if choice in ("tie", "both_bad") else "ab"[order["ab".index(choice)]]
            else:
                ranking_ = list(ranking or [])
                if sorted(ranking_) != list(range(len(task.responses))):
                    raise InvalidInput(
                        "ranking",
                        f"must order all {len(task.responses)} shown positions (0..{len(task.responses) - 1}) "
                        f"once each, got {ranking_}",
                    )
                label.ranking = [order[position] for position in ranking_]
            label.assigned_at, label.labelled_at = assignment.assigned_at, now
            self._put("label", f"{tid}/{annotator}", asdict(label))
            return label

        return self._atomic(step)

    def queue_size(self) -> int:
        """Tasks that still need labels (fewer than ``annotators_per_task``)."""
        counts: dict[str, int] = {}
        for d in self._all("label"):
            counts[d["task_id"]] = counts.get(d["task_id"], 0) + 1
        return sum(counts.get(d["id"], 0) < self.annotators_per_task for d in self._all("task"))

    def progress(self, annotator: str) -> dict[str, int]:
        """{"labelled": labels by this annotator, "available": tasks this annotator has open or could be given now
        (the same rule as ``next_task``)}."""
        now = time.time()
        taken, mine, open_own = self._places_taken(now, excluding=annotator)
        available = sum(
            d["id"] not in mine
            and (
                taken.get(d["id"], 0) < self.annotators_per_task
                or (d["id"] in open_own and self._live(open_own[d["id"]], now))
            )
            for d in self._all("task")
        )
        return {"labelled": len(mine), "available": available}


class SqliteLabelStore(LabelStore):
    SCHEMA = """
        CREATE TABLE IF NOT EXISTS label_docs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- first-put order
            kind TEXT NOT NULL,
            key TEXT NOT NULL,
            doc TEXT NOT NULL,
            UNIQUE (kind, key)
        );
    """
    BUSY_TIMEOUT_S = 30.0

    def __init__(self, path: str | Path, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path).absolute()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.path, timeout=self.BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(f"BEGIN IMMEDIATE; {self.SCHEMA} COMMIT;")

    def _atomic(self, step: Callable[[], T]) -> T:
        # BEGIN IMMEDIATE takes the file's write lock up front: other processes wait on the busy timeout.
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = step()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    def _put(self, kind: str, key: str, doc: dict) -> None:
        with self._lock:
            if not self._db.in_transaction:
                raise RuntimeError("_put outside _atomic")
            self._db.execute(
                "INSERT INTO label_docs (kind, key, doc) VALUES (?, ?, ?) "
                "ON CONFLICT (kind, key) DO UPDATE SET doc = excluded.doc",
                (kind, key, json.dumps(doc)),
            )

    def _get(self, kind: str, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT doc FROM label_docs WHERE kind = ? AND key = ?", (kind, key)).fetchone()
        return json.loads(row[0]) if row else None

    def _all(self, kind: str) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT doc FROM label_docs WHERE kind = ? ORDER BY seq", (kind,)).fetchall()
        return [json.loads(doc) for (doc,) in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


# Applies a step's writes if the version is still the one its reads began at (compare-and-set), and marks the
# commit done under a one-hour key named by the attempt, so that a commit whose reply was lost is recognised.
# KEYS: version, seq, then (hash, order) for each kind in KINDS, then the commit mark.
# ARGV: expected version, then (kind index 0..2, key, document) per write.
COMMIT_SCRIPT = """
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then
    return 0
end
for i = 2, #ARGV, 3 do
    local kind = tonumber(ARGV[i])
    local hash, order = KEYS[3 + 2 * kind], KEYS[4 + 2 * kind]
    if not redis.call('ZSCORE', order, ARGV[i + 1]) then
        redis.call('ZADD', order, redis.call('INCR', KEYS[2]), ARGV[i + 1])
    end
    redis.call('HSET', hash, ARGV[i + 1], ARGV[i + 2])
end
redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[#KEYS], '1', 'EX', 3600)
return 1
"""


class RedisLabelStore(LabelStore):
    """Keys (P = key_prefix): ``P:labeling:KIND`` a hash key -> JSON document, ``P:labeling:KIND:order`` a sorted set
    of keys by first-put sequence (``P:labeling:seq``), ``P:labeling:version`` counts commits (the compare-and-set
    of ``_atomic``), ``P:labeling:commit:ID`` marks a commit for an hour."""

    MAX_BACKOFF_S = 5.0
    FIRST_BACKOFF_S = 0.1
    OUTAGE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
    NOT_OUTAGES = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)

    def __init__(self, url: str, key_prefix: str = "rlhf", outage_budget_s: float = 300.0, **kwargs):
        super().__init__(**kwargs)
        self.outage_budget_s = outage_budget_s
        # The client's own retries are off: _call retries for the whole outage budget.
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=min(5.0, outage_budget_s), socket_timeout=30.0, retry=Retry(NoBackoff(), 0)
        )
        self.prefix = f"{key_prefix}:labeling"
        self._commit = self.client.register_script(COMMIT_SCRIPT)
        self._local = threading.local()

    def _call(self, operation: Callable[[], T]) -> T:
        """Runs ``operation``, retrying it with backoff while the server is unreachable, up to the outage budget."""
        waiting_since, delay = None, self.FIRST_BACKOFF_S
        while True:
            try:
                return operation()
            except self.NOT_OUTAGES:
                raise
            except self.OUTAGE_ERRORS as exc:
                now = time.monotonic()
                waiting_since = waiting_since or now
                if now - waiting_since >= self.outage_budget_s:
                    raise StoreUnavailable(
                        f"label store {self.prefix} did not answer for {now - waiting_since:.1f} s "
                        f"(store.outage_budget_s {self.outage_budget_s:g}): {type(exc).__name__}: {exc}"
                    ) from exc
                log.warning("label store unreachable (%s: %s); retrying", type(exc).__name__, exc)
                time.sleep(min(delay * random.uniform(0.5, 1.0), self.outage_budget_s - (now - waiting_since)))
                delay = min(delay * 2, self.MAX_BACKOFF_S)

    def _version(self) -> int:
        return int(self._call(lambda: self.client.get(f"{self.prefix}:version")) or 0)

    def _atomic(self, step: Callable[[], T]) -> T:
        keys = [f"{self.prefix}:version", f"{self.prefix}:seq"]
        keys += [key for kind in KINDS for key in (f"{self.prefix}:{kind}", f"{self.prefix}:{kind}:order")]
        while True:
            version = self._version()
            self._local.writes = {}
            try:
                result = step()
            except Exception:
                if self._version() != version:
                    continue  # read while another step committed: the refusal may be stale
                raise
            finally:
                writes, self._local.writes = self._local.writes, None
            if not writes:
                return result
            mark = f"{self.prefix}:commit:{uuid.uuid4().hex}"
            args: list = [version]
            for (kind, key), doc in writes.items():
                args += [KINDS.index(kind), key, json.dumps(doc)]
            try:
                committed = self._commit(keys=[*keys, mark], args=args)
            except self.OUTAGE_ERRORS:
                # The reply was lost: the commit may have happened. The mark says whether it did.
                committed = self._call(lambda mark=mark: self.client.exists(mark))
            if committed:
                return result

    def _put(self, kind: str, key: str, doc: dict) -> None:
        writes = getattr(self._local, "writes", None)
        if writes is None:
            raise RuntimeError("_put outside _atomic")
        writes[(kind, key)] = doc

    def _get(self, kind: str, key: str) -> dict | None:
        writes = getattr(self._local, "writes", None) or {}
        if (kind, key) in writes:  # a step reads its own writes
            return writes[(kind, key)]
        raw = self._call(lambda: self.client.hget(f"{self.prefix}:{kind}", key))
        return json.loads(raw) if raw is not None else None

    def _all(self, kind: str) -> list[dict]:
        def read() -> list:
            keys = self.client.zrange(f"{self.prefix}:{kind}:order", 0, -1)
            return self.client.hmget(f"{self.prefix}:{kind}", keys) if keys else []

        return [json.loads(raw) for raw in self._call(read) if raw is not None]

    def close(self) -> None:
        self.client.close()


def open_label_store(
    config: StoreConfig, runs_dir: str | Path, annotators_per_task: int = 2, assignment_timeout_s: float = 1800.0
) -> LabelStore:
    """The label store beside the run store that ``config`` names ('' = ``<runs_dir>/state.sqlite3``)."""
    kwargs = {"annotators_per_task": annotators_per_task, "assignment_timeout_s": assignment_timeout_s}
    if config.url == "":
        return SqliteLabelStore(Path(runs_dir) / "state.sqlite3", **kwargs)
    if config.url.startswith(SQLITE_PREFIX):
        return SqliteLabelStore(config.url.removeprefix(SQLITE_PREFIX), **kwargs)
    return RedisLabelStore(config.url, config.key_prefix, config.outage_budget_s, **kwargs)
