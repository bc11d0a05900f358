"""Model work on one executor thread per device, behind a queue that can merge concurrent requests.

gRPC handlers run on the event loop; a forward pass must not block it. Every model call goes through the
service's one ``ModelWorker``, so requests never run concurrently on a model (no half-updated weights, no
interleaved CUDA work), and ``queue_depth`` says how many wait.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from shared.metrics import QUEUE_DEPTH

T = TypeVar("T")


class ModelWorker:
    """Runs callables one at a time on a dedicated thread."""

    def __init__(self, role: str):
        self.role = role
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{role}-model")
        self._pending = 0

    @property
    def queue_depth(self) -> int:
        return self._pending

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        self._pending += 1
        QUEUE_DEPTH.labels(self.role).set(self._pending)
        try:
            # The caller's context (run id, iteration for log lines) goes along to the model thread.
            call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
            return await loop.run_in_executor(self._executor, call)
        finally:
            self._pending -= 1
            QUEUE_DEPTH.labels(self.role).set(self._pending)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class BatchingQueue:
    """Merges requests that arrive together into one model call of up to ``max_batch`` items.

    ``process(items) -> results`` must be item-wise (result i belongs to item i), as scoring and log-probs are.
    A request larger than ``max_batch`` runs on its own, in one call: ``process`` does its own micro-batching.
    """

    def __init__(self, worker: ModelWorker, process: Callable[[list], Sequence], max_batch: int):
        self._worker = worker
        self._process = process
        self._max_batch = max_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, items: list) -> list:
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((items, future))
        return await future

    async def _loop(self) -> None:
        assert self._queue is not None
        while True:
            group = [await self._queue.get()]
            count = len(group[0][0])
            while not self._queue.empty() and count < self._max_batch:
                items, future = self._queue.get_nowait()
                group.append((items, future))
                count += len(items)
            merged = [item for items, _ in group for item in items]
            try:
                results = await self._worker.run(self._process, merged)
            except Exception as exc:  # each caller gets the error of the merged call
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for items, future in group:
                if not future.done():
                    future.set_result(list(results[start : start + len(items)]))
                start += len(items)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
