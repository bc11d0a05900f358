"""``rlhf fetch-model`` (services/model_fetch.py): a model put into a directory whole or not at all, from a path, a
``file://`` URL or the Hugging Face hub, on the tiny policy (built offline, a session fixture).

The hub cannot be reached from here (no network): the hub tests replace ``snapshot_download`` with a stand-in that
writes the tiny policy into ``local_dir`` as the hub would, and check what it was asked for (repo id, revision,
token); one test points the real ``snapshot_download`` at a closed local port to see a network failure. Object
stores need backends (s3fs, gcsfs...) that are not installed: only the error that says so is tested.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import requests
from fsspec.implementations.local import LocalFileSystem
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

import services.cli
from services.cli import main
from services.model_fetch import MARKER, SKIPPED_PATTERNS

TOKEN = "hf_secretTokenThatMustNeverBePrinted"
REPO_ID = "my-org/my-policy"
REVISION = "0123456789abcdef0123456789abcdef01234567"
SKIPPED_FILES = ("pytorch_model.bin", "original/consolidated.00.pth", "onnx/model.onnx")


@pytest.fixture
def fetch(monkeypatch, capsys, caplog):
    """Runs ``rlhf fetch-model ARGS`` through the real CLI: (exit code, stdout, stderr and the log)."""
    monkeypatch.setattr(services.cli, "setup_logging", lambda *args: None)  # its handler would outlive capsys
    caplog.set_level("INFO")

    def run(*argv: str) -> tuple[int, str, str]:
        caplog.clear()
        code = main(["fetch-model", *argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err + caplog.text

    return run


@pytest.fixture
def source(tmp_path, tiny_policy_dir) -> Path:
    """The tiny policy, plus files in the formats the services never load and one in a subdirectory."""
    directory = tmp_path / "source"
    shutil.copytree(tiny_policy_dir, directory)
    for name in SKIPPED_FILES:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(b"weights in another format")
    (directory / "docs").mkdir()
    (directory / "docs" / "README.md").write_text("a model card\n")
    return directory


@pytest.fixture
def models(tmp_path) -> Path:
    """The volume: /models of the pods."""
    directory = tmp_path / "models"
    directory.mkdir()
    return directory


@pytest.fixture(autouse=True)
def no_hub_token(monkeypatch, tmp_path):
    """No token from this machine's environment or login."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` but the marker: {relative path: content}."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def marker_of(directory: Path) -> dict:
    return json.loads((directory / MARKER).read_text())


