"""Prompt datasets in the common prompt-only JSONL format: one ``{"prompt": "..."}`` object per line."""

from __future__ import annotations

import json
import random
from pathlib import Path

from shared.config import DataError


class DatasetError(DataError):
    """A prompt file that cannot be used; the message names the file and line."""


def load_prompts(path: Path | str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    prompts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, str) or not prompt:
                raise DatasetError(f"{path}:{number}: expected an object with a non-empty string 'prompt'")
            prompts.append(prompt)
    if not prompts:
        raise DatasetError(f"{path}: no prompts")
    return prompts


class PromptCursor:
    """Walks the prompts in a seeded shuffled order, reshuffling at each epoch; the position can be saved."""

    def __init__(self, prompts: list[str], seed: int):
        self.prompts = prompts
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, size: int) -> list[str]:
        batch = []
        while len(batch) < size:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffled(self.epoch)
            batch.append(self.prompts[self._order[self.position]])
            self.position += 1
        return batch
