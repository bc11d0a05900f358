"""Config loading: YAML + flags, errors that name the field, and the shipped example configs stay valid."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from services.cli import ROLE_MODULES, build_parser
from services.orchestrator.config import OrchestratorConfig
from shared.config import ConfigError, add_config_flags, config_from_args, load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "configs"


@pytest.mark.parametrize("role", sorted(ROLE_MODULES))
def test_example_config_of_each_role_validates(role):
    import importlib

    config_type = importlib.import_module(ROLE_MODULES[role]).ROLE.config_type
    config = load_config(config_type, EXAMPLES / f"{role}.yaml")
    assert config.server.port > 0


def test_example_orchestrator_config_validates():
    config = load_config(OrchestratorConfig, EXAMPLES / "orchestrator.yaml")
    assert len(config.peers.generation) == 2 and config.run.sampling.max_new_tokens == 128


def test_flags_override_the_file_and_parse_as_yaml(tmp_path):
    from services.trainer.config import TrainerConfig

    parser = argparse.ArgumentParser()
    add_config_flags(parser, TrainerConfig)
    args = parser.parse_args(
        [
            "--config",
            str(EXAMPLES / "trainer.yaml"),
            "--ppo.kl.target",
            "3",
            "--ppo.whiten_advantages",
            "false",
            "--server.port",
            "7000",
        ]
    )
    config = config_from_args(TrainerConfig, args)
    assert config.ppo.kl.target == 3.0 and config.ppo.whiten_advantages is False and config.server.port == 7000
    assert config.ppo.minibatch_size == 8  # from the file


def test_errors_name_the_field_and_the_file(tmp_path):
    from services.generation.config import GenerationConfig

    path = tmp_path / "g.yaml"
    path.write_text("model:\n  device: tpu\nunknown_key: 1\n")
    with pytest.raises(ConfigError) as error:
        load_config(GenerationConfig, path)
    assert "model.device" in str(error.value) and "unknown_key" in str(error.value) and str(path) in str(error.value)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(GenerationConfig, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(GenerationConfig, tmp_path / "missing.yaml")


def test_cli_parses_every_role_and_rejects_unknown_ones():
    for role in ROLE_MODULES:
        args = build_parser(["serve", role]).parse_args(["serve", role, "--server.port", "1"])
        assert args.role == role
    with pytest.raises(SystemExit):
        build_parser(["serve", "nope"]).parse_args(["serve", "nope"])


def test_example_pipeline_config_is_the_demo_config():
    from services.pipeline.config import PipelineConfig

    example = load_config(PipelineConfig, EXAMPLES / "pipeline.yaml")
    demo = PipelineConfig.model_validate({"ppo": {"without_kl": True}})  # what `make demo` runs
    assert example.model_dump() == demo.model_dump()


def test_generation_discovery_static_or_kubernetes():
    from services.orchestrator.config import DiscoveryMode, PeersConfig

    others = {"reward": "r:1", "reference": "f:1", "trainer": "t:1"}
    # The manifests' form: the generation Service's EndpointSlices; the static list is then ignored.
    peers = PeersConfig.model_validate(
        {
            "generation_discovery": {
                "mode": "kubernetes",
                "service": "generation",
                "namespace": "rlhf",
                "port_name": "grpc",
            },
            **others,
        }
    )
    assert peers.generation_discovery.mode is DiscoveryMode.KUBERNETES and peers.generation_discovery.kubeconfig == ""
    peers.require_addresses()
    with pytest.raises(ConfigError, match=r"peers\.generation:"):
        PeersConfig.model_validate(others).require_addresses()  # static (the default) with no address
    PeersConfig.model_validate({"generation": "g:1", **others}).require_addresses()
    with pytest.raises(ValueError, match="service is required"):
        PeersConfig.model_validate({"generation_discovery": {"mode": "kubernetes", "namespace": "rlhf"}})
    with pytest.raises(ValueError, match="mode"):
        PeersConfig.model_validate({"generation_discovery": {"mode": "dns"}})


def test_several_config_files_merge_in_order(tmp_path):
    """A role's config and an add-on (a TLS file mounted beside it): mappings merge key by key, the later file
    wins, flags win over both."""
    from services.reward.config import RewardConfig

    base = tmp_path / "reward.yaml"
    base.write_text("function: services.reward.functions:response_length\nserver: {port: 50052, host: 0.0.0.0}\n")
    addon = tmp_path / "tls.yaml"
    addon.write_text("auth: {tls: {cert_file: /c.pem, key_file: /k.pem}}\nserver: {port: 50099}\n")
    config = load_config(RewardConfig, [base, addon], {"server.grace_seconds": 3})
    assert (config.server.host, config.server.port, config.server.grace_seconds) == ("0.0.0.0", 50099, 3)
    assert config.auth.tls.cert_file == "/c.pem" and config.function.endswith("response_length")
    with pytest.raises(ValueError, match=r"missing\.yaml"):
        load_config(RewardConfig, [base, tmp_path / "missing.yaml"])


def test_request_paths_are_confined_under_their_root(tmp_path):
    from shared.errors import InvalidInput
    from shared.paths import confine

    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "out").symlink_to(tmp_path)
    assert confine(root, "data/p.jsonl", "dataset") == (root / "data" / "p.jsonl").resolve()
    assert confine(root, str(root / "data"), "dataset") == (root / "data").resolve()  # absolute, inside
    for given, message in [
        ("", "empty"),
        ("../x", "'..'"),
        ("data/../../x", "'..'"),
        ("/etc/passwd", "not under"),
        ("out/secret", "not under"),  # a link out of the root
        ("a\x00b", "NUL"),
        ("x" * 201, "too long"),
    ]:
        with pytest.raises(InvalidInput, match=message) as refused:
            confine(root, given, "dataset")
        assert refused.value.field == "dataset"


def test_example_iterate_and_labeling_configs():
    from services.labeling.config import LabelingConfig
    from services.pipeline.config import IterateConfig

    assert load_config(IterateConfig, EXAMPLES / "iterate.yaml").model_dump() == IterateConfig().model_dump()
    labeling = load_config(LabelingConfig, EXAMPLES / "labeling.yaml")
    assert labeling.model_dump() == LabelingConfig(accounts_file="accounts.yaml").model_dump()
