"""TrainerBackend on the tiny Llama policy and reward model: PPO steps, weights, critic, checkpoints, validation.

Rollouts are made here without the generation service: tokens sampled from (or chosen for) the policy, log-probs
from a plain unpadded single-sequence forward, made-up scores.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from services.trainer.backend import TrainerBackend
from services.trainer.config import CriticConfig, CriticInit, KLConfig, KLMode, PPOConfig, ScoreNormalization
from services.trainer.critic import Critic
from shared.modeling import ModelConfig, load_causal_lm, load_sequence_classifier
from shared.types import RolloutBatch
from tests.helpers import forward_logprobs, sample_tokens

FIRST_ORDINARY_ID = 4  # ids 0..3 are <pad>, <s>, </s>, <unk>


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and intra-op threads slow down ten-fold when other processes share
    the cores (measured: 5 s -> 90 s for this file on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _backend(policy_dir: Path, critic: CriticConfig | None = None, **ppo: object) -> TrainerBackend:
    ppo.setdefault("kl", KLConfig(mode=KLMode.FIXED, init_coef=0.0))
    return TrainerBackend(ModelConfig(path=str(policy_dir)), critic or CriticConfig(), PPOConfig(**ppo))


def _random_ids(length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(FIRST_ORDINARY_ID, vocab, (length,), generator=generator)


def _batch(model, prompts, responses, scores, reference=None) -> RolloutBatch:
    """Generation log-probs from ``model``; reference log-probs from ``reference`` (default: the same: KL 0)."""
    generation = [forward_logprobs(model, p, r) for p, r in zip(prompts, responses, strict=True)]
    ref = (
        generation
        if reference is None
        else [forward_logprobs(reference, p, r) for p, r in zip(prompts, responses, strict=True)]
    )
    return RolloutBatch(
        prompt_ids=list(prompts),
        response_ids=list(responses),
        scores=torch.as_tensor(scores, dtype=torch.float32),
        reference_logprobs=[lp.clone() for lp in ref],
        generation_logprobs=generation,
    )


def _ragged_batch(model, size: int, seed: int, scores=None) -> RolloutBatch:
    """Random prompts of 1..6 tokens and responses of 1..7 tokens, so that padding matters."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    lengths = torch.randint(1, 8, (2, size), generator=generator)
    prompts = [_random_ids(int(n.clamp(max=6)), vocab, generator) for n in lengths[0]]
    responses = [_random_ids(int(n), vocab, generator) for n in lengths[1]]
    if scores is None:
        scores = torch.randn(size, generator=generator)
    return _batch(model, prompts, responses, scores)


def _assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module, **tolerance: float) -> None:
    b_parameters = dict(b.named_parameters())
    for name, parameter in a.named_parameters():
        assert_close(parameter, b_parameters[name], msg=lambda m, name=name: f"{name}: {m}", **tolerance)


# --------------------------------------------------------------------------------------------------------------
# train_step basics, policy_state
# --------------------------------------------------------------------------------------------------------------


def test_train_step_updates_weights_and_version(tiny_policy_dir):
    backend = _backend(tiny_policy_dir, learning_rate=1e-3, minibatch_size=4, micro_batch_size=2, ppo_epochs=2)
    batch = _ragged_batch(backend.policy, size=6, seed=0)
    before = {name: p.detach().clone() for name, p in backend.policy.named_parameters()}

    for expected_version in (1, 2):
        stats = backend.train_step(batch)
        assert stats.policy_version == backend.version == expected_version
        for field in dataclasses.fields(stats):
            value = getattr(stats, field.name)
            if isinstance(value, float):
                assert math.isfinite(value), field.name
    assert stats.tokens == sum(r.numel() for r in batch.response_ids)
    assert stats.learning_rate == 1e-3
    assert stats.grad_norm > 0
    assert 0 < stats.entropy <= math.log(backend.policy.config.vocab_size) + 1e-4
    changed = [name for name, p in backend.policy.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)


