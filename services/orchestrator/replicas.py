"""The generation replicas: where they are, which policy version each serves, which may take a share of a batch.

Where they are comes from a ``ReplicaSource``: a static list from the config, or the EndpointSlices of the
generation Service, watched through the Kubernetes API. The ``ReplicaPool`` keeps one channel per replica and its
state:

    new (discovered) -> syncing (Info, then PullWeights from the trainer) -> ready (serves the pool's version)
    any state -> failed (a sync or a call failed: left out until a later sync succeeds)
    any state -> gone (left the source: its calls in flight are cancelled and it is dropped)

Only ready replicas serving the pool's version take shares of a batch, so a replica that appears (scale-out, a
restarted pod) is used once it has pulled the current weights, never before.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from services.orchestrator.config import DiscoveryMode, GenerationDiscovery, PeersConfig, RpcConfig
from services.orchestrator.metrics import GENERATION_REPLICAS, GENERATION_RESHARES, RPC_FAILURES, waiting
from shared.logs import context_metadata
from shared.proto.rlhf.v1 import generation_pb2, generation_pb2_grpc

log = logging.getLogger(__name__)

RESHARE_REASONS = ("failed", "gone", "stale")


class ReplicaState(enum.StrEnum):
    NEW = "new"
    SYNCING = "syncing"
    READY = "ready"
    FAILED = "failed"


def same_weights(a: tuple[int, int | None], b: tuple[int, int | None]) -> bool:
    """Whether two (epoch, version) name the same weights: version 0 is the model as loaded, in any epoch; an
    epoch is the trainer's incarnation (its version goes back when it restarts from a checkpoint)."""
    return a[1] == b[1] and (a[1] == 0 or a[0] == b[0])


class NoReplicaError(RuntimeError):
    """No generation replica serves the current policy version, after waiting ``rpc.wait_ready_s``."""


@dataclass(eq=False)
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: generation_pb2_grpc.GenerationStub
    state: ReplicaState = ReplicaState.NEW
    version: int | None = None  # the version it serves, as last seen; None = unknown (new, or after a failure)
    epoch: int = 0  # the epoch of those weights
    gone: bool = False
    calls: set[asyncio.Task] = field(default_factory=set)  # in flight to it; cancelled when it goes
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one sync at a time
    sync_task: asyncio.Task | None = None


class ReplicaSource(Protocol):
    def start(self, on_change: Callable[[frozenset[str]], None]) -> None:
        """Starts reporting: ``on_change(addresses)`` with the whole current set, on the caller's event loop."""

    async def close(self) -> None: ...


class StaticReplicas:
    """A fixed list of addresses (``peers.generation``)."""

    def __init__(self, addresses: Iterable[str]):
        self.addresses = frozenset(addresses)

    def start(self, on_change: Callable[[frozenset[str]], None]) -> None:
        on_change(self.addresses)

    async def close(self) -> None:
        pass


