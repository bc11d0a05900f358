"""Reward-model job (``rlhf train reward``): a scalar head trained on human preferences with the Bradley-Terry loss.

As in InstructGPT (Ouyang et al. 2022, section 3.5): the model starts from a language model (the SFT model; a fresh
``num_labels=1`` head is added) or from an existing reward model, reads ``prompt + response`` exactly as the reward
service does (``services.reward.backend.reward_forward``), and learns ``r(chosen) > r(rejected)`` on each pair. A
ranking of K responses gives all C(K, 2) pairs, and every pair of one prompt goes into the same batch: each
response is then scored once per step, and the comparisons of a prompt (which are correlated) do not each take a
separate gradient step, which InstructGPT found to overfit.

A preference row may carry a soft label, ``"chosen_probability"``: P(chosen is better), e.g. an AI judge's
(``services.labeling``). Its pair is then trained with the binary cross-entropy against that probability
(``shared.losses.bradley_terry_loss`` with a target) instead of the hard Bradley-Terry loss; a row without it is a
hard label (probability 1). Any number in [0, 1] is accepted: below 0.5 the label leans towards ``rejected`` (the
loss pulls the margin negative, and pair accuracy counts the pair right when the model prefers ``rejected``).
Labellers write at least 0.5 (``preference_rows`` puts the preferred response in ``chosen``).

After training, the mean and std of the reward over the training texts are written beside the model
(``reward_normalization.json``); the reward service uses them to serve centred scores.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import Field

from services.reward.backend import (
    NORMALIZATION_FILE,
    RewardNormalization,
    load_reward_model,
    reward_forward,
    score_pairs,
)
from services.training.common import Job, save_atomically
from shared.config import StrictModel
from shared.losses import bradley_terry_loss, ranking_pairs
from shared.modeling import ModelConfig
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

SUMMARY_FILE = "training_summary.json"


class RewardJobConfig(StrictModel):
    model: ModelConfig = Field(
        description="what to start from: a causal LM directory (e.g. the SFT model; a fresh scalar head is added) "
        "or an existing num_labels=1 sequence classifier"
    )
    data: str = Field(
        min_length=1,
        description="JSONL/JSON/Parquet preference data: rows {prompt, chosen, rejected} or "
        "{prompt, responses: [best, ..., worst]}; a preference row may add chosen_probability in [0, 1] "
        "(a soft label)",
    )
    output_dir: str = Field(min_length=1, description="where the reward model, its tokenizer and statistics go")
    optim: OptimConfig = Field(default_factory=OptimConfig)


@dataclass
class PromptGroup:
    """Every comparison of one prompt: its distinct responses, (winner, loser) index pairs into them, and per pair
    the probability that the winner is better (1 for a hard label, a row's chosen_probability for a soft one)."""

    prompt: str
    responses: list[str] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)  # one per pair


def read_groups(path: Path | str) -> list[PromptGroup]:
    """Preference and ranking rows, one group per distinct prompt (in order of first appearance).

    ``{"prompt", "chosen", "rejected"}`` gives one pair; ``{"prompt", "responses": [best, ..., worst]}`` gives the
    C(K, 2) pairs of the ranking. Rows with the same prompt join one group, and a response that appears in several
    rows is scored once. A preference row's optional ``"chosen_probability"`` (a number in [0, 1]) is its pair's
    target; every other pair's is 1. A bad row raises ``DataError`` naming ``file:line`` and the field.
    """
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    groups: dict[str, PromptGroup] = {}
    for index, row in enumerate(rows):
        prompt = require_text(path, index, row, "prompt")
        target = chosen_probability(path, index, row)
        if row.get("responses") is not None:
            if target is not None:
                raise DataError(
                    f"{row_location(path, index)}: 'chosen_probability' applies to chosen/rejected rows, "
                    "not to a ranking ('responses')"
                )
            ranking = row["responses"]
            if not (isinstance(ranking, list) and len(ranking) >= 2 and all(isinstance(r, str) for r in ranking)):
                raise DataError(
                    f"{row_location(path, index)}: 'responses' must be a list of at least 2 strings, best first"
                )
            if len(set(ranking)) < len(ranking):
                raise DataError(f"{row_location(path, index)}: 'responses' lists the same response twice")
        else:
            ranking = [
                require_text(path, index, row, "chosen", allow_empty=True),
                require_text(path, index, row, "rejected", allow_empty=True),
            ]
            if ranking[0] == ranking[1]:
                raise DataError(f"{row_location(path, index)}: 'rejected' is the same text as 'chosen'")
        group = groups.setdefault(prompt, PromptGroup(prompt))
        positions = []
        for response in ranking:
            if response not in group.responses:
                group.responses.append(response)
            positions.append(group.responses.index(response))
        pairs = [(positions[winner], positions[loser]) for winner, loser in ranking_pairs(ranking)]
        group.pairs.extend(pairs)
        group.targets.extend([1.0 if target is None else target] * len(pairs))
    return list(groups.values())


def chosen_probability(path: Path | str, index: int, row: dict) -> float | None:
    """A row's soft label: None when absent (or null), else a finite number in [0, 1]; DataError otherwise."""
    value = row.get("chosen_probability")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and 0 <= value <= 1):
        raise DataError(
            f"{row_location(path, index)}: 'chosen_probability' must be a number in [0, 1] "
            f"(P(chosen is better)), got {value!r}"
        )
    return float(value)


