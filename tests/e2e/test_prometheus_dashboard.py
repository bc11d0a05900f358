"""The observability assets against the real thing: every query of the Grafana dashboard, evaluated by a real
Prometheus (deploy/prometheus/prometheus.yml, the test stack's ports put in) scraping the four services and the
orchestrator as processes right after a PPO run, returns series with finite values, over metrics the targets expose.

The run also meets the events the error panels show: a run refused by generation (RESOURCE_EXHAUSTED: gRPC errors,
an RPC that failed for good) and the reward service killed and restarted on its ports mid-run (the orchestrator
retries while it is UNAVAILABLE, then the run goes on). Static checks keep the ConfigMap, the Prometheus config and
the example service configs in step with the dashboard.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from services.demo import service_configs
from services.launcher import Launcher, ServiceProcess, start_stack
from shared.tiny_models import prompts

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "rlhf.json"
CONFIGMAP = REPO / "deploy" / "k8s" / "monitoring" / "grafana-dashboard-configmap.yaml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
ROLES = ("generation", "reward", "reference", "trainer")
JOBS = (*ROLES, "orchestrator")
# What Grafana would substitute at a 15 s step over a 5 s scrape interval (rate_interval >= 4 scrapes).
RATE_INTERVAL, INTERVAL = "30s", "15s"
# Retries fast enough to ride out a restart of the reward service (each retry waits at most 1 s).
ORCHESTRATOR = {"rpc": {"wait_ready_s": 60, "outage_budget_s": 120, "initial_backoff_s": 0.2, "max_backoff_s": 1.0}}
METRIC_NAME = re.compile(r"\b(?:rlhf|grpc_server|process)_[a-z_]+\b")


def dashboard_panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def substitute(expr: str, run_id: str) -> str:
    for name, value in (("$__rate_interval", RATE_INTERVAL), ("$__interval", INTERVAL), ("${run}", run_id)):
        expr = expr.replace(name, value)
    return expr.replace("$run", run_id)


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed: `make system-deps` installs it (Debian package prometheus)")
    return path


# -- static ----------------------------------------------------------------------------------------------------------


def test_every_panel_has_a_unit_the_datasource_variable_and_queries():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "rlhf-overview" and dashboard["title"] == "RLHF"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["run"]["query"] == "label_values(rlhf_iteration, run_id)"
    problems = []
    for panel in dashboard_panels():
        title = panel.get("title", f"panel {panel.get('id')}")
        if not panel.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append(f"{title}: no unit")
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"{title}: datasource is not ${{datasource}}")
        if not panel.get("targets"):
            problems.append(f"{title}: no targets")
        ref_ids = [t.get("refId") for t in panel.get("targets", [])]
        if None in ref_ids or len(set(ref_ids)) != len(ref_ids):
            problems.append(f"{title}: refIds missing or repeated: {ref_ids}")
        for target in panel.get("targets", []):
            ranges = re.findall(r"\[([^\]]*)\]", target.get("expr", ""))
            if not target.get("expr") or any(r != "$__rate_interval" for r in ranges):
                problems.append(f"{title}: expr empty or with a fixed range: {target.get('expr')!r}")
    assert not problems, "\n".join(problems)


def test_configmap_holds_the_dashboard_byte_for_byte():
    configmap = yaml.safe_load(CONFIGMAP.read_text())
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"]["rlhf.json"] == DASHBOARD.read_text()
    check = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "grafana" / "build_configmap.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_prometheus_config_is_valid_and_scrapes_the_example_configs_ports():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    configs = {job: yaml.safe_load((REPO / "deploy" / "configs" / f"{job}.yaml").read_text()) for job in JOBS}
    expected = {role: [f"localhost:{configs[role]['server']['metrics_port']}"] for role in ROLES}
    expected["orchestrator"] = [f"localhost:{configs['orchestrator']['api']['port']}"]
    assert targets == expected
    check = subprocess.run(
        [require("promtool"), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


# -- against a live stack --------------------------------------------------------------------------------------------


class Prometheus:
    def __init__(self, url: str, process: subprocess.Popen, log_path: Path):
        self.client = httpx.Client(base_url=url, timeout=10)
        self.url = url
        self.process = process
        self.log_path = log_path

    def get(self, path: str, **params) -> dict:
        body = self.client.get(path, params=params).json()
        if body.get("status") != "success":
            raise AssertionError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        return self.get("/api/v1/query", query=expr, **({"time": at} if at is not None else {}))["result"]

    def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.TransportError):  # still starting
                if condition():
                    return
            if time.monotonic() > deadline or self.process.poll() is not None:
                log = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
                raise AssertionError(f"{what}: not within {timeout:.0f}s; prometheus log:\n{log}")
            time.sleep(0.5)

    def scraped_after(self, moment: float) -> bool:
        """Every job has been scraped (successfully) since ``moment``."""
        scrapes = {r["metric"]["job"]: float(r["value"][1]) for r in self.query("timestamp(up == 1)")}
        return set(scrapes) == set(JOBS) and min(scrapes.values()) > moment


@contextlib.contextmanager
def prometheus_server(config: dict, work: Path) -> Iterator[Prometheus]:
    """A real Prometheus on a free loopback port with its own tsdb; stopped on exit."""
    binary = require("prometheus")
    config_path = work / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = work / "prometheus.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        prometheus = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
        prometheus.wait(lambda: prometheus.client.get("/-/ready").status_code == 200, 60, "prometheus ready")
        yield prometheus
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def scrape_config(ports: dict[str, int]) -> dict:
    """deploy/prometheus/prometheus.yml with each job's target on the port the test stack got."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert {job["job_name"] for job in config["scrape_configs"]} == set(JOBS)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    return config