# Where Kubernetes puts a pod's own namespace, beside its service account token.
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubernetesReplicas:
    """The ready endpoints of a Service, from its ``discovery.k8s.io/v1`` EndpointSlices.

    A thread lists the slices labelled ``kubernetes.io/service-name=<service>``, then watches them from the
    listed resourceVersion; when the watch ends (its server-side timeout, an expired resourceVersion, a lost
    connection) it lists again, with exponential backoff after errors. An endpoint counts when its ``ready``
    condition is true (unset counts as ready, as the API documents) and its slice has the port named
    ``port_name``; of an endpoint's addresses the first is used (the API says they are fungible).
    """

    def __init__(self, discovery: GenerationDiscovery, initial_backoff_s: float = 0.5, max_backoff_s: float = 10.0):
        self.discovery = discovery
        self.selector = f"kubernetes.io/service-name={discovery.service}"
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self._stop = threading.Event()
        self._api = None
        self._thread: threading.Thread | None = None
        self._watch = None
        self._published: frozenset[str] | None = None

    def _namespace(self) -> str:
        """The configured namespace, else the orchestrator's own: its pod's service account namespace in a cluster,
        its kubeconfig's current context's namespace (or ``default``) outside one."""
        if self.discovery.namespace:
            return self.discovery.namespace
        if self.discovery.kubeconfig:
            from kubernetes import config

            _, context = config.list_kube_config_contexts(config_file=self.discovery.kubeconfig)
            return context.get("context", {}).get("namespace") or "default"
        try:
            return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        except OSError as exc:
            raise RuntimeError(
                f"generation_discovery.namespace is empty and {SERVICE_ACCOUNT_NAMESPACE} cannot be read ({exc}): "
                "set the namespace, or run in a pod with a service account token"
            ) from None

    def _api_client(self):
        from kubernetes import client, config

        if self.discovery.kubeconfig:
            return config.new_client_from_config(config_file=self.discovery.kubeconfig, persist_config=False)
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)

    def start(self, on_change: Callable[[frozenset[str]], None]) -> None:
        loop = asyncio.get_running_loop()
        # Here, not in the thread: a missing config or namespace fails the run at once.
        self._api = self._api_client()
        self.namespace = self._namespace()

        def publish(addresses: frozenset[str]) -> None:
            if addresses != self._published:
                self._published = addresses
                try:
                    loop.call_soon_threadsafe(on_change, addresses)
                except RuntimeError:  # the event loop is closed: nobody is listening any more
                    self._stop.set()

        self._thread = threading.Thread(target=self._run, args=(publish,), name="generation-discovery", daemon=True)
        self._thread.start()

    def _run(self, publish: Callable[[frozenset[str]], None]) -> None:
        from kubernetes import client, watch

        api = client.DiscoveryV1Api(self._api)
        delay = self.initial_backoff_s
        namespace, timeout = self.namespace, self.discovery.watch_timeout_s
        while not self._stop.is_set():
            try:
                listed = api.list_namespaced_endpoint_slice(
                    namespace, label_selector=self.selector, _request_timeout=30
                )
                slices = {s.metadata.name: s for s in listed.items}
                publish(self._addresses(slices.values()))
                self._watch = watch.Watch()
                for event in self._watch.stream(
                    api.list_namespaced_endpoint_slice,
                    namespace,
                    label_selector=self.selector,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=timeout,
                    _request_timeout=(30, timeout + 30),  # connect; read: a silent server is given up on
                ):
                    kind, endpoint_slice = event["type"], event["object"]
                    if kind in ("ADDED", "MODIFIED"):
                        slices[endpoint_slice.metadata.name] = endpoint_slice
                    elif kind == "DELETED":
                        slices.pop(endpoint_slice.metadata.name, None)
                    else:
                        continue  # BOOKMARK
                    publish(self._addresses(slices.values()))
                    if self._stop.is_set():
                        break
                delay = self.initial_backoff_s  # the watch timed out as asked: list again
            except Exception as exc:  # API errors, 410 Gone, lost connections: list again after a while
                if self._stop.is_set():
                    break
                log.warning(
                    "watching EndpointSlices of %s/%s: %s; listing again in %.1fs",
                    namespace,
                    self.discovery.service,
                    _describe(exc),
                    delay,
                )
                self._stop.wait(delay)
                delay = min(delay * 2, self.max_backoff_s)
        self._api.close()

    def _addresses(self, slices: Iterable[Any]) -> frozenset[str]:
        addresses = set()
        for endpoint_slice in slices:
            port = next((p.port for p in endpoint_slice.ports or [] if p.name == self.discovery.port_name), None)
            if port is None:
                continue
            for endpoint in endpoint_slice.endpoints or []:
                conditions = endpoint.conditions
                if conditions is not None and conditions.ready is False:
                    continue
                host = endpoint.addresses[0]
                addresses.add(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return frozenset(addresses)

    async def close(self) -> None:
        self._stop.set()
        if self._thread is None:
            return
        # Stopping a watch shuts its socket down, so the thread's blocking read returns; but a watch the thread
        # began just as close() was called (after a relist, say) has no socket yet. Stop again until it exits.
        deadline = time.monotonic() + 5
        while self._thread.is_alive() and time.monotonic() < deadline:
            if self._watch is not None:
                self._watch.stop()
            await asyncio.to_thread(self._thread.join, 0.1)


def _describe(exc: Exception) -> str:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):  # its str() is several lines of headers and body
        return f"HTTP {exc.status} {exc.reason}"
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def replica_source(peers: PeersConfig, rpc: RpcConfig) -> ReplicaSource:
    discovery = peers.generation_discovery
    if discovery.mode is DiscoveryMode.KUBERNETES:
        return KubernetesReplicas(discovery, rpc.initial_backoff_s, rpc.max_backoff_s)
    if not peers.generation:
        raise ValueError("peers.generation: at least one generation replica address is required")
    return StaticReplicas(peers.generation)


