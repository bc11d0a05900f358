"""Constitutional AI's supervised stage (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback",
section 3): the model answers a prompt, critiques its own answer against a principle, then revises it.

For each prompt: ``response`` from the generation service's ``Generate``, a ``principle`` drawn with a seeded random
generator from a YAML list (``principles.yaml`` beside this file by default), a ``critique`` (the response followed
by the principle's critique request), and a ``revision`` (the critique followed by its revision request). Each
revision that says something new becomes

* a preference row ``{"prompt", "chosen": revision, "rejected": response}`` (the revision preferred to the original,
  for the reward-model job or DPO), and
* an SFT row: ``{"prompt", "completion": revision}`` for text prompts, ``{"messages": [user, assistant]}`` in the
  ``messages`` format (what the SFT job reads for a chat model).

A revision that is empty, or the same text as the original (both compared with surrounding whitespace stripped), is
skipped and counted. Critiques and revisions are cut at the first of ``stop`` (the gRPC Generate has no stop
sequences, and a base model runs on into the next "Critique request:" of its own making).

Two prompt formats (``prompt_format``): ``text`` builds the critique and revision inputs from plain-text templates
(for base models); ``messages`` sends conversations that the generation service renders with the policy's chat
template (``GenerateRequest.conversations``): user prompt, assistant response, user critique request, assistant
critique, user revision request.

Deterministic for a seed: the same prompts, principles file, weights and replicas give the same rows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import random
import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import Field, TypeAdapter, ValidationError, field_validator

from services.orchestrator.clients import GenerationClient, GrpcGeneration
from services.orchestrator.config import PeersConfig, RpcConfig
from shared.auth import AuthConfig, ClientAuth
from shared.config import ConfigError, StrictModel
from shared.training import DataError, read_rows, require_text
from shared.types import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_PRINCIPLES = Path(__file__).with_name("principles.yaml")

DEFAULT_CRITIQUE_TEMPLATE = "{prompt}{response}\n\nCritique request: {critique_request}\nCritique:"
DEFAULT_REVISION_TEMPLATE = (
    "{prompt}{response}\n\nCritique request: {critique_request}\nCritique: {critique}\n\n"
    "Revision request: {revision_request}\nRevision:"
)
DEFAULT_STOP = ["\nCritique request:", "\nCritique:", "\nRevision request:", "\nRevision:"]


# -- principles ------------------------------------------------------------------------------------------------------


class Principle(StrictModel):
    name: str = Field(min_length=1, description="a short identifier, unique in the file")
    critique_request: str = Field(min_length=1, description="what the critique looks for in a response")
    revision_request: str = Field(min_length=1, description="how the revision rewrites the response")
    preference_question: str = Field(
        "", description="what the constitutional judge asks when it compares two responses (optional)"
    )


def load_principles(path: Path | str | None = None) -> list[Principle]:
    """The principles of a YAML list (``principles.yaml`` beside this module when ``path`` is None or empty).

    Raises ``ConfigError`` naming the file and, for a bad item, its index and field: a missing file, YAML that does
    not parse, not a non-empty list, an item without a field or with an unknown one, two items with one name.
    """
    path = Path(path) if path else DEFAULT_PRINCIPLES
    if not path.is_file():
        raise ConfigError(f"principles file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"principles file {path}: not valid YAML: {exc}") from None
    if not isinstance(loaded, list) or not loaded:
        raise ConfigError(f"principles file {path}: must be a non-empty list of {{name, critique_request, ...}}")
    try:
        principles = TypeAdapter(list[Principle]).validate_python(loaded)
    except ValidationError as exc:
        problems = "; ".join(
            f"item {err['loc'][0]}" + "".join(f".{part}" for part in err["loc"][1:]) + f": {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"principles file {path}: {problems}") from None
    names = [p.name for p in principles]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"principles file {path}: names must be unique, {twice} appear more than once")
    return principles


def check_template(template: str, required: set[str], allowed: set[str] | None = None) -> str:
    """``template`` if it is a ``str.format`` template naming every field of ``required`` and nothing outside
    ``allowed`` (default: ``required``); ValueError naming what is missing or unknown otherwise."""
    allowed = required if allowed is None else allowed
    try:
        named = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"not a format template ({exc}); write a literal brace as {{{{ or }}}}") from None
    if missing := required - named:
        raise ValueError(f"must contain {', '.join('{' + m + '}' for m in sorted(missing))}")
    if unknown := named - allowed:
        raise ValueError(
            f"unknown field(s) {', '.join('{' + u + '}' for u in sorted(unknown))}; the fields are "
            f"{', '.join('{' + a + '}' for a in sorted(allowed))} (a literal brace is written {{{{ or }}}})"
        )
    return template


# -- config ----------------------------------------------------------------------------------------------------------


class PromptFormat(enum.StrEnum):
    TEXT = "text"  # plain-text templates (base models): the prompt, the response, then the requests as text
    MESSAGES = "messages"  # conversations rendered with the policy's chat template by the generation service


CRITIQUE_FIELDS = {"prompt", "response", "critique_request"}
REVISION_FIELDS = CRITIQUE_FIELDS | {"critique", "revision_request"}


class ConstitutionalConfig(StrictModel):
    generation: list[str] = Field(
        default_factory=list, description="host:port of each generation replica (the model that answers and revises)"
    )
    rpc: RpcConfig = Field(default_factory=RpcConfig, description="deadlines and retries of the Generate calls")
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="gRPC message limit on the channel")
    principles: str = Field("", description="YAML list of principles; empty = services/labeling/principles.yaml")
    seed: int = Field(0, description="draws each prompt's principle, and seeds the sampling")
    prompt_format: PromptFormat = Field(PromptFormat.TEXT, description="text templates, or chat messages")
    max_new_tokens: int = Field(64, ge=1, description="longest response, critique and revision, in tokens")
    temperature: float = Field(1.0, ge=0, description="sampling temperature of all three (0 = greedy)")
    batch_size: int = Field(64, ge=1, description="prompts per Generate request")
    critique_template: str = Field(
        DEFAULT_CRITIQUE_TEMPLATE,
        description="text format: the critique's input, with {prompt}, {response}, {critique_request}",
    )
    revision_template: str = Field(
        DEFAULT_REVISION_TEMPLATE,
        description="text format: the revision's input, with {prompt}, {response}, {critique_request}, {critique}, "
        "{revision_request}",
    )
    stop: list[str] = Field(
        default_factory=lambda: list(DEFAULT_STOP),
        description="a critique or revision is cut at the first of these (the model running on past its answer)",
    )

    @field_validator("generation", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("critique_template")
    @classmethod
    def _critique_fields(cls, template: str) -> str:
        return check_template(template, CRITIQUE_FIELDS)

    @field_validator("revision_template")
    @classmethod
    def _revision_fields(cls, template: str) -> str:
        return check_template(template, REVISION_FIELDS)

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("an empty stop string would cut every text to nothing")
        return stop


# -- the run ---------------------------------------------------------------------------------------------------------


class Outcome(enum.StrEnum):
    KEPT = "kept"  # the revision becomes a preference row and an SFT row
    EMPTY = "empty"  # skipped: the revision is empty (or whitespace)
    IDENTICAL = "identical"  # skipped: the revision is the original response again


@dataclass
class CritiqueRevision:
    """One prompt's trace through the critique and revision."""

    prompt: str
    principle: str  # its name
    response: str  # the original answer
    critique: str
    revision: str
    outcome: Outcome = Outcome.KEPT


