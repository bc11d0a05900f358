"""Reference computations the tests compare against: plain unpadded forwards of a Hugging Face model."""

from __future__ import annotations

import torch


@torch.no_grad()
def forward_logprobs(model, prompt: torch.Tensor, response: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(R,) log pi(response_t | prompt, response_<t) under softmax(logits / temperature), one unpadded forward."""
    logits = model(torch.cat([prompt, response])[None]).logits[0, prompt.numel() - 1 : -1]
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, response[:, None]).squeeze(-1)


@torch.no_grad()
def sample_tokens(model, prompt: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """(length,) tokens sampled from the model at temperature 1, one unpadded forward per token."""
    ids = prompt
    for _ in range(length):
        probs = torch.softmax(model(ids[None]).logits[0, -1].float(), dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)])
    return ids[prompt.numel() :]


FIRST_ORDINARY_ID = 4  # the tiny tokenizer's ids 0..3 are <pad>, <s>, </s>, <unk>


def sampled_rollout(model, seed: int = 0):
    """Four samples of 4 tokens from ``model`` after random prompts of 1..4 tokens, made-up scores, and the model's
    own log-probs as both the reference's and generation's (KL 0, ratio 1)."""
    from shared.types import RolloutBatch

    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompts = [torch.randint(FIRST_ORDINARY_ID, vocab, (n,), generator=generator) for n in (2, 3, 4, 1)]
    responses = [sample_tokens(model, p, 4, generator) for p in prompts]
    logprobs = [forward_logprobs(model, p, r) for p, r in zip(prompts, responses, strict=True)]
    return RolloutBatch(
        prompt_ids=prompts,
        response_ids=responses,
        scores=torch.tensor([1.0, -1.0, 0.5, -0.5]),
        reference_logprobs=logprobs,
        generation_logprobs=[lp.clone() for lp in logprobs],
    )


# The rule-based reward the in-process loops score with (no reward model to load).
REWARD = {"function": "services.reward.functions:positive_word_share"}


def tiny_inprocess_clients(policy_dir):
    """The orchestrator's clients over in-process backends on ``policy_dir``: generation, the rule-based reward,
    reference, and a trainer without a critic, one epoch of minibatches of 4."""
    from services.generation.backend import GenerationBackend
    from services.generation.config import GenerationConfig
    from services.orchestrator.inprocess import inprocess_clients
    from services.reference.backend import ReferenceBackend
    from services.reference.config import ReferenceConfig
    from services.reward.backend import load_backend
    from services.reward.config import RewardConfig
    from services.trainer.backend import TrainerBackend
    from services.trainer.config import CriticConfig, PPOConfig
    from shared.modeling import ModelConfig

    model = {"model": {"path": str(policy_dir)}}
    return inprocess_clients(
        GenerationBackend(GenerationConfig.model_validate(model)),
        load_backend(RewardConfig.model_validate(REWARD)),
        ReferenceBackend(ReferenceConfig.model_validate(model)),
        TrainerBackend(
            ModelConfig(path=str(policy_dir)),
            CriticConfig(),
            PPOConfig(ppo_epochs=1, minibatch_size=4, micro_batch_size=4),
        ),
    )
