"""Tests of shared.rl_math against the published formulas and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from shared.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    KLEstimator,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    kl_estimate,
    kl_penalized_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    policy_loss_sum,
    value_loss,
    value_loss_sum,
)

F64 = torch.float64


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def ragged_mask(lengths: list[int], T: int) -> torch.Tensor:
    """(B, T) float mask with a prefix of ``lengths[b]`` ones per row."""
    return (torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).to(F64)


# ----------------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# ----------------------------------------------------------------------------------------------------


def test_logprobs_from_logits_hand_case():
    # Probabilities proportional to 1, 2, 3, 4 -> p = k / 10.
    logits = torch.log(t([[[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]])) + 7.0  # shift-invariant
    labels = torch.tensor([[3, 1]])
    out = logprobs_from_logits(logits, labels)
    assert out.shape == (1, 2)
    assert out.dtype == torch.float32
    assert_close(out, torch.log(torch.tensor([[0.4, 0.3]])))
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert_close(out, expected.float())


def test_logprobs_from_logits_bf16_computed_in_float32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 3), generator=g)
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert_close(out, expected)


def test_temperature_scores_under_softmax_of_logits_over_t():
    # p proportional to (1, 2, 4) at T = 1; at T = 0.5, p proportional to (1, 4, 16) = squares.
    logits = torch.log(t([[[1.0, 2.0, 4.0]]])).float()
    labels = torch.tensor([[2]])
    assert_close(logprobs_from_logits(logits, labels, temperature=0.5), torch.log(t([[16.0 / 21.0]])).float())
    # Entropy at T = 0.5: the same squared distribution.
    p = t([1.0, 4.0, 16.0]).float() / 21.0
    assert_close(entropy_from_logits(logits, temperature=0.5), -(p * p.log()).sum().reshape(1, 1))
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, labels, temperature=0.0)


def test_row_chunks_give_the_same_values_and_gradients(monkeypatch):
    """Computed a few rows at a time (here 3 rows of 11 per chunk) the values and gradients are those of the
    plain log_softmax formula."""
    import shared.rl_math as rl_math

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    monkeypatch.setattr(rl_math, "_CHUNK_ELEMENTS", 33)
    out = logprobs_from_logits(logits, labels, temperature=0.7)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert_close(out, expected)
    assert_close(grad, expected_grad)
    logp = torch.log_softmax(logits / 0.7, -1)
    assert_close(entropy_from_logits(logits, 0.7), -(logp.exp() * logp).sum(-1))


def test_entropy_uniform_is_log4_nats_two_bits():
    ent = entropy_from_logits(torch.zeros(2, 3, 4))
    assert ent.shape == (2, 3)
    assert ent.dtype == torch.float32
    assert_close(ent, torch.full((2, 3), math.log(4.0)))
    assert_close(ent / math.log(2.0), torch.full((2, 3), 2.0))


def test_entropy_near_one_hot_is_near_zero():
    logits = torch.tensor([[[50.0, 0.0, 0.0, 0.0]]])
    ent = entropy_from_logits(logits)
    assert abs(ent.item()) < 1e-6


def test_entropy_hand_case_and_masked_vocab_is_finite():
    # p = (0.5, 0.5, 0, 0) via -inf logits: H = log 2, and gradients must not be nan.
    logits = torch.tensor([[[0.0, 0.0, -math.inf, -math.inf]]], requires_grad=True)
    ent = entropy_from_logits(logits)
    assert_close(ent, torch.tensor([[math.log(2.0)]]))
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # p = (0.25, 0.75): H = -(0.25 ln 0.25 + 0.75 ln 0.75)
    ent2 = entropy_from_logits(torch.log(torch.tensor([[[0.25, 0.75]]])))
    assert_close(ent2, torch.tensor([[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]]))


# ----------------------------------------------------------------------------------------------------
# Masked reductions
# ----------------------------------------------------------------------------------------------------


def test_masked_sum_mean_hand_case():
    values = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert_close(masked_sum(values, mask), t(7.0))
    assert_close(masked_mean(values, mask), t(7.0 / 3.0))
    assert_close(masked_sum(values, mask, dim=1), t([3.0, 4.0]))
    assert_close(masked_mean(values, mask, dim=1), t([1.5, 4.0]))
    assert_close(masked_mean(values, mask, dim=0), t([2.5, 2.0, 0.0]))
    # bool masks behave the same as float masks
    assert_close(masked_mean(values, mask.bool()), t(7.0 / 3.0))


def test_masked_mean_ignores_non_finite_padding():
    values = t([[1.0, math.inf], [3.0, math.nan]])
    mask = t([[1.0, 0.0], [1.0, 0.0]])
    assert_close(masked_mean(values, mask), t(2.0))


def test_masked_mean_all_zero_mask_is_zero():
    values = t([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.zeros(2, 2, dtype=F64)
    out = masked_mean(values, mask)
    assert not torch.isnan(out)
    assert out.item() == 0.0
    assert_close(masked_mean(values, t([[1.0, 1.0], [0.0, 0.0]]), dim=1), t([1.5, 0.0]))


def test_masked_var_hand_case():
    values = t([[1.0, 2.0, 99.0], [3.0, 4.0, -50.0]])
    mask = t([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # entries 1, 2, 3, 4: mean 2.5, sum of squared deviations 5
    assert_close(masked_var(values, mask, unbiased=False), t(5.0 / 4.0))
    assert_close(masked_var(values, mask, unbiased=True), t(5.0 / 3.0))
    assert_close(masked_var(values, mask), t(5.0 / 3.0))


def test_masked_var_too_few_entries():
    values = t([[1.0, 2.0]])
    with pytest.raises(ValueError):
        masked_var(values, t([[1.0, 0.0]]), unbiased=True)
    with pytest.raises(ValueError):
        masked_var(values, t([[0.0, 0.0]]), unbiased=True)
    assert masked_var(values, t([[1.0, 0.0]]), unbiased=False).item() == 0.0


def test_masked_whiten():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(4, 9, generator=g, dtype=F64) * 3.0 + 5.0
    mask = ragged_mask([9, 5, 1, 7], 9)
    out = masked_whiten(values, mask)
    assert_close(masked_mean(out, mask), t(0.0), atol=1e-12, rtol=0)
    assert_close(masked_var(out, mask), t(1.0), atol=1e-6, rtol=0)
    assert (out[mask == 0] == 0).all()
    # Only the relative positions of the masked entries matter: an affine map of them gives the same result.
    assert_close(masked_whiten(values * 2.0 - 7.0, mask), out)

    kept = masked_whiten(values, mask, shift_mean=False)
    assert_close(masked_mean(kept, mask), masked_mean(values, mask))
    assert_close(masked_var(kept, mask), t(1.0), atol=1e-6, rtol=0)
    assert (kept[mask == 0] == 0).all()


def test_masked_whiten_hand_case():
    values = t([[1.0, 2.0, 3.0, 1000.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, unbiased var 1
    assert_close(masked_whiten(values, mask, eps=0.0), t([[-1.0, 0.0, 1.0, 0.0]]))
    assert_close(masked_whiten(values, mask, shift_mean=False, eps=0.0), t([[1.0, 2.0, 3.0, 0.0]]))


# ----------------------------------------------------------------------------------------------------
# KL estimators
# ----------------------------------------------------------------------------------------------------


def test_kl_estimators_hand_values():
    logp = t([[math.log(0.5), math.log(0.1)]])
    ref = t([[math.log(0.25), math.log(0.4)]])
    d = [math.log(2.0), math.log(0.25)]
    assert_close(kl_estimate(logp, ref, KLEstimator.K1), t([d]))
    assert_close(kl_estimate(logp, ref), t([d]))  # k1 is the default
    assert_close(kl_estimate(logp, ref, "k2"), t([[0.5 * d[0] ** 2, 0.5 * d[1] ** 2]]))
    # k3: r = q/p = 0.5 and 4  -> (r - 1) - log r
    assert_close(kl_estimate(logp, ref, "k3"), t([[-0.5 - math.log(0.5), 3.0 - math.log(4.0)]]))
    # identical distributions give exactly zero for all three
    for est in KLEstimator:
        assert (kl_estimate(logp, logp, est) == 0).all()


def test_kl_estimator_unknown_name():
    with pytest.raises(ValueError):
        kl_estimate(t([0.0]), t([0.0]), "k4")


def test_kl_estimators_converge_to_exact_kl():
    p = t([0.5, 0.2, 0.15, 0.1, 0.05])
    q = t([0.2, 0.3, 0.1, 0.25, 0.15])
    exact = float((p * (p / q).log()).sum())  # KL(p || q) ~ 0.35
    g = torch.Generator().manual_seed(1234)
    n = 200_000
    x = torch.multinomial(p, n, replacement=True, generator=g).view(400, 500)
    logp, logq = p.log()[x], q.log()[x]
    k1 = kl_estimate(logp, logq, KLEstimator.K1)
    k3 = kl_estimate(logp, logq, KLEstimator.K3)
    # standard errors are ~0.0015 (k1) and ~0.001 (k3); 0.01 is > 6 sigma
    assert abs(k1.mean().item() - exact) < 0.01
    assert abs(k3.mean().item() - exact) < 0.01
    assert (k3 >= 0).all()
    assert (k1 < 0).any()  # k1 is unbiased but not non-negative per token


def test_k3_nonnegative_on_random_logprobs():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(64, 64, generator=g) * 5
    b = torch.randn(64, 64, generator=g) * 5
    assert (kl_estimate(a, b, "k3") >= 0).all()
    assert (kl_estimate(a, b, "k2") >= 0).all()
    tiny = torch.full((3,), 1e-9, dtype=F64)
    assert (kl_estimate(tiny, torch.zeros(3, dtype=F64), "k3") >= 0).all()


# ----------------------------------------------------------------------------------------------------
# Rewards and GAE
# ----------------------------------------------------------------------------------------------------


def test_kl_penalized_rewards_hand_case():
    scores = t([1.0, 2.0])
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = t([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    out = kl_penalized_rewards(scores, kl, mask, kl_coef=0.5)
    assert_close(out, t([[-0.05, -0.1 + 1.0, 0.0], [-0.2, -0.25, -0.3 + 2.0]]))


def test_kl_penalized_rewards_score_on_last_real_token():
    lengths = [1, 4, 2, 5]
    mask = ragged_mask(lengths, 5)
    scores = t([10.0, 20.0, 30.0, 40.0])
    out = kl_penalized_rewards(scores, torch.zeros(4, 5, dtype=F64), mask.bool(), kl_coef=0.1)
    for b, length in enumerate(lengths):
        expected = torch.zeros(5, dtype=F64)
        expected[length - 1] = scores[b]
        assert_close(out[b], expected)


def test_kl_penalized_rewards_empty_row_raises():
    with pytest.raises(ValueError):
        kl_penalized_rewards(t([1.0, 2.0]), torch.zeros(2, 3, dtype=F64), ragged_mask([2, 0], 3), 0.1)


def gae_reference(rewards, values, lengths, gamma, lam):
    """Explicit A_t = sum_l (gamma*lam)^l delta_{t+l} with V = 0 after the last real token."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        L = lengths[b]
        deltas = []
        for k in range(L):
            v_next = values[b][k + 1] if k + 1 < L else 0.0
            deltas.append(rewards[b][k] + gamma * v_next - values[b][k])
        for s in range(L):
            adv[b][s] = sum((gamma * lam) ** l * deltas[s + l] for l in range(L - s))  # noqa: E741
    return adv


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.5, 1.0)])
def test_gae_matches_explicit_sum(gamma, lam):
    g = torch.Generator().manual_seed(7)
    lengths = [6, 1, 3, 4, 2]
    B, T = len(lengths), 6
    mask = ragged_mask(lengths, T)
    # padding holds garbage on purpose: it must not leak into the result
    rewards = torch.randn(B, T, generator=g, dtype=F64)
    values = torch.randn(B, T, generator=g, dtype=F64)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    expected = t(gae_reference(rewards.tolist(), values.tolist(), lengths, gamma, lam))
    assert_close(adv, expected)
    assert_close(ret, (expected + values) * mask)
    assert (adv[mask == 0] == 0).all()
    assert (ret[mask == 0] == 0).all()


