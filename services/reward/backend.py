"""Scorers behind one small interface: ``score(pairs) -> list[float]`` on the model thread."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Protocol

import torch

from services.reward.config import RewardConfig
from shared.errors import InvalidInput
from shared.modeling import load_sequence_classifier, load_tokenizer
from shared.validation import check_batch_size


class RewardBackend(Protocol):
    def score(self, pairs: list[tuple[str, str]]) -> list[float]: ...


def validate_pairs(prompts: list[str], responses: list[str], max_batch: int) -> None:
    check_batch_size(len(prompts), "prompts", max_batch)
    if len(responses) != len(prompts):
        raise InvalidInput("responses", f"has {len(responses)} items but prompts has {len(prompts)}")


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

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        scores = [float(s) for s in self.function([p for p, _ in pairs], [r for _, r in pairs])]
        if len(scores) != len(pairs):
            raise RuntimeError(f"reward function returned {len(scores)} scores for {len(pairs)} pairs")
        if not all(math.isfinite(s) for s in scores):
            raise RuntimeError("reward function returned a non-finite score")
        return scores


class ModelRewardBackend:
    """``AutoModelForSequenceClassification(num_labels=1)`` on prompt + response text, with its own tokenizer."""

    def __init__(self, config: RewardConfig):
        self.config = config
        self.tokenizer = load_tokenizer(config.model, padding_side="right")
        self.model = load_sequence_classifier(config.model).eval()
        self.model.requires_grad_(False)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = next(self.model.parameters()).device

    @torch.no_grad()
    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        scores: list[float] = []
        size = self.config.micro_batch_size
        for start in range(0, len(pairs), size):
            texts = [prompt + response for prompt, response in pairs[start : start + size]]
            encoded = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
            ).to(self.device)
            logits = self.model(**encoded).logits  # (B, 1)
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores


def load_backend(config: RewardConfig) -> RewardBackend:
    return FunctionRewardBackend(config) if config.function else ModelRewardBackend(config)


def warm_up(backend: RewardBackend) -> None:
    backend.score([("warm", " up")])
