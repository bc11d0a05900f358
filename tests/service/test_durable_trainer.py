"""A trainer that survives retries and restarts: exactly-once keyed TrainSteps, rotating checkpoints under its root,
resuming by itself from the newest good one, and generation replicas accepting a restarted trainer's weights.

The servicers run behind real gRPC servers on loopback ports; the models are the tiny policy and its critic.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from services.generation.backend import GenerationBackend
from services.generation.config import GenerationConfig
from services.generation.servicer import build_server as build_generation_server
from services.trainer.backend import TrainerBackend, new_epoch
from services.trainer.checkpoint import CheckpointRoot
from services.trainer.config import TrainerConfig
from services.trainer.servicer import build_server, load_backend, rollout_to_pb
from shared.proto.rlhf.v1 import generation_pb2, generation_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from shared.types import RolloutBatch
from shared.weights import chunk_weights, unique_state
from tests.helpers import sampled_rollout
from tests.service.grpc_helpers import expect_status, running

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def _config(policy_dir: Path, root: Path | None = None, every: int = 10, keep: int = 3) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "policy": {"path": str(policy_dir)},
            # Two epochs of two minibatches: four optimizer steps per TrainStep over a seeded shuffle, and running
            # score moments, so that a resumed trainer only matches an uninterrupted one if all its state came back.
            "ppo": {
                "learning_rate": 1e-3,
                "ppo_epochs": 2,
                "minibatch_size": 2,
                "micro_batch_size": 2,
                "score_normalization": "running",
            },
            "checkpoint": {"root": str(root or ""), "every": every, "keep": keep},
        }
    )


@pytest.fixture(scope="module")
def config(tiny_policy_dir):
    return _config(tiny_policy_dir)


@pytest.fixture
def backend(config):
    return TrainerBackend(config.policy, config.critic, config.ppo)


@pytest.fixture(scope="module")
def rollout(tiny_policy_dir) -> RolloutBatch:
    return sampled_rollout(AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval())


def _step(batch: RolloutBatch, run_id: str = "", iteration: int = 0, checkpoint: bool = False):
    request = rollout_to_pb(batch, run_id, iteration)
    request.checkpoint = checkpoint
    return request


def _iteration(batch: RolloutBatch, iteration: int) -> RolloutBatch:
    """The batch of an iteration: its scores shifted by it, so that the running score moments differ per step."""
    return dataclasses.replace(batch, scores=batch.scores + iteration)


async def _state(stub) -> trainer_pb2.TrainerState:
    return await stub.GetState(trainer_pb2.GetStateRequest(), timeout=5)


def _weights(backend: TrainerBackend) -> dict[str, torch.Tensor]:
    """Copies of everything a step trains: the policy as streamed, and the critic."""
    critic = {f"critic.{name}": t.detach().clone() for name, t in backend.critic.state_dict().items()}
    return {**dict(backend.policy_state()), **critic}


def _assert_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# --------------------------------------------------------------------------------------------------------------
# Exactly once, in order
# --------------------------------------------------------------------------------------------------------------


async def test_a_retried_step_is_answered_from_the_ledger_not_trained_again(config, backend, rollout):
    server, _ = await build_server(config, backend)
    async with running(server) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        first = await stub.TrainStep(_step(rollout, "r", 1), timeout=60)
        after_first = _weights(backend)
        retry = await stub.TrainStep(_step(rollout, "r", 1), timeout=60)
        state = await _state(stub)

    assert not first.replayed and first.stats.policy_version == 1
    assert retry.replayed and retry.stats == first.stats  # the stored statistics, step_seconds included
    assert (state.policy_version, state.step, state.run_id, state.iteration) == (1, 1, "r", 1)
    _assert_identical(_weights(backend), after_first)


async def test_two_concurrent_copies_of_a_step_train_once(config, backend, rollout):
    server, _ = await build_server(config, backend)
    async with running(server) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        replies = await asyncio.gather(*(stub.TrainStep(_step(rollout, "r", 1), timeout=60) for _ in range(2)))
        state = await _state(stub)

    assert sorted(reply.replayed for reply in replies) == [False, True]
    assert replies[0].stats == replies[1].stats and replies[0].stats.policy_version == 1
    assert (state.policy_version, state.step) == (1, 1)


async def test_steps_out_of_order_are_refused_with_the_trainer_position(config, backend, rollout):
    server, _ = await build_server(config, backend)
    async with running(server) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        initial = await _state(stub)
        await expect_status(stub.TrainStep(_step(rollout, "r", 2), timeout=30), PRECONDITION, "no keyed step yet")
        assert (await stub.TrainStep(_step(rollout, "r", 1), timeout=60)).stats.policy_version == 1
        gap = await expect_status(stub.TrainStep(_step(rollout, "r", 3), timeout=30), PRECONDITION, "iteration 3")
        second = await stub.TrainStep(_step(rollout, "r", 2), timeout=60)
        new_run = await stub.TrainStep(_step(rollout, "s", 1), timeout=60)  # a new run continues from this state
        in_new_run = await _state(stub)
        skipped = await expect_status(stub.TrainStep(_step(rollout, "s", 5), timeout=30), PRECONDITION)
        old_run = await expect_status(stub.TrainStep(_step(rollout, "r", 3), timeout=30), PRECONDITION)
        unkeyed = [(await stub.TrainStep(_step(rollout), timeout=60)) for _ in range(2)]
        final = await _state(stub)

    assert (initial.run_id, initial.iteration, initial.epoch) == ("", 0, backend.epoch)
    assert "iteration 1 of run 'r'" in gap
    assert not second.replayed and second.stats.policy_version == 2
    assert not new_run.replayed and new_run.stats.policy_version == 3
    assert (in_new_run.run_id, in_new_run.iteration, in_new_run.policy_version) == ("s", 1, 3)
    assert "iteration 1 of run 's'" in skipped and "iteration 1 of run 's'" in old_run
    # Unkeyed steps always apply and leave the ledger's position alone.
    assert [(r.replayed, r.stats.policy_version) for r in unkeyed] == [(False, 4), (False, 5)]
    assert (final.run_id, final.iteration, final.policy_version, final.step) == ("s", 1, 5, 5)
    assert final.epoch == backend.epoch == initial.epoch


# --------------------------------------------------------------------------------------------------------------
# Checkpoints under the root
# --------------------------------------------------------------------------------------------------------------


async def test_the_root_keeps_the_newest_checkpoints_every_n_steps_and_on_request(tiny_policy_dir, rollout, tmp_path):
    root = tmp_path / "checkpoints"
    config = _config(tiny_policy_dir, root, every=2, keep=2)
    layout = CheckpointRoot(root, keep=2)
    backend = load_backend(config)  # an empty root: a fresh trainer
    assert backend.step == 0
    server, _ = await build_server(config, backend)
    async with running(server) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        written = [(await stub.TrainStep(_step(rollout, "r", i), timeout=60)).checkpoint for i in range(1, 6)]
        after_five = _names(root)
        state_after_five = await _state(stub)
        # Step 6 is due by `every`; step 7 is not, but asks for one.
        written.append((await stub.TrainStep(_step(rollout, "r", 6), timeout=60)).checkpoint)
        written.append((await stub.TrainStep(_step(rollout, "r", 7, checkpoint=True), timeout=60)).checkpoint)
        after_seven = _names(root)
        retried = await stub.TrainStep(_step(rollout, "r", 7, checkpoint=True), timeout=60)
        saved = await stub.SaveCheckpoint(trainer_pb2.CheckpointRequest(), timeout=60)  # empty: under the root
        final = await _state(stub)

    step = lambda n: str(layout.path_for(n))  # noqa: E731
    assert written == ["", step(2), "", step(4), "", step(6), step(7)]
    assert after_five == ["step-000000002", "step-000000004"]
    assert (state_after_five.checkpoint, state_after_five.checkpoint_run_id) == (step(4), "r")
    assert state_after_five.checkpoint_iteration == 4
    assert after_seven == ["step-000000006", "step-000000007"]
    # A retry of a step that is already in the newest checkpoint writes nothing more.
    assert retried.replayed and retried.checkpoint == ""
    assert (saved.directory, saved.step, saved.policy_version) == (step(7), 7, 7)
    assert (final.checkpoint, final.checkpoint_run_id, final.checkpoint_iteration) == (step(7), "r", 7)
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    assert layout.checkpoints() == [layout.path_for(7), layout.path_for(6)]


async def test_a_restarted_trainer_resumes_from_its_newest_checkpoint_exactly(tiny_policy_dir, rollout, tmp_path):
    root = tmp_path / "checkpoints"
    config = _config(tiny_policy_dir, root, every=2, keep=2)
    uninterrupted = load_backend(config)
    server, _ = await build_server(config, uninterrupted)
    async with running(server) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        for i in (1, 2):
            last = await stub.TrainStep(_step(_iteration(rollout, i), "r", i), timeout=60)
        saved_weights = _weights(uninterrupted)
        saved_kl_coef = uninterrupted.kl_coef
        next_step = (await stub.TrainStep(_step(_iteration(rollout, 3), "r", 3), timeout=60)).stats
        next_weights = _weights(uninterrupted)
    assert last.checkpoint == str(CheckpointRoot(root, 2).path_for(2))

    restarted = load_backend(config)
    assert (restarted.step, restarted.version, restarted.ledger.position()) == (2, 2, ("r", 2))
    assert restarted.epoch > uninterrupted.epoch
    assert restarted.kl_coef == saved_kl_coef
    _assert_identical(_weights(restarted), saved_weights)

    server, _ = await build_server(config, restarted)
    async with running(server) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        state = await _state(stub)
        # The reply of step 2 was lost with the old trainer: its retry gets the stored statistics, in the new epoch.
        retry = await stub.TrainStep(_step(_iteration(rollout, 2), "r", 2), timeout=60)
        resumed = await stub.TrainStep(_step(_iteration(rollout, 3), "r", 3), timeout=60)

    assert (state.run_id, state.iteration, state.epoch) == ("r", 2, restarted.epoch)
    assert state.checkpoint == last.checkpoint and (state.checkpoint_run_id, state.checkpoint_iteration) == ("r", 2)
    assert retry.replayed and retry.stats.policy_version == 2 and retry.stats.policy_epoch == restarted.epoch
    assert not resumed.replayed and resumed.stats.policy_version == 3
    # Optimizer moments, the shuffle, the KL controller and the score moments all came back: bit for bit.
    _assert_identical(_weights(restarted), next_weights)
    assert resumed.stats.policy_loss == next_step.policy_loss and resumed.stats.kl_coef == next_step.kl_coef


@pytest.fixture(scope="module")
def two_checkpoints(tiny_policy_dir, rollout, tmp_path_factory):
    """A root holding step-1 and step-2 of keyed run "r", with the trainer's weights at each."""
    root = tmp_path_factory.mktemp("two-checkpoints")
    config = _config(tiny_policy_dir, root)
    backend = TrainerBackend(config.policy, config.critic, config.ppo)
    layout = CheckpointRoot(root, keep=3)
    weights = {}
    for i in (1, 2):
        backend.keyed_step(rollout, "r", i)
        backend.save_checkpoint(layout.path_for(i))
        weights[i] = _weights(backend)
    return root, weights


