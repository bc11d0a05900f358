"""Model work on the service's one model thread, behind a queue that can merge concurrent requests.

gRPC handlers run on the event loop; a forward pass must not block it. Every model call goes through the
service's one ``ModelWorker``, so requests never run concurrently on a model (no half-updated weights, no
interleaved CUDA work), and ``queue_depth`` says how many wait.

A service does all its torch work on one thread, its role's ``model_thread``: loading, warm-up and every call
after. torch's CPU kernels run on an OpenMP thread team that belongs to the thread that calls them; a second calling
thread gets a second team, and from then on the process's kernels ran about 1.5x slower on 2 cores (measured at
19M parameters: generation 0.42 s on one thread, 0.62-0.64 s once the model had been loaded on another).
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


_MODEL_THREADS: dict[str, concurrent.futures.ThreadPoolExecutor] = {}


def model_thread(role: str) -> concurrent.futures.ThreadPoolExecutor:
    """The one thread of this process that does ``role``'s torch work (created on first use, kept for the life of
    the process). A service process serves one role, so all its torch work is on one thread; tests that run several
    services in one process give each its own, as their processes would (one service may call another's API)."""
    if role not in _MODEL_THREADS:
        _MODEL_THREADS[role] = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{role}-model")
    return _MODEL_THREADS[role]


class ModelWorker:
    """Runs callables one at a time on ``role``'s model thread."""

    def __init__(self, role: str):
        self.role = role
        self._executor = model_thread(role)
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
        """Nothing to stop: the role's model thread lives as long as the process (it is also where the model was
        loaded)."""


class BatchingQueue:
    """Merges requests that arrive together into one model call of up to ``max_batch`` items.

    Once a request is taken, the queue waits up to ``max_wait_s`` for more to merge with it (0: it merges only
    what is already queued, which under load is everything that arrived while the previous call ran). A request
    that would take the merged call past ``max_batch`` waits for the next one; a request larger than ``max_batch``
    runs on its own, in one call (``process`` does its own micro-batching).

    ``process(items) -> results`` must be item-wise (result i belongs to item i), as scoring and log-probs are.
    """

    def __init__(
        self, worker: ModelWorker, process: Callable[[list], Sequence], max_batch: int, max_wait_s: float = 0.0
    ):
        self._worker = worker
        self._process = process
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, items: list) -> list:
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((items, future))
        return await future

    async def _next(self, deadline: float) -> tuple[list, asyncio.Future] | None:
        """The next queued request, waiting until ``deadline`` (loop time) at most; None when none came."""
        assert self._queue is not None
        if not self._queue.empty():
            return self._queue.get_nowait()
        timeout = deadline - asyncio.get_running_loop().time()
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def _group(self, first: tuple[list, asyncio.Future]) -> tuple[list, tuple | None]:
        """The requests merged with ``first``, and the one left over for the next call (it did not fit)."""
        group, count = [first], len(first[0])
        deadline = asyncio.get_running_loop().time() + self._max_wait_s
        while count < self._max_batch:
            entry = await self._next(deadline)
            if entry is None:
                return group, None
            if count + len(entry[0]) > self._max_batch:
                return group, entry
            group.append(entry)
            count += len(entry[0])
        return group, None

    async def _loop(self) -> None:
        assert self._queue is not None
        left_over = None
        while True:
            group, left_over = await self._group(left_over or await self._queue.get())
            group = [(items, future) for items, future in group if not future.done()]  # callers that gave up
            if not group:
                continue
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
