"""Chat templates: conversational prompts are rendered with the policy tokenizer's template and its generation
prompt (text prompts stay as they are), and the reward service renders a conversation with the reward model's own
template. Real gRPC servers on loopback, tiny models with their own templates.
"""

from __future__ import annotations

import json

import grpc
import pytest
from transformers import AutoTokenizer

from services.generation.backend import GenerationBackend
from services.generation.config import GenerationConfig
from services.generation.servicer import build_server as build_generation_server
from services.orchestrator.clients import GrpcGeneration, GrpcReward
from services.orchestrator.config import PeersConfig, RpcConfig, RunConfig
from services.orchestrator.dataset import DatasetError, load_prompts
from services.orchestrator.inprocess import inprocess_clients
from services.orchestrator.loop import RLHFLoop
from services.reference.backend import ReferenceBackend
from services.reference.config import ReferenceConfig
from services.reward.backend import load_backend
from services.reward.config import RewardConfig
from services.reward.servicer import build_server as build_reward_server
from services.trainer.backend import TrainerBackend
from services.trainer.config import CriticConfig, PPOConfig
from shared import codec
from shared.convert import conversations_to_pb
from shared.modeling import ModelConfig
from shared.proto.rlhf.v1 import generation_pb2, generation_pb2_grpc, reward_pb2, reward_pb2_grpc
from shared.tiny_models import CHAT_TEMPLATE, build_policy, build_reward_model
from shared.types import SamplingParams
from tests.service.grpc_helpers import expect_status, running

