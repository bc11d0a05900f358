"""TGI's REST protocol on the generation service, so that text-generation-inference clients (the
``text-generation`` package, huggingface_hub's InferenceClient, curl) can sample from the policy being trained.

The routes and shapes are TGI's (router/src/server.rs and lib.rs in huggingface/text-generation-inference):
``POST /generate``, ``POST /generate_stream`` (server-sent events, one per token as it is sampled), ``POST /``
(either, by ``stream``; a non-streamed answer wrapped in a list, as TGI does there), ``GET /info`` and ``GET /health``
(no token; 503 while the model loads). Sampling is the backend's (``GenerationBackend.generate``), on the service's
model thread: a seed gives the tokens the gRPC Generate gives for one prompt and one sample with that seed.

Errors come as TGI's ``{"error": ..., "error_type": ...}``; an invalid request is TGI's 422 "validation", naming the
field, and a parameter this server does not implement (``top_n_tokens``, ``grammar``, ``best_of`` > 1, penalties,
``typical_p``, ``watermark``, ``adapter_id``) is refused that way rather than ignored.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from shared.auth import ServerAuth
from shared.errors import InvalidInput, NotReady, TooLarge
from shared.http import http_status_for, protected
from shared.types import FinishReason, Sample, SamplingParams

if TYPE_CHECKING:
    from services.generation.servicer import GenerationServicer

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 100  # TGI's, when a request leaves max_new_tokens unset (capped by max_new_tokens_limit)
MAX_STOP_SEQUENCES = 4  # TGI's default --max-stop-sequences


class Parameters(BaseModel):
    """TGI's GenerateParameters. Unknown fields are refused, and so is any value but the neutral one of those
    this server does not implement (the last group)."""

    model_config = ConfigDict(extra="forbid")

    do_sample: bool = False
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    return_full_text: bool | None = None
    truncate: int | None = Field(None, gt=0)
    details: bool = False
    decoder_input_details: bool = False
    # Not implemented: accepted only when unset or neutral.
    best_of: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    typical_p: float | None = None
    watermark: bool = False
    top_n_tokens: int | None = None
    grammar: dict | None = None
    adapter_id: str | None = None


# field -> values that mean "off", for the parameters this server does not implement
_NOT_IMPLEMENTED = {
    "best_of": (None, 1),
    "repetition_penalty": (None, 1.0),
    "frequency_penalty": (None, 0.0),
    "typical_p": (None, 1.0),
    "watermark": (False,),
    "top_n_tokens": (None, 0),
    "grammar": (None,),
    "adapter_id": (None, ""),
}


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str
    parameters: Parameters | None = None  # absent: TGI's defaults for a bare request, which samples (do_sample true)
    add_special_tokens: bool = True  # newer TGI: False for a text that already holds them (a rendered chat template)


class CompatRequest(GenerateRequest):
    stream: bool = False


@dataclass
class Call:
    """A validated request, ready for the model thread."""

    prompt: torch.Tensor  # (P,) int64
    params: SamplingParams
    seed: int | None  # the seed sampled with (drawn when the request gave none), None when greedy
    stop: list[str]
    prefix: str  # put before the generated text: the inputs when return_full_text
    details: bool
    prefill: bool  # decoder_input_details: the prompt tokens with their log-probs


def _renamed(exc: InvalidInput | TooLarge) -> InvalidInput | TooLarge:
    """The backend's check with the field as a REST caller names it."""
    field = exc.field.replace("sampling.", "parameters.").replace("prompt_ids[0]", "inputs")
    return type(exc)(field, str(exc).removeprefix(f"{exc.field}: "))


def prepare(servicer: GenerationServicer, request: GenerateRequest, full_text_default: bool, stream: bool) -> Call:
    backend = servicer.backend  # NotReady while the model loads
    parameters = request.parameters or Parameters(do_sample=True)
    for field, neutral in _NOT_IMPLEMENTED.items():
        if getattr(parameters, field) not in neutral:
            raise InvalidInput(f"parameters.{field}", "is not supported by this server")
    if stream and parameters.decoder_input_details:
        raise InvalidInput("parameters.decoder_input_details", "is not supported when streaming (as in TGI)")
    for i, stop in enumerate(parameters.stop):
        if not stop:
            raise InvalidInput(f"parameters.stop[{i}]", "is empty")
    if not request.inputs:
        raise InvalidInput("inputs", "is empty")
    prompt = backend.tokenize([request.inputs], request.add_special_tokens, field="inputs")[0]
    if parameters.truncate is not None:
        prompt = prompt[-parameters.truncate :]  # TGI keeps the last tokens
    # TGI samples when asked to, or when any warper is on (a temperature other than 1, top-k, top-p < 1).
    temperature = parameters.temperature if parameters.temperature is not None else 1.0
    sampling = parameters.do_sample or temperature != 1.0 or parameters.top_k is not None
    sampling = sampling or (parameters.top_p is not None and parameters.top_p < 1.0)
    seed = (parameters.seed if parameters.seed is not None else secrets.randbits(63)) if sampling else None
    limit = servicer.config.max_new_tokens_limit
    params = SamplingParams(
        max_new_tokens=parameters.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, limit),
        temperature=temperature if sampling else 0.0,
        top_k=parameters.top_k or 0,
        top_p=parameters.top_p or 1.0,
        seed=seed,
    )
    try:
        backend.validate([prompt], params)
    except (InvalidInput, TooLarge) as exc:
        raise _renamed(exc) from None
    full_text = parameters.return_full_text if parameters.return_full_text is not None else full_text_default
    return Call(
        prompt=prompt,
        params=params,
        seed=seed,
        stop=parameters.stop,
        prefix=request.inputs if full_text else "",
        details=parameters.details or parameters.decoder_input_details,
        prefill=parameters.decoder_input_details,
    )


