"""Tiny models built offline: a BPE tokenizer trained on a built-in corpus, a Llama-architecture policy and a
Llama-architecture reward model. Used by the tests and the demo; no model hub is needed.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# A small chat template in the tiny tokenizer's own special tokens (ChatML's shape: a header per turn, an end marker).
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

POSITIVE_WORDS = [
    "good",
    "great",
    "happy",
    "love",
    "wonderful",
    "bright",
    "kind",
    "warm",
    "calm",
    "joy",
    "fun",
    "nice",
    "lovely",
    "sweet",
    "brave",
    "gentle",
    "hope",
    "smile",
    "sunny",
    "glad",
]
NEGATIVE_WORDS = [
    "bad",
    "sad",
    "angry",
    "hate",
    "awful",
    "dark",
    "cruel",
    "cold",
    "gloomy",
    "pain",
    "dull",
    "nasty",
    "bitter",
    "scared",
    "rude",
    "grim",
    "fear",
    "frown",
    "rainy",
    "mad",
]
_SUBJECTS = [
    "the cat",
    "the dog",
    "my friend",
    "the child",
    "our team",
    "the old man",
    "a bird",
    "the teacher",
    "she",
    "he",
    "they",
    "we",
]
_VERBS = ["is", "feels", "was", "looks", "seems", "became", "stays"]
_PLACES = [
    "at home",
    "in the park",
    "by the sea",
    "at school",
    "in the city",
    "on the hill",
    "near the river",
]
_TOPICS = ["the movie", "the food", "the weather", "the trip", "the book", "the song", "the game", "the day"]


def corpus(n_sentences: int = 4000, seed: int = 0) -> list[str]:
    """Short English-like sentences mixing positive and negative words, deterministic for a seed."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        words = POSITIVE_WORDS if rng.random() < 0.5 else NEGATIVE_WORDS
        pattern = rng.randrange(3)
        if pattern == 0:
            line = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(words)} {rng.choice(_PLACES)}."
        elif pattern == 1:
            line = f"{rng.choice(_TOPICS)} was {rng.choice(words)} and {rng.choice(words)}."
        else:
            line = f"{rng.choice(_SUBJECTS)} said {rng.choice(_TOPICS)} {rng.choice(_VERBS)} {rng.choice(words)}."
        lines.append(line)
    return lines


def prompts(n: int = 64, seed: int = 1) -> list[str]:
    """Prompt openings in the corpus's style."""
    rng = random.Random(seed)
    openers = [f"{s} {v}" for s in _SUBJECTS for v in _VERBS] + [f"{t} was" for t in _TOPICS]
    return [rng.choice(openers) for _ in range(n)]


def build_tokenizer(vocab_size: int = 640, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus()``; left padding, pad/bos/eos/unk set."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(seed=seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


def _llama_config(tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int, tied: bool = False) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tied,
    )


def build_policy(
    directory: Path | str,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    tied: bool = False,
    generation_defaults: dict | None = None,
    chat_template: str | None = None,
) -> Path:
    """Writes a randomly initialised tiny causal LM and its tokenizer to ``directory`` (safetensors).

    ``tied``: the output head shares the input embedding (``tie_word_embeddings``, as in Qwen2.5, Llama-3.2 1B/3B,
    SmolLM2 and Gemma). ``generation_defaults``: sampling settings written to its ``generation_config.json``, as
    instruct models ship them (e.g. ``{"do_sample": True, "temperature": 0.6, "top_p": 0.9}``). ``chat_template``:
    a Jinja chat template for its tokenizer (e.g. ``CHAT_TEMPLATE``).
    """
    directory = Path(directory)
    tokenizer = build_tokenizer(seed=seed)
    tokenizer.chat_template = chat_template
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tokenizer, hidden, layers, tied))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    for key, value in (generation_defaults or {}).items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def build_reward_model(
    directory: Path | str, hidden: int = 64, layers: int = 2, seed: int = 0, chat_template: str | None = None
) -> Path:
    """Writes a randomly initialised tiny sequence classifier (num_labels=1) and its tokenizer (with
    ``chat_template`` when given)."""
    directory = Path(directory)
    tokenizer = build_tokenizer(seed=seed)
    tokenizer.chat_template = chat_template
    torch.manual_seed(seed + 1)
    config = _llama_config(tokenizer, hidden, layers)
    config.num_labels = 1
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def pretrain(
    directory: Path | str, steps: int = 300, batch_size: int = 32, learning_rate: float = 3e-3, seed: int = 0
) -> dict[str, float]:
    """Trains the causal LM in ``directory`` on ``corpus()`` (next-token loss) and saves it in place.

    A few hundred steps on CPU turn the random policy into one that writes corpus-like sentences, so that
    RL on a sentiment reward has words to move. Returns the first and last training loss (nats per token).
    """
    directory = Path(directory)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    model = LlamaForCausalLM.from_pretrained(directory)
    model.train()
    texts = [line + tokenizer.eos_token for line in corpus(seed=seed + 7)]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    tokenizer.padding_side = "right"
    losses = []
    for _ in range(steps):
        rows = torch.randint(0, len(texts), (batch_size,), generator=generator).tolist()
        encoded = tokenizer([texts[i] for i in rows], padding=True, return_tensors="pt")
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        loss = model(**encoded, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return {"loss_first": losses[0], "loss_last": losses[-1]}
