"""Generation replicas coming and going during a run: real ``rlhf serve generation`` processes, real reward,
reference and trainer services (gRPC servers in this process), the loop driven in process over gRPC, and the
replicas discovered through the real ``kubernetes`` client watching EndpointSlices.

No kube-apiserver can run here (no cluster, etcd or container runtime on the development machine), so the
EndpointSlices are served by a stand-in API on loopback (``tests/k8s_standin.py``), changed by the test as the
endpoints controller would: an endpoint turns ready when its pod is, and not ready or gone when it terminates.
Each replica has its own slice, since the processes share an address and differ by port.

The run: A and B serve; C starts (listed, not ready) -> iteration 2: C turns ready while the pool is one version
ahead of it (it must pull the weights before it gets a prompt) -> iteration 3: B is taken out of the Service and
stopped cleanly -> iteration 4: A is SIGKILLed while it generates (its share goes to C) -> iteration 5: D joins,
and C leaves the Service while it generates (its call is cancelled and its share re-sent) -> iteration 6: D alone.
Checked: every prompt of every iteration generated exactly once, in order; every batch at the current policy
version; every Generate a replica served accepted (no stale answer, none unaccounted for); one version per
iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import time
from collections import Counter, defaultdict

import httpx
import pytest

from services.demo import service_configs
from services.launcher import Launcher, free_port
from services.orchestrator.clients import grpc_clients
from services.orchestrator.config import PeersConfig, RpcConfig, RunConfig
from services.orchestrator.dataset import PromptCursor, load_prompts
from services.orchestrator.loop import RLHFLoop
from services.orchestrator.metrics import GENERATION_RESHARES
from services.reference.servicer import ROLE as REFERENCE
from services.reward.servicer import ROLE as REWARD
from services.trainer.servicer import ROLE as TRAINER
from shared.tiny_models import prompts
from tests.k8s_standin import EndpointSliceAPI, endpoint_slice
from tests.service.grpc_helpers import running

pytestmark = pytest.mark.e2e

ITERATIONS, PROMPTS, SAMPLES = 6, 16, 2
REPLY = re.compile(r"generation replica (\S+) generated prompts (\d+)\.\.(\d+) at policy version (\d+)")


class Choreographed:
    """The loop's generation client, with the test's replica changes made at set points: ``before[i]`` runs
    before iteration i's Generate, ``during[i]`` while it runs."""

    def __init__(self, inner, before, during, records: list[logging.LogRecord]):
        self.inner, self.before, self.during, self.records = inner, before, during, records
        self.iteration = 0
        self.spans: dict[int, tuple[int, int]] = {}  # iteration -> range of log records its Generate wrote

    async def generate(self, prompts, params, wait_s=None):
        self.iteration += 1
        if self.iteration in self.before:
            await self.before[self.iteration]()
        first = len(self.records)
        call = asyncio.create_task(self.inner.generate(prompts, params, wait_s))
        if self.iteration in self.during:
            await self.during[self.iteration]()
        try:
            return await call
        finally:
            self.spans[self.iteration] = (first, len(self.records))

    async def sync_weights(self, version, epoch=0):
        return await self.inner.sync_weights(version, epoch)


