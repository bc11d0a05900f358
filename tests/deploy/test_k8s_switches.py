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


EXISTING = {"models": "team-models", "data": "team-prompts", "checkpoints": "team-checkpoints", "runs": "team-runs"}
VOLUME_OF_CLAIM = {
    "models": "models",
    "data": "data",
    "trainer-checkpoints": "checkpoints",
    "orchestrator-runs": "runs",
}


@pytest.fixture(scope="module")
def yours(tree) -> str:
    """The gpu set-up with TLS and the public reward API, on claims and Secrets of an operator's: the base's claims
    left out (components/existing-claims), the tokens and the certificate from Secrets of other names."""
    overlay = tree / "overlays" / "yours"
    overlay.mkdir()
    values = yaml.safe_load((K8S / "overlays" / "gpu" / "values.yaml").read_text())
    storage = values["spec"]["storage"]
    values["spec"]["storage"] = {"existingClaims": EXISTING, "redis": storage["redis"]}
    values["spec"]["secrets"] = {"tokens": "team-tokens", "tls": "team-tls"}
    (overlay / "values.yaml").write_text(yaml.safe_dump(values))
    # Components that add objects before those that change them (tls), then those that read the values.
    components = [
        "gpu",
        "public-reward-api",
        "tls",
        "scheduling",
        "existing-claims",
        "token-secret",
        "tls-secret",
        "values",
    ]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["../../base", "values.yaml"],
        "components": [f"../../components/{c}" for c in components],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return str(overlay)


def test_claims_and_secrets_of_yours_replace_the_bases(yours, tmp_path):
    import jsonschema

    jsonschema.validate(
        yaml.safe_load((Path(yours) / "values.yaml").read_text()),
        yaml.safe_load((K8S / "values.schema.json").read_text()),
    )
    validated(yours, tmp_path)
    built = objects(yours)
    assert not [o for o in built if o["kind"] == "PersistentVolumeClaim"]  # the base's four are left out
    mounts = {"tokens": set(), "tls": set(), **{v: set() for v in EXISTING}}
    for workload in (o for o in built if o["kind"] in ("Deployment", "StatefulSet", "Job")):
        for volume in pod_spec(workload).get("volumes", []):
            if volume["name"] in EXISTING:
                mounts[volume["name"]].add(volume["persistentVolumeClaim"]["claimName"])
            elif volume["name"] in ("tokens", "tls"):
                mounts[volume["name"]].add(volume["secret"]["secretName"])
    assert mounts == {**{k: {v} for k, v in EXISTING.items()}, "tokens": {"team-tokens"}, "tls": {"team-tls"}}
    (monitor,) = [o for o in built if o["kind"] == "ServiceMonitor"]
    for endpoint in monitor["spec"]["endpoints"]:
        tls = endpoint["tlsConfig"]
        assert tls["ca"]["secret"]["name"] == tls["cert"]["secret"]["name"] == tls["keySecret"]["name"] == "team-tls"
