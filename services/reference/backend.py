"""The frozen reference model behind a small interface: log-probs of response tokens."""

from __future__ import annotations

import torch

from services.reference.config import ReferenceConfig
from shared.errors import TooLarge
from shared.modeling import load_causal_lm
from shared.sequences import response_logprobs
from shared.validation import check_batch_size, check_same_rows, check_temperature, check_token_rows


def check_request(
    config: ReferenceConfig,
    vocab_size: int,
    prompt_ids: list[torch.Tensor],
    response_ids: list[torch.Tensor],
    temperature: float,
) -> None:
    """The checks of a LogProbs request every backend makes (InvalidInput/TooLarge naming the field)."""
    check_temperature(temperature, "temperature")
    check_batch_size(len(prompt_ids), "prompt_ids", config.max_batch)
    check_same_rows(prompt_ids, response_ids, "prompt_ids", "response_ids")
    check_token_rows(prompt_ids, "prompt_ids", vocab_size)
    check_token_rows(response_ids, "response_ids", vocab_size)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        if p.numel() + r.numel() > config.max_tokens_per_sample:
            raise TooLarge(
                f"response_ids[{i}]",
                f"prompt + response is {p.numel() + r.numel()} tokens, over the limit of "
                f"{config.max_tokens_per_sample}",
            )


class ReferenceBackend:
    def __init__(self, config: ReferenceConfig):
        self.config = config
        self.model = load_causal_lm(config.model).eval()
        self.model.requires_grad_(False)
        self.device = self.model.device
        self.vocab_size = int(self.model.get_input_embeddings().num_embeddings)
        pad = self.model.config.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.model.config.eos_token_id or 0)

    def validate(
        self, prompt_ids: list[torch.Tensor], response_ids: list[torch.Tensor], temperature: float = 1.0
    ) -> None:
        check_request(self.config, self.vocab_size, prompt_ids, response_ids, temperature)

    def logprobs(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], temperature: float = 1.0) -> list[torch.Tensor]:
        """log pi_ref of each response token under softmax(logits / temperature); ``pairs`` are (prompt_ids,
        response_ids). Runs on the model thread."""
        prompts = [p for p, _ in pairs]
        responses = [r for _, r in pairs]
        return response_logprobs(
            self.model, prompts, responses, self.pad_token_id, self.config.micro_batch_size, temperature
        )

    def warm_up(self) -> None:
        token = torch.tensor([self.pad_token_id], dtype=torch.int64)
        self.logprobs([(token, token)])