def wait_run(client: httpx.Client, run_id: str, states: tuple[str, ...], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/runs/{run_id}").json()
        if status["state"] in states:
            return status
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} not {states} after {timeout}s: {status['state']}")


def restart(launcher: Launcher, service: ServiceProcess) -> ServiceProcess:
    """Kills a service (no drain: its peers see UNAVAILABLE) and starts it again on the same two ports, with the
    config it was started with (its token included)."""
    service.process.kill()
    service.process.wait()
    config = yaml.safe_load((launcher.work_dir / f"{service.name}.yaml").read_text())
    server = {**config["server"], "port": service.info["port"], "metrics_port": service.info["metrics_port"]}
    restarted = launcher.start(service.name, ["serve", service.name], {**config, "server": server})
    restarted.wait_ready(60)
    return restarted


@pytest.mark.e2e
def test_every_dashboard_query_returns_series_from_prometheus_scraping_the_stack(pretrained_policy_dir, tmp_path):
    require("prometheus")
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(256)))
    configs = service_configs(pretrained_policy_dir)
    run = {"dataset": str(dataset), "prompts_per_iteration": 16, "runs_dir": str(tmp_path / "runs")}
    with Launcher(tmp_path / "processes") as launcher:
        services, api = start_stack(launcher, configs, ORCHESTRATOR)
        ports = {role: services[role].info["metrics_port"] for role in ROLES}
        ports["orchestrator"] = urlsplit(api).port
        with prometheus_server(scrape_config(ports), tmp_path) as prometheus, httpx.Client(base_url=api) as client:
            prometheus.wait(
                lambda: {r["metric"]["job"] for r in prometheus.query("up == 1")} == set(JOBS), 60, "all targets up"
            )
            # A run generation refuses (max_new_tokens over its limit): a gRPC error and an RPC that failed for good.
            refused = {**run, "run_id": "refused", "iterations": 1, "sampling": {"max_new_tokens": 100_000}}
            assert client.post("/runs", json=refused).status_code == 201
            assert "RESOURCE_EXHAUSTED" in (wait_run(client, "refused", ("failed",), 60)["error"] or "")

            # The run the dashboard shows: long enough that every rate spans several scrapes, stopped by hand.
            run_id = "dashboard"
            created = client.post("/runs", json={**run, "run_id": run_id, "iterations": 500})
            assert created.status_code == 201, created.text
            prometheus.wait(lambda: prometheus.query(f'rlhf_iteration{{run_id="{run_id}"}}'), 60, "a scrape mid-run")
            services["reward"] = restart(launcher, services["reward"])
            restarted_at = client.get(f"/runs/{run_id}").json()["iteration"]
            restarted = time.time()
            prometheus.wait(lambda: prometheus.scraped_after(restarted + 5), 60, "two scrapes after the restart")
            client.post(f"/runs/{run_id}/stop")
            status = wait_run(client, run_id, ("stopped", "completed", "failed"), 60)
            assert status["state"] == "stopped", status.get("error")
            assert status["iteration"] > restarted_at, "the run did not go on after the reward service restarted"
            stopped = time.time()
            prometheus.wait(lambda: prometheus.scraped_after(stopped), 30, "a scrape after the run")

            at = time.time()
            known = set(prometheus.get("/api/v1/metadata"))
            failures = []
            for panel in dashboard_panels():
                for target in panel["targets"]:
                    expr = substitute(target["expr"], run_id)
                    where = f"{panel['title']!r} [{target['refId']}] {expr}"
                    for name in sorted(set(METRIC_NAME.findall(expr))):
                        # Metadata is by family: histograms without _bucket/_sum/_count, and counters without
                        # _total where the target answered in OpenMetrics (the gRPC services do).
                        if not {name, re.sub(r"_(bucket|sum|count|total)$", "", name)} & known:
                            failures.append(f"{where}: {name} is not exposed by any target")
                    try:
                        values = [float(series["value"][1]) for series in prometheus.query(expr, at)]
                    except AssertionError as exc:
                        failures.append(f"{where}: {exc}")
                        continue
                    # NaN everywhere would mean a histogram or a ratio saw nothing in the window.
                    if not any(math.isfinite(v) for v in values):
                        failures.append(f"{where}: {'only NaN' if values else 'no series'}")
            assert not failures, f"{len(failures)} dashboard queries failed:\n" + "\n".join(failures)
            # The provoked events are in (the retry series exist at 0 from the start, so the panels alone would pass).
            for event in (
                "rlhf_rpc_retries_total",
                "rlhf_rpc_failures_total",
                'grpc_server_handled_total{grpc_code!="OK"}',
            ):
                assert prometheus.query(f"sum({event}) > 0", at), f"no {event} after the refused run and the restart"
            # The $run variable's query lists the run.
            assert run_id in prometheus.get("/api/v1/label/run_id/values", **{"match[]": "rlhf_iteration"})

            png = tmp_path / "dashboard.png"
            renderer = REPO / "deploy" / "grafana" / "render.py"
            render = subprocess.run(
                [sys.executable, str(renderer), "--prometheus", prometheus.url, "--run", run_id, "--out", str(png)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert render.returncode == 0, render.stdout + render.stderr
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
