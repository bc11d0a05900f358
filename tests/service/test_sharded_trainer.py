"""The trainer sharded over two CPU ranks (FSDP2 under torchrun, gloo) against one process, on the same batches.

Two real ranks (``tests/sharded_rank.py`` under ``torch.distributed.run``): rank 0 leads and rank 1 follows, as
in the service. The statistics of every step, the parameters of the policy and the critic after the steps, and the
weights rank 0 streams must equal the single process's to 1e-5 (the ranks sum their parts in another order).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from services.launcher import free_port
from services.trainer.backend import TrainerBackend
from services.trainer.config import CriticConfig, LoRAConfig, PPOConfig
from services.trainer.servicer import rollout_to_pb
from shared.modeling import ModelConfig
from tests.unit.test_trainer_backend import _ragged_batch

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def _cases(policy_dir: Path, tied_dir: Path, reward_dir: Path, work: Path) -> list[dict]:
    """Each case's config and batches: micro-batches of one row with a minibatch the ranks cannot split evenly
    (rank 1 makes stand-in calls), the fused first pass, GRPO (no critic) with the KL in the loss, a policy
    with tied embeddings (its critic started from the policy), mixed precision (bf16 compute, float32 masters), and
    LoRA adapters on the policy and the critic's backbone (streamed as adapters), also with bf16 (frozen bf16 base)."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    gae_critic = {"init": "reward_model", "path": str(reward_dir)}
    cases = [
        ("uneven", {"ppo_epochs": 2, "minibatch_size": 4, "micro_batch_size": 1}, gae_critic, [5, 5]),
        ("tied", {"ppo_epochs": 2, "minibatch_size": 3, "micro_batch_size": 2}, {"init": "policy"}, [5]),
        ("bf16", {"ppo_epochs": 2, "minibatch_size": 4, "micro_batch_size": 1}, gae_critic, [5]),
        ("lora", {"ppo_epochs": 2, "minibatch_size": 4, "micro_batch_size": 2}, gae_critic, [5, 5]),
        ("lora_bf16", {"ppo_epochs": 2, "minibatch_size": 4, "micro_batch_size": 2}, gae_critic, [5]),
        ("fused", {"ppo_epochs": 2, "minibatch_size": 4, "micro_batch_size": 2}, gae_critic, [4]),
        # target_kl: every rank stops at the same minibatch (the approx_kl of the whole minibatch, summed over ranks).
        (
            "early_stop",
            {"ppo_epochs": 3, "minibatch_size": 2, "micro_batch_size": 1, "target_kl": 1e-9},
            gae_critic,
            [5],
        ),
        (
            "grpo",
            {
                "advantage_estimator": "grpo",
                "minibatch_size": 6,
                "micro_batch_size": 2,
                "kl": {"placement": "loss", "mode": "fixed", "init_coef": 0.1},
            },
            {},
            [6],
        ),
    ]
    specs = []
    for name, ppo, critic, sizes in cases:
        batches = []
        for seed, size in enumerate(sizes):
            batch = _ragged_batch(policy, size=size, seed=seed)
            if name == "grpo":
                batch = dataclasses.replace(batch, group_ids=torch.arange(size) // 2)
            batches.append(batch)
        path = work / f"{name}.batches.json"
        path.write_text(json.dumps([rollout_to_pb(b, "", 0).SerializeToString().hex() for b in batches]))
        ppo = {"learning_rate": 1e-3, **ppo}
        model = tied_dir if name == "tied" else policy_dir
        spec = {"name": name, "policy": str(model), "critic": critic, "ppo": ppo, "batches": str(path)}
        if name in ("bf16", "lora_bf16"):  # mixed precision: float32 masters and AdamW, bf16 forward and backward
            spec["dtype"] = "bfloat16"
        if name == "lora_bf16":
            # The frozen base is stored in bf16: each rank's micro-batches of other shapes round differently in
            # bf16 matrix products (the critic's gradient norm: 7e-5 relative), so 1e-3 here, and the fractions of
            # clipped tokens, which move by one token in 50 when a ratio lands on the other side of the clip, are
            # left out.
            spec["tolerance"] = 1e-3
            spec["uncompared"] = ["clip_fraction", "value_clip_fraction"]
        if name in ("lora", "lora_bf16"):  # adapters on the policy and the critic's backbone, their bases frozen
            spec["lora"] = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
        specs.append(spec)
    return specs


def _checkpoint_cases(cases: dict, work: Path) -> list[dict]:
    """ "to_one": two ranks step on batch 1, save (sharded format), step on batch 2; "from_one": one process steps
    on batch 1 and saves (one-process format) here, two ranks load that and step on batch 2. The same with LoRA
    adapters on the policy and the critic ("lora_to_one", "lora_from_one"), whose checkpoints hold what trains."""
    made = []
    for base, prefix in (("uneven", ""), ("lora", "lora_")):
        case = cases[base]
        from_one = work / f"{prefix}from-one-process"
        backend, _ = _one_process({**case, "steps": 1})
        backend.save_checkpoint(from_one)
        made += [
            {**case, "name": f"{prefix}to_one", "save_after": 1, "save_to": str(work / f"{prefix}from-two-ranks")},
            {**case, "name": f"{prefix}from_one", "load": str(from_one), "skip": 1},
        ]
    made.append({**cases["uneven"], "name": "save_first", "save_after": 0, "save_to": str(work / "before-first-step")})
    return made


@pytest.fixture(scope="module")
def two_ranks(tiny_policy_dir, tiny_tied_policy_dir, tiny_reward_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("sharded")
    cases = _cases(tiny_policy_dir, tiny_tied_policy_dir, tiny_reward_dir, work)
    cases += _checkpoint_cases({case["name"]: case for case in cases}, work)
    spec = work / "spec.json"
    spec.write_text(json.dumps(cases))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(ROOT / "tests" / "sharded_rank.py"),
        str(spec),
        str(work / "out"),
    ]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return {case["name"]: case for case in cases}, work / "out"


def _one_process(case: dict, load: Path | None = None) -> tuple[TrainerBackend, list[dict]]:
    """The case in one process: its batches from ``skip`` on (to ``steps``), after loading ``load``."""
    from tests.sharded_rank import _batches

    model = ModelConfig(path=case["policy"], dtype=case.get("dtype", "float32"))
    lora = LoRAConfig(**case.get("lora", {}))
    backend = TrainerBackend(model, CriticConfig(**case["critic"]), PPOConfig(**case["ppo"]), lora=lora)
    if load is not None:
        backend.load_checkpoint(load)
    stats = []
    batches = _batches(case["batches"])
    for batch in batches[case.get("skip", 0) : case.get("steps", len(batches))]:
        record = dataclasses.asdict(backend.train_step(batch))
        record.pop("step_seconds")
        stats.append(record)
    return backend, stats


@pytest.mark.parametrize("name", ["uneven", "fused", "grpo", "tied", "bf16", "lora", "lora_bf16", "early_stop"])
def test_two_ranks_train_as_one_process(two_ranks, name):
    cases, out = two_ranks
    backend, expected = _one_process(cases[name])
    if name == "early_stop":  # 3 minibatches x 3 epochs: the first applied, the second past the target
        assert [s["extra"]["applied_fraction"] for s in expected] == [pytest.approx(1 / 9)]
    _assert_same_run(out / name, backend, expected, cases[name])


@pytest.mark.parametrize("name", ["to_one", "lora_to_one"])
def test_a_checkpoint_of_two_ranks_loads_into_one_process(two_ranks, name):
    """The sharded format: two ranks wrote it after their first step; one process loads it and makes the second
    step as the two ranks did. Its Hugging Face export (with LoRA: the adapter in peft's format and the merged
    model) is the one the process writes after the same first step."""
    cases, out = two_ranks
    case = cases[name]
    saved = Path(case["save_to"])
    assert json.loads((saved / "trainer_state.json").read_text())["format"] == 2
    mine = Path(case["save_to"] + ".one-process")
    _one_process({**case, "steps": 1})[0].save_checkpoint(mine)
    exports = ["policy/model.safetensors"] + (["adapter/adapter_model.safetensors"] if "lora" in case else [])
    for export in exports:
        got, expected = load_file(str(saved / export)), load_file(str(mine / export))
        assert got.keys() == expected.keys(), export
        for key, value in expected.items():
            assert_close(got[key], value, msg=lambda m, key=f"{export} {key}": f"{key}: {m}", **TOLERANCE)
    backend, expected = _one_process({**case, "skip": 1}, load=saved)
    got = json.loads((out / name / "stats.json").read_text())[1:]  # the step after the save
    _assert_same_run(out / name, backend, expected, case, got=got)


@pytest.mark.parametrize("name", ["from_one", "lora_from_one"])
def test_a_checkpoint_of_one_process_loads_into_two_ranks(two_ranks, name):
    """The one-process format (AdamW state by parameter index) into two ranks, whose next step is the one the
    process that wrote it makes."""
    cases, out = two_ranks
    case = cases[name]
    backend, expected = _one_process(case, load=Path(case["load"]))
    _assert_same_run(out / name, backend, expected, case)


def test_a_checkpoint_before_the_first_step_changes_nothing(two_ranks):
    """Saved before any step (DCP gives an optimizer without state a placeholder one to save): the two ranks then
    train exactly as one process that never saved, and one process that loads it trains the same again."""
    cases, out = two_ranks
    case = cases["save_first"]
    saved = Path(case["save_to"])
    assert json.loads((saved / "trainer_state.json").read_text())["fresh_optimizers"] == ["critic", "policy"]
    backend, expected = _one_process(case)
    _assert_same_run(out / "save_first", backend, expected, case)
    backend, expected = _one_process(case, load=saved)
    _assert_same_run(out / "save_first", backend, expected, case)


def test_a_sharded_checkpoint_refuses_a_trainer_of_another_shape(two_ranks):
    """A LoRA checkpoint of two ranks into a trainer without LoRA or with another adapter rank, and a full one into
    a LoRA trainer: a clear error, and the trainer as it was."""
    cases, _ = two_ranks
    lora, full = Path(cases["lora_to_one"]["save_to"]), Path(cases["to_one"]["save_to"])
    case = cases["lora"]
    model, critic, ppo = ModelConfig(path=case["policy"]), CriticConfig(**case["critic"]), PPOConfig(**case["ppo"])
    plain = TrainerBackend(model, critic, ppo)
    with pytest.raises(ValueError, match="a LoRA checkpoint"):
        plain.load_checkpoint(lora)
    other = TrainerBackend(model, critic, ppo, lora=LoRAConfig(**{**case["lora"], "rank": 2}))
    before = {name: p.detach().clone() for name, p in other.policy.named_parameters()}
    with pytest.raises(ValueError, match="rank, alpha"):
        other.load_checkpoint(lora)
    with pytest.raises(ValueError, match="without a LoRA adapter"):
        other.load_checkpoint(full)
    assert other.step == 0
    for name, p in other.policy.named_parameters():
        assert torch.equal(p, before[name]), name


def _assert_same_run(out: Path, backend: TrainerBackend, expected: list[dict], case: dict, got=None) -> None:
    """The two ranks' statistics (``got``: all of ``out``'s by default), parameters and streamed weights against
    the one process's."""
    got = json.loads((out / "stats.json").read_text()) if got is None else got
    close = case.get("tolerance", TOLERANCE["rtol"])
    tolerance = {"atol": close, "rtol": close}
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.keys() == b.keys() and a["extra"].keys() == b["extra"].keys()
        a, b = {**a.pop("extra"), **a}, {**b.pop("extra"), **b}
        for field, value in b.items():
            if field in case.get("uncompared", ()):
                continue
            if isinstance(value, float):
                assert a[field] == pytest.approx(value, rel=close, abs=close), f"step {step}: {field}"
            elif field != "policy_epoch":  # a trainer incarnation's timestamp
                assert a[field] == value, f"step {step}: {field}"

    parameters = load_file(str(out / "parameters.safetensors"))
    models = {"policy": backend.policy, "critic": backend.critic}
    mine = {
        f"{owner}/{n}": p.detach()
        for owner, model in models.items()
        if model is not None
        for n, p in model.named_parameters()
    }
    assert parameters.keys() == mine.keys()
    lora = LoRAConfig(**case.get("lora", {}))
    initial = TrainerBackend(ModelConfig(path=case["policy"]), CriticConfig(), PPOConfig(), lora=lora).policy
    moved = 0
    for key, value in mine.items():
        assert_close(parameters[key], value, msg=lambda m, key=key: f"{key}: {m}", **tolerance)
        if key.startswith("policy/"):
            moved += not torch.equal(value, dict(initial.named_parameters())[key.removeprefix("policy/")])
    assert moved, "the steps moved no policy parameter: the comparison would prove nothing"

    streamed = load_file(str(out / "streamed.safetensors"))
    assert set(streamed) == set(backend.policy_names())
    for key, value in backend.policy_state():
        # In bf16 (mixed precision sends the compute dtype) a master weight 1e-7 away rounds, now and then, to the
        # neighbouring bf16 value: torch's own bf16 tolerance (one unit in the last place) there.
        bf16 = {"atol": max(close, 1e-5), "rtol": 1.6e-2}
        assert_close(streamed[key], value, **(tolerance if value.dtype == torch.float32 else bf16))
