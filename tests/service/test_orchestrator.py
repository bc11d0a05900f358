"""The orchestrator: control API over in-process clients, datasets, retries against a real gRPC peer, and the
gRPC clients against real services (several generation replicas included)."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import pytest

from services.generation.backend import GenerationBackend
from services.generation.config import GenerationConfig
from services.generation.servicer import build_server as build_generation
from services.orchestrator.app import create_app
from services.orchestrator.clients import GrpcGeneration, GrpcReward, Retrying
from services.orchestrator.config import OrchestratorConfig, PeersConfig, RpcConfig, RunConfig
from services.orchestrator.dataset import DatasetError, PromptCursor, load_prompts
from services.orchestrator.loop import RLHFLoop
from services.reward.backend import load_backend
from services.reward.config import RewardConfig
from services.reward.servicer import build_server as build_reward
from shared.store import open_store
from shared.types import SamplingParams
from tests.helpers import REWARD, tiny_inprocess_clients
from tests.service.grpc_helpers import running


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the cat is", "the day was", "we", "she"]))
    return path


@pytest.fixture
def clients_factory(policy_shape_dir):
    """In-process clients on the tiny policy, untied and tied."""

    def factory():
        return tiny_inprocess_clients(policy_shape_dir)

    return factory


def test_dataset_rows_and_errors_name_file_and_line(tmp_path):
    good = tmp_path / "ok.jsonl"
    good.write_text('{"prompt": "a"}\n\n{"prompt": "b", "extra": 1}\n')
    assert load_prompts(good) == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: .*'prompt'"):
        load_prompts(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(DatasetError, match=r"broken.jsonl:2: not valid JSON"):
        load_prompts(broken)
    with pytest.raises(DatasetError, match="no such file"):
        load_prompts(tmp_path / "missing.jsonl")


def test_cursor_visits_every_prompt_once_per_epoch_and_is_seeded():
    cursor = PromptCursor([f"p{i}" for i in range(10)], seed=3)
    epoch = cursor.next_batch(4) + cursor.next_batch(6)
    assert sorted(epoch) == sorted(f"p{i}" for i in range(10))
    assert PromptCursor([f"p{i}" for i in range(10)], seed=3).next_batch(10) == epoch
    assert cursor.next_batch(10) != epoch  # reshuffled for the next epoch


async def test_inprocess_loop_advances_one_version_per_iteration(clients_factory, dataset, tmp_path):
    config = RunConfig(
        dataset=str(dataset),
        iterations=3,
        prompts_per_iteration=4,
        runs_dir=str(tmp_path),
        sampling={"max_new_tokens": 6, "samples_per_prompt": 2},
    )
    clients = clients_factory()
    summary = await RLHFLoop("inproc", config, clients).run()
    assert summary["iterations"] == 3 and summary["policy_version"] == 3
    lines = (tmp_path / "inproc" / "iterations.jsonl").read_text().splitlines()
    assert [json.loads(line)["policy_version"] for line in lines] == [1, 2, 3]
    assert all(json.loads(line)["samples"] == 8 for line in lines)
    assert clients.generation.backend.version == 3 == clients.trainer.backend.version


async def test_control_api_start_status_conflict_stop_and_metrics(clients_factory, dataset, tmp_path):
    config = OrchestratorConfig.model_validate(
        {
            "run": {
                "dataset": str(dataset),
                "prompts_per_iteration": 4,
                "runs_dir": str(tmp_path),
                "sampling": {"max_new_tokens": 4},
            }
        }
    )
    app = create_app(config, clients_factory)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        bad = tmp_path / "bad.jsonl"
        bad.write_text("not json\n")
        reply = await client.post("/runs", json={"dataset": "bad.jsonl"})  # under the dataset's directory
        assert reply.status_code == 422 and "bad.jsonl:1" in reply.json()["detail"]
        # Paths from a request stay under the configured roots; run ids are names, not paths.
        for body, field in [
            ({"dataset": "/etc/passwd"}, "dataset"),
            ({"dataset": "../bad.jsonl"}, "dataset"),
            ({"runs_dir": "/etc"}, "runs_dir"),
            ({"runs_dir": "a/../../b"}, "runs_dir"),
            ({"run_id": "../.."}, "run_id"),
            ({"run_id": "a/b"}, "run_id"),
        ]:
            reply = await client.post("/runs", json=body)
            assert reply.status_code == 422 and reply.json()["detail"].startswith(field), (body, reply.text)
        reply = await client.post("/runs", json={"iterations": "many"})
        assert reply.status_code == 422 and "iterations" in reply.text
        assert (await client.get("/runs/nope")).status_code == 404

        first = await client.post("/runs", json={"iterations": 2, "run_id": "one"})
        assert first.status_code == 201 and first.json()["run_id"] == "one"
        conflict = await client.post("/runs", json={"iterations": 2, "run_id": "two"})
        assert conflict.status_code == 409
        status = await _until_done(client, "one")
        assert status["state"] == "completed" and [s["policy_version"] for s in status["stats"]] == [1, 2]
        assert status["summary"]["iterations"] == 2

        await client.post("/runs", json={"iterations": 50, "run_id": "long"})
        while (await client.get("/runs/long")).json()["iteration"] < 1:
            await asyncio.sleep(0.05)
        stopping = await client.post("/runs/long/stop")
        assert stopping.json()["state"] in ("stopping", "stopped")
        status = await _until_done(client, "long")
        assert status["state"] == "stopped" and 1 <= status["iteration"] < 50
        assert status["summary"]["stopped_early"] is True
        metrics = (await client.get("/metrics")).text
        assert 'rlhf_run_state{run_id="long",state="stopped"} 1.0' in metrics
        assert 'rlhf_iteration{run_id="one"} 2.0' in metrics
        assert [r["run_id"] for r in (await client.get("/runs")).json()] == ["one", "long"]


async def _until_done(client, run_id, timeout=120):
    for _ in range(int(timeout / 0.05)):
        status = (await client.get(f"/runs/{run_id}")).json()
        if status["state"] in ("completed", "stopped", "failed"):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} still {status['state']}")


async def test_retries_with_backoff_until_a_late_peer_comes_up():
    """A real reward server that starts listening only after the client began calling."""
    config = RewardConfig.model_validate({**REWARD, "server": {"port": 0}})
    server, port = await build_reward(config, load_backend(config))  # bound, not started: connections refused
    rpc = RpcConfig(initial_backoff_s=0.2, outage_budget_s=30, max_backoff_s=0.5)
    reward = GrpcReward(PeersConfig(reward=f"127.0.0.1:{port}"), rpc)
    from services.orchestrator.clients import Rollouts

    rollouts = Rollouts(["p"], [" good"], [1], ["eos"], 0, None)
    call = asyncio.create_task(reward.score(rollouts))
    await asyncio.sleep(0.6)
    assert not call.done()
    async with running(server):
        assert await asyncio.wait_for(call, 10) == [1.0]
    await reward.channel.close()


async def test_retrying_waits_out_the_outage_budget_and_never_retries_bad_input():
    """UNAVAILABLE and DEADLINE_EXCEEDED are retried (with the peer shown as waited for) until the outage budget
    is spent; a bad request is not retried."""
    from services.orchestrator.metrics import waiting_for

    attempts, seen_waiting = [], []

    async def unavailable(timeout):
        attempts.append(time.monotonic())
        seen_waiting.append("peer" in waiting_for())
        raise _rpc_error(grpc.StatusCode.UNAVAILABLE if len(attempts) % 2 else grpc.StatusCode.DEADLINE_EXCEEDED)

    retry = Retrying(RpcConfig(initial_backoff_s=0.01, max_backoff_s=0.05, outage_budget_s=0.5), "peer")
    begin = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError):
        await retry("M", unavailable, 1.5)
    assert 0.4 <= time.monotonic() - begin < 1.5 and len(attempts) >= 5
    assert seen_waiting[0] is False and all(seen_waiting[1:])  # waiting from the first retry on
    assert "peer" not in waiting_for()

    async def invalid(timeout):
        attempts.append(timeout)
        raise _rpc_error(grpc.StatusCode.INVALID_ARGUMENT)

    attempts.clear()
    with pytest.raises(grpc.aio.AioRpcError):
        await retry("M", invalid, 1.0)
    assert attempts == [1.0]


def _rpc_error(code):
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="test")


async def test_prompts_are_split_across_generation_replicas_and_merged_in_order(tiny_policy_dir):
    replicas = []
    for _ in range(3):
        config = GenerationConfig.model_validate({"model": {"path": str(tiny_policy_dir)}, "server": {"port": 0}})
        replicas.append(await build_generation(config, GenerationBackend(config)))
    contexts = [running(server) for server, _ in replicas]
    for context in contexts:
        await context.__aenter__()
    try:
        peers = PeersConfig(generation=[f"127.0.0.1:{port}" for _, port in replicas])
        client = GrpcGeneration(peers, RpcConfig())
        prompts = ["the cat is", "we", "she", "the day was", "a bird", "they"]
        rollouts = await client.generate(prompts, SamplingParams(max_new_tokens=4, seed=1, samples_per_prompt=2))
        assert rollouts.prompts == [p for p in prompts for _ in range(2)]
        merged = rollouts.tokens
        assert list(merged.prompt_index) == [i for i in range(6) for _ in range(2)]
        from shared import codec

        ids = codec.ragged_from_pb(merged.prompt_ids, "p")
        tokenizer = replicas[0][0].servicers[0].backend.tokenizer
        assert [row.tolist() for row in ids] == [tokenizer(p)["input_ids"] for p in prompts for _ in range(2)]
        lengths = [len(r) for r in codec.ragged_from_pb(merged.response_logprobs, "l")]
        assert lengths == rollouts.response_lengths
        await client.close()
    finally:
        for context in contexts:
            await context.__aexit__(None, None, None)


async def test_a_stale_replica_is_resynced_and_its_share_resent_and_no_replica_left_is_an_error(tiny_policy_dir):
    """Two replicas and a trainer: a replica that answers with an older policy version (as one restarted behind
    the pool's back would) has its share re-sent to the other and pulls the current version from the trainer;
    when every replica is down, generate fails after ``rpc.outage_budget_s``."""
    from services.orchestrator.metrics import GENERATION_RESHARES
    from services.orchestrator.replicas import NoReplicaError, ReplicaState
    from services.trainer.config import TrainerConfig
    from services.trainer.servicer import ROLE as TRAINER

    trainer_config = TrainerConfig.model_validate({"policy": {"path": str(tiny_policy_dir)}, "server": {"port": 0}})
    trainer = TRAINER.load_backend(trainer_config)
    trainer_server, trainer_port = await TRAINER.build_server(trainer_config, trainer)
    replicas = []
    for _ in range(2):
        config = GenerationConfig.model_validate(
            {"model": {"path": str(tiny_policy_dir)}, "trainer_addresses": [f"127.0.0.1:{trainer_port}"]}
        )
        replicas.append(await build_generation(config, GenerationBackend(config)))
    contexts = [running(server) for server, _ in [(trainer_server, trainer_port), *replicas]]
    for context in contexts:
        await context.__aenter__()
    peers = PeersConfig(generation=[f"127.0.0.1:{port}" for _, port in replicas], trainer=f"127.0.0.1:{trainer_port}")
    client = GrpcGeneration(peers, RpcConfig(initial_backoff_s=0.05, max_backoff_s=0.1, outage_budget_s=1))
    prompts = ["the cat is", "we", "she", "the day was"]
    params = SamplingParams(max_new_tokens=4, seed=1)
    try:
        assert (await client.generate(prompts, params)).policy_version == 0
        trainer.version = 1  # as after a step (the weights are the same; the version is what is checked)
        assert (await client.sync_weights(1, trainer.epoch)).version == 1
        stale_backend = replicas[1][0].servicers[0].backend
        stale_backend.version = 0  # restarted behind the pool's back: it serves the initial weights again
        stale = GENERATION_RESHARES.labels("stale")._value.get()
        rollouts = await client.generate(prompts, params)
        assert rollouts.policy_version == 1 and rollouts.prompts == prompts
        assert GENERATION_RESHARES.labels("stale")._value.get() == stale + 1
        replica = client.pool.replicas[peers.generation[1]]
        for _ in range(200):  # synced again in the background: pulled version 1 from the trainer
            if replica.state is ReplicaState.READY:
                break
            await asyncio.sleep(0.02)
        assert replica.state is ReplicaState.READY and stale_backend.version == 1
        for context in contexts[1:]:  # every replica down
            await context.__aexit__(None, None, None)
        contexts = contexts[:1]
        with pytest.raises(NoReplicaError, match="no generation replica serves policy version 1"):
            await client.generate(prompts, params)
    finally:
        await client.close()
        for context in contexts:
            await context.__aexit__(None, None, None)


async def test_api_token_guards_the_runs_but_not_health_or_metrics(clients_factory, dataset, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-s3cret-s3cret\n")
    config = OrchestratorConfig.model_validate(
        {"auth": {"token_file": str(token_file)}, "run": {"dataset": str(dataset), "runs_dir": str(tmp_path)}}
    )
    transport = httpx.ASGITransport(app=create_app(config, clients_factory))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/runs")).status_code == 401
        wrong = await client.get("/runs", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert (await client.post("/runs", json={"iterations": 1})).status_code == 401
        ok = await client.get("/runs", headers={"Authorization": "Bearer s3cret-s3cret-s3cret"})
        assert ok.status_code == 200 and ok.json() == []
    # An empty file, the manifests' placeholder, a short token: refused at start-up, saying what to set.
    for text, message in [
        ("", "holds no token"),
        ("REPLACE-ME-with-a-long-random-token", "openssl rand"),
        ("short", "16"),
    ]:
        bad = tmp_path / "bad-token"
        bad.write_text(text)
        with pytest.raises(ValueError, match=f"auth.token_file.*{message}"):
            config = {"auth": {"token_file": str(bad)}, "run": {"runs_dir": str(tmp_path)}}
            create_app(OrchestratorConfig.model_validate(config), clients_factory)
    # Without a token the API may listen on loopback only.
    with pytest.raises(ValueError, match=r"auth\.token_file: required"):
        config = {"api": {"host": "0.0.0.0"}, "run": {"runs_dir": str(tmp_path)}}
        create_app(OrchestratorConfig.model_validate(config), clients_factory)


async def test_a_restarted_orchestrator_resumes_its_run_from_the_embedded_store(clients_factory, dataset, tmp_path):
    """The orchestrator stops mid-run (its lifespan ends, as on SIGTERM or a crash between writes); a new one on
    the same SQLite store resumes the run, lists it, and ends it as the same run without a stop would have."""
    import torch

    run = {"iterations": 5, "run_id": "resumed", "prompts_per_iteration": 4, "sampling": {"max_new_tokens": 4}}
    config = OrchestratorConfig.model_validate({"run": {"dataset": str(dataset), "runs_dir": str(tmp_path / "runs")}})
    clients = clients_factory()  # the services outlive the orchestrator: one set of backends for both
    first = create_app(config, lambda: clients)
    transport = httpx.ASGITransport(app=first)
    async with first.router.lifespan_context(first), httpx.AsyncClient(transport=transport, base_url="http://a") as api:
        assert (await api.post("/runs", json=run)).status_code == 201
        while (await api.get("/runs/resumed")).json()["iteration"] < 2:
            await asyncio.sleep(0.02)
    store = open_store(config.store, config.run.runs_dir)
    assert store.get_run("resumed")["state"] == "running"  # left active for the next orchestrator
    store.close()

    second = create_app(config, lambda: clients)
    transport = httpx.ASGITransport(app=second)
    async with (
        second.router.lifespan_context(second),
        httpx.AsyncClient(transport=transport, base_url="http://a") as api,
    ):
        status = await _until_done(api, "resumed")
        listed = (await api.get("/runs")).json()
    assert status["state"] == "completed" and status["resumed"] == 1, status["error"]
    assert [r["policy_version"] for r in status["stats"]] == [1, 2, 3, 4, 5]
    assert [r["run_id"] for r in listed] == ["resumed"]

    reference = clients_factory()
    uninterrupted = RunConfig.model_validate({**config.run.model_dump(), **run, "runs_dir": str(tmp_path / "ref")})
    await RLHFLoop("resumed", uninterrupted, reference).run()
    ref_records = [json.loads(line) for line in (tmp_path / "ref" / "resumed" / "iterations.jsonl").open()]
    for key in ("reward_mean", "kl", "policy_loss", "value_loss", "entropy", "example"):
        assert [r[key] for r in status["stats"]] == [r[key] for r in ref_records], key
    for (name, a), (_, b) in zip(
        clients.trainer.backend.policy.named_parameters(),
        reference.trainer.backend.policy.named_parameters(),
        strict=True,
    ):
        assert torch.equal(a, b), name
