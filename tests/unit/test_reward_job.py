"""Reward-model job on tiny models: it learns preferences, batches by prompt, and writes a checkpoint that the reward
service loads as it is, with normalisation statistics that centre the served scores."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import services.training.reward as reward_job
from services.reward.backend import NORMALIZATION_FILE, ModelRewardBackend
from services.reward.config import RewardConfig
from services.training.reward import PromptGroup, RewardJobConfig, flatten, read_groups, run_reward
from shared.tiny_models import NEGATIVE_WORDS, POSITIVE_WORDS, prompts
from shared.training import DataError, split

PLACES = ["at home", "in the park", "by the sea", "at school", "today"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sentiment_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs that differ only in a word: chosen has a positive one, rejected a negative one."""
    rng = random.Random(seed)
    rows = []
    for prompt in list(dict.fromkeys(prompts(400, seed=seed)))[:n]:
        place = rng.choice(PLACES)
        rows.append(
            {
                "prompt": prompt,
                "chosen": f" {rng.choice(POSITIVE_WORDS)} {place}.",
                "rejected": f" {rng.choice(NEGATIVE_WORDS)} {place}.",
            }
        )
    return rows


@pytest.fixture(scope="module")
def trained(pretrained_policy_dir, tmp_path_factory):
    """The job run once on 64 sentiment pairs from the pretrained tiny causal LM: (config, summary)."""
    directory = tmp_path_factory.mktemp("reward-job")
    config = RewardJobConfig.model_validate(
        {
            "model": {"path": str(pretrained_policy_dir)},
            "data": str(write_jsonl(directory / "prefs.jsonl", sentiment_pairs(64))),
            "output_dir": str(directory / "rm"),
            "optim": {
                "learning_rate": 5e-4,
                "epochs": 3,
                "batch_size": 8,
                "micro_batch_size": 4,
                "eval_fraction": 0.25,
                "max_length": 32,
            },
        }
    )
    return config, run_reward(config)


