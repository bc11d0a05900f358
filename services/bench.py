"""``make bench``: figures printed side by side with a baseline measured in the same run (ratios, since these
machines are noisy).

1. The services' overhead: the same PPO loop (tiny pretrained policy, rule-based reward, same seeds) with the
   in-process clients (the backends called directly: the baseline) and over gRPC with every role its own process.
2. The wire format: encoding and decoding a ragged batch of per-token log-probs as packed bytes (the project's
   RaggedTensor) against a plain ``repeated float`` message (the baseline).
3. Memory per billion parameters on the real model (SmolLM2-135M): the bytes of every tensor the trainer keeps
   (weights, gradients at their peak, AdamW state; policy and critic) and generation keeps (weights), counted
   after a training step, for full fine-tuning in float32 (the baseline), bf16 mixed precision and LoRA; and the
   weight-sync bytes of a full state against a LoRA adapter.
4. The reward model as a public API: 64 concurrent clients over REST and over gRPC against the reward service on
   loopback (a tiny and a larger reward model), against the same model's raw batched forward in this process (the
   baseline); ``services/loadtest.py``.
5. Against TRL 1.12's PPOTrainer (the baseline), the same PPO work at 0.1M and 19M parameters, with the phase
   breakdown, the synchronous and the asynchronous loop; and the advantage estimators (GAE with the critic against
   GRPO, RLOO and REINFORCE++ without one): ``services/bench_trl.py``.
6. Weight sync against a raw loopback socket moving the same bytes, and rollout throughput with 1, 2, ...
   generation replicas against one: ``services/bench_transport.py``.
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


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_memory(policy: Path) -> list[dict]:
    """Counted bytes per setting; ``per_billion_gb`` divides by the policy's parameter count (GB per 1e9)."""
    from services.trainer.backend import TrainerBackend
    from services.trainer.config import CriticConfig, LoRAConfig, PPOConfig
    from shared.modeling import ModelConfig
    from shared.types import RolloutBatch
    from shared.weights import unique_state

    settings = [
        ("full fine-tuning, float32", "float32", LoRAConfig()),
        ("full fine-tuning, bf16 mixed precision", "bfloat16", LoRAConfig()),
        ("LoRA r16 on q,k,v,o (policy and critic), bf16", "bfloat16", LoRAConfig(rank=16, alpha=32)),
    ]
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (6,), generator=generator) for _ in range(2)]
    responses = [torch.randint(10, 1000, (4,), generator=generator) for _ in range(2)]
    batch = RolloutBatch(
        prompt_ids=prompts,
        response_ids=responses,
        scores=torch.tensor([1.0, -1.0]),
        reference_logprobs=[torch.full((4,), -5.0) for _ in responses],
        generation_logprobs=[torch.full((4,), -5.0) for _ in responses],
    )
    rows = []
    for name, dtype, lora in settings:
        trainer = TrainerBackend(
            ModelConfig(path=str(policy), dtype=dtype),
            CriticConfig(),
            PPOConfig(ppo_epochs=1, minibatch_size=2, micro_batch_size=2),
            lora=lora,
        )
        policy_params = sum(t.numel() for t in unique_state(trainer.policy).values() if t.is_floating_point())
        if lora.enabled:
            policy_params -= sum(p.numel() for p in trainer.policy.parameters() if p.requires_grad)
        started = time.perf_counter()
        trainer.train_step(batch)
        step_seconds = time.perf_counter() - started
        models = [trainer.policy, trainer.critic]
        weights = _tensor_bytes({id(p): p for m in models for p in m.parameters()}.values())
        gradients = _tensor_bytes(p for m in models for p in m.parameters() if p.requires_grad)  # at the peak
        optimizer = _tensor_bytes(
            t for o in trainer._optimizers.values() for state in o.state.values() for t in state.values() if t.dim()
        )
        sync = _tensor_bytes(t for _, t in trainer.policy_state())
        rows.append(
            {
                "setting": name,
                "policy_parameters": policy_params,
                "weights": weights,
                "gradients": gradients,
                "optimizer": optimizer,
                "total": weights + gradients + optimizer,
                "per_billion_gb": (weights + gradients + optimizer) / policy_params,
                "sync_bytes": sync,
                "step_seconds": step_seconds,
            }
        )
        del trainer
    return rows


