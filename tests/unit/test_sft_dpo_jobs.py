"""The SFT and DPO jobs end to end on the tiny offline policy: data formats, masking, bad rows, learning, checkpoints
that load in transformers and in the generation service's backend."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.generation.backend import GenerationBackend
from services.generation.config import GenerationConfig
from services.training.common import encode_pair, save_atomically
from services.training.dpo import DPOJobConfig, PromptGroup, group_by_prompt, load_groups, pair_losses, run_dpo
from services.training.sft import SFTJobConfig, batch_loss, encode_conversation, load_examples, run_sft
from shared.modeling import ModelConfig, load_tokenizer
from shared.tiny_models import CHAT_TEMPLATE, NEGATIVE_WORDS, POSITIVE_WORDS, corpus, prompts
from shared.training import DataError, OptimConfig, train_loop
from shared.types import SamplingParams

CONVERSATION = [
    {"role": "system", "content": "you are kind."},
    {"role": "user", "content": "how was the day?"},
    {"role": "assistant", "content": "the day was warm and bright."},
    {"role": "user", "content": "and the food?"},
    {"role": "assistant", "content": "the food was good."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def prompt_completion_rows(n: int, seed: int) -> list[dict]:
    """Corpus sentences split after their 2nd or 3rd word."""
    rng = random.Random(seed)
    rows = []
    for sentence in corpus(n, seed=seed):
        words = sentence.split(" ")
        cut = rng.choice([2, 3])
        rows.append({"prompt": " ".join(words[:cut]), "completion": " " + " ".join(words[cut:])})
    return rows


def sentiment(rng: random.Random, words: list[str]) -> str:
    return f" {rng.choice(words)} and {rng.choice(words)}."


def assert_generates(checkpoint: Path) -> None:
    backend = GenerationBackend(GenerationConfig.model_validate({"model": {"path": str(checkpoint)}}))
    samples = backend.generate(backend.tokenize(["the cat is"]), SamplingParams(max_new_tokens=6, temperature=0))
    assert len(samples) == 1 and samples[0].response_ids.numel() >= 1


def supervised_runs(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """The contiguous runs of supervised token ids."""
    runs, current = [], []
    for token, supervised in zip(ids.tolist(), mask.tolist(), strict=True):
        if supervised:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    return [*runs, current] if current else runs


# ----------------------------------------------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tiny_policy_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sft")
    data = write_jsonl(directory / "train.jsonl", prompt_completion_rows(40, seed=3))
    config = SFTJobConfig.model_validate(
        {
            "model": {"path": str(tiny_policy_dir)},
            "data": str(data),
            "output_dir": str(directory / "out"),
            "optim": {"learning_rate": 3e-3, "epochs": 3, "batch_size": 8, "eval_fraction": 0.2},
        }
    )
    return run_sft(config), directory / "out"


def test_sft_learns_completions(sft_run):
    summary, out = sft_run
    assert summary["job"] == "sft"
    assert (summary["examples"], summary["eval_examples"], summary["steps"]) == (32, 8, 12)
    assert summary["eval_loss"] < summary["eval_loss_first"] - 1.0  # ~6.2 -> ~4.0 nats per completion token
    assert summary["train_loss_last"] < summary["train_loss_first"]
    written = json.loads((out / "training_summary.json").read_text())
    assert written["eval_loss"] == summary["eval_loss"] and len(written["history"]) == summary["steps"]


def test_sft_checkpoint_is_safetensors_and_loads(sft_run):
    _, out = sft_run
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert_generates(out)


def test_prompt_completion_ids_boundary_eos_and_truncation(tiny_policy_dir):
    tokenizer = load_tokenizer(ModelConfig(path=str(tiny_policy_dir)))
    prompt_ids, completion_ids = encode_pair(tokenizer, "the cat is", " good at home.", max_length=64)
    assert tokenizer.decode(prompt_ids) == "the cat is"
    assert completion_ids[-1].item() == tokenizer.eos_token_id
    assert tokenizer.decode(completion_ids[:-1]) == " good at home."
    # Too long: the prompt loses its start, the completion is kept whole.
    long_prompt = " ".join(["the dog was sad"] * 10)
    prompt_ids, kept = encode_pair(tokenizer, long_prompt, " good at home.", max_length=8)
    assert torch.equal(kept, completion_ids) and prompt_ids.numel() + kept.numel() == 8
    assert tokenizer.decode(prompt_ids).endswith("sad")


@pytest.mark.parametrize("templated", [False, True], ids=["plain", "chat-template"])
def test_conversation_loss_only_on_assistant_tokens(tiny_policy_dir, templated):
    tokenizer = load_tokenizer(ModelConfig(path=str(tiny_policy_dir)))
    if templated:
        tokenizer.chat_template = CHAT_TEMPLATE
    example = encode_conversation(tokenizer, CONVERSATION, max_length=256)
    ids = torch.cat([example.prompt_ids, example.completion_ids])
    mask = torch.cat([torch.zeros(example.prompt_ids.numel()), example.completion_mask])
    supervised = [tokenizer.decode(run) for run in supervised_runs(ids, mask)]
    end = "</s>\n" if templated else "</s>"
    assert supervised == [f"the day was warm and bright.{end}", f"the food was good.{end}"]
    unsupervised = tokenizer.decode(ids[mask == 0])
    for text in ("you are kind.", "how was the day?", "and the food?", "system", "user", "assistant"):
        assert text in unsupervised
    assert "warm" not in unsupervised and "good" not in unsupervised
    # The loss counts exactly those tokens (system and user tokens contribute nothing).
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    _, n_tokens = batch_loss(model, [example], int(tokenizer.pad_token_id))
    assert n_tokens == sum(len(run) for run in supervised_runs(ids, mask))


def test_sft_conversational_rows(tiny_policy_dir, tmp_path):
    # A copy of the tiny policy whose tokenizer has a chat template.
    policy = tmp_path / "policy"
    shutil.copytree(tiny_policy_dir, policy)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(policy)
    rng = random.Random(0)
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be kind."},
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": f"{prompt}{sentiment(rng, POSITIVE_WORDS)}"},
            ]
        }
        for prompt in prompts(12, seed=2)
    ]
    config = SFTJobConfig.model_validate(
        {
            "model": {"path": str(policy)},
            "data": str(write_jsonl(tmp_path / "chat.jsonl", rows)),
            "output_dir": str(tmp_path / "out"),
            "optim": {"learning_rate": 3e-3, "epochs": 2, "batch_size": 4, "eval_fraction": 0.25},
        }
    )
    summary = run_sft(config)
    assert (summary["examples"], summary["eval_examples"]) == (9, 3)
    assert summary["eval_loss"] < summary["eval_loss_first"]
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize(
    ("bad_line", "field"),
    [
        ({"prompt": "the cat is"}, "'completion'"),
        ({"prompt": "the cat is", "completion": 5}, "'completion'"),
        ({"completion": " good."}, "'prompt'"),
        ('{"prompt": "the cat is", "completion": ', "not valid JSON"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "'messages[0].role'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ],
    ids=["missing-completion", "non-string-completion", "missing-prompt", "broken-json", "bad-role", "no-assistant"],
)
def test_sft_bad_row_names_file_and_line(tiny_policy_dir, tmp_path, bad_line, field):
    good = {"prompt": "the cat is", "completion": " good."}
    data = write_jsonl(tmp_path / "data.jsonl", [good, good, bad_line, good])  # the bad row is on line 3
    config = SFTJobConfig(model=ModelConfig(path=str(tiny_policy_dir)), data=str(data), output_dir=str(tmp_path / "o"))
    with pytest.raises(DataError) as error:
        run_sft(config)
    assert f"{data}:3:" in str(error.value) and field in str(error.value)
    assert not (tmp_path / "o").exists()


def test_sft_bad_row_line_counts_blank_lines(tiny_policy_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "the cat is", "completion": " good."}, "", {"prompt": "x"}])
    with pytest.raises(DataError, match=rf"{data}:3: 'completion'"):
        load_examples(data, load_tokenizer(ModelConfig(path=str(tiny_policy_dir))), max_length=64)


def test_sft_reads_parquet(tiny_policy_dir, tmp_path):
    import datasets

    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list(prompt_completion_rows(5, seed=1)).to_parquet(str(path))
    tokenizer = load_tokenizer(ModelConfig(path=str(tiny_policy_dir)))
    examples = load_examples(path, tokenizer, max_length=64)
    assert len(examples) == 5 and all(e.completion_ids[-1] == tokenizer.eos_token_id for e in examples)


# ----------------------------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------------------------


def preference_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt": p, "chosen": sentiment(rng, POSITIVE_WORDS), "rejected": sentiment(rng, NEGATIVE_WORDS)}
        for p in prompts(n, seed=seed)
    ]


def dpo_config(policy: Path, data: Path, out: Path, **overrides) -> DPOJobConfig:
    return DPOJobConfig.model_validate(
        {
            "model": {"path": str(policy)},
            "data": str(data),
            "output_dir": str(out),
            "beta": 0.5,
            "optim": {"learning_rate": 3e-3, "epochs": 3, "batch_size": 8, "eval_fraction": 0.2},
            **overrides,
        }
    )


def test_dpo_prefers_positive_responses(tiny_policy_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(30, seed=5))
    summary = run_dpo(dpo_config(tiny_policy_dir, data, tmp_path / "out"))
    assert summary["job"] == "dpo"
    assert summary["pairs"] + summary["eval_pairs"] == 30 and summary["eval_pairs"] >= 4
    # Policy == reference at the start: every implicit reward is exactly 0, the loss log 2, no pair "right".
    assert summary["eval_loss_first"] == pytest.approx(math.log(2))
    assert summary["eval_reward_accuracy_first"] == 0.0
    assert summary["reward_accuracy"] >= 0.8 and summary["reward_margin"] > 0
    assert summary["eval_loss"] < summary["eval_loss_first"] - 0.2
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    assert_generates(tmp_path / "out")


def test_dpo_ranking_rows_give_all_pairs(tiny_policy_dir, tmp_path):
    rng = random.Random(1)
    openers = list(dict.fromkeys(prompts(40, seed=4)))[:12]  # distinct prompts
    rows = [
        {
            "prompt": p,
            "responses": [
                sentiment(rng, POSITIVE_WORDS),
                f" {rng.choice(POSITIVE_WORDS)} and {rng.choice(NEGATIVE_WORDS)}.",
                sentiment(rng, NEGATIVE_WORDS),
            ],
        }
        for p in openers
    ]
    data = write_jsonl(tmp_path / "ranked.jsonl", rows)
    tokenizer = load_tokenizer(ModelConfig(path=str(tiny_policy_dir)))
    groups = load_groups(data, tokenizer, max_length=64)
    assert [(len(g.responses), g.pairs) for g in groups] == [(3, [(0, 1), (0, 2), (1, 2)])] * 12
    # An explicit reference (the same weights) behaves like the default one.
    config = dpo_config(tiny_policy_dir, data, tmp_path / "out", reference={"path": str(tiny_policy_dir)})
    summary = run_dpo(config)
    assert summary["pairs"] + summary["eval_pairs"] == 3 * 12 and summary["eval_pairs"] % 3 == 0
    assert summary["eval_reward_accuracy_first"] == 0.0
    assert summary["eval_loss"] < summary["eval_loss_first"] and summary["reward_accuracy"] > 0.5
    assert_generates(tmp_path / "out")


def test_batches_never_split_a_prompts_pairs():
    # Interleaved rows of 5 prompts, some repeated, one a ranking of 4 (6 pairs).
    comparisons = []
    for i in range(15):
        prompt = f"prompt {i % 5}"
        comparisons.append((prompt, [f"good {i}", f"bad {i}"], [(0, 1)]))
    comparisons.append(("prompt 2", ["a", "b", "c", "d"], [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]))
    groups = group_by_prompt(comparisons)
    assert [g.prompt for g in groups] == [f"prompt {i}" for i in range(5)]
    assert [len(g.pairs) for g in groups] == [3, 3, 9, 3, 3]
    group_2 = groups[2]
    assert group_2.responses[:2] == ["good 2", "bad 2"] and group_2.pairs[-6:] == [
        (6, 7),
        (6, 8),
        (6, 9),
        (7, 8),
        (7, 9),
        (8, 9),
    ]

    # Through the training loop: every micro-batch holds whole groups, each prompt once per epoch.
    seen: list[list[str]] = []
    weight = torch.nn.Parameter(torch.zeros(1))

    def loss_fn(micro_batch):
        seen.append([g.prompt for g in micro_batch])
        return weight.sum() * 0 + sum(len(g.pairs) for g in micro_batch), {}

    optim = OptimConfig(batch_size=2, micro_batch_size=1, epochs=2, eval_fraction=0)
    train_loop("test", [weight], groups, optim, loss_fn, units=lambda gs: sum(len(g.pairs) for g in gs))
    flat = [p for micro in seen for p in micro]
    assert sorted(flat[:5]) == sorted(flat[5:]) == sorted(g.prompt for g in groups)


@pytest.mark.parametrize(
    ("bad_line", "field"),
    [
        ({"prompt": "the cat is", "chosen": " good."}, "'rejected'"),
        ({"prompt": "the cat is", "responses": [" good."]}, "'responses'"),
        ({"prompt": "the cat is", "responses": [" good.", 3]}, "'responses'"),
        ({"chosen": " good.", "rejected": " bad."}, "'prompt'"),
        ("not json", "not valid JSON"),
    ],
    ids=["missing-rejected", "one-response", "non-string-response", "missing-prompt", "broken-json"],
)
def test_dpo_bad_row_names_file_and_line(tiny_policy_dir, tmp_path, bad_line, field):
    good = {"prompt": "the cat is", "chosen": " good.", "rejected": " bad."}
    data = write_jsonl(tmp_path / "data.jsonl", [good, good, bad_line])
    with pytest.raises(DataError) as error:
        run_dpo(dpo_config(tiny_policy_dir, data, tmp_path / "out"))
    assert f"{data}:3:" in str(error.value) and field in str(error.value)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def test_save_atomically_replaces_whole_or_not_at_all(tiny_policy_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_dir)
    out = tmp_path / "ckpt"
    save_atomically(model, tokenizer, out, {"note.txt": "first", "meta.json": {"step": 1}})
    assert (out / "note.txt").read_text() == "first" and json.loads((out / "meta.json").read_text()) == {"step": 1}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_atomically(model, tokenizer, out, {"note.txt": "second"})
    assert (out / "note.txt").read_text() == "first"  # the previous checkpoint is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # and no staging directory is left


def test_rpo_adds_the_chosen_responses_nll_per_token():
    """pair_losses with nll_coef = alpha: dpo loss - alpha * log pi(y_w | x) / |y_w| per pair (Pang et al. 2024)."""
    group = PromptGroup(
        "p",
        ["w", "l", "m"],
        [(0, 1), (0, 2), (2, 1)],
        response_ids=[
            torch.ones(4, dtype=torch.int64),
            torch.ones(2, dtype=torch.int64),
            torch.ones(5, dtype=torch.int64),
        ],
        reference_logps=torch.tensor([-3.0, -2.0, -6.0]),
    )
    policy = torch.tensor([-2.0, -3.0, -5.5])
    beta, alpha = 0.5, 0.7
    plain, chosen_rewards, rejected_rewards = pair_losses([group], [policy], beta)
    with_nll, chosen_same, rejected_same = pair_losses([group], [policy], beta, nll_coef=alpha)
    winners, losers = [0, 0, 2], [1, 2, 1]
    for i, (w, lose) in enumerate(zip(winners, losers, strict=True)):
        margin = beta * ((policy[w] - group.reference_logps[w]) - (policy[lose] - group.reference_logps[lose]))
        expected_dpo = -math.log(1 / (1 + math.exp(-float(margin))))
        length = group.response_ids[w].numel()
        assert plain[i].item() == pytest.approx(expected_dpo, rel=1e-6)
        assert with_nll[i].item() == pytest.approx(expected_dpo - alpha * float(policy[w]) / length, rel=1e-6)
    assert torch.equal(chosen_rewards, chosen_same) and torch.equal(rejected_rewards, rejected_same)