def test_policy_state_loads_into_a_fresh_model(tiny_policy_dir):
    backend = _backend(tiny_policy_dir, learning_rate=1e-3)
    backend.train_step(_ragged_batch(backend.policy, size=4, seed=1))

    fresh = load_causal_lm(ModelConfig(path=str(tiny_policy_dir)))
    state = dict(backend.policy_state())
    assert list(state) == list(fresh.state_dict())
    assert all(t.device.type == "cpu" and t.is_contiguous() and t.dtype == torch.float32 for t in state.values())
    fresh.load_state_dict(state, strict=True)

    ids = _random_ids(12, fresh.config.vocab_size, torch.Generator().manual_seed(2))[None]
    with torch.no_grad():
        assert_close(fresh(ids).logits, backend.policy(ids).logits, rtol=0, atol=0)


def test_old_logprobs_are_padding_invariant(tiny_policy_dir):
    # One micro-batch holds every (ragged, right-padded) sample; the batch's generation log-probs come from
    # unpadded single-sample forwards, so the reported difference is the trainer's padding error.
    backend = _backend(tiny_policy_dir, ppo_epochs=1, minibatch_size=8, micro_batch_size=8)
    stats = backend.train_step(_ragged_batch(backend.policy, size=8, seed=3))
    assert stats.generation_logprob_diff < 1e-5


# --------------------------------------------------------------------------------------------------------------
# Learning signal and KL penalty
# --------------------------------------------------------------------------------------------------------------


def test_rewarded_token_becomes_more_likely(tiny_policy_dir):
    backend = _backend(tiny_policy_dir, learning_rate=3e-3, ppo_epochs=4, minibatch_size=8, micro_batch_size=8)
    vocab = backend.policy.config.vocab_size
    target = 100
    generator = torch.Generator().manual_seed(4)
    probe_prompts = torch.randint(FIRST_ORDINARY_ID, vocab, (16, 3), generator=generator)

    @torch.no_grad()
    def target_probability() -> float:
        return float(torch.softmax(backend.policy(probe_prompts).logits[:, -1], dim=-1)[:, target].mean())

    before = target_probability()
    for _ in range(8):
        prompts = [_random_ids(3, vocab, generator) for _ in range(8)]
        responses = [_random_ids(4, vocab, generator) for _ in range(8)]
        for response in responses[::2]:  # half the samples contain the target token somewhere
            response[int(torch.randint(0, 4, (1,), generator=generator))] = target
        scores = [1.0 if bool((r == target).any()) else -1.0 for r in responses]
        backend.train_step(_batch(backend.policy, prompts, responses, scores))
    assert target_probability() > 3 * before


