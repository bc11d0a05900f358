"""The policy that is trained is the policy that sampled, and the caller's sampling parameters always win.

At temperature T the policy samples from softmax(logits / T): generation's log-probs, the trainer's recomputed old
log-probs and the reference's must all be taken from logits / T, so that the PPO ratio starts at 1 and the KL is
between the right distributions. And a model's own generation_config.json (instruct models ship one with
temperature, top_p, do_sample) must never change what a request asked for.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers import GenerationConfig as HFGenerationConfig

from services.generation.backend import GenerationBackend
from services.generation.config import GenerationConfig
from services.generation.servicer import build_server as build_generation_server
from services.reference.backend import ReferenceBackend
from services.reference.config import ReferenceConfig
from services.reference.servicer import build_server as build_reference_server
from services.trainer.backend import TrainerBackend
from services.trainer.batching import pad_batch
from services.trainer.config import TrainerConfig
from shared import codec
from shared.proto.rlhf.v1 import generation_pb2, generation_pb2_grpc, reference_pb2, reference_pb2_grpc
from shared.tiny_models import build_policy
from shared.types import RolloutBatch, SamplingParams
from tests.service.grpc_helpers import running

PROMPTS = [torch.tensor([5, 6, 7]), torch.tensor([11]), torch.tensor([40, 41, 42, 43]), torch.tensor([9, 30])]
OPINIONS = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}


def _flat(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([r.reshape(-1) for r in rows])


async def test_generation_trainer_and_reference_logprobs_agree_at_temperature_0_7(policy_shape_dir):
    temperature = 0.7
    generation_config = GenerationConfig.model_validate({"model": {"path": str(policy_shape_dir)}})
    reference_config = ReferenceConfig.model_validate({"model": {"path": str(policy_shape_dir)}})
    generation_server, _ = await build_generation_server(generation_config, GenerationBackend(generation_config))
    reference_server, _ = await build_reference_server(reference_config, ReferenceBackend(reference_config))
    async with running(generation_server) as generation_channel, running(reference_server) as reference_channel:
        reply = await generation_pb2_grpc.GenerationStub(generation_channel).Generate(
            generation_pb2.GenerateRequest(
                prompt_ids=codec.ragged_to_pb(PROMPTS, torch.int64),
                sampling=generation_pb2.SamplingParams(
                    max_new_tokens=12, temperature=temperature, seed=3, samples_per_prompt=4
                ),
            ),
            timeout=60,
        )
        assert reply.logprob_temperature == pytest.approx(temperature)  # a proto float (float32)
        reference_stub = reference_pb2_grpc.ReferenceStub(reference_channel)
        reference_reply = await reference_stub.LogProbs(
            reference_pb2.LogProbsRequest(
                prompt_ids=reply.prompt_ids, response_ids=reply.response_ids, temperature=temperature
            ),
            timeout=60,
        )
        untempered = await reference_stub.LogProbs(
            reference_pb2.LogProbsRequest(prompt_ids=reply.prompt_ids, response_ids=reply.response_ids),
            timeout=60,
        )
    prompts = codec.ragged_from_pb(reply.prompt_ids, "p")
    responses = codec.ragged_from_pb(reply.response_ids, "r")
    generation_logprobs = codec.ragged_from_pb(reply.response_logprobs, "g")
    reference_logprobs = codec.ragged_from_pb(reference_reply.logprobs, "l")

    trainer_config = TrainerConfig.model_validate({"policy": {"path": str(policy_shape_dir)}})
    trainer = TrainerBackend(trainer_config.policy, trainer_config.critic, trainer_config.ppo)
    batch = RolloutBatch(
        prompt_ids=prompts,
        response_ids=responses,
        scores=torch.zeros(len(responses)),
        reference_logprobs=reference_logprobs,
        generation_logprobs=generation_logprobs,
        temperature=temperature,
    )
    padded = pad_batch(batch, trainer.device)
    old_logprobs, _ = trainer._evaluate(padded, temperature)
    trainer_logprobs = [old_logprobs[i, : r.numel()] for i, r in enumerate(responses)]

    torch.testing.assert_close(_flat(generation_logprobs), _flat(reference_logprobs), atol=1e-5, rtol=0)
    torch.testing.assert_close(_flat(trainer_logprobs), _flat(generation_logprobs), atol=1e-5, rtol=0)
    # At T = 1 the same tokens score differently: the agreement above is about the tempered distribution.
    assert float((_flat(codec.ragged_from_pb(untempered.logprobs, "u")) - _flat(reference_logprobs)).abs().max()) > 1e-2

    # The trainer's first step therefore starts at ratio 1: what it recomputes is what generation reported.
    stats = trainer.train_step(batch)
    assert stats.generation_logprob_diff < 1e-5


def _opinionated_copy(tmp_path_factory, tied: bool):
    """The tiny policy with an instruct model's generation_config.json: temperature 0.6, top_p 0.9, do_sample."""
    directory = build_policy(tmp_path_factory.mktemp("opinionated"), tied=tied, generation_defaults=OPINIONS)
    saved = HFGenerationConfig.from_pretrained(directory)
    assert (saved.do_sample, saved.temperature, saved.top_p) == (True, 0.6, 0.9)
    return directory


