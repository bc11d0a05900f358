"""``rlhf fetch-model``: puts a model into a directory (a service's ``model.path`` on the ``models`` volume), whole or
not at all.

``--source`` is one of

- ``hf://<repo_id>[@revision]``: the Hugging Face hub (``huggingface_hub.snapshot_download``). The token is
  ``--token-file``'s, else huggingface_hub's own: ``HF_TOKEN``, else the file ``HF_TOKEN_PATH`` names (the Kubernetes
  Job mounts its optional Secret there), else none. Pin a commit: a branch is fetched once, then skipped (below).
- an fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``az://...``): its protocol's backend (s3fs, gcsfs, adlfs...)
  must be installed, and finds its credentials itself (``AWS_*``...). The project's images ship none of them.
- ``file://<path>`` or a path: a directory on this machine.

The files land in a staging directory beside the destination (the same filesystem, so that the final rename is
atomic), are checked (a ``config.json`` that transformers loads, safetensors files whose sizes match their headers,
every shard an index names), get a marker (``.rlhf-source.json``: the source and revision) and are renamed into
place: a service never sees half a model. A destination whose marker names the same source and revision is left as
it is (``force`` fetches again). Weight formats the services never load (they read safetensors only:
``use_safetensors=True`` in shared/modeling.py) are not fetched: many repositories hold a model twice or three times
(``*.bin``, ``original/*.pth``, GGUF, ONNX).

One fetch per destination at a time: a fetch first removes the staging directories a killed one left beside it.
"""

from __future__ import annotations

import enum
import fnmatch
import glob
import json
import logging
import posixpath
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from shared.paths import REPLACED_SUFFIX, replace_directory

log = logging.getLogger(__name__)

MARKER = ".rlhf-source.json"
HUB_SCHEME = "hf://"
STAGING_SUFFIX = ".tmp"  # .<name>.<random>.tmp: the files being fetched
# Weights in formats the services never load: not fetched (matched against paths inside the source, as the hub does).
SKIPPED_PATTERNS = (
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.ot",
    "*.onnx",
    "*.onnx_data",
    "*.gguf",
    "*.tflite",
)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class FetchError(Exception):
    """A model that cannot be fetched: a bad source, missing credentials, the network, an incomplete model. The
    message says which (``rlhf fetch-model`` prints it and exits with 2)."""


class SourceKind(enum.Enum):
    HUB = "hub"  # the Hugging Face hub
    FILES = "files"  # an fsspec URL or a local directory


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    location: str  # HUB: the repo id; FILES: the URL, or the absolute path of a local directory
    revision: str | None = None  # HUB: a branch, tag or commit; None: the default branch

    @classmethod
    def parse(cls, text: str) -> Source:
        if text.startswith(HUB_SCHEME):
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            repo_id, at, revision = text.removeprefix(HUB_SCHEME).partition("@")
            try:
                validate_repo_id(repo_id)
            except HFValidationError as exc:
                raise FetchError(f"bad source {text!r}: {repo_id!r} is not a Hugging Face repo id ({exc})") from None
            if at and not revision:
                raise FetchError(f"bad source {text!r}: no revision after '@'")
            return cls(SourceKind.HUB, repo_id, revision or None)
        if not text:
            raise FetchError("bad source '': give hf://<repo_id>[@revision], an fsspec URL or a directory")
        if text.startswith("file://"):
            text = text.removeprefix("file://")
        if _URL.match(text):
            return cls(SourceKind.FILES, text)
        return cls(SourceKind.FILES, str(Path(text).resolve()))

    @property
    def name(self) -> str:
        """The source without its revision, as the marker records it."""
        return HUB_SCHEME + self.location if self.kind is SourceKind.HUB else self.location

    def __str__(self) -> str:
        return self.name + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class FetchResult:
    dest: str
    source: str
    revision: str | None
    skipped: bool  # the destination already held this source and revision
    files: int
    bytes: int


def resolve_token(token_file: Path | None) -> str | None:
    """The hub token: ``token_file``'s content, else huggingface_hub's (``HF_TOKEN``, then ``HF_TOKEN_PATH``'s file
    or a ``huggingface-cli login``), else None."""
    if token_file is None:
        from huggingface_hub import get_token

        return get_token()
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise FetchError(f"cannot read the token file {token_file}: {exc.strerror}") from None
    if not token:
        raise FetchError(f"the token file {token_file} is empty")
    return token


