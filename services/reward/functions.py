"""Rule-based rewards, usable as ``function: services.reward.functions:NAME`` in the reward config.

Each takes the batch of prompts and responses (text) and returns one float per pair.
"""

from __future__ import annotations

import re

from shared.tiny_models import NEGATIVE_WORDS, POSITIVE_WORDS

_WORD = re.compile(r"[a-z]+")
_POSITIVE = frozenset(POSITIVE_WORDS)
_NEGATIVE = frozenset(NEGATIVE_WORDS)


def positive_word_share(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of the response's words that are positive minus the share that are negative, in [-1, 1].

    0 for a response with no words. Dense enough that a tiny random policy finds the gradient quickly.
    """
    scores = []
    for response in responses:
        words = _WORD.findall(response.lower())
        if not words:
            scores.append(0.0)
            continue
        positive = sum(w in _POSITIVE for w in words)
        negative = sum(w in _NEGATIVE for w in words)
        scores.append((positive - negative) / len(words))
    return scores


def response_length(prompts: list[str], responses: list[str]) -> list[float]:
    """Number of characters of the response (a reward that is trivially hackable; useful in tests)."""
    return [float(len(r)) for r in responses]