def _copy_root(two_checkpoints, tmp_path) -> tuple[Path, CheckpointRoot]:
    root = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints[0], root)
    return root, CheckpointRoot(root, keep=3)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _same_size_garbage(path: Path) -> None:
    """Garbage the size manifest cannot see: only reading the file finds it."""
    path.write_bytes(b"x" * path.stat().st_size)


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("critic.safetensors", _truncate),
        ("optimizer.safetensors", _truncate),
        ("policy/model.safetensors", _truncate),
        ("trainer_state.json", _same_size_garbage),
        ("optimizer.safetensors", _same_size_garbage),
        ("manifest.json", Path.unlink),
    ],
)
def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(
    tiny_policy_dir, two_checkpoints, tmp_path, caplog, name, damage
):
    root, layout = _copy_root(two_checkpoints, tmp_path)
    damage(layout.path_for(2) / name)
    with caplog.at_level(logging.ERROR, logger="services.trainer.checkpoint"):
        backend = load_backend(_config(tiny_policy_dir, root))

    assert (backend.step, backend.version, backend.ledger.position()) == (1, 1, ("r", 1))
    _assert_identical(_weights(backend), two_checkpoints[1][1])
    assert any(str(layout.path_for(2)) in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


def test_a_staging_directory_left_by_a_killed_trainer_is_removed_not_loaded(tiny_policy_dir, two_checkpoints, tmp_path):
    root, layout = _copy_root(two_checkpoints, tmp_path)
    # A write of step 9 killed half-way: files copied, the optimizer cut short, no manifest yet.
    staging = root / ".step-000000009.xyz.tmp"
    shutil.copytree(layout.path_for(2), staging)
    (staging / "manifest.json").unlink()
    state = json.loads((staging / "trainer_state.json").read_text())
    (staging / "trainer_state.json").write_text(json.dumps({**state, "step": 9, "version": 9}))
    _truncate(staging / "optimizer.safetensors")

    backend = load_backend(_config(tiny_policy_dir, root))

    assert (backend.step, backend.version) == (2, 2)
    _assert_identical(_weights(backend), two_checkpoints[1][2])
    assert _names(root) == ["step-000000001", "step-000000002"]


def test_with_no_good_checkpoint_the_trainer_starts_fresh(tiny_policy_dir, two_checkpoints, tmp_path, caplog):
    root, layout = _copy_root(two_checkpoints, tmp_path)
    for i in (1, 2):
        _truncate(layout.path_for(i) / "critic.safetensors")
    with caplog.at_level(logging.ERROR, logger="services.trainer.checkpoint"):
        backend = load_backend(_config(tiny_policy_dir, root))
    assert (backend.step, backend.version, backend.ledger.position()) == (0, 0, ("", 0))
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2


# --------------------------------------------------------------------------------------------------------------
# Generation follows a restarted trainer
# --------------------------------------------------------------------------------------------------------------


async def test_generation_takes_a_restarted_trainers_weights_and_no_older_ones(tiny_policy_dir):
    generation_config = GenerationConfig.model_validate({"model": {"path": str(tiny_policy_dir)}})
    generation = GenerationBackend(generation_config)
    initial = {name: t.detach().clone() for name, t in unique_state(generation.model).items()}
    weights = {v: {name: t + 0.01 * v for name, t in initial.items()} for v in (3, 4, 5, 100)}
    first_epoch = new_epoch()
    restarted_epoch = new_epoch(first_epoch)  # what the trainer takes when it starts again

    async def update(stub, version: int, epoch: int):
        chunks = list(chunk_weights(list(weights[version].items()), version, 64 * 1024, epoch=epoch))
        return await stub.UpdateWeights(iter(chunks), timeout=30)

    def served() -> dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in unique_state(generation.model).items()}

    server, _ = await build_generation_server(generation_config, generation)
    async with running(server) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        info = generation_pb2.InfoRequest()
        before = await update(stub, 5, first_epoch)
        # The trainer restarted from an older checkpoint: a lower version, but a newer epoch.
        after = await update(stub, 3, restarted_epoch)
        served_after_restart = served()
        await expect_status(update(stub, 4, first_epoch), PRECONDITION, str(first_epoch), "older than the served")
        await expect_status(update(stub, 100, first_epoch - 1), PRECONDITION, "older than the served")
        final = await stub.Info(info, timeout=5)

    assert (before.epoch, before.version) == (first_epoch, 5)
    assert (after.epoch, after.version) == (restarted_epoch, 3)
    _assert_identical(served_after_restart, weights[3])
    _assert_identical(served(), weights[3])  # the refused updates changed nothing
    assert (final.policy_epoch, final.policy_version) == (restarted_epoch, 3)


