"""``make demo``: the RL stage of RLHF end to end on one machine, every role its own process on loopback.

1. builds a tiny Llama policy offline (a BPE tokenizer trained on a built-in corpus, ~10 s of pretraining so
   it writes short sentences), and a prompt file;
2. starts the generation, reward, reference and trainer services and the orchestrator (``rlhf serve ...``,
   ``rlhf orchestrator``), each from a YAML config written next to its log;
3. starts a run through the orchestrator's control API and shows each iteration as it completes;
4. stops every process it started and prints the summary (also in runs/<run-id>/summary.json).

The reward is a rule-based function (positive minus negative sentiment words, as a share of the response's
words), which a tiny policy visibly learns in minutes while the adaptive KL penalty keeps it near the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from services.launcher import Launcher, LaunchError, follow_run, start_stack
from shared.tiny_models import build_policy, pretrain, prompts

DEMO_PPO = {
    "learning_rate": 3e-4,
    "ppo_epochs": 4,
    "minibatch_size": 16,
    "micro_batch_size": 16,
    "kl": {"mode": "adaptive", "init_coef": 0.1, "target": 4.0, "horizon": 256},
}


def build_assets(assets: Path) -> Path:
    """The tiny policy (built and pretrained once, then reused) and the prompt file."""
    policy = assets / "policy"
    if not (policy / "model.safetensors").exists():
        print(f"building a tiny policy in {policy} (offline: tokenizer trained here, ~10 s of pretraining)")
        build_policy(policy)
        losses = pretrain(policy)
        print(f"  pretraining loss {losses['loss_first']:.2f} -> {losses['loss_last']:.2f} nats/token")
    dataset = assets / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(512)))
    return policy


def service_configs(policy: Path) -> dict[str, dict]:
    model = {"path": str(policy), "cpu_threads": 1}
    server = {"port": 0, "metrics_port": 0, "grace_seconds": 5}
    return {
        "generation": {"server": server, "model": model},
        "reward": {"server": server, "function": "services.reward.functions:positive_word_share"},
        "reference": {"server": server, "model": model},
        "trainer": {"server": server, "policy": model, "critic": {"init": "policy"}, "ppo": DEMO_PPO},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--prompts-per-iteration", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    assets = args.runs_dir / "demo-assets"
    policy = build_assets(assets)
    run_id = time.strftime("demo-%Y%m%d-%H%M%S")
    work = args.runs_dir / run_id / "processes"
    with Launcher(work) as launcher:
        print(f"starting 4 services + orchestrator (configs and logs in {work})")
        try:
            services, api = start_stack(launcher, service_configs(policy), root=args.runs_dir)
            for service in services.values():
                print(f"  {service.name:<12} pid {service.process.pid:<7} gRPC {service.address}")
            print(f"  {'orchestrator':<12} control API {api}")
        except LaunchError as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 1
        run = {
            "dataset": str((assets / "prompts.jsonl").resolve()),
            "iterations": args.iterations,
            "prompts_per_iteration": args.prompts_per_iteration,
            "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0},
            "runs_dir": str(args.runs_dir.resolve()),
            "run_id": run_id,
            "seed": 0,
        }
        status = follow_run(api, run)
        codes = launcher.stop_all()
    print(f"stopped every process (exit codes: {', '.join(f'{k} {v}' for k, v in codes.items())})")
    if status["state"] != "completed":
        print(f"demo: run ended {status['state']}: {status.get('error')}", file=sys.stderr)
        return 1
    summary = status["summary"]
    print_summary(summary, args.runs_dir / run_id / "summary.json", time.perf_counter() - started)
    return 0


def print_summary(summary: dict, path: Path, wall: float) -> None:
    print()
    print("summary")
    print(f"  iterations            {summary['iterations']}")
    print(
        f"  reward mean           {summary['reward_mean_first']:.3f} (iteration 1) -> "
        f"{summary['reward_mean_last']:.3f} (iteration {summary['iterations']})"
    )
    print(f"  reward, first/last 3  {summary['reward_mean_first_3']:.3f} -> {summary['reward_mean_last_3']:.3f}")
    print(
        f"  KL last / max         {summary['kl_last']:.2f} / {summary['kl_max']:.2f} nats per sequence "
        f"(k1, sum over tokens)"
    )
    print(f"  KL coefficient last   {summary['kl_coef_last']:.4f}")
    print(f"  policy version        {summary['policy_version']}")
    print(f"  loop wall time        {summary['wall_seconds']:.1f} s ({summary['seconds_per_iteration']:.2f} s/iter)")
    print(f"  demo wall time        {wall:.1f} s (models, start-up, run, shutdown)")
    print(f"  written               {path}")


if __name__ == "__main__":
    sys.exit(main())
