"""Transport benchmarks: figures printed side by side with a baseline measured in the same run (ratios, since these
machines are noisy).

1. Weight sync: one new policy version from a trainer process to a generation process on loopback, as the
   orchestrator's ``sync_weights`` does it (generation's PullWeights reads the trainer's StreamWeights, assembles the
   tensors and swaps them in), timed end to end; against a raw TCP socket on 127.0.0.1 moving the same bytes in the
   same message sizes (the baseline). A breakdown says where the time goes: the trainer's stream read by this
   process alone (no loading), and in this process the CPU work of each side (copy + chunk + serialize; parse +
   assemble + load).
2. Rollout throughput with N generation processes (1 CPU thread each) driven by the orchestrator's replica-balancing
   client, the same batch split across them; against one replica (the baseline): scaling efficiency
   = throughput_N / (N x throughput_1).

    python -m services.bench_transport --sync-repeats 5 --rollout-repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

SERVER = {"port": 0, "grace_seconds": 0}  # nothing is in flight when the bench stops them
# build_policy(hidden=512, layers=7): 18.9M parameters, 75.4 MB of float32 on the wire.
SYNC_HIDDEN, SYNC_LAYERS = 512, 7
RECEIVE_BYTES = 1024 * 1024  # the raw socket's receive buffer


def _timed_runs(repeats: int, fn) -> list:
    """``fn()`` once to warm up, then ``repeats`` times; the results of the timed runs."""
    fn()
    return [fn() for _ in range(repeats)]


# -- 1. weight sync ----------------------------------------------------------------------------------------------


def _train_step_request(run_id: str, iteration: int) -> bytes:
    """A two-sample TrainStep (ids below 256: inside any byte-level vocabulary): only there to move the trainer's
    policy version on."""
    from services.trainer.servicer import rollout_to_pb
    from shared.types import RolloutBatch

    generator = torch.Generator().manual_seed(iteration)
    responses = [torch.randint(10, 256, (4,), generator=generator) for _ in range(2)]
    batch = RolloutBatch(
        prompt_ids=[torch.randint(10, 256, (6,), generator=generator) for _ in range(2)],
        response_ids=responses,
        scores=torch.tensor([1.0, -1.0]),
        reference_logprobs=[torch.full((4,), -5.0) for _ in responses],
        generation_logprobs=[torch.full((4,), -5.0) for _ in responses],
    )
    return rollout_to_pb(batch, run_id, iteration).SerializeToString()


async def _time_syncs(trainer_address: str, generation_address: str, auth, repeats: int) -> dict:
    """Per repeat (and one warm-up): a TrainStep (not timed), then the orchestrator's sync of the new version;
    then the trainer's stream alone, read by this process. Seconds and bytes of the timed runs."""
    from services.orchestrator.clients import GrpcGeneration, GrpcTrainer
    from services.orchestrator.config import PeersConfig, RpcConfig
    from shared.proto.rlhf.v1 import trainer_pb2, trainer_pb2_grpc
    from shared.server import ServerConfig, grpc_options

    peers = PeersConfig(generation=[generation_address], trainer=trainer_address)
    generation, trainer = GrpcGeneration(peers, RpcConfig(), auth), GrpcTrainer(peers, RpcConfig(), auth)
    # What generation's PullWeights asks the trainer for (services/generation/servicer.py).
    max_message_bytes = ServerConfig().max_message_bytes
    chunk_bytes = max(1024, max_message_bytes // 2)
    try:
        syncs = []
        for iteration in range(repeats + 1):
            await trainer.train_step(_train_step_request("bench-transport", iteration + 1))
            state = await trainer.get_state()
            sync = await generation.sync_weights(state.version, state.epoch)
            if sync.bytes == 0 or not generation.pool.usable():
                raise RuntimeError(f"weight sync of version {state.version} failed: {generation.pool.describe()}")
            syncs.append(sync)
        syncs = syncs[1:]

        streams = []
        async with auth.open_channel(trainer_address, "trainer", grpc_options(max_message_bytes)) as channel:
            stub = trainer_pb2_grpc.TrainerStub(channel)
            for _ in range(repeats + 1):
                start = time.perf_counter()
                sizes = [
                    len(chunk.data)
                    async for chunk in stub.StreamWeights(trainer_pb2.StreamWeightsRequest(chunk_bytes=chunk_bytes))
                ]
                streams.append((time.perf_counter() - start, sizes))
        streams = streams[1:]
    finally:
        await generation.close()
        await trainer.channel.close()
    return {
        "bytes": syncs[0].bytes,
        "sync_seconds": statistics.median(s.seconds for s in syncs),
        "stream_seconds": statistics.median(seconds for seconds, _ in streams),
        "chunk_bytes": chunk_bytes,
        "message_bytes": streams[0][1],  # data bytes of each message of one stream, in order
    }


def raw_socket_seconds(message_bytes: list[int], repeats: int) -> float:
    """Median seconds to move ``sum(message_bytes)`` over a fresh TCP connection on 127.0.0.1: the client
    ``sendall()``s one message size at a time, a server thread reads into a buffer and discards, then acknowledges
    (so the time covers delivery, as a sync's reply does)."""
    total = sum(message_bytes)
    payload = memoryview(bytes(max(message_bytes)))
    errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(60)
        port = server.getsockname()[1]

        def receive() -> None:
            buffer = bytearray(RECEIVE_BYTES)
            try:
                for _ in range(repeats + 1):
                    connection, _ = server.accept()
                    with connection:
                        connection.settimeout(60)
                        left = total
                        while left:
                            received = connection.recv_into(buffer, min(len(buffer), left))
                            if not received:
                                raise ConnectionError(f"raw socket closed with {left} bytes to go")
                            left -= received
                        connection.sendall(b"k")
            except BaseException as exc:  # reported by the caller, whose recv then fails too
                errors.append(exc)

        thread = threading.Thread(target=receive, name="raw-socket-receiver", daemon=True)
        thread.start()

        def send() -> float:
            start = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
                for size in message_bytes:
                    client.sendall(payload[:size])
                if client.recv(1) != b"k":
                    raise ConnectionError(f"raw socket receiver failed: {errors}")
            return time.perf_counter() - start

        try:
            samples = _timed_runs(repeats, send)
        finally:
            thread.join(timeout=60)
    if errors:
        raise errors[0]
    return statistics.median(samples)


def cpu_breakdown(policy: Path, chunk_bytes: int, repeats: int) -> dict:
    """The CPU work of each side of a sync, in this process on one thread, with the project's own functions:
    the trainer's (copy each tensor, chunk, serialize each message) and generation's (parse each message,
    assemble, load in place). Median seconds; and the model's parameters and tensor bytes."""
    from transformers import LlamaForCausalLM

    from shared.proto.rlhf.v1 import weights_pb2
    from shared.weights import WeightAssembler, chunk_weights, load_unique_state, tied_aliases, unique_state

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each service runs (cpu_threads: 1)
    try:
        model = LlamaForCausalLM.from_pretrained(policy)
        state = unique_state(model)
        wires: list[bytes] = []

        def serialize() -> float:
            start = time.perf_counter()
            tensors = [(name, t.detach().to("cpu", copy=True).contiguous()) for name, t in state.items()]
            wires[:] = [chunk.SerializeToString() for chunk in chunk_weights(tensors, 1, chunk_bytes)]
            return time.perf_counter() - start

        def load() -> float:
            start = time.perf_counter()
            assembler = WeightAssembler(unique_state(model), 0, tied_aliases(model))
            for wire in wires:
                assembler.add(weights_pb2.WeightChunk.FromString(wire))
            load_unique_state(model, assembler.finish())
            return time.perf_counter() - start

        serialize_seconds = statistics.median(_timed_runs(repeats, serialize))
        load_seconds = statistics.median(_timed_runs(repeats, load))
    finally:
        torch.set_num_threads(threads)
    return {
        "parameters": sum(t.numel() for t in state.values()),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "serialize_seconds": serialize_seconds,
        "load_seconds": load_seconds,
    }


def bench_weight_sync(policy: Path, work: Path, repeats: int = 5) -> dict:
    """One policy version trainer -> generation, both ``rlhf serve`` processes on loopback with tokens as deployed
    (``secure_configs``); median of ``repeats`` after a warm-up, against the raw socket (same bytes, same message
    sizes, same repeats). Bytes are the weight bytes on the wire (tensor data, without protobuf framing)."""
    from services.launcher import Launcher, secure_configs
    from shared.auth import AuthConfig, ClientAuth

    load_average = os.getloadavg()[0]
    model = {"path": str(policy), "cpu_threads": 1}
    configs = {
        "trainer": {
            "server": SERVER,
            "policy": model,
            "ppo": {"ppo_epochs": 1, "minibatch_size": 2, "micro_batch_size": 2},
        },
        "generation": {"server": SERVER, "model": model},
    }
    with Launcher(work / "sync-processes") as launcher:
        configs, auth = secure_configs(launcher, configs)
        processes = [launcher.start(role, ["serve", role], config) for role, config in configs.items()]
        for process in processes:
            process.wait_ready(180)
        trainer, generation = processes
        client_auth = ClientAuth.load(AuthConfig.model_validate(auth))
        sync = asyncio.run(_time_syncs(trainer.address, generation.address, client_auth, repeats))
    raw = raw_socket_seconds(sync["message_bytes"], repeats)
    cpu = cpu_breakdown(policy, sync["chunk_bytes"], repeats)
    result = {
        **sync,
        **cpu,
        "repeats": repeats,
        "load_average": load_average,
        "raw_seconds": raw,
        "sync_bytes_per_s": sync["bytes"] / sync["sync_seconds"],
        "stream_bytes_per_s": sync["bytes"] / sync["stream_seconds"],
        "raw_bytes_per_s": sync["bytes"] / raw,
    }
    result["ratio"] = result["sync_bytes_per_s"] / result["raw_bytes_per_s"]
    return result


def print_weight_sync(result: dict) -> None:
    messages = result["message_bytes"]
    print(
        f"weight sync: one policy version trainer -> generation (PullWeights <- StreamWeights), two processes on "
        f"loopback, {result['parameters'] / 1e6:.1f}M parameters float32; median of {result['repeats']} after a "
        f"warm-up; baseline: a raw TCP socket on 127.0.0.1 moving the same bytes in the same {len(messages)} "
        f"message sizes (largest {max(messages) / 1e6:.1f} MB); load average at the start "
        f"{result['load_average']:.1f} on {os.cpu_count()} cores"
    )
    print(f"{'bytes':>10} {'sync MB/s':>10} {'raw socket MB/s':>16} {'sync / raw':>11}")
    print(
        f"{result['bytes'] / 1e6:>7.1f} MB {result['sync_bytes_per_s'] / 1e6:>10.0f} "
        f"{result['raw_bytes_per_s'] / 1e6:>16.0f} {result['ratio']:>10.3f}x"
    )
    print("where the time goes (median seconds):")
    rows = [
        ("sync end to end (orchestrator's sync_weights)", result["sync_seconds"]),
        ("  trainer's stream read by this process, no load", result["stream_seconds"]),
        ("  trainer CPU: copy + chunk + serialize (in process)", result["serialize_seconds"]),
        ("  generation CPU: parse + assemble + load (in process)", result["load_seconds"]),
        ("raw socket, same bytes", result["raw_seconds"]),
    ]
    for label, seconds in rows:
        print(f"  {label:<54} {seconds:>7.3f} s {result['bytes'] / seconds / 1e6:>7.0f} MB/s")


# -- 2. rollout throughput with N generation replicas ---------------------------------------------------------------


def replica_counts(cores: int | None = None) -> list[int]:
    """1, 2, then powers of two up to the core count, and the core count itself."""
    cores = max(2, cores or os.cpu_count() or 2)
    counts = {1, 2, cores}
    counts.update(2**k for k in range(2, cores.bit_length()) if 2**k <= cores)
    return sorted(counts)


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used (Linux /proc; nan elsewhere)."""
    try:
        ticks = 0
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return float("nan")


async def _time_rollouts(
    addresses: list[str], pids: list[int], prompts: list[str], max_new_tokens: int, repeats: int
) -> dict:
    from services.orchestrator.clients import GrpcGeneration
    from services.orchestrator.config import PeersConfig, RpcConfig
    from shared.types import SamplingParams

    # No trainer: the pool takes the weights the replicas serve (version 0), as a sampling-only client does.
    generation = GrpcGeneration(PeersConfig(generation=addresses), RpcConfig())
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=0)
    try:
        runs = []
        for run in range(repeats + 1):
            if run == 1:  # after the warm-up
                cpu_before = _cpu_seconds(pids)
            start = time.perf_counter()
            rollouts = await generation.generate(prompts, params)
            runs.append((time.perf_counter() - start, len(rollouts.texts), sum(rollouts.response_lengths)))
            if len(generation.pool.usable()) != len(addresses):
                raise RuntimeError(f"not every replica took a share: {generation.pool.describe()}")
        runs = runs[1:]
        replica_cpu_seconds = _cpu_seconds(pids) - cpu_before
    finally:
        await generation.close()
    return {
        "replicas": len(addresses),
        "seconds": statistics.median(seconds for seconds, _, _ in runs),
        "samples": runs[-1][1],
        "tokens": runs[-1][2],
        "samples_per_s": statistics.median(samples / seconds for seconds, samples, _ in runs),
        "tokens_per_s": statistics.median(tokens / seconds for seconds, _, tokens in runs),
        # CPU the replicas used over the wall time of the timed runs: below N, they waited (for a core, the client)
        "replica_cores": replica_cpu_seconds / sum(seconds for seconds, _, _ in runs),
    }


def bench_rollouts(
    policy: Path,
    work: Path,
    replicas: list[int] | None = None,
    prompts: int = 64,
    max_new_tokens: int = 32,
    repeats: int = 3,
) -> dict:
    """The same batch (``prompts`` x ``max_new_tokens``, seed 0) through the orchestrator's replica pool with each N
    of ``replicas`` (default ``replica_counts()``) generation processes; median of ``repeats`` after a warm-up.
    Efficiency: throughput_N / (N x throughput_1)."""
    from services.launcher import Launcher
    from shared.tiny_models import prompts as prompt_texts

    load_average = os.getloadavg()[0]
    replicas = sorted(set(replicas or replica_counts()) | {1})
    batch = prompt_texts(prompts)
    config = {"server": SERVER, "model": {"path": str(policy), "cpu_threads": 1}}
    with Launcher(work / "rollout-processes") as launcher:
        processes = [launcher.start(f"generation-{i}", ["serve", "generation"], config) for i in range(max(replicas))]
        for process in processes:
            process.wait_ready(180)
        addresses, pids = [p.address for p in processes], [p.process.pid for p in processes]
        rows = [asyncio.run(_time_rollouts(addresses[:n], pids[:n], batch, max_new_tokens, repeats)) for n in replicas]
    one = rows[0]
    for row in rows:
        row["speed_up"] = row["tokens_per_s"] / one["tokens_per_s"]
        row["efficiency"] = row["speed_up"] / row["replicas"]
    return {
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "cores": os.cpu_count(),
        "load_average": load_average,
        "rows": rows,
    }


def print_rollouts(result: dict) -> None:
    cores = result["cores"]
    meaningful = "only N=1,2 are meaningful" if cores <= 2 else f"N above {cores} share cores"
    print(
        f"rollouts: {result['prompts']} prompts x {result['max_new_tokens']} new tokens (seed 0) through the "
        f"orchestrator's replica pool, N generation processes (1 CPU thread each) on loopback; median of "
        f"{result['repeats']} after a warm-up; baseline: N=1. This machine has {cores} cores, shared with the "
        f"client: {meaningful}; load average at the start {result['load_average']:.1f}"
    )
    print(
        f"{'replicas':>8} {'seconds':>8} {'samples/s':>10} {'tokens/s':>9} {'speed-up':>9} {'efficiency':>10} "
        f"{'replica cores busy':>18}"
    )
    for row in result["rows"]:
        print(
            f"{row['replicas']:>8} {row['seconds']:>8.2f} {row['samples_per_s']:>10.1f} {row['tokens_per_s']:>9.0f} "
            f"{row['speed_up']:>8.2f}x {row['efficiency']:>10.0%} {row['replica_cores']:>18.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=SYNC_HIDDEN, help="policy hidden size (both sections)")
    parser.add_argument("--layers", type=int, default=SYNC_LAYERS, help="policy layers (both sections)")
    parser.add_argument("--sync-repeats", type=int, default=5)
    parser.add_argument("--rollout-repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--replicas",
        type=lambda s: [int(n) for n in s.split(",")],
        default=None,
        help="e.g. 1,2 (default: 1, 2, powers of two up to the core count, the core count)",
    )
    args = parser.parse_args(argv)

    from shared.tiny_models import build_policy

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        policy = build_policy(work / "policy", hidden=args.hidden, layers=args.layers)
        print_weight_sync(bench_weight_sync(policy, work, args.sync_repeats))
        print()
        print_rollouts(
            bench_rollouts(policy, work, args.replicas, args.prompts, args.max_new_tokens, args.rollout_repeats)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
