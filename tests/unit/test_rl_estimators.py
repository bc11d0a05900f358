"""Tests of the critic-free advantage estimators, the KL loss term and the decoupled PPO loss in shared.rl_math,
against hand-computed cases (the arithmetic is written out in the comments) and invariants."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from shared.rl_math import (
    AdvantageEstimator,
    KLEstimator,
    behaviour_weights,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    kl_loss_sum,
    kl_penalized_rewards,
    policy_loss_sum,
    reinforce_pp_advantages,
    rloo_advantages,
    weighted_policy_loss_sum,
)

F64 = torch.float64
S = 1 / math.sqrt(2)


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def ragged_mask(lengths: list[int], T: int) -> torch.Tensor:
    """(B, T) bool mask with a prefix of ``lengths[b]`` real tokens per row."""
    return torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def spread(per_sequence: list[float], lengths: list[int], T: int) -> torch.Tensor:
    """Expected (B, T): each row's value on its first lengths[b] tokens, 0 after (written out, not computed)."""
    return t([[v] * n + [0.0] * (T - n) for v, n in zip(per_sequence, lengths, strict=True)])


# Three interleaved groups: id 7 = rows {0, 3} with r = {1, 2}; id 9 = rows {2, 5} with r = {3, 6};
# id 5 = rows {1, 4, 6} with r = {0, 3, 6}.
SCORES = [1.0, 0.0, 3.0, 2.0, 3.0, 6.0, 6.0]
IDS = [7, 5, 9, 7, 5, 9, 5]
LENGTHS = [3, 1, 4, 2, 4, 2, 1]
T_MAX = 4


# --------------------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------------------


def test_grpo_hand_computed_interleaved_groups():
    # Group 7: mean 1.5, deviations -0.5, +0.5, unbiased var = 0.5 / 1 -> std = sqrt(0.5) -> A = -+1/sqrt(2).
    # Group 9: mean 4.5, deviations -1.5, +1.5, unbiased var = 4.5 / 1 -> std = sqrt(4.5) -> A = -+1/sqrt(2).
    # Group 5: mean 3, deviations -3, 0, 3, unbiased var = 18 / 2 = 9 -> std 3 -> A = -1, 0, 1
    # (the population std sqrt(6) would give -+1.2247: this pins the unbiased std).
    out = grpo_advantages(t(SCORES), torch.tensor(IDS), ragged_mask(LENGTHS, T_MAX), eps=0.0)
    assert_close(out, spread([-S, -1.0, -S, S, 0.0, S, 1.0], LENGTHS, T_MAX))


def test_grpo_default_eps_is_added_to_the_std():
    # Group 5 again: A = -3 / (3 + 1e-6) etc.
    out = grpo_advantages(t([0.0, 3.0, 6.0]), torch.tensor([1, 1, 1]), ragged_mask([1, 1, 1], 1))
    assert_close(out[:, 0], t([-3 / (3 + 1e-6), 0.0, 3 / (3 + 1e-6)]), rtol=0, atol=1e-12)


def test_grpo_without_scaling_is_dr_grpo():
    # r - group mean: 1-1.5, 0-3, 3-4.5, 2-1.5, 3-3, 6-4.5, 6-3.
    out = grpo_advantages(t(SCORES), torch.tensor(IDS), ragged_mask(LENGTHS, T_MAX), scale_rewards=False)
    assert_close(out, spread([-0.5, -3.0, -1.5, 0.5, 0.0, 1.5, 3.0], LENGTHS, T_MAX))


def test_grpo_equal_scores_give_zero_not_nan():
    out = grpo_advantages(t([2.0, 2.0, 2.0]), torch.tensor([4, 4, 4]), ragged_mask([2, 2, 2], 2))
    assert torch.equal(out, torch.zeros(3, 2, dtype=F64))


# --------------------------------------------------------------------------------------------------------
# RLOO
# --------------------------------------------------------------------------------------------------------


