"""The policy copy being sampled from, behind a small interface: generate, and swap in new weights.

Every call runs on the service's single model thread, so a weight swap can only happen between two batches:
no batch ever sees half-updated weights.

Sampling is exactly what the caller asked for: the model's own ``generation_config.json`` (instruct models ship
one with ``temperature``, ``top_p``, ``do_sample``, repetition penalties) is never merged into a request.

Sampling is reproducible per sample, not per batch: with a seed, sample j of prompt i (0-based within the request)
depends only on (seed + i, j), the prompt and the weights. Which other prompts share the request or the micro-batch,
and ``micro_batch_size``, do not matter, so splitting a batch into shares seeded seed + offset (as the orchestrator
does, re-sending a share to another replica when one dies) gives the same samples. Each sample draws its noise from
its own random stream (``sample_stream_seed``) and the token is picked by the Gumbel-max trick (``SeededSampler``).
Up to the float non-associativity of the forward pass: a row padded to another width may get logits that differ in
the last bits (on CPU float32 the tokens are in practice identical).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers import GenerationConfig as HFGenerationConfig

from services.generation.config import GenerationConfig
from shared.chat import Conversation, render_prompt_ids
from shared.errors import InvalidInput, TooLarge
from shared.lora import adapter_state, config_from_json, load_adapter_state, wrap
from shared.modeling import load_causal_lm, load_tokenizer
from shared.sequences import response_logprobs
from shared.types import FinishReason, Sample, SamplingParams
from shared.validation import check_batch_size, check_token_rows
from shared.weights import WeightAssembler, load_unique_state, tied_aliases, unique_state

log = logging.getLogger(__name__)

# Keys of a generation_config.json that change what is sampled; a request's SamplingParams decide them instead.
_SAMPLING_KEYS = (
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "encoder_repetition_penalty",
    "length_penalty",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "min_length",
    "min_new_tokens",
)


class ChosenTokenLogprobs(LogitsProcessor):
    """Records log softmax(logits / T) of every sampled token while ``generate`` runs, one step behind.

    ``generate`` calls its processors with the logits of step t before sampling; the token sampled at step t
    shows up as the last input id at step t + 1 (and the last one in the output sequences). It comes first in the
    processor list, before ``SeededSampler`` (temperature, top-k, top-p, noise), and the generation config adds
    none of its own, so it sees the model's raw logits. Only one (B, V) float32 row of log-probs is
    alive at a time: no (B, N, V) stack of every step's logits.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self._previous: torch.Tensor | None = None  # (B, V) log-probs of the last step
        self._chosen: list[torch.Tensor] = []  # N x (B,)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._previous is not None:
            self._chosen.append(self._previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self._previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """(B, N) float32 log-probs of ``generated`` (B, N), the tokens ``generate`` returned."""
        if self._previous is not None and generated.shape[1] > len(self._chosen):
            self._chosen.append(self._previous.gather(1, generated[:, -1:].to(self._previous.device)).squeeze(1))
        self._previous = None
        if len(self._chosen) != generated.shape[1]:
            raise RuntimeError(f"recorded {len(self._chosen)} log-probs for {generated.shape[1]} generated tokens")
        return torch.stack(self._chosen, dim=1)

    def latest(self, row: int, token_id: int) -> float:
        """log softmax(logits / T) of ``token_id`` at the step just sampled, before ``finish``."""
        return float(self._previous[row, token_id])


# on_token(token_id, logprob) -> stop: told of each token as it is sampled; True ends the generation after it.
OnToken = Callable[[int, float], bool]


class TokenCallback(StoppingCriteria):
    """Hands each new token of a one-sequence batch and its log-prob to ``on_token`` as soon as it is sampled
    (streaming, stop sequences); ``on_token`` returning True ends the generation after that token.

    A stopping criterion because ``generate`` asks those once per step, right after appending the new token and
    before the next forward pass; the recorder still holds that step's log-probs then."""

    def __init__(self, recorder: ChosenTokenLogprobs, on_token: OnToken):
        self.recorder = recorder
        self.on_token = on_token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        token_id = int(input_ids[0, -1])
        stop = bool(self.on_token(token_id, self.recorder.latest(0, token_id)))
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def sample_stream_seed(prompt_seed: int, sample_index: int) -> int:
    """The 64-bit seed of one sample's random stream: the first 8 bytes (little-endian) of
    blake2b(u64le(prompt_seed mod 2^64) || u64le(sample_index)), where prompt_seed = request seed + prompt index.

    A hash rather than a sum, so that the streams of (s, j) and (s + 1, j - 1) are unrelated."""
    message = (prompt_seed % 2**64).to_bytes(8, "little") + sample_index.to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(message, digest_size=8).digest(), "little")


