"""Prompt datasets in JSONL, one object per line, in one of the two common formats (as TRL's datasets):

- prompt-only: ``{"prompt": "..."}``, sent to the policy as text, as it is;
- conversational: ``{"messages": [{"role": "user", "content": "..."}, ...]}``, rendered with the policy
  tokenizer's chat template and its generation prompt.

One file holds one kind of row.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from shared.chat import Conversation, check_conversation
from shared.config import DataError
from shared.errors import InvalidInput


class DatasetError(DataError):
    """A prompt file that cannot be used; the message names the file and line."""


Prompt = str | Conversation  # a text prompt or a conversation


def load_prompts(path: Path | str) -> list[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    prompts: list[Prompt] = []
    kind = None
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            prompt = _row_prompt(row, f"{path}:{number}")
            row_kind = "messages" if isinstance(prompt, list) else "prompt"
            if kind is not None and row_kind != kind:
                raise DatasetError(f"{path}:{number}: a {row_kind!r} row in a file of {kind!r} rows; use one kind")
            kind = row_kind
            prompts.append(prompt)
    if not prompts:
        raise DatasetError(f"{path}: no prompts")
    return prompts


def _row_prompt(row: object, where: str) -> Prompt:
    if isinstance(row, dict) and "messages" in row:
        try:
            return check_conversation(row["messages"], "messages")
        except InvalidInput as exc:
            raise DatasetError(f"{where}: {exc}") from None
    prompt = row.get("prompt") if isinstance(row, dict) else None
    if not isinstance(prompt, str) or not prompt:
        raise DatasetError(
            f"{where}: expected an object with a non-empty string 'prompt' or a 'messages' list of {{role, content}}"
        )
    return prompt


def describe(prompt: Prompt) -> str:
    """A prompt as one readable string (for logs and records)."""
    return prompt if isinstance(prompt, str) else " | ".join(f"{m['role']}: {m['content']}" for m in prompt)


class PromptCursor:
    """Walks the prompts in a seeded shuffled order, reshuffling at each epoch; the position can be saved, and any
    stretch of the walk can be read again (``batch_at``): the order is a function of the seed alone."""

    def __init__(self, prompts: list[Prompt], seed: int):
        self.prompts = prompts
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def batch_at(self, start: int, size: int) -> list[Prompt]:
        """Prompts ``start`` .. ``start + size - 1`` of the walk (counted over every epoch), without moving."""
        n = len(self.prompts)
        orders: dict[int, list[int]] = {}
        batch = []
        for index in range(start, start + size):
            epoch, position = divmod(index, n)
            order = orders.get(epoch) or orders.setdefault(epoch, self._shuffled(epoch))
            batch.append(self.prompts[order[position]])
        return batch

    def where(self, index: int) -> dict[str, int]:
        """Prompt ``index`` of the walk as (epoch, position in that epoch's order): what a run stores."""
        epoch, position = divmod(index, len(self.prompts))
        return {"epoch": epoch, "position": position}

    def next_batch(self, size: int) -> list[Prompt]:
        batch = []
        while len(batch) < size:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffled(self.epoch)
            batch.append(self.prompts[self._order[self.position]])
            self.position += 1
        return batch