def test_learns_preferences_from_a_causal_lm(trained):
    config, summary = trained
    assert summary["pairs"] == 48 and summary["eval_pairs"] == 16
    assert summary["pair_accuracy"] > 0.7
    assert summary["pair_accuracy"] > summary["pair_accuracy_first"]
    assert summary["eval_loss"] < summary["eval_loss_first"]
    assert summary["train_loss_last"] < summary["train_loss_first"]
    output = config.output_dir
    assert json.loads((Path(output) / "training_summary.json").read_text()) == summary
    saved = json.loads((Path(output) / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"] and len(saved["id2label"]) == 1
    assert saved["pad_token_id"] is not None
    files = [p.name for p in Path(output).rglob("*")]
    assert "model.safetensors" in files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pkl"))]


def test_checkpoint_serves_centred_scores(trained):
    config, summary = trained
    train_groups, _ = split(read_groups(config.data), config.optim.eval_fraction, config.optim.seed)
    texts, winners, losers = flatten(train_groups)
    served = RewardConfig.model_validate({"model": {"path": config.output_dir}, "max_length": config.optim.max_length})
    normalized = torch.tensor(ModelRewardBackend(served).score(texts))
    raw = torch.tensor(ModelRewardBackend(served.model_copy(update={"normalize": False})).score(texts))
    statistics = json.loads((Path(config.output_dir) / NORMALIZATION_FILE).read_text())
    assert statistics == summary["normalization"] and statistics["count"] == len(texts) == 96
    # The service reads the text as the job did: its raw scores give back the stored statistics.
    assert abs(raw.mean().item() - statistics["mean"]) < 1e-4
    assert abs(raw.std(correction=0).item() - statistics["std"]) < 1e-4
    assert abs(normalized.mean().item()) < 1e-4 and abs(normalized.std(correction=0).item() - 1) < 1e-4
    torch.testing.assert_close(normalized, (raw - statistics["mean"]) / statistics["std"])
    assert (raw[winners] > raw[losers]).float().mean() > 0.9


def test_ranking_rows_give_all_pairs_and_batches_keep_a_prompt_together(tiny_reward_dir, tmp_path, monkeypatch):
    rankings = [
        {"prompt": f"prompt {i}", "responses": [f" best {i}", f" middle {i}", f" worst {i}"]} for i in range(12)
    ]
    data = write_jsonl(tmp_path / "ranks.jsonl", rankings)
    groups = read_groups(data)
    assert [g.pairs for g in groups] == [[(0, 1), (0, 2), (1, 2)]] * 12

    seen: list[list[PromptGroup]] = []
    real_train_loop = reward_job.train_loop

    def recording_train_loop(name, parameters, items, config, loss_fn, units, evaluate=None):
        def recording_loss_fn(part):
            seen.append(part)
            return loss_fn(part)

        return real_train_loop(name, parameters, items, config, recording_loss_fn, units, evaluate)

    monkeypatch.setattr(reward_job, "train_loop", recording_train_loop)
    config = RewardJobConfig.model_validate(
        {
            "model": {"path": str(tiny_reward_dir)},  # an existing sequence classifier
            "data": str(data),
            "output_dir": str(tmp_path / "rm"),
            "optim": {"learning_rate": 1e-3, "batch_size": 4, "micro_batch_size": 2, "eval_fraction": 0.25},
        }
    )
    summary = run_reward(config)
    assert summary["pairs"] == 9 * 3 and summary["eval_pairs"] == 3 * 3 and summary["steps"] == 3
    # Every micro-batch holds whole prompts: a prompt's 3 pairs and 3 responses are never split across batches.
    assert sum(len(part) for part in seen) == 9
    for part in seen:
        assert all(len(g.pairs) == 3 and len(g.responses) == 3 for g in part)
        texts, winners, losers = flatten(part)
        assert len(texts) == 3 * len(part) and len(winners) == len(losers) == 3 * len(part)
    assert len({g.prompt for part in seen for g in part}) == 9


def test_rows_of_one_prompt_share_a_group(tmp_path):
    data = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "p", "responses": [" a", " b", " c"]},
            {"prompt": "q", "chosen": " x", "rejected": " y"},
            {"prompt": "p", "chosen": " d", "rejected": " b"},
        ],
    )
    groups = read_groups(data)
    assert [g.prompt for g in groups] == ["p", "q"]
    assert groups[0].responses == [" a", " b", " c", " d"]
    assert groups[0].pairs == [(0, 1), (0, 2), (1, 2), (3, 1)]  # " b" is scored once, in both rows' pairs


BAD_ROWS = [
    ({"prompt": "p", "chosen": " a"}, "'rejected'"),
    ({"prompt": "", "chosen": " a", "rejected": " b"}, "'prompt'"),
    ({"prompt": "p", "chosen": " a", "rejected": " a"}, "'rejected'"),
    ({"prompt": "p", "responses": [" only"]}, "'responses'"),
    ({"prompt": "p", "responses": [" a", 3]}, "'responses'"),
    ({"prompt": "p", "responses": [" a", " b", " a"]}, "'responses'"),
]


@pytest.mark.parametrize(("bad_row", "field"), BAD_ROWS)
def test_bad_rows_name_file_line_and_field(tmp_path, bad_row, field):
    good = {"prompt": "p", "chosen": " good", "rejected": " bad"}
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n" + json.dumps(bad_row) + "\n")
    with pytest.raises(DataError, match=f"{data}:4: {field}"):
        read_groups(data)
    # The job checks its data before it loads a model (this path does not exist).
    config = RewardJobConfig.model_validate(
        {"model": {"path": str(tmp_path / "no-model")}, "data": str(data), "output_dir": str(tmp_path / "rm")}
    )
    with pytest.raises(DataError, match=f"{data}:4"):
        run_reward(config)


# ----------------------------------------------------------------------------------------------------------------
# Soft labels (chosen_probability)
# ----------------------------------------------------------------------------------------------------------------


