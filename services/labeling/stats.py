"""Labelling statistics: the queue, throughput, and agreement between annotators.

Agreement is measured on pair tasks, over the four nominal categories a, b, tie, both_bad (in terms of the original
responses, so the randomised display order does not matter):

- Cohen's kappa for each pair of annotators over the tasks both labelled: ``kappa = (p_o - p_e) / (1 - p_e)``, with
  ``p_o`` the share of those tasks where they agree and ``p_e = sum_c p1(c) * p2(c)`` the agreement expected by chance
  from each annotator's own category shares (Cohen 1960). 1 = perfect, 0 = chance. Undefined (None) when
  ``p_e = 1`` (both always gave the same single category) or they share no task.
- Krippendorff's alpha (nominal) over every annotator and every pair task with at least two labels (the
  ``krippendorff`` package): ``alpha = 1 - D_o / D_e``, observed over expected disagreement; it handles any number of
  annotators and missing labels.
- Each annotator's agreement with the majority of the *others* (leave-self-out: their own label does not vote), over
  the tasks where the others have a strict majority.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict

import krippendorff
import numpy as np

from services.labeling.store import PAIR, PAIR_CHOICES, Label

HOUR_S = 3600.0


def cohen_kappa(first: list[str], second: list[str]) -> float | None:
    """Cohen's kappa of two annotators' labels of the same items, in order; None when undefined."""
    if len(first) != len(second):
        raise ValueError(f"{len(first)} labels against {len(second)}")
    n = len(first)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    shares_1, shares_2 = Counter(first), Counter(second)
    expected = sum(shares_1[c] * shares_2[c] for c in shares_1) / (n * n)
    if expected == 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def krippendorff_alpha(by_task: dict[str, dict[str, str]]) -> float | None:
    """Nominal alpha over ``{task: {annotator: category}}``; tasks with fewer than two labels carry no information."""
    tasks = [labels for labels in by_task.values() if len(labels) >= 2]
    annotators = sorted({a for labels in tasks for a in labels})
    if not tasks or len({c for labels in tasks for c in labels.values()}) < 2:
        return None  # one category in all: alpha is undefined
    codes = {c: i for i, c in enumerate(PAIR_CHOICES)}
    data = np.full((len(annotators), len(tasks)), np.nan)
    for j, labels in enumerate(tasks):
        for annotator, category in labels.items():
            data[annotators.index(annotator), j] = codes[category]
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal"))


def pair_labels_by_task(labels: list[Label]) -> dict[str, dict[str, str]]:
    by_task: dict[str, dict[str, str]] = defaultdict(dict)
    for label in labels:
        if label.kind == PAIR:
            by_task[label.task_id][label.annotator] = label.choice
    return dict(by_task)


def majority_agreement(by_task: dict[str, dict[str, str]]) -> dict[str, dict]:
    """Per annotator: the share of their labels equal to the others' strict majority, and over how many tasks."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for labels in by_task.values():
        for annotator, category in labels.items():
            others = Counter(c for a, c in labels.items() if a != annotator).most_common()
            if not others or (len(others) > 1 and others[0][1] == others[1][1]):
                continue  # nobody else, or no strict majority among them
            hits[annotator].append(category == others[0][0])
    return {a: {"agreement": sum(h) / len(h), "tasks": len(h)} for a, h in sorted(hits.items())}


def labelling_stats(labels: list[Label], queue_size: int, tasks: int) -> dict:
    """Everything the stats page shows (also GET /api/stats)."""
    by_task = pair_labels_by_task(labels)
    per_annotator: dict[str, list[Label]] = defaultdict(list)
    for label in labels:
        per_annotator[label.annotator].append(label)
    annotators = {}
    for name, own in sorted(per_annotator.items()):
        first, last = min(x.assigned_at for x in own), max(x.labelled_at for x in own)
        hours = max(last - first, 60.0) / HOUR_S  # at least a minute: one quick label is not a rate
        annotators[name] = {
            "labels": len(own),
            "labels_per_hour": len(own) / hours,
            "median_seconds_per_label": float(np.median([x.labelled_at - x.assigned_at for x in own])),
        }
    kappas = []
    for first, second in itertools.combinations(sorted(per_annotator), 2):
        shared = [t for t, labels in by_task.items() if first in labels and second in labels]
        kappa = cohen_kappa([by_task[t][first] for t in shared], [by_task[t][second] for t in shared])
        kappas.append({"annotators": [first, second], "tasks": len(shared), "kappa": kappa})
    defined = [k["kappa"] for k in kappas if k["kappa"] is not None]
    for name, agreement in majority_agreement(by_task).items():
        annotators[name]["majority_agreement"] = agreement["agreement"]
        annotators[name]["majority_tasks"] = agreement["tasks"]
    alpha = krippendorff_alpha(by_task)
    return {
        "tasks": tasks,
        "queue_size": queue_size,
        "labels": len(labels),
        "annotators": annotators,
        "cohen_kappa": kappas,
        "cohen_kappa_mean": sum(defined) / len(defined) if defined else None,
        "krippendorff_alpha": None if alpha is None or math.isnan(alpha) else alpha,
        "choices": dict(Counter(label.choice for label in labels if label.kind == PAIR)),
    }
