"""Checks on decoded requests, shared by the servicers; each raises InvalidInput/TooLarge naming the field."""

from __future__ import annotations

import torch

from shared.errors import InvalidInput, TooLarge


def check_batch_size(count: int, field: str, max_items: int) -> None:
    if count == 0:
        raise InvalidInput(field, "empty batch: at least one item is required")
    if count > max_items:
        raise TooLarge(field, f"batch of {count} exceeds the limit of {max_items}")


def check_token_rows(rows: list[torch.Tensor], field: str, vocab_size: int, allow_empty_rows: bool = False) -> None:
    """Rows of token ids: integer dtype, every id in [0, vocab_size), no empty row unless allowed."""
    for i, row in enumerate(rows):
        if row.dtype not in (torch.int64, torch.int32):
            raise InvalidInput(field, f"token ids must be int64 or int32, got {row.dtype}")
        if row.numel() == 0:
            if allow_empty_rows:
                continue
            raise InvalidInput(f"{field}[{i}]", "is empty: at least one token is required")
        low, high = int(row.min()), int(row.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise InvalidInput(f"{field}[{i}]", f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def check_same_rows(first: list, second: list, first_field: str, second_field: str) -> None:
    if len(first) != len(second):
        raise InvalidInput(second_field, f"has {len(second)} rows but {first_field} has {len(first)}")


def check_row_lengths(rows: list[torch.Tensor], like: list[torch.Tensor], field: str, like_field: str) -> None:
    check_same_rows(like, rows, like_field, field)
    for i, (row, other) in enumerate(zip(rows, like, strict=True)):
        if row.numel() != other.numel():
            raise InvalidInput(f"{field}[{i}]", f"has {row.numel()} values but {like_field}[{i}] has {other.numel()}")


def check_temperature(temperature: float, field: str) -> None:
    """A log-prob temperature: finite and > 0 (callers read an unset 0 as 1 before checking)."""
    if not (temperature > 0 and temperature < float("inf")):
        raise InvalidInput(field, f"must be finite and > 0, got {temperature}")