class SeededSampler(LogitsProcessor):
    """Samples each row from softmax of its warped scores, with noise from that row's own random stream.

    Warps the scores as transformers' sampling would (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
    ``TopPLogitsWarper``, each only when active), then returns s - log E with E ~ Exponential(1) per entry:
    ``generate`` runs greedy, and argmax_v (s_v - log E_v) = argmin_v E_v / exp(s_v) is an exact draw from
    softmax(s) (the race of exponentials with rates exp(s_v): the Gumbel-max trick, -log E being Gumbel). Entries
    filtered out by top-k/top-p stay -inf. Each step draws the next V values of every row's generator, so what a row
    samples never depends on the other rows. One (B, V) float32 noise tensor per step.
    """

    def __init__(self, stream_seeds: list[int], temperature: float, top_k: int, top_p: float):
        self.stream_seeds = stream_seeds  # one per row of the batch
        self.warpers = LogitsProcessorList()
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self._generators: list[torch.Generator] | None = None  # made on the first step, on the scores' device

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._generators is None:
            self._generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.stream_seeds]
        scores = self.warpers(input_ids, scores.float())
        noise = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)  # (B, V)
        for row, generator in enumerate(self._generators):
            noise[row].exponential_(generator=generator)
        # E = 0 would make log E = -inf and turn a filtered -inf into NaN: clamp to the smallest normal float.
        return scores - noise.clamp_(min=torch.finfo(torch.float32).tiny).log_()


