"""Schemathesis against every REST app, over real HTTP: the control API, the reward API and generation's TGI
routes, each served on loopback by this process while the ``st`` CLI (a separate process) sends the cases its
OpenAPI document describes, positive and negative, with a valid token. No case may get a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from pathlib import Path

import pytest

from services.orchestrator.app import create_app
from services.orchestrator.config import OrchestratorConfig
from shared.auth import ServerAuth
from shared.http import HttpServer
from tests.service.test_auth import serving

ST = Path(sys.executable).parent / "st"
EXAMPLES_PER_OPERATION = 200


async def schemathesis(base_url: str, token: str, report: Path, examples: int = EXAMPLES_PER_OPERATION) -> dict:
    """Runs ``st run`` on ``base_url``/openapi.json; returns {cases, failures} from its NDJSON report and the
    output, asserting the run ended cleanly."""
    process = await asyncio.create_subprocess_exec(
        str(ST),
        "run",
        f"{base_url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(examples),
        "--seed",
        "1",
        "--header",
        f"Authorization: Bearer {token}",
        "--request-timeout",
        "60",
        "--phases",
        "examples,coverage,fuzzing",
        "--report",
        "ndjson",
        "--report-ndjson-path",
        str(report),
        "--no-color",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = (await process.communicate())[0].decode(errors="replace")
    cases = _count_cases(report)
    return {"code": process.returncode, "output": output, "cases": cases}


def _count_cases(report: Path) -> int:
    """Test cases the run sent, from the NDJSON event stream (one ScenarioFinished event per scenario with its
    recorded cases)."""
    total = 0
    for line in report.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if finished:
            total += len(finished.get("recorder", {}).get("cases", {}))
    return total


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(secrets.token_hex(32))
    return path


async def test_control_api_never_answers_5xx(tmp_path, token_file, tiny_policy_dir):

    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a", "b", "c", "d"]))
    config = OrchestratorConfig.model_validate(
        {
            "auth": {"token_file": str(token_file)},
            "run": {
                "dataset": str(dataset),
                "runs_dir": str(tmp_path / "runs"),
                "iterations": 1,
                "prompts_per_iteration": 2,
                "sampling": {"max_new_tokens": 2},
            },
        }
    )
    app = create_app(config, _inprocess_factory(tiny_policy_dir))
    server = HttpServer(app, "127.0.0.1", 0, ServerAuth.load(config.auth, "127.0.0.1"))
    await server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        # Its routes take few inputs each (a run id, one body): more examples per route for 1000 cases.
        result = await schemathesis(url, token_file.read_text(), tmp_path / "r.ndjson", examples=500)
    finally:
        await server.stop()
    print(result["output"][-3000:])
    assert result["code"] == 0, result["output"][-6000:]
    assert result["cases"] >= 1000, result["cases"]


def _inprocess_factory(policy_dir):
    """In-process tiny backends for the runs the fuzzer starts (they must run, not just be accepted)."""
    from services.generation.backend import GenerationBackend
    from services.generation.config import GenerationConfig
    from services.orchestrator.inprocess import inprocess_clients
    from services.reference.backend import ReferenceBackend
    from services.reference.config import ReferenceConfig
    from services.reward.backend import load_backend as load_reward
    from services.reward.config import RewardConfig
    from services.trainer.backend import TrainerBackend
    from services.trainer.config import CriticConfig, PPOConfig
    from shared.modeling import ModelConfig

    model = {"path": str(policy_dir)}
    generation = GenerationBackend(GenerationConfig.model_validate({"model": model}))
    reward = load_reward(RewardConfig.model_validate({"function": "services.reward.functions:response_length"}))
    reference = ReferenceBackend(ReferenceConfig.model_validate({"model": model}))
    trainer = TrainerBackend(
        ModelConfig(path=str(policy_dir)), CriticConfig(), PPOConfig(ppo_epochs=1, minibatch_size=2, micro_batch_size=2)
    )
    return lambda: inprocess_clients(generation, reward, reference, trainer)


@pytest.mark.parametrize("role", ["generation", "reward"])
async def test_service_rest_apis_never_answer_5xx(role, tmp_path, token_file, tiny_policy_dir):
    """Generation's TGI routes and the reward API, each on its service's http_port beside gRPC."""
    from tests.service.test_auth import role_config

    config = role_config(role, tiny_policy_dir, {"token_file": str(token_file)}, tmp_path)
    config["server"] = {"http_port": 0}
    async with serving(role, config) as server:
        assert server.http_port, f"{role} serves no HTTP app"
        url = f"http://127.0.0.1:{server.http_port}"
        result = await schemathesis(url, token_file.read_text(), tmp_path / "r.ndjson")
    print(result["output"][-3000:])
    assert result["code"] == 0, result["output"][-6000:]
    assert result["cases"] >= 1000, result["cases"]
