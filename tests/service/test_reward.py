"""Reward service through a real gRPC server: a reward model and a rule-based reward function."""

from __future__ import annotations

import asyncio
import json
import shutil

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from services.reward.backend import NORMALIZATION_FILE, load_backend
from services.reward.config import RewardConfig
from services.reward.functions import positive_word_share
from services.reward.servicer import SERVICE_NAME, build_server
from shared.config import ConfigError, load_config
from shared.proto.rlhf.v1 import reward_pb2, reward_pb2_grpc
from shared.worker import BatchingQueue, ModelWorker
from tests.service.grpc_helpers import expect_status, health_status, running

PAIRS = [
    ("the cat is", " happy and warm."),
    ("the day was", " awful"),
    ("we", " are kind, kind, kind and glad."),
]


def _request(pairs):
    return reward_pb2.ScoreRequest(prompts=[p for p, _ in pairs], responses=[r for _, r in pairs])


async def _score(config, pairs):
    server, _ = await build_server(config, load_backend(config))
    async with running(server) as channel:
        reply = await reward_pb2_grpc.RewardStub(channel).Score(_request(pairs), timeout=30)
    return torch.tensor(list(reply.scores))


async def test_reward_model_scores_match_an_in_process_forward(tiny_reward_dir):
    config = RewardConfig.model_validate({"model": {"path": str(tiny_reward_dir)}, "micro_batch_size": 2})
    scores = await _score(config, PAIRS)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_dir)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    for (prompt, response), score in zip(PAIRS, scores, strict=True):
        with torch.no_grad():
            expected = model(**tokenizer(prompt + response, return_tensors="pt")).logits[0, 0]
        torch.testing.assert_close(score, expected, atol=1e-5, rtol=0)


async def test_reward_function_named_in_config():
    config = RewardConfig.model_validate({"function": "services.reward.functions:positive_word_share"})
    scores = await _score(config, PAIRS)
    torch.testing.assert_close(scores, torch.tensor([2 / 3, -1.0, 4 / 6]))
    assert positive_word_share(["x"], [""]) == [0.0]


async def test_concurrent_requests_are_merged_and_answered_separately():
    config = RewardConfig.model_validate({"function": "services.reward.functions:response_length"})
    server, _ = await build_server(config, load_backend(config))
    async with running(server) as channel:
        stub = reward_pb2_grpc.RewardStub(channel)
        replies = await asyncio.gather(*[stub.Score(_request([("p", "x" * n)] * n), timeout=30) for n in range(1, 9)])
    for n, reply in enumerate(replies, start=1):
        assert list(reply.scores) == [float(n)] * n


async def test_bad_requests_and_config(tiny_reward_dir, tmp_path):
    config = RewardConfig.model_validate({"function": "services.reward.functions:response_length", "max_batch": 4})
    server, _ = await build_server(config, load_backend(config))
    async with running(server) as channel:
        stub = reward_pb2_grpc.RewardStub(channel)
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        await expect_status(stub.Score(_request([]), timeout=10), invalid, "prompts", "empty")
        mismatched = reward_pb2.ScoreRequest(prompts=["a", "b"], responses=["c"])
        await expect_status(stub.Score(mismatched, timeout=10), invalid, "responses", "1 items")
        await expect_status(stub.Score(_request(PAIRS * 2), timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED, "6")
        assert await health_status(channel, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(RewardConfig, overrides={"function": "a:b", "model.path": str(tiny_reward_dir)})
    with pytest.raises(ValueError, match="no callable"):
        load_backend(RewardConfig.model_validate({"function": "services.reward.functions:nope"}))
    bad_yaml = tmp_path / "reward.yaml"
    bad_yaml.write_text("function: a:b\nmicro_batch_size: -1\n")
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(RewardConfig, bad_yaml)


async def test_normalization_file_centres_served_scores(tiny_reward_dir, tmp_path):
    model_dir = tmp_path / "reward-model"
    shutil.copytree(tiny_reward_dir, model_dir)
    raw_config = RewardConfig.model_validate({"model": {"path": str(model_dir)}, "normalize": False})
    raw = await _score(raw_config, PAIRS)
    mean, std = raw.mean().item(), raw.std(correction=0).item()
    (model_dir / NORMALIZATION_FILE).write_text(json.dumps({"mean": mean, "std": std, "count": len(PAIRS)}))

    centred = await _score(raw_config.model_copy(update={"normalize": True}), PAIRS)
    torch.testing.assert_close(centred, (raw - mean) / std)
    assert abs(centred.mean().item()) < 1e-5 and abs(centred.std(correction=0).item() - 1) < 1e-5
    torch.testing.assert_close(await _score(raw_config, PAIRS), raw)  # normalize=false ignores the file

    (model_dir / NORMALIZATION_FILE).write_text(json.dumps({"mean": 0.0, "std": 0.0, "count": 3}))
    with pytest.raises(ValueError, match=f"{NORMALIZATION_FILE}: not a valid reward normalization"):
        load_backend(raw_config.model_copy(update={"normalize": True}))


async def test_the_batching_queue_waits_caps_and_keeps_each_callers_items():
    """Requests taken within max_wait merge, up to max_batch items per call (the one that would overflow waits for
    the next call; a larger one runs alone); each caller gets its own results, in order."""
    calls: list[list[int]] = []

    def process(items: list[int]) -> list[int]:
        calls.append(items)
        return [10 * item for item in items]

    queue = BatchingQueue(ModelWorker("test"), process, max_batch=4, max_wait_s=0.5)
    try:
        requests = [[1, 2], [3], [4, 5], [6, 7, 8, 9, 10], [11]]
        replies = await asyncio.gather(*(queue.submit(items) for items in requests))
    finally:
        await queue.close()
    assert replies == [[10 * item for item in items] for items in requests]
    assert calls == [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
