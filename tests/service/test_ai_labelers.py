"""AI-feedback labellers on real services: the reward judge against a reward service, the LLM and constitutional
judges against the generation service's TGI routes (TGI's own client), and Constitutional AI's critique -> revision
through the generation service's gRPC Generate. All in this process on loopback, on tiny models built offline.

A tiny random model's judgements, critiques and revisions are meaningless: these tests check the mechanics (the
probability is the formula of the numbers the services give, swapping A and B gives 1 - P, the verdict follows P,
rows are built and skipped as documented, runs repeat for a seed), not the quality of the feedback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.generation.backend import GenerationBackend
from services.generation.config import GenerationConfig
from services.generation.servicer import build_server as build_generation_server
from services.labeling.constitutional import (
    DEFAULT_PRINCIPLES,
    ConstitutionalAI,
    ConstitutionalConfig,
    ConstitutionalJobConfig,
    CritiqueRevision,
    Outcome,
    PromptFormat,
    collect,
    cut,
    load_principles,
    run_constitutional_job,
)
from services.labeling.labelers import Choice, Comparison, Labeler, preference_rows
from services.labeling.rlaif import (
    TIE_EPSILON,
    ConstitutionalJudge,
    ConstitutionalJudgeConfig,
    JudgeConfig,
    LLMJudge,
    LLMJudgeConfig,
    RewardJudge,
    RewardJudgeConfig,
    build_judge,
    choice_for,
)
from services.orchestrator.clients import GrpcGeneration
from services.orchestrator.config import PeersConfig, RpcConfig
from services.reward.backend import load_backend
from services.reward.config import RewardConfig
from services.reward.servicer import build_server as build_reward_server
from services.training.reward import read_groups
from shared.config import ConfigError
from shared.proto.rlhf.v1 import reward_pb2, reward_pb2_grpc
from shared.tiny_models import CHAT_TEMPLATE, build_policy
from shared.training import DataError
from shared.types import SamplingParams
from tests.service.grpc_helpers import running

# text_generation 0.7.0 calls pydantic's deprecated .dict() on every request
pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")

COMPARISONS = [
    Comparison("the cat is", " happy and warm.", " sad."),
    Comparison("the day was", " awful", " lovely, lovely."),
    Comparison("we", " are kind.", " are kind."),  # identical: a tie
]
SHORT_TEMPLATE = "Q: {prompt}\n1: {first}\n2: {second}\nBetter:"


def swapped(comparisons: list[Comparison]) -> list[Comparison]:
    return [Comparison(c.prompt, c.response_b, c.response_a) for c in comparisons]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def generation_config(model_dir) -> GenerationConfig:
    return GenerationConfig.model_validate(
        {"model": {"path": str(model_dir)}, "server": {"http_port": 0}, "max_new_tokens_limit": 64}
    )


@contextlib.asynccontextmanager
async def generation_service(model_dir):
    """The generation service on loopback: (gRPC address, base URL of its TGI routes)."""
    config = generation_config(model_dir)
    server, port = await build_generation_server(config, GenerationBackend(config))
    async with running(server):
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{server.http_port}"


@pytest.fixture(scope="module")
async def policy_service(tiny_policy_dir):
    async with generation_service(tiny_policy_dir) as addresses:
        yield addresses


@pytest.fixture(scope="module")
async def reward_service(tiny_reward_dir):
    config = RewardConfig.model_validate({"model": {"path": str(tiny_reward_dir)}})
    server, port = await build_reward_server(config, load_backend(config))
    async with running(server) as channel:
        yield f"127.0.0.1:{port}", reward_pb2_grpc.RewardStub(channel)


# -- reward judge ----------------------------------------------------------------------------------------------------


async def test_reward_judge_probability_is_the_sigmoid_of_the_served_scores(reward_service):
    address, stub = reward_service
    temperature = 0.5
    judge = RewardJudge(RewardJudgeConfig(address=address, temperature=temperature, batch_size=2))
    try:
        assert isinstance(judge, Labeler)
        verdicts = await judge.label(COMPARISONS)
        swapped_verdicts = await judge.label(swapped(COMPARISONS))
    finally:
        await judge.close()
    # The same texts asked of the service directly.
    request = reward_pb2.ScoreRequest(
        prompts=[c.prompt for c in COMPARISONS for _ in range(2)],
        responses=[r for c in COMPARISONS for r in (c.response_a, c.response_b)],
    )
    scores = list((await stub.Score(request, timeout=30)).scores)
    for i, verdict in enumerate(verdicts):
        expected = sigmoid((scores[2 * i] - scores[2 * i + 1]) / temperature)
        assert verdict.probability_a == pytest.approx(expected, abs=1e-6)
        assert verdict.labeler == "reward-judge" and verdict.choice is choice_for(verdict.probability_a)
        assert swapped_verdicts[i].probability_a == pytest.approx(1 - verdict.probability_a, abs=1e-6)
    assert verdicts[2].probability_a == 0.5 and verdicts[2].choice is Choice.TIE
    assert {verdicts[0].choice, swapped_verdicts[0].choice} == {Choice.A, Choice.B}


async def test_reward_judge_rows_are_soft_labels_the_reward_job_reads(tmp_path):
    """With a reward function the scores are known (the response's length in characters): P(A) =
    sigmoid((len A - len B) / T) by hand, and the rows carry P(chosen) >= 0.5."""
    config = RewardConfig.model_validate({"function": "services.reward.functions:response_length"})
    server, port = await build_reward_server(config, load_backend(config))
    async with running(server):
        judge = build_judge(JudgeConfig(kind="reward", reward={"address": f"127.0.0.1:{port}", "temperature": 4}))
        try:
            verdicts = await judge.label(COMPARISONS)
        finally:
            await judge.close()
    lengths = [(len(c.response_a), len(c.response_b)) for c in COMPARISONS]
    assert [v.probability_a for v in verdicts] == pytest.approx([sigmoid((a - b) / 4) for a, b in lengths])
    assert [v.choice for v in verdicts] == [Choice.A, Choice.B, Choice.TIE]
    rows = preference_rows(COMPARISONS, verdicts)
    assert [(r["chosen"], r["chosen_probability"]) for r in rows] == [
        (" happy and warm.", pytest.approx(sigmoid(11 / 4))),
        (" lovely, lovely.", pytest.approx(sigmoid(10 / 4))),
    ]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert [g.targets for g in read_groups(data)] == [[pytest.approx(r["chosen_probability"])] for r in rows]


# -- LLM judge -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def label_logprob(model, tokenizer, question: str, labels: tuple[str, str]) -> tuple[float, float]:
    """log P(label | question) for both labels, from one plain forward each, over the tokens where the two
    tokenized texts part."""
    ids = [tokenizer(question + label)["input_ids"] for label in labels]
    common = 0
    while ids[0][common] == ids[1][common]:
        common += 1
    totals = []
    for sequence in ids:
        logprobs = torch.log_softmax(model(torch.tensor([sequence])).logits[0].double(), dim=-1)
        totals.append(sum(float(logprobs[t - 1, sequence[t]]) for t in range(common, len(sequence))))
    return totals[0], totals[1]


@pytest.mark.parametrize(
    ("template", "labels"),
    [(None, (" A", " B")), (SHORT_TEMPLATE, ("1", "2"))],
    ids=["default-template", "digit-labels"],
)
async def test_llm_judge_probability_is_the_formula_of_the_models_logprobs(
    policy_service, tiny_policy_dir, template, labels
):
    _, url = policy_service
    settings = {"tgi": {"url": url}, "first_label": labels[0], "second_label": labels[1]}
    config = LLMJudgeConfig.model_validate(settings | ({"template": template} if template else {}))
    judge = LLMJudge(config)
    assert isinstance(judge, Labeler)
    judgements = await judge.judge(COMPARISONS)
    verdicts = await judge.label(COMPARISONS)
    swapped_verdicts = await judge.label(swapped(COMPARISONS))

    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_dir)
    for comparison, judgement, verdict, other in zip(COMPARISONS, judgements, verdicts, swapped_verdicts, strict=True):
        first_ab, first_ba = (
            sigmoid(first - second)
            for first, second in (
                label_logprob(model, tokenizer, question, labels) for question in judge.questions(comparison)
            )
        )
        # The label log-probs themselves (a few nats each: a sharper check than the probabilities near 0.5).
        question, _ = judge.questions(comparison)
        expected = label_logprob(model, tokenizer, question, labels)
        assert await judge.label_logprobs(question, "q") == pytest.approx(expected, abs=1e-4)
        assert judgement.first_ab == pytest.approx(first_ab, abs=1e-5)
        assert judgement.first_ba == pytest.approx(first_ba, abs=1e-5)
        assert judgement.probability_a == pytest.approx((first_ab + (1 - first_ba)) / 2, abs=1e-5)
        assert verdict.probability_a == pytest.approx(judgement.probability_a, abs=1e-6)
        # Both orders are asked: swapping A and B gives 1 - P, and the verdict follows P.
        assert other.probability_a == pytest.approx(1 - verdict.probability_a, abs=1e-6)
        assert verdict.choice is choice_for(verdict.probability_a)
        assert verdict.labeler == "llm-judge" and "p_first(A,B)=" in verdict.comment
    # Identical responses: the same question in both orders, P = 0.5, a tie.
    assert abs(verdicts[2].probability_a - 0.5) <= TIE_EPSILON and verdicts[2].choice is Choice.TIE
    decided = [v for v in verdicts if v.choice is not Choice.TIE]
    assert all((v.choice is Choice.A) == (v.probability_a > 0.5) for v in decided)


async def test_constitutional_judge_draws_principles_by_seed(policy_service):
    _, url = policy_service
    config = ConstitutionalJudgeConfig.model_validate({"tgi": {"url": url}, "seed": 3})
    judge, again = ConstitutionalJudge(config), ConstitutionalJudge(config)
    comparisons = COMPARISONS[:2] * 3
    first = await judge.judge(comparisons)
    repeat = await again.label(comparisons)
    swapped_run = await ConstitutionalJudge(config).label(swapped(comparisons))
    names = {p.name for p in load_principles(None)}
    assert all(j.principle in names for j in first)
    assert [f"principle={j.principle} " for j in first] == [v.comment.split("p_first")[0] for v in repeat]
    for j, v, s in zip(first, repeat, swapped_run, strict=True):
        assert v.probability_a == pytest.approx(j.probability_a, abs=1e-6)
        assert s.probability_a == pytest.approx(1 - j.probability_a, abs=1e-6)
        assert v.labeler == "constitutional-judge"
    # The question carries the principle's preference question.
    principle = load_principles(None)[0]
    question, _ = judge.questions(comparisons[0], principle=principle.preference_question)
    assert principle.preference_question in question and comparisons[0].response_a in question


def test_judge_configs_refuse_what_cannot_work():
    with pytest.raises(ValueError, match=r"must contain \{second\}"):
        LLMJudgeConfig.model_validate({"tgi": {"url": "http://x"}, "template": "{prompt} {first}"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \{principle\}"):
        LLMJudgeConfig.model_validate({"tgi": {"url": "http://x"}, "template": "{prompt}{first}{second}{principle}"})
    # An empty address is a valid config (`rlhf iterate` fills it when it starts the judge's service), but a judge
    # cannot be built without one.
    with pytest.raises(ConfigError, match=r"tgi\.url is required"):
        LLMJudge(LLMJudgeConfig.model_validate({"tgi": {"url": ""}}))
    with pytest.raises(ConfigError, match="address is required"):
        RewardJudge(RewardJudgeConfig())
    with pytest.raises(ValueError, match="neither may begin with the other"):
        LLMJudgeConfig.model_validate({"tgi": {"url": "http://x"}, "first_label": "1", "second_label": "10"})
    with pytest.raises(ValueError, match=r"must contain \{principle\}"):
        ConstitutionalJudgeConfig.model_validate({"tgi": {"url": "http://x"}, "template": "{prompt}{first}{second}"})
    with pytest.raises(ValueError, match="llm: this section is required"):
        JudgeConfig.model_validate({"kind": "llm", "reward": {"address": "x:1"}})
    with pytest.raises(ValueError, match="temperature"):
        RewardJudgeConfig.model_validate({"address": "x:1", "temperature": 0})
    assert [choice_for(p) for p in (0.5, 0.5 + TIE_EPSILON / 2, 0.6, 0.4)] == [
        Choice.TIE,
        Choice.TIE,
        Choice.A,
        Choice.B,
    ]


# -- Constitutional AI -----------------------------------------------------------------------------------------------

PROMPTS = ["the cat is", "my friend was", "the food was", "we are", "the trip was"]


def cai_config(address: str, **extra) -> ConstitutionalConfig:
    return ConstitutionalConfig.model_validate(
        {"generation": [address], "max_new_tokens": 8, "seed": 5, "batch_size": 2} | extra
    )


async def test_constitutional_ai_pairs_each_revision_with_the_original(policy_service):
    address, _ = policy_service
    config = cai_config(address)
    cai = ConstitutionalAI(config)
    try:
        result = await cai.run(PROMPTS)
        again = await cai.run(PROMPTS)
    finally:
        await cai.close()
    counts = result.counts
    assert counts.prompts == 5 and counts.pairs + counts.skipped_empty + counts.skipped_identical == 5
    assert counts.pairs == len(result.preference_rows) == len(result.sft_rows) >= 1
    kept = [s for s in result.samples if s.outcome is Outcome.KEPT]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in result.preference_rows] == [
        (s.prompt, s.revision, s.response) for s in kept
    ]
    assert all(r["chosen"].strip() and r["chosen"].strip() != r["rejected"].strip() for r in result.preference_rows)
    assert result.sft_rows == [{"prompt": s.prompt, "completion": s.revision} for s in kept]
    # Deterministic for a seed: the same principles, responses, critiques and revisions.
    assert again.samples == result.samples and again.preference_rows == result.preference_rows
    assert [s.principle for s in result.samples] == [p.name for p in cai.choose_principles(5)]

    # Each stage is the generation service's own answer: asked directly with the documented seeds, the same texts.
    generation = GrpcGeneration(PeersConfig(generation=[address]), RpcConfig())
    try:

        async def ask(inputs: list[str], stage: int) -> list[str]:
            texts = []
            for start in range(0, len(inputs), 2):
                params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5 + stage * 5 + start)
                texts += (await generation.generate(inputs[start : start + 2], params)).texts
            return texts

        assert await ask(PROMPTS, 0) == [s.response for s in result.samples]
        principles = {p.name: p for p in load_principles(None)}
        revision_inputs = [
            config.revision_template.format(
                prompt=s.prompt,
                response=s.response,
                critique_request=principles[s.principle].critique_request,
                critique=s.critique,
                revision_request=principles[s.principle].revision_request,
            )
            for s in result.samples
        ]
        assert [cut(t, config.stop) for t in await ask(revision_inputs, 2)] == [s.revision for s in result.samples]
    finally:
        await generation.close()

    other = ConstitutionalAI(cai_config(address, seed=6))
    try:
        assert (await other.run(PROMPTS)).samples != result.samples
    finally:
        await other.close()


async def test_constitutional_job_writes_pairs_and_sft_rows_the_training_jobs_read(policy_service, tmp_path):
    """``rlhf constitutional``: a prompts file in, preferences.jsonl (the reward job reads it) and sft.jsonl out."""
    address, _ = policy_service
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    job = ConstitutionalJobConfig.model_validate(
        {
            "prompts": str(prompts),
            "output_dir": str(tmp_path / "out"),
            "constitutional": {"generation": [address], "max_new_tokens": 8, "seed": 5, "batch_size": 2},
        }
    )
    counts = await asyncio.to_thread(run_constitutional_job, job)
    out = tmp_path / "out"
    preferences = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    samples = (out / "samples.jsonl").read_text().splitlines()
    assert counts["prompts"] == len(samples) == 5 and counts["pairs"] == len(preferences) == len(sft) >= 1
    assert sum(len(g.pairs) for g in read_groups(out / "preferences.jsonl")) == counts["pairs"]
    assert [r["completion"] for r in sft] == [r["chosen"] for r in preferences]
    prompts.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(DataError, match=r"prompts\.jsonl:1"):
        await asyncio.to_thread(run_constitutional_job, job)


async def test_constitutional_ai_with_chat_messages(tmp_path_factory):
    """A chat model: the turns go as conversations (rendered by the generation service's chat template), and the
    SFT rows are conversations the SFT job reads."""
    chat_dir = build_policy(tmp_path_factory.mktemp("cai-chat-policy"), tied=True, chat_template=CHAT_TEMPLATE)
    async with generation_service(chat_dir) as (address, _):
        cai = ConstitutionalAI(cai_config(address, prompt_format="messages", principles=str(DEFAULT_PRINCIPLES)))
        try:
            result = await cai.run(PROMPTS[:3])
        finally:
            await cai.close()
        # The first turn went as a conversation: asked directly as one, the same responses.
        generation = GrpcGeneration(PeersConfig(generation=[address]), RpcConfig())
        try:
            direct = []
            for start in (0, 2):
                conversations = [[{"role": "user", "content": p}] for p in PROMPTS[start : min(start + 2, 3)]]
                params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5 + start)
                direct += (await generation.generate(conversations, params)).texts
        finally:
            await generation.close()
    assert [t.strip() for t in direct] == [s.response for s in result.samples]
    assert result.counts.prompts == 3
    for sample in result.samples:
        for text in (sample.response, sample.critique, sample.revision):
            assert text == text.strip()
    kept = [s for s in result.samples if s.outcome is Outcome.KEPT]
    assert result.sft_rows == [
        {"messages": [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.revision}]}
        for s in kept
    ]


def test_collect_skips_empty_and_unchanged_revisions():
    samples = [
        CritiqueRevision("p", "honest", " it is red.", "too sure", " it may be red."),
        CritiqueRevision("q", "honest", " blue", "fine", "  \n"),
        CritiqueRevision("r", "helpful", " green.", "fine", " green. \n"),
    ]
    result = collect(samples, PromptFormat.TEXT)
    assert [s.outcome for s in result.samples] == [Outcome.KEPT, Outcome.EMPTY, Outcome.IDENTICAL]
    assert (result.counts.pairs, result.counts.skipped_empty, result.counts.skipped_identical) == (1, 1, 1)
    assert result.preference_rows == [{"prompt": "p", "chosen": " it may be red.", "rejected": " it is red."}]
    assert result.sft_rows == [{"prompt": "p", "completion": " it may be red."}]
    assert cut(" fine.\nRevision request: more", ["\nRevision request:"]) == " fine."


PRINCIPLE = "- name: x\n  critique_request: c\n  revision_request: r\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "does not exist"),
        ("- name: x\n  revision_request: r\n", "item 0.critique_request: Field required"),
        (PRINCIPLE + "- name: y\n  critique_request: c\n  revision_request: r\n  colour: red\n", "item 1.colour"),
        (PRINCIPLE + PRINCIPLE, "names must be unique, ['x']"),
        ("name: x\n", "non-empty list"),
        ("[]", "non-empty list"),
        ("- name: [x\n", "not valid YAML"),
    ],
    ids=["missing-file", "missing-field", "unknown-field", "duplicate-name", "not-a-list", "empty", "bad-yaml"],
)
def test_principles_file_errors_name_the_file_and_item(tmp_path, text, message):
    path = tmp_path / "principles.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)) as caught:
        load_principles(path)
    assert message in str(caught.value)
    with pytest.raises(ConfigError, match=str(path)):
        ConstitutionalAI(ConstitutionalConfig(generation=["127.0.0.1:1"], principles=str(path)))


def test_default_principles_and_templates():
    principles = load_principles(None)
    assert len(principles) >= 4 and all(p.preference_question for p in principles)
    with pytest.raises(ValueError, match=r"must contain \{critique\}"):
        ConstitutionalConfig(revision_template="{prompt}{response}{critique_request}{revision_request}")
    with pytest.raises(ConfigError, match="generation"):
        ConstitutionalAI(ConstitutionalConfig())
