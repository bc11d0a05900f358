"""Checkpoint files: optimizer state as safetensors + JSON (never pickle), atomic directory replacement, a size
manifest, and the rotating checkpoints under the trainer's checkpoint root."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from shared.paths import fsync

log = logging.getLogger(__name__)


def split_optimizer_state(state_dict: dict, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
    """Moves the tensors of an optimizer ``state_dict`` into ``tensors`` under ``{prefix}.{param_index}.{name}``
    and returns the rest (param groups, non-tensor state), which is JSON-serialisable."""
    plain: dict[str, dict] = {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(index), {})[name] = value
    return {"param_groups": state_dict["param_groups"], "state": plain}


def join_optimizer_state(meta: dict, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
    """The inverse of ``split_optimizer_state``: a state dict for ``Optimizer.load_state_dict``."""
    state: dict[int, dict] = {int(index): dict(entries) for index, entries in meta["state"].items()}
    for key, value in tensors.items():
        owner, index, name = key.split(".", 2)
        if owner == prefix:
            state.setdefault(int(index), {})[name] = value
    # JSON turned the betas tuple into a list.
    groups = [
        {**group, "betas": tuple(group["betas"])} if "betas" in group else group for group in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


MANIFEST = "manifest.json"  # written last into a staged checkpoint: every file with its size


def write_manifest(staging: Path) -> None:
    """Records every file of a staged checkpoint with its size, then makes it all durable (fsync of each file and
    directory) before the caller renames it into place: a checkpoint that is visible is complete on disk."""
    files = {
        str(path.relative_to(staging)): path.stat().st_size
        for path in sorted(staging.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    (staging / MANIFEST).write_text(json.dumps({"files": files}, indent=2))
    for path in [*sorted(staging.rglob("*")), staging]:
        fsync(path)


def check_manifest(directory: Path) -> None:
    """Raises ValueError unless every file the manifest lists is there with its recorded size (a truncated or
    missing file: a checkpoint damaged after it was written)."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{directory}: no readable {MANIFEST} ({exc})") from None
    for name, size in files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            actual = path.stat().st_size if path.is_file() else "missing"
            raise ValueError(f"{directory}: {name} is {actual}, the manifest says {size} bytes")


class CheckpointRoot:
    """The trainer's own checkpoints under one directory (a PersistentVolume in Kubernetes): ``step-<n>/``, each
    written atomically (staged as a hidden sibling, made durable, renamed), the newest ``keep`` kept.

    ``load_latest`` takes the newest one that loads; a damaged one (manifest mismatch, unreadable file) is logged
    and skipped for the one before it. Staging directories a killed trainer left behind are removed at start-up.
    """

    PATTERN = re.compile(r"^step-(\d+)$")

    def __init__(self, root: Path | str, keep: int):
        self.root = Path(root)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.root / f"step-{step:09d}"

    def checkpoints(self) -> list[Path]:
        """Checkpoint directories, newest (highest step) first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := self.PATTERN.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def clean_staging(self) -> None:
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if path.name.startswith(".step-") and path.is_dir():
                log.info("removing %s, a checkpoint a stopped trainer did not finish", path)
                shutil.rmtree(path, ignore_errors=True)

    def save(self, step: int, save: Callable[[Path], Path]) -> Path:
        """Writes the checkpoint of ``step`` with ``save`` (atomic), then drops checkpoints of later steps (a state
        that was given up: the trainer went back to an earlier one) and all but the newest ``keep``."""
        path = save(self.path_for(step))
        for later in self.checkpoints():
            if self._step(later) > step:
                log.info("removing %s: a later step of a state this trainer went back from", later)
                shutil.rmtree(later, ignore_errors=True)
        for old in self.checkpoints()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def _step(self, path: Path) -> int:
        return int(self.PATTERN.match(path.name).group(1))

    def load_latest(self, load: Callable[[Path], None]) -> Path | None:
        """Calls ``load`` on the newest checkpoint that passes its manifest check and loads; None if none does."""
        for path in self.checkpoints():
            try:
                check_manifest(path)
                load(path)
            except Exception as exc:  # damaged: the one before it is the newest good state
                aside = path.with_name(f".damaged-{path.name}-{uuid.uuid4().hex[:8]}")
                log.error(
                    "checkpoint %s cannot be loaded (%s); moved to %s, trying the one before it", path, exc, aside.name
                )
                with contextlib.suppress(FileNotFoundError):  # another rank of a sharded trainer moved it first
                    path.rename(aside)  # kept for a post-mortem, out of the rotation
                continue
            return path
        return None
