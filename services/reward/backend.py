"""Scorers behind one small interface, on the model thread: ``score(pairs) -> list[float]`` and
``score_and_count(pairs) -> (scores, tokens per pair)``."""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from pydantic import Field, ValidationError
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from services.reward.config import RewardConfig
from shared.chat import Conversation, render_for_scoring
from shared.config import StrictModel
from shared.modeling import ModelConfig, load_sequence_classifier, load_tokenizer

log = logging.getLogger(__name__)

NORMALIZATION_FILE = "reward_normalization.json"


class RewardBackend(Protocol):
    device: torch.device  # where the scoring runs (the CPU for a function)

    def score(self, pairs: list[tuple[str, str]]) -> list[float]: ...
    def score_and_count(self, pairs: list[tuple[str, str]]) -> tuple[list[float], list[int]]: ...
    def render(self, conversation: Conversation, response: str, field: str) -> tuple[str, str]: ...


def load_function(spec: str) -> Callable[[list[str], list[str]], list[float]]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"function {spec!r} must look like 'package.module:function'")
    function = getattr(importlib.import_module(module_name), attr, None)
    if not callable(function):
        raise ValueError(f"function {spec!r}: {module_name} has no callable {attr!r}")
    return function


class FunctionRewardBackend:
    """A Python reward function named in config (rule-based rewards)."""

    def __init__(self, config: RewardConfig):
        self.function = load_function(config.function)
        self.device = torch.device("cpu")

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        scores = [float(s) for s in self.function([p for p, _ in pairs], [r for _, r in pairs])]
        if len(scores) != len(pairs):
            raise RuntimeError(f"reward function returned {len(scores)} scores for {len(pairs)} pairs")
        if not all(math.isfinite(s) for s in scores):
            raise RuntimeError("reward function returned a non-finite score")
        return scores

    def score_and_count(self, pairs: list[tuple[str, str]]) -> tuple[list[float], list[int]]:
        return self.score(pairs), [0] * len(pairs)  # no model reads tokens

    def render(self, conversation: Conversation, response: str, field: str) -> tuple[str, str]:
        """A function reads plain text: the turns' contents, one per line, as its prompt."""
        return render_for_scoring(None, conversation, response, field)


class RewardNormalization(StrictModel):
    """Mean and std of the reward over the training texts, written by the reward job (``NORMALIZATION_FILE``)."""

    mean: float
    std: float = Field(gt=0)
    count: int = Field(ge=1, description="texts the statistics were computed on")

    @classmethod
    def read(cls, model_dir: Path | str) -> RewardNormalization | None:
        """The statistics stored beside a reward model; None when the directory has none."""
        path = Path(model_dir) / NORMALIZATION_FILE
        if not path.is_file():
            return None
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise ValueError(f"{path}: not a valid reward normalization ({exc})") from None


def load_reward_model(config: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A ``num_labels=1`` sequence classifier (a fresh head when ``config.path`` is a causal LM) and its tokenizer,
    with the model's pad id set to the tokenizer's: the score is read at the last non-pad token."""
    tokenizer = load_tokenizer(config, padding_side="right")
    model = load_sequence_classifier(config)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], max_length: int) -> BatchEncoding:
    """``prompt + response`` texts, right-padded and truncated to ``max_length`` tokens."""
    return tokenizer(
        [prompt + response for prompt, response in pairs],
        padding=True,
        padding_side="right",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )


def reward_forward(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], max_length: int
) -> torch.Tensor:
    """(B,) scores of ``prompt + response`` texts (``encode_pairs``).

    The one definition of what a reward model reads: the reward service scores with it and the reward-model job
    trains with it (gradients flow unless the caller disables them).
    """
    return model(**encode_pairs(tokenizer, pairs, max_length).to(model.device)).logits[:, 0]  # (B, 1) -> (B,)


@torch.no_grad()
def score_and_count(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    max_length: int,
    micro_batch_size: int,
) -> tuple[list[float], list[int]]:
    """Raw scores of ``pairs`` in micro-batches of ``micro_batch_size``, and the tokens each pair was read as."""
    scores: list[float] = []
    tokens: list[int] = []
    for start in range(0, len(pairs), micro_batch_size):
        encoded = encode_pairs(tokenizer, pairs[start : start + micro_batch_size], max_length).to(model.device)
        scores.extend(model(**encoded).logits[:, 0].float().cpu().tolist())
        tokens.extend(encoded["attention_mask"].sum(dim=1).tolist())
    return scores, tokens


def score_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    max_length: int,
    micro_batch_size: int,
) -> list[float]:
    """Raw scores of ``pairs`` in micro-batches of ``micro_batch_size``."""
    return score_and_count(model, tokenizer, pairs, max_length, micro_batch_size)[0]


class ModelRewardBackend:
    """``AutoModelForSequenceClassification(num_labels=1)`` on prompt + response text, with its own tokenizer;
    scores centred with the model's ``reward_normalization.json`` when it has one and ``normalize`` is on."""

    def __init__(self, config: RewardConfig):
        self.config = config
        self.model, self.tokenizer = load_reward_model(config.model)
        self.model.eval().requires_grad_(False)
        self.device = self.model.device
        self.normalization = RewardNormalization.read(config.model.path) if config.normalize else None
        if config.normalize and self.normalization is None:
            log.info("%s has no %s: serving raw scores", config.model.path, NORMALIZATION_FILE)
        elif self.normalization is not None:
            log.info(
                "serving normalized scores: (score - %.4g) / %.4g", self.normalization.mean, self.normalization.std
            )

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        return self.score_and_count(pairs)[0]

    def score_and_count(self, pairs: list[tuple[str, str]]) -> tuple[list[float], list[int]]:
        """Served scores (normalized when the model has statistics) and the tokens each pair was read as."""
        config = self.config
        scores, tokens = score_and_count(self.model, self.tokenizer, pairs, config.max_length, config.micro_batch_size)
        if self.normalization is not None:
            mean, std = self.normalization.mean, self.normalization.std
            scores = [(score - mean) / std for score in scores]
        return scores, tokens

    def render(self, conversation: Conversation, response: str, field: str) -> tuple[str, str]:
        """The conversation and its response in the reward model's own chat template (plain text without one)."""
        return render_for_scoring(self.tokenizer, conversation, response, field)


def load_backend(config: RewardConfig) -> RewardBackend:
    return FunctionRewardBackend(config) if config.function else ModelRewardBackend(config)


def warm_up(backend: RewardBackend) -> None:
    backend.score([("warm", " up")])
