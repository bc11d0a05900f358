"""Rollout batches as padded tensors: prompt + response rows, right-padded, and response-aligned outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.types import RolloutBatch


@dataclass
class PaddedBatch:
    """Prompt+response sequences, right-padded, and the right-padded responses.

    Right padding keeps the real tokens at their natural positions (0..P+R-1), so position ids need no fix-up
    and the causal mask already hides the padding from every real token.
    """

    input_ids: torch.Tensor  # (B, L) int64, prompt_b then response_b then padding
    attention_mask: torch.Tensor  # (B, L) int64, 1 on real tokens
    response_ids: torch.Tensor  # (B, T) int64, right-padded
    response_mask: torch.Tensor  # (B, T) bool, True on real response tokens
    prompt_lengths: torch.Tensor  # (B,) int64, P_b

    def select(self, rows: torch.Tensor) -> PaddedBatch:
        """The samples ``rows``, trimmed to their own longest sequence and response (no wasted compute)."""
        length = int(self.attention_mask[rows].sum(dim=1).max())
        width = int(self.response_mask[rows].sum(dim=1).max())
        return PaddedBatch(
            input_ids=self.input_ids[rows, :length],
            attention_mask=self.attention_mask[rows, :length],
            response_ids=self.response_ids[rows, :width],
            response_mask=self.response_mask[rows, :width],
            prompt_lengths=self.prompt_lengths[rows],
        )


def pad_right(values: list[torch.Tensor], width: int) -> torch.Tensor:
    """B ragged 1-D tensors -> (B, width), right-padded with zeros."""
    out = torch.zeros((len(values), width), dtype=values[0].dtype)
    for row, value in enumerate(values):
        out[row, : value.numel()] = value
    return out


def pad_batch(batch: RolloutBatch, device: torch.device) -> PaddedBatch:
    sequences = [torch.cat([p.long(), r.long()]) for p, r in zip(batch.prompt_ids, batch.response_ids, strict=True)]
    length = max(s.numel() for s in sequences)
    width = max(r.numel() for r in batch.response_ids)
    # Padding ids are never attended to nor scored, so any valid id (0) does.
    input_ids = pad_right(sequences, length)
    attention_mask = pad_right([torch.ones_like(s) for s in sequences], length)
    response_ids = pad_right([r.long() for r in batch.response_ids], width)
    response_lengths = torch.tensor([r.numel() for r in batch.response_ids])
    return PaddedBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        response_ids=response_ids.to(device),
        response_mask=(torch.arange(width)[None, :] < response_lengths[:, None]).to(device),
        prompt_lengths=torch.tensor([p.numel() for p in batch.prompt_ids], device=device),
    )


def response_aligned(per_position: torch.Tensor, prompt_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, L, ...) per-position outputs -> (B, width, ...) aligned with the response tokens.

    Response token t of sample b sits at position P_b + t; the logits that predict it, and the hidden state of
    the state before it (the critic's V(s_t)), sit one earlier, at P_b + t - 1. Indices past the end (padding
    of shorter responses) are clamped; callers mask those entries out.
    """
    batch, length = per_position.shape[:2]
    index = (prompt_lengths[:, None] - 1 + torch.arange(width, device=per_position.device)).clamp(max=length - 1)
    rows = torch.arange(batch, device=per_position.device)[:, None]
    return per_position[rows, index]
