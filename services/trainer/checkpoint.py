"""Checkpoint files: optimizer state as safetensors + JSON (never pickle), and atomic directory replacement."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import torch


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


def replace_directory(staging: Path, directory: Path) -> None:
    """Puts ``staging`` in place of ``directory``: readers see the old or the new checkpoint, never a partial one."""
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
        directory.rename(old)
    staging.rename(directory)
    if old is not None:
        shutil.rmtree(old)
