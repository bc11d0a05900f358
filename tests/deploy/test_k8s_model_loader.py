"""The model loader (deploy/k8s/components/model-loader): the Job `load-models`, which fills the `models` volume with
`rlhf fetch-model`. Built as operators would build it: the gpu overlay with the component added, the same with a
patch that sets the sources (the one deploy/README.md shows), and examples/managed-cluster (another namespace, a
registry, pull secrets) with it. Each validates strictly; the Job meets the restricted Pod Security profile field by
field; each command parses with the real CLI (after the kubelet's $(VAR) expansion) and fills the directories the
services' configs read, on the `models` claim mounted read-write; the hub token's Secret is optional and never built.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

from services.cli import build_parser
from services.model_fetch import MARKER, FetchError, Source
from tests.deploy.test_k8s import (
    K8S,
    MODEL_ROLES,
    argv_of,
    effective_config,
    find,
    objects,
    of_kind,
    pod_spec,
    selects,
    validated,
)

COMPONENT = "../../components/model-loader"
TOKEN_SECRET = "rlhf-hf-token"
SOURCES = {  # what the operator's patch sets (deploy/README.md#model-loading)
    "policy": "hf://my-org/my-policy@0123456789abcdef0123456789abcdef01234567",
    "reward": "s3://my-bucket/models/reward",
}
OPERATOR_PATCH = {
    "target": {"kind": "Job", "name": "load-models"},
    "patch": yaml.safe_dump(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "load-models"},
            "spec": {
                "template": {
                    "spec": {
                        "initContainers": [
                            {"name": name, "env": [{"name": "MODEL_SOURCE", "value": value}]}
                            for name, value in SOURCES.items()
                        ]
                    }
                }
            },
        }
    ),
}
# A rule-based reward needs no reward model: the JSON 6902 patch deploy/README.md shows for it.
DROP_REWARD = {
    "target": {"kind": "Job", "name": "load-models"},
    "patch": yaml.safe_dump([{"op": "remove", "path": "/spec/template/spec/initContainers/1"}]),
}
# Volume types the restricted profile allows (Pod Security Standards, "Volume Types").
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def _with_loader(kustomization: dict, before: str) -> dict:
    """``kustomization`` with the component inserted in its components before ``before``."""
    components = list(kustomization["components"])
    components.insert(components.index(f"../../components/{before}"), COMPONENT)
    return {**kustomization, "components": components}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of deploy/k8s with overlays of an operator's (kustomize takes relative paths only): `loader` (the gpu
    overlay + the component), `loader-set` (+ the patch that sets the sources), `loader-policy-only` (+ the patch
    that drops the reward model's fetch), `loader-managed` (examples/managed-cluster, which uses the component
    with its sources set)."""
    root = tmp_path_factory.mktemp("model-loader") / "k8s"
    shutil.copytree(K8S, root)
    gpu = yaml.safe_load((K8S / "overlays" / "gpu" / "kustomization.yaml").read_text())
    managed = yaml.safe_load((K8S / "examples" / "managed-cluster" / "kustomization.yaml").read_text())
    overlays = {
        "loader": (K8S / "overlays" / "gpu", _with_loader(gpu, "values")),
        "loader-set": (K8S / "overlays" / "gpu", {**_with_loader(gpu, "values"), "patches": [OPERATOR_PATCH]}),
        "loader-managed": (K8S / "examples" / "managed-cluster", managed),  # it has the component, sources set
        "loader-policy-only": (K8S / "overlays" / "gpu", {**_with_loader(gpu, "values"), "patches": [DROP_REWARD]}),
    }
    for name, (origin, kustomization) in overlays.items():
        overlay = root / "overlays" / name
        overlay.mkdir()
        shutil.copy(origin / "values.yaml", overlay / "values.yaml")
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return root


def target_of(tree: Path, name: str) -> str:
    return str(tree / "overlays" / name)


def job(target: str) -> dict:
    return find(target, "Job", "load-models")


def fetchers(target: str) -> list[dict]:
    return pod_spec(job(target))["initContainers"]


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def expanded(argv: list[str], env: dict[str, str]) -> list[str]:
    """``$(NAME)`` replaced by the container's variable, as the kubelet does (``$$`` is a ``$``; an unknown name
    stays as written)."""

    def one(match: re.Match) -> str:
        return "$" if match.group(0) == "$$" else env.get(match.group(1), match.group(0))

    return [re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, arg) for arg in argv]


def fetch_args(c: dict):
    argv = expanded(argv_of(c), env_of(c))
    return build_parser(argv).parse_args(argv)


