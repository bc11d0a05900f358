"""The one path from a scoring request to scores, for every edge (gRPC ``Score``, REST ``/v1/score`` and the
compatibility routes): the request limits, chat-template rendering, then the batching queue that merges concurrent
requests, whichever edge they came from, into one model call."""

from __future__ import annotations

import time
from dataclasses import dataclass

from services.reward.backend import RewardBackend
from services.reward.config import RewardConfig
from shared import metrics
from shared.chat import Conversation
from shared.convert import conversations_from_pb
from shared.errors import InvalidInput, TooLarge
from shared.server import BackendHolder
from shared.validation import check_batch_size
from shared.worker import BatchingQueue, ModelWorker


@dataclass(frozen=True)
class ScoreQuery:
    """Pairs to score: text prompts, or conversations (rendered with the reward model's chat template), each with
    its response. The field names are the caller's, so that an error names what the caller sent."""

    responses: list[str]
    prompts: list[str] | None = None  # exactly one of prompts and conversations
    conversations: list[Conversation] | None = None  # checked turns (shared.chat.check_conversation)
    prompt_field: str = ""  # default: "conversations" or "prompts"
    response_field: str = "responses"

    @classmethod
    def from_pb(cls, request) -> ScoreQuery:
        """From a ``rlhf.v1.ScoreRequest``."""
        conversations = conversations_from_pb(request.conversations, "conversations") or None
        prompts = list(request.prompts) if request.prompts or conversations is None else None
        return cls(list(request.responses), prompts, conversations)

    @classmethod
    def of_texts(cls, texts: list[str], field: str) -> ScoreQuery:
        """Whole texts (prompt and response already joined, as OpenRLHF and vLLM's /classify send them): scored as
        an empty prompt followed by the text."""
        return cls(texts, [""] * len(texts), prompt_field=field, response_field=field)


@dataclass(frozen=True)
class ScoreResult:
    scores: list[float]  # one per pair, in request order
    tokens: int  # tokens the model read for the request's pairs (0 for a reward function)


def _check_text(text: str, field: str, max_chars: int) -> None:
    if len(text) > max_chars:
        raise TooLarge(field, f"{len(text)} characters exceed the limit of {max_chars} (max_text_chars)")
    try:
        text.encode()
    except UnicodeEncodeError:  # JSON can carry lone surrogates; no tokenizer reads them
        raise InvalidInput(field, "is not valid Unicode text (it holds a lone surrogate)") from None


def checked_pairs(query: ScoreQuery, backend: RewardBackend, config: RewardConfig) -> list[tuple[str, str]]:
    """The (prompt, response) texts the model reads, once the request is within its limits; errors name the
    caller's field (``InvalidInput`` -> INVALID_ARGUMENT / 400, ``TooLarge`` -> RESOURCE_EXHAUSTED / 413)."""
    if (query.prompts is None) == (query.conversations is None):
        raise InvalidInput("conversations", "give exactly one of prompts or conversations")
    prompts = query.prompts if query.prompts is not None else query.conversations
    prompt_field = query.prompt_field or ("prompts" if query.prompts is not None else "conversations")
    check_batch_size(len(prompts), prompt_field, config.max_batch)
    responses = query.responses
    if len(responses) != len(prompts):
        raise InvalidInput(query.response_field, f"has {len(responses)} items but {prompt_field} has {len(prompts)}")
    limit = config.max_text_chars
    pairs = []
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        _check_text(response, f"{query.response_field}[{i}]", limit)
        if isinstance(prompt, str):
            _check_text(prompt, f"{prompt_field}[{i}]", limit)
        else:
            _check_text("".join(m["role"] + m["content"] for m in prompt), f"{prompt_field}[{i}]", limit)
            prompt, response = backend.render(prompt, response, f"{prompt_field}[{i}]")
        if not prompt and not response:
            raise InvalidInput(f"{query.response_field}[{i}]", "is empty and so is its prompt: nothing to score")
        pairs.append((prompt, response))
    return pairs


class RewardScorer(BackendHolder):
    """Scores queries from any edge through one batching queue on the service's one model thread."""

    def __init__(self, config: RewardConfig):
        self.config = config
        batching = config.batching
        self.queue = BatchingQueue(
            ModelWorker("reward"), self._score, batching.max_pairs, max_wait_s=batching.max_wait_ms / 1000
        )
        metrics.register_role("reward")

    def attach(self, backend: RewardBackend) -> None:
        super().attach(backend)
        metrics.track_device_memory("reward", backend.device)

    async def score(self, query: ScoreQuery) -> ScoreResult:
        """Scores ``query``; ``NotReady`` while the model loads."""
        pairs = checked_pairs(query, self.backend, self.config)
        results = await self.queue.submit(pairs)
        return ScoreResult([score for score, _ in results], sum(tokens for _, tokens in results))

    def _score(self, pairs: list[tuple[str, str]]) -> list[tuple[float, int]]:
        """One merged model call on the model thread, timed and recorded: (score, tokens) per pair."""
        start = time.perf_counter()
        scores, tokens = self.backend.score_and_count(pairs)
        metrics.observe_model_call("reward", len(pairs), sum(tokens), time.perf_counter() - start)
        return list(zip(scores, tokens, strict=True))

    async def close(self) -> None:
        await self.queue.close()
