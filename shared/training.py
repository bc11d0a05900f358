"""What every training job shares: the optimisation config, data loading that names the file and line of a bad
row, a seeded train/eval split, progress lines with rate and ETA, and the optimisation loop itself.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from shared.config import DataError, StrictModel

log = logging.getLogger(__name__)


class OptimConfig(StrictModel):
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate (peak, after warm-up)")
    weight_decay: float = Field(0.0, ge=0)
    epochs: float = Field(1.0, gt=0, description="passes over the training split (fractions allowed)")
    max_steps: int = Field(0, ge=0, description="optimizer steps; 0 = derived from epochs")
    batch_size: int = Field(8, ge=1, description="examples per optimizer step")
    micro_batch_size: int = Field(8, ge=1, description="examples per forward/backward (gradient accumulation)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 to learning_rate")
    max_grad_norm: float = Field(1.0, gt=0)
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of rows held out for evaluation")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0 = only at the end)")
    log_every: int = Field(10, ge=1, description="progress line every N steps")
    max_length: int = Field(512, ge=8, description="tokens kept per sequence (longer ones are truncated)")
    seed: int = 0


def read_rows(path: Path | str) -> list[dict]:
    """Rows of a local JSONL, JSON or Parquet file, through Hugging Face ``datasets``.

    JSONL is checked line by line first, so a broken line is reported as ``file:line`` (datasets alone would only
    say that the file failed to parse).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    parsed: list[dict] | None = None
    if suffix in (".jsonl", ".json"):
        parsed = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if suffix == ".json" and number == 1 and line.lstrip().startswith("["):
                parsed = None  # a JSON array file, not JSON lines
                break
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                parsed.append(row)
        builder = "json"
    elif suffix == ".parquet":
        builder = "parquet"
    else:
        raise DataError(f"{path}: unsupported format {suffix!r} (use .jsonl, .json or .parquet)")
    import datasets

    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:
        if parsed is not None:
            # Arrow could not give a column one type (e.g. a number where text belongs): the rows as parsed go to
            # the job's own checks, which name the offending line.
            return parsed
        raise DataError(f"{path}: could not be read ({type(exc).__name__}: {exc})") from None
    return list(dataset)


def row_location(path: Path | str, index: int) -> str:
    """``file:line`` for row ``index`` of a JSONL file (blank lines skipped), ``file:row N`` otherwise."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        seen = -1
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                seen += 1
                if seen == index:
                    return f"{path}:{number}"
    return f"{path}:row {index + 1}"


def require_text(path: Path | str, index: int, row: dict, field: str, allow_empty: bool = False) -> str:
    """The string ``row[field]``; empty allowed only where it means something (an empty response is a response)."""
    value = row.get(field)
    if not isinstance(value, str) or not (value or allow_empty):
        kind = "a string" if allow_empty else "a non-empty string"
        raise DataError(f"{row_location(path, index)}: '{field}' must be {kind}")
    return value


def split(items: Sequence, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle into (train, eval); eval gets round(n * eval_fraction) items, at least 1 if fraction > 0."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if eval_fraction == 0 else max(1, round(len(items) * eval_fraction))
    if n_eval >= len(items):
        raise DataError(f"{len(items)} rows are too few for an eval fraction of {eval_fraction}")
    return [items[i] for i in order[n_eval:]], [items[i] for i in order[:n_eval]]


class Progress:
    """Progress of a long job: a line per ``every`` steps with rate and ETA (a bar when on a terminal)."""

    def __init__(self, name: str, total: int, every: int, unit: str = "steps"):
        self.name, self.total, self.every, self.unit = name, total, every, unit
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, **values: float) -> None:
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.start
        rate = step / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else math.inf
        shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        if self.tty:
            filled = int(30 * step / max(1, self.total))
            bar = "#" * filled + "-" * (30 - filled)
            end = "\n" if step == self.total else ""
            print(
                f"\r{self.name} [{bar}] {step}/{self.total} {shown} {rate:.2f} {self.unit}/s ETA {eta:.0f}s",
                end=end,
                file=sys.stderr,
                flush=True,
            )
        else:
            print(
                f"{self.name} {step}/{self.total} {shown} {rate:.2f} {self.unit}/s ETA {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )


def batches(items: Sequence, size: int, seed: int, epochs: float) -> Iterator[list]:
    """Shuffled batches of ``size`` for ``epochs`` passes (a fraction stops part-way); the last partial batch of an
    epoch is kept."""
    total = math.ceil(len(items) * epochs)
    produced, epoch = 0, 0
    while produced < total:
        order = list(range(len(items)))
        random.Random(seed * 7919 + epoch).shuffle(order)
        for start in range(0, len(order), size):
            chunk = order[start : start + size][: total - produced]
            if not chunk:
                return
            produced += len(chunk)
            yield [items[i] for i in chunk]
            if produced >= total:
                return
        epoch += 1


def steps_for(n_items: int, config: OptimConfig) -> int:
    if config.max_steps:
        return config.max_steps
    per_epoch = math.ceil(n_items / config.batch_size)
    return max(1, math.ceil(per_epoch * config.epochs))


def train_loop(
    name: str,
    parameters: list[torch.nn.Parameter],
    train_items: Sequence,
    config: OptimConfig,
    loss_fn: Callable[[list], tuple[torch.Tensor, dict[str, float]]],
    units: Callable[[list], float],
    evaluate: Callable[[], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """AdamW with linear warm-up, gradient accumulation and clipping, progress lines, periodic evaluation.

    ``loss_fn(micro_batch) -> (loss_sum, stats)``: the loss summed over the micro-batch's units (tokens, pairs),
    and per-unit mean statistics; ``units(items)`` counts those units. Each micro-batch's backward is scaled by the
    whole batch's unit count, so accumulation gives the gradient of the batch's unit mean (and only one
    micro-batch's activations live at a time). Returns the loss history and the evaluations.
    """
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = steps_for(len(train_items), config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    )
    progress = Progress(name, total_steps, config.log_every)
    history: list[dict[str, float]] = []
    evaluations: list[dict[str, float]] = []
    epochs = max(config.epochs, total_steps * config.batch_size / max(1, len(train_items)))
    step = 0
    for batch in batches(train_items, config.batch_size, config.seed, epochs):
        micro = [batch[i : i + config.micro_batch_size] for i in range(0, len(batch), config.micro_batch_size)]
        total_units = max(sum(units(part) for part in micro), 1e-8)
        loss_value = 0.0
        merged: dict[str, float] = {}
        for part in micro:
            loss_sum, stats = loss_fn(part)
            (loss_sum / total_units).backward()
            loss_value += float(loss_sum.detach()) / total_units
            share = units(part) / total_units
            for key, value in stats.items():
                merged[key] = merged.get(key, 0.0) + value * share
        grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        record = {"step": step, "loss": loss_value, "grad_norm": grad_norm, **merged}
        history.append(record)
        progress.update(step, loss=loss_value, **merged)
        if evaluate is not None and config.eval_every and step % config.eval_every == 0 and step < total_steps:
            evaluations.append({"step": step, **evaluate()})
        if step >= total_steps:
            break
    if evaluate is not None:
        evaluations.append({"step": step, **evaluate()})
    return {"steps": step, "history": history, "evaluations": evaluations}


def loss_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The fields every job's summary starts with: optimizer steps and the first and last training loss."""
    history = result["history"]
    return {"steps": result["steps"], "train_loss_first": history[0]["loss"], "train_loss_last": history[-1]["loss"]}
