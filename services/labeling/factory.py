"""Which labeller labels a round: one ``LabelerConfig`` (kind: an enum) -> one ``Labeler`` (the protocol in
labelers.py), opened and closed around the round so that its clients live on the round's event loop."""

from __future__ import annotations

import contextlib
import enum
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import Field

from services.labeling.labelers import Labeler, SimulatedLabeler
from shared.config import StrictModel


class LabelerKind(enum.StrEnum):
    SIMULATED = "simulated"  # a noisy person driven by the built-in task's hidden gold reward
    HUMAN = "human"  # people in the labelling app (services/labeling/app.py): a round waits for their labels
    REWARD_JUDGE = "reward_judge"  # RLAIF: a reward model behind a reward service judges
    LLM_JUDGE = "llm_judge"  # RLAIF: an LLM asked which response is better, in both orders, through TGI routes


class LabelerConfig(StrictModel):
    """Who labels each round's comparisons."""

    kind: LabelerKind = LabelerKind.SIMULATED
    temperature: float = Field(1.0, gt=0, description="simulated: noise, P(a) = sigmoid((gold_a - gold_b) / T)")


@contextlib.asynccontextmanager
async def open_labeler(config: LabelerConfig, seed: int, batch: str, root: Path) -> AsyncIterator[Labeler]:
    """The configured labeller for one batch of comparisons (``batch`` names it in the labelling app's store)."""
    if config.kind is LabelerKind.SIMULATED:
        from services.pipeline.task import gold_reward

        yield SimulatedLabeler(gold_reward, seed=seed + hash_batch(batch), temperature=config.temperature)
        return
    raise NotImplementedError(config.kind)


def hash_batch(batch: str) -> int:
    """A stable integer from a batch name (Python's ``hash`` of a str changes between processes)."""

    return int.from_bytes(hashlib.blake2b(batch.encode(), digest_size=4).digest(), "big")
