"""The alerts of deploy/k8s/monitoring/prometheusrule.yaml, checked three ways.

Static: the rule groups pass ``promtool check rules``; every alert has a severity, a summary, a description and a
runbook_url pointing at its own section of deploy/RUNBOOK.md; every rlhf_* metric they read is one the project
serves (the README's Metrics table, which tests/service/test_metrics_naming.py holds to the real endpoints).

Unit: ``promtool test rules`` with tests/e2e/prometheus_alerts_test.yaml, synthetic series at the production time
scale, for every alert: in particular those a short run cannot provoke (KL above its bound, reward collapse and drop,
trainer restarts).

Live: a real Prometheus (deploy/prometheus/prometheus.yml with the test stack's ports, scraping every second) evaluates
the rules, with every duration divided by 60 (``at_test_scale``), on the four services and the orchestrator as
processes. While a PPO run progresses no alert fires and GET /readyz is 200; then the generation service is
killed: the target-down, RPC-failure, no-ready-replica and run-stalled alerts fire (nothing else does) and /readyz is
503; when the run fails at the end of its outage budget, the run-level alerts resolve and /readyz is 200 again.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from services.demo import service_configs
from services.launcher import Launcher, start_stack
from shared.tiny_models import prompts
from tests.e2e.test_prometheus_dashboard import (
    JOBS,
    ROLES,
    Prometheus,
    prometheus_server,
    require,
    scrape_config,
    wait_run,
)
from tests.service.test_metrics_naming import readme_table

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "k8s" / "monitoring"
RULE = MONITORING / "prometheusrule.yaml"
RUNBOOK = REPO / "deploy" / "RUNBOOK.md"
RUNBOOK_URL = "deploy/RUNBOOK.md"  # components/values points it at your copy (monitoring.runbookUrl)
RULE_TESTS = Path(__file__).with_name("prometheus_alerts_test.yaml")
SEVERITIES = {"critical", "warning"}
STANDARD_METRICS = {"process_start_time_seconds"}  # prometheus_client's process collector, beside the table's two

# The live test: a minute of the rules is a second here.
TIME_SCALE = 60
RUN_ID = "alerts"
STALL_LIMIT_S = 10  # api.stall_limit_s: /readyz turns 503 after 10 s without an iteration
OUTAGE_BUDGET_S = 35  # the run waits this long for generation, then fails: past the stall alert's 15 s + 2 s
HEALTHY_S = 6  # longer than every `for` of the infrastructure alerts at the test scale (5 s at most)
ORCHESTRATOR_RPC = {
    "wait_ready_s": 60,
    "outage_budget_s": OUTAGE_BUDGET_S,
    "initial_backoff_s": 0.2,
    "max_backoff_s": 1.0,
}
# The alerts losing generation must fire, by a label that tells them apart.
LOST_GENERATION = {
    ("RLHFTargetDown", "job", "generation"),
    ("RLHFRPCFailures", "peer", "generation"),
    ("RLHFNoReadyGenerationReplicas", "state", "ready"),
    ("RLHFRunStalled", "run_id", RUN_ID),
}
RUN_LEVEL = {"RLHFRunStalled", "RLHFNoReadyGenerationReplicas"}  # they hold only while a run is active


def rule_groups() -> list[dict]:
    rule = yaml.safe_load(RULE.read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    return rule["spec"]["groups"]


def alert_rules() -> dict[str, dict]:
    return {rule["alert"]: rule for group in rule_groups() for rule in group["rules"] if "alert" in rule}


def write_rules(path: Path, groups: list[dict]) -> Path:
    """The groups as a plain Prometheus rules file (what the operator hands Prometheus)."""
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def at_test_scale(groups: list[dict]) -> list[dict]:
    """The rule groups with every duration divided by ``TIME_SCALE`` (a minute becomes a second): each ``for:``, each
    duration in an expression (ranges, offsets, subquery steps) and each threshold written ``N * 60`` seconds.
    Nothing else in the expressions changes; the rules use minutes and hours only, and a duration left in another
    unit fails here rather than running at the production scale."""

    def scaled(duration: str) -> str:
        number, unit = re.fullmatch(r"(\d+)([mh])", duration).groups()
        return f"{int(number) * {'m': 60, 'h': 3600}[unit] // TIME_SCALE}s"

    groups = copy.deepcopy(groups)
    for group in groups:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = scaled(rule["for"])
            expr = re.sub(r"\b\d+[mh]\b", lambda m: scaled(m[0]), rule["expr"])
            expr = re.sub(r"\b(\d+) \* 60\b", r"\1", expr)
            assert not re.search(r"\b\d+(ms|[mhdwy])\b|\* 60\b", expr), f"{rule.get('alert')}: unscaled in {expr}"
            rule["expr"] = expr
    return groups


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+?)\s*$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


# -- static and promtool ---------------------------------------------------------------------------------------------


def test_rules_pass_promtool_and_each_alert_has_a_severity_annotations_and_its_runbook_section(tmp_path):
    rule = yaml.safe_load(RULE.read_text())
    assert rule["metadata"]["name"] == "rlhf"
    assert rule["metadata"]["labels"] == {"app.kubernetes.io/name": "rlhf", "app.kubernetes.io/part-of": "rlhf"}
    assert "prometheusrule.yaml" in yaml.safe_load((MONITORING / "kustomization.yaml").read_text())["resources"]
    check = subprocess.run(
        [require("promtool"), "check", "rules", str(write_rules(tmp_path / "rules.yaml", rule_groups()))],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr

    anchors = github_anchors(RUNBOOK.read_text())
    served = set(readme_table()) | STANDARD_METRICS
    problems = []
    for name, alert in alert_rules().items():
        if alert.get("labels", {}).get("severity") not in SEVERITIES:
            problems.append(f"{name}: severity {alert.get('labels', {}).get('severity')!r}")
        annotations = alert.get("annotations", {})
        for key in ("summary", "description"):
            if not annotations.get(key):
                problems.append(f"{name}: no {key}")
        if annotations.get("runbook_url") != f"{RUNBOOK_URL}#{name.lower()}":
            problems.append(f"{name}: runbook_url {annotations.get('runbook_url')!r}")
        if name.lower() not in anchors:
            problems.append(f"{name}: no section `## {name}` in {RUNBOOK.name}")
        for metric in set(re.findall(r"\b(?:rlhf|process)_[a-z_]+\b", alert["expr"])) - served:
            problems.append(f"{name}: {metric} is not served (not in the README's Metrics table)")
    assert not problems, "\n".join(problems)
    sections = set(re.findall(r"^## (RLHF\w+)$", RUNBOOK.read_text(), re.M))
    assert sections == set(alert_rules()), "the runbook's alert sections and the alerts differ"


def test_alert_rule_unit_tests_pass_and_cover_every_alert(tmp_path):
    cases = yaml.safe_load(RULE_TESTS.read_text())
    fired = {t["alertname"] for case in cases["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == set(alert_rules()), f"alerts no case fires: {sorted(set(alert_rules()) - fired)}"
    write_rules(tmp_path / cases["rule_files"][0], rule_groups())
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = subprocess.run(
        [require("promtool"), "test", "rules", RULE_TESTS.name], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_test_scale_divides_every_duration_by_60_and_changes_nothing_else():
    production = alert_rules()
    scaled = {rule["alert"]: rule for group in at_test_scale(rule_groups()) for rule in group["rules"]}
    assert scaled["RLHFRunStalled"]["for"] == "2s"
    assert "time() - rlhf_last_progress_timestamp_seconds > 15\n" in scaled["RLHFRunStalled"]["expr"]
    assert "[30s:1s]" in scaled["RLHFTrainerRestarted"]["expr"]
    assert "[60s]" in scaled["RLHFRewardCollapse"]["expr"]
    assert "offset 10s" in scaled["RLHFRPCFailures"]["expr"]

    def blanked(expr: str) -> str:  # with the durations and the `* 60` blanked out, the expressions are the same
        return re.sub(r"\b\d+[smh]\b", "D", expr.replace(" * 60", ""))

    for name, rule in production.items():
        assert blanked(scaled[name]["expr"]) == blanked(rule["expr"]), name
        assert scaled[name]["labels"] == rule["labels"] and scaled[name]["annotations"] == rule["annotations"]


# -- a real Prometheus on a live stack -------------------------------------------------------------------------------


def firing(prometheus: Prometheus) -> list[dict]:
    """The labels of the alerts firing now."""
    return [a["labels"] for a in prometheus.get("/api/v1/alerts")["alerts"] if a["state"] == "firing"]


def matches(labels: dict, expected: tuple[str, str, str]) -> bool:
    alertname, label, value = expected
    return labels["alertname"] == alertname and labels.get(label) == value


def readyz(client: httpx.Client) -> tuple[int, dict]:
    reply = client.get("/readyz")
    return reply.status_code, reply.json()


@pytest.mark.e2e
def test_alerts_stay_quiet_while_a_run_progresses_and_fire_when_generation_is_lost(pretrained_policy_dir, tmp_path):
    require("prometheus")
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(256)))
    rules = write_rules(tmp_path / "rules.yaml", at_test_scale(rule_groups()))
    api = {"port": 0, "datasets_root": str(tmp_path), "runs_root": str(tmp_path), "stall_limit_s": STALL_LIMIT_S}
    orchestrator = {"rpc": ORCHESTRATOR_RPC, "api": api}
    run = {
        "dataset": str(dataset),
        "run_id": RUN_ID,
        "iterations": 10_000,
        "prompts_per_iteration": 16,
        "sampling": {"max_new_tokens": 8},
        "runs_dir": str(tmp_path / "runs"),
    }
    with Launcher(tmp_path / "processes") as launcher:
        services, api_url = start_stack(launcher, service_configs(pretrained_policy_dir), orchestrator)
        ports = {role: services[role].info["metrics_port"] for role in ROLES}
        ports["orchestrator"] = urlsplit(api_url).port
        config = scrape_config(ports)
        config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
        config["rule_files"] = [str(rules)]
        with prometheus_server(config, tmp_path) as prometheus, httpx.Client(base_url=api_url, timeout=10) as client:
            # Prometheus has no targets for its first seconds (its discovery manager passes them on after up to
            # 5 s), as long as RLHFTargetDown's `for` at the test scale: absent(up) fires, then clears once scraped.
            prometheus.wait(lambda: {r["metric"]["job"] for r in prometheus.query("up == 1")} == set(JOBS), 30, "up")
            prometheus.wait(lambda: not firing(prometheus), 10, "the alerts of the first seconds cleared")
            assert client.post("/runs", json=run).status_code == 201
            progress = f'rlhf_iteration{{run_id="{RUN_ID}"}} >= 3'
            prometheus.wait(lambda: prometheus.query(progress), 60, "three iterations scraped")

            # Healthy: the rules evaluate without error, nothing fires, the run reports fresh progress.
            (group,) = prometheus.get("/api/v1/rules")["groups"]
            assert {r["name"] for r in group["rules"]} == set(alert_rules())
            assert all(r["health"] == "ok" for r in group["rules"]), [r.get("lastError") for r in group["rules"]]
            quiet_until = time.monotonic() + HEALTHY_S
            while time.monotonic() < quiet_until:
                assert firing(prometheus) == [], "an alert fires while the run progresses"
                assert readyz(client) == (200, {"status": "ready"})
                time.sleep(0.5)
            age = prometheus.query(f'time() - rlhf_last_progress_timestamp_seconds{{run_id="{RUN_ID}"}}')
            assert len(age) == 1 and float(age[0]["value"][1]) < 5, age

            # Generation lost: the run waits for it (rpc.outage_budget_s), then fails.
            services["generation"].process.kill()
            killed = time.monotonic()
            seen: list[dict] = []

            def lost_generation_alerts_fire() -> bool:
                now = firing(prometheus)
                seen.extend(now)
                return all(any(matches(labels, e) for labels in now) for e in LOST_GENERATION)

            prometheus.wait(lost_generation_alerts_fire, OUTAGE_BUDGET_S - 5, "the lost-generation alerts firing")
            fired_after = time.monotonic() - killed
            unexpected = [s for s in seen if not any(matches(s, e) for e in LOST_GENERATION)]
            assert not unexpected, f"other alerts fired: {unexpected}"
            code, body = readyz(client)
            assert code == 503 and body["reason"].startswith(f"run {RUN_ID} (running, "), body
            assert body["reason"].endswith("waiting for generation"), body

            status = wait_run(client, RUN_ID, ("completed", "stopped", "failed"), OUTAGE_BUDGET_S + 30)
            assert status["state"] == "failed" and "generation" in status["error"], status
            prometheus.wait(
                lambda: not any(a["alertname"] in RUN_LEVEL for a in firing(prometheus)), 10, "run alerts resolved"
            )
            assert any(matches(a, ("RLHFTargetDown", "job", "generation")) for a in firing(prometheus))
            assert readyz(client) == (200, {"status": "ready"})
    print(f"lost-generation alerts all firing {fired_after:.1f}s after the kill")
