"""The asynchronous loop (RunConfig.asynchronous): sampling runs ahead of the trainer by up to max_staleness policy
versions. In-process clients on the tiny policy; the trainer and generation wrappers only observe the order of calls
(or inject a failure), the backends are the real ones."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
import torch

from services.orchestrator.config import RunConfig
from services.orchestrator.loop import RLHFLoop, iteration_seed
from shared.store import StoreConfig, open_store
from tests.helpers import tiny_inprocess_clients

TIMINGS = ("phase_seconds", "wall_seconds")


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "prompts.jsonl"
    prompts = ["the cat is", "the day was", "we", "she", "a bird", "they"]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


@pytest.fixture
def make_clients(tiny_policy_dir):
    def factory():
        return tiny_inprocess_clients(tiny_policy_dir)

    return factory


def run_config(dataset, runs_dir, iterations, **changes) -> RunConfig:
    return RunConfig(
        dataset=str(dataset),
        iterations=iterations,
        prompts_per_iteration=4,
        runs_dir=str(runs_dir),
        sampling={"max_new_tokens": 6, "samples_per_prompt": 2},
        **changes,
    )


def without_timings(record) -> dict:
    return {k: v for k, v in dataclasses.asdict(record).items() if k not in TIMINGS}


class Wrapped:
    """A client with some methods replaced; the others are the client's."""

    def __init__(self, client, **methods):
        self.client = client
        self.__dict__.update(methods)

    def __getattr__(self, name):
        return getattr(self.client, name)


def stored_records(runs_dir, run_id) -> list[dict]:
    return [json.loads(line) for line in (runs_dir / run_id / "iterations.jsonl").read_text().splitlines()]


async def test_zero_staleness_is_the_synchronous_loop(make_clients, dataset, tmp_path):
    """asynchronous with max_staleness 0 samples each batch after the previous weights are synced: the same
    records (timings aside) and the same trained weights as the synchronous loop."""
    results = {}
    for asynchronous in (False, True):
        config = run_config(dataset, tmp_path / str(asynchronous), 3, asynchronous=asynchronous, max_staleness=0)
        clients = make_clients()
        loop = RLHFLoop("same", config, clients)
        await loop.run()
        results[asynchronous] = loop.records, clients.trainer.backend.policy.state_dict()
    (sync_records, sync_weights), (async_records, async_weights) = results[False], results[True]
    assert [without_timings(r) for r in async_records] == [without_timings(r) for r in sync_records]
    assert [(r.generation_policy_version, r.staleness) for r in sync_records] == [(0, 0), (1, 0), (2, 0)]
    assert "sample_wait" in async_records[0].phase_seconds
    assert sync_weights.keys() == async_weights.keys()
    for name, tensor in sync_weights.items():
        assert torch.equal(tensor, async_weights[name]), name


