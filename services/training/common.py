"""What the SFT, reward-model and DPO jobs share beyond ``shared.training``: the job record, tokenising a prompt and
its response, sequence log-probs of responses, and writing a checkpoint atomically.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.config import StrictModel
from shared.paths import replace_directory
from shared.sequences import pad_prompt_response, response_logprobs_padded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """A training job as the command line sees it: ``rlhf train <name>`` validates a ``config_type`` and calls
    ``run(config) -> summary``."""

    name: str
    config_type: type[StrictModel]
    run: Callable[[Any], dict]


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``prompt`` and of ``response`` + EOS, tokenised apart so that the boundary is exact.

    The prompt gets the tokenizer's special tokens (a BOS where the model uses one, as at generation time); the
    response gets none, then the EOS id so that the model learns to stop. Over ``max_length`` tokens the prompt
    loses tokens from its left (the response is what is learnt); a response that alone does not fit loses tokens
    from its right, and the prompt keeps its last token (the first response token needs a position to predict it).
    Returns ``(prompt_ids (P,), response_ids (R,))`` int64 with ``P >= 1``, ``P + R <= max_length``.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    if not prompt_ids:
        raise ValueError(f"prompt {prompt!r} has no tokens")
    response_ids = response_ids[: max_length - 1]
    prompt_ids = prompt_ids[-(max_length - len(response_ids)) :]
    return torch.tensor(prompt_ids, dtype=torch.int64), torch.tensor(response_ids, dtype=torch.int64)


def sequence_logprobs(
    model: PreTrainedModel, prompt_ids: list[torch.Tensor], response_ids: list[torch.Tensor], pad_token_id: int
) -> torch.Tensor:
    """``log pi(response | prompt) = sum_t log pi(response_t | prompt, response_<t)`` for each pair: (B,) float32.

    One right-padded forward over the batch (``shared.sequences``); gradients flow when called with grad enabled.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask, prompt_lengths, response_mask = pad_prompt_response(
        prompt_ids, response_ids, pad_token_id
    )
    logprobs = response_logprobs_padded(
        model, input_ids.to(device), attention_mask.to(device), prompt_lengths, response_mask
    )  # (B, R), zero on padding
    return logprobs.sum(dim=1)


def save_atomically(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: Path | str,
    extra_files: dict[str, str | dict] | None = None,
) -> Path:
    """Writes ``model`` (``save_pretrained``, safetensors only), ``tokenizer`` and ``extra_files`` (name -> text, or
    a dict written as JSON) into ``output_dir``.

    Everything is written to a staging directory beside ``output_dir`` and renamed into place, so a crash leaves
    the previous content (or nothing), never half a checkpoint. Returns ``output_dir``.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint is read by other users and services
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        for name, content in (extra_files or {}).items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2)
            (staging / name).write_text(text, encoding="utf-8")
        replace_directory(staging, output_dir)  # a failed swap puts the previous checkpoint back
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("checkpoint written to %s", output_dir)
    return output_dir
