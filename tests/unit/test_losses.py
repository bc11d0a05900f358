"""Tests of shared.losses against the published formulas and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from shared.losses import bradley_terry_loss, dpo_loss, ranking_pairs, sft_loss_sum

LOG2 = math.log(2.0)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------------------------------


def test_sft_loss_hand_case():
    # Row 0: a prompt token (masked), then probabilities proportional to 1, 2, 3, 4 -> p(label 3) = 0.4.
    # Row 1: uniform over 4 tokens -> log 4 for its one completion token; its second position is padding.
    logits = torch.log(t([[[9.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]], [[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]]]))
    labels = torch.tensor([[1, 3], [2, -100]])
    mask = torch.tensor([[0, 1], [1, 0]])
    loss_sum, n_tokens = sft_loss_sum(logits, labels, mask)
    assert_close(loss_sum, t(-math.log(0.4) + math.log(4.0)))
    assert_close(n_tokens, t(2.0))


def test_sft_loss_ignores_prompt_positions_and_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    loss_sum, n_tokens = sft_loss_sum(logits, labels, mask)

    changed = logits.clone()
    changed[mask == 0] = torch.randn_like(changed[mask == 0]) * 50  # anything at prompt/padding positions
    changed_labels = labels.masked_fill(mask == 0, -100)
    assert_close(sft_loss_sum(changed, changed_labels, mask)[0], loss_sum)

    by_hand = sum(-torch.log_softmax(logits[b, i], -1)[labels[b, i]] for b in range(3) for i in range(6) if mask[b, i])
    assert_close(loss_sum, by_hand)
    assert n_tokens.item() == int(mask.sum())


def test_sft_loss_sum_splits_over_micro_batches():
    torch.manual_seed(1)
    logits, labels = torch.randn(4, 5, 7), torch.randint(0, 7, (4, 5))
    mask = (torch.rand(4, 5) > 0.4).long()
    whole, n = sft_loss_sum(logits, labels, mask)
    parts = [sft_loss_sum(logits[i : i + 2], labels[i : i + 2], mask[i : i + 2]) for i in (0, 2)]
    assert_close(sum(p[0] for p in parts), whole)
    assert_close(sum(p[1] for p in parts), n)


def test_sft_loss_gradient_only_reaches_completion_positions():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    loss_sum, _ = sft_loss_sum(logits, torch.tensor([[0, 1, 2, 3]]), torch.tensor([[0, 0, 1, 1]]))
    loss_sum.backward()
    assert torch.all(logits.grad[0, :2] == 0)
    assert torch.all(logits.grad[0, 2:].abs().sum(-1) > 0)


# ----------------------------------------------------------------------------------------------------
# Bradley-Terry
# ----------------------------------------------------------------------------------------------------


def test_bradley_terry_hand_cases():
    loss = bradley_terry_loss(t([0.0, 1.0, 3.0, -2.0]), t([0.0, 0.0, 1.0, 0.0]))
    sigmoid = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    expected = [LOG2, -math.log(sigmoid(1.0)), -math.log(sigmoid(2.0)), -math.log(sigmoid(-2.0))]
    assert loss.shape == (4,)
    assert_close(loss, t(expected))
    assert_close(loss, torch.nn.functional.softplus(-(t([0.0, 1.0, 3.0, -2.0]) - t([0.0, 0.0, 1.0, 0.0]))))


def test_bradley_terry_stable_for_large_margins():
    loss = bradley_terry_loss(t([1e4, -1e4, 200.0]), t([-1e4, 1e4, -200.0]))
    assert torch.isfinite(loss).all()
    assert_close(loss, t([0.0, 2e4, 0.0]))
    chosen = t([-1e4]).requires_grad_()
    bradley_terry_loss(chosen, t([1e4])).sum().backward()
    assert_close(chosen.grad, t([-1.0]))  # d/dr_w softplus(-(r_w - r_l)) = -sigmoid(-(margin)) -> -1


def test_bradley_terry_soft_target_is_the_binary_cross_entropy():
    """With a target p: -(p log sigmoid(m) + (1 - p) log sigmoid(-m)), by hand in float64."""
    chosen, rejected = t([0.0, 1.0, 3.0, -2.0, 0.5]), t([0.0, 0.0, 1.0, 0.0, 0.5])
    target = t([0.9, 0.75, 0.5, 0.6, 0.3])
    loss = bradley_terry_loss(chosen, rejected, target)
    sigmoid = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    expected = [
        -(p * math.log(sigmoid(w - r)) + (1 - p) * math.log(sigmoid(r - w)))
        for w, r, p in zip(chosen.tolist(), rejected.tolist(), target.tolist(), strict=True)
    ]
    assert loss.shape == (5,) and loss.dtype == torch.float32
    assert_close(loss, t(expected))
    assert_close(loss[0], t(LOG2))  # margin 0: log 2 whatever the target
    # A scalar target broadcasts over the pairs.
    assert_close(bradley_terry_loss(chosen, rejected, 0.75), bradley_terry_loss(chosen, rejected, t([0.75] * 5)))


def test_bradley_terry_target_one_is_the_hard_loss_exactly():
    chosen = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 30
    rejected = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 30
    hard_chosen, soft_chosen = chosen.clone().requires_grad_(), chosen.clone().requires_grad_()
    hard = bradley_terry_loss(hard_chosen, rejected)
    soft = bradley_terry_loss(soft_chosen, rejected, torch.ones(64))
    assert torch.equal(hard, soft)
    hard.sum().backward()
    soft.sum().backward()
    assert torch.equal(hard_chosen.grad, soft_chosen.grad)


def test_bradley_terry_soft_target_is_minimal_at_the_log_odds_and_symmetric():
    """The loss is smallest where sigmoid(m) = p, and p for (chosen, rejected) equals 1 - p for the swapped pair."""
    p = 0.8
    margins = torch.linspace(-5, 5, 10001)
    loss = bradley_terry_loss(margins, torch.zeros_like(margins), p)
    assert abs(margins[loss.argmin()].item() - math.log(p / (1 - p))) < 2e-3
    chosen, rejected = t([2.0, -1.0, 0.3]), t([0.5, 1.0, 0.3])
    assert_close(bradley_terry_loss(chosen, rejected, p), bradley_terry_loss(rejected, chosen, 1 - p))
    # The gradient with respect to the margin is sigmoid(m) - p: zero at the target probability.
    margin = t([math.log(p / (1 - p)), 0.0]).requires_grad_()
    bradley_terry_loss(margin, torch.zeros(2), p).sum().backward()
    assert_close(margin.grad, t([0.0, 0.5 - p]), atol=1e-6, rtol=0)


def test_bradley_terry_soft_target_stable_for_large_margins():
    loss = bradley_terry_loss(t([1e4, -1e4]), t([-1e4, 1e4]), t([0.9, 0.9]))
    assert torch.isfinite(loss).all()
    assert_close(loss, t([0.1 * 2e4, 0.9 * 2e4]))


# ----------------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------------


def test_dpo_policy_equal_to_reference_gives_log2_and_zero_rewards():
    logps_w, logps_l = t([-3.0, -10.0]), t([-4.0, -1.0])
    loss, chosen, rejected = dpo_loss(logps_w, logps_l, logps_w.clone(), logps_l.clone(), beta=0.1)
    assert_close(loss, t([LOG2, LOG2]))
    assert_close(chosen, t([0.0, 0.0]))
    assert_close(rejected, t([0.0, 0.0]))


def test_dpo_hand_case():
    # pi_w - ref_w = -5 - (-7) = 2, pi_l - ref_l = -9 - (-8) = -1; beta 0.5 -> rewards 1 and -0.5, margin 1.5.
    loss, chosen, rejected = dpo_loss(t([-5.0]), t([-9.0]), t([-7.0]), t([-8.0]), beta=0.5)
    assert_close(chosen, t([1.0]))
    assert_close(rejected, t([-0.5]))
    assert_close(loss, t([math.log(1.0 + math.exp(-1.5))]))
    assert not chosen.requires_grad


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pi_w, pi_l = t([-5.0]).requires_grad_(), t([-5.0]).requires_grad_()
    loss, _, _ = dpo_loss(pi_w, pi_l, t([-5.0]), t([-5.0]), beta=0.2)
    loss.sum().backward()
    # d loss / d pi_w = -beta * sigmoid(-beta * margin) = -0.2 * 0.5 at margin 0.
    assert_close(pi_w.grad, t([-0.1]))
    assert_close(pi_l.grad, t([0.1]))


def test_dpo_stable_for_large_margins():
    loss, chosen, rejected = dpo_loss(t([0.0, -1e5]), t([-1e5, 0.0]), t([-1e5, 0.0]), t([0.0, -1e5]), beta=1.0)
    assert torch.isfinite(loss).all() and torch.isfinite(chosen).all() and torch.isfinite(rejected).all()
    assert_close(loss, t([0.0, 2e5]))


def test_dpo_rejects_non_positive_beta():
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(t([0.0]), t([0.0]), t([0.0]), t([0.0]), beta=0.0)


# ----------------------------------------------------------------------------------------------------
# Rankings
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (2, [(0, 1)]),
        (3, [(0, 1), (0, 2), (1, 2)]),
        (4, [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]),
    ],
)
def test_ranking_pairs_all_ordered_pairs(k, expected):
    pairs = ranking_pairs([f"response {i}" for i in range(k)])
    assert pairs == expected
    assert len(pairs) == math.comb(k, 2)
    assert all(winner < loser for winner, loser in pairs)  # best first: a lower index is ranked higher


@pytest.mark.parametrize("responses", [[], ["only one"]])
def test_ranking_pairs_rejects_fewer_than_two(responses):
    with pytest.raises(ValueError, match="at least 2"):
        ranking_pairs(responses)
