"""Reference service through a real gRPC server on a loopback port, with a tiny model."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from transformers import AutoModelForCausalLM

from services.reference.backend import ReferenceBackend
from services.reference.config import ReferenceConfig
from services.reference.servicer import SERVICE_NAME, build_server
from shared import codec
from shared.proto.rlhf.v1 import reference_pb2, reference_pb2_grpc, tensor_pb2
from tests.service.grpc_helpers import expect_status, health_status, running


@pytest.fixture(scope="module")
def config(tiny_policy_dir):
    return ReferenceConfig.model_validate(
        {
            "model": {"path": str(tiny_policy_dir)},
            "micro_batch_size": 3,
            "max_batch": 64,
            "max_tokens_per_sample": 200,
        }
    )


@pytest.fixture(scope="module")
def backend(config):
    return ReferenceBackend(config)


def _request(prompts, responses):
    return reference_pb2.LogProbsRequest(
        prompt_ids=codec.ragged_to_pb(prompts, torch.int64),
        response_ids=codec.ragged_to_pb(responses, torch.int64),
    )


def _random_rows(generator, count, low, high, vocab):
    lengths = torch.randint(low, high, (count,), generator=generator).tolist()
    return [torch.randint(0, vocab, (n,), generator=generator) for n in lengths]


async def test_logprobs_equal_an_unpadded_forward(config, backend, tiny_policy_dir):
    generator = torch.Generator().manual_seed(0)
    vocab = backend.vocab_size
    prompts = _random_rows(generator, 7, 1, 12, vocab)
    responses = _random_rows(generator, 7, 1, 9, vocab)
    server, _ = await build_server(config, backend)
    async with running(server) as channel:
        reply = await reference_pb2_grpc.ReferenceStub(channel).LogProbs(_request(prompts, responses), timeout=30)
    got = codec.ragged_from_pb(reply.logprobs, "logprobs")
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    for prompt, response, logprobs in zip(prompts, responses, got, strict=True):
        ids = torch.cat([prompt, response]).unsqueeze(0)
        with torch.no_grad():
            expected = torch.log_softmax(model(ids).logits[0].float(), -1)
        expected = expected[prompt.numel() - 1 : -1].gather(1, response.unsqueeze(1)).squeeze(1)
        assert logprobs.dtype == torch.float32 and logprobs.shape == response.shape
        torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=0)


async def test_health_goes_serving_only_once_a_backend_is_attached(config, backend):
    server, _ = await build_server(config, None)
    async with running(server, serving=False) as channel:
        assert await health_status(channel, SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = reference_pb2_grpc.ReferenceStub(channel)
        one = [torch.tensor([1, 2])]
        await expect_status(stub.LogProbs(_request(one, one), timeout=10), grpc.StatusCode.UNAVAILABLE, "loading")
        server.attach(backend)
        await server.set_serving(True)
        assert await health_status(channel, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
        assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        reply = await stub.LogProbs(_request(one, one), timeout=10)
        assert len(codec.ragged_from_pb(reply.logprobs, "x")) == 1
    assert server.port > 0


async def test_bad_inputs_are_rejected_and_the_service_stays_healthy(config, backend):
    vocab = backend.vocab_size
    ok = [torch.tensor([1, 2, 3])]
    server, _ = await build_server(config, backend)
    async with running(server) as channel:
        stub = reference_pb2_grpc.ReferenceStub(channel)
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        await expect_status(stub.LogProbs(_request([], []), timeout=10), invalid, "prompt_ids", "empty")
        await expect_status(stub.LogProbs(_request(ok + ok, ok), timeout=10), invalid, "response_ids", "rows")
        await expect_status(
            stub.LogProbs(_request(ok, [torch.tensor([vocab])]), timeout=10),
            invalid,
            "response_ids[0]",
            "vocabulary",
        )
        await expect_status(
            stub.LogProbs(_request([torch.tensor([-1])], ok), timeout=10),
            invalid,
            "prompt_ids[0]",
            "vocabulary",
        )
        await expect_status(
            stub.LogProbs(_request(ok, [torch.tensor([], dtype=torch.int64)]), timeout=10), invalid, "empty"
        )
        bad_dtype = _request(ok, ok)
        bad_dtype.prompt_ids.values.dtype = tensor_pb2.DTYPE_UNSPECIFIED
        await expect_status(stub.LogProbs(bad_dtype, timeout=10), invalid, "prompt_ids.values.dtype")
        bad_bytes = _request(ok, ok)
        bad_bytes.response_ids.values.data = b"\x00" * 7
        await expect_status(stub.LogProbs(bad_bytes, timeout=10), invalid, "response_ids.values.data", "bytes")
        bad_offsets = _request(ok, ok)
        bad_offsets.prompt_ids.offsets.CopyFrom(codec.tensor_to_pb(torch.tensor([0, 5])))
        await expect_status(stub.LogProbs(bad_offsets, timeout=10), invalid, "prompt_ids.offsets")
        long = [torch.ones(150, dtype=torch.int64)]
        await expect_status(
            stub.LogProbs(_request(long, long), timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED, "300 tokens"
        )
        too_many = [torch.tensor([1])] * 65
        await expect_status(
            stub.LogProbs(_request(too_many, too_many), timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED, "65"
        )
        assert await health_status(channel, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
        reply = await stub.LogProbs(_request(ok, ok), timeout=10)
        assert codec.ragged_from_pb(reply.logprobs, "x")[0].shape == (3,)


async def test_oversized_message_is_resource_exhausted(tiny_policy_dir, backend):
    small = ReferenceConfig.model_validate(
        {"model": {"path": str(tiny_policy_dir)}, "server": {"max_message_bytes": 4096}}
    )
    server, _ = await build_server(small, backend)
    async with running(server) as channel:
        big = [torch.ones(1000, dtype=torch.int64)]
        stub = reference_pb2_grpc.ReferenceStub(channel)
        await expect_status(stub.LogProbs(_request(big, big), timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert await health_status(channel, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