INVALID = grpc.StatusCode.INVALID_ARGUMENT
CONVERSATIONS = [
    [{"role": "user", "content": "the day was"}],
    [{"role": "system", "content": "be kind."}, {"role": "user", "content": "my friend is"}],
]
# The reward model's own template differs from the policy's: a scorer must use its own.
REWARD_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def chat_policy_dir(tmp_path_factory):
    return build_policy(tmp_path_factory.mktemp("chat-policy"), tied=True, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def chat_reward_dir(tmp_path_factory):
    return build_reward_model(tmp_path_factory.mktemp("chat-reward"), chat_template=REWARD_TEMPLATE)


async def test_conversations_are_rendered_with_the_policy_template_and_text_stays_text(
    chat_policy_dir, tiny_policy_dir
):
    tokenizer = AutoTokenizer.from_pretrained(chat_policy_dir)
    config = GenerationConfig.model_validate({"model": {"path": str(chat_policy_dir)}})
    plain_config = GenerationConfig.model_validate({"model": {"path": str(tiny_policy_dir)}})
    server, _ = await build_generation_server(config, GenerationBackend(config))
    plain_server, _ = await build_generation_server(plain_config, GenerationBackend(plain_config))
    sampling = generation_pb2.SamplingParams(max_new_tokens=4, temperature=0.0)
    async with running(server) as channel, running(plain_server) as plain_channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        chat = await stub.Generate(
            generation_pb2.GenerateRequest(conversations=conversations_to_pb(CONVERSATIONS), sampling=sampling),
            timeout=30,
        )
        text = await stub.Generate(generation_pb2.GenerateRequest(prompts=["the day was"], sampling=sampling))
        # Exactly one kind of prompt per request; a bad turn is named; no template means a clear error.
        both = generation_pb2.GenerateRequest(
            prompts=["x"], conversations=conversations_to_pb(CONVERSATIONS), sampling=sampling
        )
        await expect_status(stub.Generate(both, timeout=10), INVALID, "exactly one")
        bad = generation_pb2.GenerateRequest(
            conversations=conversations_to_pb([[{"role": "", "content": "hi"}]]), sampling=sampling
        )
        await expect_status(stub.Generate(bad, timeout=10), INVALID, "conversations[0][0].role")
        plain_stub = generation_pb2_grpc.GenerationStub(plain_channel)
        no_template = generation_pb2.GenerateRequest(
            conversations=conversations_to_pb(CONVERSATIONS), sampling=sampling
        )
        await expect_status(plain_stub.Generate(no_template, timeout=10), INVALID, "no chat template")
    prompt_ids = codec.ragged_from_pb(chat.prompt_ids, "p")
    for conversation, ids in zip(CONVERSATIONS, prompt_ids, strict=True):
        expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        assert ids.tolist() == list(expected)
        assert tokenizer.decode(ids).endswith("<s>assistant\n")  # the generation prompt, once
    # A text prompt is tokenized as it is: no template.
    assert codec.ragged_from_pb(text.prompt_ids, "p")[0].tolist() == tokenizer("the day was")["input_ids"]


async def test_the_reward_service_renders_conversations_with_its_own_template(chat_reward_dir):
    config = RewardConfig.model_validate({"model": {"path": str(chat_reward_dir)}, "normalize": False})
    backend = load_backend(config)
    server, _ = await build_reward_server(config, backend)
    responses = ["warm and kind.", "glad"]
    async with running(server) as channel:
        stub = reward_pb2_grpc.RewardStub(channel)
        reply = await stub.Score(
            reward_pb2.ScoreRequest(conversations=conversations_to_pb(CONVERSATIONS), responses=responses),
            timeout=30,
        )
        await expect_status(
            stub.Score(reward_pb2.ScoreRequest(conversations=conversations_to_pb(CONVERSATIONS), responses=["a"])),
            INVALID,
            "responses",
        )
    scores = list(reply.scores)
    tokenizer = AutoTokenizer.from_pretrained(chat_reward_dir)
    whole = [
        tokenizer.apply_chat_template([*c, {"role": "assistant", "content": r}], tokenize=False)
        for c, r in zip(CONVERSATIONS, responses, strict=True)
    ]
    assert whole[0] == "[user] the day was</s>[assistant] warm and kind.</s>"
    # The score is the reward model's score of the whole exchange in its own template, end-of-turn included.
    expected = backend.score([("", text) for text in whole])
    assert scores == pytest.approx(expected, abs=1e-5)
    assert scores != pytest.approx(backend.score([("the day was", "warm and kind."), ("my friend is", "glad")]))


def test_a_reward_function_reads_a_conversation_as_plain_text():
    backend = load_backend(RewardConfig.model_validate({"function": "services.reward.functions:positive_word_share"}))
    assert backend.render(CONVERSATIONS[1], "glad", "c") == ("be kind.\nmy friend is\n", "glad")


def test_dataset_rows_are_text_or_conversations_never_both(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    assert load_prompts(path) == CONVERSATIONS
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"mixed.jsonl:2: .*one kind"):
        load_prompts(mixed)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: messages\[0\].content"):
        load_prompts(bad)


async def test_a_conversational_run_through_grpc_and_in_process(chat_policy_dir, chat_reward_dir, tmp_path):
    """The loop on a messages dataset: generation renders with the policy template, reward with its own."""
    dataset = tmp_path / "chat.jsonl"
    dataset.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 3))
    model = {"model": {"path": str(chat_policy_dir)}}
    reward_config = RewardConfig.model_validate({"model": {"path": str(chat_reward_dir)}, "normalize": False})
    clients = inprocess_clients(
        GenerationBackend(GenerationConfig.model_validate(model)),
        load_backend(reward_config),
        ReferenceBackend(ReferenceConfig.model_validate(model)),
        TrainerBackend(
            ModelConfig(path=str(chat_policy_dir)),
            CriticConfig(),
            PPOConfig(ppo_epochs=1, minibatch_size=4, micro_batch_size=4),
        ),
    )
    run = RunConfig(
        dataset=str(dataset), iterations=2, prompts_per_iteration=4, runs_dir=str(tmp_path), record_rollouts=True
    )
    summary = await RLHFLoop("chat", run, clients).run()
    assert summary["iterations"] == 2 and summary["policy_version"] == 2
    rows = [json.loads(line) for line in (tmp_path / "chat" / "rollouts.jsonl").read_text().splitlines()]
    assert all(row["prompt"] in CONVERSATIONS for row in rows)

    # The same rollouts through the gRPC clients give the same scores as the in-process reward.
    generation_config = GenerationConfig.model_validate(model)
    generation_server, generation_port = await build_generation_server(
        generation_config, GenerationBackend(generation_config)
    )
    reward_server, reward_port = await build_reward_server(reward_config, load_backend(reward_config))
    async with running(generation_server), running(reward_server):
        peers = PeersConfig(generation=[f"127.0.0.1:{generation_port}"], reward=f"127.0.0.1:{reward_port}")
        generation, reward = GrpcGeneration(peers, RpcConfig()), GrpcReward(peers, RpcConfig())
        try:
            rollouts = await generation.generate(CONVERSATIONS, SamplingParams(max_new_tokens=4, seed=1))
            grpc_scores = await reward.score(rollouts)
        finally:
            await generation.close()
            await reward.channel.close()
    assert rollouts.prompts == CONVERSATIONS
    in_process = await clients.reward.score(rollouts)
    assert grpc_scores == pytest.approx(in_process, abs=1e-5)
    tokens = rollouts.tokens.prompt_ids
    first = codec.ragged_from_pb(tokens, "p")[0].tolist()
    rendered = AutoTokenizer.from_pretrained(chat_policy_dir).apply_chat_template(
        CONVERSATIONS[0], add_generation_prompt=True, tokenize=True
    )
    assert first == list(rendered)
