"""The operator's values (deploy/k8s/components/values and the optional components that read the same file): every
values file is valid against deploy/k8s/values.schema.json, each field lands where it should in the built objects
(examples/managed-cluster: another namespace, a private registry pinned by digest, a pull secret, named storage
classes, its own GPU node pools and RuntimeClass, a Prometheus elsewhere), and a values file with a field missing
fails the build with the field's name instead of deploying the base's defaults.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import jsonschema
import pytest
import yaml

from tests.deploy.test_k8s import BIN, K8S, find, of_kind, pod_spec, values_of, workloads

SCHEMA = json.loads((K8S / "values.schema.json").read_text())
VALUES_FILES = sorted(K8S.rglob("values.yaml"))
EXAMPLE = "examples/managed-cluster"
MODEL_ROLES = ("generation", "reward", "reference", "trainer")
CLAIMS = {"models": "models", "data": "data", "checkpoints": "trainer-checkpoints", "runs": "orchestrator-runs"}


def test_there_are_the_shipped_values_files():
    expected = {"overlays/cpu", "overlays/gpu", "overlays/trainer-multinode", EXAMPLE}
    assert {str(p.parent.relative_to(K8S)) for p in VALUES_FILES} == expected


@pytest.mark.parametrize("path", VALUES_FILES, ids=lambda p: str(p.parent.relative_to(K8S)))
def test_every_values_file_is_valid_against_the_schema(path):
    jsonschema.validate(yaml.safe_load(path.read_text()), SCHEMA)


def test_the_schema_refuses_what_kustomize_would_not_apply():
    values = yaml.safe_load((K8S / EXAMPLE / "values.yaml").read_text())
    jsonschema.validate(values, SCHEMA)
    broken = [
        ("an empty pull-secret list (replacements treat it as missing)", ["spec", "imagePullSecrets"], []),
        ("an empty node selector", ["spec", "roles", "trainer", "nodeSelector"], {}),
        ("a claim without a size", ["spec", "storage", "models", "resources"], {}),
        ("a role that does not exist", ["spec", "roles", "critic"], {"resources": {}}),
        ("a memory quantity that is not one", ["spec", "roles", "redis", "resources", "limits", "memory"], "1 GB"),
    ]
    for reason, path, value in broken:
        copy = json.loads(json.dumps(values))
        node = copy
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(copy, SCHEMA)
            pytest.fail(reason)


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu", "overlays/gpu-tls", EXAMPLE])
def test_each_role_gets_the_resources_and_each_claim_the_spec_of_its_values(target):
    values = values_of(target)
    pods = {w["metadata"]["name"]: w for w in workloads(target)}
    for role, settings in values["roles"].items():
        kind = "StatefulSet" if role == "redis" else "Deployment"
        (c,) = pod_spec(find(target, kind, role))["containers"]
        assert c["resources"] == settings["resources"], role
        spec = pod_spec(pods[role])
        for field in ("nodeSelector", "tolerations", "runtimeClassName"):
            assert spec.get(field) == settings.get(field), (role, field)
    for key, claim in CLAIMS.items():
        assert find(target, "PersistentVolumeClaim", claim)["spec"] == values["storage"][key], claim
    (template,) = find(target, "StatefulSet", "redis")["spec"]["volumeClaimTemplates"]
    assert template["spec"] == values["storage"]["redis"]
    for monitor in of_kind(target, "ServiceMonitor") + of_kind(target, "PrometheusRule"):
        assert monitor["metadata"]["labels"]["release"] == values["monitoring"]["release"]
    (rules,) = of_kind(target, "PrometheusRule")
    for group in rules["spec"]["groups"]:
        for rule in group["rules"]:
            expected = f"{values['monitoring']['runbookUrl']}#{rule['alert'].lower()}"
            assert rule["annotations"]["runbook_url"] == expected, rule["alert"]
    assert all(o["kind"] != "RLHFValues" for o in workloads(target))


def test_the_managed_cluster_example_needs_nothing_but_its_directory():
    """Another namespace, registry and storage class: everything comes from the example's own two files."""
    values = values_of(EXAMPLE)
    built = [o for o in yaml.safe_load_all(_build(K8S / EXAMPLE)) if o]
    assert {o["metadata"].get("namespace", "ml-rlhf") for o in built} == {"ml-rlhf"}
    assert not [o for o in built if o["kind"] == "RLHFValues"]  # local config: never applied
    for workload in workloads(EXAMPLE):
        spec = pod_spec(workload)
        assert spec["imagePullSecrets"] == values["imagePullSecrets"], workload["metadata"]["name"]
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["image"].startswith("registry.example.com/"), c["image"]
            if "/rlhf-" in c["image"]:  # the project's images pinned by digest
                assert "@sha256:" in c["image"] and len(c["image"].split("@sha256:")[1]) == 64, c["image"]
    classes = {
        o["metadata"]["name"]: o["spec"].get("storageClassName") for o in built if o["kind"] == "PersistentVolumeClaim"
    }
    assert classes == {"models": "efs-sc", "data": "efs-sc", "trainer-checkpoints": "gp3", "orchestrator-runs": "gp3"}
    for role in MODEL_ROLES:
        spec = pod_spec(find(EXAMPLE, "Deployment", role))
        assert spec["runtimeClassName"] == "nvidia" and spec["nodeSelector"] == values["roles"][role]["nodeSelector"]


@pytest.mark.parametrize(
    "missing",
    [
        ["storage", "checkpoints"],
        ["roles", "trainer", "resources"],
        ["monitoring", "namespace"],
        ["roles", "generation", "nodeSelector"],  # read by components/scheduling, which the example includes
    ],
    ids=".".join,
)
def test_a_values_file_with_a_field_missing_fails_the_build_naming_it(tmp_path, missing):
    """A copy of the example whose values lack one field: kustomize stops with the field's path, so nothing is
    built from the base's defaults behind the operator's back."""
    shutil.copytree(K8S, tmp_path / "k8s")  # the whole tree: kustomize takes only relative paths to the bases
    overlay = tmp_path / "k8s" / EXAMPLE
    _build(overlay)  # the copy builds as it is
    values = yaml.safe_load((overlay / "values.yaml").read_text())
    node = values["spec"]
    for key in missing[:-1]:
        node = node[key]
    del node[missing[-1]]
    (overlay / "values.yaml").write_text(yaml.safe_dump(values))
    result = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert f"spec.{'.'.join(missing)}" in result.stderr, result.stderr


def _build(directory) -> str:
    result = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
