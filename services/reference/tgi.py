"""Reference log-probs from a text-generation-inference server (``backend: tgi``): no model is loaded here.

TGI reads text, not token ids. Each sample's ids are decoded (special tokens kept, e.g. a response's EOS) and sent
with ``decoder_input_details``, ``max_new_tokens`` 1: the prefill details hold every input token with log
softmax(logits) of it given the ones before, and the last R of them are the response's. TGI adds what its tokenizer
puts before a text (BOS for Llama's), so that is left off before decoding. Two checks keep values and tokens
aligned: a request whose ids do not come back from decoding then tokenizing (ids that are not the tokenizer's own
encoding of their text) is refused naming the sample, and a server that tokenizes the text into other ids (another
tokenizer than ``model.path``'s) is an error, never silently misaligned log-probs.

TGI's prefill log-probs are of the raw logits: temperature 1 only.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from services.reference.backend import check_request
from services.reference.config import ReferenceConfig
from shared.auth import ClientAuth
from shared.errors import Conflict, InvalidInput, NotReady
from shared.modeling import load_tokenizer
from shared.tgi import call_tgi, tgi_client

log = logging.getLogger(__name__)


class TgiReferenceBackend:
    def __init__(self, config: ReferenceConfig):
        self.config = config
        self.tokenizer = load_tokenizer(config.model, padding_side="right")
        self.vocab_size = len(self.tokenizer)
        self.device = "cpu"  # what this process holds: a tokenizer
        self.client_auth = ClientAuth.load(config.auth)
        self.added = self.tokenizer("")["input_ids"]  # what tokenizing a text puts before it

    def _text(self, ids: list[int]) -> tuple[str, list[int]]:
        """The text to send for ``ids``, and the ids a server with this tokenizer reads from it."""
        body = ids[len(self.added) :] if ids[: len(self.added)] == self.added else ids
        return self.tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False), [
            *self.added,
            *body,
        ]

    def validate(
        self, prompt_ids: list[torch.Tensor], response_ids: list[torch.Tensor], temperature: float = 1.0
    ) -> None:
        check_request(self.config, self.vocab_size, prompt_ids, response_ids, temperature)
        if temperature != 1.0:
            raise InvalidInput(
                "temperature",
                f"the tgi backend gives log-probs at temperature 1 only (TGI's prefill), got {temperature}",
            )
        for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
            text, read = self._text(torch.cat([prompt, response]).tolist())
            if self.tokenizer(text)["input_ids"] != read:
                raise InvalidInput(
                    f"response_ids[{i}]",
                    "prompt + response do not come back from decoding to text and tokenizing again (not the "
                    "tokenizer's own encoding of their text): TGI reads text, its log-probs would be of other tokens",
                )

    def logprobs(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], temperature: float = 1.0) -> list[torch.Tensor]:
        """log pi_ref of each response token (temperature 1); ``pairs`` are (prompt_ids, response_ids). Runs on the
        model thread: every pair's request at once, up to ``tgi.max_concurrent_requests`` (TGI batches them)."""
        return asyncio.run(self._logprobs(pairs))

    async def _logprobs(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        config = self.config.tgi
        client = tgi_client(config, self.client_auth)
        slots = asyncio.Semaphore(config.max_concurrent_requests)

        async def one(prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
            text, read = self._text(torch.cat([prompt, response]).tolist())
            async with slots:
                reply = await call_tgi(
                    client.generate(text, max_new_tokens=1, decoder_input_details=True), config, "response_ids"
                )
            prefill = reply.details.prefill
            if [token.id for token in prefill] != read:
                raise Conflict(
                    f"the TGI server at {config.url} reads other tokens than model.path's tokenizer from the same "
                    f"text ({len(prefill)} ids, expected {len(read)}): it serves another tokenizer"
                )
            return torch.tensor([token.logprob for token in prefill[len(prefill) - response.numel() :]])

        return list(await asyncio.gather(*(one(prompt, response) for prompt, response in pairs)))

    def warm_up(self) -> None:
        """One request, which also checks that the server reads this tokenizer's tokens; a server not up yet is
        only logged (requests get UNAVAILABLE until it is)."""
        ids = torch.tensor(self.tokenizer("the reference is warming up")["input_ids"], dtype=torch.int64)
        try:
            self.logprobs([(ids[:-1], ids[-1:])])
        except NotReady as exc:
            log.warning("TGI server not reachable yet: %s", exc)
