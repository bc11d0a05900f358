"""``make bench``, the comparison with TRL: the same PPO work done by TRL 1.12's ``PPOTrainer`` (one process) and by
this project's four services and orchestrator (one process each, on loopback), in the same run.

Both use the same tiny random Llama (the policy, its reference copy, and a sequence classifier of the same shape
as reward model and critic / value model), 16 prompts per iteration, 32 new tokens sampled at temperature 1
(no top-k, no top-p), 4 PPO epochs over one minibatch of 16, a fixed KL coefficient of 0.05 (k1, in the reward),
value coefficient 0.1, learning rate 3e-6, and 2 torch threads in every process. The figure is samples (responses
trained on) per second over the iterations after the first (which pays warm-up); the phases are seconds per
iteration: generate, score + reference (TRL: the reference, value and reward forwards of its rollout), train,
weight sync (TRL: none, the policy is one object).

TRL is a bench-only dependency (``requirements-bench.txt``, installed by ``make bench``); no service imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PROMPTS_PER_ITERATION = 16
NEW_TOKENS = 32
PPO_EPOCHS = 4
KL_COEF = 0.05
LEARNING_RATE = 3e-6
THREADS = 2

# (name, hidden size, layers): with the tiny tokenizer's 640-token vocabulary, about 0.1M and 19M parameters.
SIZES = (("0.1M", 48, 2), ("19M", 512, 7))


@dataclass
class Result:
    samples_per_second: float
    iteration_seconds: float
    phases: dict[str, float]  # seconds per iteration
    cpu_seconds: float = float("nan")  # user + system CPU seconds per iteration, every process, all iterations


def build_models(work: Path, hidden: int, layers: int) -> tuple[Path, Path, int]:
    """The policy and a reward model / critic of the same shape; returns their directories and the policy's
    parameter count."""
    from shared.tiny_models import build_policy, build_reward_model

    policy = build_policy(work / "policy", hidden=hidden, layers=layers)
    reward = build_reward_model(work / "reward", hidden=hidden, layers=layers)
    from transformers import AutoModelForCausalLM

    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(policy).parameters())
    return policy, reward, parameters


def _prompts(count: int) -> list[str]:
    from shared.tiny_models import prompts

    return prompts(count)


def _summarise(iterations: list[dict]) -> Result:
    kept = iterations[1:] or iterations  # the first iteration pays warm-up
    seconds = statistics.fmean(i["wall"] for i in kept)
    phases = {name: statistics.fmean(i["phases"].get(name, 0.0) for i in kept) for name in PHASES}
    return Result(PROMPTS_PER_ITERATION / seconds, seconds, phases)


PHASES = ("generate", "score_and_reference", "train", "weight_sync")


def run_trl(policy: Path, reward: Path, iterations: int, work: Path) -> Result:
    """TRL's PPOTrainer on the models, with its phases timed from the functions its loop calls."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
        masking_utils,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from shared import attention_masks

    # TRL as shipped: transformers' own attention mask (this process may have installed the project's faster one).
    masking_utils.AttentionMaskInterface.register("sdpa", attention_masks._library_sdpa_mask)
    torch.set_num_threads(THREADS)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.padding_side = "left"
    texts = _prompts(PROMPTS_PER_ITERATION * iterations)
    dataset = datasets.Dataset.from_dict({"input_ids": [tokenizer(t)["input_ids"] for t in texts]})
    config = PPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=PROMPTS_PER_ITERATION,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        local_rollout_forward_batch_size=PROMPTS_PER_ITERATION,
        num_ppo_epochs=PPO_EPOCHS,
        response_length=NEW_TOKENS,
        total_episodes=PROMPTS_PER_ITERATION * iterations,
        learning_rate=LEARNING_RATE,
        kl_coef=KL_COEF,
        kl_estimator="k1",
        vf_coef=0.1,
        temperature=1.0,
        stop_token="eos",
        missing_eos_penalty=None,
        num_sample_generations=0,
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )

    marks: list[dict] = []
    current: dict = {}

    def timed_generation(*args, **kwargs):
        current.clear()
        current["start"] = time.perf_counter()
        try:
            return original_generation(*args, **kwargs)
        finally:
            current["generated"] = time.perf_counter()

    def timed_forward(model, *args, **kwargs):
        if torch.is_grad_enabled() and "train" not in current:  # the first forward of the PPO epochs
            current["train"] = time.perf_counter()
        return original_forward(model, *args, **kwargs)

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            end = time.perf_counter()
            marks.append(
                {
                    "wall": end - current["start"],
                    "phases": {
                        "generate": current["generated"] - current["start"],
                        "score_and_reference": current["train"] - current["generated"],
                        "train": end - current["train"],
                        "weight_sync": 0.0,
                    },
                }
            )

    original_generation, original_forward = trl_ppo.batch_generation, trl_ppo.forward
    trl_ppo.batch_generation, trl_ppo.forward = timed_generation, timed_forward
    try:
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=AutoModelForCausalLM.from_pretrained(policy),
            ref_model=AutoModelForCausalLM.from_pretrained(policy),
            reward_model=AutoModelForSequenceClassification.from_pretrained(reward, num_labels=1),
            value_model=AutoModelForSequenceClassification.from_pretrained(reward, num_labels=1),
            train_dataset=dataset,
            callbacks=[StepEnd()],
        )
        before = _own_cpu_seconds()
        trainer.train()
        cpu = (_own_cpu_seconds() - before) / iterations
    finally:
        trl_ppo.batch_generation, trl_ppo.forward = original_generation, original_forward
    return dataclasses.replace(_summarise(marks), cpu_seconds=cpu)


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def project_configs(
    policy: Path, reward: Path, ppo_overrides: dict | None = None, threads: dict[str, int] | None = None
) -> dict[str, dict]:
    """The four services' configs for the comparison: ``threads`` per role (default ``THREADS`` each). The trainer
    writes no checkpoint (TRL's run saves none either)."""
    threads = {role: THREADS for role in ("generation", "reward", "reference", "trainer")} | (threads or {})
    server = {"port": 0, "metrics_port": 0, "grace_seconds": 5}
    ppo = {
        "learning_rate": LEARNING_RATE,
        "ppo_epochs": PPO_EPOCHS,
        "minibatch_size": PROMPTS_PER_ITERATION,
        "micro_batch_size": PROMPTS_PER_ITERATION,
        "value_coef": 0.1,
        "kl": {"mode": "fixed", "init_coef": KL_COEF, "estimator": "k1"},
        **(ppo_overrides or {}),
    }

    def model(role: str, path: Path = policy) -> dict:
        return {"path": str(path), "cpu_threads": threads[role]}

    return {
        "generation": {"server": dict(server), "model": model("generation")},
        "reward": {"server": dict(server), "model": model("reward", reward), "normalize": False},
        "reference": {"server": dict(server), "model": model("reference")},
        "trainer": {
            "server": dict(server),
            "policy": model("trainer"),
            "critic": {"init": "reward_model", "path": str(reward)},
            "ppo": ppo,
            "checkpoint": {"root": ""},
        },
    }


