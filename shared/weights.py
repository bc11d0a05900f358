"""Policy weights on the wire: a versioned stream of chunks, each under the gRPC message limit.

The sender walks a state dict (Hugging Face names, the model's dtype) and slices each tensor's packed bytes; the
receiver assembles them into complete tensors, checks names, shapes, dtypes and that nothing is missing, and only
then hands a full state dict over for an atomic swap. No pickle: the bytes are those safetensors would store.
A LoRA adapter update is the same stream with the adapter's tensors only and its config (``shared.lora``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from shared import codec
from shared.errors import Conflict, InvalidInput
from shared.proto.rlhf.v1 import weights_pb2

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024


def _storage_key(tensor: torch.Tensor) -> tuple:
    if isinstance(tensor, DTensor):  # a sharded parameter (FSDP2): its storage is this rank's shard
        tensor = tensor.to_local()
    return (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias: canonical name} for every state-dict entry that is another name of an earlier entry's tensor.

    A model with tied input and output embeddings (Qwen2.5, Llama-3.2 1B/3B, SmolLM2, Gemma) lists the same tensor
    twice, e.g. ``lm_head.weight`` for ``model.embed_tokens.weight``. ``save_pretrained`` stores it once, under the
    first name; a complete update does the same.
    """
    return _aliases(model.state_dict())


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        if not tensor.numel():
            continue
        key = _storage_key(tensor)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every tensor under one name (tied aliases left out), as safetensors stores it.

    The tensors share storage with the model (no copy): writing into one changes the model, and through the shared
    storage every alias of it too.
    """
    state = model.state_dict()
    aliases = _aliases(state)
    return {name: tensor for name, tensor in state.items() if name not in aliases}


@torch.no_grad()
def load_unique_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies a complete ``unique_state``-shaped state dict into the model in place (cast to the model's dtype).

    In place, so that tied weights stay tied: the embedding and the head share one tensor, and writing it once
    updates both. The caller has checked that ``state`` names every tensor of ``unique_state(model)``.
    """
    target = unique_state(model)
    for name, tensor in state.items():
        target[name].copy_(tensor)


def chunk_weights(
    named_tensors: list[tuple[str, torch.Tensor]],
    version: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    adapter_config: str = "",
    epoch: int = 0,
) -> Iterator[weights_pb2.WeightChunk]:
    """Yields the chunks of one update: every tensor in order, split into slices of at most ``chunk_bytes``.

    ``adapter_config`` (a LoRA adapter update: the tensors are the adapter's) goes on the first chunk only."""
    total = len(named_tensors)
    for index, (name, tensor) in enumerate(named_tensors):
        yield from chunk_tensor(name, tensor, version, total, chunk_bytes, adapter_config if index == 0 else "", epoch)


