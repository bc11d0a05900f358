"""Chaos: a run through every process while they are killed (SIGKILL) and restarted on the same address.

The stack: generation, reward, reference and trainer services and the orchestrator, each its own process on a fixed
loopback port, with run state in a real redis-server (append-only file, fsync always). A kill is ``kill -9`` at a
random moment of the run, and the process (or Redis) comes back on the same address two seconds later, as a
Kubernetes pod would. The same run without kills is the reference: the interrupted run must end with the same
per-iteration prompts, samples and rewards, and the same policy weights.

``make chaos`` runs one long run with many kills (``python -m tests.chaos --kills 50``); ``tests/e2e/test_chaos.py``
kills each process once.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file

from services.demo import service_configs
from services.launcher import Launcher, ServiceProcess, secure_configs
from tests.redis_server import RedisServer, free_port

ROLES = ("generation", "reward", "reference", "trainer")
TARGETS = (*ROLES, "orchestrator", "redis")
RESTART_AFTER_S = 2.0  # a pod's restart delay
FINISHED = ("completed", "stopped", "failed")


@dataclass
class Outcome:
    status: dict  # the run's final status (GET /runs/{id})
    rollouts: list[dict]  # rollouts.jsonl: every sample of every iteration
    weights: dict[str, torch.Tensor]  # the trainer's final checkpoint of the policy
    kills: list[tuple[str, int]] = field(default_factory=list)  # (target, iterations done when it was killed)


class Stack:
    """The services, the orchestrator and Redis, each restartable on its own address."""

    def __init__(self, work: Path, policy: Path, checkpoint_every: int = 2):
        self.work = work
        self.launcher = Launcher(work / "processes")
        self.redis = RedisServer(work / "redis")
        self.configs = service_configs(policy)
        for config in self.configs.values():
            config["server"] = {**config["server"], "port": free_port()}
        checkpoints = {"root": str(work / "checkpoints"), "every": checkpoint_every, "keep": 2}
        self.configs["trainer"]["checkpoint"] = checkpoints
        self.configs, self.auth = secure_configs(self.launcher, self.configs)  # tokens, as deployed
        self.processes: dict[str, ServiceProcess] = {}
        self.api_port = free_port()
        self._restarts: dict[str, threading.Thread] = {}  # target -> its restart in progress
        self._errors: list[BaseException] = []

    def orchestrator_config(self) -> dict:
        address = {role: f"127.0.0.1:{config['server']['port']}" for role, config in self.configs.items()}
        return {
            "peers": {"generation": [address["generation"]], **{r: address[r] for r in ROLES[1:]}},
            # the dataset lies beside the stack's work directory (tests) or in it (python -m tests.chaos)
            "api": {"port": self.api_port, "datasets_root": str(self.work.parent), "runs_root": str(self.work)},
            "auth": self.auth,
            "store": {"url": self.redis.url, "outage_budget_s": 120},
            "rpc": {"outage_budget_s": 180, "initial_backoff_s": 0.2, "max_backoff_s": 1.0, "wait_ready_s": 180},
        }

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> None:
        self.redis.start()
        for role in ROLES:
            self.processes[role] = self.launcher.start(role, ["serve", role], self.configs[role])
        for role in ROLES:
            self.processes[role].wait_ready(180)
        self._start_orchestrator()

    def _start_orchestrator(self) -> None:
        self.processes["orchestrator"] = self.launcher.start(
            "orchestrator", ["orchestrator"], self.orchestrator_config()
        )
        self.processes["orchestrator"].wait_ready(120)

    def kill_and_restart(self, target: str) -> None:
        """``kill -9`` now; the restart on the same address ``RESTART_AFTER_S`` later, in the background (the run
        goes on meanwhile, and the next kill need not wait for it)."""
        if (pending := self._restarts.get(target)) is not None:
            pending.join()  # killed again before it was back: let it come back first
        self.kill(target)

        def restart() -> None:
            time.sleep(RESTART_AFTER_S)
            try:
                self.restart(target)
            except BaseException as exc:  # raised in the harness by wait_restarts()
                self._errors.append(exc)

        thread = threading.Thread(target=restart, name=f"restart-{target}", daemon=True)
        self._restarts[target] = thread
        thread.start()

    def wait_restarts(self) -> None:
        for thread in list(self._restarts.values()):
            thread.join()
        if self._errors:
            raise self._errors[0]

    def kill(self, target: str) -> None:
        if target == "redis":
            self.redis.kill()
            return
        process = self.processes[target].process
        process.kill()
        process.wait()

    def restart(self, target: str) -> None:
        if target == "redis":
            self.redis.restart()
        elif target == "orchestrator":
            self._start_orchestrator()
        else:
            self.processes[target] = self.launcher.start(target, ["serve", target], self.configs[target])
            self.processes[target].wait_ready(180)

    def close(self) -> None:
        self.launcher.stop_all()
        self.redis.kill()


def _get(client: httpx.Client, path: str) -> dict | None:
    """GET on the control API, None while the orchestrator is down (killed, or restarting)."""
    try:
        response = client.get(path)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


def run(
    work: Path,
    policy: Path,
    dataset: Path,
    iterations: int,
    kills: list[str],
    seed: int = 0,
    rng: random.Random | None = None,
    timeout_s: float = 900,
    log=print,
) -> Outcome:
    """One run of ``iterations`` on a fresh stack in ``work``, killing each of ``kills`` in turn at a random
    moment (spread over the run) and restarting it on its address."""
    rng = rng or random.Random(seed)
    stack = Stack(work, policy)
    done_kills: list[tuple[str, int]] = []
    try:
        stack.start()
        spec = {
            "dataset": str(dataset),
            "iterations": iterations,
            "prompts_per_iteration": 8,
            "sampling": {"max_new_tokens": 12, "temperature": 1.0},
            "runs_dir": str(work / "runs"),
            "run_id": "chaos",
            "seed": seed,
            "record_rollouts": True,
        }
        # Kill k comes at a random moment of the k-th of len(kills) equal stretches of the first half of the run
        # (once the iteration the moment falls in has started): restarts and outages delay kills, and the second
        # half leaves room for that, so the run cannot end before the last one.
        stretch = max(1, iterations // 2) / max(1, len(kills))
        thresholds = [int(stretch * (k + rng.random())) for k in range(len(kills))]
        deadline = time.monotonic() + timeout_s
        # A short timeout: a GET waits for the run store while Redis is down, and the run races ahead once it is back.
        with httpx.Client(base_url=stack.api, timeout=2) as client:
            created = client.post("/runs", json=spec)
            created.raise_for_status()
            pending = list(zip(thresholds, kills, strict=True))
            status = None
            while time.monotonic() < deadline:
                status = _get(client, "/runs/chaos") or status
                if status is not None and status["state"] in FINISHED and not pending:
                    break
                if status is not None and status["state"] in FINISHED:
                    raise AssertionError(f"run ended {status['state']} before every kill: {status.get('error')}")
                if pending and status is not None and status["iteration"] >= pending[0][0]:
                    _, target = pending.pop(0)
                    # A random moment of the iteration now running, which lasts about as long as the last one did
                    # (0.1 s on the tiny models: sleeping up to a second let the run end before the last kills).
                    records = status.get("stats") or []
                    iteration_s = min(1.0, records[-1].get("wall_seconds", 1.0)) if records else 1.0
                    time.sleep(rng.uniform(0, 1.0) * iteration_s)
                    done = (_get(client, "/runs/chaos") or status)["iteration"]
                    if done >= iterations:
                        pending.insert(0, (0, target))  # too late for this one; the run is over
                        break
                    log(f"  kill -9 {target} (after iteration {done})")
                    stack.kill_and_restart(target)
                    done_kills.append((target, done))
                    continue
                time.sleep(0.2)
            else:
                raise AssertionError(f"run not finished after {timeout_s:.0f}s: {status}")
            if pending:
                raise AssertionError(f"the run finished before kills {[t for _, t in pending]}")
            stack.wait_restarts()
            final = status
        rollouts = [json.loads(line) for line in (work / "runs" / "chaos" / "rollouts.jsonl").open()]
        checkpoint = sorted((work / "checkpoints").glob("step-*"))[-1]
        weights = load_file(str(checkpoint / "policy" / "model.safetensors"))
        return Outcome(final, rollouts, weights, done_kills)
    finally:
        stack.close()


COMPARED = (
    "iteration",
    "policy_version",
    "reward_mean",
    "reward_std",
    "reward_min",
    "reward_max",
    "response_length_mean",
    "eos_fraction",
    "kl",
    "kl_coef",
    "policy_loss",
    "value_loss",
    "entropy",
    "clip_fraction",
    "approx_kl",
    "explained_variance",
    "samples",
    "example",
)


def compare(reference: Outcome, interrupted: Outcome) -> dict:
    """What differs between the two runs: records, samples, weights (the largest absolute difference)."""
    ref_records = [{k: r[k] for k in COMPARED} for r in reference.status["stats"]]
    records = [{k: r[k] for k in COMPARED} for r in interrupted.status["stats"]]
    differing = [a["iteration"] for a, b in zip(ref_records, records, strict=False) if a != b]
    largest = max(
        float((reference.weights[name] - interrupted.weights[name]).abs().max()) for name in reference.weights
    )
    return {
        "state": interrupted.status["state"],
        "error": interrupted.status.get("error"),
        "iterations": len(records),
        "versions": [r["policy_version"] for r in records],
        "records_differing": differing + (["count"] if len(records) != len(ref_records) else []),
        "samples_equal": reference.rollouts == interrupted.rollouts,
        "samples": len(interrupted.rollouts),
        "weight_names_equal": set(reference.weights) == set(interrupted.weights),
        "largest_weight_difference": largest,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A long run with many random kills, against an uninterrupted one.")
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/chaos"))
    args = parser.parse_args(argv)

    from shared.tiny_models import build_policy, prompts

    work = args.work.resolve()
    policy = work / "policy"
    if not (policy / "model.safetensors").exists():
        build_policy(policy)
    dataset = work / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(256)))
    rng = random.Random(args.seed)
    kills = [rng.choice(TARGETS) for _ in range(args.kills)]
    started = time.monotonic()
    print(f"reference run: {args.iterations} iterations, no kills")
    reference = run(work / "reference", policy, dataset, args.iterations, [], seed=args.seed)
    reference_s = time.monotonic() - started
    print(f"interrupted run: {args.iterations} iterations, {args.kills} kills")
    interrupted = run(work / "interrupted", policy, dataset, args.iterations, kills, seed=args.seed, rng=rng)
    interrupted_s = time.monotonic() - started - reference_s
    result = compare(reference, interrupted)
    counts = {t: sum(1 for k, _ in interrupted.kills if k == t) for t in TARGETS}
    print()
    print(f"kills survived: {len(interrupted.kills)} ({', '.join(f'{t} {n}' for t, n in counts.items())})")
    print(f"run: {result['state']}, {result['iterations']} iterations, versions 1..{max(result['versions'] or [0])}")
    print(f"iteration records that differ from the uninterrupted run: {result['records_differing'] or 'none'}")
    print(f"samples (prompt, response, score) identical: {result['samples_equal']} ({result['samples']} samples)")
    print(f"largest policy weight difference: {result['largest_weight_difference']:.3g}")
    print(f"wall time: reference run {reference_s:.0f} s, interrupted run {interrupted_s:.0f} s (start-up included)")
    lost = (
        result["state"] != "completed"
        or result["versions"] != list(range(1, args.iterations + 1))
        or result["records_differing"]
        or not result["samples_equal"]
        or result["largest_weight_difference"] != 0
    )
    print("lost: nothing" if not lost else "lost: SOMETHING (see above)")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
