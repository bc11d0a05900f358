"""Generation service through a real gRPC server on a loopback port, with a tiny model."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from transformers import AutoModelForCausalLM

from services.generation.backend import GenerationBackend
from services.generation.config import GenerationConfig
from services.generation.servicer import SERVICE_NAME, build_server
from shared import codec
from shared.proto.rlhf.v1 import generation_pb2, generation_pb2_grpc
from shared.weights import chunk_weights
from tests.helpers import forward_logprobs
from tests.service.grpc_helpers import expect_status, health_status, running

INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOO_LARGE = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
def config(tiny_policy_dir):
    return GenerationConfig.model_validate(
        {
            "model": {"path": str(tiny_policy_dir)},
            "max_new_tokens_limit": 64,
            "max_samples": 32,
            "micro_batch_size": 4,
        }
    )


@pytest.fixture
def backend(config):
    return GenerationBackend(config)


def _sampling(**kwargs):
    defaults = {"max_new_tokens": 12, "temperature": 1.0, "seed": 7, "samples_per_prompt": 1}
    return generation_pb2.SamplingParams(**(defaults | kwargs))


def _ids_request(prompts, **kwargs):
    return generation_pb2.GenerateRequest(
        prompt_ids=codec.ragged_to_pb(prompts, torch.int64), sampling=_sampling(**kwargs)
    )


def _decode(reply):
    return (
        codec.ragged_from_pb(reply.prompt_ids, "p"),
        codec.ragged_from_pb(reply.response_ids, "r"),
        codec.ragged_from_pb(reply.response_logprobs, "l"),
    )


def _perturbed_state(model_dir, seed):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


async def test_generate_from_text_returns_consistent_samples(config, backend, tiny_policy_dir):
    server, _ = await build_server(config, backend)
    async with running(server) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(
            prompts=["the cat is", "the weather was", "we"], sampling=_sampling(samples_per_prompt=2)
        )
        reply = await stub.Generate(request, timeout=60)
        info = await stub.Info(generation_pb2.InfoRequest(), timeout=5)
    prompts, responses, logprobs = _decode(reply)
    assert len(responses) == 6 and list(reply.prompt_index) == [0, 0, 1, 1, 2, 2]
    assert reply.policy_version == 0 == info.policy_version and info.vocab_size == backend.vocab_size
    tokenizer = backend.tokenizer
    assert prompts[2].tolist() == tokenizer("the weather was")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    for i, (prompt, response, lp) in enumerate(zip(prompts, responses, logprobs, strict=True)):
        assert 1 <= response.numel() <= 12 and lp.shape == response.shape
        finish = reply.finish_reasons[i]
        if finish == generation_pb2.FINISH_REASON_EOS:
            assert response[-1] == tokenizer.eos_token_id and (response[:-1] != tokenizer.eos_token_id).all()
        else:
            assert finish == generation_pb2.FINISH_REASON_LENGTH and response.numel() == 12
        assert reply.texts[i] == tokenizer.decode(response, skip_special_tokens=True)
        # Log-probs under the policy itself equal a plain forward of the same weights on the sampled tokens.
        torch.testing.assert_close(lp, forward_logprobs(model, prompt, response), atol=1e-4, rtol=0)


async def test_seed_makes_sampling_reproducible_and_greedy_is_deterministic(config, backend):
    server, _ = await build_server(config, backend)
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([9])]
    async with running(server) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        first = _decode(await stub.Generate(_ids_request(prompts, seed=3), timeout=60))[1]
        second = _decode(await stub.Generate(_ids_request(prompts, seed=3), timeout=60))[1]
        other = _decode(await stub.Generate(_ids_request(prompts, seed=4), timeout=60))[1]
        greedy = [
            _decode(await stub.Generate(_ids_request(prompts, temperature=0.0, seed=s), timeout=60))[1] for s in (1, 2)
        ]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(*greedy, strict=True))


async def test_bad_requests_are_rejected_and_the_service_stays_healthy(config, backend):
    server, _ = await build_server(config, backend)
    ok = [torch.tensor([5, 6])]
    async with running(server) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        cases = [
            (_ids_request([]), INVALID, ("prompts", "empty")),
            (generation_pb2.GenerateRequest(sampling=_sampling()), INVALID, ("exactly one",)),
            (_ids_request(ok, max_new_tokens=-3), INVALID, ("max_new_tokens",)),
            (_ids_request(ok, max_new_tokens=0), INVALID, ("max_new_tokens",)),
            (_ids_request(ok, max_new_tokens=100000), TOO_LARGE, ("max_new_tokens", "limit")),
            (
                _ids_request([torch.tensor([backend.vocab_size + 3])]),
                INVALID,
                ("prompt_ids[0]", "vocabulary"),
            ),
            (_ids_request(ok, top_p=1.5), INVALID, ("top_p",)),
            (_ids_request(ok, temperature=-1.0), INVALID, ("temperature",)),
            (_ids_request(ok, top_k=-1), INVALID, ("top_k",)),
            (_ids_request(ok * 20, samples_per_prompt=2), TOO_LARGE, ("samples_per_prompt",)),
            (
                generation_pb2.GenerateRequest(prompts=["a", ""], sampling=_sampling()),
                INVALID,
                ("prompts[1]",),
            ),
        ]
        for request, code, fragments in cases:
            await expect_status(stub.Generate(request, timeout=30), code, *fragments)
        bad_dtype = _ids_request(ok)
        bad_dtype.prompt_ids.values.dtype = 99
        await expect_status(stub.Generate(bad_dtype, timeout=30), INVALID, "prompt_ids.values.dtype")
        float_ids = _ids_request(ok)
        float_ids.prompt_ids.values.CopyFrom(codec.tensor_to_pb(torch.tensor([1.0, 2.0])))
        await expect_status(stub.Generate(float_ids, timeout=30), INVALID, "int64")
        assert await health_status(channel, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
        reply = await stub.Generate(_ids_request(ok), timeout=30)
        assert len(reply.texts) == 1


async def test_weight_update_swaps_in_the_new_policy(config, backend, tiny_policy_dir):
    new_model = _perturbed_state(tiny_policy_dir, seed=1).eval()
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([11, 12])]
    server, _ = await build_server(config, backend)
    async with running(server) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        before = await stub.Generate(_ids_request(prompts, temperature=0.0), timeout=60)
        chunks = list(chunk_weights(list(new_model.state_dict().items()), version=5, chunk_bytes=10_000))
        assert len(chunks) > len(new_model.state_dict())  # big tensors span several chunks
        result = await stub.UpdateWeights(iter(chunks), timeout=60)
        assert result.version == 5 and result.tensors == len(new_model.state_dict())
        assert (await stub.Info(generation_pb2.InfoRequest(), timeout=5)).policy_version == 5
        after = await stub.Generate(_ids_request(prompts, temperature=0.0), timeout=60)
        # An older version is refused, and so is an incomplete update; the served weights stay as they are.
        await expect_status(stub.UpdateWeights(iter(chunks[:3]), timeout=30), INVALID, "incomplete")
        old = [c for c in chunk_weights(list(new_model.state_dict().items()), version=4)]
        await expect_status(stub.UpdateWeights(iter(old), timeout=30), grpc.StatusCode.FAILED_PRECONDITION, "older")
        unknown = list(chunk_weights([("not.a.weight", torch.zeros(2))], version=6))
        await expect_status(stub.UpdateWeights(iter(unknown), timeout=30), INVALID, "not.a.weight")
        again = await stub.Generate(_ids_request(prompts, temperature=0.0), timeout=60)
    assert before.policy_version == 0 and after.policy_version == 5 == again.policy_version
    _, responses, logprobs = _decode(after)
    # The outputs are those the new weights give: greedy continuation and log-probs of the new model.
    for prompt, response, lp in zip(prompts, responses, logprobs, strict=True):
        torch.testing.assert_close(lp, forward_logprobs(new_model, prompt, response), atol=1e-4, rtol=0)
        with torch.no_grad():
            expected = new_model.generate(
                prompt.unsqueeze(0),
                max_new_tokens=response.numel(),
                do_sample=False,
                pad_token_id=backend.pad_token_id,
            )[0, prompt.numel() :]
        assert torch.equal(response, expected[: response.numel()])
    assert all(torch.equal(a, b) for a, b in zip(_decode(after)[1], _decode(again)[1], strict=True))


async def test_no_batch_sees_half_updated_weights(config, backend, tiny_policy_dir):
    models = {0: AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()}
    models.update({v: _perturbed_state(tiny_policy_dir, seed=v).eval() for v in (1, 2, 3)})
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([3, 4])]
    server, _ = await build_server(config, backend)
    async with running(server) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)

        async def generate_many():
            return [await stub.Generate(_ids_request(prompts, seed=i), timeout=60) for i in range(8)]

        async def update_all():
            for version in (1, 2, 3):
                state = list(models[version].state_dict().items())
                await stub.UpdateWeights(iter(list(chunk_weights(state, version, chunk_bytes=4096))), timeout=60)
                await asyncio.sleep(0)

        replies, _ = await asyncio.gather(generate_many(), update_all())
    seen = set()
    for reply in replies:
        seen.add(reply.policy_version)
        model = models[reply.policy_version]
        for prompt, response, lp in zip(*_decode(reply), strict=True):
            torch.testing.assert_close(lp, forward_logprobs(model, prompt, response), atol=1e-4, rtol=0)
    assert seen <= {0, 1, 2, 3}
