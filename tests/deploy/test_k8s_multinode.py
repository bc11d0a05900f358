"""The `trainer-multinode` overlay (deploy/k8s/overlays/trainer-multinode): the gpu overlay with the trainer
sharded over several nodes under torchrun. Built with kustomize and validated like the other targets; then the parts
that must agree: every rank's torchrun arguments, the node count and the replicas, the GPUs per pod, the
rendezvous Service and port, the Service the orchestrator dials (rank 0 only), the shared checkpoint volume, the
NetworkPolicy between the ranks, and the command torchrun runs (parsed with the real CLI, its config loaded with
the trainer's config type)."""

from __future__ import annotations

import shlex

import yaml

from services.cli import build_parser
from services.orchestrator.config import OrchestratorConfig
from services.trainer.config import TrainerConfig
from shared.config import config_from_args
from tests.deploy.test_k8s import (
    CONFIG_DIR,
    NAMESPACE,
    config_map,
    find,
    objects,
    pod_spec,
    selects,
    validated,
    workloads,
)

TARGET = "overlays/trainer-multinode"


def torchrun(workload: dict) -> tuple[dict[str, str], list[str]]:
    """A rank's torchrun options ({name: value}) and the command it runs (after ``-m``)."""
    (c,) = pod_spec(workload)["containers"]
    if c["command"] == ["torchrun"]:
        words = list(c["args"])
    else:  # the workers: a shell computes node_rank from the pod index
        assert c["command"] == ["sh", "-c"], c["command"]
        (script,) = c["args"]
        words = shlex.split(script)
        assert words[:2] == ["exec", "torchrun"], script
        words = words[2:]
    module = words.index("-m")
    options = dict(word.removeprefix("--").split("=", 1) for word in words[:module])
    return options, words[module + 1 :]


def test_builds_and_every_object_validates_against_the_kubernetes_schemas(tmp_path):
    output = validated(TARGET, tmp_path)
    for kind, name in (("StatefulSet", "trainer-workers"), ("Service", "trainer-rendezvous")):
        assert f"passed for resource {kind.lower()}/{name} against version" in output, output
    for obj in objects(TARGET):
        assert obj["metadata"].get("namespace", NAMESPACE) == NAMESPACE or obj["kind"] == "Namespace", obj


def test_every_rank_runs_torchrun_with_the_same_group():
    rank0 = find(TARGET, "Deployment", "trainer")
    workers = find(TARGET, "StatefulSet", "trainer-workers")
    options0, command0 = torchrun(rank0)
    options, command = torchrun(workers)
    nodes = 1 + workers["spec"]["replicas"]
    for opts in (options0, options):
        assert int(opts["nnodes"]) == nodes
        assert opts["master_addr"] == "trainer-rendezvous" and opts["master_port"] == "29500"
        assert opts["max-restarts"] == "0"  # a failed rank ends the group; Kubernetes restarts the pods
    assert options0["node_rank"] == "0"
    assert options["node_rank"] == "$((POD_INDEX+1))"  # ranks 1..N-1 by pod index
    (env,) = [e for e in pod_spec(workers)["containers"][0]["env"] if e["name"] == "POD_INDEX"]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    # One process per GPU: nproc_per_node is each pod's GPU limit.
    for workload, opts in ((rank0, options0), (workers, options)):
        (c,) = pod_spec(workload)["containers"]
        assert int(opts["nproc_per_node"]) == c["resources"]["limits"]["nvidia.com/gpu"]
    assert command0 == command  # the same program and config on every rank
    # ... from the same image: the workers, added by this overlay, get the gpu overlay's tag too (not `latest`).
    images = {pod_spec(w)["containers"][0]["image"] for w in (rank0, workers)}
    assert images == {"rlhf-model:0.1.0"}, images


def test_torchrun_runs_the_trainer_with_its_config_from_the_configmap(tmp_path):
    _, command = torchrun(find(TARGET, "Deployment", "trainer"))
    assert command[0] == "services.cli"
    argv = command[1:]
    args = build_parser(argv).parse_args(argv)
    assert (args.command, args.role) == ("serve", "trainer")
    (path,) = args.config
    assert str(path) == f"{CONFIG_DIR}/trainer.yaml"
    local = tmp_path / "trainer.yaml"
    local.write_text(config_map(TARGET, "trainer")["data"]["trainer.yaml"])
    args.config = [local]
    config = config_from_args(TrainerConfig, args)
    assert config.policy.device == "cuda"
    assert config.checkpoint.root.startswith("/checkpoints/")  # the shared volume, below