@dataclass
class Counts:
    prompts: int = 0
    pairs: int = 0  # (revision, original) preference rows, one per kept revision; as many SFT rows
    skipped_empty: int = 0
    skipped_identical: int = 0


@dataclass
class ConstitutionalResult:
    samples: list[CritiqueRevision] = field(default_factory=list)  # one per prompt, in order
    preference_rows: list[dict] = field(default_factory=list)  # {"prompt", "chosen": revision, "rejected": original}
    sft_rows: list[dict] = field(default_factory=list)  # {"prompt", "completion"} or {"messages"} (messages format)
    counts: Counts = field(default_factory=Counts)


def cut(text: str, stop: list[str]) -> str:
    """``text`` up to the first occurrence of any of ``stop``, trailing whitespace removed."""
    end = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:end].rstrip()


def collect(samples: list[CritiqueRevision], prompt_format: PromptFormat) -> ConstitutionalResult:
    """Marks each sample kept or skipped and builds the rows: a (revision, original) preference row and an SFT row
    per kept sample, in order."""
    result = ConstitutionalResult(samples=samples, counts=Counts(prompts=len(samples)))
    for sample in samples:
        revision = sample.revision.strip()
        if not revision:
            sample.outcome = Outcome.EMPTY
            result.counts.skipped_empty += 1
            continue
        if revision == sample.response.strip():
            sample.outcome = Outcome.IDENTICAL
            result.counts.skipped_identical += 1
            continue
        sample.outcome = Outcome.KEPT
        result.counts.pairs += 1
        result.preference_rows.append({"prompt": sample.prompt, "chosen": sample.revision, "rejected": sample.response})
        if prompt_format is PromptFormat.MESSAGES:
            turns = [{"role": "user", "content": sample.prompt}, {"role": "assistant", "content": sample.revision}]
            result.sft_rows.append({"messages": turns})
        else:
            result.sft_rows.append({"prompt": sample.prompt, "completion": sample.revision})
    return result