# --------------------------------------------------------------------------------------------------------------
# SaveCheckpoint without a directory
# --------------------------------------------------------------------------------------------------------------


async def test_save_checkpoint_without_a_directory_needs_a_root(config, backend):
    assert not config.checkpoint.root
    server, _ = await build_server(config, backend)
    async with running(server) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        empty = trainer_pb2.CheckpointRequest()
        await expect_status(stub.SaveCheckpoint(empty, timeout=10), INVALID, "name", "checkpoint.root")


# --------------------------------------------------------------------------------------------------------------
# Unkeyed steps, damaged checkpoints beyond a gap, and what GetState reports after one was skipped
# --------------------------------------------------------------------------------------------------------------


async def test_unkeyed_steps_are_checkpointed_under_the_root(tiny_policy_dir, rollout, tmp_path):
    root = tmp_path / "checkpoints"
    config = _config(tiny_policy_dir, root, every=2, keep=2)
    server, _ = await build_server(config, load_backend(config))
    async with running(server) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        written = [(await stub.TrainStep(_step(rollout), timeout=60)).checkpoint for _ in range(2)]
        written.append((await stub.TrainStep(_step(rollout, checkpoint=True), timeout=60)).checkpoint)
    layout = CheckpointRoot(root, keep=2)
    assert written == ["", str(layout.path_for(2)), str(layout.path_for(3))]


