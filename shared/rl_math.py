"""Pure torch math for PPO-based RLHF (InstructGPT-style).

Shapes used throughout: ``B`` = batch, ``T`` = response tokens (right-padded), ``V`` = vocabulary.
``mask`` is a ``(B, T)`` float or bool tensor with 1 on real response tokens and 0 on padding; the real
tokens of a row are a prefix (real tokens first, then padding). Masks are treated as binary: any non-zero
entry counts as a real token.

References:
    * Ouyang et al. 2022, "Training language models to follow instructions with human feedback" (InstructGPT).
    * Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences".
    * Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"
      (GAE).
    * Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (PPO).
    * Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html (k1/k2/k3).
    * Shao et al. 2024, "DeepSeekMath" (GRPO); Liu et al. 2025, "Understanding R1-Zero-Like Training" (Dr. GRPO).
    * Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization ..." (RLOO).
    * Hu 2025, "REINFORCE++".
    * Hilton et al. 2021, "Batch size-invariance for policy optimization"; Fu et al. 2025, AReaL (decoupled PPO).

This module depends on torch only, so that every role (trainer, tests, tools) can import it cheaply.
"""

from __future__ import annotations

import enum
import math

import torch

__all__ = [
    "AdaptiveKLController",
    "AdvantageEstimator",
    "FixedKLController",
    "KLEstimator",
    "behaviour_weights",
    "discounted_returns",
    "entropy_from_logits",
    "explained_variance",
    "gae_advantages",
    "grpo_advantages",
    "kl_estimate",
    "kl_loss_sum",
    "kl_penalized_rewards",
    "logprobs_and_entropy",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "policy_loss_sum",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "value_loss",
    "value_loss_sum",
    "weighted_policy_loss_sum",
]

Dim = int | tuple[int, ...] | None


class KLEstimator(enum.StrEnum):
    """Per-sample estimators of KL(p || q) from samples x ~ p (Schulman 2020), with r = q(x) / p(x).

    A ``str`` subclass (``enum.StrEnum``): config strings such as ``"k3"`` compare equal to the members.
    """

    K1 = "k1"  # log p - log q  (unbiased, can be negative per token)
    K2 = "k2"  # 0.5 * (log p - log q)^2  (biased, low variance, always >= 0)
    K3 = "k3"  # (r - 1) - log r with r = q/p = exp(log q - log p); unbiased, always >= 0


# --------------------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# --------------------------------------------------------------------------------------------------------


# Rows of (V,) logits turned into float32 at a time: about 256 MiB of temporaries whatever the vocabulary.
_CHUNK_ELEMENTS = 1 << 26


