"""Starts services as separate processes on loopback and stops every one it started.

Used by the demo and the end-to-end tests: each process is ``rlhf serve <role>`` (or ``rlhf orchestrator``)
with a YAML config and a ready file; ports are chosen by the processes themselves (port 0), so nothing races.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class LaunchError(RuntimeError):
    pass


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen
    ready_file: Path
    log_path: Path
    info: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.info['port']}"

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                raise LaunchError(f"{self.name} exited with {self.process.returncode}; log:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise LaunchError(f"{self.name} not ready after {timeout:.0f}s; log:\n{self.log_tail()}")
            time.sleep(0.1)
        self.info = json.loads(self.ready_file.read_text())
        return self.info

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Launcher:
    """Starts processes into ``work_dir`` (configs, ready files, logs) and stops them all on exit."""

    def __init__(self, work_dir: Path, env: dict[str, str] | None = None):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[ServiceProcess] = []
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}

    def start(self, name: str, command: list[str], config: dict) -> ServiceProcess:
        config_path = self.work_dir / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        ready = self.work_dir / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        log_path = self.work_dir / f"{name}.log"
        argv = [
            sys.executable,
            "-m",
            "services.cli",
            *command,
            "--config",
            str(config_path),
            "--ready-file",
            str(ready),
        ]
        with log_path.open("a") as log:  # a process started again (after a crash) adds to its log
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        service = ServiceProcess(name, process, ready, log_path)
        self.processes.append(service)
        return service

    def stop_all(self) -> dict[str, int]:
        codes = {}
        for service in reversed(self.processes):
            codes[service.name] = service.stop()
        self.processes.clear()
        return codes

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def start_stack(
    launcher: Launcher, service_configs: dict[str, dict], orchestrator: dict | None = None
) -> tuple[dict[str, ServiceProcess], str]:
    """Starts the four services (configs by role), waits until each serves, then the orchestrator pointed at them.

    Returns the service processes by role and the control API's URL. Unless ``orchestrator`` names a store, runs
    are kept in an embedded store in the launcher's work directory.
    """
    services = {name: launcher.start(name, ["serve", name], cfg) for name, cfg in service_configs.items()}
    for service in services.values():
        service.wait_ready(180)
    peers = {
        "generation": [services["generation"].address],
        **{role: services[role].address for role in ("reward", "reference", "trainer")},
    }
    store = {"url": f"sqlite:///{(launcher.work_dir / 'state.sqlite3').resolve()}"}
    config = {"peers": peers, "api": {"port": 0}, "store": store, **(orchestrator or {})}
    process = launcher.start("orchestrator", ["orchestrator"], config)
    return services, f"http://127.0.0.1:{process.wait_ready(60)['port']}"


def follow_run(api: str, run: dict, quiet: bool = False) -> dict:
    """Starts a run via POST /runs and prints each iteration as GET /runs/{id} reports it; returns the final status."""
    import httpx

    with httpx.Client(base_url=api, timeout=30) as client:
        response = client.post("/runs", json=run)
        response.raise_for_status()
        run_id = response.json()["run_id"]
        if not quiet:
            print(f"run {run_id}: {run['iterations']} PPO iterations x {run['prompts_per_iteration']} prompts")
            header = ("iter", "reward", "KL", "beta", "len", "version", "s/it", "ETA")
            widths = (5, 7, 6, 7, 5, 7, 5, 5)
            print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)) + "  sample")
        shown = 0
        started = time.monotonic()
        while True:
            status = client.get(f"/runs/{run_id}").json()
            for record in status["stats"][shown:]:
                if quiet:
                    continue
                sample = (record["example"]["prompt"] + " ->" + record["example"]["response"]).replace("\n", " ")
                per_iteration = (time.monotonic() - started) / record["iteration"]
                eta = per_iteration * (run["iterations"] - record["iteration"])
                print(
                    f"{record['iteration']:>5} {record['reward_mean']:>7.3f} {record['kl']:>6.2f} "
                    f"{record['kl_coef']:>7.4f} {record['response_length_mean']:>5.1f} {record['policy_version']:>7} "
                    f"{record['wall_seconds']:>5.2f} {eta:>4.0f}s  {sample[:56]}",
                    flush=True,
                )
            shown = len(status["stats"])
            if status["state"] in ("completed", "stopped", "failed"):
                return status
            time.sleep(0.5)