def test_rloo_hand_computed_interleaved_groups():
    # A_i = r_i - mean of the others. Group 7: 1 - 2 = -1, 2 - 1 = 1. Group 9: 3 - 6 = -3, 6 - 3 = 3.
    # Group 5: 0 - (3 + 6)/2 = -4.5, 3 - (0 + 6)/2 = 0, 6 - (0 + 3)/2 = 4.5.
    out = rloo_advantages(t(SCORES), torch.tensor(IDS), ragged_mask(LENGTHS, T_MAX))
    expected = t(
        [
            [-1.0, -1.0, -1.0, 0.0],
            [-4.5, 0.0, 0.0, 0.0],
            [-3.0, -3.0, -3.0, -3.0],
            [1.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
            [3.0, 3.0, 0.0, 0.0],
            [4.5, 0.0, 0.0, 0.0],
        ]
    )
    assert torch.equal(out, expected)


def test_rloo_equals_k_over_k_minus_1_times_centred_scores():
    # Dr. GRPO advantages are r - mean; RLOO scales them by k / (k - 1) (2 for pairs, 1.5 for the triple).
    mask = ragged_mask(LENGTHS, T_MAX)
    centred = grpo_advantages(t(SCORES), torch.tensor(IDS), mask, scale_rewards=False)
    k = t([2, 3, 2, 2, 3, 2, 3]).unsqueeze(1)
    assert_close(rloo_advantages(t(SCORES), torch.tensor(IDS), mask), k / (k - 1) * centred)


# --------------------------------------------------------------------------------------------------------
# Group handling shared by GRPO and RLOO
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", [grpo_advantages, rloo_advantages])
def test_group_of_one_raises(estimator):
    with pytest.raises(ValueError, match=r"at least 2 samples.*group ids \[2\] have \[1\]"):
        estimator(t([1.0, 2.0, 3.0]), torch.tensor([1, 1, 2]), ragged_mask([1, 1, 1], 1))


@pytest.mark.parametrize("estimator", [grpo_advantages, rloo_advantages])
def test_bad_shapes_and_float_ids_raise(estimator):
    with pytest.raises(ValueError, match="expected scores"):
        estimator(t([1.0, 2.0]), torch.tensor([1, 1, 1]), ragged_mask([1, 1], 1))
    with pytest.raises(ValueError, match="integer"):
        estimator(t([1.0, 2.0]), t([1.0, 1.0]), ragged_mask([1, 1], 1))


@pytest.mark.parametrize("estimator", [grpo_advantages, rloo_advantages])
def test_group_ids_are_labels_only(estimator):
    # Renaming the groups (negative, huge int64) or permuting the rows changes nothing but the row order.
    mask = ragged_mask(LENGTHS, T_MAX)
    base = estimator(t(SCORES), torch.tensor(IDS), mask)
    renamed = {7: -3, 5: 2**40, 9: 0}
    assert torch.equal(estimator(t(SCORES), torch.tensor([renamed[i] for i in IDS]), mask), base)
    perm = torch.tensor([6, 2, 0, 5, 1, 3, 4])
    assert_close(estimator(t(SCORES)[perm], torch.tensor(IDS)[perm], mask[perm]), base[perm])


def test_integer_scores_and_float_mask():
    out = rloo_advantages(torch.tensor([1, 3]), torch.tensor([0, 0]), t([[1.0, 0.0], [1.0, 1.0]]))
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[-2.0, 0.0], [2.0, 2.0]]))


# --------------------------------------------------------------------------------------------------------
# REINFORCE++
# --------------------------------------------------------------------------------------------------------


def test_discounted_returns_hand_computed_ignores_padding():
    # Row 0 rewards [0, 0, 2], gamma 0.5: G2 = 2, G1 = 0 + 0.5 * 2 = 1, G0 = 0.5.
    # Row 1 rewards [1, -1 | 100 padding]: G1 = -1, G0 = 1 - 0.5 = 0.5; the padded 100 must not leak in.
    rewards = t([[0.0, 0.0, 2.0], [1.0, -1.0, 100.0]])
    mask = ragged_mask([3, 2], 3)
    assert torch.equal(discounted_returns(rewards, mask, gamma=0.5), t([[0.5, 1.0, 2.0], [0.5, -1.0, 0.0]]))
    # Same thing as GAE with a zero critic and lam = 1.
    advantages, _ = gae_advantages(rewards, torch.zeros_like(rewards), mask, gamma=0.5, lam=1.0)
    assert_close(discounted_returns(rewards, mask, gamma=0.5), advantages)


