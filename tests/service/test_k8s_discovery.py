"""Generation replica discovery through the Kubernetes API: the EndpointSlices of the generation Service, listed and
watched by the real ``kubernetes`` client, feeding the orchestrator's replica pool.

No kube-apiserver can run here (no cluster, etcd or container runtime on the development machine), so the client
is pointed, through a kubeconfig file, at a stand-in API on loopback (``tests/k8s_standin.py``) that answers the
list and watch requests it makes in the API's wire format (JSON lists, chunked streams of watch events, 410 Gone).
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from kubernetes.config import ConfigException

from services.orchestrator import replicas
from services.orchestrator.config import GenerationDiscovery, RpcConfig
from services.orchestrator.metrics import GENERATION_REPLICAS
from services.orchestrator.replicas import KubernetesReplicas, ReplicaPool
from tests.k8s_standin import EndpointSliceAPI, endpoint_slice

SLICES = "/apis/discovery.k8s.io/v1/namespaces/rlhf/endpointslices"


@pytest.fixture
def api():
    with EndpointSliceAPI() as api:
        yield api


def kubernetes_pool(api: EndpointSliceAPI, tmp_path, **discovery) -> ReplicaPool:
    config = GenerationDiscovery.model_validate(
        {
            "mode": "kubernetes",
            "service": "generation",
            "namespace": "rlhf",
            "port_name": "grpc",
            "kubeconfig": str(api.write_kubeconfig(tmp_path / "kubeconfig")),
            **discovery,
        }
    )
    source = KubernetesReplicas(config, initial_backoff_s=0.05, max_backoff_s=0.2)
    return ReplicaPool(source, grpc.aio.insecure_channel, RpcConfig(), trainer_address="")


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def generation_slice(name: str, endpoints, ports=None) -> dict:
    return endpoint_slice(name, "generation", endpoints, ports or {"grpc": 50051})


async def test_watch_events_change_the_pools_addresses(api, tmp_path):
    # A Service with a metrics port beside the gRPC one; another Service's slice in the same namespace.
    api.apply(
        generation_slice(
            "generation-a",
            [("10.0.0.1", True), ("10.0.0.2", False), ("10.0.0.3", None)],
            {"metrics": 9090, "grpc": 50051},
        )
    )
    api.apply(endpoint_slice("reward-a", "reward", [("10.0.0.9", True)], {"grpc": 50052}))
    pool = kubernetes_pool(api, tmp_path)
    pool.start()

    def addresses() -> set[str]:
        return set(pool.replicas)

    try:
        # Listed: ready endpoints on the port named grpc; not ready ignored; an unset condition counts as ready.
        await until(lambda: addresses() == {"10.0.0.1:50051", "10.0.0.3:50051"})
        # MODIFIED: one endpoint becomes ready, another terminates (not ready).
        api.apply(generation_slice("generation-a", [("10.0.0.1", False), ("10.0.0.2", True), ("10.0.0.3", None)]))
        await until(lambda: addresses() == {"10.0.0.2:50051", "10.0.0.3:50051"})
        # ADDED: a second slice (IPv6), and one whose port has another name (not ours).
        api.apply(generation_slice("generation-b", [("fd00::4", True)]))
        api.apply(generation_slice("generation-c", [("10.0.0.5", True)], {"http": 8080}))
        await until(lambda: addresses() == {"10.0.0.2:50051", "10.0.0.3:50051", "[fd00::4]:50051"})
        # DELETED.
        api.delete("generation-b")
        await until(lambda: addresses() == {"10.0.0.2:50051", "10.0.0.3:50051"})
        # The watch expires (410 Gone): the client lists again, and sees a change made meanwhile.
        lists = len(api.list_requests())
        api.expire()
        api.apply(generation_slice("generation-a", [("10.0.0.6", True)]))
        await until(lambda: addresses() == {"10.0.0.6:50051"})
        await until(lambda: len(api.list_requests()) > lists)
        assert GENERATION_REPLICAS.labels("new")._value.get() == 1  # discovered; no policy version to sync to yet
    finally:
        started = time.monotonic()
        await pool.close()
        assert time.monotonic() - started < 3  # the watch thread stops promptly
    # What the client asked: the Service's slices by label, in the namespace; the first watch from the list's version.
    assert {r["path"] for r in api.requests} == {SLICES}
    assert {r["labelSelector"] for r in api.requests} == {"kubernetes.io/service-name=generation"}
    watches = [r for r in api.requests if r.get("watch") == "true"]
    assert watches[0]["resourceVersion"] == "3"  # two slices applied before the first list
    assert all(GENERATION_REPLICAS.labels(s)._value.get() == 0 for s in ("new", "syncing", "ready", "failed"))


async def test_the_client_lists_again_when_a_watch_times_out(api, tmp_path):
    api.apply(generation_slice("generation-a", [("10.0.0.1", True)]))
    pool = kubernetes_pool(api, tmp_path, watch_timeout_s=1)
    pool.start()
    try:
        await until(lambda: set(pool.replicas) == {"10.0.0.1:50051"})
        await until(lambda: len(api.list_requests()) >= 2, timeout=5)  # the 1 s watch ended; listed again
        api.apply(generation_slice("generation-a", [("10.0.0.1", True), ("10.0.0.2", True)]))
        await until(lambda: set(pool.replicas) == {"10.0.0.1:50051", "10.0.0.2:50051"})
        assert {r["timeoutSeconds"] for r in api.requests if r.get("watch") == "true"} == {"1"}
    finally:
        await pool.close()


async def test_a_wrong_token_is_retried_and_logged_not_fatal(api, tmp_path, caplog):
    api.apply(generation_slice("generation-a", [("10.0.0.1", True)]))
    pool = kubernetes_pool(api, tmp_path)
    right, api.token = api.token, "rotated"  # the API refuses the kubeconfig's token (401) until it is put back
    pool.start()
    try:
        await until(lambda: len(api.requests) >= 2)
        assert not pool.replicas
        assert "Unauthorized" in caplog.text
        api.token = right
        await until(lambda: set(pool.replicas) == {"10.0.0.1:50051"})
    finally:
        await pool.close()


def test_outside_a_cluster_the_in_cluster_config_fails_at_once(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    source = KubernetesReplicas(GenerationDiscovery(mode="kubernetes", service="generation", namespace="rlhf"))

    async def start():
        source.start(lambda addresses: None)

    with pytest.raises(ConfigException):
        asyncio.run(start())


async def test_an_empty_namespace_is_the_orchestrators_own(api, tmp_path, monkeypatch):
    """Without generation_discovery.namespace the Service is looked for where the orchestrator runs: its kubeconfig
    context's namespace here (a pod's service-account namespace in a cluster, below), so the manifests need no
    namespace written into the orchestrator's config."""
    kubeconfig = api.write_kubeconfig(tmp_path / "in-namespace.kubeconfig")
    config = json.loads(kubeconfig.read_text())
    config["contexts"][0]["context"]["namespace"] = "ml-team"
    kubeconfig.write_text(json.dumps(config))
    api.apply(generation_slice("generation-a", [("10.0.0.1", True)]))
    pool = kubernetes_pool(api, tmp_path, namespace="", kubeconfig=str(kubeconfig))
    pool.start()
    try:
        await until(lambda: api.requests)
    finally:
        await pool.close()
    assert {r["path"] for r in api.requests} == {"/apis/discovery.k8s.io/v1/namespaces/ml-team/endpointslices"}

    in_pod = tmp_path / "namespace"
    in_pod.write_text("team-b\n")
    monkeypatch.setattr(replicas, "SERVICE_ACCOUNT_NAMESPACE", in_pod)
    assert KubernetesReplicas(GenerationDiscovery(mode="kubernetes", service="generation"))._namespace() == "team-b"
    monkeypatch.setattr(replicas, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "missing")
    with pytest.raises(RuntimeError, match="namespace is empty"):
        KubernetesReplicas(GenerationDiscovery(mode="kubernetes", service="generation"))._namespace()
