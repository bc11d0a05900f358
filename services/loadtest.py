"""Load test of the reward service's public API: concurrent clients over REST (``POST /v1/score``), then over gRPC
(``rlhf.v1.Reward/Score``), against the service started in this process on loopback, with a bearer token as an
outside client sends it. A tiny reward model built offline unless ``--model`` names one.

Reports per transport: requests/s, pairs/s, latency p50/p99, errors, and the pairs per model call the batching queue
formed; then the same model's raw batched forward in this process (no server), and the ratio of the two throughputs.

    python -m services.loadtest --clients 64 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

TOKEN = "loadtest-token-0123456789abcdef"


@dataclass
class LoadResult:
    transport: str
    clients: int
    seconds: float
    pairs_per_request: int
    requests: int = 0
    errors: int = 0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)  # seconds, of the requests that succeeded
    model_calls: int = 0
    model_pairs: int = 0
    model_seconds: float = 0.0  # time the model thread spent in model calls
    server_cpu_seconds: float = 0.0  # CPU time of the service's process (event loop, model thread, gRPC threads)
    client_cpu_seconds: float = 0.0  # CPU time of the clients' process

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def pairs_per_s(self) -> float:
        return self.requests * self.pairs_per_request / self.seconds

    def latency_ms(self, quantile: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1e3 * ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]

    @property
    def model_busy(self) -> float:
        """Share of the wall time the model thread was scoring."""
        return self.model_seconds / self.seconds

    @property
    def model_pairs_per_s(self) -> float:
        """Pairs per second of model time: the forward's own speed, whatever the time between calls."""
        return self.model_pairs / self.model_seconds if self.model_seconds else float("nan")

    @property
    def pairs_per_model_call(self) -> float:
        return self.model_pairs / self.model_calls if self.model_calls else float("nan")

    def summary(self) -> dict:
        return {
            "transport": self.transport,
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "requests_per_s": round(self.requests_per_s, 1),
            "pairs_per_s": round(self.pairs_per_s, 1),
            "p50_ms": round(self.latency_ms(0.5), 2),
            "p99_ms": round(self.latency_ms(0.99), 2),
            "errors": self.errors,
            "pairs_per_model_call": round(self.pairs_per_model_call, 1),
            "model_busy": round(self.model_busy, 3),
            "model_pairs_per_s": round(self.model_pairs_per_s, 1),
            "server_cores": round(self.server_cpu_seconds / self.seconds, 2),
            "client_cores": round(self.client_cpu_seconds / self.seconds, 2),
        }


def workload(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, response) pairs in the tiny corpus's style, a few words each."""
    from shared.tiny_models import NEGATIVE_WORDS, POSITIVE_WORDS, prompts

    rng = random.Random(seed)
    words = POSITIVE_WORDS + NEGATIVE_WORDS
    return [(p, " " + " ".join(rng.choices(words, k=rng.randint(3, 12))) + ".") for p in prompts(n, seed)]


def _model_calls() -> tuple[float, float, float]:
    """(model calls, pairs, seconds) the reward service has recorded so far (its Prometheus metrics)."""
    from prometheus_client import REGISTRY

    labels = {"role": "reward"}
    return (
        REGISTRY.get_sample_value("rlhf_batch_size_count", labels) or 0.0,
        REGISTRY.get_sample_value("rlhf_batch_size_sum", labels) or 0.0,
        REGISTRY.get_sample_value("rlhf_model_forward_seconds_sum", labels) or 0.0,
    )


@contextlib.asynccontextmanager
async def reward_service(model_dir: Path, work: Path, batching: dict | None = None) -> AsyncIterator:
    """The reward service on loopback (gRPC and REST, token required); yields (server, backend)."""
    from services.reward.backend import load_backend
    from services.reward.config import RewardConfig
    from services.reward.servicer import build_server

    token_file = work / "token"
    token_file.write_text(TOKEN + "\n")
    config = RewardConfig.model_validate(
        {
            "model": {"path": str(model_dir)},
            "server": {"host": "127.0.0.1", "port": 0, "http_port": 0},
            "auth": {"token_file": str(token_file)},
            "batching": batching or {},
        }
    )
    backend = load_backend(config)
    server, _ = await build_server(config, backend)
    await server.start()
    await server.set_serving(True)
    try:
        yield server, backend
    finally:
        await server.stop(None)


