"""Who may call: every method of every service refuses a call without the token or with a wrong one (health stays
open); TLS and mutual TLS on gRPC, the HTTP servers and the metrics port; tokens that must not start a server.

Every service runs for real on loopback with a tiny model; certificates come from a throw-away CA (trustme).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl

import grpc
import httpx
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.generation.servicer import ROLE as GENERATION
from services.healthcheck import main as healthcheck
from services.reference.servicer import ROLE as REFERENCE
from services.reward.servicer import ROLE as REWARD
from services.trainer.servicer import ROLE as TRAINER
from shared.auth import ClientAuth, ServerAuth
from shared.config import ConfigError
from shared.metrics_http import start_metrics_server
from shared.proto.rlhf.v1 import generation_pb2, reference_pb2, reward_pb2, trainer_pb2
from shared.server import ServerConfig

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
MODULES = {"generation": generation_pb2, "reward": reward_pb2, "reference": reference_pb2, "trainer": trainer_pb2}
SERVICES = {"generation": "Generation", "reward": "Reward", "reference": "Reference", "trainer": "Trainer"}
ROLES = {"generation": GENERATION, "reward": REWARD, "reference": REFERENCE, "trainer": TRAINER}


def role_config(role: str, policy_dir, auth: dict, tmp_path) -> dict:
    model = {"path": str(policy_dir)}
    return {
        "generation": {"model": model, "max_new_tokens_limit": 8, "max_samples": 8},
        "reward": {"function": "services.reward.functions:response_length"},
        "reference": {"model": model},
        "trainer": {"policy": model, "checkpoint": {"root": str(tmp_path / "checkpoints"), "every": 1000}},
    }[role] | {"auth": auth}


@contextlib.asynccontextmanager
async def serving(role: str, config: dict):
    """The role's server, built, loaded and SERVING on loopback; yields it."""
    spec = ROLES[role]
    typed = spec.config_type.model_validate(config)
    server, _ = await spec.build_server(typed, spec.load_backend(typed))
    await server.start()
    await server.set_serving(True)
    try:
        yield server
    finally:
        await server.stop(None)


def methods(role: str):
    """(full method name, request class, client streaming, server streaming) of every method of the role's service,
    from its descriptor: a method added later is covered without touching this test."""
    module = MODULES[role]
    service = module.DESCRIPTOR.services_by_name[SERVICES[role]]
    for method in service.methods:
        request = _message_class(method.input_type)
        yield f"/{service.full_name}/{method.name}", request, method.client_streaming, method.server_streaming


def _message_class(descriptor):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


async def call(
    channel: grpc.aio.Channel,
    method: str,
    request,
    client_streaming: bool,
    server_streaming: bool,
    metadata=None,
    timeout: float = 30,
):
    """Calls ``method`` with ``request`` (serialized as it is; one message for a client stream); returns the
    replies. Raises AioRpcError."""
    serialize, deserialize = (lambda m: m.SerializeToString()), (lambda b: b)
    if client_streaming:
        stub = channel.stream_unary(method, request_serializer=serialize, response_deserializer=deserialize)
        return [await stub(iter([request]), metadata=metadata, timeout=timeout)]
    if server_streaming:
        stub = channel.unary_stream(method, request_serializer=serialize, response_deserializer=deserialize)
        return [reply async for reply in stub(request, metadata=metadata, timeout=timeout)]
    stub = channel.unary_unary(method, request_serializer=serialize, response_deserializer=deserialize)
    return [await stub(request, metadata=metadata, timeout=timeout)]


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(secrets.token_hex(32) + "\n")
    return path


