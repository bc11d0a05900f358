"""End to end, every role its own process on loopback: a trainer with a critic-free estimator (GRPO: no critic is
loaded) fed groups of samples over gRPC (the TrainStep's group ids come from generation's prompt indices), in the
synchronous loop and in the asynchronous one (one step off-policy)."""

from __future__ import annotations

import json

import pytest

from services.demo import DEMO_PPO, service_configs
from services.launcher import Launcher, follow_run, start_stack
from shared.tiny_models import prompts

pytestmark = pytest.mark.e2e

ITERATIONS = 4


@pytest.fixture(scope="module")
def grpo_stack(pretrained_tied_policy_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("grpo")
    configs = service_configs(pretrained_tied_policy_dir)
    configs["trainer"] = {**configs["trainer"], "ppo": {**DEMO_PPO, "advantage_estimator": "grpo"}}
    dataset = work / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(64)))
    with Launcher(work / "processes") as launcher:
        services, api = start_stack(launcher, configs, {"rpc": {"wait_ready_s": 60}})
        yield api, services, work, dataset


def _run(api, work, dataset, run_id: str, **extra) -> dict:
    run = {
        "dataset": str(dataset),
        "iterations": ITERATIONS,
        "prompts_per_iteration": 4,
        "sampling": {"max_new_tokens": 12, "samples_per_prompt": 4},
        "runs_dir": str(work / "runs"),
        "run_id": run_id,
        **extra,
    }
    return follow_run(api, run, quiet=True)


def test_grpo_trains_through_the_services_without_a_critic(grpo_stack):
    api, _, work, dataset = grpo_stack
    status = _run(api, work, dataset, "grpo-sync")
    assert status["state"] == "completed", status.get("error")
    records = status["stats"]
    first = records[0]["policy_version"]
    assert [r["policy_version"] for r in records] == [first, first + 1, first + 2, first + 3]
    assert all(r["samples"] == 16 for r in records)
    assert all(r["value_loss"] == 0 and r["explained_variance"] == 0 for r in records)  # no critic
    assert all(r["staleness"] == 0 for r in records)


def test_grpo_refuses_single_samples_with_a_clear_error(grpo_stack):
    api, _, work, dataset = grpo_stack
    status = _run(api, work, dataset, "grpo-single", sampling={"max_new_tokens": 8, "samples_per_prompt": 1})
    assert status["state"] == "failed"
    assert "samples_per_prompt >= 2" in status["error"]


def test_the_asynchronous_loop_through_the_services(grpo_stack):
    api, _, work, dataset = grpo_stack
    status = _run(api, work, dataset, "grpo-async", asynchronous=True, max_staleness=1)
    assert status["state"] == "completed", status.get("error")
    records = status["stats"]
    assert [r["staleness"] for r in records] == [0, 1, 1, 1]
    # The trainer starts the run at version p: iterations 1 and 2 are sampled by p, then each by the one before.
    p = records[0]["policy_version"] - 1
    assert [r["generation_policy_version"] for r in records] == [p, p, p + 1, p + 2]
    assert [r["policy_version"] for r in records] == [p + 1, p + 2, p + 3, p + 4]
