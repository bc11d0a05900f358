"""The built-in task: continue a short sentence opener so that a hidden gold reward is high.

The gold reward stands in for what people want, and is only ever seen through noisy preferences (the simulated
labeler) or in the final evaluation:

    gold(prompt, response) = min(#distinct positive words, 2) - #negative words
                             - 0.5 * |#words - 4| - 0.5 * #repeated words

so the best continuations are natural, about four words long, positive and not repetitive ("happy and warm in the
park."). A proxy reward model learns the sentiment part easily from preferences over SFT samples; optimising it
without a KL penalty can find repetitive or oddly long texts it scores highly while the gold reward falls behind.
"""

from __future__ import annotations

import random
import re

from shared.tiny_models import NEGATIVE_WORDS, POSITIVE_WORDS, corpus

_WORD = re.compile(r"[a-z]+")
_POSITIVE = frozenset(POSITIVE_WORDS)
_NEGATIVE = frozenset(NEGATIVE_WORDS)
TARGET_WORDS = 4


def gold_reward(prompt: str, response: str) -> float:
    words = _WORD.findall(response.lower())
    positive = len({w for w in words if w in _POSITIVE})
    negative = sum(w in _NEGATIVE for w in words)
    repeated = len(words) - len(set(words))
    return min(positive, 2) - negative - 0.5 * abs(len(words) - TARGET_WORDS) - 0.5 * repeated


def gold_rewards(prompts: list[str], responses: list[str]) -> list[float]:
    """The gold reward in the reward service's function form (``services.pipeline.task:gold_rewards``)."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]


def _split_sentence(sentence: str) -> tuple[str, str]:
    """Cuts right before the first sentiment word: the continuation decides whether the sentence is positive."""
    words = sentence.split(" ")
    cut = next(i for i, w in enumerate(words) if w.strip(".") in _POSITIVE | _NEGATIVE)
    return " ".join(words[:cut]), " " + " ".join(words[cut:])


def demonstrations(count: int, seed: int) -> list[dict]:
    """SFT rows ``{"prompt", "completion"}``: corpus sentences cut after their first few words.

    The corpus mixes positive and negative sentences evenly, so the SFT model writes fluent text of either
    sentiment: the preferences and RL are what move it.
    """
    return [dict(zip(("prompt", "completion"), _split_sentence(s), strict=True)) for s in corpus(count, seed)]


def prompt_pool(seed: int) -> list[str]:
    """Every distinct opener the corpus can start with (its sentences up to the first sentiment word), shuffled."""
    openers = sorted({_split_sentence(s)[0] for s in corpus(20000, seed + 1)})
    random.Random(seed).shuffle(openers)
    return openers


def prompt_splits(n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out evaluation prompts), disjoint."""
    pool = prompt_pool(seed)
    if n_eval >= len(pool):
        raise ValueError(f"eval_prompts={n_eval} leaves no training prompts (the task has {len(pool)})")
    return pool[n_eval:], pool[:n_eval]