@torch.no_grad()
def _exact_kl(policy, reference, sequences: torch.Tensor) -> float:
    """Mean over positions of KL(pi || pi_ref) of the full next-token distributions."""
    logp = torch.log_softmax(policy(sequences).logits.float(), dim=-1)
    logq = torch.log_softmax(reference(sequences).logits.float(), dim=-1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def test_kl_penalty_pulls_policy_toward_reference(tiny_policy_dir, tmp_path):
    reference = load_causal_lm(ModelConfig(path=str(tiny_policy_dir)))
    vocab = reference.config.vocab_size
    generator = torch.Generator().manual_seed(5)
    # The policy starts away from the reference: a few maximum-likelihood steps toward one token make it say
    # that token almost always (KL of several nats per token).
    favourite = 100
    shifted = load_causal_lm(ModelConfig(path=str(tiny_policy_dir)))
    optimizer = torch.optim.Adam(shifted.parameters(), lr=1e-2)
    for _ in range(10):
        logits = shifted(torch.randint(FIRST_ORDINARY_ID, vocab, (16, 8), generator=generator)).logits
        loss = -torch.log_softmax(logits, dim=-1)[..., favourite].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    shifted.save_pretrained(tmp_path / "shifted", safe_serialization=True)

    # Scores are zero: the per-token KL penalty is the only reward.
    backend = _backend(
        tmp_path / "shifted",
        learning_rate=3e-3,
        ppo_epochs=2,
        minibatch_size=8,
        micro_batch_size=8,
        kl=KLConfig(mode=KLMode.FIXED, init_coef=1.0),
    )
    probes = torch.randint(FIRST_ORDINARY_ID, vocab, (16, 6), generator=generator)
    before = _exact_kl(backend.policy, reference, probes)
    for _ in range(6):
        prompts = [_random_ids(2, vocab, generator) for _ in range(8)]
        responses = [sample_tokens(backend.policy, p, 6, generator) for p in prompts]
        backend.train_step(_batch(backend.policy, prompts, responses, torch.zeros(8), reference=reference))
    after = _exact_kl(backend.policy, reference, probes)
    assert before > 1.0
    assert after < 0.5 * before, (before, after)


def test_kl_enters_rewards_with_minus_beta(tiny_policy_dir):
    # gamma = lam = 1, zero scores, a zero-initialised critic (values 0) and no whitening: the return of token t is
    # exactly -beta * sum_{k >= t} kl_k, with kl_k = log pi - log pi_ref (k1).
    beta = 0.5
    backend = _backend(
        tiny_policy_dir,
        ppo_epochs=1,
        gamma=1.0,
        lam=1.0,
        whiten_advantages=False,
        kl=KLConfig(mode=KLMode.FIXED, init_coef=beta),
    )
    batch = _ragged_batch(backend.policy, size=4, seed=7, scores=torch.zeros(4))
    generator = torch.Generator().manual_seed(8)
    batch.reference_logprobs = [lp - torch.rand(lp.shape, generator=generator) for lp in batch.generation_logprobs]
    kl = [g - r for g, r in zip(batch.generation_logprobs, batch.reference_logprobs, strict=True)]
    returns = [-beta * k.flip(0).cumsum(0).flip(0) for k in kl]

    stats = backend.train_step(batch)
    assert stats.kl_coef == beta
    assert stats.kl_mean == pytest.approx(float(torch.stack([k.sum() for k in kl]).mean()), abs=1e-4)
    assert stats.return_mean == pytest.approx(float(torch.cat(returns).mean()), abs=1e-4)


@pytest.mark.parametrize("mode", [KLMode.ADAPTIVE, KLMode.FIXED])
def test_kl_controller(tiny_policy_dir, mode):
    kl = KLConfig(mode=mode, init_coef=0.1, target=100.0, horizon=10)
    backend = _backend(tiny_policy_dir, ppo_epochs=1, kl=kl)
    batch = _ragged_batch(backend.policy, size=4, seed=9)
    batch.reference_logprobs = [lp - 1.0 for lp in batch.generation_logprobs]  # per-sequence KL ~ length << target

    stats = backend.train_step(batch)
    assert stats.kl_coef == 0.1  # the coefficient used by this step
    if mode is KLMode.ADAPTIVE:  # KL below target: beta shrinks by the clipped 20% times n_steps / horizon
        assert backend.kl_coef == pytest.approx(0.1 * (1 - 0.2 * 4 / 10))
    else:
        assert backend.kl_coef == 0.1


# --------------------------------------------------------------------------------------------------------------
# Critic
# --------------------------------------------------------------------------------------------------------------


def test_critic_from_reward_model_starts_at_its_score(tiny_reward_dir):
    config = ModelConfig(path=str(tiny_reward_dir))
    critic = Critic.from_reward_model(config)
    reward_model = load_sequence_classifier(config)
    ids = _random_ids(9, reward_model.config.vocab_size, torch.Generator().manual_seed(10))[None]
    with torch.no_grad():
        score = reward_model(ids).logits[0, 0]
        values = critic(ids, torch.ones_like(ids))
    assert values.shape == (1, 9) and values.dtype == torch.float32
    assert_close(values[0, -1], score, rtol=1e-5, atol=1e-5)


def test_critic_from_policy_starts_at_zero(tiny_policy_dir):
    backend = _backend(tiny_policy_dir, critic=CriticConfig(init=CriticInit.POLICY))
    ids = _random_ids(7, backend.policy.config.vocab_size, torch.Generator().manual_seed(11))[None]
    with torch.no_grad():
        assert torch.equal(backend.critic(ids, torch.ones_like(ids)), torch.zeros(1, 7))


# --------------------------------------------------------------------------------------------------------------
# Micro-batching
# --------------------------------------------------------------------------------------------------------------


def test_micro_batching_gives_the_same_update(tiny_policy_dir, tiny_reward_dir):
    critic = CriticConfig(init=CriticInit.REWARD_MODEL, path=str(tiny_reward_dir))
    common = {"learning_rate": 1e-4, "ppo_epochs": 1, "minibatch_size": 6, "value_coef": 0.5, "entropy_coef": 0.01}
    whole = _backend(tiny_policy_dir, critic=critic, micro_batch_size=6, **common)
    split = _backend(tiny_policy_dir, critic=critic, micro_batch_size=1, **common)
    batch = _ragged_batch(whole.policy, size=6, seed=12)

    whole_stats, split_stats = whole.train_step(batch), split.train_step(batch)
    assert split_stats.policy_loss == pytest.approx(whole_stats.policy_loss, abs=1e-6)
    assert split_stats.grad_norm == pytest.approx(whole_stats.grad_norm, rel=1e-4)
    _assert_same_parameters(whole.policy, split.policy, rtol=0, atol=1e-6)
    _assert_same_parameters(whole.critic, split.critic, rtol=0, atol=1e-6)


def test_target_kl_stops_the_update_once_a_minibatch_drifts_too_far(tiny_policy_dir):
    """ppo.target_kl: a minibatch whose approx_kl passes 1.5 x target_kl is not applied, nor any after it. A target
    no minibatch reaches changes nothing; a tiny one lets only the first minibatch through (the policy has not moved
    yet, so its approx_kl is 0), and the step reports the fraction it applied."""
    common = {"learning_rate": 1e-3, "ppo_epochs": 4, "minibatch_size": 2, "micro_batch_size": 2}
    full = _backend(tiny_policy_dir, **common)
    batch = _ragged_batch(full.policy, size=6, seed=3)
    initial = {n: p.detach().clone() for n, p in full.policy.named_parameters()}
    full_stats = full.train_step(batch)
    assert full_stats.extra["applied_fraction"] == 1.0

    loose = _backend(tiny_policy_dir, target_kl=1e6, **common)
    loose_stats = loose.train_step(batch)
    assert loose_stats.extra["applied_fraction"] == 1.0 and loose_stats.approx_kl == full_stats.approx_kl
    _assert_same_parameters(full.policy, loose.policy, rtol=0, atol=0)

    tight = _backend(tiny_policy_dir, target_kl=1e-9, **common)
    tight_stats = tight.train_step(batch)
    assert tight_stats.extra["applied_fraction"] == pytest.approx(1 / 12)  # 3 minibatches x 4 epochs, 1 applied
    moved = [n for n, p in tight.policy.named_parameters() if not torch.equal(p.detach(), initial[n])]
    assert moved, "the first minibatch was applied"
    assert any(not torch.equal(p, q) for p, q in zip(tight.policy.parameters(), full.policy.parameters(), strict=True))


def test_target_kl_must_be_positive():
    with pytest.raises(ValueError):
        PPOConfig(target_kl=0)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_resumes_exactly(tiny_policy_dir, tmp_path):
    config = {
        "learning_rate": 1e-3,
        "ppo_epochs": 2,
        "minibatch_size": 2,
        "micro_batch_size": 1,
        "score_normalization": ScoreNormalization.RUNNING,
        "score_clip": 1.5,
        "kl": KLConfig(mode=KLMode.ADAPTIVE, init_coef=0.1, target=1.0, horizon=20),
    }
    uninterrupted = _backend(tiny_policy_dir, **config)
    batches = [_ragged_batch(uninterrupted.policy, size=4, seed=seed) for seed in (13, 14)]
    for batch in batches:
        uninterrupted.train_step(batch)

    stopped = _backend(tiny_policy_dir, **config)
    stopped.train_step(batches[0])
    checkpoint = tmp_path / "runs" / "checkpoint"
    stopped.save_checkpoint(checkpoint)
    assert stopped.save_checkpoint(checkpoint) == checkpoint  # overwriting an existing checkpoint works

    resumed = _backend(tiny_policy_dir, **config)
    resumed.load_checkpoint(checkpoint)
    assert (resumed.version, resumed.step, resumed.kl_coef) == (1, 1, stopped.kl_coef)
    resumed.train_step(batches[1])

    assert (resumed.version, resumed.kl_coef) == (uninterrupted.version, uninterrupted.kl_coef)
    _assert_same_parameters(uninterrupted.policy, resumed.policy)
    _assert_same_parameters(uninterrupted.critic, resumed.critic)

    files = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert {"critic.safetensors", "optimizer.safetensors", "trainer_state.json", "policy/model.safetensors"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["checkpoint"]  # no staging leftovers
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint / "policy", use_safetensors=True)
    _assert_same_parameters(stopped.policy, reloaded)
    shutil.rmtree(checkpoint)


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["critic.safetensors", "optimizer.safetensors", "critic-shape"])
def test_a_broken_checkpoint_leaves_the_trainer_unchanged(tiny_policy_dir, tmp_path, damage):
    from safetensors.torch import save_file

    source = _backend(tiny_policy_dir, learning_rate=1e-3)
    source.train_step(_ragged_batch(source.policy, size=4, seed=3))
    checkpoint = source.save_checkpoint(tmp_path / "checkpoint")
    if damage == "critic-shape":
        save_file({"head.weight": torch.zeros(1, 3)}, str(checkpoint / "critic.safetensors"))
    else:
        (checkpoint / damage).unlink()
    target = _backend(tiny_policy_dir)
    before = {k: v.clone() for k, v in target.policy.state_dict().items()}
    policy_object = target.policy
    with pytest.raises(ValueError, match=r"checkpoint|critic"):
        target.load_checkpoint(checkpoint)
    assert target.policy is policy_object and target.version == 0 and target.step == 0
    for name, tensor in target.policy.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def _break_lengths(batch):
    batch.prompt_ids.pop()


