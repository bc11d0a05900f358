"""Supervised fine-tuning (InstructGPT's first stage): next-token cross-entropy on demonstration completions only.

Data rows, one per example (JSONL, JSON or Parquet; the formats TRL's SFT trainer reads):

- prompt-completion: ``{"prompt": str, "completion": str}``; the loss is on the completion tokens and an EOS;
- conversational: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``; rendered with
  the tokenizer's chat template when it has one, else as ``"<role>: <content>\\n"`` per message; the loss is on the
  tokens of every assistant turn (with the template's end-of-turn tokens, or an EOS in the plain form).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from services.training.common import Job, encode_pair, save_atomically
from shared.config import StrictModel
from shared.losses import sft_loss_sum
from shared.modeling import ModelConfig, load_causal_lm, load_tokenizer
from shared.sequences import gather_response, pad_prompt_response
from shared.training import (
    DataError,
    OptimConfig,
    loss_summary,
    read_rows,
    require_text,
    row_location,
    split,
    train_loop,
)

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


class SFTJobConfig(StrictModel):
    model: ModelConfig = Field(description="the causal LM to start from (and its tokenizer)")
    data: str = Field(description="JSONL, JSON or Parquet file of prompt-completion or conversational rows")
    output_dir: str = Field(description="where the fine-tuned model, tokenizer and training_summary.json go")
    optim: OptimConfig = Field(default_factory=OptimConfig)


@dataclass
class SFTExample:
    """One tokenised example, split where supervision starts (so ``pad_prompt_response`` can batch it)."""

    prompt_ids: torch.Tensor  # (P,) int64, the context before the first supervised token, P >= 1
    completion_ids: torch.Tensor  # (C,) int64, from the first supervised token to the end
    completion_mask: torch.Tensor  # (C,) float32, 1 on supervised tokens, 0 on later system/user turns


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def check_messages(path: Path | str, index: int, row: dict) -> list[dict[str, str]]:
    """The row's ``messages`` as ``[{"role", "content"}]``; a DataError naming ``file:line`` and the field else."""
    where = row_location(path, index)
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: 'messages[{i}]' must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: 'messages[{i}].role' must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str) or (role == "assistant" and not content):
            raise DataError(f"{where}: 'messages[{i}].content' must be a string (non-empty for the assistant)")
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise DataError(f"{where}: 'messages' has no assistant message to learn from")
    return checked