def _row_chunks(logits: torch.Tensor, temperature: float):
    """Yields float32 (n, V) slices of ``logits`` flattened to rows, divided by the temperature: a few rows at a
    time, so that no float32 copy of the whole (B, T, V) tensor is ever made at once beyond what autograd keeps."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, flat.shape[0], rows):
        part = flat[start : start + rows].float()  # no copy when already float32
        yield part / temperature if temperature != 1.0 else part


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each label under softmax(logits / T).

    ``out[b, t] = z[b, t, y] - logsumexp(z[b, t])`` with ``z = logits / T`` and ``y = labels[b, t]``.

    Shapes: logits ``(B, T, V)`` (any float dtype), labels ``(B, T)`` int64 -> ``(B, T)`` float32.

    T is the sampling temperature (TRL, OpenRLHF): the policy that sampled at temperature T is softmax(logits / T),
    so generation, the trainer and the reference all score tokens under it and the PPO ratio starts at 1.

    Computed in float32 even for bf16/fp16 logits (bf16's ~3 significant digits are too coarse for the ratios
    exp(logp - old_logp) that PPO takes), a few rows at a time: float32 logits with T = 1 are never copied; other
    dtypes or temperatures make one float32 copy in all (the part autograd keeps), never a log_softmax of the
    whole tensor.
    """
    flat_labels = labels.reshape(-1, 1).long()
    out, start = [], 0
    for part in _row_chunks(logits, temperature):
        chosen = part.gather(-1, flat_labels[start : start + part.shape[0]]).squeeze(-1)
        out.append(chosen - torch.logsumexp(part, dim=-1))
        start += part.shape[0]
    return torch.cat(out).reshape(labels.shape)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy in nats of softmax(logits / T): ``H = -sum_v p_v log p_v``.

    Shapes: ``(B, T, V)`` -> ``(B, T)`` float32. Logits of ``-inf`` (masked-out vocabulary entries) are
    allowed and contribute 0 (the limit of p log p as p -> 0), with finite gradients. Computed a few rows at a
    time, as ``logprobs_from_logits``.
    """
    out = []
    for part in _row_chunks(logits, temperature):
        logp = torch.log_softmax(part, dim=-1)
        # Clamp so that p = 0 entries give 0 * finite instead of 0 * (-inf) = nan (forward and backward).
        logp_finite = logp.clamp(min=torch.finfo(logp.dtype).min)
        out.append(-(logp.exp() * logp_finite).sum(dim=-1))
    return torch.cat(out).reshape(logits.shape[:-1])


# --------------------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------------------


def logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, entropy_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`logprobs_from_logits` and :func:`entropy_from_logits` sharing one ``logsumexp`` per chunk of rows:
    ``lse = logsumexp(z)``, ``out = z[y] - lse``, ``H = lse - sum_v softmax(z)_v z_v`` (= ``-sum_v p_v log p_v``),
    with ``z = logits / T``.

    The log-probs keep their graph as in :func:`logprobs_from_logits` (no stored (B, T, V) beyond the logits); the
    entropy keeps its own only with ``entropy_grad`` (when it is part of the loss: it costs autograd a float32
    (B, T, V) tensor), else its softmax is freed chunk by chunk. Shapes: ``(B, T, V)``, ``(B, T)`` -> two ``(B, T)``
    float32, equal to the two functions' to float rounding. ``-inf`` logits contribute 0 to the entropy.
    """
    flat_labels = labels.reshape(-1, 1).long()
    chosen, entropies, start = [], [], 0
    for part in _row_chunks(logits, temperature):
        lse = torch.logsumexp(part, dim=-1)
        chosen.append(part.gather(-1, flat_labels[start : start + part.shape[0]]).squeeze(-1) - lse)
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            probs = torch.exp(part - lse.unsqueeze(-1))
            entropies.append(lse - (probs * part.clamp(min=torch.finfo(part.dtype).min)).sum(dim=-1))
        start += part.shape[0]
    return torch.cat(chosen).reshape(labels.shape), torch.cat(entropies).reshape(labels.shape)


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """``sum(values * mask)`` over all entries (``dim=None``, a scalar) or along ``dim``.

    Shapes: values and mask broadcastable (typically both ``(B, T)``). Padding entries are selected out
    with ``torch.where`` rather than multiplied by 0, so that non-finite garbage in padding (e.g. inf)
    cannot turn the sum into nan.
    """
    selected = torch.where(_as_bool(mask), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def _mask_count(mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    # Count in float32: bf16 cannot represent integers above 256 exactly.
    m = _as_bool(mask).to(torch.float32)
    return m.sum() if dim is None else m.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """``sum(values * mask) / sum(mask)``, over all entries (scalar) or along ``dim``.

    The denominator is clamped at 1e-8, so an all-zero mask (or an all-padding row with ``dim``) gives 0,
    not nan.
    """
    return masked_sum(values, mask, dim) / _mask_count(mask, dim).clamp(min=1e-8)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Scalar variance over the masked entries: ``mean((x - mean(x))^2)`` over ``n = sum(mask)`` entries.

    With ``unbiased`` the Bessel correction ``n / (n - 1)`` is applied, and fewer than 2 masked entries
    raise ``ValueError`` (the estimate is undefined). The biased form of an empty mask is 0.
    """
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = float(_mask_count(mask).item())
        if n < 2:
            raise ValueError(f"masked_var(unbiased=True) needs at least 2 masked entries, got {n:g}")
        var = var * (n / (n - 1))
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise the masked entries: ``(x - mean) / sqrt(var + eps)`` with mean and unbiased variance taken
    over the masked entries only (so padding does not bias the statistics).

    With ``shift_mean=False`` the mean is added back (``(x - mean) / sqrt(var + eps) + mean``): only the
    scale changes. Masked-out entries are returned as 0. Shapes: ``(B, T)`` -> ``(B, T)``. Raises
    ``ValueError`` when fewer than 2 entries are masked (see :func:`masked_var`).
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask, unbiased=True)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(_as_bool(mask), whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


# --------------------------------------------------------------------------------------------------------
# KL penalty and rewards
# --------------------------------------------------------------------------------------------------------


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator | str = KLEstimator.K1
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens a_t sampled from pi (Schulman 2020).

    With ``logprobs = log pi(a_t)``, ``ref_logprobs = log pi_ref(a_t)``, ``d = logprobs - ref_logprobs``
    and ``r = pi_ref(a_t) / pi(a_t) = exp(-d)``:

    * k1 = ``d``                                    unbiased; can be negative per token.
    * k2 = ``0.5 * d^2``                            biased (exact to second order), always >= 0.
    * k3 = ``(r - 1) - log r = expm1(-d) + d``      unbiased (E_pi[r] = 1), always >= 0.

    Shapes: ``(B, T)`` -> ``(B, T)`` (any equal shapes). No masking here: padding positions carry whatever
    the inputs hold. An unknown estimator name raises ``ValueError``.
    """
    est = KLEstimator(estimator)
    d = logprobs - ref_logprobs
    if est is KLEstimator.K1:
        return d
    if est is KLEstimator.K2:
        return 0.5 * d.square()
    # expm1 keeps k3 accurate (and >= 0) when d is tiny, where exp(-d) - 1 would cancel.
    return torch.expm1(-d) + d


def kl_penalized_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards of InstructGPT / Ziegler et al. 2019: ``R(x, y) = r(x, y) - beta * KL``.

    ``r_t = -kl_coef * kl_t`` on every real token, plus ``scores[b]`` (the reward model's sequence score)
    added at the last real token of row b, index ``sum(mask[b]) - 1``. Masked positions are 0.

    Shapes: scores ``(B,)``, kl ``(B, T)``, mask ``(B, T)`` -> ``(B, T)``. A row with no real token raises
    ``ValueError`` (its score would have nowhere to go).
    """
    if scores.dim() != 1 or kl.dim() != 2 or scores.shape[0] != kl.shape[0]:
        raise ValueError(f"expected scores (B,) and kl (B, T), got {tuple(scores.shape)} and {tuple(kl.shape)}")
    m = _as_bool(mask)
    lengths = m.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError(f"rows {torch.nonzero(lengths == 0).flatten().tolist()} have no real response token")
    rewards = torch.where(m, -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    last = (lengths - 1).long().unsqueeze(1)
    return rewards.scatter_add(1, last, scores.to(rewards.dtype).unsqueeze(1))


# --------------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------------


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's real tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = sum_{l >= 0} (gamma * lam)^l * delta_{t+l}``,
    computed by the recursion ``A_t = delta_t + gamma * lam * A_{t+1}``; ``returns = A + V`` (the
    lambda-return, the value-function target). The episode ends after the last real token, so the value
    after it is 0 and the sums stop there.

    Shapes: rewards, values, mask ``(B, T)`` -> ``(advantages, returns)``, both ``(B, T)``, with masked
    positions 0. Reverse loop over T, vectorised over B. No whitening here (callers decide). Pass detached
    tensors (rollout values); this function does not detach.
    """
    m = _as_bool(mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    # Zeroing padding makes V_{t+1} = 0 after the last real token (prefix masks) and keeps garbage out.
    r = torch.where(m, rewards, zero)
    v = torch.where(m, values, zero)
    mf = m.to(v.dtype)
    T = r.shape[1]
    next_value = torch.zeros_like(v[:, 0])
    next_adv = torch.zeros_like(v[:, 0])
    advs = [next_adv] * T
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        # Multiplying by the mask keeps padding at exactly 0 and stops accumulation across it.
        next_adv = (delta + gamma * lam * next_adv) * mf[:, t]
        advs[t] = next_adv
        next_value = v[:, t]
    advantages = torch.stack(advs, dim=1)
    returns = torch.where(m, advantages + v, zero)
    return advantages, returns


# --------------------------------------------------------------------------------------------------------
# PPO losses
# --------------------------------------------------------------------------------------------------------


def _check_clip_range(clip_range: float) -> None:
    if not clip_range >= 0:
        raise ValueError(f"clip_range must be >= 0, got {clip_range}")


def _policy_loss_terms(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped loss, clipped flag and log-ratio (shared by the mean and sum forms)."""
    _check_clip_range(clip_range)
    m = _as_bool(mask)
    # Zero the log-ratio on padding before exp: a huge padded log-ratio would overflow to inf and give nan
    # gradients even though the loss ignores those positions.
    log_ratio = torch.where(m, logprobs - old_logprobs, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    # max of the two negated objectives = the pessimistic bound of PPO's min(...) objective.
    loss_t = torch.maximum(unclipped, clipped)
    return loss_t, clipped > unclipped, log_ratio


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), averaged over real tokens.

    ``ratio_t = exp(logprobs_t - old_logprobs_t)``,
    ``loss_t = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))``.

    Returns scalars ``(loss, clip_fraction, approx_kl)``:
    ``loss = masked_mean(loss_t)``;
    ``clip_fraction = masked_mean(1[-A * clipped_ratio > -A * ratio])`` (tokens where the clip is active);
    ``approx_kl = masked_mean(0.5 * (logprobs - old_logprobs)^2)`` (k2 estimate of KL(old || new)).
    The last two are detached diagnostics. Inputs are ``(B, T)``; ``eps = clip_range``.
    """
    loss_t, is_clipped, log_ratio = _policy_loss_terms(logprobs, old_logprobs, advantages, mask, clip_range)
    loss = masked_mean(loss_t, mask)
    clip_fraction = masked_mean(is_clipped.to(loss_t.dtype), mask).detach()
    approx_kl = masked_mean(0.5 * log_ratio.square(), mask).detach()
    return loss, clip_fraction, approx_kl


def policy_loss_sum(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> torch.Tensor:
    """Masked SUM of the per-token PPO clipped loss of :func:`policy_loss` (same ``loss_t``).

    For gradient accumulation over micro-batches: ``sum_k policy_loss_sum(micro_k) / total_real_tokens``
    equals ``policy_loss(full_batch)[0]``, whatever the token counts of the micro-batches. Scalar.
    """
    loss_t, _, _ = _policy_loss_terms(logprobs, old_logprobs, advantages, mask, clip_range)
    return masked_sum(loss_t, mask)


def _value_loss_terms(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped squared error (without the 0.5) and the clipped flag."""
    _check_clip_range(clip_range)
    m = _as_bool(mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    # Select out padding before squaring so that garbage there cannot produce inf/nan gradients.
    values = torch.where(m, values, zero)
    old_values = torch.where(m, old_values, zero)
    returns = torch.where(m, returns, zero)
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err_unclipped = (values - returns).square()
    err_clipped = (v_clipped - returns).square()
    return torch.maximum(err_unclipped, err_clipped), err_clipped > err_unclipped


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (PPO2 / Ziegler et al. 2019 implementation), averaged over real tokens.

    ``v_clip = old + clip(values - old, -eps, eps)``,
    ``loss = 0.5 * masked_mean(max((values - R)^2, (v_clip - R)^2))``.

    Returns scalars ``(loss, clip_fraction)`` with
    ``clip_fraction = masked_mean(1[(v_clip - R)^2 > (values - R)^2])`` detached. Inputs are ``(B, T)``.
    """
    loss_t, is_clipped = _value_loss_terms(values, old_values, returns, mask, clip_range)
    loss = 0.5 * masked_mean(loss_t, mask)
    clip_fraction = masked_mean(is_clipped.to(loss_t.dtype), mask).detach()
    return loss, clip_fraction


def value_loss_sum(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> torch.Tensor:
    """``0.5 *`` masked SUM of the per-token clipped value loss of :func:`value_loss` (same terms).

    ``sum_k value_loss_sum(micro_k) / total_real_tokens == value_loss(full_batch)[0]``. Scalar.
    """
    loss_t, _ = _value_loss_terms(values, old_values, returns, mask, clip_range)
    return 0.5 * masked_sum(loss_t, mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over the masked entries (biased variances).

    1 is a perfect value function, 0 is no better than predicting the mean return, negative is worse.
    Returns a detached scalar; 0 when ``Var(returns) == 0`` (undefined ratio) instead of nan/inf.
    """
    values = values.detach()
    returns = returns.detach()
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    positive = var_returns > 0
    safe = torch.where(positive, var_returns, torch.ones_like(var_returns))
    return torch.where(positive, 1.0 - var_residual / safe, torch.zeros_like(var_returns))


# --------------------------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------------------------


def _check_kl(current_kl: float, n_steps: int) -> float:
    kl = float(current_kl)
    if not math.isfinite(kl):
        raise ValueError(f"current_kl must be finite, got {current_kl}")
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    return kl


class FixedKLController:
    """Constant KL coefficient beta (InstructGPT uses a fixed beta).

    ``current_kl`` passed to :meth:`update` is per-sequence KL (sum over response tokens, mean over the
    batch); it is ignored here and only kept for interface parity with :class:`AdaptiveKLController`.
    """

    def __init__(self, kl_coef: float):
        if not kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No change; returns the (constant) coefficient."""
        _check_kl(current_kl, n_steps)
        return self.value


class AdaptiveKLController:
    """Adaptive KL coefficient, Ziegler et al. 2019, section 2.2:

    ``e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)``, ``beta_{t+1} = beta_t * (1 + K_beta * e_t)``,
    ``K_beta = n_steps / horizon``.

    ``KL_t`` (``current_kl``) is the per-sequence KL: sum over a response's tokens, mean over the batch; it
    must be in the same units as ``target``. ``n_steps`` is the number of samples (episodes) behind it.
    The coefficient is floored at 0, which only matters if ``n_steps > 5 * horizon``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if not init_kl_coef >= 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if not target > 0:
            raise ValueError(f"target must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one proportional update and return the new coefficient."""
        kl = _check_kl(current_kl, n_steps)
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value = max(0.0, self.value * (1.0 + error * n_steps / self.horizon))
        return self.value


# --------------------------------------------------------------------------------------------------------
# Critic-free advantage estimators
# --------------------------------------------------------------------------------------------------------


class AdvantageEstimator(enum.StrEnum):
    """How the PPO trainer turns rewards into advantages (names as in verl's ``adv_estimator``)."""

    GAE = "gae"  # learned critic: gae_advantages
    GRPO = "grpo"  # group-normalised sequence scores: grpo_advantages
    RLOO = "rloo"  # leave-one-out group baseline: rloo_advantages
    REINFORCE_PLUS_PLUS = "reinforce_plus_plus"  # batch-whitened returns: reinforce_pp_advantages


def _groups(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks shapes and group sizes; returns ``(inverse, counts)``: sample b belongs to group ``inverse[b]``
    (``0 <= inverse[b] < G``), and group g has ``counts[g]`` samples. Group ids need not be sorted or contiguous."""
    if scores.dim() != 1 or group_ids.shape != scores.shape or mask.dim() != 2 or mask.shape[0] != scores.shape[0]:
        raise ValueError(
            f"expected scores (B,), group_ids (B,) and mask (B, T), got {tuple(scores.shape)}, "
            f"{tuple(group_ids.shape)} and {tuple(mask.shape)}"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    ids, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    small = counts < 2
    if bool(small.any()):
        raise ValueError(
            "every group needs at least 2 samples (the group std and the leave-one-out mean are undefined for "
            f"one); group ids {ids[small].tolist()} have {counts[small].tolist()} sample(s)"
        )
    return inverse, counts


def _group_sum(values: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B,) values -> (B,): the sum of each sample's group, given back to every sample of that group."""
    sums = torch.zeros(counts.shape[0], dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    return sums[inverse]


def _float_scores(scores: torch.Tensor) -> torch.Tensor:
    return scores if scores.dtype.is_floating_point else scores.to(torch.float32)


def _broadcast_over_tokens(sequence_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, T): each row's value on its real tokens, 0 on padding."""
    zero = torch.zeros((), dtype=sequence_values.dtype, device=sequence_values.device)
    return torch.where(_as_bool(mask), sequence_values.unsqueeze(1), zero)


def grpo_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    mask: torch.Tensor,
    scale_rewards: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024, DeepSeekMath, section 4.1.2), one value per sequence.

    For sample i in a group G of k samples answering the same prompt:
    ``A_i = (r_i - mean_G(r)) / (std_G(r) + eps)``, with ``std_G`` the UNBIASED std
    ``sqrt(sum_{j in G} (r_j - mean_G)^2 / (k - 1))`` (what TRL's GRPOTrainer computes with ``torch.std``).
    ``scale_rewards=False`` drops the division: ``A_i = r_i - mean_G(r)`` (Dr. GRPO, Liu et al. 2025, which
    argues the std reweights prompts by difficulty). A group whose scores are all equal gets 0 either way.

    Shapes: scores ``(B,)``, group_ids ``(B,)`` integer (arbitrary ids; groups may be interleaved), mask
    ``(B, T)`` -> ``(B, T)``: ``A_i`` on every real token of row i, 0 on padding. A group of fewer than 2 samples
    raises ``ValueError``. Integer scores are computed in float32.
    """
    inverse, counts = _groups(scores, group_ids, mask)
    r = _float_scores(scores)
    k = counts.to(r.dtype)[inverse]
    advantages = r - _group_sum(r, inverse, counts) / k
    if scale_rewards:
        std = (_group_sum(advantages.square(), inverse, counts) / (k - 1)).sqrt()
        advantages = advantages / (std + eps)
    return _broadcast_over_tokens(advantages, mask)


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019).

    For sample i in a group G of k samples: ``A_i = r_i - (1 / (k - 1)) * sum_{j in G, j != i} r_j``, which
    equals ``k / (k - 1) * (r_i - mean_G(r))``: the baseline excludes r_i, so it is independent of sample i and
    the policy gradient stays unbiased.

    Shapes: scores ``(B,)``, group_ids ``(B,)`` integer (arbitrary ids; groups may be interleaved), mask
    ``(B, T)`` -> ``(B, T)``: ``A_i`` on every real token of row i, 0 on padding. A group of fewer than 2 samples
    raises ``ValueError``. Integer scores are computed in float32.
    """
    inverse, counts = _groups(scores, group_ids, mask)
    r = _float_scores(scores)
    k = counts.to(r.dtype)[inverse]
    advantages = r - (_group_sum(r, inverse, counts) - r) / (k - 1)
    return _broadcast_over_tokens(advantages, mask)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Reward-to-go over each row's real tokens: ``G_t = sum_{l >= 0} gamma^l * r_{t+l}``, by the recursion
    ``G_t = r_t + gamma * G_{t+1}`` (the episode ends after the last real token).

    Shapes: rewards, mask ``(B, T)`` -> ``(B, T)``, 0 on padding. Equals :func:`gae_advantages` with
    ``values = 0`` and ``lam = 1``.
    """
    m = _as_bool(mask)
    r = torch.where(m, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    mf = m.to(r.dtype)
    T = r.shape[1]
    next_return = torch.zeros_like(r[:, 0])
    returns = [next_return] * T
    for t in reversed(range(T)):
        # The mask keeps padding at exactly 0 and stops accumulation across it.
        next_return = (r[:, t] + gamma * next_return) * mf[:, t]
        returns[t] = next_return
    return torch.stack(returns, dim=1)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ advantages (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning LLMs").

    ``rewards`` are the per-token rewards of :func:`kl_penalized_rewards` (the sequence score at the last real
    token minus ``kl_coef * KL_t`` on every token); ``G_t = sum_{l >= 0} gamma^l * r_{t+l}``
    (:func:`discounted_returns`), and ``A = (G - mean) / sqrt(var + 1e-8)`` with the mean and unbiased variance
    taken over ALL real tokens of the batch (:func:`masked_whiten`): a global baseline instead of a critic or a
    per-prompt group.

    Shapes: rewards, mask ``(B, T)`` -> ``(B, T)``, 0 on padding. Fewer than 2 real tokens in the batch raise
    ``ValueError`` (see :func:`masked_var`).
    """
    return masked_whiten(discounted_returns(rewards, mask, gamma), mask)


# --------------------------------------------------------------------------------------------------------
# KL as a loss term, and the decoupled (off-policy) policy loss
# --------------------------------------------------------------------------------------------------------


def kl_loss_sum(
    logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: KLEstimator | str,
) -> torch.Tensor:
    """Masked SUM over real tokens of the per-token KL estimate of :func:`kl_estimate`, as a loss term (GRPO,
    Shao et al. 2024, eq. 4, uses k3) rather than a reward penalty. With ``d = logprobs - reference_logprobs``:
    k1 = ``d``; k2 = ``0.5 * d^2``; k3 = ``exp(-d) + d - 1 = exp(ref - logp) - (ref - logp) - 1 >= 0``.

    Gradients flow through ``logprobs`` (pass ``reference_logprobs`` detached). For tokens sampled from pi:
    E[grad k1] = 0 (k1 as a loss does nothing in expectation), E[grad k2] = grad KL(pi || ref) and
    E[grad k3] = grad KL(ref || pi).

    Like :func:`policy_loss_sum`, the caller divides by the total real-token count. Shapes: ``(B, T)`` -> scalar.
    Padding is zeroed before the estimator, so garbage there cannot overflow exp or give nan gradients.
    """
    m = _as_bool(mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    logprobs = torch.where(m, logprobs, zero)
    reference_logprobs = torch.where(m, reference_logprobs, zero)
    return masked_sum(kl_estimate(logprobs, reference_logprobs, estimator), m)


def behaviour_weights(
    proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance weights of the decoupled PPO loss (Hilton et al. 2021, "Batch size-invariance for
    policy optimization"; Fu et al. 2025, AReaL): ``w_t = min(pi_prox(a_t) / pi_behav(a_t), cap)
    = min(exp(proximal_logprobs_t - behaviour_logprobs_t), cap)``.

    ``behaviour_logprobs`` are those of the (older) policy that sampled the tokens; ``proximal_logprobs`` those
    of the recent policy the clip is centred on. The weights are detached (data, not a function of theta) and 0
    on padding. AReaL instead drops tokens whose weight exceeds the cap; truncating keeps them at ``cap``
    (as truncated importance sampling in IMPALA/V-trace). Shapes: ``(B, T)`` -> ``(B, T)``.
    """
    if not (cap > 0 and math.isfinite(cap)):
        raise ValueError(f"cap must be finite and > 0, got {cap}")
    m = _as_bool(mask)
    zero = torch.zeros((), dtype=proximal_logprobs.dtype, device=proximal_logprobs.device)
    # Zero the log-ratio on padding so that garbage there cannot overflow exp.
    log_ratio = torch.where(m, (proximal_logprobs - behaviour_logprobs).detach(), zero)
    return torch.where(m, torch.exp(log_ratio).clamp(max=cap), zero)


def weighted_policy_loss_sum(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked SUM of ``w_t * loss_t``, with ``loss_t`` the per-token PPO clipped loss of :func:`policy_loss`.

    The decoupled PPO objective (Hilton et al. 2021; AReaL) for a batch sampled by an older behaviour policy:
    ``old_logprobs`` are the PROXIMAL policy's (the clip is centred there) and ``weights`` come from
    :func:`behaviour_weights` (pi_prox / pi_behav, truncated). The weights are detached here. With
    ``weights=None`` this is :func:`policy_loss_sum` exactly. Shapes: ``(B, T)`` -> scalar; the caller divides by
    the total real-token count.
    """
    loss_t, _, _ = _policy_loss_terms(logprobs, old_logprobs, advantages, mask, clip_range)
    if weights is not None:
        loss_t = loss_t * weights.detach()
    return masked_sum(loss_t, mask)
