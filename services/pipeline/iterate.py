"""``rlhf iterate --config FILE``: the iterated RLHF loop (InstructGPT section 3; Bai et al. 2022's "online" RLHF).

pretrain (tiny, built in) -> SFT once, then for each round r = 1..R:

1. sample K candidates per prompt for ``prompts_per_round`` fresh training prompts from the current policy (the SFT
   model in round 1, round r-1's PPO policy after), through the generation service;
2. label every pair of them with the configured labeller (simulated, people in the labelling app, or an AI judge);
   the pairs of a ``holdout_fraction`` of the prompts are kept out of training;
3. measure the reward model of round r-1 on the held-out fresh pairs (how well it judges the current policy's
   samples), train a new reward model from SFT on every preference so far, and measure it on the same pairs: the
   gap is why iterating helps (the old model was trained on another policy's samples);
4. PPO from the current policy, KL penalty to the SFT model, through the four services and the orchestrator;
5. evaluate the new policy on held-out prompts: gold reward, proxy reward (the round's reward model), KL to SFT.

Writes runs/<run-id>/iterate_report.md and summary.json, with one row per round.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

from services.labeling import Comparison, Verdict, preference_rows
from services.labeling.factory import open_labeler
from services.pipeline import common, task
from services.pipeline.config import IterateConfig
from services.pipeline.evaluate import evaluate_policies
from services.pipeline.run import Pipeline, all_pairs
from services.reward.backend import ModelRewardBackend
from services.reward.config import RewardConfig
from services.training.reward import RewardJobConfig, run_reward
from services.training.sft import SFTJobConfig, run_sft

ROUND_SEED_STRIDE = 100_003  # each round samples and runs PPO with its own seeds


def pair_accuracy(
    reward_model: Path, comparisons: list[Comparison], verdicts: list[Verdict], cpu_threads: int
) -> dict[str, float]:
    """How often the reward model ranks a pair as the labeller did (``vs_labels``, decided verdicts only) and as the
    gold reward does (``vs_gold``, pairs whose gold rewards differ), on ``comparisons``."""
    backend = ModelRewardBackend(
        RewardConfig.model_validate({"model": {"path": str(reward_model), "cpu_threads": cpu_threads}})
    )
    texts = [(c.prompt, c.response_a) for c in comparisons] + [(c.prompt, c.response_b) for c in comparisons]
    scores = backend.score(texts)
    score_a, score_b = scores[: len(comparisons)], scores[len(comparisons) :]
    vs_labels = [
        (a > b) == (v.choice == "a")
        for a, b, v in zip(score_a, score_b, verdicts, strict=True)
        if v.choice in ("a", "b")
    ]
    vs_gold = []
    for c, a, b in zip(comparisons, score_a, score_b, strict=True):
        gold_a, gold_b = task.gold_reward(c.prompt, c.response_a), task.gold_reward(c.prompt, c.response_b)
        if gold_a != gold_b:
            vs_gold.append((a > b) == (gold_a > gold_b))
    return {
        "vs_labels": sum(vs_labels) / len(vs_labels) if vs_labels else math.nan,
        "vs_gold": sum(vs_gold) / len(vs_gold) if vs_gold else math.nan,
        "pairs": len(comparisons),
        "pairs_vs_labels": len(vs_labels),
        "pairs_vs_gold": len(vs_gold),
    }


class Iterate(Pipeline):
    config: IterateConfig

    def __init__(self, config: IterateConfig):
        super().__init__(config)  # type: ignore[arg-type]  # the stages Pipeline's helpers read are the same
        self.run_id = config.run_id or time.strftime("iterate-%Y%m%d-%H%M%S")
        self.root = Path(config.runs_dir).resolve() / self.run_id
        self.rounds: list[dict] = []

    def run(self) -> dict:
        started = time.perf_counter()
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.config
        train_prompts, eval_prompts = task.prompt_splits(config.evaluation.prompts, config.seed)

        common.stage("base model")
        base = self.base_model()
        common.stage("supervised fine-tuning on demonstrations")
        sft_data = common.write_jsonl(
            self.root / "data" / "sft.jsonl", task.demonstrations(config.sft.demonstrations, config.seed)
        )
        self.results["sft"] = run_sft(
            SFTJobConfig(
                model=self.model(base), data=str(sft_data), output_dir=str(self.root / "sft"), optim=config.sft.optim
            )
        )
        sft = self.root / "sft"
        self.seconds["sft"] = time.perf_counter() - started

        policy, reward_model = sft, None
        training_rows: list[dict] = []
        for number in range(1, config.rounds.rounds + 1):
            policy, reward_model = self.round(
                number, policy, reward_model, sft, train_prompts, eval_prompts, training_rows
            )
        self.seconds["total"] = time.perf_counter() - started
        summary = {
            "run_id": self.run_id,
            "task": "sentence continuation scored by a hidden gold reward (services/pipeline/task.py)",
            "labeler": config.labeler.kind.value,
            "rounds": self.rounds,
            "final_policy": str(policy),
            "seconds": self.seconds,
            "definitions": {
                **common.DEFINITIONS,
                "rm_accuracy_before": "share of the round's held-out fresh pairs (sampled from the current policy, "
                "never trained on) that the previous round's reward model ranks as the labeller / the gold reward "
                "does",
                "rm_accuracy_after": "the same pairs, ranked by the reward model retrained on every preference so far",
            },
            "config": config.model_dump(mode="json"),
        }
        common.write_summary(self.root, summary)
        write_iterate_report(self.root, summary)
        return summary

    def round(
        self,
        number: int,
        policy: Path,
        previous_reward_model: Path | None,
        sft: Path,
        train_prompts: list[str],
        eval_prompts: list[str],
        training_rows: list[dict],
    ) -> tuple[Path, Path]:
        config = self.config
        started = time.perf_counter()
        name = f"round{number}"
        per_round = config.rounds.prompts_per_round
        prompts = [train_prompts[((number - 1) * per_round + i) % len(train_prompts)] for i in range(per_round)]

        common.stage(f"round {number}: candidates from {'the SFT model' if policy == sft else 'the current policy'}")
        texts = self.sample_candidates(policy, prompts, name=f"{name}-candidates", seed=number * ROUND_SEED_STRIDE)
        comparisons = all_pairs(prompts, texts, config.preferences.samples_per_prompt)

        common.stage(f"round {number}: {len(comparisons)} pairs to the {config.labeler.kind.value} labeller")
        verdicts = asyncio.run(self.label(comparisons, name))
        held_out_prompts = set(prompts[: max(1, round(config.rounds.holdout_fraction * per_round))])
        held_out = [i for i, c in enumerate(comparisons) if c.prompt in held_out_prompts]
        train = [i for i, c in enumerate(comparisons) if c.prompt not in held_out_prompts]
        fresh = preference_rows([comparisons[i] for i in train], [verdicts[i] for i in train])
        training_rows.extend({**row, "round": number} for row in fresh)
        common.write_jsonl(
            self.root / "data" / f"{name}_labels.jsonl",
            [
                {
                    "prompt": c.prompt,
                    "response_a": c.response_a,
                    "response_b": c.response_b,
                    "choice": v.choice.value,
                    "probability_a": v.probability_a,
                    "labeler": v.labeler,
                    "held_out": i in set(held_out),
                }
                for i, (c, v) in enumerate(zip(comparisons, verdicts, strict=True))
            ],
        )
        held_comparisons = [comparisons[i] for i in held_out]
        held_verdicts = [verdicts[i] for i in held_out]
        before = (
            pair_accuracy(previous_reward_model, held_comparisons, held_verdicts, config.cpu_threads)
            if previous_reward_model
            else None
        )

        common.stage(f"round {number}: reward model on all {len(training_rows)} preferences so far")
        data = common.write_jsonl(self.root / "data" / f"{name}_preferences.jsonl", training_rows)
        reward_model = self.root / name / "reward_model"
        rm_summary = run_reward(
            RewardJobConfig(
                model=self.model(sft), data=str(data), output_dir=str(reward_model), optim=config.reward_model.optim
            )
        )
        after = pair_accuracy(reward_model, held_comparisons, held_verdicts, config.cpu_threads)

        common.stage(f"round {number}: PPO from the current policy through the services")
        new_policy = self.ppo(
            policy, sft, reward_model, train_prompts, f"{name}_ppo", with_kl=True, seed=number * ROUND_SEED_STRIDE
        )

        common.stage(f"round {number}: evaluation on {len(eval_prompts)} held-out prompts")
        ev = config.evaluation
        policies = {name: new_policy} if number > 1 else {"sft": sft, name: new_policy}
        evaluations = evaluate_policies(
            policies,
            sft,
            reward_model,
            eval_prompts,
            ev.max_new_tokens,
            ev.temperature,
            config.seed + 1,
            ev.examples,
            config.cpu_threads,
        )
        if number == 1:
            self.rounds.append({"round": 0, "policy": "sft", "evaluation": evaluations["sft"].as_dict()})
        decided = sum(v.choice in ("a", "b") for v in verdicts)
        record = {
            "round": number,
            "policy": name,
            "prompts": per_round,
            "pairs_labelled": len(comparisons),
            "pairs_decided": decided,
            "pairs_held_out": len(held_out),
            "preferences_total": len(training_rows),
            "rm_accuracy_before": before,
            "rm_accuracy_after": after,
            "reward_model_eval_pair_accuracy": rm_summary["pair_accuracy"],
            "policy_start": str(policy),
            "policy_final": str(new_policy),
            "reward_model": str(reward_model),
            "ppo": self.results[f"{name}_ppo"],
            "evaluation": evaluations[name].as_dict(),
            "seconds": time.perf_counter() - started,
        }
        self.rounds.append(record)
        e = record["evaluation"]
        print(
            f"round {number}: gold {e['gold_reward_mean']:.3f} ± {e['gold_reward_ci95']:.3f}, proxy "
            f"{e['proxy_reward_mean']:.3f}, KL to SFT {e['kl_to_sft']:.2f} nats/seq; reward model on fresh pairs "
            f"vs gold: before {_fmt(before, 'vs_gold')}, after {_fmt(after, 'vs_gold')}",
            flush=True,
        )
        return new_policy, reward_model

    async def label(self, comparisons: list[Comparison], batch: str) -> list[Verdict]:
        # Clients (gRPC channels, HTTP sessions) belong to the event loop they are made in: open the labeller here.
        async with open_labeler(self.config.labeler, seed=self.config.seed, batch=batch, root=self.root) as labeler:
            verdicts = await labeler.label(comparisons)
        if len(verdicts) != len(comparisons):
            raise RuntimeError(f"labeller {labeler.name} gave {len(verdicts)} verdicts for {len(comparisons)} pairs")
        return verdicts


def _fmt(accuracy: dict | None, key: str) -> str:
    if accuracy is None or math.isnan(accuracy[key]):
        return "-"
    return f"{accuracy[key]:.3f}"


def _before_after(record: dict, key: str) -> str:
    """'0.852 -> 1.000 (27 pairs)': the previous and the retrained reward model on the same held-out pairs."""
    after = record["rm_accuracy_after"]
    counted = after.get(f"pairs_{key}", after["pairs"])
    return f"{_fmt(record['rm_accuracy_before'], key)} -> {_fmt(after, key)} ({counted} pairs)"


def write_iterate_report(root: Path, summary: dict) -> Path:
    lines = [
        f"# Iterated RLHF report: {summary['run_id']}",
        "",
        f"Task: {summary['task']}. Labeller: {summary['labeler']}. Every round samples fresh prompts from the current "
        "policy, labels them, retrains the reward model on all preferences so far, and runs PPO from the current "
        "policy (KL penalty to SFT).",
        "",
        "| round | policy | pairs labelled (RM trained on) | held-out fresh pairs | RM accuracy before -> after, "
        "vs gold | vs labels | gold reward (95% CI) | proxy reward | KL to SFT (nats/seq) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rounds"]:
        e = r["evaluation"]
        if r["round"] == 0:
            counts = held = accuracy_gold = accuracy_labels = "-"
        else:
            counts = f"{r['pairs_labelled']} ({r['preferences_total']})"
            held = str(r["pairs_held_out"])
            accuracy_gold = _before_after(r, "vs_gold")
            accuracy_labels = _before_after(r, "vs_labels")
        lines.append(
            f"| {r['round']} | {r['policy']} | {counts} | {held} | {accuracy_gold} | {accuracy_labels} | "
            f"{e['gold_reward_mean']:.3f} ± {e['gold_reward_ci95']:.3f} | {e['proxy_reward_mean']:.3f} | "
            f"{e['kl_to_sft']:.2f} |"
        )
    lines += [
        "",
        *[f"- {key}: {text}" for key, text in summary["definitions"].items()],
        "- proxy reward here: each round's own reward model (round 0, the SFT model, is scored by round 1's).",
        "- RM accuracy before: the previous round's reward model (none in round 1); vs gold counts the pairs whose "
        "gold rewards differ, vs labels the pairs the labeller decided (not a tie or both bad). As the policy "
        "improves, more of its samples tie on gold, and a simulated labeller decides those by a coin flip: agreement "
        "with the labels then tends to 0.5 while agreement with the gold reward stays meaningful.",
        "",
        "## Stages",
        "",
        *[f"- {k}: {v:.1f} s" for k, v in summary["seconds"].items()],
    ]
    path = root / "iterate_report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_iterate(config: IterateConfig) -> dict:
    return Iterate(config).run()
