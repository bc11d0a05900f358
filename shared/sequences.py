"""Prompt + response sequences through a causal LM: padding and per-token log-probs.

Right padding keeps the position ids of real tokens equal to those of an unpadded forward (0, 1, ...), so the
log-probs of a sample do not depend on what else is in its batch.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import PreTrainedModel

from shared.rl_math import logprobs_from_logits


@functools.cache
def _forward_takes(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM (under any wrapper such as peft's) can compute logits for its last positions only;
    known per model class, so asking costs nothing on the hot path."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_takes(type(base), "logits_to_keep")


def pad_prompt_response(
    prompt_ids: list[torch.Tensor], response_ids: list[torch.Tensor], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenates each prompt with its response and right-pads the batch.

    Returns ``input_ids`` (B, L), ``attention_mask`` (B, L), ``prompt_lengths`` (B,) and ``response_mask`` (B, R)
    where R is the longest response; response token t of sample b sits at position prompt_lengths[b] + t.
    """
    rows = [torch.cat([p.to(torch.int64), r.to(torch.int64)]) for p, r in zip(prompt_ids, response_ids, strict=True)]
    length = max(int(row.numel()) for row in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((batch, length), dtype=torch.int64)
    for b, row in enumerate(rows):
        input_ids[b, : row.numel()] = row
        attention_mask[b, : row.numel()] = 1
    prompt_lengths = torch.tensor([int(p.numel()) for p in prompt_ids], dtype=torch.int64)
    response_lengths = torch.tensor([int(r.numel()) for r in response_ids], dtype=torch.int64)
    width = int(response_lengths.max())
    response_mask = (torch.arange(width).unsqueeze(0) < response_lengths.unsqueeze(1)).to(torch.float32)
    return input_ids, attention_mask, prompt_lengths, response_mask


def gather_response(values: torch.Tensor, prompt_lengths: torch.Tensor, width: int, shift: int) -> torch.Tensor:
    """Takes ``values[b, prompt_lengths[b] + t - shift]`` for t < width: (B, L, ...) -> (B, width, ...).

    ``shift=1`` aligns logits (which predict the next token) with the response tokens they score.
    Indices past the end of a row are clamped; callers mask them with the response mask.
    """
    batch, length = values.shape[:2]
    index = prompt_lengths.to(values.device).unsqueeze(1) + torch.arange(width, device=values.device) - shift
    index = index.clamp(0, length - 1)
    if values.dim() == 2:
        return torch.gather(values, 1, index)
    expanded = index.reshape(batch, width, *([1] * (values.dim() - 2))).expand(batch, width, *values.shape[2:])
    return torch.gather(values, 1, expanded)


def response_logprobs_padded(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_lengths: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log softmax(logits / T)[response_t] for a padded batch: (B, R) float32, zero where ``response_mask`` is 0."""
    width = response_mask.shape[1]
    length = input_ids.shape[1]
    # Logits only from the shortest prompt's last token on: no (B, L, V) tensor over the prompts.
    keep = length - int(prompt_lengths.min()) + 1
    extra = {"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits  # (B, keep or L, V)
    start = length - logits.shape[1]  # position of the first kept logit
    logits = gather_response(logits, prompt_lengths - start, width, shift=1)  # (B, R, V): only response positions
    labels = gather_response(input_ids, prompt_lengths, width, shift=0)  # (B, R)
    return logprobs_from_logits(logits, labels, temperature) * response_mask.to(logits.device)


@torch.no_grad()
def response_logprobs(
    model: PreTrainedModel,
    prompt_ids: list[torch.Tensor],
    response_ids: list[torch.Tensor],
    pad_token_id: int,
    micro_batch_size: int,
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """Per-sample log-probs of the response tokens under softmax(logits / temperature), computed in
    micro-batches: B x (R_i,) float32 on CPU."""
    device = next(model.parameters()).device
    results: list[torch.Tensor] = []
    for start in range(0, len(prompt_ids), micro_batch_size):
        prompts = prompt_ids[start : start + micro_batch_size]
        responses = response_ids[start : start + micro_batch_size]
        input_ids, attention_mask, prompt_lengths, response_mask = pad_prompt_response(prompts, responses, pad_token_id)
        logprobs = (
            response_logprobs_padded(
                model, input_ids.to(device), attention_mask.to(device), prompt_lengths, response_mask, temperature
            )
            .float()
            .cpu()
        )
        results.extend(logprobs[b, : int(r.numel())].clone() for b, r in enumerate(responses))
    return results
