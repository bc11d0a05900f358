"""The reward model as a public API: the REST routes (the project's own, OpenRLHF's, vLLM's /classify as veRL calls
it, KServe v2) beside gRPC on one real server on loopback, with a token; the same scores on every route; one model
call for HTTP and gRPC requests that arrive together; 401, 503 and 4xx answers; a schema fuzzer; a short load test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from transformers import AutoTokenizer

from services import loadtest
from services.reward.backend import load_backend
from services.reward.config import RewardConfig
from services.reward.servicer import build_server
from shared.convert import conversations_to_pb
from shared.proto.rlhf.v1 import reward_pb2, reward_pb2_grpc
from shared.tiny_models import CHAT_TEMPLATE, build_reward_model
from tests.service.grpc_helpers import expect_status, running

TOKEN = "reward-api-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GRPC_AUTH = (("authorization", f"Bearer {TOKEN}"),)
PAIRS = [("the cat is", " happy and warm."), ("the day was", " awful"), ("we", " are kind, kind and glad.")]
PROMPTS, RESPONSES = [p for p, _ in PAIRS], [r for _, r in PAIRS]
CONVERSATIONS = [
    [{"role": "user", "content": "the day was"}],
    [{"role": "system", "content": "be kind."}, {"role": "user", "content": "my friend is"}],
]
CHAT_RESPONSES = ["warm and kind.", "glad"]
HEALTH = {"/healthz", "/v2/health/live", "/v2/health/ready"}
FUNCTION = "services.reward.functions:response_length"


@pytest.fixture(scope="module")
def chat_reward_dir(tmp_path_factory):
    return build_reward_model(tmp_path_factory.mktemp("api-reward"), chat_template=CHAT_TEMPLATE)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def _config(token_file, model_dir=None, **overrides) -> RewardConfig:
    scorer = {"model": {"path": str(model_dir)}, "normalize": False} if model_dir else {"function": FUNCTION}
    base = {"server": {"http_port": 0}, "auth": {"token_file": str(token_file)}}
    return RewardConfig.model_validate(base | scorer | overrides)


@contextlib.asynccontextmanager
async def serving(config: RewardConfig, backend, serving: bool = True):
    """The reward service on loopback; yields (server, a Reward stub, an HTTP client on its REST port)."""
    server, _ = await build_server(config, backend)
    async with (
        running(server, serving) as channel,  # started: the REST port is bound from here on
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as http,
    ):
        yield server, reward_pb2_grpc.RewardStub(channel), http


def _tensor(name: str, data: list, shape: list[int] | None = None, datatype: str = "BYTES") -> dict:
    """A KServe v2 input tensor."""
    return {"name": name, "shape": shape or [len(data)], "datatype": datatype, "data": data}


async def _post(http: httpx.AsyncClient, path: str, body, status: int = 200, headers=AUTH):
    reply = await http.post(path, json=body, headers=headers)
    assert reply.status_code == status, f"{path}: {reply.status_code} {reply.text}"
    return reply.json()


async def test_every_route_scores_what_grpc_scores(chat_reward_dir, token_file):
    config = _config(token_file, chat_reward_dir)
    tokenizer = AutoTokenizer.from_pretrained(chat_reward_dir)
    async with serving(config, load_backend(config)) as (_, stub, http):
        text = list(
            (await stub.Score(reward_pb2.ScoreRequest(prompts=PROMPTS, responses=RESPONSES), metadata=GRPC_AUTH)).scores
        )
        chat_request = reward_pb2.ScoreRequest(
            conversations=conversations_to_pb(CONVERSATIONS), responses=CHAT_RESPONSES
        )
        chat = list((await stub.Score(chat_request, metadata=GRPC_AUTH)).scores)

        own = await _post(http, "/v1/score", {"prompts": PROMPTS, "responses": RESPONSES})
        assert own["scores"] == pytest.approx(text, abs=1e-5)
        own_chat = await _post(http, "/v1/score", {"conversations": CONVERSATIONS, "responses": CHAT_RESPONSES})
        assert own_chat["scores"] == pytest.approx(chat, abs=1e-5)

        # OpenRLHF (remote_rm_fn): the whole texts, their prompts and labels; it reads "rewards" (and "scores").
        openrlhf = {"query": [p + r for p, r in PAIRS], "prompts": PROMPTS, "labels": ["", None, "x"]}
        reply = await _post(http, "/get_reward", openrlhf)
        assert reply["rewards"] == pytest.approx(text, abs=1e-5)
        assert reply["scores"] == reply["rewards"] and reply["extra_logs"] == {}

        # veRL's reward loop: one chat-templated text per request, the raw score, data[-1].probs[-1].
        for conversation, response, expected in zip(CONVERSATIONS, CHAT_RESPONSES, chat, strict=True):
            whole = tokenizer.apply_chat_template(
                [*conversation, {"role": "assistant", "content": response}], tokenize=False
            )
            verl = {"model": str(chat_reward_dir), "input": whole, "use_activation": False, "add_special_tokens": False}
            reply = await _post(http, "/classify", verl)
            assert reply["data"][-1]["probs"][-1] == pytest.approx(expected, abs=1e-5)
            assert reply["object"] == "list" and reply["model"] == str(chat_reward_dir)
            assert reply["id"].startswith("classify-") and reply["data"][0]["num_classes"] == 1
            assert reply["usage"]["prompt_tokens"] == len(tokenizer(whole)["input_ids"])
            older = await _post(http, "/classify", {"model": "m", "input": [whole], "activation": False})
            assert older["data"][0]["probs"] == reply["data"][0]["probs"]
            sigmoid = await _post(http, "/classify", {"model": "m", "input": whole})  # vLLM's default
            assert sigmoid["data"][0]["probs"][0] == pytest.approx(1 / (1 + math.exp(-expected)), abs=1e-6)
            messages = [*conversation, {"role": "assistant", "content": response}]
            reply = await _post(http, "/classify", {"messages": messages, "use_activation": False})
            assert reply["data"][0]["probs"][0] == pytest.approx(expected, abs=1e-5)

        # KServe v2: BYTES prompt and response (flat and nested), or one text; FP32 score.
        nested = _tensor("response", [[r] for r in RESPONSES], shape=[3, 1])
        kserve = {"id": "request-1", "inputs": [_tensor("prompt", PROMPTS), nested], "outputs": [{"name": "score"}]}
        reply = await _post(http, "/v2/models/reward/infer", kserve)
        assert reply["model_name"] == "reward" and reply["id"] == "request-1"
        (output,) = reply["outputs"]
        assert (output["name"], output["datatype"], output["shape"]) == ("score", "FP32", [3])
        assert output["data"] == pytest.approx(text, abs=1e-5)
        reply = await _post(http, "/v2/models/reward/infer", {"inputs": [_tensor("text", [p + r for p, r in PAIRS])]})
        assert reply["outputs"][0]["data"] == pytest.approx(text, abs=1e-5)
        metadata = (await http.get("/v2/models/reward", headers=AUTH)).json()
        assert [i["name"] for i in metadata["inputs"]] == ["prompt", "response", "text"]
        assert metadata["outputs"] == [{"name": "score", "datatype": "FP32", "shape": [-1]}]
        assert (await http.get("/v2/models/reward/ready", headers=AUTH)).json() == {"name": "reward", "ready": True}
        for path in ("/v2/models/other", "/v2/models/other/ready"):
            reply = await http.get(path, headers=AUTH)
            assert reply.status_code == 404 and "'other' not found" in reply.json()["error"]
        assert (await http.post("/v2/models/other/infer", json=kserve, headers=AUTH)).status_code == 404
        assert (await http.get("/v2/health/ready")).json() == {"ready": True}


class CountingBackend:
    """A real backend that records the size of every model call."""

    def __init__(self, backend):
        self.backend = backend
        self.device = backend.device
        self.calls: list[int] = []

    def score_and_count(self, pairs):
        self.calls.append(len(pairs))
        return self.backend.score_and_count(pairs)

    def __getattr__(self, name):
        return getattr(self.backend, name)


async def test_http_and_grpc_requests_that_arrive_together_share_one_model_call(token_file):
    # Nine requests of one pair each, over four REST routes and gRPC: the queue waits (up to 2 s) until all nine
    # pairs are there, then makes one call.
    config = _config(token_file, batching={"max_wait_ms": 2000, "max_pairs": 9})
    backend = CountingBackend(load_backend(config))
    async with serving(config, backend) as (_, stub, http):
        kserve = {"inputs": [_tensor("prompt", ["p"]), _tensor("response", ["abcd"])]}
        calls = [
            _post(http, "/v1/score", {"prompts": ["p"], "responses": ["a"]}),
            _post(http, "/get_reward", {"query": ["ab"]}),
            _post(http, "/classify", {"input": "abc", "use_activation": False}),
            _post(http, "/v2/models/reward/infer", kserve),
            *(
                stub.Score(reward_pb2.ScoreRequest(prompts=["p"], responses=["x" * n]), metadata=GRPC_AUTH)
                for n in range(5, 10)
            ),
        ]
        replies = await asyncio.gather(*calls)
    assert backend.calls == [9]
    assert replies[0]["scores"] == [1.0] and replies[1]["rewards"] == [2.0]
    assert replies[2]["data"][0]["probs"] == [3.0] and replies[3]["outputs"][0]["data"] == [4.0]
    assert [list(r.scores) for r in replies[4:]] == [[5.0], [6.0], [7.0], [8.0], [9.0]]


async def test_every_route_but_health_needs_the_token(token_file):
    config = _config(token_file)
    async with serving(config, load_backend(config)) as (server, stub, http):
        paths = server.http_app.openapi()["paths"]  # every route the API publishes
        assert set(paths) >= HEALTH | {"/v1/score", "/get_reward", "/classify", "/v2/models/{model_name}/infer"}
        for template, methods in paths.items():
            if template in HEALTH:
                continue
            path = template.replace("{model_name}", "reward")
            for method in methods:
                for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
                    reply = await http.request(method, path, json={}, headers=headers)
                    assert reply.status_code == 401, f"{method} {path} with {headers}: {reply.status_code}"
                    assert reply.headers["www-authenticate"] == "Bearer"
        for path in HEALTH:
            assert (await http.get(path)).status_code == 200
        assert (await http.get("/openapi.json")).status_code == 200
        request = reward_pb2.ScoreRequest(prompts=["p"], responses=["r"])
        await expect_status(stub.Score(request), grpc.StatusCode.UNAUTHENTICATED, "bearer token")
        assert list((await stub.Score(request, metadata=GRPC_AUTH)).scores) == [1.0]


async def test_routes_answer_503_while_the_model_loads(token_file):
    config = _config(token_file)
    async with serving(config, None, serving=False) as (server, stub, http):
        request = reward_pb2.ScoreRequest(prompts=["p"], responses=["r"])
        await expect_status(stub.Score(request, metadata=GRPC_AUTH), grpc.StatusCode.UNAVAILABLE, "loading")
        for path, body in (
            ("/v1/score", {"prompts": ["p"], "responses": ["r"]}),
            ("/get_reward", {"query": ["pr"]}),
            ("/classify", {"input": "pr"}),
            ("/v2/models/reward/infer", {"inputs": [_tensor("text", ["pr"])]}),
        ):
            assert "loading" in (await _post(http, path, body, 503))["error"]
        assert (await http.get("/v2/models/reward/ready", headers=AUTH)).status_code == 503
        assert (await http.get("/v2/health/ready")).status_code == 503
        for path in ("/v2/health/live", "/healthz"):
            assert (await http.get(path)).status_code == 200

        server.attach(load_backend(config))
        assert (await http.get("/v2/health/ready")).status_code == 200
        assert (await _post(http, "/v1/score", {"prompts": ["p"], "responses": ["r"]}))["scores"] == [1.0]


async def test_bad_input_is_a_4xx_that_names_the_field(token_file):
    config = _config(token_file, max_batch=4, max_text_chars=50, server={"http_port": 0, "max_message_bytes": 4096})
    async with serving(config, load_backend(config)) as (_, stub, http):
        chat = [[{"role": "user", "content": "x"}]]
        infer = "/v2/models/reward/infer"
        cases = [
            ("/v1/score", {"prompts": ["a"], "conversations": chat, "responses": ["b"]}, 400, "exactly one"),
            ("/v1/score", {"prompts": ["a", "b"], "responses": ["c"]}, 400, "responses: has 1 items"),
            ("/v1/score", {"prompts": ["a"] * 5, "responses": ["b"] * 5}, 413, "prompts: batch of 5"),
            ("/v1/score", {"prompts": ["a"], "responses": ["x" * 51]}, 413, "responses[0]: 51 characters"),
            ("/v1/score", {"conversations": [[{"role": "u", "content": "x" * 60}]], "responses": ["b"]}, 413, "conv"),
            ("/v1/score", {"prompts": ["a", ""], "responses": ["b", ""]}, 400, "responses[1]: is empty"),
            ("/v1/score", {"conversations": [[{"role": "", "content": "x"}]], "responses": ["b"]}, 400, "[0][0].role"),
            ("/v1/score", {"conversations": [[]], "responses": ["b"]}, 400, "conversations[0]: must be a non-empty"),
            ("/v1/score", {"prompts": ["a"], "responses": ["b"], "pad": "z" * 5000}, 413, "body: "),
            ("/get_reward", {"query": ["ok", "y" * 51]}, 413, "query[1]"),
            ("/get_reward", {"query": []}, 400, "query: empty batch"),
            ("/classify", {"model": "m"}, 400, "input"),
            ("/classify", {"messages": [{"role": "user", "content": "x"}]}, 400, "messages: must end"),
            (infer, {"inputs": [_tensor("text", ["a"], datatype="FP32")]}, 400, "inputs[0].datatype"),
            (infer, {"inputs": [_tensor("text", ["a"], shape=[2])]}, 400, "inputs[0].shape"),
            (infer, {"inputs": [_tensor("query", ["a"])]}, 400, "inputs[0].name"),
            (infer, {"inputs": [_tensor("prompt", ["a"])]}, 400, "inputs: give"),
            (infer, {"inputs": [_tensor("text", ["a"])], "outputs": [{"name": "logits"}]}, 400, "outputs[0].name"),
            (infer, {"inputs": [_tensor("prompt", ["a"]), _tensor("response", ["b", "c"])]}, 400, "inputs[1].data"),
        ]
        for path, body, status, fragment in cases:
            reply = await _post(http, path, body, status)
            assert fragment in reply["error"], f"{path} {body}: {reply}"
        # Shapes the schema rejects name the field in FastAPI's own answer (422).
        for path, body, field in (
            ("/v1/score", {"prompts": ["a"]}, "responses"),
            ("/classify", {"input": [1, 2, 3]}, "input"),
            ("/get_reward", {"query": "not a list"}, "query"),
        ):
            detail = (await _post(http, path, body, 422))["detail"]
            assert any(field in error["loc"] for error in detail), detail
        # JSON may carry a lone surrogate, which no tokenizer reads.
        reply = await http.post(
            "/get_reward", content=b'{"query": ["ok", "\\ud800"]}', headers=AUTH | {"Content-Type": "application/json"}
        )
        assert reply.status_code == 400 and "query[1]" in reply.json()["error"], reply.text

        too_long = reward_pb2.ScoreRequest(prompts=["a"], responses=["x" * 51])
        await expect_status(
            stub.Score(too_long, metadata=GRPC_AUTH),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "responses[0]",
            "max_text_chars",
        )
        empty = reward_pb2.ScoreRequest(prompts=[""], responses=[""])
        await expect_status(stub.Score(empty, metadata=GRPC_AUTH), grpc.StatusCode.INVALID_ARGUMENT, "responses[0]")


async def test_a_schema_fuzzer_gets_no_server_error(chat_reward_dir, token_file, tmp_path):
    """schemathesis generates requests from the OpenAPI document (valid and invalid ones) against the real server
    with the tiny model: every answer is below 500 and matches the status codes and bodies the document declares."""
    config = _config(token_file, chat_reward_dir, max_text_chars=2000)
    checks = "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance"
    async with serving(config, load_backend(config)) as (server, _, _):
        process = await asyncio.create_subprocess_exec(
            Path(sys.executable).parent / "schemathesis", "run", f"http://127.0.0.1:{server.http_port}/openapi.json",
            "--checks", checks, "--header", f"Authorization: Bearer {TOKEN}",
            "--phases", "examples,coverage,fuzzing", "--max-examples", "10", "--seed", "1", "--workers", "1",
            "--generation-database", "none", "--no-color", "--suppress-health-check", "all",
            cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(process.communicate(), timeout=300)
    assert process.returncode == 0, output.decode()[-4000:]


async def test_64_clients_over_rest_and_grpc_get_no_error(tiny_reward_dir):
    """The load test of ``python -m services.loadtest``, short: 64 concurrent clients for 3 s per transport."""
    results = await loadtest.run(tiny_reward_dir, clients=64, seconds=3.0, pairs_per_request=4)
    assert [r.transport for r in results] == ["REST", "gRPC"]
    for result in results:
        assert result.errors == 0, result.first_error
        assert result.requests > 64 and result.model_calls < result.requests, json.dumps(result.summary())