def run_project(
    policy: Path,
    reward: Path,
    iterations: int,
    work: Path,
    ppo_overrides: dict | None = None,
    run: dict | None = None,
    threads: dict[str, int] | None = None,
) -> Result:
    """The services and the orchestrator as processes on loopback; phases from the run's iteration records."""
    from services.launcher import Launcher, follow_run, start_stack

    work.mkdir(parents=True, exist_ok=True)
    dataset = work / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in _prompts(PROMPTS_PER_ITERATION * iterations)))
    request = {
        "dataset": str(dataset),
        "iterations": iterations,
        "prompts_per_iteration": PROMPTS_PER_ITERATION,
        "sampling": {"max_new_tokens": NEW_TOKENS, "temperature": 1.0},
        "runs_dir": str(work / "runs"),
        "seed": 0,
        "run_id": "bench-project",
        **(run or {}),
    }
    from services.bench_transport import _cpu_seconds

    with Launcher(work / "processes") as launcher:
        _, api = start_stack(launcher, project_configs(policy, reward, ppo_overrides, threads))
        pids = [p.process.pid for p in launcher.processes]  # the four services and the orchestrator
        before = _cpu_seconds(pids)
        status = follow_run(api, request, quiet=True)
        cpu = (_cpu_seconds(pids) - before) / iterations
    if status["state"] != "completed":
        raise RuntimeError(f"the project's run ended {status['state']}: {status.get('error')}")
    result = _summarise([{"wall": r["wall_seconds"], "phases": r["phase_seconds"]} for r in status["stats"]])
    return dataclasses.replace(result, cpu_seconds=cpu)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_estimators(policy: Path, reward: Path, steps: int = 3) -> list[dict]:
    """One trainer process's step on the same rollout batch (4 prompts x 4 samples, 32-token responses) with each
    advantage estimator: seconds per step (mean of ``steps`` after a warm-up) and the bytes of the tensors the
    trainer keeps (weights, gradients at their peak, AdamW state). GAE loads the critic; the others do not."""
    from services.trainer.backend import TrainerBackend
    from services.trainer.config import CriticConfig, PPOConfig
    from shared.modeling import ModelConfig
    from shared.types import RolloutBatch

    torch.set_num_threads(THREADS)
    generator = torch.Generator().manual_seed(0)
    groups, per_group = 4, 4
    prompts = [torch.randint(4, 400, (6,), generator=generator) for _ in range(groups)]
    prompt_ids = [p for p in prompts for _ in range(per_group)]
    responses = [torch.randint(4, 400, (NEW_TOKENS,), generator=generator) for _ in prompt_ids]
    batch = RolloutBatch(
        prompt_ids=prompt_ids,
        response_ids=responses,
        scores=torch.randn(len(responses), generator=generator),
        reference_logprobs=[torch.full((NEW_TOKENS,), -6.0) for _ in responses],
        generation_logprobs=[torch.full((NEW_TOKENS,), -6.0) for _ in responses],
        group_ids=torch.arange(groups).repeat_interleave(per_group),
    )
    rows = []
    for estimator in ("gae", "grpo", "rloo", "reinforce_plus_plus"):
        ppo = PPOConfig(
            learning_rate=LEARNING_RATE,
            ppo_epochs=PPO_EPOCHS,
            minibatch_size=len(responses),
            micro_batch_size=len(responses),
            advantage_estimator=estimator,
        )
        trainer = TrainerBackend(
            ModelConfig(path=str(policy), cpu_threads=THREADS),
            CriticConfig(init="reward_model", path=str(reward)),
            ppo,
        )
        trainer.train_step(batch)  # warm-up; the optimizer state exists from here on
        started = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(batch)
        seconds = (time.perf_counter() - started) / steps
        models = [m for m in (trainer.policy, trainer.critic) if m is not None]
        parameters = [p for m in models for p in m.parameters()]
        optimizer = _tensor_bytes(
            t for o in trainer._optimizers.values() for state in o.state.values() for t in state.values() if t.dim()
        )
        total = _tensor_bytes(parameters) * 2 + optimizer  # weights + gradients (all trainable) + AdamW moments
        rows.append({"estimator": estimator, "critic": trainer.critic is not None, "seconds": seconds, "bytes": total})
        del trainer
    return rows


