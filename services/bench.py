"""``make bench``: figures printed side by side with a baseline measured in the same run (ratios, since these
machines are noisy).

1. The services' overhead: the same PPO loop (tiny pretrained policy, rule-based reward, same seeds) with the
   in-process clients (the backends called directly: the baseline) and over gRPC with every role its own process.
2. The wire format: encoding and decoding a ragged batch of per-token log-probs as packed bytes (the project's
   RaggedTensor) against a plain ``repeated float`` message (the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _repeated_float_message():
    """A ``message Floats { repeated float values = 1; repeated int64 offsets = 2; }`` built at run time."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    file = descriptor_pb2.FileDescriptorProto(name="bench_floats.proto", package="bench", syntax="proto3")
    message = file.message_type.add(name="Floats")
    for number, (name, kind) in enumerate(
        [
            ("values", descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT),
            ("offsets", descriptor_pb2.FieldDescriptorProto.TYPE_INT64),
        ],
        start=1,
    ):
        message.field.add(name=name, number=number, type=kind, label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.Floats"))


def bench_codec(rows: int, length: int, repeats: int) -> dict:
    from shared import codec
    from shared.proto.rlhf.v1 import tensor_pb2

    generator = torch.Generator().manual_seed(0)
    batch = [torch.randn(length, generator=generator) for _ in range(rows)]
    floats_type = _repeated_float_message()

    def packed() -> int:
        wire = codec.ragged_to_pb(batch, torch.float32).SerializeToString()
        message = tensor_pb2.RaggedTensor()
        message.ParseFromString(wire)
        codec.ragged_from_pb(message, "x")
        return len(wire)

    def repeated() -> int:
        values = torch.cat(batch).tolist()
        offsets = [0]
        for row in batch:
            offsets.append(offsets[-1] + row.numel())
        wire = floats_type(values=values, offsets=offsets).SerializeToString()
        message = floats_type()
        message.ParseFromString(wire)
        flat = torch.tensor(list(message.values), dtype=torch.float32)
        list(torch.split(flat, [b - a for a, b in zip(message.offsets, message.offsets[1:], strict=False)]))
        return len(wire)

    def timed(fn) -> tuple[float, int]:
        size = fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples), size

    packed_seconds, packed_bytes = timed(packed)
    repeated_seconds, repeated_bytes = timed(repeated)
    return {
        "rows": rows,
        "length": length,
        "packed_ms": packed_seconds * 1e3,
        "repeated_ms": repeated_seconds * 1e3,
        "packed_bytes": packed_bytes,
        "repeated_bytes": repeated_bytes,
    }


def bench_loop(policy: Path, work: Path, iterations: int, prompts_per_iteration: int) -> dict:
    from services.demo import DEMO_PPO, service_configs
    from services.generation.backend import GenerationBackend
    from services.generation.config import GenerationConfig
    from services.launcher import Launcher, follow_run, start_stack
    from services.orchestrator.config import RunConfig
    from services.orchestrator.inprocess import inprocess_clients
    from services.orchestrator.loop import RLHFLoop
    from services.reference.backend import ReferenceBackend
    from services.reference.config import ReferenceConfig
    from services.reward.backend import load_backend
    from services.reward.config import RewardConfig
    from services.trainer.backend import TrainerBackend
    from services.trainer.config import CriticConfig, PPOConfig
    from shared.modeling import ModelConfig
    from shared.tiny_models import prompts

    dataset = work / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(256)))
    run = {
        "dataset": str(dataset),
        "iterations": iterations,
        "prompts_per_iteration": prompts_per_iteration,
        "sampling": {"max_new_tokens": 16},
        "runs_dir": str(work / "runs"),
        "seed": 0,
    }
    configs = service_configs(policy)

    # Baseline: the same backends in this process, each on its own model thread as in its service.
    torch.set_num_threads(1)
    model = {"path": str(policy), "cpu_threads": 1}
    clients = inprocess_clients(
        GenerationBackend(GenerationConfig.model_validate({"model": model})),
        load_backend(RewardConfig.model_validate({"function": configs["reward"]["function"]})),
        ReferenceBackend(ReferenceConfig.model_validate({"model": model})),
        TrainerBackend(ModelConfig.model_validate(model), CriticConfig(), PPOConfig.model_validate(DEMO_PPO)),
    )
    inprocess = asyncio.run(
        RLHFLoop("bench-inprocess", RunConfig.model_validate(run | {"run_id": "bench-inprocess"}), clients).run()
    )
    records_in = [json.loads(line) for line in (work / "runs" / "bench-inprocess" / "iterations.jsonl").open()]

    with Launcher(work / "processes") as launcher:
        _, api = start_stack(launcher, configs)
        status = follow_run(api, run | {"run_id": "bench-grpc"}, quiet=True)
    if status["state"] != "completed":
        raise RuntimeError(f"gRPC run ended {status['state']}: {status.get('error')}")
    records_grpc = status["stats"]

    def phases(records):
        skip = records[1:] or records  # the first iteration pays warm-up
        return {
            "iteration": statistics.fmean(r["wall_seconds"] for r in skip),
            **{
                p: statistics.fmean(r["phase_seconds"][p] for r in skip)
                for p in ("generate", "score_and_reference", "train", "weight_sync")
            },
        }

    return {
        "inprocess": phases(records_in),
        "grpc": phases(records_grpc),
        "reward_last": (inprocess["reward_mean_last"], status["summary"]["reward_mean_last"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--prompts-per-iteration", type=int, default=32)
    parser.add_argument("--codec-repeats", type=int, default=20)
    args = parser.parse_args(argv)

    print("wire format: a ragged batch of float32 log-probs, encode + serialize + parse + decode (median)")
    print(f"{'batch':>14} {'repeated float':>15} {'packed bytes':>13} {'speed-up':>9} {'size ratio':>10}")
    for rows, length in ((32, 16), (256, 128), (1024, 512)):
        c = bench_codec(rows, length, args.codec_repeats)
        print(
            f"{rows:>6} x {length:<6} {c['repeated_ms']:>12.2f} ms {c['packed_ms']:>10.2f} ms "
            f"{c['repeated_ms'] / c['packed_ms']:>8.1f}x {c['repeated_bytes'] / c['packed_bytes']:>9.2f}x"
        )

    print(
        f"\nthe loop: {args.iterations} PPO iterations x {args.prompts_per_iteration} prompts, tiny pretrained policy; "
        "mean seconds per iteration after the first"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from shared.tiny_models import build_policy, pretrain

        policy = build_policy(work / "policy")
        pretrain(policy)
        loop = bench_loop(policy, work, args.iterations, args.prompts_per_iteration)
    print(f"{'phase':>20} {'in-process':>11} {'gRPC':>9} {'ratio':>7}")
    for phase, baseline in loop["inprocess"].items():
        over = loop["grpc"][phase]
        print(f"{phase:>20} {baseline:>9.3f} s {over:>7.3f} s {over / baseline:>6.2f}x")
    print(f"(reward of the last iteration: in-process {loop['reward_last'][0]:.3f}, gRPC {loop['reward_last'][1]:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
