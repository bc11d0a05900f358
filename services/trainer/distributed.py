"""The trainer across ranks: FSDP2 (``fully_shard``) under ``torchrun``, data-parallel over each rollout batch.

    torchrun --nproc_per_node=N -m services.cli serve trainer --config trainer.yaml

Every rank loads the same policy and critic and shards them (each decoder layer, then the whole model: parameters,
gradients and AdamW state are 1/N per rank). Rank 0 serves gRPC; each call that touches the weights is a
``Command`` it broadcasts on a gloo control group before running it itself, and the other ranks (``follow``) run
the same call on the same arguments: a TrainStep's rollout batch reaches every rank this way. In a step each rank
forwards and backwards its share of each minibatch's rows; the per-row results every rank needs (old log-probs,
values) are summed across ranks, so the advantages, the whitening and the statistics are those of the whole batch,
as in one process.

One rank is one device: CPU ranks talk gloo, CUDA ranks NCCL (``LOCAL_RANK`` picks the GPU). Without torchrun
(``WORLD_SIZE`` unset or 1) nothing here is used and the trainer is one process, as before.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# The control group waits for rank 0's next command for as long as the trainer is idle between runs.
CONTROL_TIMEOUT = datetime.timedelta(days=30)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group: ``rank`` of ``world_size``, on ``device``."""

    rank: int
    world_size: int
    device: torch.device
    control: Any  # the gloo group commands travel on

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    # -- collectives over the model group ------------------------------------------------------------------------

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over the ranks in place (every rank gets the total) and returns it."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_floats(self, values: list[float]) -> list[float]:
        """The element-wise sums over the ranks of a list of floats (float64 on the wire)."""
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.sum_(total).tolist()

    def check(self, error: str | None) -> None:
        """Rank 0's outcome of work only it did (files it wrote), told to every rank: each raises if it failed, so
        no rank waits in a collective for one that gave up."""
        box = [error]
        dist.broadcast_object_list(box, src=0, group=self.control)
        if box[0] is not None:
            raise RuntimeError(f"rank 0: {box[0]}")

    def share(self, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """This rank's rows of ``rows``: dealt round robin in order of length (longest first), so every rank gets
        about the same number of tokens. Every rank computes every rank's share the same way."""
        order = torch.argsort(lengths[rows], descending=True, stable=True)
        return rows[order][self.rank :: self.world_size]

    def most_shares(self, rows: torch.Tensor, per_call: int) -> int:
        """The largest number of ``per_call``-row calls any rank needs for its share of ``rows``: every rank makes
        that many (FSDP's gathers and reductions are collective: one call fewer on one rank would hang the rest)."""
        largest = -(-rows.numel() // self.world_size)  # the first rank's share is the largest
        return max(1, -(-largest // per_call))


def from_environment(device: str) -> Ranks | None:
    """The process group torchrun describes (``WORLD_SIZE`` > 1), initialised; None for a single process.

    ``device`` is the trainer's configured device: "cpu" gives gloo ranks, "cuda"/"auto" with GPUs NCCL ranks,
    one GPU each (``LOCAL_RANK``)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        placement = torch.device("cuda", local_rank)
    else:
        placement = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            store=_store(rank, world_size),
            rank=rank,
            world_size=world_size,
            device_id=placement if use_cuda else None,
        )
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    log.info("rank %d of %d on %s (%s)", rank, world_size, placement, dist.get_backend())
    return Ranks(rank=rank, world_size=world_size, device=placement, control=control)


def _store(rank: int, world_size: int) -> dist.Store:
    """torchrun's store (its agent's, or rank 0's), with this attempt's keys apart: after torchrun restarts the group,
    the ranks found the addresses the previous attempt had published under the same keys and could not connect."""
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not agent_hosts_it and rank == 0,
        timeout=datetime.timedelta(minutes=30),
    )
    return dist.PrefixStore(f"rlhf/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` on each transformer block (the classes Hugging Face lists in ``_no_split_modules``) and then
    on the whole model: a block's parameters are gathered for its forward and backward only. Tied weights (the
    embedding and the head) stay one parameter, in the root's group."""
    from torch.distributed.fsdp import fully_shard

    blocks = set()
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            blocks.update(names)
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (a collective: every rank must call it); a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded parameter; a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


# -- commands: rank 0 leads, the others follow ------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A backend method every rank runs on the same arguments."""

    method: str
    args: tuple = ()


STOP = Command("__stop__")


class Leader:
    """On rank 0: the backend, as the servicer sees it, whose ``collective`` methods run on every rank.

    Calling one broadcasts the call first, so the other ranks (``follow``) enter its collectives together with
    rank 0; anything else (attributes, the other methods) is rank 0's own backend."""

    def __init__(self, backend: Any, ranks: Ranks, collective: frozenset[str]):
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "_ranks", ranks)
        object.__setattr__(self, "_collective", collective)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._backend, name)
        if name not in self._collective:
            return value

        def on_every_rank(*args: Any) -> Any:
            try:
                dist.broadcast_object_list([Command(name, args)], src=0, group=self._ranks.control)
            except Exception as exc:  # a rank is gone: the group cannot be mended
                give_up(self._ranks, name, exc)
            try:
                return value(*args)
            except dist.DistError as exc:  # a collective inside the call failed
                give_up(self._ranks, name, exc)

        return on_every_rank

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._backend, name, value)

    def stop_followers(self) -> None:
        """Tells the other ranks to return. They may be gone already (torchrun signals every rank on shutdown)."""
        try:
            dist.broadcast_object_list([STOP], src=0, group=self._ranks.control)
        except Exception as exc:
            log.info("the other ranks were not told to stop (%s): they have exited", exc)


# The exit status of a rank whose group broke (EX_SOFTWARE): torchrun then stops the other ranks and, with
# --max-restarts, starts the group again; under Kubernetes the pod restarts. Either way it resumes from the newest
# checkpoint.
BROKEN_GROUP_EXIT = 70


def give_up(ranks: Ranks, method: str, exc: BaseException) -> None:
    """Ends this process: a group that lost a rank (or whose collective failed) cannot run another step."""
    log.critical(
        "rank %d: %s failed in the process group (%s); exiting for the group to restart", ranks.rank, method, exc
    )
    logging.shutdown()
    os._exit(BROKEN_GROUP_EXIT)


def leave() -> None:
    """Destroys this process's groups, once it is done with them: a process that exits with gloo's threads still
    running can abort ("terminate called without an active exception"), which torchrun counts as a failure."""
    if dist.is_initialized():
        dist.destroy_process_group()


def follow(backend: Any, ranks: Ranks, on_error: Callable[[Command, Exception], None] | None = None) -> None:
    """On ranks > 0: runs rank 0's commands until it says stop. A command that raises (a batch the trainer
    refuses) raises on rank 0 too, which answers the caller; the follower logs it and waits for the next one."""
    while True:
        box: list[Any] = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=ranks.control)
        except Exception as exc:  # rank 0 is gone
            give_up(ranks, "waiting for a command", exc)
        command: Command = box[0]
        if command == STOP:
            log.info("rank %d: stop", ranks.rank)
            return
        try:
            getattr(backend, command.method)(*command.args)
        except dist.DistError as exc:
            give_up(ranks, command.method, exc)
        except Exception as exc:  # the same error is rank 0's to report
            log.warning("rank %d: %s failed: %s", ranks.rank, command.method, exc)
            if on_error is not None:
                on_error(command, exc)