def print_estimators(rows: list[dict], size: str) -> None:
    base = rows[0]
    print(
        f"\nadvantage estimators, {size} policy: one trainer step on 16 samples (4 prompts x 4) x {NEW_TOKENS} "
        f"tokens, {PPO_EPOCHS} epochs, {THREADS} threads; tensors kept = weights + gradients + AdamW state"
    )
    print(f"{'estimator':>22} {'critic':>7} {'s per step':>11} {'vs GAE':>7} {'tensors kept':>13} {'vs GAE':>7}")
    for r in rows:
        print(
            f"{r['estimator']:>22} {'yes' if r['critic'] else 'no':>7} {r['seconds']:>9.3f} s "
            f"{r['seconds'] / base['seconds']:>6.2f}x {r['bytes'] / 2**20:>9.0f} MiB "
            f"{r['bytes'] / base['bytes']:>6.2f}x"
        )


def compare(iterations: int, sizes=SIZES, asynchronous: bool = True) -> list[dict]:
    """Per size: the project's synchronous loop, its asynchronous loop (one step off-policy) and TRL, on the same
    models and settings."""
    rows = []
    for name, hidden, layers in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            policy, reward, parameters = build_models(work, hidden, layers)
            row = {"size": name, "parameters": parameters}
            row["project"] = run_project(policy, reward, iterations, work / "sync")
            if asynchronous:
                run = {"asynchronous": True, "max_staleness": 1, "run_id": "bench-async"}
                row["project_async"] = run_project(policy, reward, iterations, work / "async", run=run)
            row["trl"] = run_trl(policy, reward, iterations, work)
        rows.append(row)
    return rows