def chunk_tensor(
    name: str,
    tensor: torch.Tensor,
    version: int,
    total_tensors: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    adapter_config: str = "",
    epoch: int = 0,
) -> Iterator[weights_pb2.WeightChunk]:
    """The chunks of one tensor of an update of ``total_tensors`` (``chunk_weights``, a tensor at a time; the
    update's first tensor carries its ``adapter_config``)."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    data = codec.tensor_bytes(tensor)
    dtype = codec.dtype_to_pb(tensor.dtype)
    shape = list(tensor.shape)
    first = True
    for offset in range(0, max(len(data), 1), chunk_bytes):
        yield weights_pb2.WeightChunk(
            version=version,
            name=name,
            dtype=dtype,
            shape=shape,
            offset=offset,
            data=data[offset : offset + chunk_bytes],
            total_tensors=total_tensors,
            adapter_config=adapter_config if first else "",
            epoch=epoch,
        )
        first = False


@dataclass
class _Pending:
    dtype: torch.dtype
    shape: tuple[int, ...]
    buffer: bytearray
    received: int = 0


class WeightAssembler:
    """Collects the chunks of one update and checks them against the model's own state dict.

    An update whose first chunk carries an ``adapter_config`` is a LoRA adapter's: ``adapter`` (the receiver's)
    maps that config to the adapter tensors it expects, or raises ``InvalidInput`` if it cannot take that adapter.
    """

    def __init__(
        self,
        expected: dict[str, torch.Tensor],
        current_version: int,
        aliases: dict[str, str] | None = None,
        adapter: Callable[[str], dict[str, torch.Tensor]] | None = None,
        current_epoch: int = 0,
    ):
        self._expected = {name: (t.dtype, tuple(t.shape)) for name, t in expected.items()}
        self._aliases = aliases or {}
        self._adapter = adapter
        self._current = (current_epoch, current_version)
        self._pending: dict[str, _Pending] = {}
        self.version: int | None = None
        self.epoch = 0
        self.total_tensors: int | None = None
        self.adapter_config = ""  # the first chunk's: non-empty for a LoRA adapter update
        self.bytes = 0

    def add(self, chunk: weights_pb2.WeightChunk) -> None:
        if self.version is None:
            if (chunk.epoch, chunk.version) < self._current:
                epoch, version = self._current
                raise Conflict(
                    f"weight update (epoch {chunk.epoch}, version {chunk.version}) is older than the served "
                    f"(epoch {epoch}, version {version})"
                )
            self.version, self.epoch, self.total_tensors = chunk.version, chunk.epoch, chunk.total_tensors
            if chunk.adapter_config:
                self._expect_adapter(chunk.adapter_config)
        elif (chunk.epoch, chunk.version) != (self.epoch, self.version):
            raise InvalidInput(
                "version",
                f"changed within one update ((epoch, version) ({self.epoch}, {self.version}) -> "
                f"({chunk.epoch}, {chunk.version}))",
            )
        elif chunk.adapter_config and chunk.adapter_config != self.adapter_config:
            raise InvalidInput("adapter_config", "changed within one update (only its first chunk needs to carry it)")
        if chunk.name in self._aliases:
            raise InvalidInput(
                "name",
                f"{chunk.name!r} is tied to {self._aliases[chunk.name]!r} in this model but the sender sends it as a "
                "separate tensor: the two models differ in tie_word_embeddings",
            )
        if chunk.name not in self._expected:
            raise InvalidInput("name", f"unknown parameter {chunk.name!r} for this model")
        dtype = codec.dtype_from_pb(chunk.dtype, "dtype")
        want_dtype, want_shape = self._expected[chunk.name]
        shape = tuple(chunk.shape)
        if shape != want_shape:
            raise InvalidInput("shape", f"{chunk.name}: got {list(shape)}, the model has {list(want_shape)}")
        pending = self._pending.get(chunk.name)
        if pending is None:
            size = torch.empty((), dtype=dtype).element_size()
            for dim in shape:
                size *= dim
            pending = self._pending[chunk.name] = _Pending(dtype, shape, bytearray(size))
        if dtype != pending.dtype:
            raise InvalidInput("dtype", f"{chunk.name}: dtype changed between chunks")
        end = chunk.offset + len(chunk.data)
        if chunk.offset < 0 or end > len(pending.buffer):
            raise InvalidInput("offset", f"{chunk.name}: bytes {chunk.offset}..{end} outside {len(pending.buffer)}")
        pending.buffer[chunk.offset : end] = chunk.data
        pending.received += len(chunk.data)
        self.bytes += len(chunk.data)
        del want_dtype  # a different dtype is allowed: the receiver casts to its own (e.g. fp32 -> bf16)

    def _expect_adapter(self, adapter_config: str) -> None:
        if self._adapter is None:
            raise InvalidInput("adapter_config", "this receiver takes full weight states only, not LoRA adapters")
        expected = self._adapter(adapter_config)
        self._expected = {name: (t.dtype, tuple(t.shape)) for name, t in expected.items()}
        self._aliases = {}
        self.adapter_config = adapter_config

    def finish(self) -> dict[str, torch.Tensor]:
        """The complete state dict; raises if any tensor is missing or incomplete."""
        if self.version is None:
            raise InvalidInput("chunks", "the update carried no chunks")
        missing = sorted(set(self._expected) - set(self._pending))
        if missing or self.total_tensors != len(self._expected):
            raise InvalidInput(
                "chunks",
                f"incomplete update: {len(missing)} tensors missing (e.g. {missing[:3]}), "
                f"sender announced {self.total_tensors}, the model has {len(self._expected)}",
            )
        state = {}
        for name, pending in self._pending.items():
            if pending.received != len(pending.buffer):
                raise InvalidInput("chunks", f"{name}: received {pending.received} of {len(pending.buffer)} bytes")
            state[name] = codec.tensor_from_bytes(pending.buffer, pending.dtype, pending.shape, name)
        return state


def assemble(
    chunks: Iterable[weights_pb2.WeightChunk],
    expected: dict[str, torch.Tensor],
    current: int,
    aliases: dict[str, str] | None = None,
    adapter: Callable[[str], dict[str, torch.Tensor]] | None = None,
):
    """Synchronous convenience for tests and in-process use: returns (version, state dict, bytes)."""
    assembler = WeightAssembler(expected, current, aliases, adapter)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.version, assembler.finish(), assembler.bytes
