"""``python -m services.healthcheck [--service NAME] [--ca CA] HOST:PORT``: exit 0 iff grpc.health.v1 reports
SERVING.

The container health check of the model images (Docker HEALTHCHECK, compose). Kubernetes probes gRPC health
natively, except where the services serve TLS (its gRPC probes speak plaintext): there the probe runs this with
``--ca`` (and ``--cert``/``--key`` under mutual TLS). Health needs no token. Exit 1 for anything else:
NOT_SERVING (the model is still loading, or the server is draining), an unknown service name, nothing listening,
or no answer within the timeout. Imports only grpc: it runs every few seconds beside a loaded model.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(address: str, ca: str, cert: str, key: str, server_name: str) -> grpc.Channel:
    if not ca:
        return grpc.insecure_channel(address)
    with open(ca, "rb") as handle:
        root = handle.read()
    pair = [None, None]
    if cert:
        with open(key, "rb") as k, open(cert, "rb") as c:
            pair = [k.read(), c.read()]
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root, *pair), options=options)


def check(
    address: str,
    service: str = "",
    timeout: float = 3.0,
    ca: str = "",
    cert: str = "",
    key: str = "",
    server_name: str = "",
) -> str:
    """The serving status name (``SERVING``, ``NOT_SERVING``, ...) of ``service`` ("" = the whole server)."""
    with _channel(address, ca, cert, key, server_name) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("address", metavar="HOST:PORT", help="the service's gRPC address")
    parser.add_argument("--service", default="", help="a service name, e.g. rlhf.v1.Generation (default: the server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    parser.add_argument("--ca", default="", help="PEM CA that signed the server's certificate (TLS); empty = plaintext")
    parser.add_argument("--cert", default="", help="PEM client certificate, for a server that requires mutual TLS")
    parser.add_argument("--key", default="", help="PEM key of --cert")
    parser.add_argument("--server-name", default="", help="name to check in the server's certificate")
    args = parser.parse_args(argv)
    target = f"{args.address} {args.service or '(server)'}"
    try:
        status = check(args.address, args.service, args.timeout, args.ca, args.cert, args.key, args.server_name)
    except grpc.RpcError as err:
        print(f"{target}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    print(f"{target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
