"""What every process serves on /metrics, held to the README's "Metrics" table and the Prometheus conventions.

The four services and the orchestrator run as their own processes (the demo's configs, on the tiny policy), so
each /metrics endpoint shows exactly what its process registers. A 2-iteration run and a run that fails (a
sampling request over generation's limit, so that an RPC fails for good) go through the control API; then every
endpoint is scraped over HTTP and checked: (a) every metric of the table is on the processes that should serve it,
with a sample; (b) the naming rules; (c) bounded labels; (d) the table and the exposed ``rlhf_*`` families agree
both ways, with their types and labels; and the counts agree between processes.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from services.demo import service_configs
from services.launcher import Launcher, start_stack
from shared.tiny_models import prompts

README = Path(__file__).resolve().parents[2] / "README.md"
SERVICES = ("generation", "reward", "reference", "trainer")
PROCESSES = (*SERVICES, "orchestrator")
ITERATIONS, PROMPTS = 2, 8
STANDARD_PREFIXES = ("grpc_server_", "process_", "python_")
ALLOWED_LABELS = {
    *("role", "phase", "run_id", "reason", "peer", "method", "code", "state", "device", "kind"),
    *("grpc_type", "grpc_service", "grpc_method", "grpc_code"),
    *("le", "quantile"),  # histogram and summary buckets
    *("implementation", "major", "minor", "patchlevel", "version"),  # python_info
    "generation",  # python_gc_*: the garbage collector's generation, 0 to 2
}
MAX_LABEL_VALUES = 50
# The orchestrator's view of the generation replicas (the other rlhf_generation_* are the service's own).
ORCHESTRATOR_GENERATION_METRICS = {"rlhf_generation_replicas", "rlhf_generation_reshares_total"}
# Metrics of weights moving and being held; the other role-labelled ones are on every model service.
WEIGHT_HOLDERS = ("generation", "trainer")
WEIGHT_METRICS = {
    "rlhf_weights_version",
    "rlhf_weight_updates_total",
    "rlhf_weight_update_bytes_total",
    "rlhf_weight_update_seconds",
}


@dataclass
class TableRow:
    name: str
    type: str
    labels: frozenset[str]


@dataclass
class Exposition:
    """One scrape: families by the name on their ``# TYPE`` line (counters with ``_total``)."""

    types: dict[str, str] = field(default_factory=dict)
    help: dict[str, str] = field(default_factory=dict)
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Exposition:
        exposition = cls()
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
            exposition.types[name] = kind
        for name, text_ in re.findall(r"^# HELP (\S+) (.*)$", text, re.M):
            exposition.help[name] = text_
        for family in text_string_to_metric_families(text):
            # The parser drops a counter's _total from the family name; the samples keep it.
            name = f"{family.name}_total" if family.type == "counter" else family.name
            assert name in exposition.types, f"{name} parsed but has no # TYPE line"
            exposition.samples[name] = list(family.samples)
        return exposition

    def families(self) -> set[str]:
        """Family names, without prometheus_client's ``X_created`` companions of counters and histograms."""
        return {
            name
            for name in self.types
            if not (name.endswith("_created") and ({name[:-8], name[:-8] + "_total"} & self.types.keys()))
        }

    def value(self, name: str, **labels: str) -> float:
        """The one sample of family ``name`` (its ``_total``/``_count`` sample for counters/histograms) matching
        ``labels``."""
        kind = self.types[name]
        sample_name = {"histogram": f"{name}_count"}.get(kind, name)
        matches = [
            s.value
            for s in self.samples[name]
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(matches) == 1, f"{name}{labels}: {len(matches)} samples"
        return matches[0]


def readme_table() -> dict[str, TableRow]:
    """The rows of the README's "## Metrics" table; a cell like `` `rlhf_reward_mean`, `_std` `` names
    ``rlhf_reward_mean`` and ``rlhf_reward_std``; a cell of types like "gauge, counter" pairs with the names."""
    # The section headed "Metrics" (any heading level), up to the next heading.
    section = re.split(r"\n#+ Metrics\n", README.read_text(), maxsplit=1)[1]
    section = re.split(r"\n#+ ", section, maxsplit=1)[0]
    rows: dict[str, TableRow] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        names = re.findall(r"`([^`]+)`", cells[0])
        names = [names[0]] + [names[0].rsplit("_", 1)[0] + n if n.startswith("_") else n for n in names[1:]]
        types = [t.strip() for t in cells[1].split(",")]
        types = types if len(types) == len(names) else types * len(names)
        labels = frozenset(label.strip() for label in cells[2].split(",") if label.strip())
        for name, kind in zip(names, types, strict=True):
            assert name not in rows, f"{name} twice in the README table"
            rows[name] = TableRow(name, kind, labels)
    assert len(rows) > 40, f"only {len(rows)} metrics parsed from the README table"
    return rows


def expected_processes(row: TableRow) -> set[str]:
    """Where a metric of the table must have samples (and, for rlhf_*, only there)."""
    if row.name in ORCHESTRATOR_GENERATION_METRICS:
        return {"orchestrator"}
    if row.name.startswith("process_"):
        return set(PROCESSES)
    if row.name.startswith("grpc_server_"):
        return set(SERVICES)
    if row.name.startswith("rlhf_generation_"):
        return {"generation"}
    if row.name.startswith("rlhf_trainer_"):
        return {"trainer"}
    if row.name in WEIGHT_METRICS:
        return set(WEIGHT_HOLDERS)
    if "role" in row.labels:
        return set(SERVICES)
    return {"orchestrator"}


def _wait(client: httpx.Client, run_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/runs/{run_id}").json()
        if status["state"] in ("completed", "stopped", "failed"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} did not finish in {timeout}s")


@pytest.fixture(scope="module")
def scraped(tiny_policy_dir, tmp_path_factory) -> dict[str, Exposition]:
    """Starts every role as a process, runs a short run and a failing one, scrapes every /metrics, stops them."""
    work = tmp_path_factory.mktemp("metrics")
    dataset = work / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(64)))
    run = {
        "dataset": str(dataset),
        "iterations": ITERATIONS,
        "prompts_per_iteration": PROMPTS,
        "sampling": {"max_new_tokens": 8},
        "runs_dir": str(work / "runs"),
        "run_id": "naming",
    }
    with Launcher(work / "processes") as launcher:
        services, api = start_stack(launcher, service_configs(tiny_policy_dir), {"rpc": {"wait_ready_s": 60}})
        with httpx.Client(base_url=api, timeout=30) as client:
            assert client.post("/runs", json=run).status_code == 201
            assert _wait(client, "naming")["state"] == "completed"
            # Over generation's max_new_tokens_limit: Generate fails with RESOURCE_EXHAUSTED and the run fails.
            failing = {**run, "run_id": "failing", "sampling": {"max_new_tokens": 100_000}}
            assert client.post("/runs", json=failing).status_code == 201
            assert _wait(client, "failing")["state"] == "failed"
            texts = {"orchestrator": client.get("/metrics").text}
        for role in SERVICES:
            texts[role] = httpx.get(f"http://127.0.0.1:{services[role].info['metrics_port']}/metrics").text
    return {process: Exposition.parse(text) for process, text in texts.items()}


