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
