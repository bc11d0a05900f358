"""AI feedback (RLAIF): judges that label comparisons through the project's services, behind the ``Labeler``
interface (``services.labeling.labelers``), each giving a soft label ``probability_a`` = P(response A is better).

* ``RewardJudge`` scores both responses with the reward service (gRPC ``Score``) and answers with the
  Bradley-Terry probability ``P(A) = sigmoid((r_A - r_B) / temperature)``.
* ``LLMJudge`` asks a language model, through TGI's REST protocol (a text-generation-inference server, or the
  generation service's ``http_port``), which of two responses is better (Lee et al. 2023, "RLAIF"; Zheng et al.
  2023, "Judging LLM-as-a-judge", on position bias). For each order it reads the log-probs of the two verdict
  labels after the judging prompt and normalises them over the pair:

      p_first(X, Y) = exp(l_1) / (exp(l_1) + exp(l_2)) = sigmoid(l_1 - l_2),

  ``l_k = log P(label_k | question(prompt, first=X, second=Y))``. Asking both orders cancels a preference for a
  position: ``P(A) = (p_first(A, B) + (1 - p_first(B, A))) / 2``, so swapping A and B gives ``1 - P(A)``.
* ``ConstitutionalJudge`` is the LLM judge asking, per comparison, a question from a principle of the constitution
  (``principles.yaml``), drawn with a seeded random generator: Constitutional AI's feedback model (Bai et al. 2022,
  section 4).

The verdict is A when ``P(A) > 0.5``, B when ``P(A) < 0.5``, and a tie (no preference row) when
``|P(A) - 0.5| <= TIE_EPSILON`` (1e-6): identical responses give 0.5 up to rounding (a server that batches the two
orders' requests with different padding may move float32 log-probs in their last digits), which must not pick a
side; a judge that close to 0.5 says nothing either way.

How the label log-probs are read: TGI has no way to score a given continuation other than the prefill details
(``decoder_input_details``: every input token with its log-prob given the ones before), and this project's TGI
routes do not offer ``top_n_tokens``. So each order takes one request per label, ``question + label`` with
``max_new_tokens`` 1, and ``l_k`` is the sum of the log-probs of the tokens where the two requests' token ids part:
that needs no tokenizer here, and stays right when a label merges with the end of the question into one token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import math
import random

from pydantic import Field, field_validator, model_validator

from services.labeling.constitutional import Principle, check_template, load_principles
from services.labeling.labelers import Choice, Comparison, Verdict, sigmoid
from services.orchestrator.clients import GrpcReward, Rollouts
from services.orchestrator.config import PeersConfig, RpcConfig
from shared.auth import ClientAuth
from shared.config import ConfigError, StrictModel
from shared.tgi import TgiConfig, call_tgi, tgi_client

TIE_EPSILON = 1e-6  # |P(A) - 0.5| at most this is a tie (see the module docstring)

DEFAULT_JUDGE_TEMPLATE = (
    "Which response answers the prompt better: more helpful, more honest and less harmful?\n\n"
    "Prompt: {prompt}\n\nResponse A: {first}\n\nResponse B: {second}\n\n"
    "The better response is Response"
)
DEFAULT_CONSTITUTIONAL_TEMPLATE = (
    "Consider a prompt and two responses to it.\n\n"
    "Prompt: {prompt}\n\nResponse A: {first}\n\nResponse B: {second}\n\n"
    "{principle}\nThe answer is Response"
)
JUDGE_FIELDS = {"prompt", "first", "second"}


def choice_for(probability_a: float) -> Choice:
    """A when P(A) > 0.5, B when P(A) < 0.5, a tie within ``TIE_EPSILON`` of 0.5."""
    if abs(probability_a - 0.5) <= TIE_EPSILON:
        return Choice.TIE
    return Choice.A if probability_a > 0.5 else Choice.B


# -- reward judge ----------------------------------------------------------------------------------------------------


class RewardJudgeConfig(StrictModel):
    address: str = Field(
        "", description="host:port of the reward service (empty: the one `rlhf iterate` starts, labeler.judge_service)"
    )
    temperature: float = Field(1.0, gt=0, description="P(A) = sigmoid((r_A - r_B) / temperature)")
    batch_size: int = Field(256, ge=1, description="comparisons per Score request (two scored pairs each)")
    rpc: RpcConfig = Field(default_factory=RpcConfig, description="deadlines and retries of the Score calls")
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="gRPC message limit on the channel")


class RewardJudge:
    """A ``Labeler`` that asks the reward service: ``P(A) = sigmoid((r(x, A) - r(x, B)) / temperature)``; a tie
    when the two scores are equal. The verdict's comment holds both scores."""

    name = "reward-judge"

    def __init__(self, config: RewardJudgeConfig, auth: ClientAuth | None = None):
        self.config = config
        if not config.address:
            raise ConfigError("reward judge: address is required (host:port of a reward service)")
        peers = PeersConfig(reward=config.address, max_message_bytes=config.max_message_bytes)
        self.client = GrpcReward(peers, config.rpc, auth)

    async def scores(self, comparisons: list[Comparison]) -> list[tuple[float, float]]:
        """(r(prompt, A), r(prompt, B)) per comparison, ``batch_size`` comparisons per Score call."""
        out: list[tuple[float, float]] = []
        for start in range(0, len(comparisons), self.config.batch_size):
            batch = comparisons[start : start + self.config.batch_size]
            prompts = [c.prompt for c in batch for _ in range(2)]
            texts = [text for c in batch for text in (c.response_a, c.response_b)]
            # The client reads prompts and texts only; the token fields belong to generated rollouts.
            rollouts = Rollouts(prompts, texts, [0] * len(texts), [""] * len(texts), policy_version=0, tokens=None)
            values = await self.client.score(rollouts)
            out.extend(zip(values[0::2], values[1::2], strict=True))
        return out

    async def label(self, comparisons: list[Comparison]) -> list[Verdict]:
        verdicts = []
        for score_a, score_b in await self.scores(comparisons):
            probability = sigmoid((score_a - score_b) / self.config.temperature)
            verdicts.append(
                Verdict(choice_for(probability), probability, self.name, f"r_a={score_a:.6g} r_b={score_b:.6g}")
            )
        return verdicts

    async def close(self) -> None:
        await self.client.channel.close()


