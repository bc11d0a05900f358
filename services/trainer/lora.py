"""LoRA on the trainer's policy and critic (peft): the wrapping, the adapter in checkpoints, the merged export.

With ``lora.rank`` > 0 the base weights are frozen and only the adapters (and the critic's value head) train: the
optimizers hold state for those alone, the weight stream sends the policy's adapter alone (``shared.lora``), and a
checkpoint stores the adapter as peft's ``save_pretrained`` does, plus optionally the merged model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from services.trainer.config import LoRAConfig
from shared import lora as shared_lora

if TYPE_CHECKING:  # peft itself is imported on first use (see shared.lora)
    from peft import LoraConfig, PeftModel

ADAPTER_DIR = "adapter"  # in a checkpoint: peft's adapter_model.safetensors + adapter_config.json
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _peft_config(config: LoRAConfig, task_type: str) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type,
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
    )


def wrap_policy(model: PreTrainedModel, config: LoRAConfig) -> PeftModel:
    """The causal LM with fresh adapters (B = 0, so it computes exactly what it did) and its base frozen."""
    return shared_lora.wrap(model, _peft_config(config, "CAUSAL_LM"))


def wrap_backbone(backbone: PreTrainedModel, config: LoRAConfig) -> PeftModel:
    """The critic's transformer backbone (an ``AutoModel``, no LM head) with fresh adapters and its base frozen."""
    return shared_lora.wrap(backbone, _peft_config(config, "FEATURE_EXTRACTION"))


def wire_config(model: PeftModel) -> str:
    """The adapter's config as the weight stream carries it (``WeightChunk.adapter_config``)."""
    return shared_lora.config_to_json(model.active_peft_config)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (adapters, a value head) under their state-dict names; they share storage."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def merged_copy(model: PeftModel) -> PreTrainedModel:
    """A plain Hugging Face model with the adapter merged in (W + alpha / r * B A), the trainer's model untouched.

    A copy, because merging in place and unmerging would not give the base weights back bit for bit. ``deepcopy``
    copies a shared tensor once, so tied embeddings stay tied (the adapters never touch them anyway)."""
    return copy.deepcopy(model).merge_and_unload()


def adapter_names(model: PeftModel) -> dict[str, str]:
    """The policy's adapter parameters by their names in the model (``...q_proj.lora_A.default.weight``), each
    mapped to its portable name in peft's files and in ``adapter_state`` (``...q_proj.lora_A.weight``)."""
    portable = set(shared_lora.adapter_state(model))
    suffix = f".{model.active_adapter}"
    names = {name: name.replace(suffix, "") for name, p in model.named_parameters() if p.requires_grad}
    if set(names.values()) != portable:
        raise ValueError(f"the adapter's parameters {sorted(names)} do not map onto peft's names {sorted(portable)}")
    return names


def check_adapter_config(directory: Path, model: PeftModel) -> None:
    """ValueError unless the adapter saved in ``directory`` has ``model``'s rank, alpha and target modules."""
    from peft import LoraConfig

    saved, ours = LoraConfig.from_pretrained(str(directory)), model.active_peft_config

    def shape(c: LoraConfig) -> tuple:
        return c.r, float(c.lora_alpha), sorted(c.target_modules)

    if shape(saved) != shape(ours):
        raise ValueError(
            f"{directory}: adapter of (rank, alpha, target_modules) {shape(saved)}, but the trainer's lora section "
            f"says {shape(ours)}"
        )


def read_adapter(directory: Path, model: PeftModel, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's adapter directory, checked against ``model``'s adapter; ValueError if they do
    not fit it (another rank, alpha or set of target modules than the trainer's ``lora`` section)."""
    check_adapter_config(directory, model)
    state = load_file(str(directory / ADAPTER_WEIGHTS), device=str(device))
    expected = {name: tuple(t.shape) for name, t in shared_lora.adapter_state(model).items()}
    if {name: tuple(t.shape) for name, t in state.items()} != expected:
        raise ValueError(f"{directory}: {ADAPTER_WEIGHTS} does not match this trainer's adapter")
    return state