def test_gae_gamma1_lam1_is_reward_to_go_minus_value():
    g = torch.Generator().manual_seed(8)
    lengths = [5, 3, 1]
    mask = ragged_mask(lengths, 5)
    rewards = torch.randn(3, 5, generator=g, dtype=F64)
    values = torch.randn(3, 5, generator=g, dtype=F64)
    adv, ret = gae_advantages(rewards, values, mask.bool(), gamma=1.0, lam=1.0)
    for b, L in enumerate(lengths):
        for s in range(L):
            to_go = float(rewards[b, s:L].sum())
            assert adv[b, s].item() == pytest.approx(to_go - values[b, s].item(), abs=1e-12)
            assert ret[b, s].item() == pytest.approx(to_go, abs=1e-12)


def test_gae_hand_case():
    # gamma 0.5, lam 0.5, one row of length 2: r = (1, 2), V = (3, 4)
    # delta_1 = 2 - 4 = -2 ; delta_0 = 1 + 0.5*4 - 3 = 0 ; A_1 = -2 ; A_0 = 0 + 0.25 * -2 = -0.5
    adv, ret = gae_advantages(t([[1.0, 2.0, 5.0]]), t([[3.0, 4.0, 5.0]]), t([[1.0, 1.0, 0.0]]), 0.5, 0.5)
    assert_close(adv, t([[-0.5, -2.0, 0.0]]))
    assert_close(ret, t([[2.5, 2.0, 0.0]]))


