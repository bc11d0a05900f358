"""The client side of TGI's REST protocol (the ``text-generation`` package): for the roles that do not train
(reference log-probs, candidates for preference labelling), a text-generation-inference server can stand in for a
model loaded in this process. The generation service speaks the same protocol on its ``server.http_port``.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import aiohttp
from pydantic import Field, field_validator
from text_generation import AsyncClient
from text_generation import errors as tgi_errors

from shared.auth import ROLES, ClientAuth
from shared.config import StrictModel
from shared.errors import InvalidInput, NotReady

T = TypeVar("T")


class TgiConfig(StrictModel):
    url: str = Field(
        "", description="base URL of the TGI server, e.g. http://tgi:8080 (or a generation service's http_port)"
    )
    timeout_s: float = Field(60.0, gt=0, description="longest wait for one request's answer")
    token_role: str = Field(
        "generation",
        description="the bearer token presented is auth.peer_token_files[token_role] (none when that is unset)",
    )
    max_concurrent_requests: int = Field(32, ge=1, description="requests in flight at once (the server batches them)")

    @field_validator("token_role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role and role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {list(ROLES)} (empty = no token)")
        return role


def tgi_client(config: TgiConfig, auth: ClientAuth) -> AsyncClient:
    """A ``text_generation.AsyncClient`` for ``config.url`` presenting the token of ``config.token_role``."""
    return AsyncClient(config.url.rstrip("/"), headers=auth.http_headers(config.token_role), timeout=config.timeout_s)


async def call_tgi(request: Awaitable[T], config: TgiConfig, field: str) -> T:
    """Awaits one client call, its failures as the project's exceptions: a refused request InvalidInput naming
    ``field``, a server that is down, loading or overloaded NotReady (callers retry), no answer in time
    TimeoutError; anything else RuntimeError."""
    try:
        return await request
    except (tgi_errors.ValidationError, tgi_errors.BadRequestError) as exc:
        raise InvalidInput(field, f"the TGI server at {config.url} refused it: {exc}") from exc
    except (tgi_errors.OverloadedError, tgi_errors.ShardNotReadyError, aiohttp.ClientConnectionError) as exc:
        raise NotReady(f"the TGI server at {config.url} cannot take it now: {type(exc).__name__}: {exc}") from exc
    except TimeoutError as exc:
        raise TimeoutError(f"the TGI server at {config.url} did not answer within {config.timeout_s} s") from exc
    except (tgi_errors.GenerationError, tgi_errors.UnknownError, aiohttp.ClientError) as exc:
        raise RuntimeError(f"the TGI server at {config.url} failed: {type(exc).__name__}: {exc}") from exc