class ReplicaPool:
    """The replicas a source reports, each with its state and version; the pool's ``version`` is the one batches
    must be generated with (set by ``ensure_version``)."""

    def __init__(
        self,
        source: ReplicaSource,
        connect: Callable[[str], grpc.aio.Channel],
        rpc: RpcConfig,
        trainer_address: str,
    ):
        self.source = source
        self.connect = connect
        self.rpc = rpc
        self.trainer_address = trainer_address
        self.version: int | None = None
        self.epoch = 0  # with version: the weights batches must come from
        self.replicas: dict[str, Replica] = {}
        self._changed = asyncio.Event()
        self._reported = asyncio.Event()  # the source reported at least once
        self._started = False
        self._unreported_bytes = 0  # weight bytes moved by syncs since the last ensure_version
        self._background: set[asyncio.Task] = set()

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for reason in RESHARE_REASONS:  # the series exist (at 0) from the start
            GENERATION_RESHARES.labels(reason)
        self._publish()
        self.source.start(self._update)

    # -- membership -------------------------------------------------------------------------------------------

    def _update(self, addresses: frozenset[str]) -> None:
        self._reported.set()
        for address in self.replicas.keys() - addresses:
            replica = self.replicas.pop(address)
            replica.gone = True
            for call in replica.calls:
                call.cancel()
            self._spawn(replica.channel.close())
            log.info("generation replica %s left", address)
        for address in sorted(addresses - self.replicas.keys()):
            channel = self.connect(address)
            replica = Replica(address, channel, generation_pb2_grpc.GenerationStub(channel))
            self.replicas[address] = replica
            log.info("generation replica %s joined", address)
            if self.version is not None:
                self._sync_in_background(replica)
        self._publish()

    def usable(self) -> list[Replica]:
        """Replicas that may take a share of a batch now: ready at the pool's version (by address, for a stable
        split)."""
        return [r for _, r in sorted(self.replicas.items()) if r.state is ReplicaState.READY and self.serves(r)]

    def serves(self, replica: Replica) -> bool:
        """Whether ``replica`` serves the pool's weights."""
        return same_weights((replica.epoch, replica.version), (self.epoch, self.version))

    def describe(self) -> str:
        return (
            ", ".join(f"{a} {r.state.value} v{r.version} e{r.epoch}" for a, r in sorted(self.replicas.items()))
            or "none"
        )

    def _set(self, replica: Replica, state: ReplicaState) -> None:
        replica.state = state
        self._publish()

    def _publish(self) -> None:
        counts = dict.fromkeys(ReplicaState, 0)
        for replica in self.replicas.values():
            counts[replica.state] += 1
        for state, count in counts.items():
            GENERATION_REPLICAS.labels(state.value).set(count)
        self._changed.set()

    # -- calls ------------------------------------------------------------------------------------------------

    def call(self, replica: Replica, coroutine: Coroutine) -> asyncio.Task:
        """Runs a call to ``replica`` as a task that is cancelled if the replica goes."""
        task = asyncio.create_task(coroutine)
        replica.calls.add(task)
        task.add_done_callback(replica.calls.discard)
        if replica.gone:
            task.cancel()
        return task

    def _spawn(self, coroutine: Coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def mark_failed(self, replica: Replica, why: str) -> None:
        """A call to it failed: left out until a later sync succeeds (its version is unknown: it may restart)."""
        if replica.gone or replica.state is ReplicaState.FAILED:
            return
        log.warning("generation replica %s failed: %s; left out until it syncs again", replica.address, why)
        replica.version = None
        self._set(replica, ReplicaState.FAILED)

    def mark_stale(self, replica: Replica, version: int, epoch: int) -> None:
        """It answered with other weights than the pool's (restarted, or updated behind our back): sync it."""
        if replica.gone:
            return
        log.warning(
            "generation replica %s answered with policy version %d (epoch %d), not %s (epoch %d); syncing it",
            replica.address,
            version,
            epoch,
            self.version,
            self.epoch,
        )
        replica.version, replica.epoch = version, epoch
        self._set(replica, ReplicaState.NEW)
        self._sync_in_background(replica)

    # -- versions ---------------------------------------------------------------------------------------------

    async def _info(self, replica: Replica) -> None:
        reply = await replica.stub.Info(
            generation_pb2.InfoRequest(), timeout=self.rpc.weights_timeout_s, metadata=context_metadata()
        )
        replica.version, replica.epoch = reply.policy_version, reply.policy_epoch

    async def _sync(self, replica: Replica, version: int, epoch: int) -> None:
        """Brings ``replica`` to (epoch, version): Info when its version is unknown, PullWeights when it differs."""
        async with replica.lock:
            if replica.gone or (epoch, version) != (self.epoch, self.version):
                return  # superseded by a newer ensure_version, or gone
            if self.serves(replica):
                self._set(replica, ReplicaState.READY)
                return
            self._set(replica, ReplicaState.SYNCING)
            method = "Info"
            try:
                if replica.version is None:
                    await self._info(replica)
                if not self.serves(replica):
                    method = "PullWeights"
                    request = generation_pb2.PullWeightsRequest(
                        trainer_address=self.trainer_address, min_version=version, epoch=epoch
                    )
                    result = await replica.stub.PullWeights(
                        request, timeout=self.rpc.weights_timeout_s, metadata=context_metadata()
                    )
                    replica.version, replica.epoch = result.version, result.epoch
                    self._unreported_bytes += result.bytes
                    log.info(
                        "generation replica %s pulled policy version %d (epoch %d)",
                        replica.address,
                        result.version,
                        result.epoch,
                    )
            except grpc.aio.AioRpcError as err:
                RPC_FAILURES.labels("generation", method, err.code().name).inc()
                self.mark_failed(replica, f"{method} for version {version}: {err.code().name} {err.details()}")
                return
            # A newer version than asked (the trainer moved on during a background sync) is usable after the next
            # ensure_version; until then the replica waits as new.
            self._set(replica, ReplicaState.READY if self.serves(replica) else ReplicaState.NEW)

    def _sync_in_background(self, replica: Replica) -> None:
        if self.version is None or (replica.sync_task is not None and not replica.sync_task.done()):
            return
        task = self.call(replica, self._sync(replica, self.version, self.epoch))
        replica.sync_task = task
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _first_report(self) -> None:
        """Waits (up to ``rpc.wait_ready_s``) for the source's first list, so that the first sync covers every
        replica listed then rather than the first one found."""
        self.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reported.wait(), self.rpc.wait_ready_s)

    async def ensure_version(self, version: int, epoch: int = 0) -> int:
        """Makes every known replica serve (epoch, version) (new ones included); returns the weight bytes moved
        since the last call. Replicas that fail are left out (logged, ``rlhf_generation_replicas{state="failed"}``)
        and tried again at the next call, or while a batch waits for a replica."""
        await self._first_report()
        self.version, self.epoch = version, epoch
        syncs = [self.call(r, self._sync(r, version, epoch)) for r in list(self.replicas.values())]
        for outcome in await asyncio.gather(*syncs, return_exceptions=True):
            if isinstance(outcome, Exception):  # not an RPC error (those are handled): a bug
                raise outcome
        moved, self._unreported_bytes = self._unreported_bytes, 0
        if not self.usable():
            log.warning(
                "no generation replica serves policy version %d (epoch %d) yet: %s", version, epoch, self.describe()
            )
        return moved

    async def newest_version(self, timeout: float) -> tuple[int, int]:
        """The newest (epoch, version) any replica serves: where a client with no trainer to sync from starts."""
        await self._first_report()
        deadline = asyncio.get_running_loop().time() + timeout
        delay = self.rpc.initial_backoff_s
        while True:
            unknown = [r for r in self.replicas.values() if r.version is None]
            for outcome in await asyncio.gather(
                *(self.call(r, self._info(r)) for r in unknown), return_exceptions=True
            ):
                if isinstance(outcome, grpc.aio.AioRpcError):
                    log.warning("generation replica Info: %s %s", outcome.code().name, outcome.details())
            served = [(r.epoch, r.version) for r in self.replicas.values() if r.version is not None]
            if served:
                return max(served)
            if not await self._wait_for_change(deadline, delay):
                raise NoReplicaError(f"no generation replica answered after {timeout:.0f}s: {self.describe()}")
            delay = min(delay * 2, self.rpc.max_backoff_s)

    async def wait_usable(self, timeout: float) -> list[Replica]:
        """The usable replicas, waiting (while syncing new and failed ones, with backoff) until there is one."""
        if usable := self.usable():
            return usable
        deadline = asyncio.get_running_loop().time() + timeout
        delay = self.rpc.initial_backoff_s
        with waiting("generation"):
            while not (usable := self.usable()):
                for replica in list(self.replicas.values()):
                    if replica.state in (ReplicaState.NEW, ReplicaState.FAILED):
                        self._sync_in_background(replica)
                if not await self._wait_for_change(deadline, delay):
                    RPC_FAILURES.labels("generation", "Generate", grpc.StatusCode.UNAVAILABLE.name).inc()
                    raise NoReplicaError(
                        f"no generation replica serves policy version {self.version} after {timeout:.0f}s: "
                        f"{self.describe()}"
                    )
                delay = min(delay * 2, self.rpc.max_backoff_s)
        return usable

    async def _wait_for_change(self, deadline: float, delay: float) -> bool:
        """Waits for a membership or state change, at most ``delay``; False once past ``deadline``."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return False
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), min(delay, remaining))
        return True

    async def close(self) -> None:
        await self.source.close()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for replica in self.replicas.values():
            for call in replica.calls:
                call.cancel()
            await replica.channel.close()
        self.replicas.clear()
        self._publish()
