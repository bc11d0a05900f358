"""``rlhf pipeline --config FILE``: the whole RLHF pipeline on one machine.

pretrain (tiny, built in) -> SFT on demonstrations -> sample candidates through the generation service -> label
them (simulated labeler driven by the hidden gold reward) -> train the reward model -> PPO through the four
services and the orchestrator (and, if asked, once more without the KL penalty) -> DPO from the same preferences
-> evaluate base, SFT, PPO and DPO on held-out prompts -> runs/<run-id>/report.md and summary.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path

from services.labeling.labelers import Comparison, SimulatedLabeler, preference_rows
from services.launcher import Launcher, follow_run, start_stack
from services.orchestrator.clients import GenerationClient, GrpcGeneration
from services.orchestrator.config import PeersConfig, RpcConfig
from services.pipeline import common, report, task
from services.pipeline.config import CandidateSource, PipelineConfig
from services.pipeline.evaluate import evaluate_policies
from services.pipeline.tgi import TgiGeneration
from services.training.dpo import DPOJobConfig, run_dpo
from services.training.reward import RewardJobConfig, run_reward
from services.training.sft import SFTJobConfig, run_sft
from shared.auth import ClientAuth
from shared.tiny_models import build_policy, pretrain
from shared.types import SamplingParams

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(self, config: PipelineConfig):
        self.config = config
        self.run_id = config.run_id or time.strftime("pipeline-%Y%m%d-%H%M%S")
        self.root = Path(config.runs_dir).resolve() / self.run_id
        self.seconds: dict[str, float] = {}
        self.results: dict = {}

    def model(self, path: Path) -> dict:
        return {"path": str(path), "cpu_threads": self.config.cpu_threads}

    def run(self) -> dict:
        started = time.perf_counter()
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.config
        train_prompts, eval_prompts = task.prompt_splits(config.evaluation.prompts, config.seed)

        t = common.stage("1/7 base model")
        base = self.base_model()
        self.seconds["base"] = time.perf_counter() - t

        t = common.stage("2/7 supervised fine-tuning on demonstrations")
        sft_data = common.write_jsonl(
            self.root / "data" / "sft.jsonl", task.demonstrations(config.sft.demonstrations, config.seed)
        )
        self.results["sft"] = run_sft(
            SFTJobConfig(
                model=self.model(base), data=str(sft_data), output_dir=str(self.root / "sft"), optim=config.sft.optim
            )
        )
        sft = self.root / "sft"
        self.seconds["sft"] = time.perf_counter() - t

        t = common.stage("3/7 candidates from the SFT model (generation service) and simulated labels")
        preferences = self.collect_preferences(sft, train_prompts)
        self.seconds["preferences"] = time.perf_counter() - t

        t = common.stage("4/7 reward model (Bradley-Terry)")
        self.results["reward_model"] = run_reward(
            RewardJobConfig(
                model=self.model(sft),
                data=str(preferences),
                output_dir=str(self.root / "reward_model"),
                optim=config.reward_model.optim,
            )
        )
        reward_model = self.root / "reward_model"
        self.seconds["reward_model"] = time.perf_counter() - t

        t = common.stage("5/7 PPO through the services")
        policies = {"base": base, "sft": sft}
        policies["ppo"] = self.ppo(sft, sft, reward_model, train_prompts, "ppo", with_kl=True)
        if config.ppo.without_kl:
            policies["ppo_no_kl"] = self.ppo(sft, sft, reward_model, train_prompts, "ppo_no_kl", with_kl=False)
        self.seconds["ppo"] = time.perf_counter() - t

        t = common.stage("6/7 DPO from the same preferences")
        self.results["dpo"] = run_dpo(
            DPOJobConfig(
                model=self.model(sft),
                reference=self.model(sft),
                data=str(preferences),
                output_dir=str(self.root / "dpo"),
                beta=config.dpo.beta,
                nll_coef=config.dpo.nll_coef,
                optim=config.dpo.optim,
            )
        )
        policies["dpo"] = self.root / "dpo"
        self.seconds["dpo"] = time.perf_counter() - t

        t = common.stage(f"7/7 evaluation on {len(eval_prompts)} held-out prompts")
        ev = config.evaluation
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
        self.seconds["evaluation"] = time.perf_counter() - t
        self.seconds["total"] = time.perf_counter() - started

        summary = self.summary(evaluations)
        common.write_summary(self.root, summary)
        report.write_report(self.root, summary)
        return summary

    def base_model(self) -> Path:
        if self.config.pretrain.base_model:
            return Path(self.config.pretrain.base_model)
        base = self.root / "base"
        build_policy(base, seed=self.config.seed)
        if self.config.pretrain.steps:
            losses = pretrain(base, steps=self.config.pretrain.steps, seed=self.config.seed)
            self.results["pretrain"] = losses
            print(f"pretraining: loss {losses['loss_first']:.2f} -> {losses['loss_last']:.2f} nats/token")
        return base

    def collect_preferences(self, sft: Path, train_prompts: list[str]) -> Path:
        stage = self.config.preferences
        prompts = train_prompts[: stage.prompts]
        texts_all = self.sample_candidates(sft, prompts)
        labeler = SimulatedLabeler(task.gold_reward, seed=self.config.seed, temperature=stage.labeler_temperature)
        comparisons = all_pairs(prompts, texts_all, stage.samples_per_prompt)
        rows = preference_rows(comparisons, labeler.choose(comparisons))
        differences = [
            task.gold_reward(r["prompt"], r["chosen"]) - task.gold_reward(r["prompt"], r["rejected"]) for r in rows
        ]
        decided = [d for d in differences if d != 0]
        agree = sum(d > 0 for d in decided) / max(1, len(decided))
        self.results["preferences"] = {
            "prompts": len(prompts),
            "pairs": len(rows),
            "gold_ties": len(differences) - len(decided),
            "gold_agreement": agree,
        }
        print(
            f"{len(rows)} labelled pairs from {len(prompts)} prompts; where the gold reward differs, the labels "
            f"agree with it on {agree:.1%} (the simulated labeler is noisy by design)"
        )
        return common.write_jsonl(self.root / "data" / "preferences.jsonl", rows)

    def sample_candidates(
        self, policy: Path, prompts: list[str], name: str = "preferences", seed: int = 0
    ) -> list[str]:
        """``samples_per_prompt`` candidates per prompt, prompt-major: from a generation service started on
        ``policy``, or from the TGI server of ``preferences.tgi``. ``seed`` is added to the run's seed (a round of
        ``rlhf iterate`` samples with its own)."""
        stage = self.config.preferences
        with contextlib.ExitStack() as stack:
            if stage.source is CandidateSource.TGI:

                def client() -> GenerationClient:
                    return TgiGeneration(stage.tgi, ClientAuth.load(stage.auth))
            else:
                launcher = stack.enter_context(Launcher(self.root / "processes" / name))
                generation = launcher.start(
                    "generation", ["serve", "generation"], {"server": {"port": 0}, "model": self.model(policy)}
                )
                generation.wait_ready(180)

                def client() -> GenerationClient:
                    return GrpcGeneration(PeersConfig(generation=[generation.address]), RpcConfig())

            async def sample():
                # Channels belong to the event loop they are made in: create the client inside it.
                generation_client = client()
                try:
                    texts = []
                    for start in range(0, len(prompts), 128):  # requests under the service's batch limit
                        params = SamplingParams(
                            max_new_tokens=stage.max_new_tokens,
                            temperature=stage.temperature,
                            seed=self.config.seed + seed + start,
                            samples_per_prompt=stage.samples_per_prompt,
                        )
                        texts.extend((await generation_client.generate(prompts[start : start + 128], params)).texts)
                    return texts
                finally:
                    await generation_client.close()

            return asyncio.run(sample())

    def ppo(
        self,
        policy: Path,
        reference: Path,
        reward_model: Path,
        train_prompts: list[str],
        name: str,
        with_kl: bool,
        seed: int = 0,
    ) -> Path:
        """PPO through the four services and the orchestrator, from ``policy`` with the KL penalty to
        ``reference``; returns the final policy's checkpoint. ``seed`` is added to the run's seed."""
        stage = self.config.ppo
        ppo = json.loads(json.dumps(stage.ppo))
        if not with_kl:
            ppo["kl"] = {**ppo.get("kl", {}), "mode": "fixed", "init_coef": 0.0}
        model = self.model(policy)
        server = {"port": 0, "metrics_port": 0, "grace_seconds": 5}
        services = {
            "generation": {"server": server, "model": model},
            "reward": {"server": server, "model": self.model(reward_model)},
            "reference": {"server": server, "model": self.model(reference)},
            "trainer": {
                "server": server,
                "policy": model,
                "ppo": ppo,
                "critic": {"init": "reward_model", "path": str(reward_model)},
            },
        }
        prompts_file = "ppo_prompts.jsonl" if name in ("ppo", "ppo_no_kl") else f"{name}_prompts.jsonl"
        dataset = common.write_jsonl(self.root / "data" / prompts_file, [{"prompt": p} for p in train_prompts])
        with Launcher(self.root / "processes" / name) as launcher:
            _, api = start_stack(launcher, services, root=self.root)
            status = follow_run(
                api,
                {
                    "dataset": str(dataset),
                    "iterations": stage.iterations,
                    "prompts_per_iteration": stage.prompts_per_iteration,
                    "sampling": {"max_new_tokens": stage.max_new_tokens},
                    "runs_dir": str(self.root),
                    "run_id": name,
                    "seed": self.config.seed + seed,
                    "checkpoint_at_end": True,
                    "record_rollouts": True,
                },
            )
        if status["state"] != "completed":
            raise RuntimeError(f"PPO run {name} ended {status['state']}: {status.get('error')}")
        self.results[name] = status["summary"]
        return Path(status["summary"]["checkpoint"]) / "policy"

    def summary(self, evaluations) -> dict:
        task_text = "sentence continuation scored by a hidden gold reward (services/pipeline/task.py)"
        return common.summary(self.run_id, task_text, self.results, self.seconds, evaluations, self.config)


def all_pairs(prompts: list[str], texts: list[str], samples_per_prompt: int) -> list[Comparison]:
    """Every pair of each prompt's K candidates (``texts`` prompt-major), identical texts left out."""
    k = samples_per_prompt
    comparisons = []
    for i, prompt in enumerate(prompts):
        group = texts[i * k : (i + 1) * k]
        comparisons.extend(
            Comparison(prompt, group[a], group[b]) for a in range(k) for b in range(a + 1, k) if group[a] != group[b]
        )
    return comparisons


def run_pipeline(config: PipelineConfig) -> dict:
    return Pipeline(config).run()
