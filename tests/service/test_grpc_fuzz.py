"""A gRPC fuzzer against every service: random well-formed messages built from each method's descriptor, and
random bytes, sent with a valid token. A service answers each with a status that describes the request (never
INTERNAL, UNKNOWN or UNAVAILABLE: no handler crashed, nothing got stuck) and is healthy afterwards.

Well-formed random messages may also be valid requests (OK), or valid but at odds with the service's state
(FAILED_PRECONDITION: a weight version older than the one served, a checkpoint name that does not exist).
"""

from __future__ import annotations

import random
import secrets

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.service.test_auth import ROLES, call, methods, role_config, serving

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
MESSAGES_PER_METHOD = 60
BYTES_PER_METHOD = 20

_INTS = (
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
)
_UINTS = (
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
)


def _scalar(field: FieldDescriptor, rng: random.Random):
    kind = field.type
    if kind in _INTS:
        bits = (
            32
            if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32)
            else 64
        )
        return rng.choice([0, 1, -1, 2, 7, 1 << 20, -(1 << (bits - 1)), (1 << (bits - 1)) - 1, rng.randint(-100, 100)])
    if kind in _UINTS:
        bits = 32 if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32) else 64
        return rng.choice([0, 1, 2, 3, 8, 1 << 20, (1 << bits) - 1, rng.randint(0, 100)])
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return rng.choice([0.0, 1.0, -1.0, 0.5, 1e30, -1e30, float("nan"), float("inf"), -float("inf"), rng.random()])
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind == FieldDescriptor.TYPE_STRING:
        return rng.choice(
            [
                "",
                "a",
                "the cat is",
                "../../etc",
                "/etc/passwd",
                "é漢\u0000",
                "x" * 300,
                "127.0.0.1:1",
                "step-000000001",
                "user",
            ]
        )
    if kind == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 3, 4, 8, 16, 64]))
    if kind == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return rng.choice([*values, 99])
    raise AssertionError(f"unhandled field type {kind}")


def random_message(cls, rng: random.Random, depth: int = 0):
    """A random instance of message class ``cls``: each field set or not, repeated fields 0-4 long, nested
    messages down to a few levels."""
    message = cls()
    for field in cls.DESCRIPTOR.fields:
        if rng.random() < 0.3:
            continue
        repeated = field.is_repeated
        count = rng.choice([0, 1, 2, 4]) if repeated else 1
        for _ in range(count):
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if field.message_type.GetOptions().map_entry or depth > 3:
                    break
                child_cls = type(getattr(cls(), field.name).add()) if repeated else type(getattr(cls(), field.name))
                child = random_message(child_cls, rng, depth + 1)
                if repeated:
                    getattr(message, field.name).add().CopyFrom(child)
                else:
                    getattr(message, field.name).CopyFrom(child)
            elif repeated:
                getattr(message, field.name).append(_scalar(field, rng))
            else:
                setattr(message, field.name, _scalar(field, rng))
    return message


@pytest.mark.parametrize("role", list(ROLES))
async def test_random_messages_and_bytes_get_a_status_that_describes_them(role, tiny_policy_dir, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(secrets.token_hex(32))
    good = [("authorization", f"Bearer {token_file.read_text()}")]
    config = role_config(role, tiny_policy_dir, {"token_file": str(token_file)}, tmp_path)
    rng = random.Random(f"fuzz-{role}")
    seen: dict[str, set[str]] = {}
    async with serving(role, config) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for method, request_cls, client_streaming, server_streaming in methods(role):
            codes = seen.setdefault(method, set())
            cases = [random_message(request_cls, rng) for _ in range(MESSAGES_PER_METHOD)]
            for request in cases:
                try:
                    await call(channel, method, request, client_streaming, server_streaming, good, timeout=60)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as err:
                    code = err.code()
                    assert code in ALLOWED, f"{method} answered {code.name} to {request!r}: {err.details()}"
                codes.add(code.name)
            raw = _raw(channel, method, client_streaming, server_streaming)
            for _ in range(BYTES_PER_METHOD):
                blob = rng.randbytes(rng.choice([1, 2, 5, 17, 100]))
                try:
                    await raw(blob, good)
                    code = grpc.StatusCode.OK  # random bytes can parse as a message (unknown fields are kept)
                except grpc.aio.AioRpcError as err:
                    code = err.code()
                    assert code in ALLOWED, f"{method} answered {code.name} to bytes {blob!r}: {err.details()}"
                codes.add(code.name)
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    print(role, {m.rsplit("/", 1)[1]: sorted(c) for m, c in seen.items()})  # what each method answered (-s)


def _raw(channel, method: str, client_streaming: bool, server_streaming: bool):
    identity = lambda b: b  # noqa: E731

    async def send(blob: bytes, metadata):
        if client_streaming:
            stub = channel.stream_unary(method, request_serializer=identity, response_deserializer=identity)
            return await stub(iter([blob]), metadata=metadata, timeout=60)
        if server_streaming:
            stub = channel.unary_stream(method, request_serializer=identity, response_deserializer=identity)
            return [r async for r in stub(blob, metadata=metadata, timeout=60)]
        stub = channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)
        return await stub(blob, metadata=metadata, timeout=60)

    return send
