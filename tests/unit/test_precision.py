"""Mixed precision (bf16 compute, float32 master weights and AdamW state) and gradient checkpointing in the trainer.

Both are memory options that must not change the maths: checkpointing gives the same step bit for bit (up to
float rounding of the recomputation), and mixed precision moves the weights the way float32 does, within bf16's
resolution.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.trainer.backend import TrainerBackend
from services.trainer.config import CriticConfig, KLConfig, KLMode, PPOConfig
from shared.modeling import ModelConfig
from tests.unit.test_trainer_backend import _ragged_batch


def _trainer(policy_dir, dtype="float32", gradient_checkpointing=False) -> TrainerBackend:
    return TrainerBackend(
        ModelConfig(path=str(policy_dir), dtype=dtype),
        CriticConfig(),
        PPOConfig(
            learning_rate=1e-3,
            ppo_epochs=2,
            minibatch_size=4,
            micro_batch_size=2,
            kl=KLConfig(mode=KLMode.FIXED, init_coef=0.1),
        ),
        gradient_checkpointing=gradient_checkpointing,
    )


@pytest.fixture(scope="module")
def batch(tiny_tied_policy_dir):
    return _ragged_batch(AutoModelForCausalLM.from_pretrained(tiny_tied_policy_dir).eval(), 8, seed=3)


def _delta(trainer: TrainerBackend, initial: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.detach().float() - initial[n]).reshape(-1) for n, p in trainer.policy.named_parameters()])


def test_gradient_checkpointing_gives_the_same_step(tiny_tied_policy_dir, batch):
    plain = _trainer(tiny_tied_policy_dir)
    checkpointed = _trainer(tiny_tied_policy_dir, gradient_checkpointing=True)
    assert checkpointed.policy.is_gradient_checkpointing and checkpointed.policy.training
    first, second = plain.train_step(batch), checkpointed.train_step(batch)
    for name in ("policy_loss", "value_loss", "kl_mean", "entropy", "approx_kl", "grad_norm"):
        assert getattr(second, name) == pytest.approx(getattr(first, name), rel=1e-5, abs=1e-7), name
    for (name, a), (_, b) in zip(plain.policy.named_parameters(), checkpointed.policy.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_is_mixed_precision_with_float32_master_weights(tiny_tied_policy_dir, batch):
    mixed = _trainer(tiny_tied_policy_dir, dtype="bfloat16")
    full = _trainer(tiny_tied_policy_dir)
    initial = {n: p.detach().clone() for n, p in full.policy.named_parameters()}
    # Master weights, their gradients and AdamW's moments: float32.
    assert {p.dtype for p in mixed.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in mixed.critic.parameters()} == {torch.float32}
    stats = mixed.train_step(batch)
    full.train_step(batch)
    moments = [t for state in mixed._optimizers["policy"].state.values() for t in state.values() if t.dim()]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(v)) for v in (stats.policy_loss, stats.value_loss, stats.kl_mean))
    # The compute is bf16: the trainer's recomputed log-probs differ from float32 ones by bf16 rounding, not 0.
    assert 1e-4 < stats.generation_logprob_diff < 0.1
    # The step goes where float32's goes (same direction, similar size), within bf16's resolution.
    mixed_delta, full_delta = _delta(mixed, initial), _delta(full, initial)
    cosine = torch.nn.functional.cosine_similarity(mixed_delta, full_delta, dim=0)
    assert cosine > 0.9, float(cosine)
    assert 0.8 < float(mixed_delta.norm() / full_delta.norm()) < 1.25
    # Generation serves the compute dtype, so the stream sends bf16 (half of float32's bytes), tied head once.
    streamed = dict(mixed.policy_state())
    assert {t.dtype for t in streamed.values()} == {torch.bfloat16}
    assert "lm_head.weight" not in streamed


def test_float16_training_is_refused_with_a_clear_error(tiny_policy_dir):
    with pytest.raises(ValueError, match="bfloat16"):
        _trainer(tiny_policy_dir, dtype="float16")


def test_lora_in_bf16_keeps_the_frozen_base_in_bf16_and_the_adapters_in_float32(tiny_tied_policy_dir, batch):
    """With LoRA the base needs no float32 master copy: half the base's bytes in bf16."""
    from services.trainer.config import LoRAConfig

    trainer = TrainerBackend(
        ModelConfig(path=str(tiny_tied_policy_dir), dtype="bfloat16"),
        CriticConfig(),
        PPOConfig(ppo_epochs=1, minibatch_size=4, micro_batch_size=4),
        lora=LoRAConfig(rank=4, alpha=8),
    )
    frozen = {p.dtype for p in trainer.policy.parameters() if not p.requires_grad}
    trained = {p.dtype for p in trainer.policy.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert {p.dtype for p in trainer.critic.head.parameters()} == {torch.float32}
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    stats = trainer.train_step(batch)
    assert torch.isfinite(torch.tensor(stats.policy_loss))
    changed = {n for n, p in trainer.policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