def test_every_table_metric_is_served_with_a_sample_by_the_right_processes(scraped):
    for row in readme_table().values():
        where = expected_processes(row)
        for process in PROCESSES:
            exposition = scraped[process]
            if process not in where:
                if row.name.startswith("rlhf_"):  # a family with no sample (shared.metrics imported) is harmless
                    assert not exposition.samples.get(row.name), f"{row.name} has samples on {process}"
                continue
            assert row.name in exposition.types, f"{row.name} is not served by {process}"
            samples = exposition.samples.get(row.name, [])
            assert samples, f"{row.name} has no sample on {process}"
            if "role" in row.labels:
                assert {s.labels["role"] for s in samples} == {process}, f"{row.name} on {process}"


def test_counters_end_in_total_and_names_carry_their_unit_and_prefix(scraped):
    time_words = re.compile(r"\b(seconds?|milliseconds?|time|duration|latency)\b", re.I)
    byte_words = re.compile(r"\b(bytes|memory)\b", re.I)
    # A token count says so up front ("Response tokens generated.") or as its unit at the end (", tokens.").
    token_count = re.compile(r"^(\w+ )?tokens\b|\btokens\.?$", re.I)
    other_units = re.compile(r"_(ms|millis|milliseconds|minutes|hours|time|duration|latency|kb|mb|gb|kib|mib|gib)(_|$)")
    for process, exposition in scraped.items():
        for name in exposition.families():
            kind = exposition.types[name]
            where = f"{name} ({kind}) on {process}"
            if kind == "counter":
                assert name.endswith("_total"), f"{where}: a counter's name ends in _total"
            assert name.startswith(("rlhf_", *STANDARD_PREFIXES)), f"{where}: project metrics start with rlhf_"
            if not name.startswith("rlhf_"):
                continue
            if kind != "counter":
                assert not name.endswith("_total"), f"{where}: only counters end in _total"
            base = name.removesuffix("_total")
            help_text = exposition.help[name]
            assert not other_units.search(base), f"{where}: base units only (seconds, bytes)"
            if time_words.search(help_text):
                assert base.endswith("_seconds"), f"{where} measures time ({help_text!r}): name ends in _seconds"
            if byte_words.search(help_text):
                assert base.endswith("_bytes"), f"{where} measures bytes ({help_text!r}): name ends in _bytes"
            if token_count.search(help_text):
                assert base.endswith("_tokens") or (kind == "counter" and "_tokens" in base), (
                    f"{where} counts tokens ({help_text!r}): name ends in _tokens or is a _total of tokens"
                )
            for unit in ("seconds", "bytes", "tokens"):
                if base.endswith(f"_{unit}"):
                    assert unit in help_text, f"{where}: the help text says the unit ({unit})"


