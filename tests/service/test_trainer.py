"""Trainer service through a real gRPC server on a loopback port, with the tiny policy; and a generation server
pulling its weights from it.

Rollouts are sampled here from the tiny policy as loaded (no generation service needed for training); their
generation and reference log-probs come from a plain unpadded forward of that same model, scores are made up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from transformers import AutoModelForCausalLM

from services.generation.backend import GenerationBackend
from services.generation.config import GenerationConfig
from services.generation.servicer import build_server as build_generation_server
from services.trainer.backend import TrainerBackend
from services.trainer.config import TrainerConfig
from services.trainer.servicer import SERVICE_NAME, build_server
from shared import codec
from shared.proto.rlhf.v1 import generation_pb2, generation_pb2_grpc, tensor_pb2, trainer_pb2, trainer_pb2_grpc
from shared.types import RolloutBatch
from shared.weights import assemble
from tests.helpers import forward_logprobs, sample_tokens
from tests.service.grpc_helpers import expect_status, health_status, running

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
TOO_LARGE = grpc.StatusCode.RESOURCE_EXHAUSTED
FIRST_ORDINARY_ID = 4  # ids 0..3 are <pad>, <s>, </s>, <unk>
MAX_MESSAGE_BYTES = 128 * 1024  # small enough that the default weight chunk splits the embeddings
CHUNK_BYTES = 16 * 1024


@pytest.fixture(scope="module")
def config(tiny_policy_dir):
    return TrainerConfig.model_validate(
        {
            "server": {"max_message_bytes": MAX_MESSAGE_BYTES},
            "policy": {"path": str(tiny_policy_dir)},
            # A large learning rate so that one step visibly moves the log-probs.
            "ppo": {"learning_rate": 1e-3, "ppo_epochs": 1, "minibatch_size": 4, "micro_batch_size": 4},
            "max_batch": 8,
        }
    )


@pytest.fixture
def backend(config):
    return TrainerBackend(config.policy, config.critic, config.ppo)


@pytest.fixture(scope="module")
def initial_policy(tiny_policy_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()


@pytest.fixture(scope="module")
def rollout(initial_policy) -> RolloutBatch:
    """Six samples from the initial policy: prompts of 1..5 tokens, responses of 2..6 tokens (padding matters)."""
    generator = torch.Generator().manual_seed(0)
    vocab = initial_policy.config.vocab_size
    prompts = [torch.randint(FIRST_ORDINARY_ID, vocab, (n,), generator=generator) for n in (1, 3, 5, 2, 4, 3)]
    responses = [
        sample_tokens(initial_policy, p, n, generator) for p, n in zip(prompts, (2, 6, 3, 5, 4, 6), strict=True)
    ]
    logprobs = [forward_logprobs(initial_policy, p, r) for p, r in zip(prompts, responses, strict=True)]
    return RolloutBatch(
        prompt_ids=prompts,
        response_ids=responses,
        scores=torch.randn(len(prompts), generator=generator),
        reference_logprobs=logprobs,
        generation_logprobs=[lp.clone() for lp in logprobs],
    )


def _request(batch: RolloutBatch) -> trainer_pb2.TrainStepRequest:
    return trainer_pb2.TrainStepRequest(
        prompt_ids=codec.ragged_to_pb(batch.prompt_ids, torch.int64),
        response_ids=codec.ragged_to_pb(batch.response_ids, torch.int64),
        scores=codec.tensor_to_pb(batch.scores),
        reference_logprobs=codec.ragged_to_pb(batch.reference_logprobs, torch.float32),
        generation_logprobs=codec.ragged_to_pb(batch.generation_logprobs, torch.float32),
        policy_version=batch.policy_version,
    )


def _rows(batch: RolloutBatch, rows: list[int]) -> RolloutBatch:
    """The samples ``rows`` of ``batch`` (repeats allowed)."""
    return dataclasses.replace(
        batch,
        prompt_ids=[batch.prompt_ids[i] for i in rows],
        response_ids=[batch.response_ids[i] for i in rows],
        scores=batch.scores[rows],
        reference_logprobs=[batch.reference_logprobs[i] for i in rows],
        generation_logprobs=[batch.generation_logprobs[i] for i in rows],
    )


async def _state(stub) -> trainer_pb2.TrainerState:
    return await stub.GetState(trainer_pb2.GetStateRequest(), timeout=5)


async def _stream(stub, chunk_bytes: int) -> list:
    call = stub.StreamWeights(trainer_pb2.StreamWeightsRequest(chunk_bytes=chunk_bytes), timeout=30)
    return [chunk async for chunk in call]


def _model_with(tiny_policy_dir, state: dict[str, torch.Tensor]):
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


# --------------------------------------------------------------------------------------------------------------
# TrainStep and GetState
# --------------------------------------------------------------------------------------------------------------


async def test_train_steps_advance_the_version_and_report_finite_stats(config, backend, rollout):
    server, _ = await build_server(config, backend)
    async with running(server) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        initial = await _state(stub)
        first = (await stub.TrainStep(_request(rollout), timeout=60)).stats
        after_first = await _state(stub)
        second = (await stub.TrainStep(_request(rollout), timeout=60)).stats
        after_second = await _state(stub)

    assert (initial.policy_version, initial.step) == (0, 0)
    assert initial.kl_coef == pytest.approx(config.ppo.kl.init_coef)
    assert first.policy_version == 1 == after_first.policy_version == after_first.step
    assert second.policy_version == 2 == after_second.policy_version == after_second.step
    assert after_second.kl_coef == backend.kl_coef
    # Each step reports the beta it used: the one GetState showed before it.
    assert first.kl_coef == pytest.approx(initial.kl_coef) and second.kl_coef == pytest.approx(after_first.kl_coef)
    for stats in (first, second):
        for field in trainer_pb2.TrainStats.DESCRIPTOR.fields:
            value = getattr(stats, field.name)
            assert math.isfinite(value), f"{field.name} = {value}"
        assert stats.tokens == sum(r.numel() for r in rollout.response_ids)
        assert stats.score_mean == pytest.approx(float(rollout.scores.mean()), abs=1e-6)
        assert stats.learning_rate == pytest.approx(1e-3) and stats.grad_norm > 0
    # The first step's old log-probs are the initial policy's, as the rollout's generation log-probs are.
    assert first.generation_logprob_diff < 1e-5 < second.generation_logprob_diff


# --------------------------------------------------------------------------------------------------------------
# StreamWeights
# --------------------------------------------------------------------------------------------------------------


async def test_streamed_weights_assemble_to_the_trainer_policy(config, backend, rollout, tiny_policy_dir):
    server, _ = await build_server(config, backend)
    async with running(server) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        await stub.TrainStep(_request(rollout), timeout=60)
        small = await _stream(stub, CHUNK_BYTES)
        default = await _stream(stub, 0)
        clamped = await _stream(stub, 1 << 40)  # more than the message limit allows: the server's limit wins
        await expect_status(_stream(stub, -1), INVALID, "chunk_bytes")

    expected = dict(backend.policy_state())
    fresh = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).state_dict()
    for chunks in (small, default, clamped):
        version, state, total_bytes = assemble(chunks, fresh, current=0)
        assert version == 1 and all(c.version == 1 and c.total_tensors == len(expected) for c in chunks)
        _assert_same_state(state, expected)
        assert total_bytes == sum(t.numel() * t.element_size() for t in expected.values())
        assert all(c.ByteSize() < MAX_MESSAGE_BYTES for c in chunks)
    assert [c.data for c in default] == [c.data for c in clamped]
    # The embeddings (vocab x hidden float32) are bigger than one chunk, so they span several, in offset order.
    name = "model.embed_tokens.weight"
    size = expected[name].numel() * expected[name].element_size()
    pieces = [c for c in small if c.name == name]
    assert size > 2 * CHUNK_BYTES and len(pieces) == math.ceil(size / CHUNK_BYTES)
    assert [c.offset for c in pieces] == list(range(0, size, CHUNK_BYTES))
    assert all(len(c.data) <= CHUNK_BYTES for c in small)
    assert len([c for c in default if c.name == name]) > 1


async def test_a_stream_never_mixes_versions_with_a_concurrent_train_step(config, backend, rollout, initial_policy):
    server, _ = await build_server(config, backend)
    async with running(server) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        _, chunks = await asyncio.gather(stub.TrainStep(_request(rollout), timeout=60), _stream(stub, 4096))
    version, state, _ = assemble(chunks, initial_policy.state_dict(), current=0)
    # Whichever ran first, the weights are those of the version the chunks carry.
    expected = initial_policy.state_dict() if version == 0 else dict(backend.policy_state())
    assert version in (0, 1)
    _assert_same_state(state, dict(expected))


# --------------------------------------------------------------------------------------------------------------
# Generation pulls from the trainer
# --------------------------------------------------------------------------------------------------------------


def _greedy(prompts: list[torch.Tensor]) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        prompt_ids=codec.ragged_to_pb(prompts, torch.int64),
        sampling=generation_pb2.SamplingParams(max_new_tokens=8, temperature=0.0),
    )


async def _served(stub, prompts):
    """(policy version, [(prompt, response, response log-probs)]) of a greedy batch."""
    reply = await stub.Generate(_greedy(prompts), timeout=60)
    rows = zip(
        codec.ragged_from_pb(reply.prompt_ids, "prompt_ids"),
        codec.ragged_from_pb(reply.response_ids, "response_ids"),
        codec.ragged_from_pb(reply.response_logprobs, "response_logprobs"),
        strict=True,
    )
    return reply.policy_version, list(rows)


def _assert_logprobs_of(model, rows) -> None:
    for prompt, response, logprobs in rows:
        torch.testing.assert_close(logprobs, forward_logprobs(model, prompt, response), atol=1e-4, rtol=0)


async def test_generation_pulls_the_trained_policy(config, backend, rollout, tiny_policy_dir, initial_policy):
    trainer_server, trainer_port = await build_server(config, backend)
    address = f"127.0.0.1:{trainer_port}"
    generation_config = GenerationConfig.model_validate(
        {"model": {"path": str(tiny_policy_dir)}, "trainer_addresses": [address]}
    )
    generation_server, _ = await build_generation_server(generation_config, GenerationBackend(generation_config))
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([11]), torch.tensor([40, 41, 42, 43])]
    async with running(trainer_server) as trainer_channel, running(generation_server) as generation_channel:
        trainer = trainer_pb2_grpc.TrainerStub(trainer_channel)
        generation = generation_pb2_grpc.GenerationStub(generation_channel)
        info = generation_pb2.InfoRequest()
        await trainer.TrainStep(_request(rollout), timeout=60)

        # Generation dials only the trainers its config names: not an address a caller picks.
        elsewhere = generation_pb2.PullWeightsRequest(trainer_address="127.0.0.1:1", min_version=1)
        await expect_status(generation.PullWeights(elsewhere, timeout=30), INVALID, "trainer_address", "configured")

        # The trainer holds version 1: asking for 2, or for another epoch (as if it had restarted since), fails and
        # leaves the served (initial) weights in place.
        too_new = generation_pb2.PullWeightsRequest(trainer_address=address, min_version=2)
        await expect_status(generation.PullWeights(too_new, timeout=30), PRECONDITION, "min_version")
        other_epoch = generation_pb2.PullWeightsRequest(trainer_address=address, min_version=1, epoch=backend.epoch - 1)
        await expect_status(generation.PullWeights(other_epoch, timeout=30), PRECONDITION, "epoch")
        assert (await generation.Info(info, timeout=5)).policy_version == 0
        version, before = await _served(generation, prompts)
        assert version == 0
        _assert_logprobs_of(initial_policy, before)

        pull = generation_pb2.PullWeightsRequest(trainer_address=address, min_version=1, epoch=backend.epoch)
        result = await generation.PullWeights(pull, timeout=30)
        assert result.epoch == backend.epoch and (await generation.Info(info, timeout=5)).policy_epoch == backend.epoch
        trained = dict(backend.policy_state())  # version 1, before the trainer moves on
        assert (await generation.Info(info, timeout=5)).policy_version == 1
        version, after = await _served(generation, prompts)

        await expect_status(generation.PullWeights(too_new, timeout=30), PRECONDITION, "min_version")
        assert (await generation.Info(info, timeout=5)).policy_version == 1
        _, again = await _served(generation, prompts)
        # The refused pull hung up on the trainer mid-stream; that stream is closed, so training goes on.
        assert (await trainer.TrainStep(_request(rollout), timeout=30)).stats.policy_version == 2

    assert result.version == 1 == version and result.tensors == len(trained)
    assert result.bytes == sum(t.numel() * t.element_size() for t in trained.values())
    _assert_logprobs_of(_model_with(tiny_policy_dir, trained), after)
    # The pull changed what is served (so the check above is not passing on the initial weights)...
    assert max(float((lp - forward_logprobs(initial_policy, p, r)).abs().max()) for p, r, lp in after) > 1e-3
    # ...and the refused pull afterwards did not.
    for (_, response, logprobs), (_, response_again, logprobs_again) in zip(after, again, strict=True):
        assert torch.equal(response, response_again) and torch.equal(logprobs, logprobs_again)


# --------------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------------


async def test_bad_train_steps_are_rejected_and_the_service_still_trains(config, backend, rollout):
    vocab = backend.policy.config.vocab_size
    one = _rows(rollout, [0])
    response = one.response_ids[0]
    empty = RolloutBatch([], [], torch.zeros(0), [], [])
    two_prompts = dataclasses.replace(one, prompt_ids=rollout.prompt_ids[:2])
    short_reference = dataclasses.replace(one, reference_logprobs=[one.reference_logprobs[0][:-1]])
    long_generation = dataclasses.replace(one, generation_logprobs=[torch.zeros(response.numel() + 1)])
    two_scores = dataclasses.replace(one, scores=torch.zeros(2))
    matrix_scores = dataclasses.replace(one, scores=torch.zeros(1, 1))
    nan_score = dataclasses.replace(one, scores=torch.tensor([math.nan]))
    outside = dataclasses.replace(one, response_ids=[torch.cat([response[:-1], torch.tensor([vocab])])])
    negative = dataclasses.replace(one, prompt_ids=[torch.tensor([-1])])
    too_many = _rows(rollout, [*range(len(rollout)), 0, 1, 2])  # 9 > max_batch
    cases = [
        (_request(empty), INVALID, ("prompt_ids", "empty")),
        (_request(two_prompts), INVALID, ("prompt_ids", "2", "response_ids")),
        (_request(short_reference), INVALID, ("reference_logprobs[0]",)),
        (_request(long_generation), INVALID, ("generation_logprobs[0]",)),
        (_request(two_scores), INVALID, ("scores", "[2]")),
        (_request(matrix_scores), INVALID, ("scores", "[1, 1]")),
        (_request(nan_score), INVALID, ("scores", "non-finite")),
        (_request(outside), INVALID, ("response_ids[0]", "vocabulary", str(vocab))),
        (_request(negative), INVALID, ("prompt_ids[0]", "vocabulary")),
        (_request(too_many), TOO_LARGE, ("prompt_ids", "9", "8")),
    ]
    bad_dtype = _request(one)
    bad_dtype.prompt_ids.values.dtype = 99
    no_scores_dtype = _request(one)
    no_scores_dtype.scores.dtype = tensor_pb2.DTYPE_UNSPECIFIED
    float_ids = _request(one)
    float_ids.response_ids.values.CopyFrom(codec.tensor_to_pb(response.float()))
    bad_offsets = _request(one)
    bad_offsets.reference_logprobs.offsets.CopyFrom(codec.tensor_to_pb(torch.tensor([0, 99])))
    cases += [
        (bad_dtype, INVALID, ("prompt_ids.values.dtype",)),
        (no_scores_dtype, INVALID, ("scores.dtype",)),
        (float_ids, INVALID, ("response_ids", "int64")),
        (bad_offsets, INVALID, ("reference_logprobs.offsets",)),
    ]

    server, _ = await build_server(config, backend)
    async with running(server) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        for request, code, fragments in cases:
            await expect_status(stub.TrainStep(request, timeout=30), code, *fragments)
        await expect_status(stub.SaveCheckpoint(trainer_pb2.CheckpointRequest(), timeout=10), INVALID, "name", "root")
        assert await health_status(channel, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
        assert (await _state(stub)).policy_version == 0  # no rejected request trained
        stats = (await stub.TrainStep(_request(rollout), timeout=60)).stats
    assert stats.policy_version == 1 and math.isfinite(stats.policy_loss)


async def test_oversized_message_is_resource_exhausted(config, backend, rollout):
    small = config.model_copy(update={"server": config.server.model_copy(update={"max_message_bytes": 4096})})
    long = torch.full((1000,), FIRST_ORDINARY_ID, dtype=torch.int64)
    big = RolloutBatch([long], [long], torch.zeros(1), [torch.zeros(1000)], [torch.zeros(1000)])
    assert _request(big).ByteSize() > 4096
    server, _ = await build_server(small, backend)
    async with running(server) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        await expect_status(stub.TrainStep(_request(big), timeout=30), TOO_LARGE)
        assert await health_status(channel, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
        stats = (await stub.TrainStep(_request(rollout), timeout=60)).stats
        # Even under a small message limit the weights still stream, each chunk within it.
        chunks = await _stream(stub, 0)
    assert stats.policy_version == 1
    assert all(c.ByteSize() < 4096 for c in chunks)
    _assert_same_state(assemble(chunks, backend.policy.state_dict(), current=0)[1], dict(backend.policy_state()))


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------


async def test_checkpoint_round_trip_through_the_rpcs(config, backend, rollout, tmp_path):
    root = tmp_path / "checkpoints"
    directory = (root / "runs" / "a").resolve()
    # every: a large interval, so that the only checkpoints are the ones asked for here
    config = config.model_copy(
        update={"checkpoint": config.checkpoint.model_copy(update={"root": str(root), "every": 1000})}
    )
    server, _ = await build_server(config, backend)
    async with running(server) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        await stub.TrainStep(_request(rollout), timeout=60)
        saved_state = await _state(stub)
        saved = await stub.SaveCheckpoint(trainer_pb2.CheckpointRequest(name="runs/a"), timeout=60)
        saved_weights = dict(backend.policy_state())
        resumed_step = (await stub.TrainStep(_request(rollout), timeout=60)).stats
        continued_weights = dict(backend.policy_state())

        loaded = await stub.LoadCheckpoint(trainer_pb2.CheckpointRequest(name="runs/a"), timeout=60)
        loaded_state = await _state(stub)
        loaded_weights = dict(backend.policy_state())
        streamed = await _stream(stub, 0)
        replayed_step = (await stub.TrainStep(_request(rollout), timeout=60)).stats
        replayed_weights = dict(backend.policy_state())

        missing = trainer_pb2.CheckpointRequest(name="missing")
        await expect_status(stub.LoadCheckpoint(missing, timeout=10), INVALID, "name", "missing")
        (root / "not-a-checkpoint").mkdir()
        not_one = trainer_pb2.CheckpointRequest(name="not-a-checkpoint")
        await expect_status(stub.LoadCheckpoint(not_one, timeout=10), INVALID, "name", "not-a-checkpoint")
        await expect_status(stub.LoadCheckpoint(trainer_pb2.CheckpointRequest(), timeout=10), INVALID, "name")
        # Names stay under the root: no absolute paths, no '..', no link out of it, no step-<n> of the rotation.
        outside = tmp_path / "outside"
        (root / "link").symlink_to(tmp_path)
        for name, fragment in [
            (str(outside), "not under"),
            ("../outside", ".."),
            ("runs/../../outside", ".."),
            ("link/outside", "not under"),
            ("step-000000001", "rotation"),
        ]:
            request = trainer_pb2.CheckpointRequest(name=name)
            await expect_status(stub.SaveCheckpoint(request, timeout=10), INVALID, "name", fragment)
        await expect_status(stub.LoadCheckpoint(trainer_pb2.CheckpointRequest(name="../a"), timeout=10), INVALID, "..")
        assert not outside.exists()
        assert (await _state(stub)).policy_version == 2  # failed loads changed nothing

    assert (saved.policy_version, saved.step, saved.directory) == (1, 1, str(directory))
    # The policy directory is a plain Hugging Face model holding the trainer's weights.
    exported = AutoModelForCausalLM.from_pretrained(directory / "policy").state_dict()
    _assert_same_state({name: exported[name] for name in saved_weights}, saved_weights)
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert files and not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle"}]

    assert not torch.equal(continued_weights["lm_head.weight"], saved_weights["lm_head.weight"])
    assert (loaded.policy_version, loaded.step) == (1, 1) == (loaded_state.policy_version, loaded_state.step)
    assert loaded_state.kl_coef == saved_state.kl_coef
    _assert_same_state(loaded_weights, saved_weights)
    assert all(c.version == 1 for c in streamed)
    # Training resumes as if the checkpoint had never been written: the same step gives the same weights.
    assert replayed_step.policy_version == 2 == resumed_step.policy_version
    assert replayed_step.policy_loss == pytest.approx(resumed_step.policy_loss, abs=1e-6)
    for name, tensor in continued_weights.items():
        torch.testing.assert_close(replayed_weights[name], tensor, atol=1e-6, rtol=0, msg=name)


# --------------------------------------------------------------------------------------------------------------
# Health and reflection
# --------------------------------------------------------------------------------------------------------------


async def test_without_a_backend_the_service_is_not_serving(config, backend, rollout):
    server, _ = await build_server(config, None)
    async with running(server, serving=False) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        assert await health_status(channel, SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
        unavailable = grpc.StatusCode.UNAVAILABLE
        await expect_status(stub.TrainStep(_request(rollout), timeout=10), unavailable, "loading")
        await expect_status(_state(stub), unavailable, "loading")
        await expect_status(_stream(stub, 0), unavailable, "loading")
        server.attach(backend)
        await server.set_serving(True)
        assert await health_status(channel, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
        stats = (await stub.TrainStep(_request(rollout), timeout=60)).stats
    assert stats.policy_version == 1