def bench_reward_api(seconds: float) -> None:
    from services import loadtest
    from shared.tiny_models import build_reward_model

    raw_seconds = min(10.0, seconds / 4)
    # The tiny model's forward is mostly Python (it holds the GIL the event loop needs); the larger one's is mostly
    # matrix products (which release it), as a real model's is.
    for label, hidden, layers in (("tiny", 64, 2), ("larger", 512, 4)):
        print(
            f"\nthe reward API, {label} reward model (hidden {hidden}, {layers} layers): 64 clients x {seconds:.0f} s "
            f"per transport, 4 pairs per request; raw forward ({raw_seconds:.0f} s before and after each transport) "
            "at the 256 pairs all clients send"
        )
        with tempfile.TemporaryDirectory() as tmp:
            model = build_reward_model(Path(tmp) / "reward", hidden=hidden, layers=layers)
            results = asyncio.run(loadtest.run(model, clients=64, seconds=seconds, raw_seconds=raw_seconds))
        loadtest.print_table(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--prompts-per-iteration", type=int, default=32)
    parser.add_argument("--codec-repeats", type=int, default=20)
    parser.add_argument("--skip-memory", action="store_true", help="skip the real-model memory figures")
    parser.add_argument("--reward-api-seconds", type=float, default=60.0, help="per transport; 0 skips the section")
    parser.add_argument("--trl-iterations", type=int, default=6, help="PPO iterations per run against TRL; 0 skips")
    parser.add_argument("--skip-transport", action="store_true", help="skip weight sync and generation replicas")
    parser.add_argument("--skip-sharded", action="store_true", help="skip the sharded trainer (2 ranks vs 1 process)")
    args = parser.parse_args(argv)

    if args.trl_iterations:
        from services import bench_trl

        rows = bench_trl.compare(args.trl_iterations)
        bench_trl.print_comparison(rows, args.trl_iterations)
        name, hidden, layers = bench_trl.SIZES[-1]
        with tempfile.TemporaryDirectory() as tmp:
            policy, reward, _ = bench_trl.build_models(Path(tmp), hidden, layers)
            bench_trl.print_estimators(bench_trl.bench_estimators(policy, reward), name)
            if not args.skip_transport:
                from services import bench_transport

                print()
                bench_transport.print_weight_sync(bench_transport.bench_weight_sync(policy, Path(tmp) / "sync"))
                print()
                bench_transport.print_rollouts(bench_transport.bench_rollouts(policy, Path(tmp) / "rollouts"))
        print()

    if not args.skip_sharded:
        from services import bench_sharded

        bench_sharded.print_bench(bench_sharded.bench())
        print()

    if not args.skip_memory:
        from shared.pretrained import smollm2_dir

        print("memory: bytes of the tensors each setting keeps, SmolLM2-135M (tied), policy + critic (init: policy)")
        rows = bench_memory(smollm2_dir())
        baseline = rows[0]
        print(
            f"{'setting':>48} {'weights':>9} {'grads':>9} {'AdamW':>9} {'total':>9} {'GB per 1e9':>10} {'vs fp32':>8}"
        )
        for r in rows:
            print(
                f"{r['setting']:>48} {r['weights'] / 2**20:>6.0f} MiB {r['gradients'] / 2**20:>5.0f} MiB "
                f"{r['optimizer'] / 2**20:>5.0f} MiB {r['total'] / 2**20:>5.0f} MiB {r['per_billion_gb']:>10.1f} "
                f"{r['total'] / baseline['total']:>7.2f}x"
            )
        sync = [
            f"{label} {r['sync_bytes'] / 2**20:.1f} MiB"
            for label, r in zip(("float32", "bf16", "LoRA"), rows, strict=True)
        ]
        ratio = rows[2]["sync_bytes"] / rows[1]["sync_bytes"]
        print(f"{'weight sync per version':>48}  {', '.join(sync)} (LoRA / bf16 full: {ratio:.2%})\n")

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
    if args.reward_api_seconds:
        bench_reward_api(args.reward_api_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