def test_labels_are_allowlisted_and_bounded(scraped):
    for process, exposition in scraped.items():
        for name, samples in exposition.samples.items():
            values: dict[str, set[str]] = defaultdict(set)
            for sample in samples:
                for label, value in sample.labels.items():
                    values[label].add(value)
            unknown = values.keys() - ALLOWED_LABELS
            assert not unknown, f"{name} on {process}: labels {sorted(unknown)} are not in the allowlist"
            for label, seen in values.items():
                assert len(seen) <= MAX_LABEL_VALUES, f"{name} on {process}: {len(seen)} values of {label}"


def test_readme_table_and_exposed_families_agree(scraped):
    table = readme_table()
    exposed: dict[str, tuple[str, set[str]]] = {}  # name -> (type, label names)
    for exposition in scraped.values():
        for name in exposition.families():
            labels = {k for s in exposition.samples.get(name, []) for k in s.labels} - {"le", "quantile"}
            kind, seen = exposed.setdefault(name, (exposition.types[name], set()))
            assert kind == exposition.types[name], f"{name} has different types on different processes"
            seen |= labels
    exposed_rlhf = {n for n in exposed if n.startswith("rlhf_")}
    table_rlhf = {n for n in table if n.startswith("rlhf_")}
    assert not exposed_rlhf - table_rlhf, f"served but not in the README table: {sorted(exposed_rlhf - table_rlhf)}"
    assert not table_rlhf - exposed_rlhf, f"in the README table but not served: {sorted(table_rlhf - exposed_rlhf)}"
    for row in table.values():
        kind, labels = exposed[row.name]
        assert kind == row.type, f"{row.name}: served as a {kind}, the README says {row.type}"
        assert labels == row.labels, f"{row.name}: served with labels {sorted(labels)}, README {sorted(row.labels)}"


def test_counts_agree_across_processes(scraped):
    samples = ITERATIONS * PROMPTS
    orchestrator, generation, trainer = scraped["orchestrator"], scraped["generation"], scraped["trainer"]
    assert orchestrator.value("rlhf_samples_total", run_id="naming") == samples
    assert orchestrator.value("rlhf_rpc_failures_total", peer="generation", method="Generate") == 1
    assert orchestrator.value("rlhf_run_state", run_id="failing", state="failed") == 1
    for role in SERVICES:  # warm-up does not count: only calls through the service
        assert scraped[role].value("rlhf_items_processed_total", role=role) == samples, role
        assert scraped[role].value("rlhf_device_memory_bytes", role=role, kind="resident") > 1e6, role
    assert scraped["reward"].value("rlhf_tokens_processed_total", role="reward") == 0  # a function reads no tokens
    assert scraped["reference"].value("rlhf_model_forward_seconds", role="reference") == ITERATIONS
    # Tokens: the generated responses are the ones trained on; prompt + response through every model.
    generated = generation.value("rlhf_generation_tokens_total")
    assert generated == trainer.value("rlhf_trainer_tokens_total") > 0
    through = generation.value("rlhf_tokens_processed_total", role="generation")
    assert through > generated
    assert trainer.value("rlhf_tokens_processed_total", role="trainer") == through
    assert scraped["reference"].value("rlhf_tokens_processed_total", role="reference") == through
    assert sum(s.value for s in generation.samples["rlhf_generation_finished_total"]) == samples
    # Versions and weight updates: one per iteration on both sides, the same bytes as the orchestrator saw.
    assert trainer.value("rlhf_trainer_steps_total") == ITERATIONS
    for role, exposition in (("generation", generation), ("trainer", trainer)):
        assert exposition.value("rlhf_weights_version", role=role) == ITERATIONS
        assert exposition.value("rlhf_weight_updates_total", role=role) == ITERATIONS
    payload = generation.value("rlhf_weight_update_bytes_total", role="generation")
    assert payload == trainer.value("rlhf_weight_update_bytes_total", role="trainer") > 0
    assert payload == orchestrator.value("rlhf_weight_sync_bytes_total", run_id="naming")
