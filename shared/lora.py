"""LoRA adapters (peft) as they travel from the trainer to generation.

An adapter update carries the adapter's tensors only, named as ``get_peft_model_state_dict`` names them (e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), and peft's ``LoraConfig`` as JSON. The receiver
wraps its own base model with that config once, then copies each update's tensors into the adapter in place.

peft is imported on first use: it adds about a second to a process's start, and most runs never load an adapter.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch

from shared.errors import InvalidInput

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

# Fields of a LoraConfig that say where, how or by which peft version an adapter was made, not what it computes.
_LOCAL_FIELDS = ("base_model_name_or_path", "revision", "inference_mode", "peft_version")


def config_to_json(config: LoraConfig) -> str:
    """The config as canonical JSON (sorted keys, sorted target modules), without the base model's local path."""
    fields = {k: v for k, v in config.to_dict().items() if k not in _LOCAL_FIELDS}
    return json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in fields.items()}, sort_keys=True)


def config_from_json(text: str, field: str = "adapter_config") -> LoraConfig:
    """The LoraConfig a ``config_to_json`` text describes; ``InvalidInput`` naming ``field`` if it describes none."""
    try:
        fields = json.loads(text)
    except ValueError as err:
        raise InvalidInput(field, f"not valid JSON: {err}") from err
    if not isinstance(fields, dict) or fields.get("peft_type") != "LORA":
        raise InvalidInput(field, 'expected a peft LoraConfig as a JSON object with "peft_type": "LORA"')
    from peft import LoraConfig

    try:
        return LoraConfig(**fields)
    except (TypeError, ValueError) as err:
        raise InvalidInput(field, f"not a valid LoraConfig: {err}") from err


def wrap(model: torch.nn.Module, config: LoraConfig) -> PeftModel:
    """The model with fresh adapters on ``config.target_modules`` (peft modifies it in place and wraps it), in eval
    mode as every role runs its models: peft builds the new layers in train mode, which would turn LoRA dropout on."""
    from peft import get_peft_model

    return get_peft_model(model, config).eval()


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's portable names; they share storage with the model (no copy)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


@torch.no_grad()
def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Copies a complete ``adapter_state``-shaped state into the model's adapter in place (cast to its dtype).

    The caller has checked that ``state`` names every tensor of ``adapter_state(model)`` with its shape."""
    target = adapter_state(model)
    for name, tensor in state.items():
        target[name].copy_(tensor)
