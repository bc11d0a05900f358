"""TrainerBackend with the critic-free advantage estimators, the KL as a loss term, off-policy (stale) batches, and
the faster paths (the first epoch's forward reused, length-bucketed micro-batches), on the tiny Llama.

Hand computations use a batch of four responses of 2, 3, 1 and 4 tokens (10 in all), scores [1, 3, 2, 6] and
groups [0, 0, 1, 1]. With one PPO epoch the reported policy loss is that of the first forward, where the ratio is
exactly 1, so it equals -sum_i A_i * len_i / 10.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from services.trainer.config import KLConfig, KLMode, KLPlacement
from shared.rl_math import AdvantageEstimator
from tests.unit.test_trainer_backend import _assert_same_parameters, _backend, _batch, _ragged_batch, _random_ids

LENGTHS = (2, 3, 1, 4)
SCORES = (1.0, 3.0, 2.0, 6.0)
GROUPS = (0, 0, 1, 1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _grouped_batch(policy, reference_shift: float = 0.0):
    generator = torch.Generator().manual_seed(3)
    vocab = policy.config.vocab_size
    prompts = [_random_ids(3, vocab, generator) for _ in LENGTHS]
    responses = [_random_ids(n, vocab, generator) for n in LENGTHS]
    batch = _batch(policy, prompts, responses, SCORES)
    batch.reference_logprobs = [lp - reference_shift for lp in batch.generation_logprobs]
    return dataclasses.replace(batch, group_ids=torch.tensor(GROUPS))


def _critic_free(policy_dir, estimator, **ppo):
    ppo = {"learning_rate": 1e-4, "ppo_epochs": 1, "minibatch_size": 4, "micro_batch_size": 4, **ppo}
    return _backend(policy_dir, advantage_estimator=estimator, **ppo)


@pytest.mark.parametrize(
    "estimator", [AdvantageEstimator.GRPO, AdvantageEstimator.RLOO, AdvantageEstimator.REINFORCE_PLUS_PLUS]
)
def test_critic_free_estimators_load_no_critic(tiny_policy_dir, estimator):
    backend = _critic_free(tiny_policy_dir, estimator)
    assert backend.critic is None
    assert set(backend._optimizers) == {"policy"}
    before = {n: p.detach().clone() for n, p in backend.policy.named_parameters()}
    stats = backend.train_step(_grouped_batch(backend.policy))
    assert stats.value_loss == 0 and stats.extra["critic_grad_norm"] == 0
    assert stats.policy_version == 1 and math.isfinite(stats.policy_loss)
    moved = [n for n, p in backend.policy.named_parameters() if not torch.equal(p, before[n])]
    assert moved, "the policy did not move"


def test_grpo_policy_loss_is_the_hand_computed_advantage(tiny_policy_dir):
    # group 0: scores 1, 3: mean 2, unbiased std sqrt((1 + 1) / 1) = sqrt(2): A = -1/sqrt(2), +1/sqrt(2)
    # group 1: scores 2, 6: mean 4, unbiased std sqrt((4 + 4) / 1) = 2 sqrt(2): A = -1/sqrt(2), +1/sqrt(2)
    # loss = -(-2 + 3 - 1 + 4) / sqrt(2) / 10 = -4 / (10 sqrt(2))
    backend = _critic_free(tiny_policy_dir, AdvantageEstimator.GRPO)
    stats = backend.train_step(_grouped_batch(backend.policy))
    assert stats.policy_loss == pytest.approx(-4 / (10 * math.sqrt(2)), abs=1e-5)
    assert stats.clip_fraction == 0 and stats.approx_kl == pytest.approx(0, abs=1e-12)


def test_grpo_without_scaling_is_mean_centred(tiny_policy_dir):
    # Dr. GRPO: A = r - group mean = -1, +1, -2, +2; loss = -(-2 + 3 - 2 + 8) / 10 = -0.7
    backend = _critic_free(tiny_policy_dir, AdvantageEstimator.GRPO, grpo_scale_rewards=False)
    assert backend.train_step(_grouped_batch(backend.policy)).policy_loss == pytest.approx(-0.7, abs=1e-5)


def test_rloo_policy_loss_is_the_hand_computed_advantage(tiny_policy_dir):
    # k = 2: the baseline is the other sample's score: A = 1-3, 3-1, 2-6, 6-2 = -2, 2, -4, 4
    # loss = -(-2*2 + 2*3 - 4*1 + 4*4) / 10 = -1.4
    backend = _critic_free(tiny_policy_dir, AdvantageEstimator.RLOO)
    assert backend.train_step(_grouped_batch(backend.policy)).policy_loss == pytest.approx(-1.4, abs=1e-5)


def test_reinforce_pp_returns_are_the_scores_and_advantages_whitened(tiny_policy_dir):
    # KL 0, gamma 1: every token's return is its sequence's score; token mean = (2 + 9 + 2 + 24) / 10 = 3.7.
    # Whitened over the batch's tokens, the advantages have mean 0, so the ratio-1 loss is 0.
    backend = _critic_free(tiny_policy_dir, AdvantageEstimator.REINFORCE_PLUS_PLUS)
    stats = backend.train_step(_grouped_batch(backend.policy))
    assert stats.return_mean == pytest.approx(3.7, abs=1e-5)
    assert stats.policy_loss == pytest.approx(0.0, abs=1e-5)


def test_group_estimators_refuse_batches_without_groups(tiny_policy_dir):
    backend = _critic_free(tiny_policy_dir, AdvantageEstimator.GRPO)
    batch = _grouped_batch(backend.policy)
    with pytest.raises(ValueError, match=r"group_ids: .*samples_per_prompt >= 2"):
        backend.train_step(dataclasses.replace(batch, group_ids=None))
    with pytest.raises(ValueError, match=r"at least 2 samples per group.*\[1, 5\]"):
        backend.train_step(dataclasses.replace(batch, group_ids=torch.tensor([0, 0, 1, 5])))
    with pytest.raises(ValueError, match="group_ids: shape"):
        backend.train_step(dataclasses.replace(batch, group_ids=torch.tensor([0, 0, 1])))
    assert backend.version == 0  # nothing applied


def test_kl_as_a_loss_term_leaves_the_rewards_alone(tiny_policy_dir):
    # The reference is 0.3 nats below the policy on every token: d = log pi - log pi_ref = 0.3.
    # k3 per token = exp(-d) + d - 1; with KL in the loss the GRPO advantages are the scores' (as above).
    kl = KLConfig(mode=KLMode.FIXED, init_coef=0.5, placement=KLPlacement.LOSS)
    backend = _critic_free(tiny_policy_dir, AdvantageEstimator.GRPO, kl=kl)
    stats = backend.train_step(_grouped_batch(backend.policy, reference_shift=0.3))
    assert stats.extra["kl_loss"] == pytest.approx(math.exp(-0.3) + 0.3 - 1, abs=1e-5)
    assert stats.policy_loss == pytest.approx(-4 / (10 * math.sqrt(2)), abs=1e-5)
    assert stats.kl_mean == pytest.approx(0.3 * 10 / 4 * (math.exp(-0.3) + 0.3 - 1) / 0.3, abs=1e-4)

    # In the reward, the penalty 0.5 * k1 summed over tokens (0.15 per token) moves the sequence rewards apart by
    # length, so the advantages (and the loss) are no longer the scores'.
    in_reward = KLConfig(mode=KLMode.FIXED, init_coef=0.5, placement=KLPlacement.REWARD)
    backend = _critic_free(tiny_policy_dir, AdvantageEstimator.RLOO, kl=in_reward)
    # RLOO with r_i = score_i - 0.15 len_i = 0.7, 2.55, 1.85, 5.4: A = -1.85, 1.85, -3.55, 3.55;
    # loss = -(-3.7 + 5.55 - 3.55 + 14.2) / 10 = -1.25
    stats = backend.train_step(_grouped_batch(backend.policy, reference_shift=0.3))
    assert stats.policy_loss == pytest.approx(-1.25, abs=1e-4)


def test_k1_cannot_be_a_loss_term():
    with pytest.raises(ValueError, match="zero expected gradient"):
        KLConfig(placement=KLPlacement.LOSS, estimator="k1")
    assert KLConfig(placement=KLPlacement.LOSS).effective_estimator == "k3"
    assert KLConfig().effective_estimator == "k1"


def test_a_stale_batch_weights_each_token_by_the_behaviour_ratio(tiny_policy_dir):
    on_policy = _critic_free(tiny_policy_dir, AdvantageEstimator.RLOO)
    reference = on_policy.train_step(_grouped_batch(on_policy.policy))
    assert reference.extra["staleness"] == 0 and "behaviour_weight_mean" not in reference.extra

    # The batch was sampled by version 0, the trainer holds version 1: pi_old / pi_behaviour = 4 everywhere,
    # truncated at the cap 2, so every token's loss is doubled.
    stale = _critic_free(tiny_policy_dir, AdvantageEstimator.RLOO)
    stale.version = 1
    batch = _grouped_batch(stale.policy)
    batch.generation_logprobs = [lp - math.log(4) for lp in batch.generation_logprobs]
    stats = stale.train_step(batch)
    assert stats.extra["staleness"] == 1
    assert stats.extra["behaviour_weight_mean"] == pytest.approx(2.0)
    assert stats.extra["behaviour_weight_capped"] == 1.0
    assert stats.policy_loss == pytest.approx(2 * reference.policy_loss, rel=1e-5)

    # Behaviour log-probs equal to the trainer's: weights of 1, the on-policy update.
    same = _critic_free(tiny_policy_dir, AdvantageEstimator.RLOO)
    same.version = 1
    stats = same.train_step(_grouped_batch(same.policy))
    assert stats.extra["behaviour_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    _assert_same_parameters(on_policy.policy, same.policy, rtol=0, atol=1e-6)


def test_the_first_epochs_forward_gives_the_same_update_as_a_separate_evaluation(tiny_policy_dir, tiny_reward_dir):
    from services.trainer.config import CriticConfig, CriticInit

    critic = CriticConfig(init=CriticInit.REWARD_MODEL, path=str(tiny_reward_dir))
    common = {"learning_rate": 1e-3, "ppo_epochs": 3, "minibatch_size": 6, "micro_batch_size": 6, "value_coef": 0.5}
    fused = _backend(tiny_policy_dir, critic=critic, **common)
    separate = _backend(tiny_policy_dir, critic=critic, fuse_first_pass=False, **common)
    assert fused._fused_first_pass(6) and not separate._fused_first_pass(6)
    batch = _ragged_batch(fused.policy, size=6, seed=21)
    a, b = fused.train_step(batch), separate.train_step(batch)
    assert a.policy_loss == pytest.approx(b.policy_loss, abs=1e-6)
    assert a.value_loss == pytest.approx(b.value_loss, abs=1e-6)
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)
    _assert_same_parameters(fused.policy, separate.policy, rtol=0, atol=1e-6)
    _assert_same_parameters(fused.critic, separate.critic, rtol=0, atol=1e-6)


def test_length_bucketed_micro_batches_give_the_same_update(tiny_policy_dir):
    # Two minibatches of 4 per epoch, cut into micro-batches of 2 sorted by length, against whole minibatches.
    common = {"learning_rate": 1e-3, "ppo_epochs": 2, "minibatch_size": 4, "entropy_coef": 0.01}
    whole = _backend(tiny_policy_dir, micro_batch_size=4, **common)
    split = _backend(tiny_policy_dir, micro_batch_size=2, **common)
    batch = _ragged_batch(whole.policy, size=8, seed=22)
    a, b = whole.train_step(batch), split.train_step(batch)
    assert a.policy_loss == pytest.approx(b.policy_loss, abs=1e-6)
    assert a.entropy == pytest.approx(b.entropy, abs=1e-5)
    _assert_same_parameters(whole.policy, split.policy, rtol=0, atol=1e-6)


def test_a_critic_free_checkpoint_round_trip(tiny_policy_dir, tmp_path):
    config = {"learning_rate": 1e-3, "ppo_epochs": 2, "minibatch_size": 2, "micro_batch_size": 2}
    uninterrupted = _critic_free(tiny_policy_dir, AdvantageEstimator.GRPO, **config)
    batches = [_grouped_batch(uninterrupted.policy), _grouped_batch(uninterrupted.policy, reference_shift=0.1)]
    for batch in batches:
        uninterrupted.train_step(batch)
    stopped = _critic_free(tiny_policy_dir, AdvantageEstimator.GRPO, **config)
    stopped.train_step(batches[0])
    stopped.save_checkpoint(tmp_path / "grpo")
    assert not (tmp_path / "grpo" / "critic.safetensors").exists()
    resumed = _critic_free(tiny_policy_dir, AdvantageEstimator.GRPO, **config)
    resumed.load_checkpoint(tmp_path / "grpo")
    resumed.train_step(batches[1])
    _assert_same_parameters(uninterrupted.policy, resumed.policy)

    # A checkpoint with a critic does not load into a trainer without one, and the other way round.
    with_critic = _backend(tiny_policy_dir, **config)
    with pytest.raises(ValueError, match=r"critic\.safetensors|optimizers"):
        with_critic.load_checkpoint(tmp_path / "grpo")
    with_critic.train_step(_ragged_batch(with_critic.policy, size=4, seed=5))
    with_critic.save_checkpoint(tmp_path / "gae")
    with pytest.raises(ValueError, match="optimizers"):
        _critic_free(tiny_policy_dir, AdvantageEstimator.GRPO, **config).load_checkpoint(tmp_path / "gae")
