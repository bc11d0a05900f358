"""A stand-in for the one corner of the Kubernetes API the orchestrator reads: EndpointSlices, listed and watched.

No kube-apiserver can run here (no cluster, no etcd, no container runtime on the development machine), so tests
point the real ``kubernetes`` client at this small HTTP server on loopback through a kubeconfig file. It answers
what the client asks, in the API's wire format:

- ``GET /apis/discovery.k8s.io/v1/namespaces/<ns>/endpointslices?labelSelector=k=v`` -> an EndpointSliceList
  with the store's resourceVersion;
- the same with ``watch=true&resourceVersion=N&timeoutSeconds=T`` -> a chunked stream of JSON watch events
  (ADDED, MODIFIED, DELETED) after N, ended after T seconds; a resourceVersion older than the kept history gets
  an ERROR event with code 410 (Gone), as the API server does, and ``expire()`` sends that to open watches.

Requests must carry the kubeconfig's bearer token.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

PREFIX = "/apis/discovery.k8s.io/v1/namespaces/"


def endpoint_slice(
    name: str,
    service: str,
    endpoints: list[tuple[str, bool | None]],
    ports: dict[str, int],
    namespace: str = "rlhf",
) -> dict:
    """An EndpointSlice object: ``endpoints`` as (address, ready) (None: the condition unset), ``ports`` by name."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv6" if any(":" in a for a, _ in endpoints) else "IPv4",
        "endpoints": [
            {"addresses": [address], "conditions": {} if ready is None else {"ready": ready}}
            for address, ready in endpoints
        ],
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"} for port_name, port in ports.items()],
    }


class EndpointSliceAPI:
    def __init__(self, token: str = "stand-in-token"):
        self.token = token
        self._condition = threading.Condition()
        self._slices: dict[tuple[str, str], dict] = {}  # (namespace, name) -> object
        self._events: list[tuple[int, str, dict]] = []  # (resourceVersion, type, object)
        self._version = 1
        self._oldest = 0  # watches from a resourceVersion below this are told 410 Gone
        self._expiries = 0  # expire() calls: watches open across one are told 410 Gone
        self._closing = False
        self.requests: list[dict[str, str]] = []  # every request's query (and "path"), in order
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True

    # -- the store, changed by the test ----------------------------------------------------------------------

    def apply(self, obj: dict) -> None:
        """Creates or replaces a slice: an ADDED or MODIFIED event."""
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._condition:
            kind = "MODIFIED" if key in self._slices else "ADDED"
            self._slices[key] = self._record(kind, obj)

    def delete(self, name: str, namespace: str = "rlhf") -> None:
        with self._condition:
            self._record("DELETED", self._slices.pop((namespace, name)))

    def expire(self) -> None:
        """Forgets the event history: open watches get 410 Gone and must list again."""
        with self._condition:
            self._oldest = self._version
            self._expiries += 1
            self._condition.notify_all()

    def _record(self, kind: str, obj: dict) -> dict:
        """Stamps a copy of ``obj`` with the next resourceVersion and keeps the event; returns the copy."""
        self._version += 1
        obj = json.loads(json.dumps(obj))
        obj["metadata"]["resourceVersion"] = str(self._version)
        self._events.append((self._version, kind, obj))
        self._condition.notify_all()
        return obj

    # -- serving ---------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(  # JSON is YAML
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
                    "users": [{"name": "orchestrator", "user": {"token": self.token}}],
                    "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "orchestrator"}}],
                    "current-context": "stand-in",
                }
            )
        )
        return path

    def list_requests(self) -> list[dict[str, str]]:
        return [r for r in self.requests if r.get("watch") != "true"]

    def __enter__(self) -> EndpointSliceAPI:
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="k8s-stand-in", daemon=True
        ).start()
        return self

    def __exit__(self, *exc) -> None:
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def _matching(self, namespace: str, selector: str, obj: dict) -> bool:
        labels = obj["metadata"].get("labels", {})
        wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
        return obj["metadata"]["namespace"] == namespace and all(labels.get(k) == v for k, v in wanted.items())


def _handler(api: EndpointSliceAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _send_json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _chunk(self, event: dict) -> None:
            data = (json.dumps(event) + "\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def do_GET(self) -> None:
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            api.requests.append({"path": url.path, **query})
            if self.headers.get("Authorization") != f"Bearer {api.token}":
                return self._send_json(401, _status(401, "Unauthorized", "no or wrong bearer token"))
            parts = url.path.removeprefix(PREFIX).split("/")
            if not url.path.startswith(PREFIX) or len(parts) != 2 or parts[1] != "endpointslices":
                return self._send_json(404, _status(404, "NotFound", f"{url.path} is not served by the stand-in"))
            namespace, selector = parts[0], query.get("labelSelector", "")
            if query.get("watch") == "true":
                return self._watch(namespace, selector, int(query.get("resourceVersion") or 0), query)
            with api._condition:
                items = [o for o in api._slices.values() if api._matching(namespace, selector, o)]
                version = api._version
            self._send_json(
                200,
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSliceList",
                    "metadata": {"resourceVersion": str(version)},
                    "items": items,
                },
            )

        def _watch(self, namespace: str, selector: str, since: int, query: dict[str, str]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.close_connection = True
            deadline = time.monotonic() + float(query.get("timeoutSeconds", 1800))
            with contextlib.suppress(OSError):  # the client hung up (a watch it stopped)
                self._stream(namespace, selector, since, deadline)

        def _stream(self, namespace: str, selector: str, since: int, deadline: float) -> None:
            with api._condition:
                expiries = api._expiries
                while not api._closing:
                    if since < api._oldest or api._expiries != expiries:
                        self._chunk({"type": "ERROR", "object": _status(410, "Expired", "too old resource version")})
                        break
                    for version, kind, obj in api._events:
                        if version > since and api._matching(namespace, selector, obj):
                            self._chunk({"type": kind, "object": obj})
                    since = api._version
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    api._condition.wait(remaining)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    return Handler


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "reason": reason,
        "message": message,
        "code": code,
    }