@pytest.mark.parametrize("role", list(ROLES))
async def test_every_method_refuses_a_missing_or_wrong_token_and_health_stays_open(
    role, tiny_policy_dir, token_file, tmp_path
):
    token = token_file.read_text().strip()
    config = role_config(role, tiny_policy_dir, {"token_file": str(token_file)}, tmp_path)
    async with serving(role, config) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        found = list(methods(role))
        assert found
        for method, request, client_streaming, server_streaming in found:
            for metadata in (
                None,
                [("authorization", "Bearer wrong-token-wrong-token")],
                [("authorization", token)],  # no scheme
                [("authorization", f"Basic {token}")],
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(channel, method, request(), client_streaming, server_streaming, metadata)
                assert refused.value.code() == UNAUTHENTICATED, (method, metadata, refused.value.details())
            # Random bytes without a token: still UNAUTHENTICATED, before anything is parsed.
            raw = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            if not (client_streaming or server_streaming):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await raw(b"\xff\x00garbage", timeout=10)
                assert refused.value.code() == UNAUTHENTICATED
            # With the token the call gets through the door (whatever an empty request then earns).
            good = [("authorization", f"Bearer {token}")]
            try:
                await call(channel, method, request(), client_streaming, server_streaming, good)
            except grpc.aio.AioRpcError as err:
                assert err.code() != UNAUTHENTICATED, (method, err.details())
        # Reflection is behind the token too; health is not.
        reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        from grpc_reflection.v1alpha import reflection_pb2

        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        stub = channel.stream_stream(
            reflection,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            [reply async for reply in stub(iter([listing]), timeout=10)]
        assert refused.value.code() == UNAUTHENTICATED
        replies = [reply async for reply in stub(iter([listing]), timeout=10, metadata=good)]
        assert SERVICES[role] in str(replies[0].list_services_response)
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_can_be_turned_off(tiny_policy_dir, tmp_path):
    config = role_config("reward", tiny_policy_dir, {}, tmp_path) | {"server": {"reflection": False}}
    async with serving("reward", config) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        from grpc_reflection.v1alpha import reflection_pb2

        stub = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as off:
            [r async for r in stub(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)]
        assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_tokens_that_must_not_start_a_server(tmp_path):
    for text, message in [
        ("", "holds no token"),
        ("REPLACE-ME-with-a-long-random-token\n", "placeholder"),
        ("short\n", "shorter than 16"),
        ("a-good-long-random-token-0123\nREPLACE-ME-too\n", "placeholder"),  # every line is checked
    ]:
        path = tmp_path / "token"
        path.write_text(text)
        from shared.auth import AuthConfig

        with pytest.raises(ConfigError, match=message):
            ServerAuth.load(AuthConfig(token_file=str(path)), "127.0.0.1")
    from shared.auth import AuthConfig

    with pytest.raises(ConfigError, match="cannot read"):
        ServerAuth.load(AuthConfig(token_file=str(tmp_path / "missing")), "127.0.0.1")
    # No token: loopback only.
    for host in ("0.0.0.0", "::", "10.1.2.3", "rlhf-reward"):
        with pytest.raises(ConfigError, match="required"):
            ServerAuth.load(AuthConfig(), host)
    for host in ("127.0.0.1", "::1", "localhost"):
        assert ServerAuth.load(AuthConfig(), host).tokens == ()
    # Several lines: any of them is accepted (a rotation in progress).
    path = tmp_path / "tokens"
    path.write_text("first-token-0123456789\nsecond-token-0123456789\n")
    auth = ServerAuth.load(AuthConfig(token_file=str(path)), "0.0.0.0")
    assert auth.accepts("Bearer first-token-0123456789") and auth.accepts("bearer second-token-0123456789")
    assert not auth.accepts("Bearer third-token-0123456789") and not auth.accepts(None)


# --------------------------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path):
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a stranger's CA; as files."""
    ca, stranger = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("orchestrator@rlhf")
    files = {}
    for name, blob in [
        ("ca", ca.cert_pem),
        ("stranger_ca", stranger.cert_pem),
        ("server_cert", server.cert_chain_pems[0]),
        ("server_key", server.private_key_pem),
        ("client_cert", client.cert_chain_pems[0]),
        ("client_key", client.private_key_pem),
    ]:
        path = tmp_path / f"{name}.pem"
        blob.write_to_path(str(path))
        files[name] = str(path)
    return files


def server_tls(pki, mutual: bool) -> dict:
    return {"cert_file": pki["server_cert"], "key_file": pki["server_key"], "ca_file": pki["ca"], "mutual": mutual}


async def _score(client_auth: ClientAuth, port: int):
    async with client_auth.open_channel(f"127.0.0.1:{port}", "reward") as channel:
        stub = channel.unary_unary(
            "/rlhf.v1.Reward/Score",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reward_pb2.ScoreResponse.FromString,
        )
        return await stub(reward_pb2.ScoreRequest(prompts=["a"], responses=["bc"]), timeout=10)


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
async def test_tls_and_mutual_tls_on_grpc_http_metrics_and_the_probe(
    mutual, pki, tiny_policy_dir, token_file, tmp_path
):
    token = token_file.read_text().strip()
    auth = {"token_file": str(token_file), "tls": server_tls(pki, mutual), "metrics_require_token": True}
    config = role_config("reward", tiny_policy_dir, auth, tmp_path) | {"server": {"http_port": 0, "metrics_port": 0}}
    async with serving("reward", config) as server:
        port = server.port
        client = {"ca_file": pki["ca"], "cert_file": pki["client_cert"], "key_file": pki["client_key"]}
        trusted = ClientAuth(tokens={"reward": token}, tls=ClientAuth.load(None).tls.model_copy(update=client))
        assert (await _score(trusted, port)).scores  # TLS, the client's certificate, the token: served
        # Plaintext to a TLS port, or a client that does not trust the server's CA: no connection.
        for stranger in (
            ClientAuth(tokens={"reward": token}),
            ClientAuth(tokens={"reward": token}, tls=trusted.tls.model_copy(update={"ca_file": pki["stranger_ca"]})),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _score(stranger, port)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # Without a client certificate: refused under mutual TLS only.
        anonymous = ClientAuth(
            tokens={"reward": token}, tls=trusted.tls.model_copy(update={"cert_file": "", "key_file": ""})
        )
        if mutual:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _score(anonymous, port)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        else:
            assert (await _score(anonymous, port)).scores
        # The container probe speaks TLS with --ca (and a certificate under mutual TLS); health needs no token.
        probe = ["--ca", pki["ca"], "--cert", pki["client_cert"], "--key", pki["client_key"], f"127.0.0.1:{port}"]
        assert await asyncio.to_thread(healthcheck, probe) == 0
        assert await asyncio.to_thread(healthcheck, [f"127.0.0.1:{port}"]) == 1  # plaintext: no answer

        # The metrics port: the same certificate, and the token (metrics_require_token). The REST API (served on
        # this event loop) likewise; async clients, so that the loop keeps serving.
        metrics = start_metrics_server(ServerConfig(metrics_port=0), server.auth)
        verify = _ssl_context(pki["ca"], (pki["client_cert"], pki["client_key"]))
        async with httpx.AsyncClient(verify=verify) as http:
            assert (await http.get(f"https://127.0.0.1:{metrics}/metrics")).status_code == 401
            bearer = {"Authorization": f"Bearer {token}"}
            scraped = await http.get(f"https://127.0.0.1:{metrics}/metrics", headers=bearer)
            assert scraped.status_code == 200 and "grpc_server_handled_total" in scraped.text
            if server.http_port is not None:  # the reward REST API
                url = f"https://127.0.0.1:{server.http_port}"
                assert (await http.get(f"{url}/v2/health/ready")).status_code == 200
                scored = await http.post(f"{url}/v1/score", json={"prompts": ["a"], "responses": ["bc"]})
                assert scored.status_code == 401
                scored = await http.post(
                    f"{url}/v1/score", json={"prompts": ["a"], "responses": ["bc"]}, headers=bearer
                )
                assert scored.status_code == 200, scored.text
        async with httpx.AsyncClient(verify=_ssl_context(pki["stranger_ca"])) as http:
            with pytest.raises(httpx.ConnectError):
                await http.get(f"https://127.0.0.1:{metrics}/metrics")
            if mutual:  # a client without a certificate is refused by the server
                async with httpx.AsyncClient(verify=_ssl_context(pki["ca"])) as anonymous:
                    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, ssl.SSLError)):
                        (await anonymous.get(f"https://127.0.0.1:{metrics}/metrics", headers=bearer)).raise_for_status()


def _ssl_context(ca: str, cert: tuple[str, str] | None = None):
    import ssl

    context = ssl.create_default_context(cafile=ca)
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


async def test_a_token_rotated_in_place_takes_effect_without_a_restart(tiny_policy_dir, tmp_path, caplog):
    """The server's token file and the client's peer token file change (as a Kubernetes Secret update swaps the
    mounted files): old and new accepted while both are listed, then only the new one; a broken file is logged and
    the tokens before it stay in use."""
    import os

    from shared.auth import AuthConfig, TokenFile

    old, new = "old-token-" + secrets.token_hex(8), "new-token-" + secrets.token_hex(8)
    server_file, client_file = tmp_path / "server-tokens", tmp_path / "client-token"
    server_file.write_text(old + "\n")
    client_file.write_text(old + "\n")
    config = role_config("reward", tiny_policy_dir, {"token_file": str(server_file)}, tmp_path)
    async with serving("reward", config) as server:
        server.auth.token_file.recheck_s = 0  # look at the file on every call (5 s in service)
        client = ClientAuth.load(AuthConfig(peer_token_files={"reward": str(client_file)}))
        client.tokens["reward"].recheck_s = 0

        def rewrite(path, text: str) -> None:  # a new file swapped in, as kubelet does (new inode, new mtime)
            staged = path.with_suffix(".new")
            staged.write_text(text)
            os.replace(staged, path)

        async def accepted(token: str) -> bool:
            return server.auth.accepts(f"Bearer {token}")

        assert (await _score(client, server.port)).scores and await accepted(old) and not await accepted(new)
        rewrite(server_file, f"{old}\n{new}\n")  # step 1: the server accepts both
        assert await accepted(old) and await accepted(new)
        rewrite(client_file, new + "\n")  # step 2: the client presents the new one, same channel code path
        assert client.token("reward") == new and (await _score(client, server.port)).scores
        rewrite(server_file, new + "\n")  # step 3: the old one is gone
        assert not await accepted(old) and (await _score(client, server.port)).scores
        rewrite(server_file, "REPLACE-ME\n")  # a broken update: refused, the tokens before stay
        assert await accepted(new) and "cannot be used" in caplog.text
    assert TokenFile(str(client_file), "x").current() == (new,)
