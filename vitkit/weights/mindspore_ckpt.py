"""Read MindSpore `.ckpt` files (MindCV's published weights) without MindSpore.

A `.ckpt` is one protobuf message (mindspore/ccsrc/utils/checkpoint.proto):

    message Checkpoint  { repeated Value value = 1; }
    message Value       { string tag = 1; TensorProto tensor = 2; ... }
    message TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3; }

`tensor_content` is the raw little-endian buffer. MindSpore's `save_checkpoint` splits a tensor larger than
512 MiB into several `Value`s with the same tag (and the full `dims`), so chunks are concatenated in order.

The message classes are built at runtime from a descriptor (the `protobuf` package, no generated code).
The outer `Checkpoint` is walked with a tiny wire-format loop instead of parsed whole, because protobuf refuses
messages over 2 GiB and a ViT-H checkpoint is bigger than that.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from vitkit.errors import WeightsError

# MindSpore's tensor_type strings -> numpy dtypes (mindspore/train/serialization.py: tensor_to_np_type).
_NP_DTYPES = {
    "Float16": np.float16, "Float32": np.float32, "Float64": np.float64,
    "Int8": np.int8, "Int16": np.int16, "Int32": np.int32, "Int64": np.int64,
    "UInt8": np.uint8, "UInt16": np.uint16, "UInt32": np.uint32, "UInt64": np.uint64,
    "Bool": np.bool_,
}


def _value_class() -> type:
    """The `Value` message class, built once from a hand-written descriptor of checkpoint.proto."""
    f = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="vitkit_mindspore_checkpoint.proto", package="vitkit_ms")
    tensor = fdp.message_type.add(name="TensorProto")
    tensor.field.add(name="dims", number=1, type=f.TYPE_INT64, label=f.LABEL_REPEATED)
    tensor.field.add(name="tensor_type", number=2, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    tensor.field.add(name="tensor_content", number=3, type=f.TYPE_BYTES, label=f.LABEL_OPTIONAL)
    value = fdp.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    value.field.add(name="tensor", number=2, type=f.TYPE_MESSAGE, label=f.LABEL_OPTIONAL,
                    type_name=".vitkit_ms.TensorProto")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("vitkit_ms.Value"))


_VALUE = None


def _read_varint(buf: memoryview | bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _values(buf: memoryview):
    """Yield the serialized `Value` sub-messages of a `Checkpoint` (field 1, length-delimited)."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire != 2:
            raise ValueError(f"unexpected wire type {wire} for field {field}")
        size, pos = _read_varint(buf, pos)
        if pos + size > len(buf):
            raise ValueError("truncated message")
        if field == 1:
            yield buf[pos:pos + size]
        pos += size


def read_mindspore_ckpt(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a MindSpore checkpoint, by their MindSpore names, in file order.

    Non-numeric entries (strings MindSpore may store, e.g. in newer versions) are skipped.
    """
    global _VALUE
    if _VALUE is None:
        _VALUE = _value_class()
    path = Path(path)
    chunks: dict[str, list[bytes]] = {}
    meta: dict[str, tuple[tuple[int, ...], str]] = {}
    try:
        view = memoryview(path.read_bytes())
        for raw in _values(view):
            value = _VALUE.FromString(raw.tobytes())
            if not value.HasField("tensor") or value.tensor.tensor_type not in _NP_DTYPES:
                continue
            chunks.setdefault(value.tag, []).append(value.tensor.tensor_content)
            meta[value.tag] = (tuple(value.tensor.dims), value.tensor.tensor_type)
    except (ValueError, OSError) as e:
        raise WeightsError(f"{path} is not a readable MindSpore checkpoint ({e}); is the file complete?") from None
    except Exception as e:  # protobuf's DecodeError
        raise WeightsError(f"{path} is not a readable MindSpore checkpoint ({type(e).__name__}: {e})") from None
    if not chunks:
        raise WeightsError(f"{path} holds no tensors: not a MindSpore checkpoint")
    out: dict[str, torch.Tensor] = {}
    for tag, parts in chunks.items():
        dims, dtype = meta[tag]
        arr = np.frombuffer(b"".join(parts), dtype=np.dtype(_NP_DTYPES[dtype]).newbyteorder("<"))
        expected = math.prod(dims)  # Python ints: dims that overflow int64 cannot wrap around to a match
        if any(d < 0 for d in dims) or arr.size != expected:
            raise WeightsError(f"{path}: tensor {tag!r} has {arr.size} values but dims {list(dims)}; file corrupt")
        out[tag] = torch.from_numpy(arr.reshape(dims).astype(arr.dtype.newbyteorder("="), copy=True))
    return out