class GenerationBackend:
    def __init__(self, config: GenerationConfig):
        self.config = config
        self.tokenizer = load_tokenizer(config.model, padding_side="left")
        self.model = load_causal_lm(config.model).eval()
        self.model.requires_grad_(False)
        self._ignore_model_sampling_defaults()
        self.device = next(self.model.parameters()).device
        self.vocab_size = int(self.model.get_input_embeddings().num_embeddings)
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self.version = 0
        self.epoch = 0  # with version, the weights served: the epoch of the trainer that sent them (0 = as loaded)
        # A LoRA adapter applied on the loaded weights since the first adapter update: its config as sent (empty:
        # none), and the plain model's own layout, which full states keep using (peft renames the layers it wraps).
        self.adapter_config = ""
        self._plain_layout: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None

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

    def tokenize(self, texts: list[str], add_special_tokens: bool = True, field: str = "prompts") -> list[torch.Tensor]:
        for i, text in enumerate(texts):
            if not text:
                raise InvalidInput(f"{field}[{i}]", "is empty")
        encoded = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        return [torch.tensor(ids, dtype=torch.int64) for ids in encoded]

    def tokenize_conversations(self, conversations: list[Conversation]) -> list[torch.Tensor]:
        """Each conversation in the tokenizer's chat template, ending with the generation prompt (the header of
        the assistant's turn), as the SFT job trains on it. The template places BOS itself: nothing is added."""
        return [
            torch.tensor(render_prompt_ids(self.tokenizer, c, f"conversations[{i}]"), dtype=torch.int64)
            for i, c in enumerate(conversations)
        ]

    def generate(
        self, prompts: list[torch.Tensor], params: SamplingParams, on_token: OnToken | None = None
    ) -> list[Sample]:
        """Samples ``params.samples_per_prompt`` responses per prompt, prompt-major. Runs on the model thread.

        With a seed, sample j of prompt i (0-based within the request) depends only on (seed + i, j), the prompt and
        the weights: splitting a batch into shares seeded seed + offset gives the same samples. Without one, a
        random 63-bit seed is drawn for the request. Greedy (temperature 0) uses no seed.

        ``on_token`` (one sample only) is told of each token as it is sampled and may end the generation after it:
        the sample then ends there, finish reason LENGTH unless that token is EOS (the caller knows why it stopped).
        It changes no token sampled."""
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        # (prompt index, prompt, seed of the sample's random stream), prompt-major
        expanded = [
            (i, p, sample_stream_seed(seed + i, j))
            for i, p in enumerate(prompts)
            for j in range(params.samples_per_prompt)
        ]
        if on_token is not None and len(expanded) != 1:
            raise ValueError(f"on_token follows one sample, not {len(expanded)}")
        samples: list[Sample] = []
        for start in range(0, len(expanded), self.config.micro_batch_size):
            batch = expanded[start : start + self.config.micro_batch_size]
            samples.extend(self._generate_batch(batch, params, on_token))
        return samples

    def _generate_batch(
        self, items: list[tuple[int, torch.Tensor, int]], params: SamplingParams, on_token: OnToken | None = None
    ) -> list[Sample]:
        width = max(int(p.numel()) for _, p, _ in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(items), width), dtype=torch.int64)
        for row, (_, prompt, _) in enumerate(items):  # left padding: every prompt ends where generation starts
            input_ids[row, width - prompt.numel() :] = prompt
            attention_mask[row, width - prompt.numel() :] = 1
        # Built from scratch and passed with use_model_defaults=False: nothing of the model's own
        # generation_config.json is merged in, so a request for temperature 1.0 or for greedy gets exactly that.
        # Always greedy: with do_sample=False transformers adds no warper, and sampling is SeededSampler's argmax.
        generation_config = HFGenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
        )
        recorder = ChosenTokenLogprobs(params.logprob_temperature)
        processors = LogitsProcessorList([recorder])  # the recorder first: it must see the raw logits
        if params.temperature > 0:
            seeds = [stream_seed for _, _, stream_seed in items]
            processors.append(SeededSampler(seeds, params.temperature, params.top_k, params.top_p))
        stopping = [TokenCallback(recorder, on_token)] if on_token is not None else []
        sequences = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=generation_config,
            logits_processor=processors,
            stopping_criteria=StoppingCriteriaList(stopping),
            use_model_defaults=False,
        )
        generated = sequences[:, width:]  # (B, N)
        logprobs = recorder.finish(generated).cpu()  # (B, N) float32, log softmax(logits / T) of each token
        generated = generated.cpu()
        samples = []
        for row, (prompt_index, prompt, _) in enumerate(items):
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
                    policy_epoch=self.epoch,
                )
            )
        return samples

    def prefill_logprobs(self, prompt: torch.Tensor) -> torch.Tensor:
        """(P - 1,) float32: log softmax(logits)[prompt_t] of each prompt token after the first, given the ones
        before it (temperature 1), computed as the reference service does. Runs on the model thread."""
        if prompt.numel() < 2:
            return torch.empty(0, dtype=torch.float32)
        return response_logprobs(self.model, [prompt[:1]], [prompt[1:]], self.pad_token_id, 1)[0]

    # -- weights --------------------------------------------------------------------------------------------------

    def weight_assembler(self) -> WeightAssembler:
        """Collects one update: every tensor of the model under one name (a tied head comes with its embedding),
        or, when its first chunk carries an adapter config, every tensor of that LoRA adapter."""
        expected, aliases = self._plain_layout or (unique_state(self.model), tied_aliases(self.model))
        return WeightAssembler(
            expected, self.version, aliases, adapter=self._expected_adapter, current_epoch=self.epoch
        )

    def _expected_adapter(self, adapter_config: str) -> dict[str, torch.Tensor]:
        """The tensors an adapter update with this config must carry: the served adapter's (whose config it must
        repeat), or for the first one those peft builds for it, found on a meta-device skeleton (no memory, and the
        served model is not touched before the swap)."""
        config = config_from_json(adapter_config)
        if self.adapter_config:
            sent, served = json.loads(adapter_config), json.loads(self.adapter_config)
            if sent != served:
                differences = ", ".join(
                    f"{key} {sent.get(key)!r} (served: {served.get(key)!r})"
                    for key in sorted(set(sent) | set(served))
                    if sent.get(key) != served.get(key)
                )
                raise InvalidInput(
                    "adapter_config",
                    f"differs from the served adapter's in {differences}: a replica keeps the config of its first "
                    "adapter (restart it to change rank, alpha or target modules)",
                )
            return adapter_state(self.model)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.model.config)
        try:
            return adapter_state(wrap(skeleton, config))
        except ValueError as err:  # e.g. no layer of this model matches target_modules
            raise InvalidInput("adapter_config", f"does not fit this model: {err}") from err

    def swap_weights(
        self, state: dict[str, torch.Tensor], version: int, adapter_config: str = "", epoch: int = 0
    ) -> None:
        """Copies a complete state, or with ``adapter_config`` a complete adapter, in place and sets the version.
        Runs on the model thread, between batches.

        In place, so tied weights stay one tensor: a new embedding is the new head too. The first adapter wraps
        the model with peft (adapters on the loaded weights), later ones replace its tensors (never stack on them),
        a full state removes it."""
        if adapter_config:
            if not self.adapter_config:
                self._plain_layout = (unique_state(self.model), tied_aliases(self.model))
                self.model = wrap(self.model, config_from_json(adapter_config)).requires_grad_(False)
                self.adapter_config = adapter_config
            load_adapter_state(self.model, state)
        else:
            if self.adapter_config:
                self.model = self.model.unload()  # the plain model again, its layers without the adapter
                self.adapter_config, self._plain_layout = "", None
            load_unique_state(self.model, state)
        self.version, self.epoch = version, epoch

    def _ignore_model_sampling_defaults(self) -> None:
        """Says which of the model's generation_config.json sampling settings requests override (all of them)."""
        defaults = HFGenerationConfig()
        own = {
            key: getattr(self.model.generation_config, key, None)
            for key in _SAMPLING_KEYS
            if getattr(self.model.generation_config, key, None) != getattr(defaults, key, None)
        }
        if own:
            log.info("the model's generation_config sets %s: not used, every request's sampling parameters are", own)

    def warm_up(self) -> None:
        self.generate([torch.tensor([self.eos_token_id])], SamplingParams(max_new_tokens=2, seed=0))
