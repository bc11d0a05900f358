"""TGI compatibility: the generation service's TGI REST protocol (``services/generation/tgi.py``) through TGI's own
Python client (``text-generation``), and the ``tgi`` backends that use that client (reference log-probs, candidates
for preference labelling).

Real TGI cannot run here (no GPU, no Rust router in the environment): the server in these tests is the project's
own TGI-compatible endpoint, started on loopback with a tiny model; the client is TGI's, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import grpc
import httpx
import pytest
import torch
from text_generation import AsyncClient, Client
from text_generation import errors as tgi_errors

from services.generation.backend import GenerationBackend
from services.generation.config import GenerationConfig
from services.generation.servicer import build_server
from services.pipeline.config import PipelineConfig
from services.pipeline.run import Pipeline
from services.pipeline.tgi import TgiGeneration
from services.reference.backend import ReferenceBackend
from services.reference.config import ReferenceConfig
from services.reference.servicer import build_server as build_reference_server
from services.reference.servicer import load_backend as load_reference_backend
from services.reference.tgi import TgiReferenceBackend
from shared import codec
from shared.auth import AuthConfig, ClientAuth
from shared.convert import conversations_to_pb
from shared.proto.rlhf.v1 import generation_pb2, generation_pb2_grpc, reference_pb2, reference_pb2_grpc
from shared.tgi import TgiConfig
from shared.tiny_models import CHAT_TEMPLATE, build_policy
from shared.types import SamplingParams
from tests.service.grpc_helpers import expect_status, running

# text_generation 0.7.0 calls pydantic's deprecated .dict() on every request
pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")

PROMPT = "the cat is"
TOKEN = "tgi-test-token-0123456789"


def _config(model_dir, **extra) -> GenerationConfig:
    return GenerationConfig.model_validate(
        {
            "model": {"path": str(model_dir)},
            "server": {"http_port": 0},
            "max_new_tokens_limit": 64,
            "max_samples": 32,
            "micro_batch_size": 4,
            **extra,
        }
    )


@pytest.fixture(scope="module")
def config(tiny_policy_dir):
    return _config(tiny_policy_dir)


@pytest.fixture(scope="module")
def backend(config):
    return GenerationBackend(config)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


@contextlib.asynccontextmanager
async def serving(config, backend):
    """The generation service on loopback: (gRPC stub, base URL of its TGI protocol)."""
    server, _ = await build_server(config, backend)
    async with running(server) as channel:
        yield generation_pb2_grpc.GenerationStub(channel), f"http://127.0.0.1:{server.http_port}"


async def _grpc_generate(stub, max_new_tokens: int, temperature: float, seed: int | None = None, **prompt):
    sampling = generation_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    reply = await stub.Generate(generation_pb2.GenerateRequest(sampling=sampling, **prompt), timeout=60)
    ids = codec.ragged_from_pb(reply.response_ids, "r")[0]
    return reply, ids, codec.ragged_from_pb(reply.response_logprobs, "l")[0]


def _check_against_grpc(reply, grpc_reply, ids, logprobs, seed):
    details = reply.details
    assert reply.generated_text == grpc_reply.texts[0]
    assert [t.id for t in details.tokens] == ids.tolist()
    torch.testing.assert_close(torch.tensor([t.logprob for t in details.tokens]), logprobs, atol=1e-6, rtol=0)
    assert details.generated_tokens == ids.numel() and details.seed == seed
    eos = grpc_reply.finish_reasons[0] == generation_pb2.FINISH_REASON_EOS
    assert details.finish_reason == ("eos_token" if eos else "length")
    assert "".join(t.text for t in details.tokens if not t.special) == reply.generated_text


@pytest.mark.parametrize("sampled", [True, False], ids=["seeded", "greedy"])
async def test_client_generate_gives_the_grpc_samples(config, backend, sampled):
    """Client and AsyncClient: the same seed gives the text, token ids and log-probs of the gRPC Generate."""
    seed = 7 if sampled else None
    async with serving(config, backend) as (stub, url):
        grpc_reply, ids, logprobs = await _grpc_generate(stub, 12, 1.0 if sampled else 0.0, seed, prompts=[PROMPT])
        kwargs = {"do_sample": sampled, "seed": seed, "max_new_tokens": 12}
        async_reply = await AsyncClient(url).generate(PROMPT, **kwargs)
        sync_reply = await asyncio.to_thread(Client(url).generate, PROMPT, **kwargs)
    for reply in (async_reply, sync_reply):
        _check_against_grpc(reply, grpc_reply, ids, logprobs, seed)
        assert reply.details.prefill == []  # decoder_input_details not asked for


async def test_stream_sends_each_token_as_it_is_sampled(config, backend, monkeypatch):
    """generate_stream: the first event arrives while the model thread is held after its first token (so events
    are not sent after generation ends), and the events are the tokens generate gives for the same seed."""
    released, held_too_long = threading.Event(), []
    generate = backend.generate

    def held_after_first_token(prompts, params, on_token=None):
        count = []

        def hold(token_id, logprob):
            stop = on_token(token_id, logprob)
            count.append(token_id)
            if len(count) == 1 and not released.wait(20):
                held_too_long.append(True)
            return stop

        return generate(prompts, params, hold if on_token else None)

    kwargs = {"do_sample": True, "seed": 11, "max_new_tokens": 10}
    async with serving(config, backend) as (_, url):
        monkeypatch.setattr(backend, "generate", held_after_first_token)
        stream = AsyncClient(url).generate_stream(PROMPT, **kwargs)
        first = await anext(stream)
        released.set()
        events = [first, *[event async for event in stream]]
        monkeypatch.setattr(backend, "generate", generate)
        reply = await AsyncClient(url).generate(PROMPT, **kwargs)
        sync_events = await asyncio.to_thread(lambda: list(Client(url).generate_stream(PROMPT, **kwargs)))
    assert not held_too_long and len(events) >= 2
    for stream_events in (events, sync_events):
        assert [e.token for e in stream_events] == reply.details.tokens
        assert all(e.generated_text is None and e.details is None for e in stream_events[:-1])
        last = stream_events[-1]
        assert last.generated_text == reply.generated_text
        assert last.details.finish_reason == reply.details.finish_reason and last.details.seed == 11
        assert last.details.generated_tokens == len(stream_events)


async def test_prefill_logprobs_are_the_reference_logprobs(config, backend, tiny_policy_dir):
    text = "the old man was happy and the dog"
    async with serving(config, backend) as (_, url):
        reply = await AsyncClient(url).generate(text, max_new_tokens=1, decoder_input_details=True)
    prompt = backend.tokenize([text])[0]
    prefill = reply.details.prefill
    assert [t.id for t in prefill] == prompt.tolist()
    assert [t.text for t in prefill] == [backend.tokenizer.decode([i]) for i in prompt.tolist()]
    assert prefill[0].logprob is None
    reference = ReferenceBackend(ReferenceConfig.model_validate({"model": {"path": str(tiny_policy_dir)}}))
    expected = reference.logprobs([(prompt[:1], prompt[1:])])[0]
    torch.testing.assert_close(torch.tensor([t.logprob for t in prefill[1:]]), expected, atol=1e-5, rtol=0)


async def test_stop_sequences_and_full_text(config, backend):
    async with serving(config, backend) as (_, url):
        client = AsyncClient(url)
        greedy = await client.generate(PROMPT, max_new_tokens=16)
        tokens = greedy.details.tokens
        shown = [k for k, t in enumerate(tokens) if t.text and not t.special]
        assert len(shown) >= 4, "the greedy continuation is too short for this test"
        stop = "".join(t.text for t in tokens[: shown[2] + 1])  # ends where the third token with text ends
        stopped = await client.generate(PROMPT, max_new_tokens=16, stop_sequences=[stop], return_full_text=True)
        async with httpx.AsyncClient(base_url=url) as http:  # POST / returns the full text unless told otherwise
            compat = (await http.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}})).json()
    assert stopped.details.finish_reason == "stop_sequence"
    assert stopped.generated_text == PROMPT + stop
    assert stopped.details.tokens == greedy.details.tokens[: len(stopped.details.tokens)]
    assert isinstance(compat, list) and compat[0]["generated_text"].startswith(PROMPT)


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/generate", {"parameters": {"top_n_tokens": 2}}, "parameters.top_n_tokens"),
        ("/generate", {"parameters": {"grammar": {"type": "regex", "value": "a+"}}}, "parameters.grammar"),
        ("/generate", {"parameters": {"best_of": 2, "do_sample": True}}, "parameters.best_of"),
        ("/generate", {"parameters": {"repetition_penalty": 1.2}}, "parameters.repetition_penalty"),
        ("/generate", {"parameters": {"temperature": -1}}, "parameters.temperature"),
        ("/generate", {"parameters": {"max_new_tokens": 1000}}, "parameters.max_new_tokens"),
        ("/generate", {"parameters": {"stop": [""]}}, "parameters.stop[0]"),
        ("/generate", {"parameters": {"no_such_thing": 1}}, "parameters.no_such_thing"),
        ("/generate", {"inputs": ""}, "inputs"),
        ("/generate", {"stream": True}, "stream"),
        ("/generate_stream", {"parameters": {"decoder_input_details": True}}, "parameters.decoder_input_details"),
        ("/", {"stream": True, "parameters": {"decoder_input_details": True}}, "parameters.decoder_input_details"),
    ],
)
async def test_bad_parameters_are_refused_naming_the_field(config, backend, route, body, field):
    async with serving(config, backend) as (_, url), httpx.AsyncClient(base_url=url) as http:
        answer = await http.post(route, json={"inputs": PROMPT, **body})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error_type"] == "validation" and field in answer.json()["error"]


async def test_the_client_raises_tgis_validation_error(config, backend):
    async with serving(config, backend) as (_, url):
        with pytest.raises(tgi_errors.ValidationError, match=r"parameters\.top_n_tokens"):
            await AsyncClient(url).generate(PROMPT, top_n_tokens=2)


async def test_a_token_is_required_but_not_for_health(tiny_policy_dir, backend, token_file):
    config = _config(tiny_policy_dir, auth={"token_file": str(token_file)})
    async with serving(config, backend) as (_, url), httpx.AsyncClient(base_url=url) as http:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
            for method, route in (("POST", "/generate"), ("POST", "/generate_stream"), ("POST", "/"), ("GET", "/info")):
                answer = await http.request(method, route, json=body, headers=headers)
                assert answer.status_code == 401, (route, headers, answer.text)
                assert answer.json()["error_type"] == "authentication"
        assert (await http.get("/health")).status_code == 200
        headers = ClientAuth.load(AuthConfig(peer_token_files={"generation": str(token_file)})).http_headers(
            "generation"
        )
        reply = await AsyncClient(url, headers=headers).generate(PROMPT, max_new_tokens=2)
        info = (await http.get("/info", headers=headers)).json()
    assert reply.details.generated_tokens >= 1
    assert info["model_id"] == str(tiny_policy_dir) and info["policy_version"] == 0


async def test_health_is_503_until_the_model_is_loaded(config, backend):
    server, _ = await build_server(config, None)
    async with (
        running(server, serving=False),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}") as http,
    ):
        loading = await http.get("/health")
        refused = await http.post("/generate", json={"inputs": PROMPT})
        server.attach(backend)
        ready = await http.get("/health")
    assert loading.status_code == 503 and loading.json() == {"error": "unhealthy", "error_type": "healthcheck"}
    assert refused.status_code == 503 and refused.json()["error_type"] == "overloaded"  # the client: retry later
    assert ready.status_code == 200


async def test_reference_tgi_backend_matches_the_local_one(pretrained_policy_dir, token_file):
    """The reference service with ``backend: tgi`` pointed at the generation service's TGI protocol (with its
    token) returns the local backend's log-probs of the same samples.

    The pretrained tiny policy: the random one samples byte tokens that are not valid UTF-8 on their own and merges
    its tokenizer would not make, which no text can carry to a TGI server (refused, as the last checks show)."""
    generation_config = _config(pretrained_policy_dir, auth={"token_file": str(token_file)})
    backend = GenerationBackend(generation_config)
    async with serving(generation_config, backend) as (stub, url):
        reply = await stub.Generate(
            generation_pb2.GenerateRequest(
                prompts=["the cat is", "my friend", "the weather was very"],
                sampling=generation_pb2.SamplingParams(
                    max_new_tokens=10, temperature=1.0, seed=3, samples_per_prompt=2
                ),
            ),
            timeout=60,
            metadata=(("authorization", f"Bearer {TOKEN}"),),
        )
        request = reference_pb2.LogProbsRequest(prompt_ids=reply.prompt_ids, response_ids=reply.response_ids)
        local_config = ReferenceConfig.model_validate({"model": {"path": str(pretrained_policy_dir)}})
        tgi_config = ReferenceConfig.model_validate(
            {
                "model": {"path": str(pretrained_policy_dir)},
                "backend": "tgi",
                "tgi": {"url": url},
                "auth": {"peer_token_files": {"generation": str(token_file)}},
            }
        )
        tgi_backend = load_reference_backend(tgi_config)
        assert isinstance(tgi_backend, TgiReferenceBackend) and not hasattr(tgi_backend, "model")
        await asyncio.to_thread(tgi_backend.warm_up)  # blocking: the generation service runs on this loop
        local_server, _ = await build_reference_server(local_config, ReferenceBackend(local_config))
        tgi_server, _ = await build_reference_server(tgi_config, tgi_backend)
        async with running(local_server) as local_channel, running(tgi_server) as tgi_channel:
            local = await reference_pb2_grpc.ReferenceStub(local_channel).LogProbs(request, timeout=30)
            tgi_stub = reference_pb2_grpc.ReferenceStub(tgi_channel)
            via_tgi = await tgi_stub.LogProbs(request, timeout=30)
            # ids that are not the tokenizer's encoding of their text (" cat" spelled out) cannot go as text
            the, cat = (torch.tensor(backend.tokenizer(text)["input_ids"]) for text in ("the", " cat"))
            spelled = torch.tensor(backend.tokenizer.convert_tokens_to_ids(["Ġ", "c", "a", "t"]))
            assert backend.tokenizer.decode(spelled) == " cat" and not torch.equal(spelled, cat)
            odd = reference_pb2.LogProbsRequest(
                prompt_ids=codec.ragged_to_pb([the, the], torch.int64),
                response_ids=codec.ragged_to_pb([cat, spelled], torch.int64),
            )
            await expect_status(tgi_stub.LogProbs(odd, timeout=30), grpc.StatusCode.INVALID_ARGUMENT, "response_ids[1]")
            hot = reference_pb2.LogProbsRequest(
                prompt_ids=reply.prompt_ids, response_ids=reply.response_ids, temperature=0.7
            )
            await expect_status(tgi_stub.LogProbs(hot, timeout=30), grpc.StatusCode.INVALID_ARGUMENT, "temperature")
    responses = codec.ragged_from_pb(reply.response_ids, "r")
    expected = codec.ragged_from_pb(local.logprobs, "l")
    got = codec.ragged_from_pb(via_tgi.logprobs, "l")
    for want, have, response in zip(expected, got, responses, strict=True):
        assert have.shape == response.shape
        torch.testing.assert_close(have, want, atol=1e-5, rtol=0)


async def test_candidates_from_a_tgi_server(config, backend):
    """The pipeline's TGI candidate sampler (a GenerationClient): K texts per prompt, prompt-major, seeded."""
    prompts = ["the cat is", "my friend", "the day was"]
    async with serving(config, backend) as (_, url):
        sampler = TgiGeneration(TgiConfig(url=url), ClientAuth.load(None))
        params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, samples_per_prompt=2)
        first = await sampler.generate(prompts, params)
        again = await sampler.generate(prompts, params)
        second_share = await sampler.generate(prompts[1:], SamplingParams(**{**vars(params), "seed": 6}))
        greedy = await sampler.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0, samples_per_prompt=2))
        direct = await AsyncClient(url).generate(prompts[1], do_sample=True, seed=(5 + 1) * 2 + 0, max_new_tokens=8)
    assert first.prompts == [p for p in prompts for _ in range(2)] and len(first.texts) == 6
    assert first.texts == again.texts and first.texts[2:] == second_share.texts
    assert first.texts[2] == direct.generated_text
    assert set(first.finish_reasons) <= {"eos", "length"} and first.tokens is None
    assert greedy.texts[0::2] == greedy.texts[1::2]


