"""Starts services as separate processes on loopback and stops every one it started.

Used by the demo and the end-to-end tests: each process is ``rlhf serve <role>`` (or ``rlhf orchestrator``)
with a YAML config and a ready file; ports are chosen by the processes themselves (port 0), so nothing races.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import signal
import socket
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
                with contextlib.suppress(ProcessLookupError):  # its own session: children too (torchrun's ranks)
                    os.killpg(self.process.pid, signal.SIGKILL)
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

    def start(self, name: str, command: list[str], config: dict, ranks: int = 1) -> ServiceProcess:
        """``rlhf <command> --config <config>`` as a process; with ``ranks`` > 1 under torchrun, that many ranks on
        this machine (the trainer: rank 0 serves and writes the ready file)."""
        config_path = self.work_dir / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        ready = self.work_dir / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        log_path = self.work_dir / f"{name}.log"
        runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
        argv = [
            sys.executable,
            *runner,
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def write_tokens(directory: Path, roles) -> dict[str, str]:
    """A random token per role, each in its own file (mode 0600) under ``directory``: what a Secret per role
    mounts in Kubernetes. Returns the files by role."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for role in roles:
        path = directory / role
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(secrets.token_hex(32) + "\n")
        files[role] = str(path.resolve())
    return files


def secure_configs(launcher: Launcher, service_configs: dict[str, dict]) -> tuple[dict[str, dict], dict]:
    """The services' configs as a deployment would have them: each service accepts only its own token, the
    trainer listens on a known port so that generation may pull from it (and from nothing else), and the trainer
    keeps checkpoints under the work directory. Returns the configs and the orchestrator's ``auth`` section."""
    tokens = write_tokens(launcher.work_dir / "tokens", service_configs)
    configs = {role: copy.deepcopy(config) for role, config in service_configs.items()}  # nothing shared
    for role, config in configs.items():
        config.setdefault("auth", {}).setdefault("token_file", tokens[role])
    trainer = configs.get("trainer")
    if trainer is not None:
        if not trainer.get("server", {}).get("port"):  # a new dict: the roles' configs may share one
            trainer["server"] = {**trainer.get("server", {}), "port": free_port()}
        trainer.setdefault("checkpoint", {}).setdefault("root", str((launcher.work_dir / "checkpoints").resolve()))
        for config in [configs[r] for r in configs if r == "generation"]:
            config.setdefault("trainer_addresses", [f"127.0.0.1:{trainer['server']['port']}"])
            config["auth"].setdefault("peer_token_files", {}).setdefault("trainer", tokens["trainer"])
    return configs, {"peer_token_files": tokens}


def start_stack(
    launcher: Launcher,
    service_configs: dict[str, dict],
    orchestrator: dict | None = None,
    root: Path | None = None,
    trainer_ranks: int = 1,
    reward_replicas: int = 1,
) -> tuple[dict[str, ServiceProcess], str]:
    """Starts the four services (configs by role; see ``secure_configs``), waits until each serves, then the
    orchestrator pointed at them.

    ``trainer_ranks`` > 1 runs the trainer under torchrun, sharded over that many ranks. ``reward_replicas`` > 1
    starts that many reward processes (``reward``, ``reward-2``...), which the orchestrator reaches through one
    target naming every address (``ipv4:a,b``: what a headless Service's DNS name resolves to) and balances over.
    Returns the service processes by role and the control API's URL. Unless ``orchestrator`` names a store, runs
    are kept in an embedded store in the launcher's work directory. The control API listens on loopback and
    checks no token unless ``orchestrator`` gives one; the datasets and run directories its requests name must lie
    under ``root`` (default: the directory above the launcher's work directory).
    """
    configs, auth = secure_configs(launcher, service_configs)
    services = {
        name: launcher.start(name, ["serve", name], cfg, ranks=trainer_ranks if name == "trainer" else 1)
        for name, cfg in configs.items()
    }
    for replica in range(2, reward_replicas + 1):
        services[f"reward-{replica}"] = launcher.start(f"reward-{replica}", ["serve", "reward"], configs["reward"])
    for service in services.values():
        service.wait_ready(180)
    rewards = [services["reward"], *(services[f"reward-{r}"] for r in range(2, reward_replicas + 1))]
    peers = {
        "generation": [services["generation"].address],
        **{role: services[role].address for role in ("reference", "trainer")},
        "reward": rewards[0].address if reward_replicas == 1 else "ipv4:" + ",".join(r.address for r in rewards),
    }
    store = {"url": f"sqlite:///{(launcher.work_dir / 'state.sqlite3').resolve()}"}
    root = str(Path(root or launcher.work_dir.parent).resolve())
    api = {"port": 0, "datasets_root": root, "runs_root": root}
    config = {"peers": peers, "api": api, "store": store, "auth": auth, **(orchestrator or {})}
    process = launcher.start("orchestrator", ["orchestrator"], config)
    return services, f"http://127.0.0.1:{process.wait_ready(60)['port']}"


def follow_run(api: str, run: dict, quiet: bool = False) -> dict:
    """Starts a run via POST /runs and prints each iteration as GET /runs/{id} reports it; returns the final status."""
    import httpx

    with httpx.Client(base_url=api, timeout=30) as client:
        response = client.post("/runs", json=run)
        if response.is_error:  # the API says what it refused (a field, a path outside its roots)
            raise RuntimeError(f"POST /runs answered {response.status_code}: {response.text}")
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
