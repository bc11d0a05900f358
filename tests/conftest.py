"""Session fixtures: tiny models built offline once per test session."""

from __future__ import annotations

import pytest

from shared.tiny_models import build_policy, build_reward_model


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    """A randomly initialised tiny Llama causal LM + BPE tokenizer (safetensors)."""
    return build_policy(tmp_path_factory.mktemp("tiny-policy"))


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory):
    """A randomly initialised tiny Llama sequence classifier with one label + tokenizer."""
    return build_reward_model(tmp_path_factory.mktemp("tiny-reward"))