# -- LLM judge -------------------------------------------------------------------------------------------------------


class LLMJudgeConfig(StrictModel):
    tgi: TgiConfig = Field(
        default_factory=TgiConfig,
        description="the TGI server: text-generation-inference, or a generation service's http_port (url empty: the "
        "one `rlhf iterate` starts, labeler.judge_service)",
    )
    template: str = Field(
        DEFAULT_JUDGE_TEMPLATE,
        description="the judging question, with {prompt}, {first}, {second}; the verdict label follows it directly "
        "(for a chat model, write its chat format into the template)",
    )
    first_label: str = Field(" A", min_length=1, description="the verdict that the first response is better")
    second_label: str = Field(" B", min_length=1, description="the verdict that the second response is better")

    @field_validator("template")
    @classmethod
    def _judge_fields(cls, template: str) -> str:
        return check_template(template, JUDGE_FIELDS)

    @model_validator(mode="after")
    def _labels_differ(self):
        first, second = self.first_label, self.second_label
        if first.startswith(second) or second.startswith(first):
            raise ValueError(
                f"first_label {first!r} and second_label {second!r}: neither may begin with the other "
                "(their log-probs are read where their tokens part)"
            )
        return self


@dataclasses.dataclass(frozen=True)
class Judgement:
    """An LLM judge's probabilities for one comparison."""

    first_ab: float  # p_first(A, B): P(the first is better) with A shown first
    first_ba: float  # p_first(B, A): with B shown first
    probability_a: float  # (first_ab + 1 - first_ba) / 2
    principle: str = ""  # the constitutional judge: the name of the principle asked


class LLMJudge:
    """A ``Labeler`` that asks a language model over TGI's REST protocol, both orders, four requests per
    comparison (up to ``tgi.max_concurrent_requests`` in flight). See the module docstring for the formula."""

    name = "llm-judge"

    def __init__(self, config: LLMJudgeConfig, auth: ClientAuth | None = None):
        if not config.tgi.url:
            raise ConfigError("llm judge: tgi.url is required (a TGI server, or a generation service's http_port)")
        self.config = config
        self.client = tgi_client(config.tgi, auth or ClientAuth())
        self.slots = asyncio.Semaphore(config.tgi.max_concurrent_requests)

    def questions(self, comparison: Comparison, **fields: str) -> tuple[str, str]:
        """(the question with A first, with B first); ``fields`` fill the template's other fields."""
        ask = functools.partial(self.config.template.format, prompt=comparison.prompt, **fields)
        a, b = comparison.response_a, comparison.response_b
        return ask(first=a, second=b), ask(first=b, second=a)

    async def label_logprobs(self, question: str, field: str) -> tuple[float, float]:
        """(l_1, l_2): the log-probs of the first and second label after ``question`` (the sum over the tokens
        where ``question + label`` tokenizes differently for the two labels)."""
        config = self.config

        async def prefill(label: str):
            request = self.client.generate(question + label, max_new_tokens=1, decoder_input_details=True)
            async with self.slots:
                reply = await call_tgi(request, config.tgi, field)
            return reply.details.prefill

        first, second = await asyncio.gather(prefill(config.first_label), prefill(config.second_label))
        common = 0
        while common < min(len(first), len(second)) and first[common].id == second[common].id:
            common += 1
        if common == 0 or common in (len(first), len(second)):
            raise ValueError(
                f"{field}: the labels {config.first_label!r} and {config.second_label!r} do not tokenize to distinct "
                "continuations of the question (one's tokens begin the other's, or nothing comes before them)"
            )

        def total(tokens) -> float:
            # A token the model rules out comes back as null (TGI's serialization of a non-finite log-prob).
            return sum(-math.inf if t.logprob is None else t.logprob for t in tokens[common:])

        return total(first), total(second)

    async def first_probability(self, question: str, field: str) -> float:
        """p_first = exp(l_1) / (exp(l_1) + exp(l_2)) = sigmoid(l_1 - l_2)."""
        first, second = await self.label_logprobs(question, field)
        if first == second == -math.inf:
            raise ValueError(f"{field}: the model gives neither verdict label any probability")
        if second == -math.inf:
            return 1.0
        return sigmoid(first - second)

    async def judge_one(self, comparison: Comparison, field: str, **fields: str) -> Judgement:
        ab, ba = self.questions(comparison, **fields)
        first_ab, first_ba = await asyncio.gather(self.first_probability(ab, field), self.first_probability(ba, field))
        return Judgement(first_ab, first_ba, (first_ab + (1.0 - first_ba)) / 2)

    async def judge(self, comparisons: list[Comparison]) -> list[Judgement]:
        """One ``Judgement`` per comparison, in order."""
        return list(await asyncio.gather(*(self.judge_one(c, f"comparisons[{i}]") for i, c in enumerate(comparisons))))

    async def label(self, comparisons: list[Comparison]) -> list[Verdict]:
        verdicts = []
        for j in await self.judge(comparisons):
            comment = f"p_first(A,B)={j.first_ab:.6g} p_first(B,A)={j.first_ba:.6g}"
            comment = f"principle={j.principle} {comment}" if j.principle else comment
            verdicts.append(Verdict(choice_for(j.probability_a), j.probability_a, self.name, comment))
        return verdicts

    async def close(self) -> None:
        """Nothing held between calls (the client opens a session per request)."""


