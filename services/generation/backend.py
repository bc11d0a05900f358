"""The policy copy being sampled from, behind a small interface: generate, and swap in new weights.

Every call runs on the service's single model thread, so a weight swap can only happen between two batches:
no batch ever sees half-updated weights.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig as HFGenerationConfig

from services.generation.config import GenerationConfig
from shared.errors import InvalidInput, TooLarge
from shared.modeling import load_causal_lm, load_tokenizer
from shared.rl_math import logprobs_from_logits
from shared.types import FinishReason, Sample, SamplingParams
from shared.validation import check_batch_size, check_token_rows


class GenerationBackend:
    def __init__(self, config: GenerationConfig):
        self.config = config
        self.tokenizer = load_tokenizer(config.model, padding_side="left")
        self.model = load_causal_lm(config.model).eval()
        self.model.requires_grad_(False)
        self.device = next(self.model.parameters()).device
        self.vocab_size = int(self.model.get_input_embeddings().num_embeddings)
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self.version = 0

    # -- requests -------------------------------------------------------------------------------------------------

    def validate(self, prompts: list[torch.Tensor], params: SamplingParams) -> None:
        if params.samples_per_prompt < 1:
            raise InvalidInput("sampling.samples_per_prompt", f"must be >= 1, got {params.samples_per_prompt}")
        if params.samples_per_prompt > self.config.max_samples_per_prompt:
            raise TooLarge(
                "sampling.samples_per_prompt",
                f"{params.samples_per_prompt} exceeds the limit of {self.config.max_samples_per_prompt}",
            )
        check_batch_size(len(prompts), "prompts", self.config.max_samples)
        if len(prompts) * params.samples_per_prompt > self.config.max_samples:
            raise TooLarge(
                "sampling.samples_per_prompt",
                f"{len(prompts)} prompts x {params.samples_per_prompt} samples exceeds {self.config.max_samples}",
            )
        if params.max_new_tokens < 1:
            raise InvalidInput("sampling.max_new_tokens", f"must be >= 1, got {params.max_new_tokens}")
        if params.max_new_tokens > self.config.max_new_tokens_limit:
            raise TooLarge(
                "sampling.max_new_tokens",
                f"{params.max_new_tokens} exceeds the limit of {self.config.max_new_tokens_limit}",
            )
        if not (params.temperature >= 0 and params.temperature < float("inf")):
            raise InvalidInput("sampling.temperature", f"must be finite and >= 0, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise InvalidInput("sampling.top_p", f"must be in (0, 1], got {params.top_p}")
        if params.top_k < 0:
            raise InvalidInput("sampling.top_k", f"must be >= 0, got {params.top_k}")
        check_token_rows(prompts, "prompt_ids", self.vocab_size)
        for i, prompt in enumerate(prompts):
            if prompt.numel() > self.config.max_prompt_tokens:
                raise TooLarge(
                    f"prompt_ids[{i}]",
                    f"{prompt.numel()} tokens exceeds the limit of {self.config.max_prompt_tokens}",
                )

    def tokenize(self, texts: list[str]) -> list[torch.Tensor]:
        for i, text in enumerate(texts):
            if not text:
                raise InvalidInput(f"prompts[{i}]", "is empty")
        encoded = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        return [torch.tensor(ids, dtype=torch.int64) for ids in encoded]

    def generate(self, prompts: list[torch.Tensor], params: SamplingParams) -> list[Sample]:
        """Samples ``params.samples_per_prompt`` responses per prompt, prompt-major. Runs on the model thread."""
        if params.seed is not None:
            torch.manual_seed(params.seed)
        expanded = [(i, p) for i, p in enumerate(prompts) for _ in range(params.samples_per_prompt)]
        samples: list[Sample] = []
        for start in range(0, len(expanded), self.config.micro_batch_size):
            samples.extend(self._generate_batch(expanded[start : start + self.config.micro_batch_size], params))
        return samples

    def _generate_batch(self, items: list[tuple[int, torch.Tensor]], params: SamplingParams) -> list[Sample]:
        width = max(int(p.numel()) for _, p in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(items), width), dtype=torch.int64)
        for row, (_, prompt) in enumerate(items):  # left padding: every prompt ends where generation starts
            input_ids[row, width - prompt.numel() :] = prompt
            attention_mask[row, width - prompt.numel() :] = 1
        sampling = params.temperature > 0
        generation_config = HFGenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=sampling,
            temperature=params.temperature if sampling else 1.0,
            top_p=params.top_p if sampling else 1.0,
            top_k=params.top_k if sampling else 0,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            return_dict_in_generate=True,
            output_logits=True,  # the raw logits: log-probs under the policy itself, before temperature/top-p/top-k
        )
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=generation_config,
        )
        generated = output.sequences[:, width:].cpu()  # (B, N)
        logits = torch.stack(output.logits, dim=1)  # (B, N, V)
        logprobs = logprobs_from_logits(logits, generated.to(logits.device)).cpu()  # (B, N) float32
        samples = []
        for row, (prompt_index, prompt) in enumerate(items):
            tokens = generated[row]
            eos = (tokens == self.eos_token_id).nonzero()
            if eos.numel():
                length, finish = int(eos[0, 0]) + 1, FinishReason.EOS
            else:
                length, finish = int(tokens.numel()), FinishReason.LENGTH
            response = tokens[:length].clone()
            samples.append(
                Sample(
                    prompt_index=prompt_index,
                    prompt_ids=prompt.clone(),
                    response_ids=response,
                    response_logprobs=logprobs[row, :length].clone(),
                    text=self.tokenizer.decode(response, skip_special_tokens=True),
                    finish_reason=finish,
                    policy_version=self.version,
                )
            )
        return samples

    # -- weights --------------------------------------------------------------------------------------------------

    def state_shapes(self) -> dict[str, torch.Tensor]:
        """The model's state dict (the names and shapes an update must match)."""
        return self.model.state_dict()

    def swap_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Loads a complete state dict and sets the version. Runs on the model thread, between batches."""
        with torch.no_grad():
            self.model.load_state_dict(state, strict=True)
        self.version = version

    def warm_up(self) -> None:
        self.generate([torch.tensor([self.eos_token_id])], SamplingParams(max_new_tokens=2, seed=0))
