"""Agreement figures of the labelling app against hand computations, and the exports' semantics."""

from __future__ import annotations

import krippendorff
import numpy as np
import pytest

from services.labeling.export import Aggregate, preference_rows, ranking_rows
from services.labeling.stats import cohen_kappa, krippendorff_alpha, labelling_stats, majority_agreement
from services.labeling.store import Label, Task


def test_cohen_kappa_by_hand():
    first = ["a", "a", "b", "b", "a", "tie"]
    second = ["a", "b", "b", "b", "a", "a"]
    # p_o: agree on items 1, 3, 4, 5 -> 4/6. Shares: first a 3/6, b 2/6, tie 1/6; second a 3/6, b 3/6.
    # p_e = 3/6 * 3/6 + 2/6 * 3/6 + 1/6 * 0 = 9/36 + 6/36 = 15/36. kappa = (24/36 - 15/36) / (21/36) = 9/21.
    assert cohen_kappa(first, second) == pytest.approx(9 / 21)
    assert cohen_kappa(["a", "b"], ["a", "b"]) == pytest.approx(1.0)
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # p_e = 1: undefined
    assert cohen_kappa([], []) is None
    with pytest.raises(ValueError):
        cohen_kappa(["a"], [])


def test_krippendorff_alpha_matches_the_package_on_the_matrix_and_a_hand_case():
    by_task = {
        "t1": {"x": "a", "y": "a", "z": "a"},
        "t2": {"x": "b", "y": "b"},
        "t3": {"x": "a", "y": "b", "z": "b"},
        "t4": {"y": "tie", "z": "tie"},
        "t5": {"x": "a"},  # one label: no information, left out
    }
    codes = {"a": 0, "b": 1, "tie": 2}
    matrix = np.array(
        [
            [codes["a"], codes["b"], codes["a"], np.nan],
            [codes["a"], codes["b"], codes["b"], codes["tie"]],
            [codes["a"], np.nan, codes["b"], codes["tie"]],
        ]
    )
    expected = krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal")
    assert krippendorff_alpha(by_task) == pytest.approx(expected)
    # By hand for two annotators, two items, perfect agreement on two categories: alpha = 1.
    assert krippendorff_alpha({"t1": {"x": "a", "y": "a"}, "t2": {"x": "b", "y": "b"}}) == pytest.approx(1.0)
    # Coincidence matrix by hand: items (a, b) and (a, a): pairable values n = 4 (a three times, b once).
    # D_o = 2 disagreeing ordered pairs / 4 = 0.5 (item 1 contributes 2/(2-1) pairs weighted by 1/(m-1) = 1).
    # D_e = (n_a * n_b * 2) / (n * (n - 1)) = (3 * 1 * 2) / 12 = 0.5. alpha = 1 - D_o / D_e = 1 - 0.5 / 0.5 = 0.
    assert krippendorff_alpha({"t1": {"x": "a", "y": "b"}, "t2": {"x": "a", "y": "a"}}) == pytest.approx(0.0)
    assert krippendorff_alpha({"t1": {"x": "a", "y": "a"}}) is None  # one category: undefined


def test_krippendorff_alpha_by_hand_with_three_annotators_and_a_missing_label():
    by_task = {
        "u1": {"x": "a", "y": "a", "z": "a"},
        "u2": {"x": "a", "y": "b"},
        "u3": {"x": "b", "y": "b", "z": "tie"},
        "u4": {"y": "tie", "z": "tie"},
    }
    # Coincidence matrix: each unit adds its ordered pairs of values from different annotators, weighted 1/(m_u - 1).
    #   u1 (a, a, a): 6 pairs (a, a) / 2 -> o_aa += 3
    #   u2 (a, b): (a, b), (b, a) / 1 -> o_ab += 1, o_ba += 1
    #   u3 (b, b, tie): 2 x (b, b), 2 x (b, tie), 2 x (tie, b), / 2 -> o_bb += 1, o_bt += 1, o_tb += 1
    #   u4 (tie, tie): 2 x (tie, tie) / 1 -> o_tt += 2
    # Margins: n_a = 3 + 1 = 4, n_b = 1 + 1 + 1 = 3, n_tie = 1 + 2 = 3; n = 10 pairable values.
    # Nominal: D_o = (o_ab + o_ba + o_bt + o_tb) / n = 4 / 10;
    #          D_e = sum_{c != k} n_c n_k / (n (n - 1)) = 2 (4*3 + 4*3 + 3*3) / 90 = 66 / 90.
    # alpha = 1 - D_o / D_e = 1 - (4/10) / (66/90) = 1 - 36/66 = 5/11.
    assert krippendorff_alpha(by_task) == pytest.approx(5 / 11)