def test_only_rank_0_serves_and_the_rendezvous_reaches_it_before_it_is_ready():
    rank0 = find(TARGET, "Deployment", "trainer")
    workers = find(TARGET, "StatefulSet", "trainer-workers")
    labels0 = rank0["spec"]["template"]["metadata"]["labels"]
    labels = workers["spec"]["template"]["metadata"]["labels"]
    trainer_service = find(TARGET, "Service", "trainer")
    assert selects(trainer_service["spec"]["selector"], labels0)
    assert not selects(trainer_service["spec"]["selector"], labels)  # the orchestrator's calls reach rank 0 only
    rendezvous = find(TARGET, "Service", "trainer-rendezvous")
    assert rendezvous["spec"]["clusterIP"] == "None" and rendezvous["spec"]["publishNotReadyAddresses"] is True
    assert selects(rendezvous["spec"]["selector"], labels0) and not selects(rendezvous["spec"]["selector"], labels)
    (port,) = rendezvous["spec"]["ports"]
    (c,) = pod_spec(rank0)["containers"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]}[port["targetPort"]] == port["port"] == 29500
    assert workers["spec"]["serviceName"] == "trainer-rendezvous"
    # Rank 0 keeps its gRPC probes; the workers serve nothing and have none.
    assert all(kind in c for kind in ("startupProbe", "readinessProbe", "livenessProbe"))
    (worker,) = pod_spec(workers)["containers"]
    assert not any(kind in worker for kind in ("startupProbe", "readinessProbe", "livenessProbe", "ports"))
    # The orchestrator still dials the trainer Service.
    orchestrator = OrchestratorConfig.model_validate(
        yaml.safe_load(config_map(TARGET, "orchestrator")["data"]["orchestrator.yaml"])
    )
    assert orchestrator.peers.trainer.split(":")[0].split(".")[0] == "trainer"


def test_every_rank_mounts_the_shared_checkpoints_and_the_same_config_and_token():
    claim = find(TARGET, "PersistentVolumeClaim", "trainer-checkpoints")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # each rank writes its shards
    mounts = {}
    for workload in (find(TARGET, "Deployment", "trainer"), find(TARGET, "StatefulSet", "trainer-workers")):
        spec = pod_spec(workload)
        (c,) = spec["containers"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        by_path = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
        assert by_path["/checkpoints"]["persistentVolumeClaim"]["claimName"] == "trainer-checkpoints"
        assert by_path["/dev/shm"]["emptyDir"]["medium"] == "Memory"  # NCCL between the GPUs of a node
        assert by_path[CONFIG_DIR]["configMap"]["name"] == config_map(TARGET, "trainer")["metadata"]["name"]
        mounts[workload["kind"]] = by_path["/run/secrets/rlhf"]["secret"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert mounts["Deployment"] == mounts["StatefulSet"]
    # The values' trainer settings reach every rank: the same resources (GPUs included), node selector, tolerations.
    rank0, workers = (
        pod_spec(find(TARGET, k, n)) for k, n in (("Deployment", "trainer"), ("StatefulSet", "trainer-workers"))
    )
    assert rank0["containers"][0]["resources"] == workers["containers"][0]["resources"]
    for field in ("nodeSelector", "tolerations"):
        assert rank0[field] == workers[field], field


def test_the_ranks_admit_each_other_and_nobody_new():
    policy = find(TARGET, "NetworkPolicy", "trainer-ranks")
    pods = {
        "trainer": find(TARGET, "Deployment", "trainer")["spec"]["template"]["metadata"]["labels"],
        "workers": find(TARGET, "StatefulSet", "trainer-workers")["spec"]["template"]["metadata"]["labels"],
    }
    (expression,) = policy["spec"]["podSelector"]["matchExpressions"]
    assert expression["operator"] == "In" and set(expression["values"]) == {
        pods["trainer"]["app.kubernetes.io/name"],
        pods["workers"]["app.kubernetes.io/name"],
    }
    (rule,) = policy["spec"]["ingress"]
    assert "ports" not in rule  # the collectives pick their ports
    (source,) = rule["from"]
    assert source["podSelector"]["matchExpressions"] == [expression]
    assert len([w for w in workloads(TARGET) if w["metadata"]["name"].startswith("trainer")]) == 2
