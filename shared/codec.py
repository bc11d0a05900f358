"""Tensors <-> protobuf: packed little-endian bytes with dtype and shape; ragged batches as values + offsets.

Decoding validates everything a client can get wrong (dtype, byte count, offsets) and raises ``InvalidInput``
naming the field, so servicers never see a malformed tensor.
"""

from __future__ import annotations

import sys

import torch

from shared.errors import InvalidInput
from shared.proto.rlhf.v1 import tensor_pb2

_TO_PB = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.int32: tensor_pb2.DTYPE_INT32,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.float64: tensor_pb2.DTYPE_FLOAT64,
    torch.bool: tensor_pb2.DTYPE_BOOL,
    torch.uint8: tensor_pb2.DTYPE_UINT8,
}
_FROM_PB = {v: k for k, v in _TO_PB.items()}
_LITTLE = sys.byteorder == "little"


def dtype_to_pb(dtype: torch.dtype) -> int:
    try:
        return _TO_PB[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no wire form") from None


def dtype_from_pb(value: int, field: str) -> torch.dtype:
    try:
        return _FROM_PB[value]
    except KeyError:
        name = tensor_pb2.DType.Name(value) if value in tensor_pb2.DType.values() else str(value)
        raise InvalidInput(field, f"unknown or unspecified dtype {name}") from None


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The packed little-endian bytes of a tensor (any dtype, bf16 included), C order."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.dtype is not torch.bool else flat.to(torch.uint8)
    if not _LITTLE and flat.element_size() > 1:  # pragma: no cover - every supported host is little-endian
        raise RuntimeError("big-endian hosts are not supported")
    return raw.numpy().tobytes()


MAX_DIMS = 8
MAX_DIM_SIZE = 2**31 - 1


def tensor_from_bytes(
    data: bytes | bytearray, dtype: torch.dtype, shape: list[int] | tuple[int, ...], field: str
) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise InvalidInput(field, f"negative dimension in shape {list(shape)}")
    # Bounds that no real tensor here comes near; an empty tensor of absurd dimensions is refused too.
    if len(shape) > MAX_DIMS or any(s > MAX_DIM_SIZE for s in shape):
        raise InvalidInput(field, f"shape {list(shape)}: at most {MAX_DIMS} dimensions of at most {MAX_DIM_SIZE}")
    count = 1
    for s in shape:
        count *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != count * itemsize:
        raise InvalidInput(field, f"has {len(data)} bytes but shape {list(shape)} of {dtype} needs {count * itemsize}")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    # A writable buffer the tensor owns (a copy unless the caller hands over a bytearray), so the message can go.
    buffer = data if isinstance(data, bytearray) else bytearray(data)
    if dtype is torch.bool:
        return torch.frombuffer(buffer, dtype=torch.uint8).to(torch.bool).reshape(shape)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def tensor_to_pb(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype_to_pb(tensor.dtype), shape=list(tensor.shape), data=tensor_bytes(tensor))


def tensor_from_pb(message: tensor_pb2.Tensor, field: str) -> torch.Tensor:
    dtype = dtype_from_pb(message.dtype, f"{field}.dtype")
    return tensor_from_bytes(message.data, dtype, list(message.shape), f"{field}.data")


def ragged_to_pb(rows: list[torch.Tensor], dtype: torch.dtype | None = None) -> tensor_pb2.RaggedTensor:
    """Packs 1-D rows of one dtype as flat values + int64 offsets (len(rows) + 1)."""
    lengths = [int(r.numel()) for r in rows]
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    if rows:
        offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
        values = torch.cat([r.reshape(-1) for r in rows])
    else:
        values = torch.empty(0, dtype=dtype or torch.float32)
    if dtype is not None:
        values = values.to(dtype)
    return tensor_pb2.RaggedTensor(values=tensor_to_pb(values), offsets=tensor_to_pb(offsets))


def ragged_from_pb(message: tensor_pb2.RaggedTensor, field: str) -> list[torch.Tensor]:
    """Unpacks to a list of 1-D tensors, checking the offsets describe the values exactly."""
    values = tensor_from_pb(message.values, f"{field}.values")
    offsets = tensor_from_pb(message.offsets, f"{field}.offsets")
    if values.dim() != 1:
        raise InvalidInput(f"{field}.values", f"must be 1-D, got shape {list(values.shape)}")
    if offsets.dtype is not torch.int64 or offsets.dim() != 1 or offsets.numel() < 1:
        raise InvalidInput(f"{field}.offsets", "must be a non-empty 1-D int64 tensor")
    if int(offsets[0]) != 0 or int(offsets[-1]) != values.numel():
        raise InvalidInput(
            f"{field}.offsets",
            f"must start at 0 and end at len(values)={values.numel()}, got {int(offsets[0])}..{int(offsets[-1])}",
        )
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise InvalidInput(f"{field}.offsets", "must be non-decreasing")
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    return list(torch.split(values, lengths)) if lengths else []
