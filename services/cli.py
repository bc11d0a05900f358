"""The ``rlhf`` command: ``rlhf serve generation|reward|reference|trainer``, ``rlhf orchestrator``,
``rlhf train sft|reward|dpo``, ``rlhf pipeline``, ``rlhf iterate``, ``rlhf constitutional``, ``rlhf labeling``,
``rlhf pipeline-real`` and ``rlhf fetch-model``.

Each takes ``--config FILE`` (YAML) and one flag per config field (``--server.port 50051``) overriding it, except
``fetch-model``, a one-shot copy with flags of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import sys
from pathlib import Path

# Before torch is imported (libgomp reads it once, when torch loads it); a value in the environment wins. An OpenMP
# thread that finishes a kernel spins for the next one before it sleeps: 300,000 spins by default, holding its core
# long after. On shared cores that time is taken from the other services: the reward and reference services scoring
# concurrently, generation beside training in the asynchronous loop. Measured at 19M parameters on 2 cores (two
# services x 2 threads): reward + reference 0.63-1.00 s by default, 0.31 s at 10,000 spins; the asynchronous loop
# 9.9-14.2 s per iteration by default, 3.3 s at 10,000; one service alone as fast at 10,000 as by default, and
# slower at 1,000 spins or with OMP_WAIT_POLICY=PASSIVE (generation 0.61-0.67 s against 0.44 s).
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from shared.config import ConfigError, DataError, add_config_flags, config_from_args
from shared.logs import setup_logging

# Imported lazily: the orchestrator never needs torch, and each role loads only its own code.
ROLE_MODULES = {
    "generation": "services.generation.servicer",
    "reward": "services.reward.servicer",
    "reference": "services.reference.servicer",
    "trainer": "services.trainer.servicer",
}

JOB_MODULES = {
    "sft": "services.training.sft",
    "reward": "services.training.reward",
    "dpo": "services.training.dpo",
}

log = logging.getLogger("rlhf")


def _write_ready_file(path: Path | None, payload: dict) -> None:
    """Tells a supervisor (the demo, a test) where the process listens, once it is ready."""
    if path is None:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def _role(name: str):
    return importlib.import_module(ROLE_MODULES[name]).ROLE


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve one role over gRPC")
    roles = serve.add_subparsers(dest="role", required=True)
    # Only the chosen role's config is imported (argparse needs its fields for --help and overrides).
    chosen = argv[1] if len(argv) > 1 and argv[0] == "serve" else None
    for name in ROLE_MODULES:
        sub = roles.add_parser(name, help=f"the {name} service")
        sub.add_argument("--ready-file", type=Path, default=None, help="write {port, metrics_port} here when ready")
        sub.add_argument("--log-level", default="INFO")
        if name == chosen:
            add_config_flags(sub, _role(name).config_type)
    orchestrator = commands.add_parser("orchestrator", help="the control API that runs the RLHF loop")
    orchestrator.add_argument("--ready-file", type=Path, default=None)
    orchestrator.add_argument("--log-level", default="INFO")
    orchestrator.add_argument("--start", action="store_true", help="start a run with the config at once")
    if argv[:1] == ["orchestrator"]:
        from services.orchestrator.config import OrchestratorConfig

        add_config_flags(orchestrator, OrchestratorConfig)
    train = commands.add_parser("train", help="a training job: SFT, reward model, DPO")
    jobs = train.add_subparsers(dest="job", required=True)
    chosen_job = argv[1] if len(argv) > 1 and argv[0] == "train" else None
    for name in JOB_MODULES:
        sub = jobs.add_parser(name, help=f"the {name} job")
        sub.add_argument("--log-level", default="INFO")
        if name == chosen_job:
            add_config_flags(sub, importlib.import_module(JOB_MODULES[name]).JOB.config_type)
    pipeline = commands.add_parser("pipeline", help="pretrain -> SFT -> preferences -> RM -> PPO -> DPO -> report")
    pipeline.add_argument("--log-level", default="WARNING")
    if argv[:1] == ["pipeline"]:
        from services.pipeline.config import PipelineConfig

        add_config_flags(pipeline, PipelineConfig)
    iterate = commands.add_parser(
        "iterate", help="SFT, then rounds of: sample -> label -> reward model on all labels -> PPO -> evaluate"
    )
    iterate.add_argument("--log-level", default="WARNING")
    if argv[:1] == ["iterate"]:
        from services.pipeline.config import IterateConfig

        add_config_flags(iterate, IterateConfig)
    constitutional = commands.add_parser(
        "constitutional", help="Constitutional AI: critique and revise responses -> preference pairs and SFT rows"
    )
    constitutional.add_argument("--log-level", default="INFO")
    if argv[:1] == ["constitutional"]:
        from services.labeling.constitutional import ConstitutionalJobConfig

        add_config_flags(constitutional, ConstitutionalJobConfig)
    labeling = commands.add_parser("labeling", help="the labelling web app where people compare responses")
    labeling.add_argument("--ready-file", type=Path, default=None, help="write {port} here when ready")
    labeling.add_argument("--log-level", default="INFO")
    if argv[:1] == ["labeling"]:
        from services.labeling.config import LabelingConfig

        add_config_flags(labeling, LabelingConfig)
    real = commands.add_parser(
        "pipeline-real", help="SmolLM2 + human ratings: pairs -> RM -> PPO (LoRA) -> evaluation against VADER"
    )
    real.add_argument("--log-level", default="WARNING")
    if argv[:1] == ["pipeline-real"]:
        from services.pipeline.real_config import RealPipelineConfig

        add_config_flags(real, RealPipelineConfig)
    fetch = commands.add_parser(
        "fetch-model", help="put a model into a directory, whole or not at all: from the hub, an object store or a path"
    )
    fetch.add_argument(
        "--source",
        required=True,
        help="hf://<repo_id>[@revision], an fsspec URL (s3://bucket/prefix: with its backend), file://... or a path",
    )
    fetch.add_argument("--dest", type=Path, required=True, help="the model directory to fill, e.g. /models/policy")
    fetch.add_argument(
        "--token-file", type=Path, default=None, help="the hub token (default: HF_TOKEN, then HF_TOKEN_PATH's file)"
    )
    fetch.add_argument("--force", action="store_true", help="fetch even if the destination holds this source already")
    fetch.add_argument("--log-level", default="INFO")
    return parser


def _serve(args: argparse.Namespace) -> None:
    from shared.metrics_http import start_metrics_server
    from shared.server import serve

    role = _role(args.role)
    config = config_from_args(role.config_type, args)
    setup_logging(role.name, args.log_level)
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:  # under torchrun: rank 0 serves, the others follow it
        if role.follow is None:
            raise ConfigError(f"the {role.name} service runs as one process; only the trainer runs under torchrun")
        role.follow(config)
        return

    async def main() -> None:
        server, port = await role.build_server(config, None)
        metrics_port = start_metrics_server(config.server, server.auth)
        await serve(
            server,
            lambda: role.load_backend(config),
            role.warm_up,
            config.server.grace_seconds,
            on_ready=lambda s: _write_ready_file(
                args.ready_file, {"port": port, "metrics_port": metrics_port, "http_port": s.http_port}
            ),
            role=role.name,
        )

    asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        if args.command == "serve":
            _serve(args)
        elif args.command == "train":
            job = importlib.import_module(JOB_MODULES[args.job]).JOB
            config = config_from_args(job.config_type, args)
            setup_logging(f"train-{job.name}", args.log_level)
            result = job.run(config)
            print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2, default=str))
        elif args.command == "pipeline":
            from services.pipeline.config import PipelineConfig
            from services.pipeline.run import run_pipeline

            config = config_from_args(PipelineConfig, args)
            setup_logging("pipeline", args.log_level)
            summary = run_pipeline(config)
            print(f"\nreport: {Path(config.runs_dir) / summary['run_id'] / 'report.md'}")
        elif args.command == "iterate":
            from services.pipeline.config import IterateConfig
            from services.pipeline.iterate import run_iterate

            config = config_from_args(IterateConfig, args)
            setup_logging("iterate", args.log_level)
            summary = run_iterate(config)
            print(f"\nreport: {Path(config.runs_dir) / summary['run_id'] / 'iterate_report.md'}")
        elif args.command == "constitutional":
            from services.labeling.constitutional import ConstitutionalJobConfig, run_constitutional_job

            config = config_from_args(ConstitutionalJobConfig, args)
            setup_logging("constitutional", args.log_level)
            print(json.dumps(run_constitutional_job(config), indent=2))
        elif args.command == "labeling":
            from services.labeling.app import serve_labeling
            from services.labeling.config import LabelingConfig

            config = config_from_args(LabelingConfig, args)
            setup_logging("labeling", args.log_level)
            ready = args.ready_file
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(serve_labeling(config, lambda port: _write_ready_file(ready, {"port": port})))
        elif args.command == "pipeline-real":
            from services.pipeline.real import run_real_pipeline
            from services.pipeline.real_config import RealPipelineConfig

            config = config_from_args(RealPipelineConfig, args)
            setup_logging("pipeline-real", args.log_level)
            summary = run_real_pipeline(config)
            print(f"\nreport: {Path(config.runs_dir) / summary['run_id'] / 'report.md'}")
        elif args.command == "fetch-model":
            from services.model_fetch import FetchError, Source, SourceKind, fetch_model, resolve_token

            setup_logging("fetch-model", args.log_level)
            try:
                source = Source.parse(args.source)
                token = resolve_token(args.token_file) if source.kind is SourceKind.HUB else None
                result = fetch_model(source, args.dest, token, args.force)
            except FetchError as exc:  # a bad source, credentials, the network: the message says which
                print(f"rlhf fetch-model: {exc}", file=sys.stderr)
                return 2
            print(json.dumps(dataclasses.asdict(result)))
        else:
            from services.orchestrator.app import run_orchestrator

            run_orchestrator(args)
    except (ConfigError, DataError) as exc:  # bad input: a message naming the field or file:line, no traceback
        print(f"rlhf: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
