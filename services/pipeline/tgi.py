"""Candidates for preference labelling from any text-generation-inference server (``preferences.source: tgi``),
behind the orchestrator's ``GenerationClient`` interface so that the pipeline samples the same way from either."""

from __future__ import annotations

import asyncio

from services.orchestrator.clients import Rollouts, WeightSync
from services.orchestrator.dataset import Prompt
from shared.auth import ClientAuth
from shared.errors import Conflict, InvalidInput
from shared.tgi import TgiConfig, call_tgi, tgi_client
from shared.types import SamplingParams


class TgiGeneration:
    """A ``GenerationClient`` (``services.orchestrator.clients``) that samples from a TGI server, one request per
    sample (the server batches concurrent ones). It only samples: the server's weights are not this project's to
    sync, and its rollouts carry texts, lengths and finish reasons but no token ids (``tokens`` is None).

    With a seed, sample j of prompt i is asked for with seed (seed + i) * samples_per_prompt + j: reproducible for
    the same server and model, and, as with the generation service, a batch split into shares seeded seed + offset
    asks for the same samples."""

    def __init__(self, config: TgiConfig, auth: ClientAuth):
        self.config = config
        self.client = tgi_client(config, auth)

    async def generate(self, prompts: list[Prompt], params: SamplingParams, wait_s: float | None = None) -> Rollouts:
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise InvalidInput(f"prompts[{i}]", "a TGI server takes text: render a conversation before sending it")
        k = params.samples_per_prompt
        slots = asyncio.Semaphore(self.config.max_concurrent_requests)

        async def one(i: int, j: int):
            sampling = params.temperature > 0
            seed = (params.seed + i) * k + j if sampling and params.seed is not None else None
            request = self.client.generate(
                prompts[i],
                do_sample=sampling,
                max_new_tokens=params.max_new_tokens,
                temperature=params.temperature if sampling else None,
                top_k=params.top_k or None,
                top_p=params.top_p if params.top_p < 1.0 else None,
                seed=seed,
            )
            async with slots:
                return await call_tgi(request, self.config, f"prompts[{i}]")

        replies = await asyncio.gather(*(one(i, j) for i in range(len(prompts)) for j in range(k)))
        return Rollouts(
            prompts=[prompt for prompt in prompts for _ in range(k)],
            texts=[reply.generated_text for reply in replies],
            response_lengths=[reply.details.generated_tokens for reply in replies],
            finish_reasons=["eos" if reply.details.finish_reason == "eos_token" else "length" for reply in replies],
            policy_version=0,
            tokens=None,
            temperature=params.logprob_temperature,
        )

    async def sync_weights(self, version: int, epoch: int = 0) -> WeightSync:
        raise Conflict(f"the TGI server at {self.config.url} serves its own weights: this project cannot sync them")

    async def close(self) -> None:
        """Nothing held between calls (the client opens a session per request)."""
