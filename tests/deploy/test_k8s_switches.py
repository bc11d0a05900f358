"""The switches (kustomize Components that leave a part out): no reward autoscaler, no NetworkPolicies, no
Prometheus Operator objects, an external Redis. Built over the base with a values file, as an operator's overlay
would, each alone and all together; the result validates strictly and keeps what the loop needs (the orchestrator's
store then comes from the Secret it mounts)."""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath

import pytest
import yaml

from tests.deploy.test_k8s import K8S, config_paths, container, effective_config, objects, pod_spec, validated

SWITCHES = ("without-autoscaling", "without-network-policies", "without-prometheus-operator", "external-redis")
LEFT_OUT = {
    "without-autoscaling": {("HorizontalPodAutoscaler", "reward")},
    "without-network-policies": {
        ("NetworkPolicy", n)
        for n in ("default-deny-ingress", "generation", "reward", "reference", "trainer", "orchestrator", "redis")
    },
    "without-prometheus-operator": {("ServiceMonitor", "rlhf"), ("PrometheusRule", "rlhf")},
    "external-redis": {("StatefulSet", "redis"), ("Service", "redis"), ("NetworkPolicy", "redis")},
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of deploy/k8s with one overlay per switch and one with all of them (kustomize takes only relative
    paths, so the overlays live in the copy)."""
    root = tmp_path_factory.mktemp("switches") / "k8s"
    shutil.copytree(K8S, root)
    for name, components in [*((s, [s]) for s in SWITCHES), ("all", list(SWITCHES))]:
        overlay = root / "overlays" / f"switch-{name}"
        overlay.mkdir()
        shutil.copy(K8S / "overlays" / "gpu" / "values.yaml", overlay / "values.yaml")
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": ["../../base", "values.yaml"],
            "components": [f"../../components/{c}" for c in ["gpu", "scheduling", *components, "values"]],
        }
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return root


def _kinds(target: str) -> set[tuple[str, str]]:
    """(kind, name) of every object, a generated ConfigMap without its content hash."""
    return {
        (o["kind"], o["metadata"]["name"].rsplit("-", 1)[0] if o["kind"] == "ConfigMap" else o["metadata"]["name"])
        for o in objects(target)
    }


@pytest.mark.parametrize("switch", [*SWITCHES, "all"])
def test_each_switch_leaves_out_its_objects_and_nothing_else(tree, switch, tmp_path):
    target = str(tree / "overlays" / f"switch-{switch}")
    validated(target, tmp_path)  # strict schema validation of what remains
    everything = _kinds(str(K8S / "overlays" / "gpu"))
    expected_gone = set().union(*(LEFT_OUT[s] for s in (SWITCHES if switch == "all" else [switch])))
    assert expected_gone <= everything  # the switch removes something that exists
    assert _kinds(target) == everything - expected_gone


def test_with_an_external_redis_the_orchestrator_reads_its_url_from_the_secret_it_mounts(tree):
    target = str(tree / "overlays" / "switch-external-redis")
    config = effective_config(target, "orchestrator")
    assert config.store.url == "" and config.store.url_file
    url_file = PurePosixPath(config.store.url_file)
    c = container(target, "orchestrator")
    assert [p.name for p in config_paths(c)] == ["orchestrator.yaml", "store-external.yaml"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(_orchestrator(target))["volumes"]}
    (name,) = [n for n, m in mounts.items() if url_file.parent == PurePosixPath(m["mountPath"])]
    assert mounts[name]["readOnly"] is True
    secret = volumes[name]["secret"]
    assert secret["secretName"] == "rlhf-redis" and secret["items"] == [{"key": "url", "path": url_file.name}]


def _orchestrator(target: str) -> dict:
    (deployment,) = [
        o for o in objects(target) if o["kind"] == "Deployment" and o["metadata"]["name"] == "orchestrator"
    ]
    return deployment
