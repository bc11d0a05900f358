"""Labels out, in the formats the training jobs read.

- Preferences (TRL's format, ``{"prompt", "chosen", "rejected"}``): one row per decided pair label. A tie or "both
  bad" gives no row: a Bradley-Terry pair needs a winner (they still count in the agreement figures). A ranking label
  of K responses gives its C(K, 2) pairs.
- Rankings (``{"prompt", "responses": [best, ..., worst]}``, the reward and DPO jobs' ranking rows): one row per
  ranking label; a decided pair label is a ranking of two.

``aggregate``: ``each`` writes one row per annotator's label; ``majority`` one row per task, the most frequent
answer among its labels (a tie in the vote, or a majority for tie / both bad, gives no row).
"""

from __future__ import annotations

import enum
from collections import Counter, defaultdict

from services.labeling.store import PAIR, Label, Task
from shared.losses import ranking_pairs


class Aggregate(enum.StrEnum):
    EACH = "each"
    MAJORITY = "majority"


def _answers(labels: list[Label], aggregate: Aggregate) -> list[Label]:
    if aggregate is Aggregate.EACH:
        return labels
    by_task: dict[str, list[Label]] = defaultdict(list)
    for label in labels:
        by_task[label.task_id].append(label)
    chosen = []
    for group in by_task.values():
        votes = Counter(label.choice if label.kind == PAIR else tuple(label.ranking) for label in group).most_common()
        if len(votes) > 1 and votes[0][1] == votes[1][1]:
            continue  # no majority
        winner = votes[0][0]
        chosen.append(next(x for x in group if (x.choice if x.kind == PAIR else tuple(x.ranking)) == winner))
    return chosen


def _ranked(label: Label, task: Task) -> list[str] | None:
    """The task's responses best first, or None for a tie / both bad."""
    if label.kind == PAIR:
        if label.choice not in ("a", "b"):
            return None
        best = "ab".index(label.choice)
        return [task.responses[best], task.responses[1 - best]]
    return [task.responses[i] for i in label.ranking]


def preference_rows(tasks: list[Task], labels: list[Label], aggregate: Aggregate = Aggregate.EACH) -> list[dict]:
    by_id = {t.id: t for t in tasks}
    rows = []
    for label in _answers(labels, Aggregate(aggregate)):
        ranked = _ranked(label, by_id[label.task_id])
        if ranked is None:
            continue
        prompt = by_id[label.task_id].prompt
        rows.extend(
            {"prompt": prompt, "chosen": ranked[w], "rejected": ranked[lose]} for w, lose in ranking_pairs(ranked)
        )
    return rows


def ranking_rows(tasks: list[Task], labels: list[Label], aggregate: Aggregate = Aggregate.EACH) -> list[dict]:
    by_id = {t.id: t for t in tasks}
    rows = []
    for label in _answers(labels, Aggregate(aggregate)):
        ranked = _ranked(label, by_id[label.task_id])
        if ranked is not None:
            rows.append({"prompt": by_id[label.task_id].prompt, "responses": ranked})
    return rows