def fetch_model(source: Source, dest: Path, token: str | None = None, force: bool = False) -> FetchResult:
    """Puts ``source`` at ``dest`` (see the module's docstring); raises FetchError with a message that never holds
    ``token``."""
    dest = Path(dest).absolute()
    marker = {"source": source.name, "revision": source.revision}
    if not force and _read_marker(dest) == marker:
        log.info("%s already holds %s: left as it is (--force fetches it again)", dest, source)
        return FetchResult(str(dest), source.name, source.revision, True, *_count(dest))
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(dest)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=STAGING_SUFFIX, dir=dest.parent))
    except OSError as exc:
        raise FetchError(f"cannot write beside {dest}: {exc}") from None
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from services that run as another user
        log.info("fetching %s into %s", source, staging)
        if source.kind is SourceKind.HUB:
            _download_from_hub(source, staging, token)
        else:
            _copy_files(source, staging)
        verify_model_dir(staging, str(source))
        marker["fetched_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        files, size = _count(staging)
        _put_in_place(staging, dest)
    except OSError as exc:  # the volume: full, read-only, gone
        raise FetchError(f"cannot write {dest}: {_redacted(exc, token)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s now holds %s: %d files, %d bytes", dest, source, files, size)
    return FetchResult(str(dest), source.name, source.revision, False, files, size)


def verify_model_dir(directory: Path, what: str) -> None:
    """Raises FetchError unless ``directory`` holds what the services load: a ``config.json`` that transformers
    reads, at least one safetensors file, each exactly as long as its header says (a cut-off copy is shorter), and
    every shard that a ``*.safetensors.index.json`` names."""
    if not (directory / "config.json").is_file():
        raise FetchError(f"{what} holds no config.json: not a Hugging Face model directory")
    import transformers

    try:
        transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise FetchError(
            f"{what}: its config.json does not load with transformers {transformers.__version__}: {exc}"
        ) from None
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        raise FetchError(f"{what} holds no *.safetensors weights (the services load no other format)")
    for path in weights:
        _check_safetensors(path, what)
    for index in directory.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as exc:
            raise FetchError(f"{what}: {index.name} is not a safetensors index ({exc})") from None
        missing = sorted(s for s in shards if not (directory / s).is_file())
        if missing:
            raise FetchError(f"{what}: {index.name} names shards that are missing: {', '.join(missing)}")


def _check_safetensors(path: Path, what: str) -> None:
    """The safetensors library opens the file only if its header parses and the tensors' bytes cover the file
    exactly: a cut-off or padded file is refused (it reads the header alone, not the weights)."""
    from safetensors import SafetensorError, safe_open

    size = path.stat().st_size
    if size < 8:
        raise FetchError(f"{what}: {path.name} is cut off ({size} bytes, not even its header)")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as exc:
        raise FetchError(f"{what}: {path.name} ({size} bytes) is incomplete or not a safetensors file: {exc}") from None


def _download_from_hub(source: Source, staging: Path, token: str | None) -> None:
    import requests
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        XetError,
    )

    which_token = "the token given" if token else "no token: set HF_TOKEN or --token-file"
    try:
        snapshot_download(
            source.location,
            revision=source.revision,
            token=token,
            local_dir=staging,
            ignore_patterns=list(SKIPPED_PATTERNS),
        )
    except GatedRepoError:
        raise FetchError(
            f"{source} is gated: accept its terms on the hub with the account of the token ({which_token})"
        ) from None
    except RepositoryNotFoundError:
        raise FetchError(
            f"{source}: no such repository on {constants.ENDPOINT}, or a private one ({which_token})"
        ) from None
    except RevisionNotFoundError:
        raise FetchError(f"{source}: {source.location} has no revision {source.revision!r}") from None
    except LocalEntryNotFoundError:  # huggingface_hub's answer to a connection that failed (before the HTTP errors)
        reason = (
            "HF_HUB_OFFLINE is set"
            if constants.HF_HUB_OFFLINE
            else f"the network: can this machine reach {constants.ENDPOINT} (proxy, egress policy, DNS)?"
        )
        raise FetchError(f"{source}: cannot reach the hub ({reason})") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "no answer"
        if status in (401, 403):
            raise FetchError(f"{source}: the hub refused the download ({status}; {which_token})") from None
        raise FetchError(f"{source}: the hub answered {status}: {_redacted(exc, token)}") from None
    except (requests.RequestException, XetError) as exc:
        raise FetchError(f"{source}: the download failed ({type(exc).__name__}: {_redacted(exc, token)})") from None
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # snapshot_download's bookkeeping: not part of the model


def _copy_files(source: Source, staging: Path) -> None:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(source.location)
    except ImportError as exc:  # a known protocol whose backend is not installed: fsspec names the package
        raise FetchError(f"{source}: {exc} (the project's images ship no object-store backend)") from None
    except ValueError as exc:
        raise FetchError(f"bad source {source!r}: {exc}") from None
    root = root.rstrip("/") or "/"
    try:
        if not fs.isdir(root):
            raise FetchError(f"{source} is not a directory" + ("" if fs.exists(root) else " (it does not exist)"))
        for remote in sorted(fs.find(root)):
            relative = posixpath.relpath(remote, root)
            if any(fnmatch.fnmatch(relative, pattern) for pattern in SKIPPED_PATTERNS):
                continue
            local = staging / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(local))
    except FetchError:
        raise
    except PermissionError as exc:
        raise FetchError(f"{source}: access refused ({exc}): check the credentials its backend reads") from None
    except Exception as exc:  # each backend raises its own types (botocore's NoCredentialsError, aiohttp's...)
        raise FetchError(f"{source}: copying failed ({type(exc).__name__}: {exc})") from None


def _put_in_place(staging: Path, dest: Path) -> None:
    """``staging`` in place of ``dest`` (shared.paths.replace_directory): a model already there is renamed aside
    first and removed after, so for the instant between the two renames ``dest`` is absent (a service starting then
    exits and is restarted), never half there."""
    if dest.exists() or dest.is_symlink():
        log.info("replacing the model in %s (%s)", dest, (_read_marker(dest) or {}).get("source", "no marker"))
    replace_directory(staging, dest)


def _remove_leftovers(dest: Path) -> None:
    """The staging directories (and replaced models) of a fetch into ``dest`` that was killed."""
    for suffix in (STAGING_SUFFIX, REPLACED_SUFFIX):
        for leftover in dest.parent.glob(f".{glob.escape(dest.name)}.*{suffix}"):
            log.warning("removing %s, left by an interrupted fetch", leftover)
            _remove(leftover)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _read_marker(directory: Path) -> dict | None:
    try:
        recorded = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return (
        {"source": recorded.get("source"), "revision": recorded.get("revision")} if isinstance(recorded, dict) else None
    )


def _count(directory: Path) -> tuple[int, int]:
    files = [p for p in directory.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def _redacted(exc: BaseException, token: str | None) -> str:
    """An exception's message, with the token (should a library ever put it there) replaced."""
    message = str(exc)
    return message.replace(token, "<token>") if token else message