class TokenStream:
    """The ``on_token`` of one generation (``GenerationBackend.generate``), on the model thread: each token with the
    text it adds and its log-prob, whether the text so far ends with a stop sequence (which ends the generation,
    as TGI's stop criteria do), and ``forward(token, last)`` for streaming.

    The text of a token is TGI's incremental detokenization: decode from the token before the last one that
    showed text, keep what is new, or "" while a character is incomplete (its bytes split over tokens). The texts
    of the tokens, special ones included, add up to the decoded response."""

    def __init__(self, tokenizer, call: Call, forward: Callable[[dict, bool], None] | None = None):
        self.tokenizer = tokenizer
        self.stop = call.stop
        self.max_new_tokens = call.params.max_new_tokens
        self.forward = forward
        self.special = set(tokenizer.all_special_ids)
        self.eos_token_id = tokenizer.eos_token_id
        self.ids: list[int] = []
        self.tokens: list[dict] = []  # TGI Tokens: id, text, logprob, special
        self.text = ""
        self.stopped = False  # a stop sequence ended it
        self.cancelled = False  # set from the event loop when the streaming client left: ends it at the next token
        self._prefix = self._read = 0

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def __call__(self, token_id: int, logprob: float) -> bool:
        self.ids.append(token_id)
        before, after = self._decode(self._prefix, self._read), self._decode(self._prefix, len(self.ids))
        piece = ""
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        token = {"id": token_id, "text": piece, "logprob": _finite(logprob), "special": token_id in self.special}
        self.tokens.append(token)
        self.stopped = any(self.text.endswith(stop) for stop in self.stop)
        last = self.stopped or token_id == self.eos_token_id or len(self.ids) == self.max_new_tokens
        if self.forward is not None:
            self.forward(token, last)
        return self.stopped or self.cancelled


def _finite(value: float) -> float | None:
    """A log-prob as TGI serializes it: a non-finite one (a token the model rules out) as null."""
    return value if math.isfinite(value) else None


def _finish_reason(sample: Sample, stream: TokenStream) -> str:
    if sample.finish_reason is FinishReason.EOS:
        return "eos_token"
    return "stop_sequence" if stream.stopped else "length"


def _prefill(tokenizer, prompt: torch.Tensor, logprobs: torch.Tensor) -> list[dict]:
    """TGI's PrefillTokens: each prompt token decoded on its own, with its log-prob (none for the first)."""
    ids = prompt.tolist()
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    values = [None, *map(_finite, logprobs.tolist())]
    return [{"id": i, "text": t, "logprob": v} for i, t, v in zip(ids, texts, values, strict=True)]