# ----------------------------------------------------------------------------------------------------
# PPO policy loss
# ----------------------------------------------------------------------------------------------------


def _policy_case(ratio: float, adv: float, eps: float = 0.2):
    logprobs = t([[math.log(ratio)]]).requires_grad_(True)
    old = t([[0.0]])
    loss, clip_frac, approx_kl = policy_loss(logprobs, old, t([[adv]]), t([[1.0]]), eps)
    loss.backward()
    return loss.item(), logprobs.grad.item(), clip_frac.item(), approx_kl.item()


@pytest.mark.parametrize(("ratio", "adv"), [(1.5, 2.0), (1.21, 0.3), (0.5, -2.0), (0.79, -0.3)])
def test_policy_loss_flat_outside_clip(ratio, adv):
    loss, grad, clip_frac, _ = _policy_case(ratio, adv)
    clipped_ratio = 1.2 if adv > 0 else 0.8
    assert loss == pytest.approx(-adv * clipped_ratio)
    assert grad == 0.0
    assert clip_frac == 1.0


@pytest.mark.parametrize(
    ("ratio", "adv"),
    [
        (1.0, 2.0),
        (1.1, 2.0),
        (0.9, -1.0),
        (1.19, -3.0),
        (0.5, 2.0),
        (1.5, -2.0),
    ],  # last two: pessimistic side
)
def test_policy_loss_unclipped_inside_or_pessimistic(ratio, adv):
    loss, grad, clip_frac, approx_kl = _policy_case(ratio, adv)
    assert loss == pytest.approx(-adv * ratio)
    # d(-A * exp(logp - old)) / d logp = -A * ratio
    assert grad == pytest.approx(-adv * ratio)
    assert clip_frac == 0.0
    assert approx_kl == pytest.approx(0.5 * math.log(ratio) ** 2)


