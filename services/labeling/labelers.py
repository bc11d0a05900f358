"""The labelling interface (``Labeler``), its verdicts, and a simulated labeller that answers like a noisy person.

A labeller sees comparisons (a prompt and two responses) and gives one ``Verdict`` per comparison: A better, B
better, a tie, or both bad, with, for AI judges, the probability that A is better (a soft label). Verdicts become
preference rows ``{"prompt", "chosen", "rejected"}`` (plus ``"chosen_probability"`` for a soft label), the format the
reward-model job and DPO train on (``services/training/reward.py``). Every labeller (human through the labelling
app's queue, simulated, an AI judge) implements the same ``Labeler`` protocol, so the pipeline and ``rlhf iterate``
pick one by config and treat them alike.
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
    TIE = "tie"  # equally good: no preference row (documented in the README's labelling section)
    BOTH_BAD = "both_bad"  # neither is acceptable: no preference row


DECIDED = (Choice.A, Choice.B)


@dataclass(frozen=True)
class Comparison:
    prompt: str
    response_a: str
    response_b: str


@dataclass(frozen=True)
class Verdict:
    """One labeller's answer to one comparison."""

    choice: Choice
    probability_a: float | None = None  # P(response_a is better) when the labeller has one (AI judges); else None
    labeler: str = ""  # who answered: "simulated", "human:<annotator>", "reward-judge", "llm-judge", ...
    comment: str = ""

    def __post_init__(self):
        if self.probability_a is not None and not 0.0 <= self.probability_a <= 1.0:
            raise ValueError(f"probability_a must lie in [0, 1], got {self.probability_a}")


@runtime_checkable
class Labeler(Protocol):
    name: str

    async def label(self, comparisons: list[Comparison]) -> list[Verdict]:
        """One verdict per comparison, in order. A human labeller may take hours; an AI judge calls services."""
        ...


def sigmoid(x: float) -> float:
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

    name = "simulated"

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
        return sigmoid(margin / self.temperature)

    def choose(self, comparisons: list[Comparison]) -> list[Choice]:
        return [Choice.A if self.rng.random() < self.probability_a(c) else Choice.B for c in comparisons]

    async def label(self, comparisons: list[Comparison]) -> list[Verdict]:
        return [Verdict(choice, labeler=self.name) for choice in self.choose(comparisons)]


def preference_rows(comparisons: list[Comparison], verdicts: list[Verdict | Choice]) -> list[dict]:
    """``[{"prompt", "chosen", "rejected"}]``: one preference row per decided comparison, in order.

    A tie or "both bad" gives no row (a Bradley-Terry pair needs a winner). A verdict with a probability adds
    ``"chosen_probability"``: P(chosen is better), at least 0.5, which the reward job uses as a soft target.
    """
    if len(comparisons) != len(verdicts):
        raise ValueError(f"{len(comparisons)} comparisons but {len(verdicts)} verdicts")
    rows = []
    for comparison, verdict in zip(comparisons, verdicts, strict=True):
        if not isinstance(verdict, Verdict):
            verdict = Verdict(Choice(verdict))
        if verdict.choice not in DECIDED:
            continue
        better_a = verdict.choice is Choice.A
        chosen, rejected = (
            (comparison.response_a, comparison.response_b)
            if better_a
            else (comparison.response_b, comparison.response_a)
        )
        row = {"prompt": comparison.prompt, "chosen": chosen, "rejected": rejected}
        if verdict.probability_a is not None:
            row["chosen_probability"] = verdict.probability_a if better_a else 1.0 - verdict.probability_a
        rows.append(row)
    return rows