async def test_a_chat_template_rendered_by_the_client(tmp_path_factory):
    """TGI's /generate takes text: a client renders the chat template itself and sends it with
    add_special_tokens false (the template places its own special tokens); the prompt ids and the sample are those
    of the gRPC Generate with the conversation."""
    model_dir = build_policy(tmp_path_factory.mktemp("tgi-chat-policy"), chat_template=CHAT_TEMPLATE)
    config = _config(model_dir)
    backend = GenerationBackend(config)
    conversation = [{"role": "user", "content": "the day was"}]
    rendered = backend.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    async with serving(config, backend) as (stub, url), httpx.AsyncClient(base_url=url) as http:
        grpc_reply, ids, _ = await _grpc_generate(stub, 8, 1.0, 4, conversations=conversations_to_pb([conversation]))
        parameters = {"do_sample": True, "seed": 4, "max_new_tokens": 8, "details": True, "decoder_input_details": True}
        body = {"inputs": rendered, "add_special_tokens": False, "parameters": parameters}
        answer = (await http.post("/generate", json=body)).json()
    assert [t["id"] for t in answer["details"]["prefill"]] == backend.tokenize_conversations([conversation])[0].tolist()
    assert answer["generated_text"] == grpc_reply.texts[0]
    assert [t["id"] for t in answer["details"]["tokens"]] == ids.tolist()