def test_policy_loss_hand_batch_and_gradients():
    eps = 0.2
    ratios = [[1.5, 1.0, 0.5, 7.0], [0.7, 1.1, 3.0, 0.1]]
    advs = [[1.0, 1.0, -1.0, 5.0], [-2.0, 1.0, -1.0, 9.0]]
    mask = t([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    logprobs = torch.log(t(ratios)).requires_grad_(True)
    old = torch.zeros(2, 4, dtype=F64)
    loss, clip_frac, approx_kl = policy_loss(logprobs, old, t(advs), mask, eps)
    # real tokens (ratio, A) -> loss_t:
    # (1.5, 1) clipped -1.2 ; (1.0, 1) in range -1.0 ; (0.5, -1) clipped 0.8 ; (0.7, -2) clipped 1.6 ;
    # (1.1, 1) in range -1.1 ; (3.0, -1) pessimistic unclipped 3.0 > clipped 1.2
    per_token = [-1.2, -1.0, 0.8, 1.6, -1.1, 3.0]
    assert_close(loss, t(sum(per_token) / 6))
    assert_close(clip_frac, t(3 / 6))
    lr = [math.log(r) for r in (1.5, 1.0, 0.5, 0.7, 1.1, 3.0)]
    assert_close(approx_kl, t(sum(0.5 * x * x for x in lr) / 6))
    assert not clip_frac.requires_grad and not approx_kl.requires_grad
    loss.backward()
    expected_grad = t([[0.0, -1.0, 0.0, 0.0], [0.0, -1.1, 3.0, 0.0]]) / 6
    assert_close(logprobs.grad, expected_grad)


def test_policy_loss_garbage_in_padding_gives_finite_gradients():
    logprobs = t([[-1.0, 500.0]]).requires_grad_(True)
    old = t([[-1.2, -500.0]])
    loss, _, _ = policy_loss(logprobs, old, t([[1.0, 1.0]]), t([[1.0, 0.0]]), 0.2)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0, 1].item() == 0.0


# ----------------------------------------------------------------------------------------------------
# Value loss and explained variance
# ----------------------------------------------------------------------------------------------------


def test_value_loss_hand_cases():
    eps = 0.2
    old = t([[1.0, 1.0, 1.0, 1.0]])
    values = t([[1.5, 0.5, 1.1, 9.0]])
    returns = t([[0.0, 0.0, 2.0, 9.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])
    # token 0: v_clip 1.2; (1.5)^2 = 2.25 > 1.44 -> unclipped wins, not clipped
    # token 1: v_clip 0.8; (0.5)^2 = 0.25 < 0.64 -> clipped wins
    # token 2: v_clip 1.1 (in range); both 0.81 -> not clipped
    loss, clip_frac = value_loss(values, old, returns, mask, eps)
    assert_close(loss, t(0.5 * (2.25 + 0.64 + 0.81) / 3))
    assert_close(clip_frac, t(1 / 3))
    assert not clip_frac.requires_grad


def test_value_loss_gradients_clipped_vs_unclipped():
    v = t([[1.5, 0.5, 1.1]]).requires_grad_(True)
    loss, _ = value_loss(v, t([[1.0, 1.0, 1.0]]), t([[0.0, 0.0, 2.0]]), torch.ones(1, 3, dtype=F64), 0.2)
    loss.backward()
    # d/dv 0.5 * mean((v - R)^2) = (v - R) / n where unclipped; 0 where the clipped branch wins
    assert_close(v.grad, t([[1.5, 0.0, -0.9]]) / 3)


def test_value_loss_no_clip_equals_half_mse():
    g = torch.Generator().manual_seed(5)
    values = torch.randn(3, 4, generator=g, dtype=F64)
    returns = torch.randn(3, 4, generator=g, dtype=F64)
    mask = ragged_mask([4, 2, 3], 4)
    loss, clip_frac = value_loss(values, values.clone(), returns, mask, 1e6)
    assert_close(loss, 0.5 * ((values - returns) ** 2 * mask).sum() / mask.sum())
    assert clip_frac.item() == 0.0


def test_explained_variance():
    returns = t([[1.0, 2.0, 3.0, 4.0, 123.0]])
    mask = t([[1.0, 1.0, 1.0, 1.0, 0.0]])
    assert_close(explained_variance(returns.clone(), returns, mask), t(1.0))
    # predicting the mean return explains nothing
    assert_close(explained_variance(torch.full_like(returns, 2.5), returns, mask), t(0.0))
    # residual (0, 0, 0, -1): biased var 0.1875; Var(returns) = 1.25 -> 1 - 0.15
    values = t([[1.0, 2.0, 3.0, 5.0, -7.0]])
    assert_close(explained_variance(values, returns, mask), t(0.85))
    # constant returns: undefined ratio -> 0, not nan
    ev = explained_variance(t([[0.0, 1.0]]), t([[3.0, 3.0]]), t([[1.0, 1.0]]))
    assert ev.item() == 0.0


# ----------------------------------------------------------------------------------------------------
# Micro-batch invariance of the sum forms
# ----------------------------------------------------------------------------------------------------


def test_micro_batch_invariance():
    g = torch.Generator().manual_seed(11)
    lengths = [7, 3, 1, 5, 6, 2]
    B, T = len(lengths), 7
    mask = ragged_mask(lengths, T)
    logprobs = (torch.randn(B, T, generator=g, dtype=F64) * 0.3 - 2.0).requires_grad_(True)
    old = logprobs.detach() + torch.randn(B, T, generator=g, dtype=F64) * 0.3
    adv = torch.randn(B, T, generator=g, dtype=F64)
    values = torch.randn(B, T, generator=g, dtype=F64).requires_grad_(True)
    old_values = values.detach() + torch.randn(B, T, generator=g, dtype=F64) * 0.3
    returns = torch.randn(B, T, generator=g, dtype=F64)
    eps = 0.2

    full_pl, _, _ = policy_loss(logprobs, old, adv, mask, eps)
    full_vl, _ = value_loss(values, old_values, returns, mask, eps)
    full_pl_grad, full_vl_grad = torch.autograd.grad(full_pl + full_vl, [logprobs, values])

    total_tokens = mask.sum()
    acc_pl = torch.zeros((), dtype=F64)
    acc_vl = torch.zeros((), dtype=F64)
    for sl in (slice(0, 2), slice(2, 3), slice(3, 6)):
        acc_pl = acc_pl + policy_loss_sum(logprobs[sl], old[sl], adv[sl], mask[sl], eps) / total_tokens
        acc_vl = acc_vl + value_loss_sum(values[sl], old_values[sl], returns[sl], mask[sl], eps) / total_tokens
    assert_close(acc_pl, full_pl)
    assert_close(acc_vl, full_vl)
    micro_pl_grad, micro_vl_grad = torch.autograd.grad(acc_pl + acc_vl, [logprobs, values])
    assert_close(micro_pl_grad, full_pl_grad)
    assert_close(micro_vl_grad, full_vl_grad)
    # some tokens must actually be clipped for this to exercise the clipped branch
    assert policy_loss(logprobs, old, adv, mask, eps)[1].item() > 0
    assert value_loss(values, old_values, returns, mask, eps)[1].item() > 0


# ----------------------------------------------------------------------------------------------------
# KL controllers
# ----------------------------------------------------------------------------------------------------


def test_fixed_kl_controller_constant():
    ctl = FixedKLController(0.05)
    assert ctl.value == 0.05
    for kl in (0.0, 3.0, 100.0):
        assert ctl.update(kl, 256) == 0.05
    assert ctl.value == 0.05
    with pytest.raises(ValueError):
        FixedKLController(-0.1)


def test_adaptive_kl_controller_hand_sequence():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    assert ctl.value == 0.1
    n = 1000  # K_beta = 0.1
    expected = 0.1
    # (kl, clipped error e): 9 -> 0.5 clipped to +0.2 ; 6 -> 0 ; 3 -> -0.5 clipped to -0.2 ;
    # 6.6 -> +0.1 ; 4.8 -> -0.2 exactly ; 60 -> +9 clipped to +0.2
    for kl, err in [(9.0, 0.2), (6.0, 0.0), (3.0, -0.2), (6.6, 0.1), (4.8, -0.2), (60.0, 0.2)]:
        expected *= 1 + 0.1 * err
        assert ctl.update(kl, n) == pytest.approx(expected, rel=1e-12)
        assert ctl.value == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.1 * 1.02 * 1.0 * 0.98 * 1.01 * 0.98 * 1.02, rel=1e-12)
    # the step size scales with n_steps / horizon
    ctl2 = AdaptiveKLController(0.2, 1.0, 100)
    assert ctl2.update(2.0, 50) == pytest.approx(0.2 * (1 + 0.2 * 0.5))
    assert ctl2.update(0.95, 0) == pytest.approx(0.2 * 1.1)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"init_kl_coef": -0.1, "target": 6.0, "horizon": 10}, "init_kl_coef"),
        ({"init_kl_coef": 0.1, "target": 0.0, "horizon": 10}, "target"),
        ({"init_kl_coef": 0.1, "target": -1.0, "horizon": 10}, "target"),
        ({"init_kl_coef": 0.1, "target": 6.0, "horizon": 0}, "horizon"),
    ],
)
def test_adaptive_kl_controller_invalid_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaptiveKLController(**kwargs)


def test_kl_controllers_reject_non_finite_kl():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 6.0, 10).update(float("nan"), 1)
