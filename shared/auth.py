"""Who may call: bearer tokens and TLS for every gRPC and HTTP server and client, from one ``auth`` config section.

- Servers accept the tokens in ``auth.token_file`` (one per line: a mounted Secret; several lines allow a rotation)
  on every method but health. The check is made once per call in the gRPC interceptor (``shared.errors``) and in
  one FastAPI dependency (``http_dependency``). A missing or wrong token gets UNAUTHENTICATED / 401 and nothing else.
- Clients present ``auth.peer_token_files[role]`` to that role's service (``open_channel``).
- TLS: ``auth.tls.cert_file``/``key_file`` is this process's identity (served by its servers, presented by its
  clients), ``ca_file`` verifies the peers; ``mutual`` makes servers require a client certificate from that CA.
- A server without tokens starts only on a loopback address (the tests, ``make demo``). A token that is the
  manifests' placeholder, or shorter than ``MIN_TOKEN_CHARS``, is refused at start-up.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from pydantic import Field, model_validator

from shared.config import ConfigError, StrictModel

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
PLACEHOLDER_MARK = "REPLACE-ME"  # the manifests ship tokens containing this; a server refuses to start on one
HEALTH_SERVICE = "grpc.health.v1.Health"
ROLES = ("generation", "reward", "reference", "trainer", "orchestrator")


class Unauthenticated(Exception):
    """The call carries no token, or not one this server accepts."""


class TlsConfig(StrictModel):
    cert_file: str = Field(
        "",
        description="PEM certificate of this process: its servers serve it; its clients "
        "present it when the peer requires mutual TLS. Empty = plaintext",
    )
    key_file: str = Field("", description="PEM private key of cert_file")
    ca_file: str = Field(
        "",
        description="PEM CA bundle that signed the peers' certificates: clients verify servers "
        "with it, and servers verify clients with it when mutual is on",
    )
    mutual: bool = Field(False, description="servers require a client certificate signed by ca_file")
    server_name: str = Field(
        "",
        description="name to check in the servers' certificates instead of the dialled host (e.g. when dialling an IP)",
    )

    @model_validator(mode="after")
    def _pairs(self):
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together")
        if self.mutual and not (self.ca_file and self.cert_file):
            raise ValueError("mutual needs cert_file, key_file and ca_file")
        return self


class AuthConfig(StrictModel):
    token_file: str = Field(
        "",
        description="tokens this process's servers accept, one per line (a mounted Secret); empty = no token "
        "checked, allowed only on a loopback address",
    )
    peer_token_files: dict[str, str] = Field(
        default_factory=dict,
        description="token to present to each peer role: {trainer: /etc/rlhf/tokens/trainer, ...}",
    )
    metrics_require_token: bool = Field(
        False, description="the metrics port asks for a token too (Prometheus then needs bearer_token_file)"
    )
    tls: TlsConfig = Field(default_factory=TlsConfig)

    @model_validator(mode="after")
    def _known_roles(self):
        unknown = sorted(set(self.peer_token_files) - set(ROLES))
        if unknown:
            raise ValueError(f"peer_token_files: unknown role(s) {unknown}; roles are {list(ROLES)}")
        return self


def read_tokens(path: str, field: str = "auth.token_file") -> tuple[str, ...]:
    """The tokens in ``path`` (one per line, blank lines ignored); a placeholder or short token is a ConfigError
    that says what to set."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}") from None
    tokens = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not tokens:
        raise ConfigError(f"{field}: {path} holds no token")
    for token in tokens:
        if PLACEHOLDER_MARK.lower() in token.lower() or len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(
                f"{field}: {path} holds the placeholder token the manifests ship, or one shorter than "
                f"{MIN_TOKEN_CHARS} characters; put a random one there, e.g. `openssl rand -hex 32 > {path}` "
                "(Kubernetes: `kubectl create secret generic ... --from-literal=token=$(openssl rand -hex 32)`)"
            )
    return tokens