def _template_segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """(text, supervised) pieces of the chat-template rendering: each assistant turn is the difference between the
    conversation rendered through it and the conversation before it with the generation prompt."""
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (before.startswith(rendered) and through.startswith(before)):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
        segments += [(before[len(rendered) :], False), (through[len(before) :], True)]
        rendered = through
    return segments  # what follows the last assistant turn carries no loss and is left out


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], max_length: int
) -> SFTExample:
    """Token ids and loss mask of a conversation: 1 on assistant tokens only.

    Each piece is tokenised on its own and the ids concatenated, so that no token straddles a prompt/assistant
    boundary. Over ``max_length`` the oldest tokens go (the context is cut from the left).
    """
    ids: list[int] = []
    mask: list[float] = []
    if tokenizer.chat_template:
        # The template writes any BOS itself.
        for text, supervised in _template_segments(tokenizer, messages):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [float(supervised)] * len(piece)
    else:
        pending = ""  # unsupervised text waiting to be tokenised in one piece
        for message in messages:
            if message["role"] != "assistant":
                pending += f"{message['role']}: {message['content']}\n"
                continue
            context = tokenizer(pending + "assistant: ", add_special_tokens=not ids)["input_ids"]
            answer = [*tokenizer(message["content"], add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
            ids += context + answer
            mask += [0.0] * len(context) + [1.0] * len(answer)
            pending = "\n"
    ids, mask = ids[-max_length:], mask[-max_length:]
    # The first token has nothing before it to predict it: it belongs to the prompt even when supervised.
    first_supervised = next((i for i, m in enumerate(mask) if m), None)
    if first_supervised is None:
        raise ValueError("the conversation has no assistant tokens to learn from")
    start = max(1, first_supervised)
    return SFTExample(
        prompt_ids=torch.tensor(ids[:start], dtype=torch.int64),
        completion_ids=torch.tensor(ids[start:], dtype=torch.int64),
        completion_mask=torch.tensor(mask[start:], dtype=torch.float32),
    )


def encode_row(
    path: Path | str, index: int, row: dict, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> SFTExample:
    """One data row -> SFTExample; a bad row raises DataError naming ``file:line`` and the field."""
    if row.get("messages") is not None:
        return encode_conversation(tokenizer, check_messages(path, index, row), max_length)
    prompt = require_text(path, index, row, "prompt")
    completion = require_text(path, index, row, "completion")
    prompt_ids, completion_ids = encode_pair(tokenizer, prompt, completion, max_length)
    return SFTExample(prompt_ids, completion_ids, torch.ones(completion_ids.numel(), dtype=torch.float32))


def load_examples(path: Path | str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[SFTExample]:
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    return [encode_row(path, index, row, tokenizer, max_length) for index, row in enumerate(rows)]


# ----------------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------------


def batch_loss(model: PreTrainedModel, examples: list[SFTExample], pad_token_id: int) -> tuple[torch.Tensor, float]:
    """Cross-entropy summed over the supervised tokens of ``examples`` (one right-padded forward), and their count."""
    device = next(model.parameters()).device
    input_ids, attention_mask, prompt_lengths, completion_present = pad_prompt_response(
        [e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_token_id
    )
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    width = completion_present.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, L, V)
    completion_logits = gather_response(logits, prompt_lengths, width, shift=1)  # (B, C, V): predicts token t
    labels = gather_response(input_ids, prompt_lengths, width, shift=0)  # (B, C)
    loss_mask = pad_sequence([e.completion_mask for e in examples], batch_first=True) * completion_present  # (B, C)
    loss_sum, n_tokens = sft_loss_sum(completion_logits, labels, loss_mask.to(device))
    return loss_sum, float(n_tokens)


def supervised_tokens(examples: list[SFTExample]) -> float:
    return float(sum(e.completion_mask.sum() for e in examples))


@torch.no_grad()
def evaluate(model: PreTrainedModel, examples: list[SFTExample], pad_token_id: int, micro_batch_size: int) -> dict:
    """Mean cross-entropy per supervised token (nats) over ``examples``."""
    model.eval()
    total, count = 0.0, 0.0
    for start in range(0, len(examples), micro_batch_size):
        loss_sum, n_tokens = batch_loss(model, examples[start : start + micro_batch_size], pad_token_id)
        total, count = total + float(loss_sum), count + n_tokens
    model.train()
    return {"eval_loss": total / max(count, 1.0)}


# ----------------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------------


def run_sft(config: SFTJobConfig) -> dict:
    """Fine-tunes ``config.model`` on ``config.data``; writes the model, tokenizer and training_summary.json."""
    started = time.perf_counter()
    optim = config.optim
    torch.manual_seed(optim.seed)
    tokenizer = load_tokenizer(config.model)
    examples = load_examples(config.data, tokenizer, optim.max_length)
    train_examples, eval_examples = split(examples, optim.eval_fraction, optim.seed)
    log.info("sft: %d training, %d evaluation examples from %s", len(train_examples), len(eval_examples), config.data)

    model = load_causal_lm(config.model)
    model.train()
    pad_token_id = int(tokenizer.pad_token_id)

    def evaluate_held_out() -> dict:
        return evaluate(model, eval_examples, pad_token_id, optim.micro_batch_size)

    def loss_fn(micro_batch: list[SFTExample]) -> tuple[torch.Tensor, dict[str, float]]:
        loss_sum, _ = batch_loss(model, micro_batch, pad_token_id)
        return loss_sum, {}

    first = evaluate_held_out() if eval_examples else {}
    trained = train_loop(
        "sft",
        [p for p in model.parameters() if p.requires_grad],
        train_examples,
        optim,
        loss_fn,
        units=supervised_tokens,
        evaluate=evaluate_held_out if eval_examples else None,
    )
    model.eval()
    history, evaluations = trained["history"], trained["evaluations"]
    summary = {
        "job": "sft",
        **loss_summary(trained),
        "eval_loss_first": first.get("eval_loss"),
        "eval_loss": evaluations[-1]["eval_loss"] if evaluations else None,
        "examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "seconds": time.perf_counter() - started,
        "output_dir": str(config.output_dir),
    }
    details = {**summary, "config": config.model_dump(mode="json"), "history": history, "evaluations": evaluations}
    save_atomically(model, tokenizer, config.output_dir, {"training_summary.json": details})
    return summary


JOB = Job("sft", SFTJobConfig, run_sft)
