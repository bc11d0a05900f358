"""Pure torch losses for the supervised and preference stages of RLHF: SFT, reward models, DPO.

Shapes: ``B`` = batch, ``L`` = sequence length, ``V`` = vocabulary, ``P`` = preference pairs.

References:
    * Ouyang et al. 2022, "Training language models to follow instructions with human feedback" (InstructGPT):
      the supervised fine-tuning stage and the pairwise reward-model loss (eq. 1), with all C(K, 2) pairs of a
      ranking of K responses.
    * Bradley & Terry 1952, "Rank Analysis of Incomplete Block Designs": P(w beats l) = sigmoid(r_w - r_l).
    * Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"
      (DPO, eq. 7).

This module imports torch only (plus the standard library), so that every job and test can import it cheaply.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

__all__ = ["bradley_terry_loss", "dpo_loss", "ranking_pairs", "sft_loss_sum"]


def sft_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over the positions where ``loss_mask`` is 1 (supervised fine-tuning).

    ``loss_sum = sum_{b,t: mask[b,t]=1} -log softmax(logits[b, t])[labels[b, t]]``, ``n_tokens = sum(mask)``.

    The caller aligns the two: ``logits[b, t]`` is the prediction for ``labels[b, t]`` (for a causal LM,
    ``logits[:, :-1]`` against ``input_ids[:, 1:]``). The mask is 1 on completion tokens only, so prompt tokens
    and padding contribute nothing, whatever their labels or logits (labels there may be anything, e.g. -100).

    Shapes: logits ``(B, L, V)`` (any float dtype, computed in float32), labels ``(B, L)`` int, loss_mask
    ``(B, L)`` bool or float -> ``(loss_sum, n_tokens)``, both float32 scalars. Returning the sum (not the mean)
    lets gradient accumulation divide by the token count of the whole batch: the sum over micro-batches divided
    by the total count equals the full batch's token mean.
    """
    mask = loss_mask != 0
    safe_labels = torch.where(mask, labels.long(), torch.zeros((), dtype=torch.long, device=labels.device))
    token_loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), safe_labels.reshape(-1), reduction="none"
    ).reshape(labels.shape)
    zero = torch.zeros((), dtype=token_loss.dtype, device=token_loss.device)
    return torch.where(mask, token_loss, zero).sum(), mask.sum().to(torch.float32)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, target: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Pairwise reward-model loss (InstructGPT eq. 1, a Bradley-Terry likelihood), one value per pair.

    With margin ``m = r_w - r_l``:

    * hard labels (``target`` None): ``loss = -log sigmoid(m) = softplus(-m)``; ``log 2`` at margin 0, -> 0 as the
      margin grows;
    * soft labels: ``target`` p = P(chosen is better), e.g. an AI judge's probability, and the loss is the binary
      cross-entropy of the Bradley-Terry probability ``sigmoid(m)`` against it,
      ``loss = -(p log sigmoid(m) + (1 - p) log sigmoid(-m))``, minimal at ``sigmoid(m) = p``
      (``m = log(p / (1 - p))``); p = 1 is the hard loss exactly, p = 0.5 pulls the margin towards 0, and
      p < 0.5 says the label leans towards the rejected response.

    Shapes: ``(P,)``, ``(P,)``, target ``(P,)`` or a scalar, in [0, 1] -> ``(P,)`` float32. ``logsigmoid`` keeps it
    finite for any margin (a naive ``log(sigmoid(x))`` gives ``-inf`` for ``x < -104`` in float32).
    """
    margin = chosen_rewards.float() - rejected_rewards.float()
    if target is None:
        return -F.logsigmoid(margin)
    p = torch.as_tensor(target, dtype=torch.float32, device=margin.device)
    return -(p * F.logsigmoid(margin) + (1.0 - p) * F.logsigmoid(-margin))


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss (Rafailov et al. 2023, eq. 7), one value per pair.

    With sequence log-probs (sums over the response tokens) ``pi_w, pi_l`` under the policy and ``ref_w, ref_l``
    under the frozen reference:

    ``chosen_reward = beta * (pi_w - ref_w)``, ``rejected_reward = beta * (pi_l - ref_l)`` (the implicit rewards),
    ``loss = -log sigmoid(chosen_reward - rejected_reward)``.

    Shapes: four ``(P,)`` tensors -> ``(loss, chosen_rewards, rejected_rewards)``, each ``(P,)`` float32; the
    rewards are detached (diagnostics: accuracy = share of pairs with chosen > rejected, margin = their gap).
    ``loss`` is ``log 2`` when the policy equals the reference.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_logratio = policy_chosen_logps.float() - reference_chosen_logps.float()
    rejected_logratio = policy_rejected_logps.float() - reference_rejected_logps.float()
    loss = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))
    return loss, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()


def ranking_pairs(responses: list[str]) -> list[tuple[int, int]]:
    """All ``C(K, 2)`` ``(winner_index, loser_index)`` pairs of a ranking ``responses`` ordered best to worst.

    InstructGPT section 3.5: labellers rank K responses, which gives C(K, 2) comparisons; index ``i`` beats every
    index ``j > i``. ``K < 2`` raises ``ValueError`` (no comparison to learn from).
    """
    if len(responses) < 2:
        raise ValueError(f"a ranking needs at least 2 responses, got {len(responses)}")
    return list(itertools.combinations(range(len(responses)), 2))