class TokenFile:
    """The tokens in a file, read again when the file changes (checked at most every ``recheck_s``): a Secret
    rotated in place (Kubernetes swaps the mounted files) takes effect without a restart. A changed file that no
    longer holds valid tokens is logged and the tokens read before stay in use."""

    def __init__(self, path: str, field: str, recheck_s: float = 5.0):
        self.path, self.field, self.recheck_s = path, field, recheck_s
        self._tokens = read_tokens(path, field)
        self._signature = self._stat()
        self._checked = time.monotonic()

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def current(self) -> tuple[str, ...]:
        now = time.monotonic()
        if now - self._checked >= self.recheck_s:
            self._checked = now
            signature = self._stat()
            if signature is not None and signature != self._signature:
                try:
                    self._tokens = read_tokens(self.path, self.field)
                    log.info("%s: %s changed; %d token(s) now in use", self.field, self.path, len(self._tokens))
                except ConfigError as exc:
                    log.error("%s changed but cannot be used (%s); keeping the tokens read before", self.field, exc)
                self._signature = signature
        return self._tokens


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class ServerAuth:
    """What a server checks: the accepted tokens (from ``token_file``, followed as it changes; none = nothing
    checked) and the TLS files (read at start-up)."""

    token_file: TokenFile | None = None
    tls: TlsConfig = field(default_factory=TlsConfig)
    metrics_require_token: bool = False

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.token_file.current() if self.token_file is not None else ()

    @classmethod
    def load(cls, config: AuthConfig, host: str, what: str = "server") -> ServerAuth:
        token_file = TokenFile(config.token_file, "auth.token_file") if config.token_file else None
        if token_file is None:
            if not is_loopback(host):
                raise ConfigError(
                    f"auth.token_file: required for a {what} bound to {host}: set it to a file holding a random "
                    "token (a server without tokens may bind a loopback address only)"
                )
            log.warning("%s on %s checks no token (auth.token_file unset): loopback only", what, host)
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(config.tls, name)
            if path:
                _read(path, f"auth.tls.{name}")
        return cls(token_file, config.tls, config.metrics_require_token)

    def accepts(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` value (``Bearer <token>``) is allowed; always, when no tokens are set."""
        tokens = self.tokens
        if not tokens:
            return True
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return False
        presented_bytes = presented.strip().encode()
        # Compare with every token (no early exit): the time taken says nothing about which one nearly matched.
        matches = [hmac.compare_digest(presented_bytes, token.encode()) for token in tokens]
        return any(matches)

    def check_grpc(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """Raises ``Unauthenticated`` unless the call to ``method`` (``/pkg.Service/Method``) may proceed."""
        if self.token_file is None or method.startswith(f"/{HEALTH_SERVICE}/"):
            return
        value = next((v for k, v in (metadata or ()) if k == "authorization"), None)
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if not self.accepts(value):
            raise Unauthenticated("missing or wrong bearer token (metadata 'authorization: Bearer <token>')")

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls.cert_file:
            return None
        pair = (_read(self.tls.key_file, "auth.tls.key_file"), _read(self.tls.cert_file, "auth.tls.cert_file"))
        root = _read(self.tls.ca_file, "auth.tls.ca_file") if self.tls.mutual else None
        return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=self.tls.mutual)

    def ssl_context(self) -> ssl.SSLContext | None:
        """For the HTTP servers (control API, REST APIs, metrics): the same certificate and client check."""
        if not self.tls.cert_file:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        if self.tls.mutual:
            context.load_verify_locations(self.tls.ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def uvicorn_tls_options(tls: TlsConfig) -> dict:
    """uvicorn.Config keyword arguments serving ``tls`` (none when plaintext)."""
    if not tls.cert_file:
        return {}
    options = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
    if tls.mutual:
        options |= {"ssl_ca_certs": tls.ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def http_dependency(server_auth: ServerAuth):
    """A FastAPI dependency answering 401 (with ``WWW-Authenticate: Bearer``) unless the request's token is
    accepted. Add it to every route but health."""
    from fastapi import Header, HTTPException

    async def require_token(authorization: str | None = Header(default=None, include_in_schema=False)) -> None:
        if not server_auth.accepts(authorization):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return require_token


# --- clients ---------------------------------------------------------------------------------------------------


def _with_token(details: grpc.aio.ClientCallDetails, token: Callable[[], str]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add("authorization", f"Bearer {token()}")
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


# grpc.aio files an interceptor under the first kind it is an instance of: one class per kind of call.
class _UnaryUnaryToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: Callable[[], str]):
        self.token = token

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self.token), request)


class _UnaryStreamToken(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: Callable[[], str]):
        self.token = token

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self.token), request)


class _StreamUnaryToken(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: Callable[[], str]):
        self.token = token

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_token(client_call_details, self.token), request_iterator)


class _StreamStreamToken(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: Callable[[], str]):
        self.token = token

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_token(client_call_details, self.token), request_iterator)


def token_interceptors(token: Callable[[], str]) -> list:
    """Client interceptors adding ``authorization: Bearer <token()>`` to every call of an aio channel."""
    return [kind(token) for kind in (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)]


@dataclass(frozen=True)
class ClientAuth:
    """What a client presents: a token per peer role (a file followed as it changes, or a fixed string) and the TLS
    files."""

    tokens: dict[str, TokenFile | str] = field(default_factory=dict)
    tls: TlsConfig = field(default_factory=TlsConfig)

    @classmethod
    def load(cls, config: AuthConfig | None) -> ClientAuth:
        if config is None:
            return cls()
        tokens = {
            role: TokenFile(path, f"auth.peer_token_files.{role}") for role, path in config.peer_token_files.items()
        }
        return cls(tokens, config.tls)

    def token(self, role: str) -> str | None:
        """The token presented to ``role`` now (the first line of its file), None when there is none."""
        source = self.tokens.get(role)
        if source is None or isinstance(source, str):
            return source
        return source.current()[0]

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS when a CA is configured (the client's certificate too, for servers that require one)."""
        if not self.tls.ca_file:
            return None
        key = _read(self.tls.key_file, "auth.tls.key_file") if self.tls.cert_file else None
        cert = _read(self.tls.cert_file, "auth.tls.cert_file") if self.tls.cert_file else None
        return grpc.ssl_channel_credentials(_read(self.tls.ca_file, "auth.tls.ca_file"), key, cert)

    def channel_options(self) -> list[tuple[str, str]]:
        if self.tls.ca_file and self.tls.server_name:
            return [("grpc.ssl_target_name_override", self.tls.server_name)]
        return []

    def open_channel(self, address: str, role: str, options: list | None = None) -> grpc.aio.Channel:
        """An aio channel to ``role``'s service at ``address``: TLS when configured, its token on every call."""
        options = [*(options or []), *self.channel_options()]
        interceptors = token_interceptors(lambda: self.token(role)) if self.token(role) else None
        credentials = self.channel_credentials()
        if credentials is not None:
            return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)

    def http_headers(self, role: str) -> dict[str, str]:
        token = self.token(role)
        return {"Authorization": f"Bearer {token}"} if token else {}