async def generate(servicer: GenerationServicer, call: Call) -> dict:
    """TGI's GenerateResponse for one validated call."""
    tokenizer = servicer.backend.tokenizer
    stream = TokenStream(tokenizer, call)
    sample, prefill_logprobs = await servicer.generate_one(call.prompt, call.params, stream, call.prefill)
    response = {"generated_text": call.prefix + sample.text}
    if call.details:
        response["details"] = {
            "finish_reason": _finish_reason(sample, stream),
            "generated_tokens": int(sample.response_ids.numel()),
            "seed": call.seed,
            "prefill": _prefill(tokenizer, call.prompt, prefill_logprobs) if call.prefill else [],
            "tokens": stream.tokens,
        }
    return response


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def generate_events(servicer: GenerationServicer, call: Call) -> AsyncIterator[str]:
    """TGI's StreamResponse events: one per token as the model thread samples it; the last one carries the
    generated text and (when asked) the details. An error after the first byte is an event in TGI's error shape."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[dict, bool] | None] = asyncio.Queue()
    stream = TokenStream(
        servicer.backend.tokenizer, call, lambda token, last: loop.call_soon_threadsafe(queue.put_nowait, (token, last))
    )
    task = asyncio.create_task(servicer.generate_one(call.prompt, call.params, stream))
    task.add_done_callback(lambda _: queue.put_nowait(None))  # after every token: both come through the loop
    try:
        index = 0
        while (item := await queue.get()) is not None:
            token, last = item
            index += 1
            event = {"index": index, "token": token, "generated_text": None, "details": None}
            if last:
                sample, _ = await task
                event["generated_text"] = call.prefix + sample.text
                if call.details:
                    event["details"] = {
                        "finish_reason": _finish_reason(sample, stream),
                        "generated_tokens": int(sample.response_ids.numel()),
                        "seed": call.seed,
                    }
            yield _event(event)
            if last:
                return
        await task  # ended before its last token: raises why
        raise RuntimeError("generation ended without its last token")
    except Exception as exc:
        status, body = tgi_error(exc)
        log.log(logging.ERROR if status >= 500 else logging.INFO, "generate_stream failed: %s", exc)
        yield _event(body)
    finally:
        stream.cancelled = True  # a client that left ends the generation at its next token
        task.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: nothing logged twice


def tgi_error(exc: Exception) -> tuple[int, dict]:
    """TGI's status and body for an exception: the project's mapping (``shared.http``), except that a request
    refused as invalid or too large is TGI's 422 "validation"."""
    if isinstance(exc, RequestValidationError):
        fields = [".".join(str(part) for part in e["loc"][1:]) or "body" for e in exc.errors()]
        message = "; ".join(f"{field}: {e['msg']}" for field, e in zip(fields, exc.errors(), strict=True))
        return 422, {"error": message, "error_type": "validation"}
    if isinstance(exc, HTTPException):
        status, message = exc.status_code, str(exc.detail)
    else:
        status = http_status_for(exc)
        message = str(exc) if status != 500 else f"internal error: {type(exc).__name__}: {exc}"
    if status in (400, 413):
        status = 422
    # 503 (loading, draining) as "overloaded": TGI clients raise OverloadedError, which means "retry later".
    kinds = {422: "validation", 401: "authentication", 404: "not_found", 409: "conflict", 503: "overloaded"}
    return status, {"error": message, "error_type": kinds.get(status, "generation")}


def _info(servicer: GenerationServicer) -> dict:
    """TGI's Info, as far as it applies, and the weights served."""
    backend, config = servicer.backend, servicer.config
    try:
        version = importlib.metadata.version("rlhf-services")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "model_id": config.model.path,
        "model_sha": None,
        "model_dtype": str(next(backend.model.parameters()).dtype),
        "model_device_type": backend.device.type,
        "model_pipeline_tag": "text-generation",
        "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_input_tokens": config.max_prompt_tokens,
        "max_input_length": config.max_prompt_tokens,
        "max_total_tokens": config.max_prompt_tokens + config.max_new_tokens_limit,
        "max_client_batch_size": 1,
        "router": "rlhf-services generation",
        "version": version,
        "sha": None,
        "docker_label": None,
        "policy_version": backend.version,
        "policy_epoch": backend.epoch,
    }


def tgi_app(servicer: GenerationServicer, server_auth: ServerAuth) -> FastAPI:
    """The FastAPI app (``Server.http_app``): every route but /health needs the service's token."""
    app = FastAPI(title="generation: TGI protocol", docs_url=None, redoc_url=None)  # /openapi.json served
    guard = protected(server_auth)

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        status, body = tgi_error(exc)
        if status >= 500:
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        headers = getattr(exc, "headers", None) if isinstance(exc, HTTPException) else None
        return JSONResponse(body, status_code=status, headers=headers)

    # The project's own exceptions are answers, not crashes: handled inside the app (a handler for Exception alone
    # runs in Starlette's outer middleware, which re-raises, and the server logs a traceback per bad request).
    for kind in (ValueError, TooLarge, NotReady, HTTPException, Exception):
        app.add_exception_handler(kind, handle)
    app.add_exception_handler(RequestValidationError, handle)

    def stream(call: Call) -> StreamingResponse:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(generate_events(servicer, call), media_type="text/event-stream", headers=headers)

    @app.get("/health")
    async def health() -> Response:
        try:
            servicer.backend  # noqa: B018 - raises NotReady while the model loads
        except NotReady:
            return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
        return Response(status_code=200)

    @app.get("/info", dependencies=guard)
    async def info() -> dict:
        return _info(servicer)

    @app.post("/generate", dependencies=guard)
    async def generate_route(request: GenerateRequest) -> dict:
        return await generate(servicer, prepare(servicer, request, full_text_default=False, stream=False))

    @app.post("/generate_stream", dependencies=guard)
    async def generate_stream_route(request: GenerateRequest) -> StreamingResponse:
        return stream(prepare(servicer, request, full_text_default=False, stream=True))

    @app.post("/", dependencies=guard)
    async def compat_route(request: CompatRequest):
        # TGI defaults return_full_text to true here for text-generation models (the Inference API's habit).
        call = prepare(servicer, request, full_text_default=True, stream=request.stream)
        return stream(call) if request.stream else [await generate(servicer, call)]

    return app