def test_soft_labels_reach_the_loss_and_train(tiny_reward_dir, tmp_path, monkeypatch):
    """Rows with chosen_probability train with that target; rows without it (and rankings) with target 1."""
    rows = [
        {"prompt": f"prompt {i}", "chosen": f" good {i}", "rejected": f" bad {i}", "chosen_probability": p}
        for i, p in enumerate([0.9, 0.75, 0.6, 0.5, 1.0, 0.35, 0.8, 0.7])
    ]
    rows += [{"prompt": f"prompt {i}", "chosen": f" fine {i}", "rejected": f" poor {i}"} for i in range(8, 12)]
    rows += [{"prompt": "ranked", "responses": [" best", " middle", " worst"]}]
    data = write_jsonl(tmp_path / "soft.jsonl", rows)
    groups = read_groups(data)
    expected = {g.prompt: g for g in groups}
    assert expected["prompt 0"].targets == [0.9] and expected["prompt 9"].targets == [1.0]
    assert expected["ranked"].targets == [1.0, 1.0, 1.0]

    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    real_loss = reward_job.bradley_terry_loss

    def recording_loss(chosen, rejected, target=None):
        seen.append((chosen.detach(), target))
        return real_loss(chosen, rejected, target)

    monkeypatch.setattr(reward_job, "bradley_terry_loss", recording_loss)
    config = RewardJobConfig.model_validate(
        {
            "model": {"path": str(tiny_reward_dir)},
            "data": str(data),
            "output_dir": str(tmp_path / "rm"),
            "optim": {"learning_rate": 1e-3, "batch_size": 4, "micro_batch_size": 2, "eval_fraction": 0.25},
        }
    )
    summary = run_reward(config)
    train_groups, _ = split(groups, config.optim.eval_fraction, config.optim.seed)
    assert summary["pairs"] == sum(len(g.pairs) for g in train_groups)
    assert summary["soft_pairs"] == sum(t != 1.0 for g in train_groups for t in g.targets) > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in (summary["train_loss_first"], summary["train_loss_last"]))
    # Every call got one target per pair, and over the run the soft values of the file arrived.
    assert all(target is not None and target.shape == chosen.shape for chosen, target in seen)
    delivered = {round(float(v), 6) for _, target in seen for v in target}
    assert {0.9, 0.75, 0.6, 0.5, 0.35, 0.8, 0.7, 1.0} <= delivered


SOFT_BAD_ROWS = [
    {"prompt": "p", "chosen": " a", "rejected": " b", "chosen_probability": 1.5},
    {"prompt": "p", "chosen": " a", "rejected": " b", "chosen_probability": -0.1},
    {"prompt": "p", "chosen": " a", "rejected": " b", "chosen_probability": "0.9"},
    {"prompt": "p", "chosen": " a", "rejected": " b", "chosen_probability": True},
    {"prompt": "p", "chosen": " a", "rejected": " b", "chosen_probability": float("nan")},
    {"prompt": "p", "responses": [" a", " b"], "chosen_probability": 0.8},
]


@pytest.mark.parametrize("bad_row", SOFT_BAD_ROWS, ids=["above-1", "negative", "string", "bool", "nan", "ranking"])
def test_bad_chosen_probability_names_file_and_line(tmp_path, bad_row):
    good = {"prompt": "p", "chosen": " good", "rejected": " bad", "chosen_probability": 0.7}
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n\n" + json.dumps(bad_row) + "\n")
    with pytest.raises(DataError, match=f"{data}:4: 'chosen_probability'"):
        read_groups(data)
    config = RewardJobConfig.model_validate(
        {"model": {"path": str(tmp_path / "no-model")}, "data": str(data), "output_dir": str(tmp_path / "rm")}
    )
    with pytest.raises(DataError, match=f"{data}:4"):
        run_reward(config)


def test_probability_below_one_half_leans_towards_rejected(tmp_path):
    """A value below 0.5 is kept as it is (the label leans the other way); null is a hard label."""
    data = write_jsonl(
        tmp_path / "lean.jsonl",
        [
            {"prompt": "p", "chosen": " a", "rejected": " b", "chosen_probability": 0.2},
            {"prompt": "q", "chosen": " a", "rejected": " b", "chosen_probability": None},
            {"prompt": "r", "chosen": " a", "rejected": " b", "chosen_probability": 0},
        ],
    )
    assert [g.targets for g in read_groups(data)] == [[0.2], [1.0], [0.0]]
    chosen, rejected = torch.tensor([1.0, 1.0, -1.0]), torch.tensor([0.0, 0.0, 0.0])
    assert reward_job.pair_accuracy(chosen, rejected, torch.tensor([0.2, 0.9, 0.0])) == pytest.approx(2 / 3)
