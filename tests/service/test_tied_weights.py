"""Tied and untied models in every weight path: the trainer's stream, generation's push and pull over real gRPC, the
in-process sync, and checkpoints.

A tied model (input embedding and output head one tensor, as in Qwen2.5, Llama-3.2 1B/3B, SmolLM2 and Gemma) names
that tensor twice in its state dict; ``save_pretrained`` and the trainer's stream name it once. Generation must take
that as complete, and its head must follow the embedding.
"""

from __future__ import annotations

import asyncio

import grpc
import torch
from transformers import AutoModelForCausalLM

from services.generation.backend import GenerationBackend
from services.generation.config import GenerationConfig
from services.generation.servicer import build_server as build_generation_server
from services.orchestrator.inprocess import InProcessGeneration
from services.trainer.backend import TrainerBackend
from services.trainer.config import TrainerConfig
from shared import codec
from shared.proto.rlhf.v1 import generation_pb2, generation_pb2_grpc
from shared.weights import chunk_weights, tied_aliases, unique_state
from tests.helpers import forward_logprobs, sampled_rollout
from tests.service.grpc_helpers import expect_status, running, synced_replicas

PROMPTS = [torch.tensor([5, 6, 7]), torch.tensor([11]), torch.tensor([40, 41, 42, 43])]


def _is_tied(model) -> bool:
    return model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _trainer(policy_dir) -> TrainerBackend:
    config = TrainerConfig.model_validate(
        {
            "policy": {"path": str(policy_dir)},
            # A large learning rate so that one step visibly moves every weight, the embedding included.
            "ppo": {"learning_rate": 1e-2, "ppo_epochs": 1, "minibatch_size": 4, "micro_batch_size": 4},
        }
    )
    return TrainerBackend(config.policy, config.critic, config.ppo)


def _trained(policy_dir) -> TrainerBackend:
    trainer = _trainer(policy_dir)
    trainer.train_step(sampled_rollout(AutoModelForCausalLM.from_pretrained(policy_dir).eval()))
    return trainer


def _assert_serves(generation: GenerationBackend, trainer: TrainerBackend) -> None:
    """Generation's model equals the trainer's policy in every state-dict entry, aliases included."""
    served = generation.model.state_dict()
    trained = trainer.policy.state_dict()
    assert list(served) == list(trained)
    for name, tensor in trained.items():
        assert torch.equal(served[name], tensor), name


def test_tied_aliases_name_the_head_of_a_tied_model_only(tiny_policy_dir, tiny_tied_policy_dir):
    untied = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    tied = AutoModelForCausalLM.from_pretrained(tiny_tied_policy_dir)
    assert tied_aliases(untied) == {}
    assert tied_aliases(tied) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert set(tied.state_dict()) - set(unique_state(tied)) == {"lm_head.weight"}
    assert unique_state(untied).keys() == untied.state_dict().keys()


def test_inprocess_sync_serves_the_trained_policy(policy_shape_dir):
    trainer = _trained(policy_shape_dir)
    generation = GenerationBackend(GenerationConfig.model_validate({"model": {"path": str(policy_shape_dir)}}))
    tied = _is_tied(generation.model)
    before_head = generation.model.lm_head.weight.clone()

    sync = asyncio.run(InProcessGeneration(generation, trainer).sync_weights(1))

    assert sync.version == 1 == generation.version
    _assert_serves(generation, trainer)
    assert _is_tied(generation.model) == tied == bool(trainer.policy.config.tie_word_embeddings)
    # The head changed with the step (tied: through the embedding it shares; untied: its own tensor).
    assert not torch.equal(generation.model.lm_head.weight, before_head)
    sent = dict(trainer.policy_state())
    assert ("lm_head.weight" in sent) is not tied  # a tied head travels once, as its embedding


