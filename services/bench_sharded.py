"""``make bench``, the sharded trainer: one trainer process with 2 threads against the trainer sharded over 2 ranks
(FSDP2 under torchrun, gloo on CPU) with 1 thread each, on the same rollout batch, in the same run.

Per configuration: seconds per PPO step (mean of the steps after a warm-up one) and, per rank, the bytes of the
tensors it keeps (its shards of the weights, of the gradients at their peak and of the AdamW state), its peak
resident memory, and for the weight stream the largest tensor gathered at once against the whole policy.

    python -m services.bench_sharded [--hidden 512 --layers 7 --steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SAMPLES, NEW_TOKENS, PROMPT_TOKENS, PPO_EPOCHS = 16, 32, 6, 4
HIDDEN, LAYERS = 512, 7


def _batch():
    from shared.types import RolloutBatch

    generator = torch.Generator().manual_seed(0)
    responses = [torch.randint(4, 400, (NEW_TOKENS,), generator=generator) for _ in range(SAMPLES)]
    return RolloutBatch(
        prompt_ids=[torch.randint(4, 400, (PROMPT_TOKENS,), generator=generator) for _ in responses],
        response_ids=responses,
        scores=torch.randn(SAMPLES, generator=generator),
        reference_logprobs=[torch.full((NEW_TOKENS,), -6.0) for _ in responses],
        generation_logprobs=[torch.full((NEW_TOKENS,), -6.0) for _ in responses],
    )


def _local_bytes(tensors) -> int:
    from services.trainer.distributed import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def measure(policy: str, reward: str, steps: int, threads: int) -> dict:
    """This process's trainer (sharded when under torchrun): step time, kept bytes, peak RSS, weight stream."""
    from services.trainer import distributed
    from services.trainer.backend import TrainerBackend
    from services.trainer.config import CriticConfig, PPOConfig
    from services.trainer.servicer import COLLECTIVE
    from shared.modeling import ModelConfig

    torch.set_num_threads(threads)
    ranks = distributed.from_environment("cpu")
    ppo = PPOConfig(learning_rate=3e-6, ppo_epochs=PPO_EPOCHS, minibatch_size=SAMPLES, micro_batch_size=SAMPLES)
    trainer = TrainerBackend(ModelConfig(path=policy), CriticConfig(init="reward_model", path=reward), ppo, ranks=ranks)
    if ranks is not None and not ranks.is_leader:
        distributed.follow(trainer, ranks)
        distributed.leave()
        return {}
    backend = distributed.Leader(trainer, ranks, COLLECTIVE) if ranks is not None else trainer
    batch = _batch()
    backend.train_step(batch)  # warm-up: the AdamW state exists from here on
    started = time.perf_counter()
    for _ in range(steps):
        backend.train_step(batch)
    seconds = (time.perf_counter() - started) / steps
    models = [trainer.policy, trainer.critic]
    parameters = [p for m in models for p in m.parameters()]
    optimizer = [t for o in trainer._optimizers.values() for s in o.state.values() for t in s.values() if t.dim()]
    kept = 2 * _local_bytes(parameters) + _local_bytes(optimizer)  # weights + gradients (all train) + AdamW
    whole_policy = sum(p.numel() * p.element_size() for p in trainer.policy.parameters())  # a DTensor's: global
    largest = 0
    for name in backend.policy_names():
        largest = max(largest, backend.policy_tensor(name).numel() * 4)
    if ranks is not None:
        backend.stop_followers()
        distributed.leave()
    return {
        "seconds": seconds,
        "kept_bytes": kept,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "largest_gathered_bytes": largest,
        "whole_policy_bytes": whole_policy,
    }


def _rank_main(args) -> int:
    result = measure(args.policy, args.reward, args.steps, args.threads)
    if result:
        Path(args.out).write_text(json.dumps(result))
    return 0


def bench(hidden: int = HIDDEN, layers: int = LAYERS, steps: int = 3) -> dict:
    from services.bench_trl import build_models

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        policy, reward, parameters = build_models(work, hidden, layers)
        rows = {}
        for label, ranks, threads in (("1 process x 2 threads", 1, 2), ("2 ranks x 1 thread", 2, 1)):
            out = work / f"{ranks}.json"
            runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
            command = [sys.executable, *runner, "-m", "services.bench_sharded", "--rank-worker"]
            command += ["--policy", str(policy), "--reward", str(reward), "--steps", str(steps)]
            command += ["--threads", str(threads), "--out", str(out)]
            done = subprocess.run(command, capture_output=True, text=True, env=_env(threads))
            if done.returncode != 0:
                raise RuntimeError(f"{label} failed:\n{done.stderr[-4000:]}")
            rows[label] = {"ranks": ranks, **json.loads(out.read_text())}
    return {"parameters": parameters, "rows": rows}


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def print_bench(result: dict) -> None:
    rows = result["rows"]
    base = next(iter(rows.values()))
    print(
        f"\nsharded trainer (FSDP2, gloo on CPU): one PPO step with a critic, {SAMPLES} samples x {NEW_TOKENS} "
        f"tokens, {PPO_EPOCHS} epochs, {result['parameters'] / 1e6:.1f}M-parameter policy and critic; per rank"
    )
    header = ("", "s per step", "vs 1 process", "tensors kept", "vs 1 process", "peak RSS", "largest gather")
    print(
        f"{header[0]:>22} {header[1]:>11} {header[2]:>13} {header[3]:>13} {header[4]:>13} {header[5]:>10} "
        f"{header[6]:>15}"
    )
    for label, row in rows.items():
        print(
            f"{label:>22} {row['seconds']:>9.3f} s {row['seconds'] / base['seconds']:>12.2f}x "
            f"{row['kept_bytes'] / 2**20:>9.0f} MiB {row['kept_bytes'] / base['kept_bytes']:>12.2f}x "
            f"{row['peak_rss_bytes'] / 2**20:>6.0f} MiB {row['largest_gathered_bytes'] / 2**20:>7.1f} of "
            f"{row['whole_policy_bytes'] / 2**20:.0f} MiB"
        )
    print(
        "(tensors kept: this rank's shards of the weights, the gradients and the AdamW moments; peak RSS: the "
        "process's, rank 0's for 2 ranks, which also loads the whole model before sharding; largest gather: the "
        "biggest tensor the weight stream gathers at once, against the whole policy)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--reward", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_worker:
        return _rank_main(args)
    print_bench(bench(args.hidden, args.layers, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
