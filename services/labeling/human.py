"""People as a ``Labeler``: a round's comparisons become tasks in the labelling app's store, and ``label`` waits
until enough of them are labelled, then answers with each comparison's majority.

``batch_preference_rows`` reads every decided label of a batch as preference rows (``export.preference_rows``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import Field

from services.labeling.export import Aggregate, preference_rows
from services.labeling.labelers import Choice, Comparison, Verdict
from services.labeling.store import LabelStore, open_label_store
from shared.config import StrictModel
from shared.store import StoreConfig

log = logging.getLogger(__name__)


class HumanLabelerConfig(StrictModel):
    runs_dir: str = Field("", description="the labelling app's runs_dir (its store); empty = the run's runs_dir")
    store: StoreConfig = Field(default_factory=StoreConfig, description="the labelling app's store")
    annotators_per_task: int = Field(1, ge=1, description="as the labelling app's setting")
    min_labels: int = Field(
        0,
        ge=0,
        description="wait until the round's tasks have this many labels in all; 0 = until every task has "
        "annotators_per_task labels",
    )
    poll_s: float = Field(2.0, gt=0, description="how often the store is read while waiting")
    timeout_s: float = Field(0.0, ge=0, description="give up after this long (0 = wait as long as it takes)")


class HumanLabeler:
    """Posts comparisons as pair tasks of ``batch`` and waits for people's labels."""

    name = "human"

    def __init__(self, config: HumanLabelerConfig, store: LabelStore, batch: str):
        self.config, self.store, self.batch = config, store, batch

    async def label(self, comparisons: list[Comparison]) -> list[Verdict]:
        items = [{"prompt": c.prompt, "responses": [c.response_a, c.response_b]} for c in comparisons]
        ids = await asyncio.to_thread(self.store.add_tasks, self.batch, items)
        per_task = self.config.annotators_per_task
        needed = self.config.min_labels or len(set(ids)) * per_task
        started = time.monotonic()
        while True:
            labels = await asyncio.to_thread(self.store.labels, self.batch)
            by_task: dict[str, list] = {}
            for label in labels:
                by_task.setdefault(label.task_id, []).append(label)
            # By default every task needs its own labels: a total alone could be met by some tasks labelled twice.
            have = len(labels) if self.config.min_labels else sum(min(len(v), per_task) for v in by_task.values())
            if have >= needed:
                break
            if self.config.timeout_s and time.monotonic() - started > self.config.timeout_s:
                raise TimeoutError(f"batch {self.batch}: {have} of {needed} labels after {self.config.timeout_s} s")
            log.info("batch %s: %d of %d labels; waiting for the annotators", self.batch, have, needed)
            await asyncio.sleep(self.config.poll_s)
        return [self.majority(by_task.get(tid, [])) for tid in ids]

    @staticmethod
    def majority(labels: list) -> Verdict:
        """The most frequent answer; no label, or a tie in the vote, is a TIE (no preference row)."""
        votes = Counter(label.choice for label in labels).most_common()
        if not votes or (len(votes) > 1 and votes[0][1] == votes[1][1]):
            return Verdict(Choice.TIE, labeler="human")
        names = ",".join(sorted(label.annotator for label in labels if label.choice == votes[0][0]))
        comments = " | ".join(label.comment for label in labels if label.comment)
        return Verdict(Choice(votes[0][0]), labeler=f"human:{names}", comment=comments)


def batch_preference_rows(store: LabelStore, batch: str, aggregate: Aggregate = Aggregate.EACH) -> list[dict]:
    """``[{"prompt", "chosen", "rejected"}]`` from the decided labels of ``batch`` (ties and "both bad" give none;
    ``aggregate``: one row per label, or per task by majority; see ``services.labeling.export``)."""
    return preference_rows(store.tasks(batch), store.labels(batch), aggregate)


@contextlib.asynccontextmanager
async def open_human_labeler(config: HumanLabelerConfig, batch: str, runs_dir: Path) -> AsyncIterator[HumanLabeler]:
    """``runs_dir``: the run's directory (its parent is the default runs_dir, where a labelling app started with the
    same runs_dir finds the store)."""
    store = open_label_store(config.store, config.runs_dir or Path(runs_dir).parent, config.annotators_per_task)
    try:
        yield HumanLabeler(config, store, batch)
    finally:
        store.close()
