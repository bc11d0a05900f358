"""The static security scan: checkov on every kustomize target the project ships, as kustomize builds it, and on
the three Dockerfiles. No finding is left open: each is fixed, or suppressed where it arises with the reason it does
not apply here, a `checkov.io/skipN: CKV_K8S_NN=<reason>` annotation in the object's metadata or a
`# checkov:skip=CKV_DOCKER_N: <reason>` comment in the Dockerfile.

checkov runs from a venv of its own, .venv-checkov (`make venv-checkov`; `make test` makes it): its requirements
clash with requirements.lock. It runs offline (--skip-download, no update check).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.deploy.test_k8s import REPO, TARGETS, built

CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"
SCANNED_TARGETS = [*TARGETS, "overlays/trainer-multinode"]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile*"))
NO_REASON = "No comment provided"  # checkov's suppress_comment for a skip without one


def checkov(framework: str, paths: list[Path]) -> dict:
    """checkov's JSON report of one framework over the given files: {"summary": ..., "results": ...}."""
    if not CHECKOV.exists():
        pytest.fail(f"checkov is not installed in its own venv ({CHECKOV}): run `make venv-checkov`")
    files = [arg for path in paths for arg in ("--file", str(path))]
    result = subprocess.run(
        [str(CHECKOV), "--framework", framework, *files, "--output", "json", "--compact", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"},
    )
    # 0: nothing failed, 1: some check failed; anything else (or no JSON) is checkov itself failing.
    assert result.returncode in (0, 1) and result.stdout.startswith("{"), (
        f"checkov exited with {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    )
    report = json.loads(result.stdout)
    assert report["check_type"] == framework, report.get("check_type")
    return report


def findings(report: dict) -> list[str]:
    return sorted(
        f"{Path(f['file_path']).name}: {f['resource']} {f['check_id']} ({f['check_name']})"
        for f in report["results"]["failed_checks"]
    )


def unexplained_suppressions(report: dict) -> list[str]:
    return [
        f"{Path(s['file_path']).name}: {s['resource']} {s['check_id']}"
        for s in report["results"]["skipped_checks"]
        if s["check_result"].get("suppress_comment", NO_REASON).strip() in ("", NO_REASON)
    ]


def test_every_kustomize_target_passes_checkov(tmp_path):
    manifests = []
    for target in SCANNED_TARGETS:
        manifests.append(tmp_path / f"{target.replace('/', '-')}.yaml")
        manifests[-1].write_text(built(target))
    report = checkov("kubernetes", manifests)
    assert report["summary"]["parsing_errors"] == 0, report["results"]["parsing_errors"]
    scanned = {Path(c["file_path"]).name for c in report["results"]["passed_checks"]}
    assert scanned == {m.name for m in manifests}, "checkov did not read every built target"
    open_findings = findings(report)
    assert not open_findings, (
        "checkov findings: fix each, or add to the object's metadata.annotations "
        "`checkov.io/skipN: CKV_K8S_NN=<why it does not apply>` (no '=' in the reason):\n" + "\n".join(open_findings)
    )
    assert not unexplained_suppressions(report), "suppressions without a reason"


def test_dockerfiles_pass_checkov():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.model", "Dockerfile.model-cpu", "Dockerfile.orchestrator"]
    report = checkov("dockerfile", DOCKERFILES)
    assert report["summary"]["resource_count"] == len(DOCKERFILES), report["summary"]
    open_findings = findings(report)
    assert not open_findings, (
        "checkov findings: fix each, or add above the instruction `# checkov:skip=CKV_DOCKER_N: <why it does not "
        "apply>`:\n" + "\n".join(open_findings)
    )
    assert not unexplained_suppressions(report), "suppressions without a reason"
