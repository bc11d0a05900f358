"""A run as the store keeps it: one JSON document (config, state, progress), written whole, one write at a time.

The document holds what a restarted orchestrator needs to resume the run where it was: its config (with the seed),
its state, the last completed iteration, the dataset cursor after it, the policy (epoch, version) it reached, and
the newest trainer checkpoint that covers it. Iteration records and pending steps are stored beside it, keyed by
(run, iteration).
"""

from __future__ import annotations

import asyncio
import copy
import enum
import time

from shared.store import Store


class RunState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    COMPLETED = "completed"
    FAILED = "failed"


ACTIVE = (RunState.STARTING, RunState.RUNNING, RunState.STOPPING)  # states a restarted orchestrator resumes


class RunDocument:
    """The run's document in memory and in the store: every change is written through, whole, in order."""

    def __init__(self, store: Store, run_id: str, doc: dict):
        self.store = store
        self.run_id = run_id
        self.doc = doc
        self._lock = asyncio.Lock()  # one write at a time, so an older snapshot never lands after a newer one

    @classmethod
    def new(cls, store: Store, run_id: str, config: dict) -> RunDocument:
        now = time.time()
        doc = {
            "run_id": run_id,
            "config": config,
            "state": RunState.STARTING.value,
            "iteration": 0,  # last completed
            "cursor": {"epoch": 0, "position": 0},  # the dataset walk after that iteration
            "policy_version": 0,
            "policy_epoch": 0,
            "checkpoint": None,  # {"directory", "iteration"}: the newest trainer checkpoint covering this run
            "resumed": 0,  # times a restarted orchestrator took the run up again
            "error": None,
            "summary": None,
            "created": now,
            "updated": now,
        }
        return cls(store, run_id, doc)

    @property
    def state(self) -> RunState:
        return RunState(self.doc["state"])

    def _snapshot(self, changes: dict) -> dict:
        self.doc.update(changes, updated=time.time())
        return copy.deepcopy(self.doc)

    async def save(self, **changes) -> None:
        async with self._lock:
            snapshot = self._snapshot(changes)
            await asyncio.to_thread(self.store.put_run, self.run_id, snapshot)

    async def commit(self, record: dict, **changes) -> None:
        """An iteration's record (keyed by its ``iteration``) and the document, in one atomic write."""
        async with self._lock:
            snapshot = self._snapshot(changes)
            await asyncio.to_thread(self.store.commit_iteration, self.run_id, record["iteration"], record, snapshot)
