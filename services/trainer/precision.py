"""Mixed precision and activation memory for the trainer.

``dtype: bfloat16`` means mixed precision, as in every serious trainer (Megatron, DeepSpeed, FSDP's
MixedPrecisionPolicy): the parameters the optimizer updates (the master weights), their gradients and the AdamW
moments stay float32, and the forward and backward passes run in bfloat16 under ``torch.autocast``. Pure-bf16
AdamW would lose updates smaller than bf16's resolution (about 0.4% of a weight), which is most of them at RLHF
learning rates.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import PreTrainedModel

from shared.modeling import DType, ModelConfig, load_causal_lm, torch_dtype


def master_config(config: ModelConfig) -> ModelConfig:
    """The config to load trainable weights with: float32 whatever the compute dtype."""
    if config.dtype is DType.FLOAT16:
        raise ValueError(
            "policy.dtype: float16 training needs loss scaling, which the trainer does not do; use bfloat16 "
            "(mixed precision) or float32"
        )
    return config.model_copy(update={"dtype": DType.FLOAT32})


def load_trainable_causal_lm(config: ModelConfig, frozen_base: bool = False) -> PreTrainedModel:
    """The policy with float32 master weights, on the configured device.

    ``frozen_base`` (LoRA): the base weights never change, so they need no master copy and stay in the compute
    dtype (2 bytes per parameter in bf16 instead of 4); peft keeps the adapters it adds in float32."""
    return load_causal_lm(master_or_frozen_config(config, frozen_base))


def master_or_frozen_config(config: ModelConfig, frozen_base: bool) -> ModelConfig:
    """``master_config``, or the config as it is for a frozen (LoRA) base."""
    master = master_config(config)
    return config if frozen_base else master


def compute_dtype(config: ModelConfig) -> torch.dtype:
    return torch_dtype(config.dtype)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 compute for a float32 model, or nothing when the compute dtype is float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in train mode (as TRL does for PPO): modules and the attention-probability dropout rates
    that Hugging Face attention layers read from attributes when ``self.training``."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "attn_dropout", "dropout_rate"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recomputes each layer's activations in the backward pass instead of keeping them (memory for ~30% more
    compute). Hugging Face layers only checkpoint in train mode, so the model goes to train mode with its dropout
    off: the numbers are those of eval mode."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    disable_dropout(model)
    model.train()
