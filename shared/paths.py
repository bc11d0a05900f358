"""Paths named by a request are confined under a configured root: no '..', no way out through a symbolic link,
and an absolute path only when it lies under the root. Paths in a config file are the operator's and are taken as
written."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from shared.errors import InvalidInput

MAX_NAME_BYTES = 200  # below the usual 255, leaving room for the staging names written beside it
MAX_PATH_CHARS = 1024


def confine(root: str | Path, given: str, field: str) -> Path:
    """``given`` resolved under ``root`` (relative to it, or absolute inside it), or InvalidInput naming ``field``
    when it is empty, has a '..' part, or resolves outside ``root``."""
    if not given or "\x00" in given:
        raise InvalidInput(field, "is empty" if not given else "contains a NUL character")
    path = PurePosixPath(given)
    if len(given) > MAX_PATH_CHARS or any(len(part.encode()) > MAX_NAME_BYTES for part in path.parts):
        raise InvalidInput(field, f"too long: at most {MAX_PATH_CHARS} characters, {MAX_NAME_BYTES} bytes per name")
    if ".." in path.parts:
        raise InvalidInput(field, f"{given!r}: '..' is not allowed; give a path under the configured root")
    base = Path(root).resolve()
    full = (base / path).resolve()  # an absolute ``given`` stays itself
    if not full.is_relative_to(base):
        raise InvalidInput(field, f"{given!r} is not under the configured root {str(base)!r}")
    return full