def model_dirs(target: str) -> set[str]:
    """Every model directory the services' configs read (model.path, policy.path, critic.path, tokenizers)."""
    paths = set()
    for role in MODEL_ROLES:
        config = effective_config(target, role)
        for section in ("model", "policy", "critic"):
            part = getattr(config, section, None)
            paths |= {p for p in (getattr(part, "path", ""), getattr(part, "tokenizer", None)) if p}
    return paths


@pytest.mark.parametrize("name", ["loader", "loader-set", "loader-policy-only", "loader-managed"])
def test_builds_and_validates_strictly_with_the_job(tree, name, tmp_path):
    output = validated(target_of(tree, name), tmp_path)
    assert "passed for resource job/load-models against version" in output, output


def test_the_component_adds_the_job_and_changes_nothing_else(tree):
    def dumped(target: str) -> set[str]:
        return {
            yaml.safe_dump(o) for o in objects(target) if (o["kind"], o["metadata"]["name"]) != ("Job", "load-models")
        }

    loader = target_of(tree, "loader")
    assert [o["metadata"]["name"] for o in of_kind(loader, "Job")] == ["load-models"]
    assert dumped(loader) == dumped(str(tree / "overlays" / "gpu"))


@pytest.mark.parametrize("name", ["loader", "loader-managed"])
def test_the_job_meets_the_restricted_pod_security_profile(tree, name):
    target = target_of(tree, name)
    loader = job(target)
    spec = pod_spec(loader)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001 and pod["runAsGroup"] == 10001
    assert pod["fsGroup"] == 10001  # the volume writable by that user
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert not any(spec.get(host) for host in ("hostNetwork", "hostPID", "hostIPC"))
    for volume in spec["volumes"]:
        (kind,) = set(volume) - {"name"}
        assert kind in RESTRICTED_VOLUMES, volume
    containers = [*spec["initContainers"], *spec["containers"]]
    assert [c["name"] for c in containers] == ["policy", "reward", "loaded"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in containers:
        security = c["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, c["name"]
        assert security["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert security["readOnlyRootFilesystem"] is True, c["name"]
        assert not security.get("privileged") and security.get("runAsNonRoot") is not False, c["name"]
        assert "seccompProfile" not in security and "runAsUser" not in security, c["name"]  # the pod's apply
        assert not any(p.get("hostPort") for p in c.get("ports", [])), c["name"]
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][section]), (c["name"], section)
        # The same project image as the model services, whatever the overlay makes of it (tag, registry, digest).
        assert c["image"] == pod_spec(find(target, "Deployment", "generation"))["containers"][0]["image"], c["name"]
    for c in fetchers(target):  # with a read-only root, everything they write lies on a volume
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        env = env_of(c)
        for variable in ("HOME", "HF_HOME"):
            (mount,) = [path for path in mounts if PurePosixPath(env[variable]).is_relative_to(path)]
            assert mount == "/tmp" and "emptyDir" in volumes[mounts[mount]], (c["name"], variable)
        assert volumes[mounts["/tmp"]]["emptyDir"]["sizeLimit"]
        assert env["HF_XET_CHUNK_CACHE_SIZE_BYTES"] == "0"  # no 10 GB chunk cache in that emptyDir
    # A Job that ends: a few tries, a deadline, and gone after a while (so that the next apply creates it again).
    assert spec["restartPolicy"] == "Never"
    assert 0 < loader["spec"]["backoffLimit"] <= 6
    assert loader["spec"]["activeDeadlineSeconds"] > 0 and loader["spec"]["ttlSecondsAfterFinished"] > 0
    labels = loader["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "load-models" and labels["app.kubernetes.io/part-of"] == "rlhf"
    assert loader["metadata"]["labels"] == labels
    # In the namespace of the volume it fills, which the overlay chose.
    assert loader["metadata"]["namespace"] == find(target, "PersistentVolumeClaim", "models")["metadata"]["namespace"]


@pytest.mark.parametrize("name", ["loader", "loader-set"])
def test_each_fetch_parses_with_the_real_cli_and_fills_a_directory_the_services_read(tree, name):
    target = target_of(tree, name)
    spec = pod_spec(job(target))
    volumes = {v["name"]: v for v in spec["volumes"]}
    dests = {}
    for c in fetchers(target):
        args = fetch_args(c)
        assert args.command == "fetch-model" and not args.force and args.token_file is None, c["name"]
        dest = PurePosixPath(args.dest)
        (mount,) = [m for m in c["volumeMounts"] if dest.is_relative_to(m["mountPath"])]
        claim = volumes[mount["name"]]["persistentVolumeClaim"]
        assert claim["claimName"] == "models", c["name"]
        assert not mount.get("readOnly") and not claim.get("readOnly"), c["name"]  # read-write: it writes there
        assert find(target, "PersistentVolumeClaim", "models")  # the claim the model services mount read-only
        dests[c["name"]] = str(dest)
        if name == "loader":  # the shipped placeholder: refused before any download, until the overlay sets it
            with pytest.raises(FetchError, match="is not a Hugging Face repo id"):
                Source.parse(args.source)
        else:
            assert args.source == SOURCES[c["name"]]
            Source.parse(args.source)
    assert dests == {"policy": "/models/policy", "reward": "/models/reward"}
    assert set(dests.values()) == model_dirs(target)  # every directory the gpu configs read, and only those
    # The main container lists what the fetches left: the markers they write, on the volume mounted read-only.
    (loaded,) = spec["containers"]
    assert loaded["command"] == ["python", "-c"] and MARKER in loaded["args"][0]
    compile(loaded["args"][0], "loaded", "exec")
    (mount,) = loaded["volumeMounts"]
    assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}


@pytest.mark.parametrize("name", ["loader", "loader-managed"])
def test_the_hub_token_comes_from_an_optional_secret_that_is_never_built(tree, name):
    target = target_of(tree, name)
    assert not of_kind(target, "Secret")
    spec = pod_spec(job(target))
    (volume,) = [v for v in spec["volumes"] if "secret" in v]
    secret = volume["secret"]
    assert secret["secretName"] == TOKEN_SECRET and secret["optional"] is True  # public models need none
    assert secret["items"] == [{"key": "token", "path": "token"}] and secret["defaultMode"] == 0o440
    for c in fetchers(target):
        # A file where huggingface_hub looks (HF_TOKEN_PATH; absent without the Secret), never an env var.
        path = PurePosixPath(env_of(c)["HF_TOKEN_PATH"])
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["readOnly"] is True and path == PurePosixPath(mount["mountPath"]) / "token", c["name"]
        assert not [e for e in c["env"] if "valueFrom" in e], c["name"]
        assert fetch_args(c).token_file is None  # so the CLI asks huggingface_hub, which reads that file
    (loaded,) = spec["containers"]
    assert all(m["name"] != volume["name"] for m in loaded["volumeMounts"])


def test_huggingface_hub_reads_the_token_file_the_job_names(tree, tmp_path):
    """HF_TOKEN_PATH is the variable huggingface_hub reads (at import) for its token file."""
    (c, *_) = fetchers(target_of(tree, "loader"))
    token_file = tmp_path / "token"
    token_file.write_text("hf_fromTheMountedSecret\n")
    env = {"PATH": "/usr/bin:/bin", "HF_TOKEN_PATH": str(token_file), "HF_HOME": str(tmp_path / "hf")}
    assert env_of(c)["HF_TOKEN_PATH"].endswith("/token")
    result = subprocess.run(
        [sys.executable, "-c", "from services.model_fetch import resolve_token; print(resolve_token(None))"],
        capture_output=True,
        text=True,
        env=env,
        cwd=K8S.parents[1],
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hf_fromTheMountedSecret"


def test_no_network_policy_keeps_the_job_from_the_hub(tree):
    # The policies restrict ingress only: the Job's pod may open connections to the hub or an object store.
    target = target_of(tree, "loader")
    labels = job(target)["spec"]["template"]["metadata"]["labels"]
    for policy in of_kind(target, "NetworkPolicy"):
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if not selector or selects(selector, labels):
            assert "Egress" not in policy["spec"]["policyTypes"], policy["metadata"]["name"]


def test_in_an_operators_overlay_the_job_follows_its_namespace_registry_and_pull_secrets(tree):
    target = target_of(tree, "loader-managed")
    loader = job(target)
    assert loader["metadata"]["namespace"] == "ml-rlhf"
    values = yaml.safe_load((K8S / "examples" / "managed-cluster" / "values.yaml").read_text())["spec"]
    assert pod_spec(loader)["imagePullSecrets"] == values["imagePullSecrets"]
    assert all(c["image"].startswith("registry.example.com/ml/rlhf-model@sha256:") for c in fetchers(target))


def test_an_overlay_without_a_reward_model_drops_its_fetch(tree):
    target = target_of(tree, "loader-policy-only")
    assert [(c["name"], str(fetch_args(c).dest)) for c in fetchers(target)] == [("policy", "/models/policy")]