def test_reinforce_pp_hand_computed():
    # gamma = 1: returns row 0 [2, 2, 2], row 1 [1 - 1, -1] = [0, -1]. Over the 5 real tokens: mean 5/5 = 1,
    # deviations 1, 1, 1, -1, -2, sum of squares 8, unbiased var 8/4 = 2 -> A = deviation / sqrt(2).
    rewards = t([[0.0, 0.0, 2.0], [1.0, -1.0, 7.0]])
    out = reinforce_pp_advantages(rewards, ragged_mask([3, 2], 3))
    assert_close(out, t([[S, S, S], [-S, -2 * S, 0.0]]))


def test_reinforce_pp_from_kl_penalized_rewards():
    # kl_coef 0.5, scores [2, 1]. Row 0 kl [0.2, 0.4, 0] -> rewards [-0.1, -0.2, 2.0] -> returns [1.7, 1.8, 2.0].
    # Row 1 kl [0.2, -0.2 | pad] -> rewards [-0.1, 0.1 + 1] -> returns [1.0, 1.1].
    # Mean 7.6 / 5 = 1.52; deviations .18 .28 .48 -.52 -.42; squares sum to .788; unbiased var .788 / 4 = .197.
    mask = ragged_mask([3, 2], 3)
    rewards = kl_penalized_rewards(t([2.0, 1.0]), t([[0.2, 0.4, 0.0], [0.2, -0.2, 9.0]]), mask, kl_coef=0.5)
    expected = t([[0.18, 0.28, 0.48], [-0.52, -0.42, 0.0]]) / math.sqrt(0.197)
    assert_close(reinforce_pp_advantages(rewards, mask, gamma=1.0), expected)


# --------------------------------------------------------------------------------------------------------
# KL as a loss term
# --------------------------------------------------------------------------------------------------------

# Three real tokens and one padded one holding garbage that would overflow exp (ref - logp = 1e4).
LOGP = [[-1.0, -0.5], [-2.0, 0.0]]
REF = [[-1.5, -0.5], [-0.2, 1e4]]
KL_MASK = [[True, True], [True, False]]


def _kl_loss_and_grad(estimator):
    logp = t(LOGP).requires_grad_(True)
    loss = kl_loss_sum(logp, t(REF), torch.tensor(KL_MASK), estimator)
    loss.backward()
    return loss, logp.grad


def test_k3_value_and_gradient_hand_computed():
    # ref - logp = -0.5, 0, 1.8 on the real tokens.
    # k3 = exp(ref - logp) - (ref - logp) - 1: exp(-0.5) + 0.5 - 1 = 0.1065306597, 0, exp(1.8) - 2.8 = 3.2496474644.
    # d k3 / d logp = 1 - exp(ref - logp): 0.3934693403, 0, -5.0496474644; 0 on padding (and finite).
    loss, grad = _kl_loss_and_grad("k3")
    assert_close(loss, t(0.1065306597 + 3.2496474644))
    assert_close(grad, t([[0.3934693403, 0.0], [-5.0496474644, 0.0]]))


def test_k3_matches_autograd_of_closed_form():
    logp = t(LOGP).requires_grad_(True)
    mask = torch.tensor(KL_MASK)
    ref = t(REF)[mask]
    closed = (torch.exp(ref - logp[mask]) - (ref - logp[mask]) - 1).sum()
    (expected_grad,) = torch.autograd.grad(closed, logp)
    loss, grad = _kl_loss_and_grad(KLEstimator.K3)
    assert_close(loss, closed.detach())
    assert_close(grad, expected_grad)