def _break_reference_length(batch):
    batch.reference_logprobs[1] = batch.reference_logprobs[1][:-1]


def _break_generation_length(batch):
    batch.generation_logprobs[2] = torch.cat([batch.generation_logprobs[2], torch.zeros(1)])


def _empty_response(batch):
    for name in ("response_ids", "reference_logprobs", "generation_logprobs"):
        getattr(batch, name)[0] = getattr(batch, name)[0][:0]


def _break_scores_shape(batch):
    batch.scores = batch.scores[:, None]


def _nan_score(batch):
    batch.scores[3] = float("nan")


def _token_outside_vocabulary(batch):
    batch.prompt_ids[0] = batch.prompt_ids[0].clone()
    batch.prompt_ids[0][0] = 10**6


def _empty_batch(batch):
    for name in ("prompt_ids", "response_ids", "reference_logprobs", "generation_logprobs"):
        setattr(batch, name, [])
    batch.scores = torch.zeros(0)


@pytest.mark.parametrize(
    ("corrupt", "field"),
    [
        (_empty_batch, "response_ids"),
        (_break_lengths, "prompt_ids"),
        (_break_reference_length, r"reference_logprobs\[1\]"),
        (_break_generation_length, r"generation_logprobs\[2\]"),
        (_empty_response, r"response_ids\[0\]"),
        (_break_scores_shape, "scores"),
        (_nan_score, "scores"),
        (_token_outside_vocabulary, r"prompt_ids\[0\]"),
    ],
)
def test_bad_batch_raises_value_error_naming_the_field(tiny_policy_dir, corrupt, field):
    backend = _backend(tiny_policy_dir, ppo_epochs=1)
    batch = _ragged_batch(backend.policy, size=4, seed=15)
    corrupt(batch)
    with pytest.raises(ValueError, match=f"^{field}"):
        backend.train_step(batch)
    assert backend.version == 0 and backend.step == 0


def test_config_rejects_micro_batch_larger_than_minibatch():
    with pytest.raises(ValueError, match="micro_batch_size"):
        PPOConfig(minibatch_size=2, micro_batch_size=4)


def test_critic_config_from_reward_model_needs_a_path():
    with pytest.raises(ValueError, match="path"):
        CriticConfig(init=CriticInit.REWARD_MODEL)