async def test_push_and_pull_over_grpc_serve_the_trained_policy(policy_shape_dir):
    trainer = _trained(policy_shape_dir)
    config = GenerationConfig.model_validate({"model": {"path": str(policy_shape_dir)}})
    pushed, pulled = GenerationBackend(config), GenerationBackend(config)
    trainer_config = TrainerConfig.model_validate({"policy": {"path": str(policy_shape_dir)}})
    # Push (the trainer's stream handed to UpdateWeights, in small chunks) and pull (generation streams it itself).
    async with synced_replicas(trainer, trainer_config, config, pushed, pulled, 4096, 1) as (push, pull, pull_stub):
        reply = await pull_stub.Generate(
            generation_pb2.GenerateRequest(
                prompt_ids=codec.ragged_to_pb(PROMPTS, torch.int64),
                sampling=generation_pb2.SamplingParams(max_new_tokens=6, temperature=0.0),
            ),
            timeout=30,
        )
    expected_tensors = len(unique_state(trainer.policy))
    assert push.version == pull.version == 1
    assert push.tensors == pull.tensors == expected_tensors
    for backend in (pushed, pulled):
        _assert_serves(backend, trainer)
    # What pulled serves is the trained policy: its log-probs are the trainer's model's.
    responses = codec.ragged_from_pb(reply.response_ids, "r")
    logprobs = codec.ragged_from_pb(reply.response_logprobs, "l")
    for prompt, response, lp in zip(PROMPTS, responses, logprobs, strict=True):
        torch.testing.assert_close(lp, forward_logprobs(trainer.policy, prompt, response), atol=1e-5, rtol=0)


async def test_a_tie_mismatch_is_refused_with_a_clear_error(tiny_policy_dir, tiny_tied_policy_dir):
    """An untied sender's head cannot go into a tied receiver (nor the reverse): a clear error, nothing swapped."""
    untied = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    tied = AutoModelForCausalLM.from_pretrained(tiny_tied_policy_dir)
    for receiver_dir, sender, fragment in (
        (tiny_tied_policy_dir, untied, "tie_word_embeddings"),
        (tiny_policy_dir, tied, "lm_head.weight"),
    ):
        config = GenerationConfig.model_validate({"model": {"path": str(receiver_dir)}})
        backend = GenerationBackend(config)
        before = {k: v.clone() for k, v in backend.model.state_dict().items()}
        server, _ = await build_generation_server(config, backend)
        async with running(server) as channel:
            chunks = list(chunk_weights(list(unique_state(sender).items()), version=1))
            stub = generation_pb2_grpc.GenerationStub(channel)
            await expect_status(
                stub.UpdateWeights(iter(chunks), timeout=30), grpc.StatusCode.INVALID_ARGUMENT, fragment
            )
        assert backend.version == 0
        assert all(torch.equal(before[k], v) for k, v in backend.model.state_dict().items())


def test_checkpoint_round_trip_keeps_the_tie_and_the_weights(policy_shape_dir, tmp_path):
    trainer = _trained(policy_shape_dir)
    tied = _is_tied(trainer.policy)
    saved = {name: t.clone() for name, t in trainer.policy.state_dict().items()}
    trainer.save_checkpoint(tmp_path / "checkpoint")

    restored = _trainer(policy_shape_dir)
    restored.load_checkpoint(tmp_path / "checkpoint")
    assert _is_tied(restored.policy) == tied
    assert restored.version == 1
    for name, tensor in restored.policy.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    # The restored trainer keeps training its own (tied) parameters: a step moves the head with the embedding.
    restored.train_step(sampled_rollout(AutoModelForCausalLM.from_pretrained(policy_shape_dir).eval()))
    assert _is_tied(restored.policy) == tied
    assert not torch.equal(restored.policy.get_input_embeddings().weight, saved["model.embed_tokens.weight"])
    # The saved policy directory is a plain Hugging Face model with the same tie.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint" / "policy")
    assert _is_tied(reloaded) == tied


def test_optimizer_holds_one_state_per_tied_tensor(tiny_tied_policy_dir):
    trainer = _trained(tiny_tied_policy_dir)
    params = list(trainer.policy.parameters())  # parameters() yields a shared tensor once
    assert len(params) == len(unique_state(trainer.policy))
    assert len(trainer._optimizers["policy"].state) == len(params)
