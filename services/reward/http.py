"""The reward service's REST API: FastAPI on ``server.http_port``, beside gRPC on the same event loop.

Each route only translates its request into a ``ScoreQuery`` and its scores back, calling the same ``RewardScorer``
as gRPC ``Score``: requests from both edges are merged into one model call, and the same text gets the same score.

- ``POST /v1/score``: the project's own (prompts or conversations, and responses -> scores).
- ``POST /get_reward``: OpenRLHF's remote reward model (``--remote_rm_url``), request and answer unchanged.
- ``POST /classify``: vLLM's classification API as veRL's reward loop calls it (``use_activation: false`` answers
  the raw score; the default applies a sigmoid, as vLLM does for a single-label model).
- KServe Open Inference Protocol v2: ``/v2/health/{live,ready}``, ``/v2/models/{name}``, ``.../ready``,
  ``.../infer`` (BYTES inputs ``prompt`` and ``response``, or ``text``; FP32 output ``score``).
- ``GET /healthz``: liveness.

Health routes are open; every other route needs ``Authorization: Bearer <token>`` when the server has tokens.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from fastapi import APIRouter, FastAPI, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from services.reward.scoring import RewardScorer, ScoreQuery
from shared.auth import ServerAuth
from shared.chat import check_conversation
from shared.errors import InvalidInput
from shared.http import install_error_handlers, protected

KSERVE_INPUTS = ("prompt", "response", "text")
KSERVE_OUTPUT = "score"


# --- request and response bodies -----------------------------------------------------------------------------


class Message(BaseModel):
    role: str = Field(description="e.g. system, user, assistant: a role the reward model's chat template knows")
    content: str


class ScoreBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"prompts": ["The capital of France is"], "responses": [" Paris."]},
                {"conversations": [[{"role": "user", "content": "Hi!"}]], "responses": ["Hello, how can I help?"]},
            ]
        }
    )
    prompts: list[str] | None = Field(None, description="prompt text of each pair (the model reads prompt + response)")
    conversations: list[list[Message]] | None = Field(
        None, description="or the conversation each response answers, rendered with the reward model's chat template"
    )
    responses: list[str] = Field(description="response text of each pair; as many as prompts or conversations")


class ScoreReply(BaseModel):
    scores: list[float] = Field(description="one per pair, in request order")


class GetRewardBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"query": ["Q: 2+2?\nA: 4"], "prompts": ["Q: 2+2?\nA:"], "labels": [None]}]}
    )
    query: list[str] = Field(description="whole texts, prompt and response joined (OpenRLHF's queries)")
    prompts: list[str | None] | None = Field(None, description="accepted and ignored: each query holds its prompt")
    labels: list[Any] | None = Field(None, description="accepted and ignored: a reward model reads no labels")


class GetRewardReply(BaseModel):
    rewards: list[float] = Field(description="one per query, in order")
    scores: list[float] = Field(description="the same values (OpenRLHF reads them for dynamic filtering)")
    extra_logs: dict[str, Any] = Field(default_factory=dict)


class ClassifyBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "reward", "input": ["<s>user\nHi</s><s>assistant\nHello</s>"]}]}
    )
    model: str | None = Field(None, description="any name (echoed back); this server serves one model")
    input: str | list[str] | None = Field(None, description="whole text(s) to score, chat template applied")
    messages: list[Message] | None = Field(
        None, description="or one conversation ending with the assistant's response to score (rendered here)"
    )
    use_activation: bool | None = Field(None, description="sigmoid of the score (default true); false: the raw score")
    activation: bool | None = Field(None, description="older name of use_activation")
    softmax: bool | None = Field(None, description="older name of use_activation")
    add_special_tokens: bool | None = Field(
        None, description="accepted and ignored: texts are tokenized as on every route of this server"
    )
    user: str | None = None


class ClassificationData(BaseModel):
    index: int
    label: str | None = None
    probs: list[float] = Field(description="one value: the score, or its sigmoid with use_activation")
    num_classes: int = 1


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: dict[str, Any] | None = None


class ClassifyReply(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: Usage


class InferInput(BaseModel):
    name: str = Field(description="'prompt' and 'response', or 'text' alone (prompt and response joined)")
    shape: list[int] = Field(description="e.g. [n] or [n, 1]; its product is the number of texts")
    datatype: str = Field(description="BYTES")
    parameters: dict[str, Any] | None = None
    data: list[str | list[str]] = Field(description="the texts, flat or nested row-major")


class InferRequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "inputs": [
                        {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["The capital of France is"]},
                        {"name": "response", "shape": [1], "datatype": "BYTES", "data": [" Paris."]},
                    ]
                }
            ]
        }
    )
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput]
    outputs: list[InferRequestedOutput] | None = None


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[float]


class InferReply(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[InferOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(default_factory=list)
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ErrorReply(BaseModel):
    error: str = Field(description="what is wrong, starting with the field it is about")


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorReply, "description": "malformed request; the message names the field"},
    401: {"model": ErrorReply, "description": "missing or wrong bearer token"},
    413: {"model": ErrorReply, "description": "over a limit (max_batch pairs, max_text_chars per text, body size)"},
    503: {"model": ErrorReply, "description": "the model is still loading"},
}


NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorReply, "description": "no model of that name"}}


# --- translations between the routes' bodies and the scorer ---------------------------------------------------


def score_query(body: ScoreBody) -> ScoreQuery:
    conversations = None
    if body.conversations is not None:
        conversations = [
            check_conversation([m.model_dump() for m in c], f"conversations[{i}]")
            for i, c in enumerate(body.conversations)
        ]
    return ScoreQuery(body.responses, body.prompts, conversations)


def classify_query(body: ClassifyBody) -> ScoreQuery:
    if (body.input is None) == (body.messages is None):
        raise InvalidInput("input", "give exactly one of input (a string or a list of strings) or messages")
    if body.input is not None:
        return ScoreQuery.of_texts([body.input] if isinstance(body.input, str) else body.input, "input")
    conversation = check_conversation([m.model_dump() for m in body.messages], "messages")
    if len(conversation) < 2 or conversation[-1]["role"] != "assistant":
        raise InvalidInput("messages", "must end with the assistant's response to score, after at least one turn")
    response, turns = conversation[-1]["content"], conversation[:-1]
    return ScoreQuery([response], conversations=[turns], prompt_field="messages", response_field="messages")


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x), without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def infer_query(body: InferBody) -> ScoreQuery:
    """KServe v2 BYTES inputs -> pairs: ``prompt`` and ``response``, or ``text`` alone (scored as one text)."""
    tensors: dict[str, tuple[list[str], str]] = {}
    for i, tensor in enumerate(body.inputs):
        field = f"inputs[{i}]"
        if tensor.name not in KSERVE_INPUTS:
            raise InvalidInput(f"{field}.name", f"is {tensor.name!r}; inputs are 'prompt' and 'response', or 'text'")
        if tensor.name in tensors:
            raise InvalidInput(f"{field}.name", f"{tensor.name!r} is given twice")
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"{field}.datatype", f"is {tensor.datatype!r}; text inputs are BYTES")
        values = [text for row in tensor.data for text in ([row] if isinstance(row, str) else row)]
        if any(d < 0 for d in tensor.shape) or math.prod(tensor.shape) != len(values):
            raise InvalidInput(f"{field}.shape", f"{tensor.shape} does not fit the {len(values)} values of data")
        tensors[tensor.name] = (values, f"{field}.data")
    for i, output in enumerate(body.outputs or ()):
        if output.name != KSERVE_OUTPUT:
            raise InvalidInput(f"outputs[{i}].name", f"is {output.name!r}; the only output is {KSERVE_OUTPUT!r}")
    if set(tensors) == {"text"}:
        return ScoreQuery.of_texts(*tensors["text"])
    if set(tensors) != {"prompt", "response"}:
        raise InvalidInput("inputs", f"give 'prompt' and 'response', or 'text' alone; got {sorted(tensors)}")
    (prompts, prompt_field), (responses, response_field) = tensors["prompt"], tensors["response"]
    return ScoreQuery(responses, prompts, prompt_field=prompt_field, response_field=response_field)


class BodyLimit:
    """413 for a body that declares more than ``max_bytes`` (plain ASGI: no per-request task, unlike
    ``@app.middleware``)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_bytes:
                message = f"body: {int(declared)} bytes exceed the limit of {self.max_bytes}"
                await JSONResponse({"error": message}, status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- the app -------------------------------------------------------------------------------------------------


def build_app(scorer: RewardScorer, server_auth: ServerAuth) -> FastAPI:
    config = scorer.config
    name = config.served_model_name
    app = FastAPI(
        title="Reward model",
        version="1",
        description=(
            "Scores (prompt, response) pairs with one reward model. Every route but health needs "
            "`Authorization: Bearer <token>` when the server has tokens. Limits: at most "
            f"{config.max_batch} pairs per request and {config.max_text_chars} characters per text (413 beyond); "
            f"bodies up to {config.server.max_message_bytes} bytes."
        ),
    )
    install_error_handlers(app)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI's own errors (401 from the token check, a body that does not parse, an unknown path or model) in
        # the API's one error shape; 422 (the schema's validation) keeps FastAPI's field-by-field detail.
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(HTTPException, http_error)
    app.add_middleware(BodyLimit, max_bytes=config.server.max_message_bytes)

    model_name_path = Path(description="the served model's name (served_model_name)", examples=[name])

    def model(model_name: str) -> None:
        if model_name != name:
            raise HTTPException(404, f"model {model_name!r} not found; this server serves {name!r}")

    @app.get("/healthz", response_model=ServerLive, tags=["health"])
    async def healthz():
        return ServerLive(live=True)

    @app.get("/v2/health/live", response_model=ServerLive, tags=["health"])
    async def live():
        return ServerLive(live=True)

    @app.get("/v2/health/ready", response_model=ServerReady, tags=["health"], responses={503: ERRORS[503]})
    async def ready():
        _ = scorer.backend  # NotReady -> 503 while the model loads
        return ServerReady(ready=True)

    api = APIRouter(dependencies=protected(server_auth), responses=ERRORS)

    @api.post("/v1/score", response_model=ScoreReply, tags=["score"])
    async def score(body: ScoreBody):
        """Scores (prompt, response) or (conversation, response) pairs, as gRPC ``rlhf.v1.Reward/Score``."""
        return ScoreReply(scores=(await scorer.score(score_query(body))).scores)

    @api.post("/get_reward", response_model=GetRewardReply, tags=["compatibility"])
    async def get_reward(body: GetRewardBody):
        """OpenRLHF's remote reward model: each query is a whole text (prompt and response joined)."""
        scores = (await scorer.score(ScoreQuery.of_texts(body.query, "query"))).scores
        return GetRewardReply(rewards=scores, scores=scores)

    @api.post("/classify", response_model=ClassifyReply, tags=["compatibility"])
    async def classify(body: ClassifyBody):
        """vLLM's classification API for a one-label model (veRL's reward loop reads ``data[-1].probs[-1]``)."""
        result = await scorer.score(classify_query(body))
        activate = next((v for v in (body.use_activation, body.softmax, body.activation) if v is not None), True)
        return ClassifyReply(
            id=f"classify-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=body.model or name,
            data=[
                ClassificationData(index=i, probs=[sigmoid(s) if activate else s]) for i, s in enumerate(result.scores)
            ],
            usage=Usage(prompt_tokens=result.tokens, total_tokens=result.tokens),
        )

    @api.get("/v2/models/{model_name}", response_model=ModelMetadata, tags=["kserve"], responses=NOT_FOUND)
    async def metadata(model_name: str = model_name_path):
        model(model_name)
        texts = [TensorMetadata(name=n, datatype="BYTES", shape=[-1]) for n in KSERVE_INPUTS]
        return ModelMetadata(
            name=name,
            platform="pytorch" if not config.function else "python",
            inputs=texts,
            outputs=[TensorMetadata(name=KSERVE_OUTPUT, datatype="FP32", shape=[-1])],
        )

    @api.get("/v2/models/{model_name}/ready", response_model=ModelReady, tags=["kserve"], responses=NOT_FOUND)
    async def model_ready(model_name: str = model_name_path):
        model(model_name)
        _ = scorer.backend
        return ModelReady(name=name, ready=True)

    @api.post("/v2/models/{model_name}/infer", response_model=InferReply, tags=["kserve"], responses=NOT_FOUND)
    async def infer(body: InferBody, model_name: str = model_name_path):
        """KServe v2 inference: BYTES inputs ``prompt`` and ``response`` (or ``text``), FP32 output ``score``."""
        model(model_name)
        scores = (await scorer.score(infer_query(body))).scores
        output = InferOutput(name=KSERVE_OUTPUT, shape=[len(scores)], datatype="FP32", data=scores)
        return InferReply(model_name=name, id=body.id, outputs=[output])

    app.include_router(api)
    return app
