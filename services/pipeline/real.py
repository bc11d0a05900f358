"""``rlhf pipeline-real``: the pipeline on a real model and real human ratings (``make demo-real``).

SmolLM2-135M-Instruct (the starting policy, "sft" in the tables) continues review openings. People's ratings of
movie-review snippets become preference pairs -> a Bradley-Terry reward model on MiniLM -> PPO through the four
services and the orchestrator (with the KL penalty, and once more with beta = 0) -> evaluation on held-out
openings against VADER, a rule-based sentiment judge that training never sees -> runs/<run-id>/report.md and
summary.json, in the same form as ``rlhf pipeline``'s.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

import httpx

from services.launcher import Launcher, follow_run, start_stack
from services.pipeline import common, report, reviews
from services.pipeline.evaluate import evaluate_policies
from services.pipeline.real_config import RealPipelineConfig
from services.training.reward import RewardJobConfig, read_groups, run_reward
from shared import pretrained
from shared.training import split

TASK = (
    "continue a movie-review opening so that the sentence is positive: SmolLM2-135M-Instruct (the starting "
    "policy, 'sft') trained with a reward model learnt from people's ratings (ICWSM-2014 snippets); gold reward = "
    "VADER's compound sentiment score in [-1, 1] of opening + continuation, never seen in training"
)


def critic_init(policy: Path, layers: int, output_dir: Path) -> Path:
    """The policy cut to its first ``layers`` transformer layers (embeddings and final norm kept): a critic backbone
    that reads the policy's token ids at a fraction of its cost."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # not a warning: leaving out the later layers' weights is the point
    try:
        model = AutoModelForCausalLM.from_pretrained(policy, num_hidden_layers=layers, use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.save_pretrained(output_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(policy).save_pretrained(output_dir)
    return output_dir


def start_run(api: str, run: dict) -> str:
    """POST /runs: starts a run on the orchestrator at ``api``; returns its id."""
    response = httpx.post(f"{api}/runs", json=run, timeout=30)
    response.raise_for_status()
    return response.json()["run_id"]


def wait_run(api: str, run_id: str, poll_seconds: float = 2.0) -> dict:
    """GET /runs/{id} until the run has ended; returns its final status."""
    while True:
        status = httpx.get(f"{api}/runs/{run_id}", timeout=30).json()
        if status["state"] in ("completed", "stopped", "failed"):
            return status
        time.sleep(poll_seconds)


def pair_accuracy(rows: list[dict], score) -> float:
    """Share of pairs where ``score(prompt, response)`` ranks chosen above rejected (a tie counts half)."""
    wins = []
    for row in rows:
        chosen, rejected = score(row["prompt"], row["chosen"]), score(row["prompt"], row["rejected"])
        wins.append(1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0)
    return statistics.fmean(wins)


class RealPipeline:
    def __init__(self, config: RealPipelineConfig):
        self.config = config
        self.run_id = config.run_id or time.strftime("real-%Y%m%d-%H%M%S")
        self.root = Path(config.runs_dir).resolve() / self.run_id
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else None
        self.seconds: dict[str, float] = {}
        self.results: dict = {}

    def model(self, path: Path) -> dict:
        return {"path": str(path), "cpu_threads": self.config.cpu_threads}

    def run(self) -> dict:
        started = time.perf_counter()
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.config

        t = common.stage("1/5 set-up: SmolLM2 (converted once), MiniLM, the rated snippets")
        policy = pretrained.smollm2_dir(self.cache_dir)
        encoder = pretrained.minilm_dir()
        snippets = reviews.movie_snippets(self.cache_dir)
        splits = reviews.split_snippets(snippets, config.data.ppo_prompts, config.data.evaluation_prompts, config.seed)
        ppo_prompts = reviews.openings(splits.ppo, config.seed)
        eval_prompts = reviews.openings(splits.evaluation, config.seed)
        print(
            f"{len(snippets)} snippets: {len(splits.reward_model)} for reward-model pairs, {len(ppo_prompts)} PPO "
            f"openings, {len(eval_prompts)} held-out evaluation openings"
        )
        self.seconds["setup"] = time.perf_counter() - t

        t = common.stage("2/5 preference pairs from the ratings; reward model (Bradley-Terry on MiniLM)")
        reward_model = self.reward_model(encoder, splits.reward_model)
        self.seconds["reward_model"] = time.perf_counter() - t

        t = common.stage("3/5 PPO through the services")
        critic = self.critic(policy)
        policies = {"sft": policy, **self.ppo_runs(policy, critic, reward_model, ppo_prompts)}
        self.seconds["ppo"] = time.perf_counter() - t

        t = common.stage(f"4/5 evaluation on {len(eval_prompts)} held-out openings (gold: VADER)")
        ev = config.evaluation
        evaluations = evaluate_policies(
            policies,
            policy,
            reward_model,
            eval_prompts,
            ev.max_new_tokens,
            ev.temperature,
            config.seed + 1,
            ev.examples,
            config.cpu_threads,
            gold=reviews.gold_reward,
        )
        self.seconds["evaluation"] = time.perf_counter() - t

        common.stage("5/5 report")
        self.seconds["total"] = time.perf_counter() - started
        summary = self.summary(evaluations)
        common.write_summary(self.root, summary)
        report.write_report(self.root, summary, reviews.gold_reward)
        return summary

    def reward_model(self, encoder: Path, snippets: list[reviews.Snippet]) -> Path:
        stage = self.config.reward_model
        rows = reviews.preference_pairs(snippets, stage.margin, stage.pairs, self.config.seed)
        data = common.write_jsonl(self.root / "data" / "preferences.jsonl", rows)
        summary = run_reward(
            RewardJobConfig(
                model=self.model(encoder), data=str(data), output_dir=str(self.root / "reward_model"), optim=stage.optim
            )
        )
        self.results["reward_model"] = summary
        # The job's held-out pairs (its seeded split by opening), judged by VADER too: how good the gold judge is
        # at what people said, beside the reward model.
        _, held_out = split(read_groups(data), stage.optim.eval_fraction, stage.optim.seed)
        held_out_rows = [
            {"prompt": group.prompt, "chosen": group.responses[winner], "rejected": group.responses[loser]}
            for group in held_out
            for winner, loser in group.pairs
        ]
        vader = pair_accuracy(held_out_rows, reviews.gold_reward) if held_out_rows else float("nan")
        openings = len({row["prompt"] for row in rows})
        self.results["preferences"] = {
            "pairs": len(rows),
            "openings": openings,
            "margin": stage.margin,
            "gold_pair_accuracy": vader,
            "description": (
                f"{len(rows)} pairs of people-rated snippets that share an opening ({openings} openings), mean "
                f"ratings at least {stage.margin} apart; on the same held-out pairs VADER (the gold judge) is "
                f"right on {vader:.1%}."
            ),
        }
        print(
            f"reward model: held-out pair accuracy {summary['pair_accuracy']:.3f} (before training "
            f"{summary['pair_accuracy_first']:.3f}) on {summary['eval_pairs']} pairs; VADER on the same pairs "
            f"{vader:.3f}"
        )
        return self.root / "reward_model"

    def critic(self, policy: Path) -> dict:
        layers = self.config.ppo.critic_layers
        if layers == 0:
            return {"init": "policy"}
        path = critic_init(policy, layers, self.root / "critic_init")
        return {"init": "policy", "path": str(path)}

    def services(self, policy: Path, critic: dict, reward_model: Path, with_kl: bool) -> dict[str, dict]:
        stage = self.config.ppo
        ppo = json.loads(json.dumps(stage.ppo))
        if not with_kl:
            ppo["kl"] = {**ppo.get("kl", {}), "mode": "fixed", "init_coef": 0.0}
        model = self.model(policy)
        server = {"port": 0, "metrics_port": 0, "grace_seconds": 5}
        trainer = {"server": server, "policy": model, "ppo": ppo, "critic": critic}
        if stage.lora is not None:
            trainer["lora"] = stage.lora
        return {
            "generation": {"server": server, "model": model},
            "reward": {
                "server": server,
                "model": self.model(reward_model),
                "max_length": self.config.reward_model.optim.max_length,  # as the reward model was trained
            },
            "reference": {"server": server, "model": model},
            "trainer": trainer,
        }

    def ppo_runs(self, policy: Path, critic: dict, reward_model: Path, prompts: list[str]) -> dict[str, Path]:
        """PPO with the KL penalty and, if asked, without it: two stacks of services at once. Each stack's loop is
        synchronous (about one busy process at a time, one thread each), so two of them keep two cores busy."""
        stage = self.config.ppo
        dataset = common.write_jsonl(self.root / "data" / "ppo_prompts.jsonl", [{"prompt": p} for p in prompts])

        def request(name: str) -> dict:
            return {
                "dataset": str(dataset),
                "iterations": stage.iterations,
                "prompts_per_iteration": stage.prompts_per_iteration,
                "sampling": {"max_new_tokens": stage.max_new_tokens, "temperature": stage.temperature},
                "runs_dir": str(self.root),
                "run_id": name,
                "seed": self.config.seed,
                "checkpoint_at_end": True,
                "record_rollouts": True,
            }

        statuses = {}
        with contextlib.ExitStack() as stack:
            background = None
            if stage.without_kl:  # started first and followed quietly; the run with the penalty is shown
                launcher = stack.enter_context(Launcher(self.root / "processes" / "ppo_no_kl"))
                _, api = start_stack(
                    launcher, self.services(policy, critic, reward_model, with_kl=False), root=self.root
                )
                background = (api, start_run(api, request("ppo_no_kl")))
            launcher = stack.enter_context(Launcher(self.root / "processes" / "ppo"))
            _, api = start_stack(launcher, self.services(policy, critic, reward_model, with_kl=True), root=self.root)
            statuses["ppo"] = follow_run(api, request("ppo"))
            if background is not None:
                print("waiting for ppo_no_kl (beta = 0), which ran alongside", flush=True)
                statuses["ppo_no_kl"] = wait_run(*background)
        for name, status in statuses.items():
            if status["state"] != "completed":
                raise RuntimeError(f"PPO run {name} ended {status['state']}: {status.get('error')}")
            summary = self.results[name] = status["summary"]
            print(
                f"{name}: proxy reward {summary['reward_mean_first']:.3f} -> {summary['reward_mean_last']:.3f}, "
                f"KL last {summary['kl_last']:.2f} nats/seq, {summary['seconds_per_iteration']:.1f} s per iteration"
            )
        return {name: Path(status["summary"]["checkpoint"]) / "policy" for name, status in statuses.items()}

    def summary(self, evaluations) -> dict:
        definitions = {
            "gold_reward": "VADER compound score of opening + continuation, in [-1, 1]",
            "kl_to_sft": common.DEFINITIONS["kl_to_sft"] + "; sft = SmolLM2-135M-Instruct, the starting policy",
        }
        return common.summary(self.run_id, TASK, self.results, self.seconds, evaluations, self.config, definitions)


def run_real_pipeline(config: RealPipelineConfig) -> dict:
    return RealPipeline(config).run()