def test_requests_get_exactly_their_sampling_parameters_whatever_the_model_config_says(tmp_path_factory):
    opinionated_dir = _opinionated_copy(tmp_path_factory, tied=True)
    plain_dir = build_policy(tmp_path_factory.mktemp("plain"), tied=True)  # the same weights (same seed)
    opinionated = GenerationBackend(GenerationConfig.model_validate({"model": {"path": str(opinionated_dir)}}))
    plain = GenerationBackend(GenerationConfig.model_validate({"model": {"path": str(plain_dir)}}))
    model = AutoModelForCausalLM.from_pretrained(plain_dir).eval()
    prompts = PROMPTS * 4

    # Greedy is greedy: the argmax continuation, identical with and without the model's opinions.
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    greedy_samples = opinionated.generate(prompts, greedy)
    for sample in greedy_samples:
        ids = sample.prompt_ids
        for token in sample.response_ids:
            with torch.no_grad():
                assert int(model(ids[None]).logits[0, -1].argmax()) == int(token)
            ids = torch.cat([ids, token[None]])
    assert [s.response_ids.tolist() for s in greedy_samples] == [
        s.response_ids.tolist() for s in plain.generate(prompts, greedy)
    ]

    # Temperature 1.0, no top-p: the same draws as the model without opinions, and log-probs at T = 1.
    at_one = SamplingParams(max_new_tokens=10, temperature=1.0, seed=11)
    got = opinionated.generate(prompts, at_one)
    want = plain.generate(prompts, at_one)
    assert [s.response_ids.tolist() for s in got] == [s.response_ids.tolist() for s in want]
    for sample in got:
        sequence = torch.cat([sample.prompt_ids, sample.response_ids])
        with torch.no_grad():
            logits = model(sequence[None]).logits[0, sample.prompt_ids.numel() - 1 : -1]
        expected = torch.log_softmax(logits, dim=-1).gather(-1, sample.response_ids[:, None]).squeeze(-1)
        torch.testing.assert_close(sample.response_logprobs, expected, atol=1e-5, rtol=0)

    # The test can see the bug it guards against: transformers' own merging turns a greedy request into sampling
    # at the model's temperature 0.6 / top_p 0.9 (a random tiny model's draws almost never match the argmax).
    merged_model = AutoModelForCausalLM.from_pretrained(opinionated_dir).eval()
    torch.manual_seed(11)
    batch = torch.stack([p for p in prompts if p.numel() == 3])
    with torch.no_grad():
        merged = merged_model.generate(
            batch, generation_config=HFGenerationConfig(max_new_tokens=10, do_sample=False), pad_token_id=0
        )
    argmax = [s.response_ids.tolist() for s in greedy_samples if s.prompt_ids.numel() == 3]
    assert [row[3:].tolist()[: len(a)] for row, a in zip(merged, argmax, strict=True)] != argmax
