"""LoRA (peft) in every weight path, on tied and untied tiny models: training, the trainer's stream, generation's push
and pull over real gRPC, the in-process sync, checkpoints and a whole in-process loop.

With ``lora.rank`` > 0 the trainer trains adapters only, streams the adapter only, and generation applies it on its
own copy of the base weights; what generation then serves must be exactly the merged model (base + alpha / r * B A).
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from services.generation.backend import GenerationBackend
from services.generation.config import GenerationConfig
from services.generation.servicer import build_server as build_generation_server
from services.orchestrator.config import RunConfig
from services.orchestrator.inprocess import InProcessGeneration, inprocess_clients
from services.orchestrator.loop import RLHFLoop
from services.reference.backend import ReferenceBackend
from services.reference.config import ReferenceConfig
from services.reward.backend import load_backend as load_reward_backend
from services.reward.config import RewardConfig
from services.trainer.backend import TrainerBackend
from services.trainer.config import LoRAConfig, TrainerConfig
from services.trainer.lora import merged_copy
from shared import codec
from shared.errors import InvalidInput
from shared.lora import adapter_state
from shared.proto.rlhf.v1 import generation_pb2, generation_pb2_grpc
from shared.types import RolloutBatch, SamplingParams
from shared.weights import assemble, chunk_weights, unique_state
from tests.helpers import FIRST_ORDINARY_ID, forward_logprobs, sampled_rollout
from tests.service.grpc_helpers import expect_status, running, synced_replicas

PROMPTS = [torch.tensor([5, 6, 7]), torch.tensor([11]), torch.tensor([40, 41, 42, 43])]
LORA = {"rank": 4, "alpha": 8}
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _is_tied(model) -> bool:
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _trainer(policy_dir, **lora) -> TrainerBackend:
    config = TrainerConfig.model_validate(
        {
            "policy": {"path": str(policy_dir)},
            # A large learning rate so that one step visibly moves the adapters.
            "ppo": {"learning_rate": 1e-2, "ppo_epochs": 1, "minibatch_size": 4, "micro_batch_size": 4},
            "lora": {**LORA, **lora},
        }
    )
    return TrainerBackend(config.policy, config.critic, config.ppo, lora=config.lora)


def _rollout(policy_dir, seed: int = 0) -> RolloutBatch:
    return sampled_rollout(AutoModelForCausalLM.from_pretrained(policy_dir).eval(), seed)


def _trained(policy_dir, steps: int = 2, **lora) -> TrainerBackend:
    """Two steps by default: the first moves only B (A's gradient is B^T ... = 0 while B = 0), the second A too."""
    trainer = _trainer(policy_dir, **lora)
    for seed in range(steps):
        trainer.train_step(_rollout(policy_dir, seed))
    return trainer


def _generation(policy_dir) -> GenerationBackend:
    return GenerationBackend(GenerationConfig.model_validate({"model": {"path": str(policy_dir)}}))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _assert_serves_merged(samples, merged) -> None:
    """Greedy samples (prompt, response, log-probs) are the merged model's: each token its argmax, the same
    log-probs within float32 noise."""
    for prompt, response, logprobs in samples:
        torch.testing.assert_close(logprobs, forward_logprobs(merged, prompt, response), atol=1e-5, rtol=0)
        ids = prompt
        for token in response:
            with torch.no_grad():
                assert int(merged(ids[None]).logits[0, -1].argmax()) == int(token)
            ids = torch.cat([ids, token[None]])


def _greedy(backend: GenerationBackend):
    """(prompt, response, log-probs) of greedy samples from the generation backend."""
    samples = backend.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0.0))
    return [(s.prompt_ids, s.response_ids, s.response_logprobs) for s in samples]


# --------------------------------------------------------------------------------------------------------------
# Config and training
# --------------------------------------------------------------------------------------------------------------


def test_lora_is_off_by_default_and_its_section_is_strict():
    assert TrainerConfig().lora.rank == 0 and not TrainerConfig().lora.enabled
    config = TrainerConfig.model_validate({"lora": {"rank": 16, "target_modules": ["q_proj", "v_proj"]}})
    assert config.lora.enabled and config.lora.alpha == 32 and config.lora.critic and config.lora.export_merged
    with pytest.raises(ValueError, match="rnak"):
        TrainerConfig.model_validate({"lora": {"rnak": 16}})
    with pytest.raises(ValueError, match="target_modules"):
        LoRAConfig(rank=4, target_modules=[])


