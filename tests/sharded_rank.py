"""One rank of the sharded-trainer test (``tests/service/test_sharded_trainer.py`` runs two under torchrun).

    torchrun --nproc_per_node=2 tests/sharded_rank.py SPEC.json OUT_DIR

For each case of the spec: every rank builds the trainer sharded over the ranks (FSDP2, gloo); rank 0 leads
(``distributed.Leader``: its train steps and weight reads run on every rank) while the others follow
(``distributed.follow``) until it stops them; then every rank gathers the whole parameters. Rank 0 writes, per
case, the statistics of each step, the streamed weights (``policy_tensor``) and the parameters of the policy and
the critic. A case may first load a checkpoint (``load``) and save one after a step (``save_after``, ``save_to``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.trainer import distributed
from services.trainer.backend import TrainerBackend
from services.trainer.config import CriticConfig, LoRAConfig, PPOConfig
from services.trainer.servicer import COLLECTIVE, rollout_from_pb
from shared.modeling import ModelConfig
from shared.proto.rlhf.v1 import trainer_pb2


def _batches(path: str) -> list:
    batches = []
    for blob in json.loads(Path(path).read_text()):
        request = trainer_pb2.TrainStepRequest.FromString(bytes.fromhex(blob))
        batches.append(rollout_from_pb(request))
    return batches


def run_case(case: dict, ranks: distributed.Ranks, out: Path) -> None:
    backend = TrainerBackend(
        ModelConfig(path=case["policy"], dtype=case.get("dtype", "float32")),
        CriticConfig(**case["critic"]),
        PPOConfig(**case["ppo"]),
        lora=LoRAConfig(**case.get("lora", {})),
        ranks=ranks,
    )
    if ranks.is_leader:
        leader = distributed.Leader(backend, ranks, COLLECTIVE)
        if case.get("load"):
            leader.load_checkpoint(Path(case["load"]))
        stats = []
        if case.get("save_after") == 0:
            leader.save_checkpoint(Path(case["save_to"]))
        for index, batch in enumerate(_batches(case["batches"])[case.get("skip", 0) :]):
            record = dataclasses.asdict(leader.train_step(batch))
            record.pop("step_seconds")
            stats.append(record)
            if case.get("save_after") == index + 1:
                leader.save_checkpoint(Path(case["save_to"]))
        streamed = {name: leader.policy_tensor(name) for name in leader.policy_names()}
        leader.stop_followers()
    else:
        distributed.follow(backend, ranks)
    models = {"policy": backend.policy, "critic": backend.critic}
    parameters = {
        f"{owner}/{name}": distributed.full(p.detach()).clone()
        for owner, model in models.items()
        if model is not None
        for name, p in model.named_parameters()
    }
    if ranks.is_leader:
        directory = out / case["name"]
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "stats.json").write_text(json.dumps(stats))
        save_file(streamed, str(directory / "streamed.safetensors"))
        save_file(parameters, str(directory / "parameters.safetensors"))


def main(spec_path: str, out_dir: str) -> int:
    torch.set_num_threads(1)
    ranks = distributed.from_environment("cpu")
    assert ranks is not None and ranks.world_size == 2, "run under torchrun with 2 ranks"
    for case in json.loads(Path(spec_path).read_text()):
        run_case(case, ranks, Path(out_dir))
    distributed.leave()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
