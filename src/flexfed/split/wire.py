"""What crosses the cut: activations and their gradients, in the model's dtype or compressed.

``split.wire_dtype``: ``model`` sends the tensors as computed (fp32 for an fp32 model: the
residual stream stays fp32 under autocast too); ``bfloat16`` / ``float16`` halve the bytes, and
the receiver computes on in the model's dtype from the rounded values. Received tensors are
checked (shape, dtype kind, finiteness) before they touch a model: a malformed one fails that
client alone.
"""

from __future__ import annotations

import math

import torch

WIRE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def send(t: torch.Tensor, wire_dtype: str) -> torch.Tensor:
    """``t`` (rows x tokens x hidden) as it goes on the wire: detached, on the CPU, in the wire's
    dtype, as a (rows·tokens) x hidden matrix (every engine's wire carries matrices)."""
    t = t.detach()
    if wire_dtype != "model":
        t = t.to(WIRE_DTYPES[wire_dtype])
    return t.reshape(-1, t.shape[-1]).cpu().contiguous()


def received(t: torch.Tensor, shape: tuple[int, ...], what: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The rows x tokens x hidden tensor ``shape`` from the other side's matrix: floating, finite,
    in ``dtype`` on ``device``."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{what}: expected a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    flat = (math.prod(shape[:-1]), shape[-1])
    if tuple(t.shape) != flat:
        raise ValueError(f"{what}: shape {tuple(t.shape)}, expected {flat} (rows·tokens x hidden)")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what}: non-finite values")
    return t.to(device=device, dtype=dtype).reshape(shape)


def batch_received(arrays, vocab: int, device: torch.device, with_labels: bool) -> dict[str, torch.Tensor]:
    """The attention mask (and labels) sent with a batch's activations, checked; ``hidden``'s shape follows them."""
    mask = arrays.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.dtype != torch.uint8 or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask: expected a rows x tokens uint8 tensor of 0/1")
    out = {"attention_mask": mask.to(device=device, dtype=torch.long)}
    if with_labels:
        labels = arrays.get("labels")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != mask.shape:
            raise ValueError(f"labels: expected an int64 tensor of the mask's shape {tuple(mask.shape)}")
        from flexfed.data.prompts import IGNORE_INDEX

        if not bool(((labels == IGNORE_INDEX) | ((labels >= 0) & (labels < vocab))).all()):
            raise ValueError(f"labels: values outside the vocabulary (0..{vocab - 1}) and the ignore index {IGNORE_INDEX}")
        out["labels"] = labels.to(device)
    return out
