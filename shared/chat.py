"""Conversations (the Hugging Face chat format: a list of ``{"role", "content"}`` turns) and their rendering.

A conversational prompt is rendered with the policy tokenizer's chat template and its generation prompt (the
header of the assistant turn), as the SFT job trains on it; a reward model renders the conversation plus the
response with its own template. A model without a template, or a reward function, reads plain text: the turns'
contents, one per line, then the response.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.errors import InvalidInput

if TYPE_CHECKING:  # the orchestrator parses conversations without transformers installed
    from transformers import PreTrainedTokenizerBase

Conversation = list[dict[str, str]]  # [{"role": ..., "content": ...}, ...]


def check_conversation(value: object, field: str) -> Conversation:
    """A non-empty list of turns, each with a non-empty string ``role`` and a string ``content``."""
    if not isinstance(value, list) or not value:
        raise InvalidInput(field, "must be a non-empty list of {role, content} messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise InvalidInput(f"{field}[{i}]", "must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidInput(f"{field}[{i}].role", "must be a non-empty string")
        if not isinstance(content, str):
            raise InvalidInput(f"{field}[{i}].content", "must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def plain_text(conversation: Conversation) -> str:
    """The turns' contents, one per line: how a conversation reads without a chat template."""
    return "".join(message["content"] + "\n" for message in conversation)


def has_chat_template(tokenizer: PreTrainedTokenizerBase | None) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def render_prompt_ids(tokenizer: PreTrainedTokenizerBase, conversation: Conversation, field: str) -> list[int]:
    """Token ids of the conversation in the tokenizer's chat template, ending with the generation prompt."""
    if not has_chat_template(tokenizer):
        raise InvalidInput(field, "the policy's tokenizer has no chat template: send the prompts as text instead")
    try:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # a template may reject a role order (e.g. two user turns in a row)
        raise InvalidInput(field, f"the chat template rejects this conversation: {exc}") from None
    if isinstance(ids, dict):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def render_for_scoring(
    tokenizer: PreTrainedTokenizerBase | None, conversation: Conversation, response: str, field: str
) -> tuple[str, str]:
    """(prompt text, response text) of a conversation and its response, so that their concatenation is the whole
    exchange in the scorer's chat template (the response's end-of-turn marker included); plain text without one."""
    if not has_chat_template(tokenizer):
        return plain_text(conversation), response
    try:
        prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            [*conversation, {"role": "assistant", "content": response}], tokenize=False
        )
    except Exception as exc:
        raise InvalidInput(field, f"the reward model's chat template rejects this conversation: {exc}") from None
    if full.startswith(prompt):
        return prompt, full[len(prompt) :]
    # Templates that rewrite earlier turns once an answer follows (e.g. dropping reasoning): score the whole text.
    return "", full
