"""The labelling interface (``Labeler``) and a simulated labeller that answers like a noisy person.

A labeller sees comparisons (a prompt and two responses) and says which response is better. Its answers become
preference rows ``{"prompt", "chosen", "rejected"}``, the format the reward-model job trains on
(``services/training/reward.py``).
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class Choice(enum.StrEnum):
    A = "a"  # response_a is better
    B = "b"  # response_b is better


@dataclass(frozen=True)
class Comparison:
    prompt: str
    response_a: str
    response_b: str


@runtime_checkable
class Labeler(Protocol):
    def label(self, comparisons: list[Comparison]) -> list[Choice]:
        """One choice per comparison, in order."""
        ...


def _sigmoid(x: float) -> float:
    # Two branches so that exp never overflows for large |x|.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


class SimulatedLabeler:
    """Chooses A with the Bradley-Terry probability ``sigmoid((gold(a) - gold(b)) / temperature)``, like a noisy
    person, seeded.

    ``gold(prompt, response) -> float`` is the hidden quality the person judges by. ``temperature`` sets the noise:
    large -> coin flips, 0 -> always the better response (a tie is then a fair coin). Successive ``label`` calls
    continue one random stream, so a labeller built with the same seed gives the same answers to the same questions.
    """

    def __init__(self, gold: Callable[[str, str], float], seed: int, temperature: float = 1.0):
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.gold = gold
        self.temperature = temperature
        self.rng = random.Random(seed)

    def probability_a(self, comparison: Comparison) -> float:
        """P(choose A) for one comparison."""
        gold_a = float(self.gold(comparison.prompt, comparison.response_a))
        gold_b = float(self.gold(comparison.prompt, comparison.response_b))
        if not (math.isfinite(gold_a) and math.isfinite(gold_b)):
            raise ValueError(f"gold score is not finite ({gold_a}, {gold_b}) for prompt {comparison.prompt!r}")
        margin = gold_a - gold_b
        if self.temperature == 0:
            return 0.5 if margin == 0 else float(margin > 0)
        return _sigmoid(margin / self.temperature)

    def label(self, comparisons: list[Comparison]) -> list[Choice]:
        return [Choice.A if self.rng.random() < self.probability_a(c) else Choice.B for c in comparisons]


def preference_rows(comparisons: list[Comparison], choices: list[Choice]) -> list[dict]:
    """``[{"prompt", "chosen", "rejected"}]``: one preference row per labelled comparison, in order."""
    if len(comparisons) != len(choices):
        raise ValueError(f"{len(comparisons)} comparisons but {len(choices)} choices")
    rows = []
    for comparison, choice in zip(comparisons, choices, strict=True):
        better_a = Choice(choice) is Choice.A
        chosen, rejected = (
            (comparison.response_a, comparison.response_b)
            if better_a
            else (comparison.response_b, comparison.response_a)
        )
        rows.append({"prompt": comparison.prompt, "chosen": chosen, "rejected": rejected})
    return rows