def test_the_pipeline_samples_candidates_from_a_tgi_server(config, backend, tmp_path):
    """``preferences.source: tgi``: the pipeline starts no generation service and samples from the server named.
    A sync test (the pipeline runs its own event loop): the server runs on a loop in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server, _ = await build_server(config, backend)
        await server.start()
        await server.set_serving(True)
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    url = f"http://127.0.0.1:{server.http_port}"
    prompts = ["the cat is", "my friend", "the day was"]
    try:
        stage = {"source": "tgi", "tgi": {"url": url}, "samples_per_prompt": 2, "max_new_tokens": 6}
        pipeline = Pipeline(PipelineConfig.model_validate({"runs_dir": str(tmp_path), "preferences": stage}))
        texts = pipeline.sample_candidates(tmp_path / "no-model-needed", prompts)
        params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=0, samples_per_prompt=2)
        direct = asyncio.run(TgiGeneration(TgiConfig(url=url), ClientAuth.load(None)).generate(prompts, params))
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    assert texts == direct.texts and len(texts) == 6
    assert not (tmp_path / "processes").exists()  # no service started


def test_a_tgi_backend_needs_a_url():
    with pytest.raises(ValueError, match=r"tgi\.url: required"):
        ReferenceConfig.model_validate({"backend": "tgi"})
    with pytest.raises(ValueError, match=r"tgi\.url: required"):
        PipelineConfig.model_validate({"preferences": {"source": "tgi"}})
    with pytest.raises(ValueError, match="unknown role"):
        TgiConfig(url="http://x", token_role="nobody")