def hidden(directory: Path) -> list[str]:
    """What a fetch may leave beside its destination by mistake: staging directories, replaced models."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def without_skipped(files: dict[str, bytes]) -> dict[str, bytes]:
    return {name: content for name, content in files.items() if name not in SKIPPED_FILES}


# ---------------------------------------------------------------------------------------------------------------
# Local paths and file:// URLs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["path", "file-url"])
def test_a_directory_is_copied_whole_with_a_marker_and_loads(fetch, source, models, form):
    from transformers import AutoModelForCausalLM

    dest = models / "policy"
    code, out, err = fetch("--source", str(source) if form == "path" else f"file://{source}", "--dest", str(dest))
    assert code == 0, err
    assert files_of(dest) == without_skipped(files_of(source))  # the other weight formats are left out
    assert {k: v for k, v in marker_of(dest).items() if k != "fetched_at"} == {"source": str(source), "revision": None}
    result = json.loads(out)
    assert result["dest"] == str(dest) and result["skipped"] is False and result["revision"] is None
    assert result["files"] == len(files_of(dest)) + 1  # and the marker
    assert hidden(models) == []
    assert (dest.stat().st_mode & 0o777) == 0o755  # readable by services running as another user
    AutoModelForCausalLM.from_pretrained(dest, use_safetensors=True)  # as shared/modeling.py loads it


@pytest.mark.parametrize("before", ["empty volume", "older model there"])
def test_a_failure_mid_copy_leaves_the_destination_as_it_was_and_no_staging(
    fetch, source, models, tiny_policy_dir, monkeypatch, before
):
    dest = models / "policy"
    if before == "older model there":
        assert fetch("--source", str(tiny_policy_dir), "--dest", str(dest))[0] == 0
    was = files_of(dest) if dest.exists() else None
    marker = marker_of(dest) if dest.exists() else None
    copied = []
    real_get_file = LocalFileSystem.get_file

    def volume_fills_up(self, rpath, lpath, **kwargs):
        if len(copied) == 3:  # half a file written, then the disk is full
            Path(lpath).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        copied.append(rpath)
        return real_get_file(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "get_file", volume_fills_up)
    code, out, err = fetch("--source", str(source), "--dest", str(dest))
    assert code == 2 and out == ""
    assert "No space left on device" in err and "Traceback" not in err
    assert len(copied) == 3  # it failed midway, not before it began
    if was is None:
        assert not dest.exists()
    else:
        assert files_of(dest) == was and marker_of(dest) == marker
    assert hidden(models) == []  # the staging directory is gone


@pytest.mark.parametrize(
    "damage, message",
    [
        ("cut-off weights", "incomplete"),
        ("empty weights", "is cut off"),
        ("no config.json", "holds no config.json"),
        ("unknown architecture", "does not load with transformers"),
        ("no safetensors", "holds no *.safetensors"),
        ("missing shard", "names shards that are missing: model-00002-of-00002.safetensors"),
    ],
)
def test_an_incomplete_model_is_refused_before_it_is_put_in_place(fetch, source, models, damage, message):
    weights = source / "model.safetensors"
    if damage == "cut-off weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "empty weights":
        weights.write_bytes(b"")
    elif damage == "no config.json":
        (source / "config.json").unlink()
    elif damage == "unknown architecture":
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**config, "model_type": "no-such-architecture"}))
    elif damage == "no safetensors":
        weights.unlink()
    else:
        index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
        (source / "model.safetensors.index.json").write_text(json.dumps(index))
    dest = models / "policy"
    code, _, err = fetch("--source", str(source), "--dest", str(dest))
    assert code == 2 and message in err, err
    assert not dest.exists() and hidden(models) == []


def test_the_marker_skips_the_same_source_and_force_fetches_again(fetch, source, models, tiny_policy_dir):
    dest = models / "policy"
    assert fetch("--source", str(source), "--dest", str(dest))[0] == 0
    first = marker_of(dest)
    (source / "added.txt").write_text("new in the source\n")

    code, out, _ = fetch("--source", str(source), "--dest", str(dest))
    assert code == 0 and json.loads(out)["skipped"] is True
    assert not (dest / "added.txt").exists() and marker_of(dest) == first  # not touched

    code, out, _ = fetch("--source", str(source), "--dest", str(dest), "--force")
    assert code == 0 and json.loads(out)["skipped"] is False
    assert (dest / "added.txt").read_text() == "new in the source\n"

    # Another source replaces the model without --force.
    code, out, _ = fetch("--source", str(tiny_policy_dir), "--dest", str(dest))
    assert code == 0 and json.loads(out)["skipped"] is False
    assert files_of(dest) == files_of(tiny_policy_dir) and marker_of(dest)["source"] == str(tiny_policy_dir)
    assert hidden(models) == []


def test_what_a_killed_fetch_left_beside_the_destination_is_removed(fetch, source, models):
    for name in (".policy.k1ll3d.tmp", ".policy.r3pl4c.old"):
        (models / name).mkdir()
        (models / name / "model.safetensors").write_bytes(b"half")
    (models / ".reward.0th3r.tmp").mkdir()  # another destination's: not ours to remove
    assert fetch("--source", str(source), "--dest", str(models / "policy"))[0] == 0
    assert hidden(models) == [".reward.0th3r.tmp"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--source", "hf://<org>/<policy>@<revision>"], "is not a Hugging Face repo id"),  # the Job's placeholder
        (["--source", f"hf://{REPO_ID}@"], "no revision after '@'"),
        (["--source", "nosuch://bucket/models"], "Protocol not known: nosuch"),
        (["--source", "{tmp}/missing"], "is not a directory (it does not exist)"),
        (["--source", "{tmp}/a-file"], "is not a directory"),
        (["--source", f"hf://{REPO_ID}", "--token-file", "{tmp}/no-such-token"], "cannot read the token file"),
        (["--source", f"hf://{REPO_ID}", "--token-file", "{tmp}/a-file"], "is empty"),
    ],
)
def test_a_bad_source_exits_2_with_a_message_that_names_it(fetch, models, tmp_path, argv, message):
    (tmp_path / "a-file").write_text("")
    code, out, err = fetch(*(a.format(tmp=tmp_path) for a in argv), "--dest", str(models / "policy"))
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err, err
    assert hidden(models) == [] and not (models / "policy").exists()


def test_an_object_store_without_its_backend_says_which_package_is_missing(fetch, models):
    # The lock (and so CI and the images) has no s3fs: this runs everywhere the project installs. Only an
    # environment that adds s3fs itself has the backend, and then there is no missing package to report.
    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed in this environment: no missing backend to report")
    code, _, err = fetch("--source", "s3://bucket/models/policy", "--dest", str(models / "policy"))
    assert code == 2 and "s3fs" in err, err
    assert hidden(models) == []


# ---------------------------------------------------------------------------------------------------------------
# The Hugging Face hub (not reachable from here: snapshot_download is replaced, see the module's docstring)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch, tiny_policy_dir):
    """A stand-in for ``huggingface_hub.snapshot_download``: records each call, then writes the tiny policy into
    ``local_dir`` with the bookkeeping the real one leaves there (``.cache/huggingface``). ``hub.error``, when set,
    is raised instead."""

    hub = SimpleNamespace(calls=[], error=None)

    def snapshot_download(repo_id, **kwargs):
        hub.calls.append({"repo_id": repo_id, **kwargs})
        if hub.error is not None:
            raise hub.error
        local_dir = Path(kwargs["local_dir"])
        shutil.copytree(tiny_policy_dir, local_dir, dirs_exist_ok=True)
        (local_dir / ".cache" / "huggingface" / "download").mkdir(parents=True)
        (local_dir / ".cache" / "huggingface" / "download" / "config.json.metadata").write_text(REVISION)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return hub


@pytest.mark.parametrize("token_from", ["--token-file", "HF_TOKEN", "HF_TOKEN_PATH", "nowhere"])
def test_a_hub_source_is_downloaded_with_its_repo_id_revision_and_token(
    fetch, hub, models, tmp_path, monkeypatch, tiny_policy_dir, token_from
):
    extra = []
    if token_from == "--token-file":  # wins over HF_TOKEN
        (tmp_path / "token").write_text(TOKEN + "\n")
        extra = ["--token-file", str(tmp_path / "token")]
        monkeypatch.setenv("HF_TOKEN", "hf_anotherToken")
    elif token_from == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    elif token_from == "HF_TOKEN_PATH":  # the Job: the optional Secret's file, where HF_TOKEN_PATH points
        (tmp_path / "mounted-token").write_text(TOKEN)
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "mounted-token"))
    dest = models / "policy"
    code, out, err = fetch("--source", f"hf://{REPO_ID}@{REVISION}", "--dest", str(dest), *extra)
    assert code == 0, err

    (call,) = hub.calls
    assert call["repo_id"] == REPO_ID and call["revision"] == REVISION
    assert call["token"] == (None if token_from == "nowhere" else TOKEN)
    staging = Path(call["local_dir"])  # beside the destination, on the same volume
    assert staging.parent == models and staging.name.startswith(".policy.") and staging.name.endswith(".tmp")
    assert set(SKIPPED_PATTERNS) <= set(call["ignore_patterns"])
    assert files_of(dest) == files_of(tiny_policy_dir)  # without the download bookkeeping
    assert {k: v for k, v in marker_of(dest).items() if k != "fetched_at"} == {
        "source": f"hf://{REPO_ID}",
        "revision": REVISION,
    }
    assert json.loads(out)["source"] == f"hf://{REPO_ID}" and json.loads(out)["revision"] == REVISION
    assert TOKEN not in out + err and hidden(models) == []

    # The same repo and revision again: skipped, the hub not asked; another revision: fetched.
    assert json.loads(fetch("--source", f"hf://{REPO_ID}@{REVISION}", "--dest", str(dest), *extra)[1])["skipped"]
    assert len(hub.calls) == 1
    assert fetch("--source", f"hf://{REPO_ID}@v2", "--dest", str(dest), *extra)[0] == 0
    assert hub.calls[-1]["revision"] == "v2" and marker_of(dest)["revision"] == "v2"


def _response(status: int) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.url = f"https://huggingface.co/api/models/{REPO_ID}"
    return response


@pytest.mark.parametrize(
    "error, message",
    [
        (GatedRepoError("gated", response=_response(403)), "is gated: accept its terms"),
        (RepositoryNotFoundError("404", response=_response(404)), "no such repository"),
        (RevisionNotFoundError("404", response=_response(404)), f"{REPO_ID} has no revision 'v9'"),
        (HfHubHTTPError("401 Unauthorized", response=_response(401)), "the hub refused the download (401"),
        # A library that puts the token in a message: it is replaced before anything is printed.
        (HfHubHTTPError(f"500 for token {TOKEN}", response=_response(500)), "the hub answered 500"),
        (requests.ConnectionError(f"reset while sending {TOKEN}"), "the download failed (ConnectionError"),
    ],
)
def test_hub_errors_exit_2_with_a_clear_message_and_never_the_token(fetch, hub, models, tmp_path, error, message):
    (tmp_path / "token").write_text(TOKEN)
    hub.error = error
    dest = models / "policy"
    code, out, err = fetch(
        "--source", f"hf://{REPO_ID}@v9", "--dest", str(dest), "--token-file", str(tmp_path / "token")
    )
    assert code == 2 and message in err, err
    assert TOKEN not in out + err and "Traceback" not in err
    assert not dest.exists() and hidden(models) == []


def test_without_a_token_a_private_repository_error_says_how_to_give_one(fetch, hub, models):
    hub.error = RepositoryNotFoundError("401", response=_response(401))
    code, _, err = fetch("--source", f"hf://{REPO_ID}", "--dest", str(models / "policy"))
    assert code == 2 and "no token: set HF_TOKEN or --token-file" in err, err
    assert hub.calls[0]["revision"] is None  # no @revision: the default branch


def test_an_unreachable_hub_is_a_network_error(fetch, models, monkeypatch):
    """The real snapshot_download, sent to a local port where nothing listens: the connection is refused."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    code, _, err = fetch("--source", f"hf://{REPO_ID}@{REVISION}", "--dest", str(models / "policy"))
    assert code == 2 and "cannot reach the hub" in err and "127.0.0.1:9" in err, err
    assert hidden(models) == [] and not (models / "policy").exists()
