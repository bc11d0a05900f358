"""Paths named by a request are confined under a configured root: no '..', no way out through a symbolic link,
and an absolute path only when it lies under the root. Paths in a config file are the operator's and are taken as
written."""

from __future__ import annotations

import os
import shutil
import uuid
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


REPLACED_SUFFIX = ".old"  # .<name>.<random>.old: what replace_directory moved aside, for the instant of the swap


def replace_directory(staging: Path, directory: Path) -> None:
    """Puts the complete directory ``staging`` (a sibling of ``directory``) in its place: a reader sees the old
    contents or the new, never a mix. What was there is renamed aside first and removed after; if the second rename
    fails it is put back. Both renames are made durable (fsync of the parent)."""
    old = None
    if directory.exists() or directory.is_symlink():
        old = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}{REPLACED_SUFFIX}")
        directory.rename(old)
    try:
        staging.rename(directory)
    except OSError:
        if old is not None:
            old.rename(directory)
        raise
    fsync(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync(path: Path) -> None:
    """Flushes a file's or a directory's contents (a directory: its entries, so a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