# -- constitutional judge --------------------------------------------------------------------------------------------


class ConstitutionalJudgeConfig(LLMJudgeConfig):
    template: str = Field(
        DEFAULT_CONSTITUTIONAL_TEMPLATE,
        description="the judging question, with {prompt}, {first}, {second} and {principle} (a principle's "
        "preference_question)",
    )
    principles: str = Field("", description="YAML list of principles; empty = services/labeling/principles.yaml")
    seed: int = Field(0, description="draws each comparison's principle")

    @field_validator("template")
    @classmethod
    def _judge_fields(cls, template: str) -> str:
        return check_template(template, JUDGE_FIELDS | {"principle"})


class ConstitutionalJudge(LLMJudge):
    """The LLM judge asking each comparison a principle's ``preference_question``, the principle drawn with a
    seeded generator; successive calls continue one random stream (as ``SimulatedLabeler`` does). Each judgement
    and verdict comment names its principle."""

    name = "constitutional-judge"

    def __init__(self, config: ConstitutionalJudgeConfig, auth: ClientAuth | None = None):
        super().__init__(config, auth)
        self.principles: list[Principle] = load_principles(config.principles)
        if missing := [p.name for p in self.principles if not p.preference_question]:
            raise ValueError(f"principles {missing} have no preference_question, which the judge asks")
        self.rng = random.Random(config.seed)

    async def judge(self, comparisons: list[Comparison]) -> list[Judgement]:
        drawn = [self.rng.choice(self.principles) for _ in comparisons]  # before any await: calls do not interleave

        async def one(i: int, comparison: Comparison, principle: Principle) -> Judgement:
            judgement = await self.judge_one(comparison, f"comparisons[{i}]", principle=principle.preference_question)
            return dataclasses.replace(judgement, principle=principle.name)

        return list(
            await asyncio.gather(*(one(i, c, p) for i, (c, p) in enumerate(zip(comparisons, drawn, strict=True))))
        )


# -- choosing one by config ------------------------------------------------------------------------------------------


class JudgeKind(enum.StrEnum):
    REWARD = "reward"  # RewardJudge: the reward service's scores
    LLM = "llm"  # LLMJudge: a language model's verdict over TGI's protocol
    CONSTITUTIONAL = "constitutional"  # ConstitutionalJudge: the LLM judge asking a principle's question


class JudgeConfig(StrictModel):
    """Which AI judge labels, and its settings: the section named by ``kind`` is required."""

    kind: JudgeKind = Field(description="reward, llm or constitutional")
    reward: RewardJudgeConfig | None = None
    llm: LLMJudgeConfig | None = None
    constitutional: ConstitutionalJudgeConfig | None = None

    @model_validator(mode="after")
    def _section_given(self):
        if getattr(self, self.kind.value) is None:
            raise ValueError(f"{self.kind.value}: this section is required when kind is {self.kind.value}")
        return self


def build_judge(config: JudgeConfig, auth: ClientAuth | None = None) -> RewardJudge | LLMJudge:
    """The judge ``config.kind`` names (a ``Labeler``; ``await judge.close()`` when done)."""
    if config.kind is JudgeKind.REWARD:
        return RewardJudge(config.reward, auth)
    if config.kind is JudgeKind.LLM:
        return LLMJudge(config.llm, auth)
    return ConstitutionalJudge(config.constitutional, auth)