def test_a_lora_step_trains_only_the_adapters(policy_shape_dir):
    trainer = _trainer(policy_shape_dir)
    tied = _is_tied(trainer.policy)
    policy_before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    critic_before = {n: p.detach().clone() for n, p in trainer.critic.named_parameters()}
    trainable = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    critic_trainable = [n for n, p in trainer.critic.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {"head.weight", "head.bias"} < set(critic_trainable)
    assert all(".lora_" in n for n in critic_trainable if not n.startswith("head."))
    # The optimizers hold the trainable parameters only.
    assert len(trainer._optimizers["policy"].param_groups[0]["params"]) == len(trainable)
    assert len(trainer._optimizers["critic"].param_groups[0]["params"]) == len(critic_trainable)

    for seed in (0, 1):
        trainer.train_step(_rollout(policy_shape_dir, seed))

    for name, parameter in trainer.policy.named_parameters():
        if name in trainable:
            assert not torch.equal(parameter, policy_before[name]), f"{name} did not train"
        else:
            assert torch.equal(parameter, policy_before[name]), f"base weight {name} changed"
    for name, parameter in trainer.critic.named_parameters():
        if name not in critic_trainable:
            assert torch.equal(parameter, critic_before[name]), f"critic base weight {name} changed"
    assert not torch.equal(trainer.critic.head.weight, critic_before["head.weight"])
    assert _is_tied(trainer.policy) == tied


def test_without_critic_adapters_the_critic_trains_fully(tiny_policy_dir):
    trainer = _trainer(tiny_policy_dir, critic=False)
    assert all(p.requires_grad for p in trainer.critic.parameters())
    assert not any(".lora_" in n for n, _ in trainer.critic.named_parameters())
    assert all(".lora_" in n for n, p in trainer.policy.named_parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------------------------
# The weight stream
# --------------------------------------------------------------------------------------------------------------


def test_the_stream_carries_only_the_adapter(policy_shape_dir):
    trainer = _trained(policy_shape_dir)
    state = dict(trainer.policy_state())
    layers = trainer.policy.config.num_hidden_layers
    assert list(state) == list(adapter_state(trainer.policy))
    assert len(state) == 2 * 4 * layers  # A and B on q, k, v, o of every layer
    assert all(name.endswith((".lora_A.weight", ".lora_B.weight")) for name in state)
    full = unique_state(AutoModelForCausalLM.from_pretrained(policy_shape_dir))
    adapter_bytes, full_bytes = _nbytes(state.values()), _nbytes(full.values())
    print(
        f"\n[{policy_shape_dir.name}] adapter sync {len(state)} tensors, {adapter_bytes} bytes; full sync "
        f"{len(full)} tensors, {full_bytes} bytes; ratio {adapter_bytes / full_bytes:.4f}"
    )
    assert adapter_bytes < 0.05 * full_bytes

    chunks = list(chunk_weights(list(state.items()), trainer.version, 1024, trainer.adapter_config))
    assert chunks[0].adapter_config == trainer.adapter_config and not any(c.adapter_config for c in chunks[1:])
    sent = json.loads(trainer.adapter_config)
    assert (sent["peft_type"], sent["r"], sent["lora_alpha"]) == ("LORA", 4, 8)
    assert sent["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert "base_model_name_or_path" not in sent  # a local path means nothing to the receiver
    # A receiver that takes full states only refuses an adapter by name.
    with pytest.raises(InvalidInput, match="adapter_config"):
        assemble(chunks, full, current=0)
    assembler = _generation(policy_shape_dir).weight_assembler()
    for chunk in chunks:
        assembler.add(chunk)
    received = assembler.finish()
    assert assembler.version == 2 and assembler.bytes == adapter_bytes and list(received) == list(state)
    assert assembler.adapter_config == trainer.adapter_config


async def test_push_and_pull_over_grpc_serve_the_merged_model(policy_shape_dir):
    trainer = _trained(policy_shape_dir)
    merged = merged_copy(trainer.policy).eval()
    assert _is_tied(merged) == bool(merged.config.tie_word_embeddings)
    config = GenerationConfig.model_validate({"model": {"path": str(policy_shape_dir)}})
    pushed, pulled = GenerationBackend(config), GenerationBackend(config)
    base = {name: t.clone() for name, t in unique_state(pulled.model).items()}
    trainer_config = TrainerConfig.model_validate({"policy": {"path": str(policy_shape_dir)}, "lora": LORA})
    async with synced_replicas(trainer, trainer_config, config, pushed, pulled, 1024, 2) as (push, pull, pull_stub):
        info = await pull_stub.Info(generation_pb2.InfoRequest(), timeout=5)
        reply = await pull_stub.Generate(
            generation_pb2.GenerateRequest(
                prompt_ids=codec.ragged_to_pb(PROMPTS, torch.int64),
                sampling=generation_pb2.SamplingParams(max_new_tokens=6, temperature=0.0),
            ),
            timeout=30,
        )
    sent = dict(trainer.policy_state())
    assert push.version == pull.version == 2 == info.policy_version
    assert push.tensors == pull.tensors == len(sent)
    assert push.bytes == pull.bytes == _nbytes(sent.values())
    assert info.adapter_config == trainer.adapter_config
    for backend in (pushed, pulled):
        served = adapter_state(backend.model)
        assert list(served) == list(sent) and all(torch.equal(served[n], t) for n, t in sent.items())
        # The adapter sits on the loaded weights, which stay as they were (unmerged), tie included.
        plain = backend._plain_layout[0]
        assert all(torch.equal(plain[name], tensor) for name, tensor in base.items())
        assert _is_tied(backend.model) == _is_tied(merged)
    rows = zip(
        codec.ragged_from_pb(reply.prompt_ids, "p"),
        codec.ragged_from_pb(reply.response_ids, "r"),
        codec.ragged_from_pb(reply.response_logprobs, "l"),
        strict=True,
    )
    _assert_serves_merged(list(rows), merged)
    _assert_serves_merged(_greedy(pushed), merged)


def test_a_second_sync_replaces_the_adapter_and_a_full_state_removes_it(policy_shape_dir):
    trainer = _trained(policy_shape_dir, steps=1)
    generation = _generation(policy_shape_dir)
    client = InProcessGeneration(generation, trainer)
    asyncio.run(client.sync_weights(1))
    adapter_layers = [n for n, _ in generation.model.named_modules() if n.endswith(".lora_A")]
    trainer.train_step(_rollout(policy_shape_dir, seed=1))
    trainer.train_step(_rollout(policy_shape_dir, seed=2))

    sync = asyncio.run(client.sync_weights(3))

    assert sync.version == 3 == generation.version and sync.bytes == _nbytes(dict(trainer.policy_state()).values())
    assert [n for n, _ in generation.model.named_modules() if n.endswith(".lora_A")] == adapter_layers
    assert list(generation.model.peft_config) == ["default"]  # one adapter, replaced in place
    _assert_serves_merged(_greedy(generation), merged_copy(trainer.policy).eval())

    # A full state (a trainer without LoRA) takes the adapter off: the plain model, with the sent weights.
    full_trainer = _trainer(policy_shape_dir, rank=0)
    full_trainer.train_step(_rollout(policy_shape_dir))
    full_trainer.version = 4  # after the served 3: an older version would be refused
    asyncio.run(InProcessGeneration(generation, full_trainer).sync_weights(4))
    assert generation.adapter_config == "" and not isinstance(generation.model, PeftModel)
    assert _is_tied(generation.model) == bool(generation.model.config.tie_word_embeddings)
    _assert_serves_merged(_greedy(generation), full_trainer.policy)


async def test_a_mismatching_adapter_is_refused_and_the_served_weights_stay(tiny_policy_dir):
    trainer = _trained(tiny_policy_dir, steps=1)
    config = GenerationConfig.model_validate({"model": {"path": str(tiny_policy_dir)}})
    backend = GenerationBackend(config)
    wrong_rank = _trainer(tiny_policy_dir, rank=8)
    wrong_alpha = _trainer(tiny_policy_dir, alpha=16)
    server, _ = await build_generation_server(config, backend)

    def chunks_of(sender: TrainerBackend, adapter_config: str | None = None):
        config = sender.adapter_config if adapter_config is None else adapter_config
        return iter(list(chunk_weights(list(sender.policy_state()), 5, adapter_config=config)))

    async with running(server) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        # Before any adapter: configs that describe no adapter of this model.
        await expect_status(stub.UpdateWeights(chunks_of(trainer, "{not json"), timeout=30), INVALID, "adapter_config")
        elsewhere = json.dumps({**json.loads(trainer.adapter_config), "target_modules": ["no_such_proj"]})
        await expect_status(
            stub.UpdateWeights(chunks_of(trainer, elsewhere), timeout=30), INVALID, "adapter_config", "does not fit"
        )
        assert backend.adapter_config == "" and backend.version == 0
        await stub.UpdateWeights(chunks_of(trainer), timeout=30)
        served = {n: t.clone() for n, t in adapter_state(backend.model).items()}
        samples = _greedy(backend)
        for sender, difference in ((wrong_rank, "r 8 (served: 4)"), (wrong_alpha, "lora_alpha 16.0 (served: 8.0)")):
            await expect_status(
                stub.UpdateWeights(chunks_of(sender), timeout=30), INVALID, "adapter_config", difference, "restart"
            )
        info = await stub.Info(generation_pb2.InfoRequest(), timeout=5)
    assert info.policy_version == 5 and info.adapter_config == trainer.adapter_config
    assert all(torch.equal(served[n], t) for n, t in adapter_state(backend.model).items())
    for (_, response, logprobs), (_, response_again, logprobs_again) in zip(samples, _greedy(backend), strict=True):
        assert torch.equal(response, response_again) and torch.equal(logprobs, logprobs_again)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_with_lora(policy_shape_dir, tmp_path):
    batches = [_rollout(policy_shape_dir, seed) for seed in (0, 1, 2)]
    uninterrupted = _trainer(policy_shape_dir)
    for batch in batches:
        uninterrupted.train_step(batch)

    stopped = _trainer(policy_shape_dir)
    for batch in batches[:2]:
        stopped.train_step(batch)
    checkpoint = stopped.save_checkpoint(tmp_path / "checkpoint")
    files = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "policy/model.safetensors"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    critic_keys = set(load_file(checkpoint / "critic.safetensors"))
    assert critic_keys == {n for n, p in stopped.critic.named_parameters() if p.requires_grad}

    # The adapter directory loads with peft on the base model; the merged export as a plain model with the same tie.
    ids = torch.randint(FIRST_ORDINARY_ID, 200, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = stopped.policy(ids).logits
        with_adapter = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(policy_shape_dir), checkpoint / "adapter"
        )
        torch.testing.assert_close(with_adapter.eval()(ids).logits, expected, atol=0, rtol=0)
        exported = AutoModelForCausalLM.from_pretrained(checkpoint / "policy").eval()
        torch.testing.assert_close(exported(ids).logits, expected, atol=1e-5, rtol=0)
    assert _is_tied(exported) == bool(exported.config.tie_word_embeddings) == _is_tied(stopped.policy)

    resumed = _trainer(policy_shape_dir)
    resumed.load_checkpoint(checkpoint)
    assert (resumed.version, resumed.step, resumed.kl_coef) == (2, 2, stopped.kl_coef)
    resumed.train_step(batches[2])
    for a, b in ((uninterrupted.policy, resumed.policy), (uninterrupted.critic, resumed.critic)):
        other = dict(b.named_parameters())
        for name, parameter in a.named_parameters():
            torch.testing.assert_close(parameter, other[name], atol=1e-6, rtol=0, msg=name)


def test_lora_checkpoint_options_and_mismatches(tiny_policy_dir, tmp_path):
    trainer = _trained(tiny_policy_dir, steps=1, export_merged=False)
    checkpoint = trainer.save_checkpoint(tmp_path / "checkpoint")
    assert (checkpoint / "adapter").is_dir() and not (checkpoint / "policy").exists()
    restored = _trainer(tiny_policy_dir)
    restored.load_checkpoint(checkpoint)
    assert all(torch.equal(t, dict(trainer.policy_state())[n]) for n, t in restored.policy_state())

    for other, match in ((_trainer(tiny_policy_dir, rank=8), "rank"), (_trainer(tiny_policy_dir, rank=0), "LoRA")):
        before = {n: t.clone() for n, t in other.policy.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            other.load_checkpoint(checkpoint)
        assert other.version == 0 and all(torch.equal(t, before[n]) for n, t in other.policy.state_dict().items())


# --------------------------------------------------------------------------------------------------------------
# The in-process loop
# --------------------------------------------------------------------------------------------------------------


async def test_inprocess_loop_with_lora_advances_versions(policy_shape_dir, tmp_path):
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the cat is", "the day was", "we", "she"]))
    model = {"model": {"path": str(policy_shape_dir)}}
    trainer = _trainer(policy_shape_dir)
    clients = inprocess_clients(
        GenerationBackend(GenerationConfig.model_validate(model)),
        load_reward_backend(RewardConfig.model_validate({"function": "services.reward.functions:positive_word_share"})),
        ReferenceBackend(ReferenceConfig.model_validate(model)),
        trainer,
    )
    config = RunConfig(
        dataset=str(dataset),
        iterations=2,
        prompts_per_iteration=4,
        runs_dir=str(tmp_path),
        sampling={"max_new_tokens": 6, "samples_per_prompt": 2},
    )
    summary = await RLHFLoop("lora", config, clients).run()
    assert summary["iterations"] == 2 and summary["policy_version"] == 2
    generation = clients.generation.backend
    assert generation.version == 2 == trainer.version
    assert generation.adapter_config == trainer.adapter_config
    served = adapter_state(generation.model)
    assert all(torch.equal(served[n], t) for n, t in trainer.policy_state())