class ConstitutionalAI:
    """Critique -> revision through a generation service (gRPC ``Generate``; any ``GenerationClient`` may be passed
    instead, e.g. one on a TGI server for the text format). ``run(prompts)`` returns the rows and the counts."""

    def __init__(
        self, config: ConstitutionalConfig, auth: ClientAuth | None = None, generation: GenerationClient | None = None
    ):
        self.config = config
        self.principles = load_principles(config.principles)
        self.owns_generation = generation is None
        if generation is None:
            if not config.generation:
                raise ConfigError("generation: at least one generation replica address is required")
            peers = PeersConfig(generation=config.generation, max_message_bytes=config.max_message_bytes)
            generation = GrpcGeneration(peers, config.rpc, auth)
        self.generation = generation

    def choose_principles(self, n: int) -> list[Principle]:
        """The principle of each of ``n`` prompts: a fresh seeded draw per run, so runs repeat."""
        rng = random.Random(self.config.seed)
        return [rng.choice(self.principles) for _ in range(n)]

    async def _generate(self, inputs: list, stage: int) -> list[str]:
        """One text per input, in batches of ``batch_size``; stage k's batch at ``start`` is seeded
        seed + k * len(inputs) + start (the client adds each prompt's offset in the batch)."""
        config = self.config
        texts: list[str] = []
        for start in range(0, len(inputs), config.batch_size):
            params = SamplingParams(
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                seed=config.seed + stage * len(inputs) + start,
            )
            rollouts = await self.generation.generate(inputs[start : start + config.batch_size], params)
            texts.extend(rollouts.texts)
        return texts

    def _critique_input(self, prompt: str, response: str, principle: Principle) -> str | list[dict]:
        if self.config.prompt_format is PromptFormat.MESSAGES:
            return [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
                {"role": "user", "content": principle.critique_request},
            ]
        return self.config.critique_template.format(
            prompt=prompt, response=response, critique_request=principle.critique_request
        )

    def _revision_input(self, prompt: str, response: str, principle: Principle, critique: str) -> str | list[dict]:
        if self.config.prompt_format is PromptFormat.MESSAGES:
            return [
                *self._critique_input(prompt, response, principle),
                {"role": "assistant", "content": critique},
                {"role": "user", "content": principle.revision_request},
            ]
        return self.config.revision_template.format(
            prompt=prompt,
            response=response,
            critique_request=principle.critique_request,
            critique=critique,
            revision_request=principle.revision_request,
        )

    async def run(self, prompts: list[str]) -> ConstitutionalResult:
        """Answers, critiques and revises every prompt (three batched passes); returns the trace, the rows and the
        counts. Chat turns (the messages format) are stripped of surrounding whitespace; in the text format the
        response is kept as generated and the revision keeps its leading whitespace (continuations of a prompt
        start with one)."""
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"prompts[{i}]: must be a non-empty string")
        if not prompts:
            return ConstitutionalResult()
        config = self.config
        messages = config.prompt_format is PromptFormat.MESSAGES
        principles = self.choose_principles(len(prompts))

        first = [[{"role": "user", "content": p}] for p in prompts] if messages else list(prompts)
        responses = [text.strip() if messages else text for text in await self._generate(first, 0)]
        inputs = [self._critique_input(*args) for args in zip(prompts, responses, principles, strict=True)]
        critiques = [cut(text, config.stop).strip() for text in await self._generate(inputs, 1)]
        inputs = [self._revision_input(*args) for args in zip(prompts, responses, principles, critiques, strict=True)]
        revisions = [cut(text, config.stop) for text in await self._generate(inputs, 2)]
        revisions = [text.strip() for text in revisions] if messages else revisions

        samples = [
            CritiqueRevision(p, c.name, r, critique, revision)
            for p, c, r, critique, revision in zip(prompts, principles, responses, critiques, revisions, strict=True)
        ]
        result = collect(samples, config.prompt_format)
        log.info(
            "constitutional AI: %d prompts, %d (revision, original) pairs, %d empty and %d unchanged revisions skipped",
            result.counts.prompts,
            result.counts.pairs,
            result.counts.skipped_empty,
            result.counts.skipped_identical,
        )
        return result

    async def close(self) -> None:
        if self.owns_generation:
            await self.generation.close()


class ConstitutionalJobConfig(StrictModel):
    """``rlhf constitutional``: critique and revise a prompts file's responses through a running generation
    service; writes the (revision over original) preference pairs and the revisions as SFT rows."""

    prompts: str = Field(min_length=1, description="JSONL file of {'prompt': ...} rows")
    output_dir: str = Field(min_length=1, description="gets preferences.jsonl, sft.jsonl and samples.jsonl")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="token and TLS for the generation service")
    constitutional: ConstitutionalConfig


def run_constitutional_job(config: ConstitutionalJobConfig) -> dict:
    """Runs the job; returns the counts (prompts, pairs, skipped)."""
    rows = read_rows(config.prompts)
    prompts = [require_text(config.prompts, index, row, "prompt") for index, row in enumerate(rows)]
    if not prompts:
        raise DataError(f"{config.prompts}: no rows")

    async def run() -> ConstitutionalResult:
        cai = ConstitutionalAI(config.constitutional, ClientAuth.load(config.auth))
        try:
            return await cai.run(prompts)
        finally:
            await cai.close()

    result = asyncio.run(run())
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in (
        ("preferences.jsonl", result.preference_rows),
        ("sft.jsonl", result.sft_rows),
        ("samples.jsonl", [dataclasses.asdict(sample) for sample in result.samples]),
    ):
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in content))
    return dataclasses.asdict(result.counts)
