"""The control API (FastAPI): start a run, read its status and per-iteration stats, stop it; /metrics; /healthz.

One run at a time: the orchestrator owns the services' state (the trainer's policy) while a run is active.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from fastapi import Depends, FastAPI, Header, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from pydantic import BaseModel

from services.orchestrator.clients import Clients, grpc_clients, wait_until_serving
from services.orchestrator.config import OrchestratorConfig, RunConfig
from services.orchestrator.dataset import DatasetError
from services.orchestrator.loop import IterationRecord, RLHFLoop
from shared.config import ConfigError

log = logging.getLogger(__name__)

RUN_STATE = Gauge("rlhf_run_state", "1 for the run's current state, 0 for the others.", ["run_id", "state"])


class RunState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    COMPLETED = "completed"
    FAILED = "failed"


class RunStatus(BaseModel):
    run_id: str
    state: RunState
    iteration: int
    iterations: int
    stats: list[dict]
    summary: dict | None = None
    error: str | None = None


class Run:
    def __init__(self, run_id: str, config: RunConfig):
        self.run_id = run_id
        self.config = config
        self.state = RunState.STARTING
        self.loop: RLHFLoop | None = None
        self.task: asyncio.Task | None = None
        self.summary: dict | None = None
        self.error: str | None = None

    def set_state(self, state: RunState) -> None:
        self.state = state
        for s in RunState:
            RUN_STATE.labels(self.run_id, s.value).set(1 if s is state else 0)

    def status(self) -> RunStatus:
        records = self.loop.records if self.loop else []
        return RunStatus(
            run_id=self.run_id,
            state=self.state,
            iteration=len(records),
            iterations=self.config.iterations,
            stats=[asdict(r) for r in records],
            summary=self.summary,
            error=self.error,
        )


def _read_token(path: str) -> str | None:
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"api.token_file: cannot read {path}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"api.token_file: {path} is empty")
    return token


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000:04d}"


def create_app(
    config: OrchestratorConfig,
    clients_factory: Callable[[], Clients] | None = None,
    on_iteration: Callable[[str, IterationRecord], None] | None = None,
) -> FastAPI:
    """``clients_factory`` defaults to gRPC clients for ``config.peers`` (tests pass in-process ones)."""
    runs: dict[str, Run] = {}

    def factory() -> Clients:
        return clients_factory() if clients_factory else grpc_clients(config.peers, config.rpc)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for run in runs.values():  # shutting down: stop after the current iteration, then cancel
            if run.loop is not None:
                run.loop.request_stop()
            if run.task is not None and not run.task.done():
                run.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await run.task

    token = _read_token(config.api.token_file)

    async def require_token(authorization: str | None = Header(default=None)) -> None:
        if token is None:
            return
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong API token", headers={"WWW-Authenticate": "Bearer"})

    protected = [Depends(require_token)]
    app = FastAPI(title="RLHF orchestrator", version="1", lifespan=lifespan)

    async def drive(run: Run) -> None:
        clients = None
        try:
            if clients_factory is None:
                await wait_until_serving(config.peers, config.rpc.wait_ready_s)
            clients = factory()
            run.loop = RLHFLoop(
                run.run_id,
                run.config,
                clients,
                on_iteration=(lambda r: on_iteration(run.run_id, r)) if on_iteration else None,
            )
            run.set_state(RunState.RUNNING)
            run.summary = await run.loop.run()
            run.set_state(RunState.STOPPED if run.summary["stopped_early"] else RunState.COMPLETED)
        except asyncio.CancelledError:
            run.set_state(RunState.STOPPED)
            raise
        except Exception as exc:  # the run fails; the API stays up and reports why
            log.exception("run %s failed", run.run_id)
            run.error = f"{type(exc).__name__}: {exc}"
            run.set_state(RunState.FAILED)
        finally:
            if clients is not None and clients.close is not None:
                await clients.close()

    def start(run_config: RunConfig) -> Run:
        active = [r for r in runs.values() if r.state in (RunState.STARTING, RunState.RUNNING, RunState.STOPPING)]
        if active:
            raise HTTPException(409, f"run {active[0].run_id} is still {active[0].state.value}")
        if not run_config.dataset:
            raise HTTPException(422, "dataset: a JSONL prompt file is required")
        run_id = run_config.run_id or new_run_id()
        if run_id in runs:
            raise HTTPException(409, f"run id {run_id} exists")
        try:  # fail fast on a bad dataset, before anything is started
            from services.orchestrator.dataset import load_prompts

            load_prompts(run_config.dataset)
        except DatasetError as exc:
            raise HTTPException(422, str(exc)) from None
        run = Run(run_id, run_config.model_copy(update={"run_id": run_id}))
        runs[run_id] = run
        run.set_state(RunState.STARTING)
        run.task = asyncio.create_task(drive(run))
        return run

    app.state.start_run = start
    app.state.runs = runs

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/runs", status_code=201, dependencies=protected)
    async def create_run(run_config: RunConfig | None = None) -> RunStatus:
        """Starts a run; the body is a RunConfig (fields left out take the orchestrator's config values)."""
        merged = config.run.model_copy(update=run_config.model_dump(exclude_unset=True)) if run_config else config.run
        return start(RunConfig.model_validate(merged.model_dump())).status()

    @app.get("/runs", dependencies=protected)
    async def list_runs() -> list[RunStatus]:
        return [run.status() for run in runs.values()]

    @app.get("/runs/{run_id}", dependencies=protected)
    async def get_run(run_id: str) -> RunStatus:
        if run_id not in runs:
            raise HTTPException(404, f"no run {run_id}")
        return runs[run_id].status()

    @app.post("/runs/{run_id}/stop", dependencies=protected)
    async def stop_run(run_id: str) -> RunStatus:
        """Stops after the iteration in progress (the trainer and generation stay consistent)."""
        run = runs.get(run_id)
        if run is None:
            raise HTTPException(404, f"no run {run_id}")
        if run.state in (RunState.STARTING, RunState.RUNNING):
            if run.loop is not None:
                run.loop.request_stop()
                run.set_state(RunState.STOPPING)
            elif run.task is not None:
                run.task.cancel()
        return run.status()

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def run_orchestrator(args) -> None:
    """``rlhf orchestrator``: serves the control API; with ``--start``, starts a run from the config at once."""
    import uvicorn

    from shared.config import config_from_args
    from shared.logs import setup_logging

    config = config_from_args(OrchestratorConfig, args)
    config.peers.require_addresses()  # this process always talks gRPC: a missing peer fails at start-up
    setup_logging("orchestrator", args.log_level)

    def progress(run_id: str, r: IterationRecord) -> None:
        log.info(
            "run %s iteration %d: reward %.3f kl %.3f beta %.4f len %.1f version %d (%.1fs)",
            run_id,
            r.iteration,
            r.reward_mean,
            r.kl,
            r.kl_coef,
            r.response_length_mean,
            r.policy_version,
            r.wall_seconds,
        )

    app = create_app(config, on_iteration=progress)
    server = uvicorn.Server(uvicorn.Config(app, host=config.api.host, port=config.api.port, log_level="warning"))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # graceful: the lifespan stops the run, then uvicorn exits
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        # Ours above, not uvicorn's: uvicorn re-raises the signal after its graceful exit, so the exit code is -15.
        server.capture_signals = contextlib.nullcontext
        serving = asyncio.create_task(server.serve())
        while not server.started:
            if serving.done():
                await serving
                return
            await asyncio.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        log.info("control API on http://%s:%d", config.api.host, port)
        if args.start:
            app.state.start_run(config.run)
        if args.ready_file is not None:
            tmp = Path(str(args.ready_file) + ".tmp")
            tmp.write_text(json.dumps({"port": port}))
            os.replace(tmp, args.ready_file)
        await serving

    asyncio.run(main())