def test_majority_agreement_leaves_the_annotator_out():
    by_task = {
        "t1": {"x": "a", "y": "a", "z": "b"},  # x: others y=a, z=b -> no strict majority; z: others a, a -> miss
        "t2": {"x": "b", "y": "b", "z": "b"},  # everyone agrees with the others
        "t3": {"x": "a", "y": "b"},  # x: other is b -> miss; y: other is a -> miss
    }
    result = majority_agreement(by_task)
    assert result["x"] == {"agreement": 0.5, "tasks": 2}  # t2 hit, t3 miss (t1 has no majority among y, z)
    assert result["y"] == {"agreement": 0.5, "tasks": 2}  # t2 hit, t3 miss (t1: x=a, z=b, no majority)
    assert result["z"] == {"agreement": 0.5, "tasks": 2}  # t1 miss (others a, a), t2 hit


def label(task: str, who: str, choice: str = "", ranking: list[int] | None = None, at: float = 0.0) -> Label:
    kind = "pair" if choice else "ranking"
    return Label(task, "b1", who, kind, [0, 1], choice, ranking or [], "", at, at + 10)


TASKS = [
    Task("t1", "b1", "p1", ["x1", "y1"], "pair"),
    Task("t2", "b1", "p2", ["x2", "y2"], "pair"),
    Task("t3", "b1", "p3", ["r0", "r1", "r2"], "ranking"),
]


def test_exports_skip_ties_and_both_bad_and_rankings_expand_to_pairs():
    labels = [
        label("t1", "x", "a"),
        label("t1", "y", "b"),
        label("t1", "z", "a"),
        label("t2", "x", "tie"),
        label("t2", "y", "both_bad"),
        label("t3", "x", ranking=[2, 0, 1]),
    ]
    each = preference_rows(TASKS, labels, Aggregate.EACH)
    assert each[:3] == [
        {"prompt": "p1", "chosen": "x1", "rejected": "y1"},
        {"prompt": "p1", "chosen": "y1", "rejected": "x1"},
        {"prompt": "p1", "chosen": "x1", "rejected": "y1"},
    ]
    assert each[3:] == [
        {"prompt": "p3", "chosen": "r2", "rejected": "r0"},
        {"prompt": "p3", "chosen": "r2", "rejected": "r1"},
        {"prompt": "p3", "chosen": "r0", "rejected": "r1"},
    ]
    assert (
        preference_rows(TASKS, labels, Aggregate.MAJORITY)
        == [
            {"prompt": "p1", "chosen": "x1", "rejected": "y1"},  # a twice against b once
            *each[3:],
        ]
    )  # t2: tie against both bad, no majority
    assert ranking_rows(TASKS, labels, Aggregate.EACH)[-1] == {"prompt": "p3", "responses": ["r2", "r0", "r1"]}


def test_stats_count_per_annotator_and_pairs():
    labels = [label("t1", "x", "a", at=0), label("t1", "y", "a", at=0), label("t2", "x", "b", at=3600)]
    stats = labelling_stats(labels, queue_size=1, tasks=3)
    assert stats["labels"] == 3 and stats["queue_size"] == 1 and stats["tasks"] == 3
    # x labelled twice between t=0 (first assignment) and t=3610 (last label): 2 / (3610 / 3600) per hour.
    assert stats["annotators"]["x"]["labels_per_hour"] == pytest.approx(2 / (3610 / 3600))
    assert stats["cohen_kappa"] == [{"annotators": ["x", "y"], "tasks": 1, "kappa": None}]
