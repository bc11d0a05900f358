"""Direct Preference Optimization (Rafailov et al. 2023): the policy learns from preference pairs directly, against
a frozen reference, without a reward model or sampling.

Data rows (JSONL, JSON or Parquet):

- preference: ``{"prompt": str, "chosen": str, "rejected": str}``, one pair;
- ranking: ``{"prompt": str, "responses": [best, ..., worst]}``, all C(K, 2) pairs (InstructGPT section 3.5).

Pairs are grouped by prompt, and a group is the unit of batching (``batch_size`` and ``micro_batch_size`` count
prompts): a batch never splits a prompt's pairs, and each distinct response of a group is scored once per step
however many pairs it is in (K forwards for a ranking of K, not 2 * C(K, 2)). InstructGPT trains on all
comparisons of a prompt as one batch element for the same reasons: one forward per response, and no overfitting
from seeing a response in K - 1 separate updates. The split into train and eval is by prompt too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from services.training.common import Job, encode_pair, save_atomically, sequence_logprobs
from shared.config import StrictModel
from shared.losses import dpo_loss, ranking_pairs
from shared.modeling import ModelConfig, load_causal_lm, load_tokenizer
from shared.training import (
    DataError,
    OptimConfig,
    loss_summary,
    read_rows,
    require_text,
    row_location,
    split,
    train_loop,
)

log = logging.getLogger(__name__)


class DPOJobConfig(StrictModel):
    model: ModelConfig = Field(description="the policy to start from (and its tokenizer)")
    reference: ModelConfig = Field(
        default_factory=ModelConfig,
        description="the frozen reference policy; an empty path means the starting policy (model)",
    )
    data: str = Field(description="JSONL, JSON or Parquet file of preference or ranking rows")
    output_dir: str = Field(description="where the trained policy, tokenizer and training_summary.json go")
    beta: float = Field(0.1, gt=0, description="DPO temperature: the strength of the implicit KL to the reference")
    nll_coef: float = Field(
        0.0,
        ge=0,
        description="RPO (Pang et al. 2024): add nll_coef * the chosen response's negative log-likelihood per token, "
        "which keeps DPO from pushing the chosen responses' probability down with the rejected ones",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig)


@dataclass
class PromptGroup:
    """Every comparison of one prompt: its distinct responses and the (winner, loser) pairs among them."""

    prompt: str
    responses: list[str]
    pairs: list[tuple[int, int]]  # indices into responses, winner first
    prompt_ids: torch.Tensor | None = None  # (P,) int64
    response_ids: list[torch.Tensor] = field(default_factory=list)  # K x (R_k,) int64, each ending in EOS
    reference_logps: torch.Tensor | None = None  # (K,) float32, log pi_ref(response_k | prompt)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def parse_row(path: Path | str, index: int, row: dict) -> tuple[str, list[str], list[tuple[int, int]]]:
    """``(prompt, responses, pairs)`` of a preference or ranking row; DataError naming ``file:line`` else."""
    prompt = require_text(path, index, row, "prompt")
    responses = row.get("responses")
    if responses is not None:
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
            raise DataError(
                f"{row_location(path, index)}: 'responses' must be a list of at least 2 strings, best first"
            )
        return prompt, list(responses), ranking_pairs(responses)
    chosen = require_text(path, index, row, "chosen", allow_empty=True)
    rejected = require_text(path, index, row, "rejected", allow_empty=True)
    return prompt, [chosen, rejected], [(0, 1)]


def group_by_prompt(comparisons: list[tuple[str, list[str], list[tuple[int, int]]]]) -> list[PromptGroup]:
    """Merges the comparisons of each prompt (rows may repeat a prompt) into one group, in first-seen order;
    identical responses of a prompt are scored once."""
    groups: dict[str, PromptGroup] = {}
    for prompt, responses, pairs in comparisons:
        group = groups.setdefault(prompt, PromptGroup(prompt, [], []))
        index = []
        for response in responses:
            if response not in group.responses:
                group.responses.append(response)
            index.append(group.responses.index(response))
        group.pairs += [(index[winner], index[loser]) for winner, loser in pairs]
    return list(groups.values())


def tokenize_group(group: PromptGroup, tokenizer: PreTrainedTokenizerBase, max_length: int) -> PromptGroup:
    """Sets the group's ids: one prompt (truncated to fit beside its longest response) and each response + EOS."""
    encoded = [encode_pair(tokenizer, group.prompt, response, max_length) for response in group.responses]
    group.prompt_ids = min((prompt_ids for prompt_ids, _ in encoded), key=lambda ids: ids.numel())
    group.response_ids = [response_ids for _, response_ids in encoded]
    return group