async def test_one_step_off_policy_generates_the_next_batch_while_training(make_clients, dataset, tmp_path):
    """max_staleness 1: iteration k >= 2 is sampled by version k-2 and trained at version k-1; the batch of
    iteration i+1 is generated while iteration i trains (the trainer wrapper holds training until it started), and
    generation's weights are synced only after the batch under way is generated (the generation wrapper holds it
    until the training ended)."""
    iterations = 4
    config = run_config(dataset, tmp_path, iterations, asynchronous=True, max_staleness=1)
    clients = make_clients()
    events: list[tuple[str, int]] = []  # in the order the loop's tasks made the calls
    seeds = {iteration_seed(config.seed, i): i for i in range(1, iterations + 1)}
    generation_started = {i: asyncio.Event() for i in range(1, iterations + 1)}
    training_ended = {i: asyncio.Event() for i in range(1, iterations + 1)}

    async def generate(prompts, params, wait_s=None):
        iteration = seeds[params.seed]
        events.append(("generate_start", iteration))
        generation_started[iteration].set()
        rollouts = await clients.generation.generate(prompts, params, wait_s)
        if iteration > 1:  # generation slower than training: the weight sync must wait for this batch
            await asyncio.wait_for(training_ended[iteration - 1].wait(), 20)
        events.append(("generate_end", iteration))
        return rollouts

    async def train_step(step):
        iteration = sum(event == "train_start" for event, _ in events) + 1
        events.append(("train_start", iteration))
        result = await clients.trainer.train_step(step)
        if iteration < iterations:  # a loop that does not overlap them never gets past this
            await asyncio.wait_for(generation_started[iteration + 1].wait(), 20)
        events.append(("train_end", iteration))
        training_ended[iteration].set()
        return result

    async def sync_weights(version, epoch=0):
        events.append(("sync", version))
        return await clients.generation.sync_weights(version, epoch)

    observed = dataclasses.replace(
        clients,
        generation=Wrapped(clients.generation, generate=generate, sync_weights=sync_weights),
        trainer=Wrapped(clients.trainer, train_step=train_step),
    )
    loop = RLHFLoop("ahead", config, observed)
    summary = await loop.run()

    assert summary["iterations"] == iterations and summary["policy_version"] == iterations
    records = loop.records
    assert [r.generation_policy_version for r in records] == [0, 0, 1, 2]
    assert [r.staleness for r in records] == [0, 1, 1, 1]
    assert [r.policy_version for r in records] == [1, 2, 3, 4]
    assert stored_records(tmp_path, "ahead") == [dataclasses.asdict(r) for r in records]
    assert all({"generate", "score_and_reference", "train", "weight_sync"} <= r.phase_seconds.keys() for r in records)
    at = events.index
    for i in range(1, iterations):
        assert at(("generate_start", i + 1)) < at(("train_end", i)), events  # overlapped
        assert at(("generate_end", i + 1)) < at(("sync", i)), events  # weights change between batches only
        if i + 2 <= iterations:
            assert at(("sync", i)) < at(("generate_start", i + 2)), events  # at most one version behind
    assert clients.generation.backend.version == clients.trainer.backend.version == iterations


class TrainerFails(Exception):
    pass


@pytest.mark.parametrize("interruption", ["stop", "error_before_step", "error_after_step"])
async def test_an_interrupted_asynchronous_run_resumes_from_its_store(make_clients, dataset, tmp_path, interruption):
    """The loop ends early (a stop after iteration 2, or the trainer client failing at iteration 3 before or after
    the trainer applied the step); a new loop on the same store and services finishes the run: one record per
    iteration, in order, each sampled at most one version behind."""
    iterations = 5
    config = run_config(dataset, tmp_path, iterations, asynchronous=True, max_staleness=1)
    clients = make_clients()  # the services outlive the orchestrator
    real_train_step = clients.trainer.train_step
    calls = 0

    async def failing_train_step(step):
        nonlocal calls
        calls += 1
        if calls == 3 and interruption == "error_before_step":
            raise TrainerFails("before")
        result = await real_train_step(step)
        if calls == 3 and interruption == "error_after_step":
            raise TrainerFails("after: the reply was lost")
        return result

    first = RLHFLoop(
        "resumed", config, dataclasses.replace(clients, trainer=Wrapped(clients.trainer, train_step=failing_train_step))
    )
    if interruption == "stop":
        first.on_iteration = lambda record: record.iteration == 2 and first.request_stop()
        assert (await first.run())["iterations"] == 2
    else:
        with pytest.raises(TrainerFails):
            await first.run()
    assert asyncio.all_tasks() == {asyncio.current_task()}  # the batches sampled ahead were cancelled
    store = open_store(StoreConfig(), tmp_path)
    assert [r["iteration"] for r in store.iterations("resumed")] == [1, 2]
    assert max(store.steps("resumed")) == (2 if interruption == "stop" else 3)  # nothing sampled ahead is stored
    assert clients.trainer.backend.version == (3 if interruption == "error_after_step" else 2)

    second = RLHFLoop("resumed", config, clients)
    summary = await second.run()
    assert summary["iterations"] == iterations and not summary["stopped_early"]
    records = store.iterations("resumed")
    assert [r["iteration"] for r in records] == list(range(1, iterations + 1))
    assert [r["policy_version"] for r in records] == list(range(1, iterations + 1))
    assert all(0 <= r["staleness"] <= 1 for r in records), [r["staleness"] for r in records]
    assert [r["iteration"] for r in stored_records(tmp_path, "resumed")] == list(range(1, iterations + 1))
    assert clients.generation.backend.version == clients.trainer.backend.version == iterations
    store.close()