async def _generating(metrics_url: str, timeout: float = 30) -> None:
    """Returns once the replica's model thread has a Generate queued or running."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            text = (await client.get(metrics_url)).text
            if re.search(r'^rlhf_model_queue_depth\{role="generation"\} [1-9]', text, re.M):
                return
            await asyncio.sleep(0.005)
    raise AssertionError(f"no Generate in flight on {metrics_url} within {timeout}s")


def _started_generates(metrics_url: str) -> float:
    text = httpx.get(metrics_url).text
    match = re.search(r'^grpc_server_started_total\{[^}]*grpc_method="Generate"[^}]*\} (\S+)', text, re.M)
    return float(match.group(1)) if match else 0.0


async def _until(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_replicas_join_leave_and_die_mid_run_without_losing_or_doubling_a_prompt(
    tiny_policy_dir, tmp_path, caplog
):
    caplog.set_level(logging.DEBUG, logger="services.orchestrator.clients")
    configs = service_configs(tiny_policy_dir)
    trainer_port = free_port()  # known before the replicas start: they may pull from it alone
    configs["trainer"]["server"] = {**configs["trainer"]["server"], "port": trainer_port}
    configs["generation"]["trainer_addresses"] = [f"127.0.0.1:{trainer_port}"]
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(64)))
    run = RunConfig(
        dataset=str(dataset),
        iterations=ITERATIONS,
        prompts_per_iteration=PROMPTS,
        sampling={"max_new_tokens": 48, "samples_per_prompt": SAMPLES},
        runs_dir=str(tmp_path / "runs"),
        record_rollouts=True,
    )
    with Launcher(tmp_path / "processes") as launcher, EndpointSliceAPI() as api:
        replicas = {name: launcher.start(name, ["serve", "generation"], configs["generation"]) for name in "ABCD"}
        # The other roles in this process, over real gRPC (the replicas pull weights from this trainer).
        async with contextlib.AsyncExitStack() as stack:
            addresses = {}
            for role in (REWARD, REFERENCE, TRAINER):
                config = role.config_type.model_validate(configs[role.name])
                if role is TRAINER:
                    config.ppo.ppo_epochs, config.ppo.minibatch_size, config.ppo.micro_batch_size = 1, 32, 32
                server, port = await role.build_server(config, role.load_backend(config))
                await stack.enter_async_context(running(server))
                addresses[role.name] = f"127.0.0.1:{port}"
            for replica in replicas.values():
                await asyncio.to_thread(replica.wait_ready, 120)
            port = {name: r.info["port"] for name, r in replicas.items()}
            metrics = {name: f"http://127.0.0.1:{r.info['metrics_port']}/metrics" for name, r in replicas.items()}
            address = {name: f"127.0.0.1:{port[name]}" for name in replicas}
            name_of = {a: n for n, a in address.items()}

            def publish(name: str, ready: bool | None) -> None:
                """The endpoints controller: replica ``name``'s slice, its endpoint ready or not; None = gone."""
                if ready is None:
                    api.delete(f"generation-{name.lower()}")
                else:
                    api.apply(
                        endpoint_slice(
                            f"generation-{name.lower()}", "generation", [("127.0.0.1", ready)], {"grpc": port[name]}
                        )
                    )

            publish("A", True)
            publish("B", True)
            publish("C", False)  # its pod is starting
            peers = PeersConfig.model_validate(
                {
                    "generation_discovery": {
                        "mode": "kubernetes",
                        "service": "generation",
                        "namespace": "rlhf",
                        "port_name": "grpc",
                        "kubeconfig": str(api.write_kubeconfig(tmp_path / "kubeconfig")),
                    },
                    **addresses,
                }
            )
            clients = grpc_clients(peers, RpcConfig(initial_backoff_s=0.05, max_backoff_s=0.5, wait_ready_s=60))
            pool = clients.generation.pool
            exits = {}

            async def scale_out_c():
                publish("C", True)
                await _until(lambda: address["C"] in pool.replicas)  # known, at version 0, while the pool is at 1

            async def remove_b():
                publish("B", False)  # terminating: out of the Service first, then SIGTERM
                await _until(lambda: address["B"] not in pool.replicas)
                exits["B"] = await asyncio.to_thread(replicas["B"].stop)

            async def kill_a():
                await _generating(metrics["A"])
                replicas["A"].process.send_signal(signal.SIGKILL)
                await asyncio.sleep(0.3)  # the endpoints controller notices a while later
                publish("A", None)

            async def scale_out_d():
                publish("D", True)

            async def remove_c_mid_batch():
                await _generating(metrics["C"])
                publish("C", None)

            reshares_before = {r: GENERATION_RESHARES.labels(r)._value.get() for r in ("failed", "gone", "stale")}
            generation = Choreographed(
                clients.generation,
                before={2: scale_out_c, 3: remove_b, 5: scale_out_d},
                during={4: kill_a, 5: remove_c_mid_batch},
                records=caplog.records,
            )
            clients.generation = generation
            try:
                summary = await RLHFLoop("replicas", run, clients).run()
                started = {name: _started_generates(metrics[name]) for name in ("C", "D")}
            finally:
                await clients.close()
        exits["C"], exits["D"] = replicas["C"].stop(), replicas["D"].stop()

    # One policy version per iteration.
    assert summary["iterations"] == ITERATIONS and summary["policy_version"] == ITERATIONS
    run_dir = tmp_path / "runs" / "replicas"
    records = [json.loads(line) for line in (run_dir / "iterations.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in records] == list(range(1, ITERATIONS + 1))

    # Every prompt the cursor gave, generated exactly SAMPLES times, in order, by the policy of that iteration.
    cursor = PromptCursor(load_prompts(dataset), run.seed)
    rollouts = defaultdict(list)
    for line in (run_dir / "rollouts.jsonl").read_text().splitlines():
        rollouts[json.loads(line)["iteration"]].append(json.loads(line))
    for iteration in range(1, ITERATIONS + 1):
        batch = cursor.next_batch(PROMPTS)
        samples = rollouts[iteration]
        assert [s["prompt"] for s in samples] == [p for p in batch for _ in range(SAMPLES)], iteration
        assert {s["policy_version"] for s in samples} == {iteration - 1}, iteration

    # Which replica answered what, per iteration (the client's log of accepted replies).
    served: dict[int, Counter] = {}
    prompts_by_iteration: dict[int, list[int]] = {}
    for iteration, (first, last) in generation.spans.items():
        served[iteration] = Counter()
        covered = []
        for record in caplog.records[first:last]:
            if match := REPLY.search(record.getMessage()):
                replica, low, high, version = match.groups()
                assert int(version) == iteration - 1, record.getMessage()
                served[iteration][name_of[replica]] += 1
                covered.extend(range(int(low), int(high) + 1))
        prompts_by_iteration[iteration] = sorted(covered)
    assert all(covered == list(range(PROMPTS)) for covered in prompts_by_iteration.values()), prompts_by_iteration
    assert set(served[1]) == {"A", "B"}
    assert set(served[3]) <= {"A", "C"}
    assert "A" not in served[4] and "C" in served[4]  # killed mid-batch: its share went to C
    assert "C" not in served[5] and "D" in served[5]  # left mid-batch: its share went to D
    assert set(served[6]) == {"D"}

    reshares = {r: GENERATION_RESHARES.labels(r)._value.get() - before for r, before in reshares_before.items()}
    assert reshares["failed"] >= 1 and reshares["gone"] >= 1, reshares
    assert reshares["stale"] == 0, reshares
    # C and D joined behind the policy: every Generate they served was an accepted reply at the current version
    # (C's one more is the call cancelled when it left the Service).
    assert started["D"] == sum(s["D"] for s in served.values())
    assert started["C"] == sum(s["C"] for s in served.values()) + 1
    assert exits == {"B": 0, "C": 0, "D": 0}