def flatten(groups: list[PromptGroup]) -> tuple[list[tuple[str, str]], torch.Tensor, torch.Tensor]:
    """The (prompt, response) texts of ``groups``, and for each pair the indices of its winner and loser among
    them: ``(texts (N,), winners (P,), losers (P,))``."""
    texts: list[tuple[str, str]] = []
    winners: list[int] = []
    losers: list[int] = []
    for group in groups:
        offset = len(texts)
        texts.extend((group.prompt, response) for response in group.responses)
        for winner, loser in group.pairs:
            winners.append(offset + winner)
            losers.append(offset + loser)
    return texts, torch.tensor(winners, dtype=torch.int64), torch.tensor(losers, dtype=torch.int64)


def flatten_targets(groups: list[PromptGroup]) -> torch.Tensor:
    """(P,) float32: each pair's P(winner is better), in the pair order of ``flatten``."""
    return torch.tensor([target for group in groups for target in group.targets], dtype=torch.float32)


def count_pairs(groups: list[PromptGroup]) -> int:
    return sum(len(group.pairs) for group in groups)


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of pairs where the model leans the label's way: r_chosen > r_rejected when the target is at least 0.5,
    r_chosen < r_rejected below it. (P,) each -> float."""
    agree = torch.where(targets >= 0.5, chosen > rejected, chosen < rejected)
    return float(agree.float().mean())


def run_reward(config: RewardJobConfig) -> dict:
    """Trains the reward model and writes it (safetensors), its tokenizer, ``reward_normalization.json`` and
    ``training_summary.json`` to ``output_dir``. Returns the summary."""
    start = time.perf_counter()
    optim = config.optim
    groups = read_groups(config.data)  # bad data fails before a model is loaded
    train_groups, eval_groups = split(groups, optim.eval_fraction, optim.seed)
    log.info(
        "%d prompts (%d pairs) for training, %d prompts (%d pairs) held out",
        len(train_groups),
        count_pairs(train_groups),
        len(eval_groups),
        count_pairs(eval_groups),
    )
    torch.manual_seed(optim.seed)  # the fresh head's initialisation
    model, tokenizer = load_reward_model(config.model)

    def loss_fn(part: list[PromptGroup]) -> tuple[torch.Tensor, dict[str, float]]:
        texts, winners, losers = flatten(part)
        targets = flatten_targets(part)  # (P,)
        rewards = reward_forward(model, tokenizer, texts, optim.max_length)  # (N,) each response once
        chosen, rejected = rewards[winners], rewards[losers]  # (P,), (P,)
        loss = bradley_terry_loss(chosen, rejected, targets).sum()
        return loss, {"pair_accuracy": pair_accuracy(chosen, rejected, targets)}

    def scores(part: list[PromptGroup]) -> torch.Tensor:
        """(N,) rewards of the texts of ``part`` in eval mode, as the service computes them."""
        model.eval()
        texts, _, _ = flatten(part)
        values = score_pairs(model, tokenizer, texts, optim.max_length, optim.micro_batch_size)
        model.train()
        return torch.tensor(values, dtype=torch.float32)

    def evaluate() -> dict[str, float]:
        _, winners, losers = flatten(eval_groups)
        rewards = scores(eval_groups)
        targets = flatten_targets(eval_groups)
        chosen, rejected = rewards[winners], rewards[losers]
        return {
            "loss": float(bradley_terry_loss(chosen, rejected, targets).mean()),
            "pair_accuracy": pair_accuracy(chosen, rejected, targets),
        }

    has_eval = bool(eval_groups)
    before = evaluate() if has_eval else {}
    model.train()
    result = train_loop(
        "reward",
        [p for p in model.parameters() if p.requires_grad],
        train_groups,
        optim,
        loss_fn,
        units=count_pairs,
        evaluate=evaluate if has_eval else None,
    )
    after = result["evaluations"][-1] if has_eval else {}

    train_rewards = scores(train_groups)
    model.eval()
    normalization = RewardNormalization(
        mean=float(train_rewards.mean()),
        std=float(train_rewards.std(correction=0)),
        count=train_rewards.numel(),
    )
    summary = {
        "job": "reward",
        **loss_summary(result),
        "eval_loss_first": before.get("loss"),
        "eval_loss": after.get("loss"),
        "pair_accuracy_first": before.get("pair_accuracy"),
        "pair_accuracy": after.get("pair_accuracy"),
        "pairs": count_pairs(train_groups),
        "soft_pairs": sum(target != 1.0 for group in train_groups for target in group.targets),
        "eval_pairs": count_pairs(eval_groups),
        "evaluations": result["evaluations"],
        "normalization": normalization.model_dump(),
        "seconds": time.perf_counter() - start,
        "output_dir": str(config.output_dir),
    }
    save_atomically(
        model,
        tokenizer,
        config.output_dir,
        {NORMALIZATION_FILE: normalization.model_dump(), SUMMARY_FILE: summary},
    )
    return summary


JOB = Job("reward", RewardJobConfig, run_reward)
