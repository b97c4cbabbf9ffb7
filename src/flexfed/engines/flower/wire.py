"""Adapters on the wire: LoRA factors in and out of NumPy arrays and Flower ``ArrayRecord``s, and their size.

Every factor travels as one NumPy array serialised with ``np.save(..., allow_pickle=False)``
(what Flower's ``Array`` does); nothing is ever unpickled. NumPy has no bfloat16, so bfloat16
factors travel as float32, which holds every bfloat16 value exactly, and are cast back.

Decoding is strict about the form (exactly the announced modules, two 2-D arrays of the
announced dtype each, positive finite scales); whether ranks, shapes and values suit the
client is ``Server.check_update``'s job, which every decoded update goes through.

``torch`` is imported only where tensors are made, so a relaying ClientApp never loads it.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, Message

    from flexfed.lora import Adapter, Factors

# dtype of the factors -> dtype of their arrays on the wire
WIRE_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "float32", "float64": "float64"}
NPY = "numpy.ndarray"  # Flower's stype for np.save'd arrays


class WireError(ValueError):
    """Arrays that are not a well-formed adapter."""


def key(module: str, factor: str) -> str:
    return f"{module}.{factor}"


# ----------------------------------------------------------------------------- adapter <-> NumPy


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def encode_arrays(adapter: Mapping[str, Factors]) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta): one array per factor, and the module order, scales and dtype to send beside them."""
    import torch

    modules = sorted(adapter)
    dtypes = {_dtype_name(adapter[m].a) for m in modules} | {_dtype_name(adapter[m].b) for m in modules}
    if len(dtypes) != 1:
        raise WireError(f"an adapter must have one dtype, got {sorted(dtypes)}")
    (dtype,) = dtypes
    if dtype not in WIRE_DTYPES:
        raise WireError(f"cannot send {dtype} factors")
    wire = getattr(torch, WIRE_DTYPES[dtype])
    arrays = {}
    for m in modules:
        f = adapter[m]
        arrays[key(m, "a")] = f.a.detach().to("cpu", wire).contiguous().numpy()
        arrays[key(m, "b")] = f.b.detach().to("cpu", wire).contiguous().numpy()
    return arrays, {"modules": modules, "scales": [float(adapter[m].scale) for m in modules], "dtype": dtype}


def decode_arrays(arrays: Mapping[str, np.ndarray], modules: Sequence[str], scales: Sequence[float], dtype: str) -> Adapter:
    """The adapter in ``arrays``; raises ``WireError`` unless it is exactly what the meta announced."""
    import torch

    from flexfed.lora import Factors

    if dtype not in WIRE_DTYPES:
        raise WireError(f"factors of dtype {dtype!r} are not accepted")
    modules, scales = [str(m) for m in modules], list(scales)
    if len(modules) != len(scales) or len(set(modules)) != len(modules):
        raise WireError(f"{len(modules)} module names for {len(scales)} scales (or repeated names)")
    expected = {key(m, f) for m in modules for f in ("a", "b")}
    if set(arrays) != expected:
        diff = sorted(set(arrays) ^ expected)
        raise WireError(f"arrays do not match the announced modules (unexpected or missing: {diff[:3]})")
    wire_dtype = np.dtype(WIRE_DTYPES[dtype])
    target = getattr(torch, dtype)
    adapter = {}
    for m, s in zip(modules, scales):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise WireError(f"{m}: scale {s!r} is not a positive number")
        tensors = {}
        for f in ("a", "b"):
            value = arrays[key(m, f)]
            if not isinstance(value, np.ndarray) or value.dtype != wire_dtype or value.ndim != 2:
                got = f"{value.dtype} array of {value.ndim} dimensions" if isinstance(value, np.ndarray) else type(value).__name__
                raise WireError(f"{m}.{f}: {got}, expected a 2-D {wire_dtype} array")
            tensors[f] = torch.from_numpy(np.array(value, copy=True)).to(target)
        try:
            adapter[m] = Factors(b=tensors["b"], a=tensors["a"], scale=float(s))
        except ValueError as err:
            raise WireError(f"{m}: {err}") from None
    return adapter


# ----------------------------------------------------------------------------- NumPy <-> npy bytes <-> Flower


def npy_bytes(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - anything malformed is just a bad array
        raise WireError(f"not a NumPy array ({type(err).__name__}: {err})") from None


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def record_to_blobs(record: ArrayRecord) -> dict[str, bytes]:
    """The npy bytes of each Array, as received (nothing is loaded)."""
    out = {}
    for k, arr in record.items():
        if arr.stype != NPY:
            raise WireError(f"{k}: serialisation {arr.stype!r}, expected {NPY}")
        out[k] = bytes(arr.data)
    return out


def blobs_to_record(blobs: Mapping[str, bytes]) -> ArrayRecord:
    """An ArrayRecord of npy byte strings (each checked to load as a plain array)."""
    from flwr.app import Array, ArrayRecord

    record = {}
    for k, data in blobs.items():
        value = npy_load(data)
        record[k] = Array(dtype=str(value.dtype), shape=tuple(int(n) for n in value.shape), stype=NPY, data=bytes(data))
    return ArrayRecord(record)


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: npy_load(v) for k, v in record_to_blobs(record).items()}


def encode_adapter(adapter: Mapping[str, Factors]) -> tuple[ArrayRecord, dict]:
    arrays, meta = encode_arrays(adapter)
    return to_record(arrays), meta


def decode_adapter(record: ArrayRecord, modules: Sequence[str], scales: Sequence[float], dtype: str) -> Adapter:
    return decode_arrays(from_record(record), modules, scales, dtype)


# ----------------------------------------------------------------------------- sizes


def array_bytes(adapter: Mapping[str, Factors]) -> int:
    """Raw bytes of the factors as they travel (bfloat16 counted as the float32 it is sent as)."""
    total = 0
    for f in adapter.values():
        size = np.dtype(WIRE_DTYPES[_dtype_name(f.a)]).itemsize
        total += (f.a.numel() + f.b.numel()) * size
    return total


def object_bytes(obj) -> int:
    """Bytes of a Flower object (Message, RecordDict, ...) as Flower serialises it: every object
    of its tree, deflated, once."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())


def message_bytes(message: Message) -> int:
    """Bytes of ``message`` on the wire as Flower serialises it.

    This is what a SuperLink and a SuperNode exchange for the message (object bodies and
    headers), short of HTTP and TLS framing. Identical array chunks inside one message are
    sent once, as Flower does (all-zero B factors of the same shape, for instance).
    """
    return object_bytes(message)
