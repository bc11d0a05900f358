"""The control API (FastAPI): start a run, read its status and per-iteration stats, stop it; /metrics; /healthz
(liveness); /readyz (503 while an active run makes no progress).

One run at a time: the orchestrator owns the services' state (the trainer's policy) while a run is active. Runs
are kept in the store (``shared.store``), so they outlive the orchestrator's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from pydantic import BaseModel

from services.orchestrator import metrics
from services.orchestrator.clients import Clients, grpc_clients, wait_until_serving
from services.orchestrator.config import OrchestratorConfig, RunConfig
from services.orchestrator.dataset import DatasetError, load_prompts
from services.orchestrator.loop import IterationRecord, RLHFLoop
from services.orchestrator.metrics import waiting_for
from services.orchestrator.runs import ACTIVE, RunDocument, RunState
from shared.auth import ClientAuth, ServerAuth
from shared.errors import InvalidInput
from shared.http import install_error_handlers
from shared.http import protected as protected_routes
from shared.paths import confine
from shared.store import RUN_ID_PATTERN, Store, check_run_id, open_store

log = logging.getLogger(__name__)

RUN_STATE = Gauge("rlhf_run_state", "1 for the run's current state, 0 for the others.", ["run_id", "state"])


class RunStatus(BaseModel):
    run_id: str
    state: RunState
    iteration: int  # iterations completed
    iterations: int
    stats: list[dict]  # one record per completed iteration
    summary: dict | None = None
    error: str | None = None
    waiting_for: list[str] = []  # peers the run is waiting for now (down or too slow)
    resumed: int = 0  # times a restarted orchestrator took the run up again
    policy_version: int = 0
    checkpoint: dict | None = None  # the newest trainer checkpoint covering the run: {directory, iteration}


class Run:
    """A run this orchestrator drives: its document (in the store) and, while it runs, its loop and task."""

    def __init__(self, document: RunDocument, config: RunConfig):
        self.document = document
        self.run_id = document.run_id
        self.config = config
        self.loop: RLHFLoop | None = None
        self.task: asyncio.Task | None = None
        self.taken_up = time.time()  # when this process started or resumed it: its progress clock until a loop runs

    def seconds_since_progress(self, now: float) -> float:
        return now - (self.loop.progressed_at if self.loop is not None else self.taken_up)

    @property
    def state(self) -> RunState:
        return self.document.state

    async def set_state(self, state: RunState, **changes) -> None:
        # The gauge first: the document is visible to GET /runs as soon as save() changes it, before its write ends.
        publish_state(self.run_id, state)
        await self.document.save(state=state.value, **changes)


def publish_state(run_id: str, state: RunState) -> None:
    for s in RunState:
        RUN_STATE.labels(run_id, s.value).set(1 if s is state else 0)


def run_status(doc: dict, records: list[dict]) -> RunStatus:
    active = RunState(doc["state"]) in ACTIVE
    return RunStatus(
        run_id=doc["run_id"],
        state=doc["state"],
        iteration=len(records),
        iterations=doc["config"]["iterations"],
        stats=records,
        summary=doc.get("summary"),
        error=doc.get("error"),
        waiting_for=sorted(waiting_for()) if active else [],
        resumed=doc.get("resumed", 0),
        policy_version=doc.get("policy_version", 0),
        checkpoint=doc.get("checkpoint"),
    )


def confine_request(given: dict, config: OrchestratorConfig) -> dict:
    """A POST /runs body with its paths resolved under the configured roots: ``dataset`` under
    ``api.datasets_root``, ``runs_dir`` under ``api.runs_root`` (relative, no ``..``, no way out by a link)."""
    roots = {
        "dataset": config.api.datasets_root or str(Path(config.run.dataset).parent if config.run.dataset else "."),
        "runs_dir": config.api.runs_root or config.run.runs_dir,
    }
    confined = dict(given)
    for name, root in roots.items():
        if name in given:
            confined[name] = str(confine(root, given[name], name))
    if given.get("run_id"):
        check_run_id(given["run_id"])
    return confined


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000:04d}"


def create_app(
    config: OrchestratorConfig,
    clients_factory: Callable[[], Clients] | None = None,
    on_iteration: Callable[[str, IterationRecord], None] | None = None,
    store: Store | None = None,
) -> FastAPI:
    """``clients_factory`` defaults to gRPC clients for ``config.peers`` (tests pass in-process ones); ``store``
    to the one ``config.store`` names (the embedded SQLite file under ``run.runs_dir`` by default).

    Runs live in the store: at start-up every run that was active is resumed; stopping the orchestrator leaves
    them active (the next one resumes them), while POST /runs/{id}/stop ends one for good."""
    store = store or open_store(config.store, config.run.runs_dir)
    runs: dict[str, Run] = {}  # the runs this process drives

    def factory() -> Clients:
        return clients_factory() if clients_factory else grpc_clients(config.peers, config.rpc, client_auth)

    async def resume_active() -> None:
        for doc in await asyncio.to_thread(store.list_runs):
            state = RunState(doc["state"])
            if state not in ACTIVE or doc["run_id"] in runs:
                continue
            try:
                run_config = RunConfig.model_validate(doc["config"])
            except ValueError as exc:
                await RunDocument(store, doc["run_id"], doc).save(state=RunState.FAILED.value, error=str(exc))
                continue
            run = Run(RunDocument(store, doc["run_id"], doc), run_config)
            metrics.RESUMED_RUNS.inc()
            log.info("resuming run %s (%s, %d iterations done)", run.run_id, state.value, doc.get("iteration", 0))
            await run.document.save(resumed=doc.get("resumed", 0) + 1)
            runs[run.run_id] = run
            run.task = asyncio.create_task(drive(run, stop=state is RunState.STOPPING))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await resume_active()
        yield
        # Shutting down: the runs stay active in the store, and the next orchestrator resumes them. The
        # iteration under way is dropped (done again then: its prompts and seeds are the same).
        for run in runs.values():
            if run.task is not None and not run.task.done():
                run.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await run.task
        await asyncio.to_thread(store.close)

    server_auth = ServerAuth.load(config.auth, config.api.host, "control API")
    client_auth = ClientAuth.load(config.auth)
    protected = protected_routes(server_auth)
    app = FastAPI(title="RLHF orchestrator", version="1", lifespan=lifespan)
    app.state.server_auth = server_auth
    install_error_handlers(app)  # the project's exceptions as 4xx, like the other HTTP apps

    async def drive(run: Run, stop: bool = False) -> None:
        clients = None
        try:
            if clients_factory is None:
                await wait_until_serving(config.peers, config.rpc.wait_ready_s, client_auth)
            clients = factory()
            run.loop = RLHFLoop(
                run.run_id,
                run.config,
                clients,
                on_iteration=(lambda r: on_iteration(run.run_id, r)) if on_iteration else None,
                document=run.document,
                outage_budget_s=config.rpc.outage_budget_s,
            )
            if stop:
                run.loop.request_stop()
            else:
                await run.set_state(RunState.RUNNING)
            summary = await run.loop.run()
            final = RunState.STOPPED if summary["stopped_early"] else RunState.COMPLETED
            await run.set_state(final, summary=summary)
        except asyncio.CancelledError:
            raise  # the orchestrator is stopping: the run stays active in the store
        except Exception as exc:  # the run fails; the API stays up and reports why
            log.exception("run %s failed", run.run_id)
            await run.set_state(RunState.FAILED, error=f"{type(exc).__name__}: {exc}")
        finally:
            if clients is not None and clients.close is not None:
                await clients.close()

    async def start(run_config: RunConfig) -> Run:
        active = [r for r in runs.values() if r.state in ACTIVE]
        if active:
            raise HTTPException(409, f"run {active[0].run_id} is still {active[0].state.value}")
        if not run_config.dataset:
            raise HTTPException(422, "dataset: a JSONL prompt file is required")
        try:
            run_id = check_run_id(run_config.run_id or new_run_id())
        except InvalidInput as exc:
            raise HTTPException(422, str(exc)) from None
        if run_id in runs or await asyncio.to_thread(store.get_run, run_id) is not None:
            raise HTTPException(409, f"run id {run_id} exists")
        try:  # fail fast on a bad dataset, before anything is started
            load_prompts(run_config.dataset)
        except DatasetError as exc:
            raise HTTPException(422, str(exc)) from None
        run_config = run_config.model_copy(update={"run_id": run_id})
        run = Run(RunDocument.new(store, run_id, run_config.model_dump(mode="json")), run_config)
        await run.set_state(RunState.STARTING)
        runs[run_id] = run
        run.task = asyncio.create_task(drive(run))
        return run

    async def status(run_id: str, doc: dict | None = None) -> RunStatus:
        """The run's status: this process's document for a run it drives (the newest), else ``doc`` or the
        store's."""
        if run_id in runs:
            doc = runs[run_id].document.doc
        elif not RUN_ID_PATTERN.fullmatch(run_id):
            raise HTTPException(404, f"no run {run_id!r} (not a valid run id)")
        elif doc is None:
            doc = await asyncio.to_thread(store.get_run, run_id)
        if doc is None:
            raise HTTPException(404, f"no run {run_id}")
        return run_status(doc, await asyncio.to_thread(store.iterations, run_id))

    app.state.start_run = start
    app.state.runs = runs
    app.state.store = store

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "an active run is stalled; `reason` says which and why"}})
    async def readyz(response: Response) -> dict:
        """Readiness: 503 while an active run has completed no iteration for ``api.stall_limit_s``, else 200."""
        now, limit = time.time(), config.api.stall_limit_s
        reasons = []
        for run in runs.values():
            stalled_for = run.seconds_since_progress(now)
            if run.state in ACTIVE and stalled_for > limit:
                waits = sorted(waiting_for())
                reasons.append(
                    f"run {run.run_id} ({run.state.value}, {run.document.doc.get('iteration', 0)} iterations done) "
                    f"has completed no iteration for {stalled_for:.0f}s (api.stall_limit_s {limit:g})"
                    + (f", waiting for {', '.join(waits)}" if waits else "")
                )
        if reasons:
            response.status_code = 503
            return {"status": "stalled", "reason": "; ".join(reasons)}
        return {"status": "ready"}

    @app.post("/runs", status_code=201, dependencies=protected)
    async def create_run(run_config: RunConfig | None = None) -> RunStatus:
        """Starts a run; the body is a RunConfig (fields left out take the orchestrator's config values)."""
        given = run_config.model_dump(exclude_unset=True) if run_config else {}
        try:
            given = confine_request(given, config)
        except InvalidInput as exc:
            raise HTTPException(422, str(exc)) from None
        run = await start(RunConfig.model_validate({**config.run.model_dump(), **given}))
        return await status(run.run_id)

    @app.get("/runs", dependencies=protected)
    async def list_runs() -> list[RunStatus]:
        """Every run in the store, oldest first (this orchestrator's and earlier ones')."""
        docs = await asyncio.to_thread(store.list_runs)
        return [await status(doc["run_id"], doc) for doc in docs]

    @app.get("/runs/{run_id}", dependencies=protected)
    async def get_run(run_id: str) -> RunStatus:
        return await status(run_id)

    @app.post("/runs/{run_id}/stop", dependencies=protected)
    async def stop_run(run_id: str) -> RunStatus:
        """Stops after the iteration in progress (the trainer and generation stay consistent)."""
        run = runs.get(run_id)
        if run is None:
            return await status(run_id)  # 404, or a run that is not active here
        if run.state in (RunState.STARTING, RunState.RUNNING):
            if run.loop is not None:
                run.loop.request_stop()
            await run.set_state(RunState.STOPPING)
        return await status(run_id)

    @app.get("/metrics", dependencies=protected if server_auth.metrics_require_token else [])
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def run_orchestrator(args) -> None:
    """``rlhf orchestrator``: serves the control API; with ``--start``, starts a run from the config at once."""
    from shared.config import config_from_args
    from shared.http import HttpServer
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
    server = HttpServer(app, config.api.host, config.api.port, app.state.server_auth)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # graceful: the lifespan stops the run, then uvicorn exits
            loop.add_signal_handler(sig, stop.set)
        port = await server.start()
        if args.start:  # unless that run is in the store already (resumed, or finished)
            known = config.run.run_id and await asyncio.to_thread(app.state.store.get_run, config.run.run_id)
            if known:
                log.info("run %s is in the store (%s): not started again", config.run.run_id, known["state"])
            elif not any(r.state in ACTIVE for r in app.state.runs.values()):
                await app.state.start_run(config.run)
        if args.ready_file is not None:
            tmp = Path(str(args.ready_file) + ".tmp")
            tmp.write_text(json.dumps({"port": port}))
            os.replace(tmp, args.ready_file)
        await stop.wait()
        await server.stop()

    asyncio.run(main())