def print_comparison(rows: list[dict], iterations: int) -> None:
    print(
        f"\nagainst TRL 1.12 PPOTrainer: {PROMPTS_PER_ITERATION} prompts x {NEW_TOKENS} new tokens per iteration, "
        f"{PPO_EPOCHS} PPO epochs, one minibatch, {THREADS} threads per process, float32 on CPU; "
        f"{iterations} iterations, mean of iterations 2..{iterations}"
    )
    print(
        f"{'model':>16} {'TRL samples/s':>14} {'project samples/s':>18} {'ratio':>7} {'project async':>14} {'ratio':>7}"
    )
    for r in rows:
        trl, project = r["trl"], r["project"]
        label = f"{r['size']} ({r['parameters'] / 1e6:.2f}M)"
        line = (
            f"{label:>16} {trl.samples_per_second:>14.2f} {project.samples_per_second:>18.2f} "
            f"{project.samples_per_second / trl.samples_per_second:>6.2f}x"
        )
        if "project_async" in r:
            fast = r["project_async"].samples_per_second
            line += f" {fast:>14.2f} {fast / trl.samples_per_second:>6.2f}x"
        print(line)
    print(
        f"\n{'seconds per iteration':>30} " + " ".join(f"{p:>20}" for p in (*PHASES, "iteration", "CPU s (all cores)"))
    )
    names = {"trl": "TRL", "project": "project", "project_async": "project async"}
    for r in rows:
        for who, label in names.items():
            if who not in r:
                continue
            result: Result = r[who]
            cells = [f"{result.phases[p]:>18.3f} s" for p in PHASES] + [f"{result.iteration_seconds:>18.3f} s"]
            cells.append(f"{result.cpu_seconds:>18.2f} s")
            print(f"{r['size'] + ' ' + label:>30} " + " ".join(cells))
    print(
        "(project async: generation of the next batch overlaps training, so its phases add up to more than the "
        "iteration; TRL has no weight sync: its policy is one object. CPU s: user + system CPU seconds per iteration "
        "of every process (TRL's one; the project's four services and orchestrator), iteration 1 included)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=6)
    names = [s[0] for s in SIZES]
    parser.add_argument("--sizes", nargs="*", default=names, help="which of: " + ", ".join(names))
    parser.add_argument("--no-async", action="store_true", help="skip the asynchronous loop's run")
    parser.add_argument("--estimators", action="store_true", help="also the advantage estimators at the last size")
    args = parser.parse_args(argv)
    sizes = [s for s in SIZES if s[0] in args.sizes]
    print_comparison(compare(args.iterations, sizes, asynchronous=not args.no_async), args.iterations)
    if args.estimators:
        name, hidden, layers = sizes[-1]
        with tempfile.TemporaryDirectory() as tmp:
            policy, reward, _ = build_models(Path(tmp), hidden, layers)
            print_estimators(bench_estimators(policy, reward), name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
