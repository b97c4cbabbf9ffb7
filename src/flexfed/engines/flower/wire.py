"""Payloads on the wire: a method's tensors in and out of NumPy arrays and Flower ``ArrayRecord``s, and their size.

What a method sends is its ``Payload`` (``Aggregator.encode``: name -> tensor, e.g. both LoRA
factors, FFA-LoRA's B alone, Fed-SB's r x r core). Every tensor travels as one NumPy array
serialised with ``np.save(..., allow_pickle=False)`` (what Flower's ``Array`` does); nothing is
ever unpickled. NumPy has no bfloat16, so bfloat16 tensors travel as float32, which holds every
bfloat16 value exactly, and are cast back.

Decoding here is strict about the form (2-D arrays of the announced dtype); whether the names
and shapes make an adapter is ``Aggregator.decode``'s job, and whether that adapter suits the
client is ``Server.check_update``'s, which every decoded update goes through.

``torch`` is imported only where tensors are made, so a relaying ClientApp never loads it.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Mapping

import numpy as np

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, Message
    from torch import Tensor

# dtype of the tensors -> dtype of their arrays on the wire (integers: a split step's mask and labels)
WIRE_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "float32", "float64": "float64", "int64": "int64", "uint8": "uint8"}
MIXED = "mixed"  # the announced dtype of a payload whose tensors differ; ``dtypes`` then names each
NPY = "numpy.ndarray"  # Flower's stype for np.save'd arrays


class WireError(ValueError):
    """Arrays that are not a well-formed payload."""


# ----------------------------------------------------------------------------- payload <-> NumPy


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def encode_payload(payload: Mapping[str, Tensor]) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta): one array per tensor, and the dtype to announce beside them (``mixed``, with
    ``dtypes`` naming each tensor's as ``key=dtype,...``, when they differ)."""
    import torch

    names = {k: _dtype_name(t) for k, t in payload.items()}
    for dtype in set(names.values()):
        if dtype not in WIRE_DTYPES:
            raise WireError(f"cannot send {dtype} tensors")
    arrays = {k: payload[k].detach().to("cpu", getattr(torch, WIRE_DTYPES[names[k]])).contiguous().numpy() for k in sorted(payload)}
    if len(set(names.values())) > 1:
        return arrays, {"dtype": MIXED, "dtypes": ",".join(f"{k}={names[k]}" for k in sorted(names))}
    return arrays, {"dtype": names.popitem()[1] if names else "float32"}


def decode_payload(arrays: Mapping[str, np.ndarray], dtype: str, dtypes: str | None = None) -> dict[str, Tensor]:
    """The tensors in ``arrays``; raises ``WireError`` unless each is a 2-D array of the announced
    dtype (``dtype``, or with ``mixed`` each key's in ``dtypes``)."""
    import torch

    if dtype == MIXED:
        pairs = [item.rpartition("=") for item in str(dtypes or "").split(",") if item]
        each = {k: d for k, _, d in pairs}
        if set(each) != set(arrays):
            raise WireError(f"dtypes names {sorted(each)}, the arrays are {sorted(arrays)}")
    else:
        each = dict.fromkeys(arrays, dtype)
    out = {}
    for k, value in arrays.items():
        if each[k] not in WIRE_DTYPES:
            raise WireError(f"tensors of dtype {each[k]!r} are not accepted")
        wire_dtype = np.dtype(WIRE_DTYPES[each[k]])
        if not isinstance(value, np.ndarray) or value.dtype != wire_dtype or value.ndim != 2:
            got = f"{value.dtype} array of {value.ndim} dimensions" if isinstance(value, np.ndarray) else type(value).__name__
            raise WireError(f"{k}: {got}, expected a 2-D {wire_dtype} array")
        out[k] = torch.from_numpy(np.array(value, copy=True)).to(getattr(torch, each[k]))
    return out


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


# ----------------------------------------------------------------------------- sizes


def array_bytes(payload: Mapping[str, Tensor]) -> int:
    """Raw bytes of the tensors as they travel (bfloat16 counted as the float32 it is sent as)."""
    return sum(t.numel() * np.dtype(WIRE_DTYPES[_dtype_name(t)]).itemsize for t in payload.values())


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
