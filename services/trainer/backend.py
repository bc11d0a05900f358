"""PPO trainer backend: the policy, the critic and their optimizers; one ``train_step`` per rollout batch.

The update follows InstructGPT / Ziegler et al. 2019: per-token KL penalty in the reward, GAE, the clipped surrogate
and the clipped value loss, an adaptive (or fixed) KL coefficient. The formulas live in ``shared.rl_math``; this
module owns the models, the padding, the minibatch loop and checkpoints (safetensors + JSON, never pickle).
Transport-free: the gRPC servicer translates to and from ``RolloutBatch`` / ``TrainStats``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file, save_model
from transformers import PreTrainedModel

from services.trainer import precision
from services.trainer.batching import PaddedBatch, pad_batch, pad_right, response_aligned
from services.trainer.checkpoint import (
    MANIFEST,
    check_manifest,
    join_optimizer_state,
    split_optimizer_state,
    write_manifest,
)
from services.trainer.config import (
    CriticConfig,
    CriticInit,
    KLMode,
    KLPlacement,
    LoRAConfig,
    PPOConfig,
    ScoreNormalization,
)
from services.trainer.critic import Critic
from services.trainer.distributed import Ranks, full, shard
from services.trainer.lora import (
    ADAPTER_DIR,
    adapter_names,
    check_adapter_config,
    merged_copy,
    read_adapter,
    trainable_state,
    wire_config,
    wrap_backbone,
    wrap_policy,
)
from services.trainer.steps import StepLedger
from shared import rl_math
from shared.lora import adapter_state, load_adapter_state
from shared.modeling import ModelConfig, load_tokenizer, resolve_device
from shared.paths import replace_directory
from shared.rl_math import AdvantageEstimator
from shared.sequences import accepts_logits_to_keep
from shared.types import RolloutBatch, TrainStats
from shared.weights import unique_state

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1  # one process: policy/, critic.safetensors, optimizer.safetensors, trainer_state.json
# A sharded trainer's (several ranks): sharded/ (torch.distributed.checkpoint: the policy, the critic and the AdamW
# states, each rank writing its shards), policy/ (the whole policy in Hugging Face format, from rank 0) and
# trainer_state.json. Either format loads into any number of ranks, one process included.
SHARDED_FORMAT = 2
SHARDED_DIR = "sharded"


@dataclass
class _RunningMoments:
    """Mean and variance of every score seen so far: Welford's algorithm in the batched form of Chan et al."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean

    def update(self, values: torch.Tensor) -> None:
        x = values.detach().double().cpu()
        n = x.numel()
        batch_mean = float(x.mean())
        batch_m2 = float(((x - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 1.0


@dataclass
class _Outputs:
    """One forward of a micro-batch: (b, T) log-probs, entropy and values (None without a critic)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor | None


def _length_buckets(padded: PaddedBatch, rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    """``rows`` cut into micro-batches of at most ``size``, longest sequences together: each micro-batch is trimmed
    to its own longest sequence (``PaddedBatch.select``), so grouping by length leaves less padding to compute."""
    if rows.numel() <= size:
        return [rows]
    lengths = padded.attention_mask[rows].sum(dim=1)
    return list(rows[torch.argsort(lengths, descending=True, stable=True)].split(size))


def new_epoch(previous: int = 0) -> int:
    """A trainer incarnation: microseconds since the epoch, above ``previous``, so that a restarted trainer (or one
    that loaded a checkpoint) outranks the weights its earlier self sent."""
    return max(time.time_ns() // 1000, previous + 1)


def _adamw(parameters: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with its fused kernel (one pass over each parameter instead of a dozen element-wise ops; CPU and CUDA
    float32 / bf16 / fp16 parameters), the multi-tensor one otherwise: the same update either way."""
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)


def _cloned(tree):
    """A copy of a (nested) state dict's tensors, the rest as is."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {key: _cloned(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_cloned(value) for value in tree]
    return tree


@contextmanager
def _kept_fresh(optimizers: dict[str, torch.optim.Optimizer]) -> Iterator[None]:
    """Leaves an optimizer that has made no step without state. DCP's ``get_optimizer_state_dict`` gives one a
    placeholder state (an AdamW step at learning rate 0: step 1, zero moments) to have tensors to save or load into;
    kept, it would shift the bias correction of every later step by one, and a run that saved a checkpoint before its
    first step would no longer train as one that did not."""
    fresh = [optimizer for optimizer in optimizers.values() if not optimizer.state]
    try:
        yield
    finally:
        for optimizer in fresh:
            optimizer.state.clear()


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What an optimizer updates: every parameter, or with LoRA the adapters (and the critic's head)."""
    return [p for p in model.parameters() if p.requires_grad]


class TrainerBackend:
    """Policy + critic + AdamW state; ``train_step`` runs one PPO update on a rollout batch.

    Both models stay in eval mode throughout (dropout off, as TRL does for PPO): with dropout the first
    minibatch's ratio would not start at 1 and the old log-probs would not match generation's. (With gradient
    checkpointing they go to train mode, which Hugging Face layers need to checkpoint, with dropout set to 0.)

    ``policy.dtype`` bfloat16 is mixed precision (``services.trainer.precision``): float32 master weights and
    AdamW state, bf16 compute; the weight stream sends bf16, what generation serves.

    ``lora.rank`` > 0 trains LoRA adapters (``services.trainer.lora``) on frozen base weights: the optimizers, the
    weight stream and the checkpoint's ``adapter/`` hold the adapters only.
    """

    def __init__(
        self,
        policy: ModelConfig,
        critic: CriticConfig,
        ppo: PPOConfig,
        gradient_checkpointing: bool = False,
        lora: LoRAConfig | None = None,
        ranks: Ranks | None = None,
    ):
        torch.manual_seed(ppo.seed)
        self.ppo = ppo
        self.lora = lora or LoRAConfig()
        # Several ranks (torchrun): the models sharded with FSDP2, each rollout batch split over the ranks
        # (services.trainer.distributed). None: one process holds everything.
        self.ranks = ranks
        self.device = ranks.device if ranks is not None else resolve_device(policy.device)
        self._policy_config = policy
        self._compute_dtype = precision.compute_dtype(policy)
        self._gradient_checkpointing = gradient_checkpointing
        self.policy: PreTrainedModel = precision.load_trainable_causal_lm(policy, self.lora.enabled).eval()
        # The critic-free estimators (GRPO, RLOO, REINFORCE++) load none: no second model, no second optimizer.
        self.critic: Critic | None = self._load_critic(policy, critic) if ppo.uses_critic else None
        if self.lora.enabled:  # base weights frozen, adapters (and the critic's head) train
            self.policy = wrap_policy(self.policy, self.lora)
            if self.lora.critic and self.critic is not None:
                self.critic.backbone = wrap_backbone(self.critic.backbone, self.lora)
        # Non-empty: the weight stream is the policy's adapter, with this peft config.
        self.adapter_config = wire_config(self.policy) if self.lora.enabled else ""
        self._vocab_size = self.policy.get_input_embeddings().num_embeddings
        if self.critic is not None:
            critic_vocab = self.critic.backbone.get_input_embeddings().num_embeddings
            if critic_vocab < self._vocab_size:
                raise ValueError(
                    f"critic.path: vocabulary of {critic_vocab} < the policy's {self._vocab_size}; "
                    "the critic reads the policy's token ids"
                )
        if gradient_checkpointing:
            precision.enable_gradient_checkpointing(self.policy)
            if self.critic is not None:
                precision.enable_gradient_checkpointing(self.critic.backbone)
                self.critic.train()
        if ranks is not None:  # before the optimizers: they hold the shards
            self.policy = shard(self.policy)
            if self.critic is not None:
                self.critic = shard(self.critic)
        self._build_optimizers()
        if ppo.kl.mode is KLMode.FIXED:
            self._kl_controller = rl_math.FixedKLController(ppo.kl.init_coef)
        else:
            self._kl_controller = rl_math.AdaptiveKLController(ppo.kl.init_coef, ppo.kl.target, ppo.kl.horizon)
        self._score_moments = _RunningMoments()
        self.version = 0
        self.step = 0
        self.epoch = new_epoch()
        self.ledger = StepLedger()  # the (run, iteration) of each step applied: see services.trainer.steps
        self.loaded_checkpoint: Path | None = None  # the checkpoint-root directory this state was resumed from

    def _load_critic(self, policy: ModelConfig, critic: CriticConfig) -> Critic:
        critic_model = precision.master_or_frozen_config(
            ModelConfig(path=critic.path or policy.path, device=policy.device, dtype=policy.dtype),
            self.lora.enabled and self.lora.critic,
        )
        if critic.init is CriticInit.REWARD_MODEL:
            return Critic.from_reward_model(critic_model).eval()
        return Critic.from_policy(critic_model).eval()

    def _build_optimizers(self) -> None:
        self._optimizers = self._make_optimizers(self.policy)

    def _make_optimizers(self, policy: PreTrainedModel) -> dict[str, torch.optim.Optimizer]:
        ppo = self.ppo
        optimizers = {"policy": _adamw(_trainable(policy), ppo.learning_rate, ppo.weight_decay)}
        if self.critic is not None:
            optimizers["critic"] = _adamw(
                _trainable(self.critic), ppo.critic_learning_rate or ppo.learning_rate, ppo.weight_decay
            )
        return optimizers

    @property
    def kl_coef(self) -> float:
        """The KL coefficient beta the next step will use."""
        return self._kl_controller.value

    # ------------------------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------------------------

    def keyed_step(self, batch: RolloutBatch, run_id: str, iteration: int) -> tuple[TrainStats, bool]:
        """``train_step`` at most once per (run_id, iteration): returns (stats, True) with the stored statistics
        when the step was applied before; raises ``Conflict`` when it does not follow the trainer's position.
        An empty run_id is an unkeyed step, always applied."""
        if run_id:
            stored = self.ledger.check(run_id, iteration)
            if stored is not None:
                if iteration == self.ledger.iteration:  # the weights now held are that step's, in this epoch
                    stored.policy_epoch = self.epoch
                return stored, True
        stats = self.train_step(batch)
        if run_id:
            self.ledger.record(run_id, iteration, stats)
        return stats, False

    def train_step(self, batch: RolloutBatch) -> TrainStats:
        """One PPO update (``ppo_epochs`` passes) on ``batch``; the policy version goes up by one.

        The advantages come from ``ppo.advantage_estimator`` (GAE with the critic, or GRPO / RLOO /
        REINFORCE++ without one) and the KL to the reference goes in the reward or in the loss
        (``ppo.kl.placement``). A batch sampled by an older policy version than the trainer's (the asynchronous
        loop) weights each token's loss by pi_old / pi_behaviour (``rl_math.behaviour_weights``).
        """
        started = time.perf_counter()
        self._validate(batch)
        ppo = self.ppo
        padded = pad_batch(batch, self.device)
        mask = padded.response_mask  # (B, T)
        batch_size, width = mask.shape

        first_pass = None
        if self._fused_first_pass(batch_size):
            first_pass, old_logprobs, old_values = self._first_pass(padded, batch.temperature)
        else:
            old_logprobs, old_values = self._evaluate(padded, batch.temperature)
        generation_logprobs = pad_right([lp.float() for lp in batch.generation_logprobs], width).to(self.device)
        reference_logprobs = pad_right([lp.float() for lp in batch.reference_logprobs], width).to(self.device)

        raw_scores = batch.scores.float().to(self.device)
        scores = self._shape_scores(raw_scores)
        kl_coef = self.kl_coef
        kl = rl_math.kl_estimate(old_logprobs, reference_logprobs, ppo.kl.effective_estimator)  # (B, T)
        advantages, returns = self._advantages(batch, scores, kl, kl_coef, old_values, mask)

        weights = None
        staleness = max(0, self.version - batch.policy_version)
        if staleness:  # sampled by an older policy: decoupled PPO, centred on the trainer's pi_old
            weights = rl_math.behaviour_weights(old_logprobs, generation_logprobs, mask, ppo.off_policy_cap)

        update = self._update(
            padded,
            old_logprobs,
            old_values,
            advantages,
            returns,
            batch.temperature,
            reference_logprobs=reference_logprobs if ppo.kl.placement is KLPlacement.LOSS else None,
            kl_coef=kl_coef,
            weights=weights,
            first_pass=first_pass,
        )

        sequence_kl = float(rl_math.masked_sum(kl, mask, dim=1).mean())
        self._kl_controller.update(sequence_kl, n_steps=batch_size)
        self.step += 1
        self.version += 1
        extra = {
            "critic_grad_norm": update["critic_grad_norm"],
            "value_clip_fraction": update["value_clip_fraction"],
            "shaped_score_mean": float(scores.mean()),
            "skipped_minibatches": update["skipped_minibatches"],
            "applied_fraction": update["applied_fraction"],
            "staleness": float(staleness),
        }
        if old_values is not None:
            extra["value_mean"] = float(rl_math.masked_mean(old_values, mask))
        if ppo.kl.placement is KLPlacement.LOSS:
            extra["kl_loss"] = update["kl_loss"]
        if weights is not None:
            extra["behaviour_weight_mean"] = float(rl_math.masked_mean(weights, mask))
            extra["behaviour_weight_capped"] = float(rl_math.masked_mean((weights >= ppo.off_policy_cap).float(), mask))
        return TrainStats(
            policy_loss=update["policy_loss"],
            value_loss=update["value_loss"],
            kl_mean=sequence_kl,
            entropy=update["entropy"],
            clip_fraction=update["clip_fraction"],
            approx_kl=update["approx_kl"],
            score_mean=float(raw_scores.mean()),
            return_mean=float(rl_math.masked_mean(returns, mask)),
            explained_variance=(
                float(rl_math.explained_variance(old_values, returns, mask)) if old_values is not None else 0.0
            ),
            kl_coef=kl_coef,
            grad_norm=update["grad_norm"],
            learning_rate=self._optimizers["policy"].param_groups[0]["lr"],
            policy_version=self.version,
            policy_epoch=self.epoch,
            tokens=int(mask.sum()),
            step_seconds=time.perf_counter() - started,
            generation_logprob_diff=float(rl_math.masked_mean((old_logprobs - generation_logprobs).abs(), mask)),
            extra=extra,
        )

    def _advantages(
        self,
        batch: RolloutBatch,
        scores: torch.Tensor,
        kl: torch.Tensor,
        kl_coef: float,
        old_values: torch.Tensor | None,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) advantages and returns (the value targets; without a critic, the returns the advantages
        were built from) of the configured estimator."""
        ppo = self.ppo
        in_reward = ppo.kl.placement is KLPlacement.REWARD
        rewards = rl_math.kl_penalized_rewards(scores, kl, mask, kl_coef if in_reward else 0.0)
        estimator = ppo.advantage_estimator
        if estimator is AdvantageEstimator.GAE:
            advantages, returns = rl_math.gae_advantages(rewards, old_values, mask, ppo.gamma, ppo.lam)
            if ppo.whiten_advantages and int(mask.sum()) >= 2:  # whitening needs a variance, so two tokens
                advantages = rl_math.masked_whiten(advantages, mask)
            return advantages, returns
        returns = rl_math.discounted_returns(rewards, mask, ppo.gamma)
        if estimator is AdvantageEstimator.REINFORCE_PLUS_PLUS:
            return rl_math.reinforce_pp_advantages(rewards, mask, ppo.gamma), returns
        # GRPO / RLOO: one reward per sequence, the score less the KL penalty summed over its tokens.
        sequence_rewards = rl_math.masked_sum(rewards, mask, dim=1)
        group_ids = batch.group_ids.to(self.device)
        if estimator is AdvantageEstimator.GRPO:
            advantages = rl_math.grpo_advantages(sequence_rewards, group_ids, mask, ppo.grpo_scale_rewards)
        else:
            advantages = rl_math.rloo_advantages(sequence_rewards, group_ids, mask)
        return advantages, returns

    def _fused_first_pass(self, batch_size: int) -> bool:
        """Whether the first epoch's forward can give the old log-probs and values: the batch is one minibatch of
        one micro-batch (per rank), so that forward runs on the weights the batch is evaluated at (no step before
        it)."""
        ppo = self.ppo
        per_rank = -(-batch_size // self.ranks.world_size) if self.ranks is not None else batch_size
        return ppo.fuse_first_pass and batch_size <= ppo.minibatch_size and per_rank <= ppo.micro_batch_size

    def _micro_batches(self, padded: PaddedBatch, rows: torch.Tensor) -> list[tuple[torch.Tensor, bool]]:
        """The forward calls this rank makes for ``rows``: (rows of the call, whether it counts).

        One process: ``rows`` in length-bucketed micro-batches, all counting. Several ranks: this rank's share of
        ``rows`` (``Ranks.share``) so bucketed, then stand-in calls on the first row of ``rows`` that do not count
        (forwarded, their loss times 0) up to the number of calls the busiest rank makes, since FSDP's gathers and
        reductions are collective."""
        size = self.ppo.micro_batch_size
        if self.ranks is None:
            return [(micro, True) for micro in _length_buckets(padded, rows, size)]
        mine = self.ranks.share(rows, padded.attention_mask.sum(dim=1))
        calls = [(micro, True) for micro in _length_buckets(padded, mine, size)] if mine.numel() else []
        calls += [(rows[:1], False)] * (self.ranks.most_shares(rows, size) - len(calls))
        return calls

    def _whole(self, parts: torch.Tensor) -> torch.Tensor:
        """(B, T) per-row results each rank filled for its own rows (zeros elsewhere), summed over the ranks: the
        whole batch's, exactly (x + 0 = x), on every rank."""
        return self.ranks.sum_(parts) if self.ranks is not None else parts

    def _first_pass(
        self, padded: PaddedBatch, temperature: float
    ) -> tuple[_Outputs, torch.Tensor, torch.Tensor | None]:
        """The first epoch's forward (with its graph, for the loss) and from it the old log-probs and values of the
        whole batch, (B, T) each."""
        if self.ranks is None:
            outputs = self._forward(padded, temperature)
            values = outputs.values.detach() if outputs.values is not None else None
            return outputs, outputs.logprobs.detach(), values
        [(rows, counts)] = self._micro_batches(padded, torch.arange(padded.response_mask.shape[0], device=self.device))
        outputs = self._forward(padded.select(rows), temperature)
        logprobs = torch.zeros(padded.response_mask.shape, device=self.device)
        values = torch.zeros_like(logprobs) if outputs.values is not None else None
        if counts:
            width = outputs.logprobs.shape[1]
            logprobs[rows, :width] = outputs.logprobs.detach()
            if values is not None:
                values[rows, :width] = outputs.values.detach()
        return outputs, self._whole(logprobs), self._whole(values) if values is not None else None

    def _validate(self, batch: RolloutBatch) -> None:
        """Raises ValueError naming the offending field; nothing is computed on a bad batch."""
        size = len(batch.response_ids)
        if size == 0:
            raise ValueError("response_ids: the batch is empty")
        if not (batch.temperature > 0 and math.isfinite(batch.temperature)):
            raise ValueError(f"temperature: must be finite and > 0, got {batch.temperature}")
        for name in ("prompt_ids", "reference_logprobs", "generation_logprobs"):
            if len(getattr(batch, name)) != size:
                raise ValueError(f"{name}: {len(getattr(batch, name))} entries, but response_ids has {size}")
        for i in range(size):
            # The first response token is predicted from the last prompt token, so a prompt needs one.
            for name in ("prompt_ids", "response_ids"):
                ids = getattr(batch, name)[i]
                if ids.dim() != 1 or ids.numel() == 0:
                    raise ValueError(f"{name}[{i}]: expected a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
                if int(ids.min()) < 0 or int(ids.max()) >= self._vocab_size:
                    raise ValueError(f"{name}[{i}]: token ids must lie in [0, {self._vocab_size})")
            response_shape = tuple(batch.response_ids[i].shape)
            for name in ("reference_logprobs", "generation_logprobs"):
                values = getattr(batch, name)[i]
                if tuple(values.shape) != response_shape:
                    raise ValueError(
                        f"{name}[{i}]: shape {tuple(values.shape)} != response_ids[{i}] shape {response_shape}"
                    )
            if not bool(torch.isfinite(batch.reference_logprobs[i]).all()):
                raise ValueError(f"reference_logprobs[{i}]: non-finite values")
        if tuple(batch.scores.shape) != (size,):
            raise ValueError(f"scores: shape {tuple(batch.scores.shape)}, expected ({size},)")
        if batch.group_ids is not None and tuple(batch.group_ids.shape) != (size,):
            raise ValueError(f"group_ids: shape {tuple(batch.group_ids.shape)}, expected ({size},)")
        if self.ppo.needs_groups:
            if batch.group_ids is None:
                raise ValueError(
                    f"group_ids: advantage_estimator {self.ppo.advantage_estimator} needs the samples' groups "
                    "(several samples per prompt: the run's sampling.samples_per_prompt >= 2)"
                )
            ids, counts = torch.unique(batch.group_ids, return_counts=True)
            if bool((counts < 2).any()):
                lonely = ids[counts < 2].tolist()[:5]
                raise ValueError(
                    f"group_ids: advantage_estimator {self.ppo.advantage_estimator} needs at least 2 samples per "
                    f"group (set sampling.samples_per_prompt >= 2); groups {lonely} have one"
                )
        if not bool(torch.isfinite(batch.scores).all()):
            raise ValueError("scores: non-finite values")

    def _shape_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) raw scores -> optionally normalised with the running moments (this batch included), then clipped."""
        if self.ppo.score_normalization is ScoreNormalization.RUNNING:
            self._score_moments.update(scores)
            scores = (scores - self._score_moments.mean) / max(self._score_moments.std, 1e-8)
        if self.ppo.score_clip is not None:
            scores = scores.clamp(-self.ppo.score_clip, self.ppo.score_clip)
        return scores

    def _response_logits(self, padded: PaddedBatch) -> torch.Tensor:
        """(b, T, V) policy logits predicting each response token (in the compute dtype).

        Only positions from the shortest prompt's last token on get logits (``logits_to_keep``): no (b, L, V)
        tensor over the prompts, which are often most of the sequence.
        """
        length = padded.input_ids.shape[1]
        keep = length - int(padded.prompt_lengths.min()) + 1
        extra = {"logits_to_keep": keep} if accepts_logits_to_keep(self.policy) else {}
        with precision.autocast(self.device, self._compute_dtype):
            logits = self.policy(
                input_ids=padded.input_ids, attention_mask=padded.attention_mask, use_cache=False, **extra
            ).logits  # (b, keep, V): positions length - keep .. length - 1 (all L of them without logits_to_keep)
        keep = logits.shape[1]
        return response_aligned(logits, padded.prompt_lengths - (length - keep), padded.response_mask.shape[1])

    def _response_values(self, padded: PaddedBatch) -> torch.Tensor:
        """(b, T) critic values V(s_t) of the state before each response token (float32)."""
        with precision.autocast(self.device, self._compute_dtype):
            values = self.critic(padded.input_ids, padded.attention_mask)
        return response_aligned(values.float(), padded.prompt_lengths, padded.response_mask.shape[1])

    def _forward(self, micro: PaddedBatch, temperature: float) -> _Outputs:
        """The policy's log-probs and entropy and (with a critic) the values of ``micro``, (b, T) each.

        The log-probs and the entropy come from one pass over the (b, T, V) logits (``rl_math.logprobs_and_entropy``);
        the entropy keeps its graph only when it is part of the loss.
        """
        logits = self._response_logits(micro)
        logprobs, entropy = rl_math.logprobs_and_entropy(
            logits, micro.response_ids, temperature, entropy_grad=self.ppo.entropy_coef > 0
        )
        values = self._response_values(micro) if self.critic is not None else None
        return _Outputs(logprobs, entropy, values)

    @torch.no_grad()
    def _evaluate(self, padded: PaddedBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Old log-probs (under softmax(logits / T)) and values (None without a critic), (B, T) each, with the
        trainer's own forward, in micro-batches of similar lengths."""
        batch_size, width = padded.response_mask.shape
        logprobs = torch.zeros(batch_size, width, device=self.device)
        values = torch.zeros(batch_size, width, device=self.device) if self.critic is not None else None
        for rows, counts in self._micro_batches(padded, torch.arange(batch_size, device=self.device)):
            micro = padded.select(rows)
            micro_width = micro.response_mask.shape[1]
            logits = self._response_logits(micro)
            micro_logprobs = rl_math.logprobs_from_logits(logits, micro.response_ids, temperature)
            del logits
            micro_values = self._response_values(micro) if values is not None else None
            if counts:
                logprobs[rows, :micro_width] = micro_logprobs
                if values is not None:
                    values[rows, :micro_width] = micro_values
        return self._whole(logprobs), self._whole(values) if values is not None else None

    def _update(
        self,
        padded: PaddedBatch,
        old_logprobs: torch.Tensor,
        old_values: torch.Tensor | None,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        temperature: float,
        reference_logprobs: torch.Tensor | None = None,
        kl_coef: float = 0.0,
        weights: torch.Tensor | None = None,
        first_pass: _Outputs | None = None,
    ) -> dict[str, float]:
        """``ppo_epochs`` passes over shuffled minibatches, one optimizer step per minibatch.

        Inputs are (B, T). Within a minibatch the gradients of its micro-batches are accumulated, each loss divided
        by the minibatch's token count, so the step equals the one on the unsplit minibatch's token-mean loss; the
        micro-batches are cut from the minibatch sorted by length (less padding; the sum is the same).
        ``reference_logprobs``: the KL as a loss term, ``kl_coef`` * the configured estimator. ``weights``: the
        off-policy weights of each token's policy loss. ``first_pass``: the first epoch's forward, already done
        (the batch is one micro-batch). Returns token-weighted means of the loss terms and diagnostics, and mean
        pre-clipping gradient norms.
        """
        ppo = self.ppo
        batch_size = padded.response_mask.shape[0]
        # Seeded by step so a run resumed from a checkpoint shuffles exactly as an uninterrupted one.
        generator = torch.Generator().manual_seed(ppo.seed + self.step)
        sums = dict.fromkeys(
            (
                "policy_loss",
                "value_loss",
                "entropy",
                "clip_fraction",
                "approx_kl",
                "value_clip_fraction",
                "kl_loss",
            ),
            0.0,
        )
        tokens_seen = 0.0
        norms: dict[str, list[float]] = {"policy": [], "critic": []}
        skipped = 0
        applied = planned = 0  # minibatches stepped, of ppo_epochs x the batch's minibatches
        stopped = False  # by target_kl
        # Several ranks: each rank's gradient is its rows' part of the minibatch's token-mean loss, and FSDP's
        # reduce-scatter averages over the ranks, so each part is scaled by the rank count to make that a sum.
        ranks = self.ranks.world_size if self.ranks is not None else 1
        all_rows = torch.arange(batch_size, device=self.device)
        for _ in range(ppo.ppo_epochs):
            order = torch.randperm(batch_size, generator=generator).to(self.device)
            for minibatch in order.split(ppo.minibatch_size):
                planned += 1
                if stopped:
                    continue
                if first_pass is not None:  # the whole batch (this rank's share), as the first pass ran it
                    calls = [(all_rows, True)] if self.ranks is None else self._micro_batches(padded, all_rows)
                else:
                    calls = self._micro_batches(padded, minibatch)
                minibatch_tokens = float(padded.response_mask[minibatch].sum())
                minibatch_kl = 0.0  # this rank's token-weighted approx_kl sum over the minibatch
                for optimizer in self._optimizers.values():
                    optimizer.zero_grad(set_to_none=True)
                for rows, counts in calls:
                    micro = padded.select(rows)
                    mask = micro.response_mask
                    width = mask.shape[1]
                    outputs = first_pass if first_pass is not None else self._forward(micro, temperature)
                    old_lp, adv = old_logprobs[rows, :width], advantages[rows, :width]
                    w = weights[rows, :width] if weights is not None else None
                    policy_sum = rl_math.weighted_policy_loss_sum(
                        outputs.logprobs, old_lp, adv, mask, ppo.clip_range, w
                    )
                    entropy_sum = rl_math.masked_sum(outputs.entropy, mask)
                    loss = policy_sum - ppo.entropy_coef * entropy_sum
                    value_sum = None
                    if outputs.values is not None:
                        old_v, ret = old_values[rows, :width], returns[rows, :width]
                        value_sum = rl_math.value_loss_sum(outputs.values, old_v, ret, mask, ppo.clip_range_value)
                        loss = loss + ppo.value_coef * value_sum
                    kl_sum = None
                    if reference_logprobs is not None:
                        kl_sum = rl_math.kl_loss_sum(
                            outputs.logprobs, reference_logprobs[rows, :width], mask, ppo.kl.effective_estimator
                        )
                        loss = loss + kl_coef * kl_sum
                    if not counts:  # a stand-in call (see _micro_batches): gathers and reductions, no gradient
                        loss = loss * 0.0
                    (loss / minibatch_tokens if ranks == 1 else loss / minibatch_tokens * ranks).backward()
                    if not counts:
                        del outputs
                        continue

                    with torch.no_grad():
                        micro_tokens = float(mask.sum())
                        _, clip_fraction, approx_kl = rl_math.policy_loss(
                            outputs.logprobs, old_lp, adv, mask, ppo.clip_range
                        )
                        sums["policy_loss"] += float(policy_sum)
                        sums["entropy"] += float(entropy_sum)
                        sums["clip_fraction"] += float(clip_fraction) * micro_tokens
                        sums["approx_kl"] += float(approx_kl) * micro_tokens
                        minibatch_kl += float(approx_kl) * micro_tokens
                        if value_sum is not None:
                            _, value_clip = rl_math.value_loss(outputs.values, old_v, ret, mask, ppo.clip_range_value)
                            sums["value_loss"] += float(value_sum)
                            sums["value_clip_fraction"] += float(value_clip) * micro_tokens
                        if kl_sum is not None:
                            sums["kl_loss"] += float(kl_sum)
                        tokens_seen += micro_tokens
                    del outputs
                first_pass = None  # its graph is spent
                if ppo.target_kl is not None:
                    # The whole minibatch's approx_kl (every rank's rows: a collective, made by every rank in step).
                    kl_total = self.ranks.sum_floats([minibatch_kl])[0] if self.ranks is not None else minibatch_kl
                    if kl_total / max(minibatch_tokens, 1.0) > 1.5 * ppo.target_kl:
                        log.info(
                            "step %d: approx_kl %.4f > 1.5 x target_kl %g: the update stops after %d of %d minibatches",
                            self.step,
                            kl_total / max(minibatch_tokens, 1.0),
                            ppo.target_kl,
                            applied,
                            planned - 1,
                        )
                        stopped = True
                        continue

                # The norms are of the whole gradients (over every rank's shard), the same on every rank.
                policy_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), ppo.max_grad_norm)
                norms["policy"].append(float(full(policy_norm)))
                if self.critic is not None:
                    critic_norm = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), ppo.max_grad_norm)
                    norms["critic"].append(float(full(critic_norm)))
                if not all(math.isfinite(n[-1]) for n in norms.values() if n):
                    # One non-finite gradient would poison Adam's moments and the weights for good.
                    log.warning("step %d: non-finite gradient norm, minibatch skipped", self.step)
                    skipped += 1
                    continue
                for optimizer in self._optimizers.values():
                    optimizer.step()
                applied += 1
        for optimizer in self._optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        if self.ranks is not None:  # each rank summed its own rows
            *totals, tokens_seen = self.ranks.sum_floats([*sums.values(), tokens_seen])
            sums = dict(zip(sums, totals, strict=True))
        stats = {name: total / max(tokens_seen, 1.0) for name, total in sums.items()}
        stats["grad_norm"] = sum(norms["policy"]) / len(norms["policy"])
        stats["critic_grad_norm"] = sum(norms["critic"]) / len(norms["critic"]) if norms["critic"] else 0.0
        stats["skipped_minibatches"] = float(skipped)
        stats["applied_fraction"] = applied / max(planned, 1)
        return stats

    # ------------------------------------------------------------------------------------------------------------
    # Weights and checkpoints
    # ------------------------------------------------------------------------------------------------------------

    @property
    def _critic_has_adapter(self) -> bool:
        return self.lora.enabled and self.lora.critic and self.critic is not None

    def _critic_checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds of the critic: all of it, or with an adapter on its backbone what trains."""
        return trainable_state(self.critic) if self._critic_has_adapter else self.critic.state_dict()

    def policy_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's weights as (Hugging Face state-dict name, CPU tensor in the model dtype), one at a time.

        Tied weights (e.g. lm_head tied to the embeddings) appear once, under the first name, as in
        ``save_pretrained``. Each tensor is a copy, so a consumer never sees a later update. With LoRA, the
        adapter's tensors only, under peft's names (``adapter_config`` says which adapter they are). With several
        ranks this is a collective, tensor by tensor: every rank iterates it (see ``policy_tensor``).
        """
        for name in self.policy_names():
            yield name, self.policy_tensor(name)

    def _policy_tensors(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.policy) if self.lora.enabled else unique_state(self.policy)

    def policy_names(self) -> list[str]:
        """The names ``policy_state`` yields, in order (no copy, no collective)."""
        return list(self._policy_tensors())

    def policy_tensor(self, name: str) -> torch.Tensor:
        """One tensor of ``policy_state``: a CPU copy in the compute dtype. Sharded (several ranks), it is gathered
        from every rank's shard first, a collective each rank makes for the same name: the whole model is never
        held at once, one tensor at a time (the largest is the embedding)."""
        tensor = self._policy_tensors()[name].detach()
        # The compute dtype: with mixed precision generation serves bf16, so sending fp32 would double the bytes.
        dtype = self._compute_dtype if tensor.is_floating_point() else tensor.dtype
        return full(tensor).to("cpu", dtype=dtype, copy=True).contiguous()

    def save_checkpoint(self, directory: Path) -> Path:
        """Writes ``directory`` atomically (staged beside it, then renamed):

        ``policy/`` (``save_pretrained`` safetensors + tokenizer), ``critic.safetensors``,
        ``optimizer.safetensors`` (optimizer tensors, keys ``{policy|critic}.{param_index}.{name}``) and
        ``trainer_state.json`` (step, version, KL coefficient, score moments, the rest of the optimizer state).

        With LoRA: ``adapter/`` (peft's ``save_pretrained``: adapter_model.safetensors + adapter_config.json),
        ``policy/`` the merged model (if ``lora.export_merged``), and ``critic.safetensors`` holds what trains of the
        critic (its adapter and head) when it has an adapter.
        """
        directory = Path(directory)
        if self.ranks is not None:
            return self._save_sharded(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        try:
            if self.lora.enabled:
                self.policy.save_pretrained(staging / ADAPTER_DIR)
            if not self.lora.enabled or self.lora.export_merged:  # a plain Hugging Face model, for any loader
                exported = merged_copy(self.policy) if self.lora.enabled else self.policy
                exported.save_pretrained(staging / "policy", safe_serialization=True)
                load_tokenizer(self._policy_config).save_pretrained(staging / "policy")
                del exported  # a merged copy is a whole model's memory
            if self._critic_has_adapter:
                save_file(trainable_state(self.critic), str(staging / "critic.safetensors"))
            elif self.critic is not None:
                save_model(self.critic, str(staging / "critic.safetensors"))
            tensors: dict[str, torch.Tensor] = {}
            optimizers = {
                name: split_optimizer_state(optimizer.state_dict(), name, tensors)
                for name, optimizer in self._optimizers.items()
            }
            save_file(tensors, str(staging / "optimizer.safetensors"))
            state = self._counters(CHECKPOINT_FORMAT, optimizers)
            (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
            write_manifest(staging)
            replace_directory(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("checkpoint of step %d (policy version %d) written to %s", self.step, self.version, directory)
        return directory

    def load_checkpoint(self, directory: Path) -> None:
        """Restores a ``save_checkpoint`` directory; training then continues as if it had never stopped.

        A checkpoint of either format loads whatever the number of ranks that wrote it and that reads it."""
        directory = Path(directory)
        if (directory / MANIFEST).exists():  # checkpoints written before manifests have none
            check_manifest(directory)
        state = json.loads((directory / "trainer_state.json").read_text())
        if not self.lora.enabled and (directory / ADAPTER_DIR).exists():
            raise ValueError(
                f"{directory}: a LoRA checkpoint (it has {ADAPTER_DIR}/), but this trainer's lora.rank is 0"
            )
        if state.get("format") == SHARDED_FORMAT:
            self._load_sharded(directory, state)
            return
        if state.get("format") != CHECKPOINT_FORMAT:
            expected = f"{CHECKPOINT_FORMAT} or {SHARDED_FORMAT}"
            raise ValueError(f"{directory}: checkpoint format {state.get('format')}, expected {expected}")
        if self.ranks is not None:
            self._load_whole_into_shards(directory, state)
            return
        policy_files = ADAPTER_DIR if self.lora.enabled else "policy"
        needed = (policy_files, "optimizer.safetensors") + (("critic.safetensors",) if self.critic is not None else ())
        missing = [n for n in needed if not (directory / n).exists()]
        if missing:
            raise ValueError(f"{directory}: incomplete checkpoint, missing {', '.join(missing)}")
        # Everything is read and checked before anything is replaced: a broken checkpoint leaves the trainer as it
        # was. Reloading the policy with from_pretrained handles sharded files and tied weights; the optimizers are
        # rebuilt over the new parameters before their state is restored. With LoRA the base weights never
        # changed: only the adapter is read, and copied into the policy's at the end.
        adapter = None
        if self.lora.enabled:
            policy = self.policy
            adapter = read_adapter(directory / ADAPTER_DIR, policy, self.device)
        else:
            policy = precision.load_trainable_causal_lm(
                self._policy_config.model_copy(update={"path": str(directory / "policy")})
            ).eval()
            if self._gradient_checkpointing:
                precision.enable_gradient_checkpointing(policy)
        critic_state = None
        if self.critic is not None:
            critic_state = load_file(str(directory / "critic.safetensors"), device=str(self.device))
            expected = {k: tuple(v.shape) for k, v in self._critic_checkpoint_state().items()}
            if {k: tuple(v.shape) for k, v in critic_state.items()} != expected:
                raise ValueError(f"{directory}: critic.safetensors does not match this trainer's critic")
        if set(state["optimizers"]) != set(self._optimizers):
            raise ValueError(
                f"{directory}: a checkpoint of a trainer with {sorted(state['optimizers'])} optimizers, this one has "
                f"{sorted(self._optimizers)} (a critic checkpoint loads only into a trainer with a critic)"
            )
        tensors = load_file(str(directory / "optimizer.safetensors"))
        optimizers = self._make_optimizers(policy)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(join_optimizer_state(state["optimizers"][name], name, tensors))
        self.policy = policy
        if adapter is not None:
            load_adapter_state(self.policy, adapter)
        if critic_state is not None:
            self.critic.load_state_dict(critic_state, strict=not self._critic_has_adapter)  # keys checked above
        self._optimizers = optimizers
        self._restore_counters(directory, state)

    # -- the parts both formats share, and the sharded format -----------------------------------------------------

    def _counters(self, format_: int, optimizers: dict) -> dict:
        """trainer_state.json: the step, the version, the KL coefficient, the score moments, the step ledger, and
        the optimizers (their non-tensor state in the one-process format; their names in the sharded one)."""
        return {
            "format": format_,
            "step": self.step,
            "version": self.version,
            "kl_coef": self.kl_coef,
            "score_moments": asdict(self._score_moments),
            "optimizers": optimizers,
            "ledger": self.ledger.to_json(),
        }

    def _restore_counters(self, directory: Path, state: dict) -> None:
        self.step = int(state["step"])
        self.version = int(state["version"])
        self._kl_controller.value = float(state["kl_coef"])
        self._score_moments = _RunningMoments(**state["score_moments"])
        self.ledger = StepLedger.from_json(state.get("ledger"))
        self.epoch = new_epoch(self.epoch)  # the state went back: weights sent from now on outrank the old ones
        log.info("checkpoint %s loaded: step %d, policy version %d", directory, self.step, self.version)

    def _check_optimizers(self, directory: Path, names) -> None:
        if set(names) != set(self._optimizers):
            raise ValueError(
                f"{directory}: a checkpoint of a trainer with {sorted(names)} optimizers, this one has "
                f"{sorted(self._optimizers)} (a critic checkpoint loads only into a trainer with a critic)"
            )

    def _models(self, policy: torch.nn.Module | None = None) -> dict[str, torch.nn.Module]:
        """The models by optimizer name: the policy (or ``policy``, one about to replace it) and the critic."""
        models = {"policy": policy if policy is not None else self.policy}
        if self.critic is not None:
            models["critic"] = self.critic
        return models

    def _save_sharded(self, directory: Path) -> Path:
        """The sharded format (``SHARDED_FORMAT``), written by every rank (a collective): each rank its shards of
        ``sharded/``, then rank 0 the Hugging Face export of the whole policy (gathered to its CPU), the state, the
        manifest, and the rename into place. Staged beside ``directory`` as in the one-process format.

        With LoRA ``sharded/`` holds what trains (the adapters, the critic's head, their AdamW states: the frozen base
        is the model the trainer was started from) and rank 0 writes ``adapter/`` (peft's format, the adapter
        gathered) and, with ``lora.export_merged``, ``policy/`` merged, as the one-process format does."""
        import torch.distributed.checkpoint as dcp

        ranks = self.ranks
        staging = directory.parent / f".{directory.name}.sharded.tmp"
        error = None
        if ranks.is_leader:
            try:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            except OSError as exc:
                error = f"cannot stage {staging}: {exc}"
        ranks.check(error)
        fresh = sorted(name for name, optimizer in self._optimizers.items() if not optimizer.state)
        with _kept_fresh(self._optimizers):
            dcp.save(self._sharded_state(), checkpoint_id=str(staging / SHARDED_DIR))
        # Gathered to rank 0's CPU (a collective): the whole policy, or with LoRA its adapter alone.
        whole = self._full_policy_state()
        error = None
        if ranks.is_leader:
            try:
                self._export_policy(staging, whole)
                state = self._counters(SHARDED_FORMAT, sorted(self._optimizers))
                state["ranks"] = ranks.world_size
                state["fresh_optimizers"] = fresh  # no step yet: their saved state is DCP's placeholder
                (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
                write_manifest(staging)
                replace_directory(staging, directory)
            except Exception as exc:
                shutil.rmtree(staging, ignore_errors=True)
                error = f"checkpoint {directory}: {exc}"
        del whole
        ranks.check(error)
        log.info("checkpoint of step %d (policy version %d) written to %s", self.step, self.version, directory)
        return directory

    def _state_options(self, **options):
        """The DCP state-dict options of this trainer: with LoRA the frozen base weights are left out."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=self.lora.enabled, strict=not self.lora.enabled, **options)

    def _full_policy_state(self) -> dict[str, torch.Tensor]:
        """The policy's state (its trainable part with LoRA) gathered whole to rank 0's CPU; empty on the others."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        options = self._state_options(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.policy, options=options)

    def _export_policy(self, staging: Path, whole: dict[str, torch.Tensor]) -> None:
        """``policy/``, the whole policy in Hugging Face format (safetensors + config + tokenizer), from its full
        state dict. With LoRA ``whole`` is the adapter: ``adapter/`` in peft's format, and ``policy/`` (if
        ``lora.export_merged``) the adapter merged into a CPU copy of the frozen base, read again from its files."""
        if not self.lora.enabled:
            self.policy.save_pretrained(staging / "policy", state_dict=whole, safe_serialization=True)
        else:
            self.policy.save_pretrained(staging / ADAPTER_DIR, state_dict=whole, safe_serialization=True)
            if not self.lora.export_merged:
                return
            base = precision.load_trainable_causal_lm(self._policy_config.model_copy(update={"device": "cpu"}), True)
            policy = wrap_policy(base, self.lora)
            load_adapter_state(policy, read_adapter(staging / ADAPTER_DIR, policy, torch.device("cpu")))
            policy.merge_and_unload().save_pretrained(staging / "policy", safe_serialization=True)
        load_tokenizer(self._policy_config).save_pretrained(staging / "policy")

    def _sharded_state(self, policy: torch.nn.Module | None = None, optimizers: dict | None = None) -> dict:
        """What ``sharded/`` holds, keyed ``model.<name>`` and ``optimizer.<name>``: each a state dict by parameter
        name (shards on several ranks, whole tensors in one process); with LoRA the trainable parameters only."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        models = self._models(policy)
        optimizers = optimizers if optimizers is not None else self._optimizers
        options = self._state_options()
        state = {f"model.{name}": get_model_state_dict(model, options=options) for name, model in models.items()}
        for name, optimizer in optimizers.items():
            state[f"optimizer.{name}"] = get_optimizer_state_dict(models[name], optimizer, options=options)
        return state

    def _load_sharded(self, directory: Path, state: dict) -> None:
        """A sharded-format checkpoint, into this trainer whatever its number of ranks (DCP reshards). Read into
        copies first: a checkpoint that does not load leaves the trainer as it was."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        if self.lora.enabled:
            if not (directory / ADAPTER_DIR).is_dir():
                raise ValueError(f"{directory}: a checkpoint without a LoRA adapter, but this trainer's lora.rank > 0")
            check_adapter_config(directory / ADAPTER_DIR, self.policy)
        self._check_optimizers(directory, state["optimizers"])
        if not (directory / SHARDED_DIR).is_dir():
            raise ValueError(f"{directory}: incomplete checkpoint, missing {SHARDED_DIR}/")
        with _kept_fresh(self._optimizers):
            copies = {key: _cloned(value) for key, value in self._sharded_state().items()}
        dcp.load(copies, checkpoint_id=str(directory / SHARDED_DIR))
        models = self._models()
        options = self._state_options()
        for name, model in models.items():
            set_model_state_dict(model, copies[f"model.{name}"], options=options)
        for name, optimizer in self._optimizers.items():
            set_optimizer_state_dict(models[name], optimizer, copies[f"optimizer.{name}"], options=options)
        for name in state.get("fresh_optimizers", ()):
            self._optimizers[name].state.clear()  # as it was when saved: its first step starts the moments
        self._restore_counters(directory, state)

    def _load_whole_into_shards(self, directory: Path, state: dict) -> None:
        """A one-process checkpoint into a sharded trainer: each rank reads the whole tensors and keeps its shards;
        the optimizer state, saved by parameter index, is matched to the parameters by name. With LoRA the policy
        is its ``adapter/`` (peft's names mapped to the parameters') and the critic's file holds what trains."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        self._check_optimizers(directory, state["optimizers"])
        policy_files = ADAPTER_DIR if self.lora.enabled else "policy"
        needed = (policy_files, "optimizer.safetensors") + (("critic.safetensors",) if self.critic is not None else ())
        missing = [n for n in needed if not (directory / n).exists()]
        if missing:
            raise ValueError(f"{directory}: incomplete checkpoint, missing {', '.join(missing)}")
        if self.lora.enabled:
            adapter = read_adapter(directory / ADAPTER_DIR, self.policy, torch.device("cpu"))
            whole = {"policy": {name: adapter[portable] for name, portable in adapter_names(self.policy).items()}}
        else:
            whole = {
                "policy": precision.load_trainable_causal_lm(
                    self._policy_config.model_copy(update={"path": str(directory / "policy"), "device": "cpu"})
                ).state_dict()
            }
        if self.critic is not None:
            whole["critic"] = load_file(str(directory / "critic.safetensors"))
        tensors = load_file(str(directory / "optimizer.safetensors"))
        models = self._models()
        optimizer_states = {}
        for name, model in models.items():
            by_index = join_optimizer_state(state["optimizers"][name], name, tensors)
            names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimizer's parameter order
            groups = by_index["param_groups"]
            optimizer_states[name] = {
                "state": {names[index]: value for index, value in by_index["state"].items()},
                "param_groups": [{**group, "params": [names[index] for index in group["params"]]} for group in groups],
            }
        options = self._state_options(full_state_dict=True)
        for name, model in models.items():
            set_model_state_dict(model, whole[name], options=options)
            set_optimizer_state_dict(model, self._optimizers[name], optimizer_states[name], options=options)
        self._restore_counters(directory, state)
