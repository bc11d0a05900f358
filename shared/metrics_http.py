"""The metrics port: the process's Prometheus registry over HTTP, with the server's TLS, and its token when
``auth.metrics_require_token`` is on (Prometheus then scrapes with ``authorization.credentials_file``)."""

from __future__ import annotations

import logging
import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from shared.auth import ServerAuth

log = logging.getLogger(__name__)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # one line per scrape is noise
        pass


def _with_token(app, server_auth: ServerAuth):
    def guarded(environ, start_response):
        if server_auth.accepts(environ.get("HTTP_AUTHORIZATION")):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
        return [b"missing or wrong bearer token\n"]

    return guarded


def start_metrics_server(config, server_auth: ServerAuth | None = None) -> int | None:
    """Serves the registry on ``config.metrics_port`` (a ``ServerConfig``) in a daemon thread; returns the bound
    port (None when off)."""
    if config.metrics_port is None:
        return None
    server_auth = server_auth or ServerAuth()
    app = make_wsgi_app()
    if server_auth.metrics_require_token:
        app = _with_token(app, server_auth)
    family = socket.getaddrinfo(config.host, config.metrics_port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    httpd = make_server(config.host, config.metrics_port, app, server_class, handler_class=_QuietHandler)
    context = server_auth.ssl_context()
    if context is not None:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    port = httpd.server_address[1]
    log.info("metrics on %s://%s:%d/metrics", "https" if context else "http", config.host, port)
    return port