def test_k1_k2_values_and_gradients():
    # d = logp - ref = 0.5, 0, -1.8. k1 sum = -1.3, gradient 1 per real token.
    # k2 sum = 0.5 * (0.25 + 0 + 3.24) = 1.745, gradient d.
    loss, grad = _kl_loss_and_grad(KLEstimator.K1)
    assert_close(loss, t(-1.3))
    assert torch.equal(grad, t([[1.0, 1.0], [1.0, 0.0]]))
    loss, grad = _kl_loss_and_grad(KLEstimator.K2)
    assert_close(loss, t(1.745))
    assert_close(grad, t([[0.5, 0.0], [-1.8, 0.0]]))


def test_k3_is_non_negative():
    d = torch.cat([torch.linspace(-20, 20, 41, dtype=F64), t([1e-12, -1e-12, 1e-7, -1e-7])])
    mask = torch.ones(1, 1, dtype=torch.bool)
    for x in d.tolist():
        assert kl_loss_sum(t([[x]]), t([[0.0]]), mask, "k3").item() >= 0.0


# --------------------------------------------------------------------------------------------------------
# Decoupled (off-policy) PPO loss
# --------------------------------------------------------------------------------------------------------


def test_behaviour_weights_truncate_at_cap_and_zero_padding():
    # proximal - behaviour = 0, ln 3, -ln 2 on real tokens -> w = 1, min(3, 2) = 2, 0.5; padding 0 even though
    # its log-ratio (-100) is garbage.
    behaviour = t([[-1.0, -2.0, -0.5, 50.0]])
    proximal = t([[-1.0, -2.0 + math.log(3), -0.5 - math.log(2), -50.0]]).requires_grad_(True)
    w = behaviour_weights(proximal, behaviour, ragged_mask([3], 4), cap=2.0)
    assert_close(w, t([[1.0, 2.0, 0.5, 0.0]]))
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap"):
        behaviour_weights(proximal, behaviour, ragged_mask([3], 4), cap=0.0)


def test_weighted_loss_hand_computed():
    # log-ratios ln 1.5, 0, ln 0.5; A = 1, -2, 4; clip 0.2.
    # loss_t = max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2; max(2, 2) = 2; max(-2, -3.2) = -2.
    # weights 1, 2, 0.5 -> -1.2 + 4 - 1 = 1.8. Padding (advantage 9) contributes nothing.
    old = t([[-1.0, -1.0, -1.0, -1.0]])
    logp = (old + t([[math.log(1.5), 0.0, math.log(0.5), 30.0]])).requires_grad_(True)
    advantages = t([[1.0, -2.0, 4.0, 9.0]])
    weights = t([[1.0, 2.0, 0.5, 7.0]]).requires_grad_(True)
    loss = weighted_policy_loss_sum(logp, old, advantages, ragged_mask([3], 4), 0.2, weights)
    assert_close(loss, t(1.8))
    loss.backward()
    assert weights.grad is None  # weights are data: detached
    # d loss / d logp = w * (-A * ratio) where unclipped, 0 where clipped: 0, 2 * 2 * 1 = 4, 0.5 * -4 * 0.5 = -1.
    assert_close(logp.grad, t([[0.0, 4.0, -1.0, 0.0]]))


def test_weighted_loss_reduces_to_on_policy_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    B, T = 4, 6
    mask = ragged_mask([6, 3, 1, 5], T)
    old = -torch.rand(B, T, generator=gen, dtype=F64) * 3
    advantages = torch.randn(B, T, generator=gen, dtype=F64)
    start = old + 0.3 * torch.randn(B, T, generator=gen, dtype=F64)

    def loss_and_grad(fn, *extra):
        logp = start.clone().requires_grad_(True)
        loss = fn(logp, old, advantages, mask, 0.2, *extra)
        loss.backward()
        return loss, logp.grad

    expected_loss, expected_grad = loss_and_grad(policy_loss_sum)
    for extra in [(), (None,), (torch.ones(B, T, dtype=F64),)]:
        loss, grad = loss_and_grad(weighted_policy_loss_sum, *extra)
        assert torch.equal(loss, expected_loss)
        assert torch.equal(grad, expected_grad)


def test_advantage_estimator_names():
    assert [e.value for e in AdvantageEstimator] == ["gae", "grpo", "rloo", "reinforce_plus_plus"]
    assert AdvantageEstimator("grpo") is AdvantageEstimator.GRPO
