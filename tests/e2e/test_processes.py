"""End to end: the four services and the orchestrator as separate processes (``rlhf serve``, ``rlhf orchestrator``)
on loopback, real gRPC between them, the run driven through the control API.
"""

from __future__ import annotations

import json
import statistics
import time

import httpx
import pytest

from services.demo import service_configs
from services.launcher import Launcher, start_stack
from shared.tiny_models import prompts

pytestmark = pytest.mark.e2e

ITERATIONS = 12


@pytest.fixture(scope="module")
def stack(pretrained_tied_policy_dir, tmp_path_factory):
    """Every role as its own process, on a policy with tied embeddings (as SmolLM2, Qwen2.5 and Llama-3.2 1B/3B
    ship; the pipeline's end-to-end test runs an untied one); yields (launcher, api url, services)."""
    work = tmp_path_factory.mktemp("e2e")
    with Launcher(work / "processes") as launcher:
        services, api = start_stack(
            launcher, service_configs(pretrained_tied_policy_dir), {"rpc": {"wait_ready_s": 60}}
        )
        yield launcher, api, services, work


def _wait(client: httpx.Client, run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/runs/{run_id}").json()
        if status["state"] in ("completed", "stopped", "failed"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not finish in {timeout}s")


def test_loop_through_service_processes_learns_and_advances_versions(stack):
    _, api, services, work = stack
    dataset = work / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(256)))
    run = {
        "dataset": str(dataset),
        "iterations": ITERATIONS,
        "prompts_per_iteration": 32,
        "sampling": {"max_new_tokens": 16},
        "runs_dir": str(work / "runs"),
        "run_id": "e2e",
    }
    with httpx.Client(base_url=api, timeout=30) as client:
        created = client.post("/runs", json=run)
        assert created.status_code == 201, created.text
        status = _wait(client, "e2e", 600)
        metrics = client.get("/metrics").text
    assert status["state"] == "completed", status.get("error")
    records = status["stats"]
    # The policy version advances exactly once per iteration, and generation serves it before the next batch.
    assert [r["policy_version"] for r in records] == list(range(1, ITERATIONS + 1))
    rewards = [r["reward_mean"] for r in records]
    first, last = statistics.fmean(rewards[:3]), statistics.fmean(rewards[-3:])
    assert last > first + 0.1, f"reward did not rise: {rewards}"
    # k1 is unbiased but can dip below 0 on a batch; the adaptive penalty keeps it bounded.
    assert all(-1 < r["kl"] < 20 for r in records), [r["kl"] for r in records]
    summary = json.loads((work / "runs" / "e2e" / "summary.json").read_text())
    for key in ("iterations", "reward_mean_first", "reward_mean_last", "kl_last", "wall_seconds", "policy_version"):
        assert summary[key] is not None, key
    assert summary["iterations"] == ITERATIONS and summary["policy_version"] == ITERATIONS
    assert summary["config"]["dataset"] == str(dataset)
    assert 'rlhf_iteration{run_id="e2e"} 12.0' in metrics
    assert 'rlhf_phase_seconds_count{phase="train",run_id="e2e"} 12.0' in metrics
    # Log lines carry the run id and iteration, in the services too (sent as gRPC metadata).
    trainer_log = services["trainer"].log_path.read_text()
    assert f"run=e2e iter={ITERATIONS} services.trainer.servicer: step -> version {ITERATIONS}:" in trainer_log
    # Each service serves the standard gRPC server metrics on its own port.
    trainer_metrics = httpx.get(f"http://127.0.0.1:{services['trainer'].info['metrics_port']}/metrics").text
    assert (
        'grpc_server_handled_total{grpc_code="OK",grpc_method="TrainStep",grpc_service="rlhf.v1.Trainer",'
        'grpc_type="unary"} 12.0'
    ) in trainer_metrics


def test_every_process_stops_cleanly_on_sigterm(stack):
    launcher, _, _, _ = stack
    codes = launcher.stop_all()
    assert codes == {"orchestrator": 0, "trainer": 0, "reference": 0, "reward": 0, "generation": 0}
