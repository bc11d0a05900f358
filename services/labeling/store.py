"""Where labelling tasks, assignments and labels live: the same store as the runs (``shared.store``): the SQLite file
``<runs_dir>/state.sqlite3`` on one box (its own tables), or the same Redis server (its own keys).

The rules are written once (``LabelStore``), over three document kinds (task, assignment, label) and one
transaction primitive that each backend provides: SQLite's ``BEGIN IMMEDIATE`` (the file's write lock, across
processes), Redis' lock (redis-py's ``Lock``, a key with a timeout). Within a transaction:

- ``next_task`` gives an annotator their open assignment if they have one, else the oldest task that this annotator
  has neither labelled nor been assigned, and that has fewer than ``annotators_per_task`` labels plus live
  assignments. An assignment older than ``assignment_timeout_s`` without a label no longer counts: the task goes
  back to the pool (and the same annotator may take it again). The order in which the responses are shown is a
  random permutation drawn at assignment and recorded.
- ``submit`` refuses an unknown task (``UnknownTask``), a task this annotator was never assigned (``NotAssigned``)
  and a second label for the same task (``AlreadyLabelled``); a label records what was shown where and the choice in
  terms of the original responses.

A write is acknowledged after it is durable (SQLite WAL with ``synchronous=FULL``; Redis as configured, e.g.
``appendfsync always``), so a restart loses no label.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis

from shared.errors import Conflict, InvalidInput
from shared.store import SQLITE_PREFIX, StoreConfig

PAIR = "pair"
RANKING = "ranking"
PAIR_CHOICES = ("a", "b", "tie", "both_bad")  # "a": responses[0] is better, "b": responses[1], in original terms


class UnknownTask(LookupError):
    pass


class NotAssigned(PermissionError):
    pass


class AlreadyLabelled(Conflict):
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
    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        """Everything inside is one atomic step with respect to every other process using the store."""

    @abstractmethod
    def _put(self, kind: str, key: str, doc: dict) -> None: ...

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
        rows are checked before any is stored. Returns their ids; a task already there is kept as it is."""
        checked = [check_item(i, item) for i, item in enumerate(items)]
        ids = []
        with self._transaction():
            for prompt, responses in checked:
                tid = task_id(batch, prompt, responses)
                if self._get("task", tid) is None:
                    kind = PAIR if len(responses) == 2 else RANKING
                    self._put("task", tid, asdict(Task(tid, batch, prompt, responses, kind, time.time())))
                ids.append(tid)
        return ids

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

    def next_task(self, annotator: str) -> tuple[Task, Assignment] | None:
        """The annotator's open assignment, else a new one (see the module docstring); None when nothing is left."""
        now = time.time()
        with self._transaction():
            labelled = {(d["task_id"], d["annotator"]) for d in self._all("label")}
            assignments = [d for d in self._all("assignment") if (d["task_id"], d["annotator"]) not in labelled]
            for d in assignments:
                if d["annotator"] == annotator and self._live(d, now):
                    return self.task(d["task_id"]), Assignment(**d)
            taken: dict[str, int] = {}
            for tid, _ in labelled:
                taken[tid] = taken.get(tid, 0) + 1
            for d in assignments:
                if self._live(d, now):
                    taken[d["task_id"]] = taken.get(d["task_id"], 0) + 1
            mine = {tid for tid, who in labelled if who == annotator}
            for doc in self._all("task"):
                tid = doc["id"]
                if tid in mine or taken.get(tid, 0) >= self.annotators_per_task:
                    continue
                with self._rng_lock:
                    order = self.rng.sample(range(len(doc["responses"])), len(doc["responses"]))
                assignment = Assignment(tid, annotator, order, now)
                self._put("assignment", f"{tid}/{annotator}", asdict(assignment))
                return Task(**doc), assignment
        return None

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
        with self._transaction():
            task = self.task(tid)
            assignment = self.assignment(annotator, tid)
            order = assignment.order
            label = Label(tid, task.batch, annotator, task.kind, order, comment=comment[:2000])
            if task.kind == PAIR:
                if choice not in PAIR_CHOICES:
                    raise InvalidInput("choice", f"must be one of {', '.join(PAIR_CHOICES)}, got {choice!r}")
                # Shown A is original order[0]: "a" shown means original index order[0] is better.
                label.choice = choice if choice in ("tie", "both_bad") else "ab"[order["ab".index(choice)]]
            else:
                ranking = list(ranking or [])
                if sorted(ranking) != list(range(len(task.responses))):
                    raise InvalidInput(
                        "ranking",
                        f"must order all {len(task.responses)} shown positions (0..{len(task.responses) - 1}) "
                        f"once each, got {ranking}",
                    )
                label.ranking = [order[position] for position in ranking]
            label.assigned_at, label.labelled_at = assignment.assigned_at, time.time()
            self._put("label", f"{tid}/{annotator}", asdict(label))
        return label

    def queue_size(self) -> int:
        """Tasks that still need labels (fewer than ``annotators_per_task``)."""
        counts: dict[str, int] = {}
        for d in self._all("label"):
            counts[d["task_id"]] = counts.get(d["task_id"], 0) + 1
        return sum(counts.get(d["id"], 0) < self.annotators_per_task for d in self._all("task"))

    def progress(self, annotator: str) -> dict[str, int]:
        """{"labelled": labels by this annotator, "available": tasks this annotator could still be given}."""
        labels = self._all("label")
        mine = {d["task_id"] for d in labels if d["annotator"] == annotator}
        counts: dict[str, int] = {}
        for d in labels:
            counts[d["task_id"]] = counts.get(d["task_id"], 0) + 1
        available = sum(
            d["id"] not in mine and counts.get(d["id"], 0) < self.annotators_per_task for d in self._all("task")
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
        self._depth = 0
        self._db = sqlite3.connect(
            self.path, timeout=self.BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(f"BEGIN IMMEDIATE; {self.SCHEMA} COMMIT;")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                self._db.execute("COMMIT")

    def _put(self, kind: str, key: str, doc: dict) -> None:
        with self._transaction():
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


class RedisLabelStore(LabelStore):
    """Keys (P = key_prefix): ``P:labeling:KIND`` a hash key -> JSON document, ``P:labeling:KIND:order`` a sorted set
    of keys by first-put sequence (``P:labeling:seq``), ``P:labeling:lock`` the transaction lock."""

    LOCK_TIMEOUT_S = 30.0  # a holder that dies releases the lock after this long

    def __init__(self, url: str, key_prefix: str = "rlhf", **kwargs):
        super().__init__(**kwargs)
        self.client = redis.Redis.from_url(url)
        self.prefix = f"{key_prefix}:labeling"
        self._local = threading.local()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth = depth
            return
        with self.client.lock(f"{self.prefix}:lock", timeout=self.LOCK_TIMEOUT_S, blocking_timeout=60):
            self._local.depth = 1
            try:
                yield
            finally:
                self._local.depth = 0

    def _put(self, kind: str, key: str, doc: dict) -> None:
        pipe = self.client.pipeline(transaction=True)
        if self.client.zscore(f"{self.prefix}:{kind}:order", key) is None:
            pipe.zadd(f"{self.prefix}:{kind}:order", {key: self.client.incr(f"{self.prefix}:seq")})
        pipe.hset(f"{self.prefix}:{kind}", key, json.dumps(doc))
        pipe.execute()

    def _get(self, kind: str, key: str) -> dict | None:
        raw = self.client.hget(f"{self.prefix}:{kind}", key)
        return json.loads(raw) if raw is not None else None

    def _all(self, kind: str) -> list[dict]:
        keys = self.client.zrange(f"{self.prefix}:{kind}:order", 0, -1)
        if not keys:
            return []
        return [json.loads(raw) for raw in self.client.hmget(f"{self.prefix}:{kind}", keys) if raw is not None]

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
    return RedisLabelStore(config.url, config.key_prefix, **kwargs)
