"""Loading models and tokenizers the same way in every role: device and dtype from config, no pickle."""

from __future__ import annotations

import enum
import logging

import torch
from pydantic import Field
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from shared import attention_masks
from shared.config import StrictModel

log = logging.getLogger(__name__)

# Every role loads its models through this module: padded batches get the broadcast causal + padding mask instead of
# transformers' vmapped one (the same mask, a fraction of the time; see shared.attention_masks).
attention_masks.install()


class Device(enum.StrEnum):
    AUTO = "auto"  # cuda when available, else cpu
    CPU = "cpu"
    CUDA = "cuda"


class DType(enum.StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class ModelConfig(StrictModel):
    path: str = Field("", description="local directory or hub id of a Hugging Face model")
    tokenizer: str = Field("", description="tokenizer path; empty means the model's path")
    device: Device = Field(Device.CPU, description="where the model runs")
    dtype: DType = Field(DType.FLOAT32, description="parameter dtype")
    cpu_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op CPU threads for this process (0 = torch's default, one per core); "
        "use 1 when several services share a few cores: idle OpenMP threads spin and slow everyone down",
    )


def resolve_device(device: Device | str) -> torch.device:
    device = Device(device)
    if device is Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device is Device.CUDA and not torch.cuda.is_available():
        raise RuntimeError("device=cuda asked for, but torch sees no CUDA device")
    return torch.device(device.value)


def torch_dtype(dtype: DType | str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[DType(dtype).value]


def apply_cpu_threads(config: ModelConfig) -> None:
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)


def load_tokenizer(config: ModelConfig, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """Loads the tokenizer; sets a pad token (the EOS token) when the model has none."""
    if not config.path and not config.tokenizer:
        raise ValueError("model.path is empty: name a model directory or hub id")
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.path)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(config: ModelConfig) -> PreTrainedModel:
    if not config.path:
        raise ValueError("model.path is empty: name a model directory or hub id")
    apply_cpu_threads(config)
    device = resolve_device(config.device)
    log.info("loading causal LM %s on %s as %s", config.path, device, config.dtype.value)
    model = AutoModelForCausalLM.from_pretrained(config.path, dtype=torch_dtype(config.dtype), use_safetensors=True)
    return model.to(device)


def load_sequence_classifier(config: ModelConfig) -> PreTrainedModel:
    """A reward model: ``AutoModelForSequenceClassification`` with one label (a scalar score)."""
    if not config.path:
        raise ValueError("model.path is empty: name a model directory or hub id")
    apply_cpu_threads(config)
    device = resolve_device(config.device)
    log.info("loading reward model %s on %s as %s", config.path, device, config.dtype.value)
    model = AutoModelForSequenceClassification.from_pretrained(
        config.path, num_labels=1, dtype=torch_dtype(config.dtype), use_safetensors=True
    )
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
        model.config.pad_token_id = model.config.eos_token_id
    return model.to(device)