async def _drive(result: LoadResult, call, pairs: list[tuple[str, str]]) -> None:
    """``result.clients`` clients, each sending ``call(pairs)`` back to back for ``result.seconds``."""
    size = result.pairs_per_request
    stop_at = time.perf_counter() + result.seconds

    async def client(index: int) -> None:
        rng = random.Random(index)
        while time.perf_counter() < stop_at:
            start = rng.randrange(len(pairs) - size)
            sent = time.perf_counter()
            try:
                scores = await call(pairs[start : start + size])
                if len(scores) != size:
                    raise RuntimeError(f"{len(scores)} scores for {size} pairs")
            except Exception as exc:
                result.errors += 1
                result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
                continue
            result.latencies.append(time.perf_counter() - sent)
            result.requests += 1

    began = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(result.clients)))
    result.seconds = time.perf_counter() - began


async def load_rest(port: int, clients: int, seconds: float, pairs: list, pairs_per_request: int) -> LoadResult:
    import aiohttp

    result = LoadResult("REST", clients, seconds, pairs_per_request)
    url = f"http://127.0.0.1:{port}/v1/score"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def call(batch):
            body = {"prompts": [p for p, _ in batch], "responses": [r for _, r in batch]}
            async with session.post(url, json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
                return (await response.json())["scores"]

        await _drive(result, call, pairs)
    return result


async def load_grpc(port: int, clients: int, seconds: float, pairs: list, pairs_per_request: int) -> LoadResult:
    import grpc

    from shared.proto.rlhf.v1 import reward_pb2, reward_pb2_grpc

    result = LoadResult("gRPC", clients, seconds, pairs_per_request)
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = reward_pb2_grpc.RewardStub(channel)

    async def call(batch):
        request = reward_pb2.ScoreRequest(prompts=[p for p, _ in batch], responses=[r for _, r in batch])
        return (await stub.Score(request, metadata=metadata, timeout=60)).scores

    try:
        await _drive(result, call, pairs)
    finally:
        await channel.close()
    return result


def drive(transport: str, port: int, clients: int, seconds: float, pairs: list, pairs_per_request: int) -> LoadResult:
    """The clients of one transport, run to the end (in the client process)."""
    load = {"rest": load_rest, "grpc": load_grpc}[transport]
    started = time.process_time()
    result = asyncio.run(load(port, clients, seconds, pairs, pairs_per_request))
    result.client_cpu_seconds = time.process_time() - started
    return result


async def measure(transport: str, port: int, clients: int, seconds: float, pairs: list, pairs_per_request: int):
    """The clients run in a process of their own, as outside clients would: the service's event loop and model thread
    do only the service's work. The model calls the service made meanwhile are read here, in the service's process."""
    before, cpu_before = _model_calls(), time.process_time()
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        result = await asyncio.get_running_loop().run_in_executor(
            pool, drive, transport, port, clients, seconds, pairs, pairs_per_request
        )
    calls, pairs_scored, seconds = (after - earlier for after, earlier in zip(_model_calls(), before, strict=True))
    result.model_calls, result.model_pairs, result.model_seconds = int(calls), int(pairs_scored), seconds
    result.server_cpu_seconds = time.process_time() - cpu_before
    return result


def raw_forward(backend, pairs: list, batch_size: int, seconds: float) -> LoadResult:
    """The same model's batched forward called directly, back to back (``backend.score_and_count``)."""
    result = LoadResult("raw forward", 1, seconds, batch_size)
    backend.score_and_count(pairs[:batch_size])  # untimed: a fresh thread's first call sets up its thread pools
    cpu_before = time.process_time()
    stop_at = time.perf_counter() + seconds
    began = time.perf_counter()
    index = 0
    while time.perf_counter() < stop_at:
        batch = [pairs[(index + i) % len(pairs)] for i in range(batch_size)]
        index += batch_size
        sent = time.perf_counter()
        backend.score_and_count(batch)
        result.latencies.append(time.perf_counter() - sent)
        result.requests += 1
    result.seconds = time.perf_counter() - began
    result.model_calls, result.model_pairs = result.requests, result.requests * batch_size
    result.model_seconds = sum(result.latencies)
    result.server_cpu_seconds = time.process_time() - cpu_before
    return result


async def run(
    model_dir: Path,
    clients: int = 64,
    seconds: float = 60.0,
    pairs_per_request: int = 4,
    batching: dict | None = None,
    transports: tuple[str, ...] = ("rest", "grpc"),
    raw_seconds: float = 0.0,
) -> list[LoadResult]:
    """Each transport in turn; with ``raw_seconds``, the raw forward (at the batch all clients together send) before
    each transport and after the last, each transport's ratio taken against the mean of the two around it (the
    machine's speed drifts when others share it)."""
    pairs = workload(4096)
    batch = clients * pairs_per_request
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        async with reward_service(model_dir, Path(tmp), batching) as (server, backend):
            await asyncio.to_thread(backend.score_and_count, pairs[:batch])  # warm-up
            ports = {"rest": server.http_port, "grpc": server.port}
            for transport in transports:
                if raw_seconds:
                    results.append(await asyncio.to_thread(raw_forward, backend, pairs, batch, raw_seconds))
                results.append(await measure(transport, ports[transport], clients, seconds, pairs, pairs_per_request))
            if raw_seconds:
                results.append(await asyncio.to_thread(raw_forward, backend, pairs, batch, raw_seconds))
    return results


def baselines(results: list[LoadResult]) -> dict[int, float]:
    """Raw-forward pairs/s around each transport's result (by its index in ``results``)."""
    raw = {i: r.pairs_per_s for i, r in enumerate(results) if r.transport == "raw forward"}
    return {
        i: statistics.fmean(raw[j] for j in (i - 1, i + 1) if j in raw)
        for i, r in enumerate(results)
        if r.transport != "raw forward" and (i - 1 in raw or i + 1 in raw)
    }


def print_table(results: list[LoadResult]) -> None:
    around = baselines(results)
    print(
        f"{'':>12} {'clients':>7} {'req/s':>8} {'pairs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} "
        f"{'pairs/call':>10} {'model busy':>10} {'in-model pairs/s':>16} {'cores: server':>13} {'clients':>7} "
        f"{'vs raw':>7}"
    )
    for i, r in enumerate(results):
        ratio = f"{r.pairs_per_s / around[i]:>6.2f}x" if i in around else ""
        print(
            f"{r.transport:>12} {r.clients:>7} {r.requests_per_s:>8.1f} {r.pairs_per_s:>9.1f} "
            f"{r.latency_ms(0.5):>8.2f} {r.latency_ms(0.99):>8.2f} {r.errors:>6} {r.pairs_per_model_call:>10.1f} "
            f"{r.model_busy:>10.0%} {r.model_pairs_per_s:>16.1f} {r.server_cpu_seconds / r.seconds:>13.2f} "
            f"{r.client_cpu_seconds / r.seconds:>7.2f} {ratio:>7}"
        )
    for r in results:
        if r.first_error:
            print(f"{r.transport}: first error: {r.first_error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0, help="per transport")
    parser.add_argument("--pairs-per-request", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=float, help="the service's batching.max_wait_ms (default: its default)")
    parser.add_argument("--max-pairs", type=int, help="the service's batching.max_pairs (default: its default)")
    parser.add_argument("--model", type=Path, help="a reward model directory (default: a tiny one built here)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the model built here")
    parser.add_argument("--layers", type=int, default=2, help="layers of the model built here")
    parser.add_argument("--raw-seconds", type=float, default=10.0, help="time of the raw-forward baseline")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)

    batching = {
        key: value
        for key, value in (("max_wait_ms", args.max_wait_ms), ("max_pairs", args.max_pairs))
        if value is not None
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from shared.tiny_models import build_reward_model

            model_dir = build_reward_model(Path(tmp) / "reward", hidden=args.hidden, layers=args.layers)
        results = asyncio.run(
            run(
                model_dir,
                args.clients,
                args.seconds,
                args.pairs_per_request,
                batching,
                raw_seconds=args.raw_seconds,
            )
        )
    print(
        f"reward API load test: {args.clients} clients x {args.seconds:.0f} s per transport, "
        f"{args.pairs_per_request} pairs per request, batching {batching or 'defaults'}"
    )
    print_table(results)
    if args.json:
        print(json.dumps([r.summary() for r in results]))
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
