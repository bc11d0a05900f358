"""The orchestrator's Score calls spread over several reward processes behind one target, as over the pods of a
headless Service in Kubernetes (``peers.reward: dns:///reward-pods:50052``, gRPC round robin): every process as its
own process on loopback, the target naming both reward addresses (``ipv4:a,b``, what the Service's DNS name
resolves to; no DNS server for it runs here). Each reward process answers a share of the run's Score calls."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from services.demo import service_configs
from services.launcher import Launcher, follow_run, start_stack
from shared.tiny_models import prompts

pytestmark = pytest.mark.e2e

ITERATIONS = 6
SCORE = re.compile(r'^grpc_server_handled_total\{[^}]*grpc_method="Score"[^}]*\} ([0-9.e+]+)$', re.M)


def _score_calls(process) -> float:
    text = httpx.get(f"http://127.0.0.1:{process.info['metrics_port']}/metrics", timeout=10).text
    return sum(float(v) for v in SCORE.findall(text))


def test_the_run_scores_on_every_reward_replica(pretrained_tied_policy_dir, tmp_path):
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(64)))
    with Launcher(tmp_path / "processes") as launcher:
        services, api = start_stack(
            launcher, service_configs(pretrained_tied_policy_dir), {"rpc": {"wait_ready_s": 60}}, reward_replicas=2
        )
        run = {
            "dataset": str(dataset),
            "iterations": ITERATIONS,
            "prompts_per_iteration": 4,
            "sampling": {"max_new_tokens": 8},
            "runs_dir": str(tmp_path / "runs"),
            "run_id": "balanced",
        }
        status = follow_run(api, run, quiet=True)
        assert status["state"] == "completed", status.get("error")
        calls = [_score_calls(services[name]) for name in ("reward", "reward-2")]
    # One Score per iteration, spread by round robin (2-4 of 6 each in three runs): each replica answers some.
    assert sum(calls) == ITERATIONS and min(calls) >= 1, calls