@pytest.fixture
def damaged_beyond_a_gap(tiny_policy_dir, rollout, tmp_path) -> Path:
    """A root with a good step-1 and a damaged step-3 (a trainer restarted from it cannot overwrite step-3 next)."""
    root = tmp_path / "checkpoints"
    config = _config(tiny_policy_dir, root)
    backend = TrainerBackend(config.policy, config.critic, config.ppo)
    layout = CheckpointRoot(root, keep=3)
    for i in (1, 2, 3):
        backend.keyed_step(rollout, "r", i)
        if i != 2:
            backend.save_checkpoint(layout.path_for(i))
    _truncate(layout.path_for(3) / "critic.safetensors")
    return root


async def test_a_damaged_newer_checkpoint_does_not_crowd_out_a_good_one(tiny_policy_dir, rollout, damaged_beyond_a_gap):
    config = _config(tiny_policy_dir, damaged_beyond_a_gap, every=0, keep=1)
    backend = load_backend(config)
    assert backend.step == 1
    server, _ = await build_server(config, backend)
    async with running(server) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        written = (await stub.TrainStep(_step(rollout, "r", 2, checkpoint=True), timeout=60)).checkpoint
    assert Path(written).is_dir()
    assert load_backend(config).step == 2


async def test_get_state_names_the_checkpoint_that_was_loaded(tiny_policy_dir, two_checkpoints, tmp_path):
    root, layout = _copy_root(two_checkpoints, tmp_path)
    _truncate(layout.path_for(2) / "critic.safetensors")
    config = _config(tiny_policy_dir, root)
    server, _ = await build_server(config, load_backend(config))
    async with running(server) as channel:
        state = await _state(trainer_pb2_grpc.TrainerStub(channel))
    assert (state.checkpoint, state.checkpoint_iteration) == (str(layout.path_for(1)), 1)