def load_groups(path: Path | str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[PromptGroup]:
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    groups = group_by_prompt([parse_row(path, index, row) for index, row in enumerate(rows)])
    return [tokenize_group(group, tokenizer, max_length) for group in groups]


def count_pairs(groups: list[PromptGroup]) -> int:
    return sum(len(group.pairs) for group in groups)


# ----------------------------------------------------------------------------------------------------------------
# Log-probs and loss
# ----------------------------------------------------------------------------------------------------------------


def group_logps(model: PreTrainedModel, groups: list[PromptGroup], pad_token_id: int) -> list[torch.Tensor]:
    """Sequence log-probs of every response of every group, in one forward: a (K_g,) tensor per group."""
    prompts = [group.prompt_ids for group in groups for _ in group.response_ids]
    responses = [ids for group in groups for ids in group.response_ids]
    logps = sequence_logprobs(model, prompts, responses, pad_token_id)  # (sum K_g,)
    return list(logps.split([len(group.response_ids) for group in groups]))


@torch.no_grad()
def attach_reference_logps(
    model: PreTrainedModel, groups: list[PromptGroup], pad_token_id: int, micro_batch_size: int
) -> None:
    """Scores every group's responses under the frozen reference once, before training."""
    model.eval()
    for start in range(0, len(groups), micro_batch_size):
        chunk = groups[start : start + micro_batch_size]
        for group, logps in zip(chunk, group_logps(model, chunk, pad_token_id), strict=True):
            group.reference_logps = logps.float().cpu()


def pair_losses(
    groups: list[PromptGroup], policy_logps: list[torch.Tensor], beta: float, nll_coef: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss and implicit rewards of every pair of ``groups``: three (P,) tensors (see shared.losses.dpo_loss).

    With ``nll_coef`` = alpha > 0 each pair's loss is the RPO loss (Pang et al. 2024, "Iterative Reasoning Preference
    Optimization", eq. 1): ``dpo_loss - alpha * log pi(y_w | x) / |y_w|``, |y_w| the chosen response's tokens.
    """
    device = policy_logps[0].device

    def pick(values: list[torch.Tensor], side: int) -> torch.Tensor:
        return torch.cat([v.to(device)[[pair[side] for pair in g.pairs]] for v, g in zip(values, groups, strict=True)])

    reference_logps = [group.reference_logps for group in groups]
    chosen_logps = pick(policy_logps, 0)
    loss, chosen_rewards, rejected_rewards = dpo_loss(
        chosen_logps, pick(policy_logps, 1), pick(reference_logps, 0), pick(reference_logps, 1), beta
    )
    if nll_coef > 0:
        lengths = [torch.tensor([float(ids.numel()) for ids in g.response_ids]) for g in groups]
        loss = loss - nll_coef * chosen_logps.float() / pick(lengths, 0)
    return loss, chosen_rewards, rejected_rewards


def reward_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Share of pairs whose chosen response has the higher implicit reward (ties count as wrong), mean margin."""
    return {
        "reward_accuracy": float((chosen_rewards > rejected_rewards).float().mean()),
        "reward_margin": float((chosen_rewards - rejected_rewards).mean()),
    }


@torch.no_grad()
def evaluate(
    model: PreTrainedModel, groups: list[PromptGroup], pad_token_id: int, beta: float, micro_batch_size: int
) -> dict[str, float]:
    """Mean DPO loss, implicit-reward accuracy and mean margin over the pairs of ``groups``."""
    model.eval()
    losses, chosen, rejected = [], [], []
    for start in range(0, len(groups), micro_batch_size):
        chunk = groups[start : start + micro_batch_size]
        loss, chosen_rewards, rejected_rewards = pair_losses(chunk, group_logps(model, chunk, pad_token_id), beta)
        losses.append(loss)
        chosen.append(chosen_rewards)
        rejected.append(rejected_rewards)
    model.train()
    return {"eval_loss": float(torch.cat(losses).mean()), **reward_stats(torch.cat(chosen), torch.cat(rejected))}


# ----------------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------------


def run_dpo(config: DPOJobConfig) -> dict:
    """Trains ``config.model`` with DPO on ``config.data``; writes the policy, tokenizer and training_summary.json."""
    started = time.perf_counter()
    optim = config.optim
    torch.manual_seed(optim.seed)
    tokenizer = load_tokenizer(config.model)
    pad_token_id = int(tokenizer.pad_token_id)
    train_groups, eval_groups = split(
        load_groups(config.data, tokenizer, optim.max_length), optim.eval_fraction, optim.seed
    )
    log.info(
        "dpo: %d training pairs (%d prompts), %d evaluation pairs (%d prompts) from %s",
        count_pairs(train_groups),
        len(train_groups),
        count_pairs(eval_groups),
        len(eval_groups),
        config.data,
    )

    model = load_causal_lm(config.model)
    reference = load_causal_lm(config.reference) if config.reference.path else model
    if reference.get_input_embeddings().num_embeddings != model.get_input_embeddings().num_embeddings:
        raise ValueError("the reference model's vocabulary differs from the policy's: they must share a tokenizer")
    # The reference is only needed here: its log-probs are computed once (by the policy itself, before any update,
    # when no separate reference is named). Evaluation batches are scored in the same chunks as evaluate(), so that
    # the first evaluation of an unchanged policy sees exactly zero implicit rewards.
    attach_reference_logps(reference, train_groups, pad_token_id, optim.micro_batch_size)
    attach_reference_logps(reference, eval_groups, pad_token_id, optim.micro_batch_size)
    del reference
    model.train()

    def evaluate_held_out() -> dict[str, float]:
        return evaluate(model, eval_groups, pad_token_id, config.beta, optim.micro_batch_size)

    def loss_fn(micro_batch: list[PromptGroup]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, chosen_rewards, rejected_rewards = pair_losses(
            micro_batch, group_logps(model, micro_batch, pad_token_id), config.beta, config.nll_coef
        )
        return loss.sum(), reward_stats(chosen_rewards, rejected_rewards)

    first = evaluate_held_out() if eval_groups else {}
    trained = train_loop(
        "dpo",
        [p for p in model.parameters() if p.requires_grad],
        train_groups,
        optim,
        loss_fn,
        units=lambda groups: float(count_pairs(groups)),
        evaluate=evaluate_held_out if eval_groups else None,
    )
    model.eval()
    history, evaluations = trained["history"], trained["evaluations"]
    last = evaluations[-1] if evaluations else {}
    summary = {
        "job": "dpo",
        **loss_summary(trained),
        "eval_loss_first": first.get("eval_loss"),
        "eval_loss": last.get("eval_loss"),
        "reward_accuracy": last.get("reward_accuracy"),
        "reward_margin": last.get("reward_margin"),
        "eval_reward_accuracy_first": first.get("reward_accuracy"),
        "pairs": count_pairs(train_groups),
        "eval_pairs": count_pairs(eval_groups),
        "seconds": time.perf_counter() - started,
        "output_dir": str(config.output_dir),
    }
    details = {**summary, "config": config.model_dump(mode="json"), "history": history, "evaluations": evaluations}
    save_atomically(model, tokenizer, config.output_dir, {"training_summary.json": details})
    return summary


JOB = Job("dpo", DPOJobConfig, run_dpo)
