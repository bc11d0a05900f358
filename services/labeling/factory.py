"""Which labeller labels a round: one ``LabelerConfig`` (kind: an enum) -> one ``Labeler`` (the protocol in
labelers.py), opened and closed around the round so that its clients live on the round's event loop.

An AI judge talks to a service: a reward service (``judge.kind: reward``) or a generation service's TGI routes (the
LLM judges). Give its address in the judge's section, or set ``judge_service`` and the round starts one on loopback
on that model (or reward function) and stops it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import Field, model_validator

from services.labeling.human import HumanLabelerConfig, open_human_labeler
from services.labeling.labelers import Labeler, SimulatedLabeler
from services.labeling.rlaif import JudgeConfig, JudgeKind, build_judge
from shared.auth import AuthConfig, ClientAuth
from shared.config import StrictModel


class LabelerKind(enum.StrEnum):
    SIMULATED = "simulated"  # a noisy person driven by the built-in task's hidden gold reward
    HUMAN = "human"  # people in the labelling app (services/labeling/app.py): a round waits for their labels
    JUDGE = "judge"  # AI feedback: a reward model or an LLM judges (services/labeling/rlaif.py)


class JudgeService(StrictModel):
    """A service started for the judge on loopback, for the round: a reward service for ``judge.kind: reward``, a
    generation service with its TGI routes for the LLM judges."""

    model: str = Field("", description="the judge's model directory (a reward model, or a causal LM)")
    function: str = Field("", description="reward judge: a reward function 'module:callable' instead of a model")
    cpu_threads: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _one_source(self):
        if bool(self.model) == bool(self.function):
            raise ValueError("give exactly one of model and function")
        return self


class LabelerConfig(StrictModel):
    """Who labels each round's comparisons."""

    kind: LabelerKind = LabelerKind.SIMULATED
    temperature: float = Field(1.0, gt=0, description="simulated: noise, P(a) = sigmoid((gold_a - gold_b) / T)")
    judge: JudgeConfig | None = Field(None, description="kind judge: which judge, and its settings")
    judge_service: JudgeService | None = Field(
        None, description="kind judge: start the judge's service for each round (else the judge's address is used)"
    )
    human: HumanLabelerConfig = Field(
        default_factory=HumanLabelerConfig, description="kind human: where the labelling app keeps its tasks"
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="tokens and TLS to reach the judge's service")

    @model_validator(mode="after")
    def _sections(self):
        if self.kind is LabelerKind.JUDGE and self.judge is None:
            raise ValueError("judge: required when kind is judge")
        service, judge = self.judge_service, self.judge
        if service is not None and judge is not None and service.function and judge.kind is not JudgeKind.REWARD:
            raise ValueError("judge_service.function: only a reward judge can use a reward function")
        return self


@contextlib.asynccontextmanager
async def open_labeler(config: LabelerConfig, seed: int, batch: str, root: Path) -> AsyncIterator[Labeler]:
    """The configured labeller for one batch of comparisons (``batch`` names it in the labelling app's store;
    ``root`` is where a judge service's process files go)."""
    if config.kind is LabelerKind.SIMULATED:
        from services.pipeline.task import gold_reward

        yield SimulatedLabeler(gold_reward, seed=seed + hash_batch(batch), temperature=config.temperature)
    elif config.kind is LabelerKind.HUMAN:
        async with open_human_labeler(config.human, batch=batch, runs_dir=root) as labeler:
            yield labeler
    else:
        async with _judge_service(config, root / "processes" / f"{batch}-judge") as judge_config:
            judge = build_judge(judge_config, ClientAuth.load(config.auth))
            try:
                yield judge
            finally:
                await judge.close()


@contextlib.asynccontextmanager
async def _judge_service(config: LabelerConfig, work_dir: Path) -> AsyncIterator[JudgeConfig]:
    """The judge's config, pointed at a service started here when ``judge_service`` asks for one."""
    judge, service = config.judge, config.judge_service
    if service is None:
        yield judge
        return
    from services.launcher import Launcher

    model = {"path": service.model, "cpu_threads": service.cpu_threads} if service.model else None
    with Launcher(work_dir) as launcher:
        if judge.kind is JudgeKind.REWARD:
            settings = {"server": {"port": 0}, **({"model": model} if model else {"function": service.function})}
            process = launcher.start("judge-reward", ["serve", "reward"], settings)
            await asyncio.to_thread(process.wait_ready, 180)
            yield judge.model_copy(update={"reward": judge.reward.model_copy(update={"address": process.address})})
        else:
            settings = {"server": {"port": 0, "http_port": 0}, "model": model}
            process = launcher.start("judge-generation", ["serve", "generation"], settings)
            info = await asyncio.to_thread(process.wait_ready, 180)
            section = judge.kind.value  # "llm" or "constitutional"
            llm = getattr(judge, section)
            url = f"http://127.0.0.1:{info['http_port']}"
            yield judge.model_copy(
                update={section: llm.model_copy(update={"tgi": llm.tgi.model_copy(update={"url": url})})}
            )


def hash_batch(batch: str) -> int:
    """A stable integer from a batch name (Python's ``hash`` of a str changes between processes)."""
    return int.from_bytes(hashlib.blake2b(batch.encode(), digest_size=4).digest(), "big")
