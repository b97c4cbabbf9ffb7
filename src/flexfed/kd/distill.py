"""The arithmetic of KD-FedLLM: encodings of a distribution, their mixture, the distillation loss.

Pure functions over tensors (no model, no I/O). A *distribution* is one probability vector over
the vocabulary per scored position of the proxy set (P positions x V tokens), the softmax of a
model's logits at temperature T. What travels is one of three encodings of it (``Encoding``):

- ``full``: the P x V probabilities (the logits up to a constant per position): P·V·4 bytes.
- ``top-k``: per position the k largest probabilities (``values``), their token ids
  (``indices``) and the mass outside them as one number (``rest``): P·(k·(4 + 4) + 4) bytes.
  The ids travel as float32 because a payload has one dtype on the wire; float32 holds every
  integer below 2^24 exactly (a vocabulary is far smaller) in the 4 bytes an int32 would take.
- ``labels``: the probabilities of a fixed set of L label tokens every party knows, and the
  rest: P·(L + 1)·4 bytes.

``dense`` turns an encoding back into a P x V distribution: the mass a client did not send is
spread evenly over the tokens it did not send (the maximum-entropy completion; none are left when
k = V). ``mixture`` is the data-size-weighted mean of the clients' dense distributions, so a token
in any client's top-k gets every client's mass for it, from the clients that did not send it
their share of the rest: the union of the supports, counted once each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

ENCODINGS = ("full", "top-k", "labels")
VALUE_BYTES = 4  # float32, for probabilities and for token ids alike
INDEX_LIMIT = 1 << 24  # float32 holds every integer below this exactly
MASS_TOLERANCE = 1e-3  # how far a sent distribution's mass may stray from 1 (float32 sums of 49k terms)


def probabilities(logits: Tensor, temperature: float) -> Tensor:
    """softmax(z / T) over the last dimension, in float32."""
    return torch.softmax(logits.float() / temperature, dim=-1)


@dataclass(frozen=True)
class Encoding:
    """How a distribution travels; ``labels`` are token ids (encoding ``labels`` only)."""

    kind: str
    vocab: int
    k: int = 0
    labels: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in ENCODINGS:
            raise ValueError(f"unknown encoding {self.kind!r}; one of {ENCODINGS}")
        if self.vocab >= INDEX_LIMIT:
            raise ValueError(f"a vocabulary of {self.vocab} tokens cannot be indexed exactly in float32")
        if self.kind == "top-k" and not 1 <= self.k <= self.vocab:
            raise ValueError(f"kd.k={self.k} is out of range: it must be between 1 and the vocabulary size {self.vocab}")
        if self.kind == "labels":
            if not self.labels or len(set(self.labels)) != len(self.labels):
                raise ValueError(f"the label tokens {list(self.labels)} must be distinct and at least one")
            if not all(0 <= t < self.vocab for t in self.labels):
                raise ValueError(f"label token ids {list(self.labels)} must lie in [0, {self.vocab})")

    # ------------------------------------------------------------------ sizes

    def kept(self) -> int:
        """Tokens whose probability is sent per position."""
        return {"full": self.vocab, "top-k": self.k, "labels": len(self.labels)}[self.kind]

    def nbytes(self, positions: int) -> int:
        """Bytes of the encoding of ``positions`` positions (the formula the tests check)."""
        if self.kind == "full":
            return positions * self.vocab * VALUE_BYTES
        if self.kind == "top-k":
            return positions * (self.k * (VALUE_BYTES + VALUE_BYTES) + VALUE_BYTES)
        return positions * (len(self.labels) + 1) * VALUE_BYTES

    # ------------------------------------------------------------------ encode, decode

    def encode(self, probs: Tensor) -> dict[str, Tensor]:
        """The payload of a P x V distribution (rows sum to 1)."""
        probs = probs.float()
        if self.kind == "full":
            return {"probs": probs.contiguous()}
        if self.kind == "top-k":
            values, indices = probs.topk(self.k, dim=-1)
        else:
            indices = torch.tensor(self.labels, device=probs.device).expand(probs.shape[0], -1)
            values = probs.gather(1, indices)
        rest = (1 - values.sum(dim=-1, keepdim=True)).clamp_min(0)
        out = {"values": values.contiguous(), "rest": rest}
        if self.kind == "top-k":
            out["indices"] = indices.float()
        return out

    def dense(self, payload: Mapping[str, Tensor]) -> Tensor:
        """The P x V distribution a payload stands for (see the module docstring)."""
        if self.kind == "full":
            return payload["probs"].float()
        values = payload["values"].float()
        positions = values.shape[0]
        if self.kind == "top-k":
            indices = payload["indices"].long()
        else:
            indices = torch.tensor(self.labels, device=values.device).expand(positions, -1)
        outside = self.vocab - values.shape[1]
        out = values.new_zeros(positions, self.vocab)
        if outside:
            out += payload["rest"].float().clamp_min(0) / outside
        return out.scatter_(1, indices, values)

    def check(self, payload: Mapping[str, Tensor], positions: int) -> None:
        """``ValueError`` unless ``payload`` is this encoding of ``positions`` distributions."""
        expected = {"full": {"probs"}, "top-k": {"values", "indices", "rest"}, "labels": {"values", "rest"}}[self.kind]
        if set(payload) != expected:
            raise ValueError(f"{self.kind} payload holds {sorted(payload)}, expected {sorted(expected)}")
        width = self.kept()
        shapes = {"probs": (positions, width), "values": (positions, width), "indices": (positions, width), "rest": (positions, 1)}
        for name, t in payload.items():
            if tuple(t.shape) != shapes[name] or not t.is_floating_point() or not torch.isfinite(t).all():
                raise ValueError(f"{name} has shape {tuple(t.shape)} ({t.dtype}), expected {shapes[name]} finite floats")
        values = payload.get("probs", payload.get("values"))
        if values.min() < 0 or values.max() > 1:
            raise ValueError("probabilities outside [0, 1]")
        mass = values.double().sum(dim=-1) + (payload["rest"].double().squeeze(1) if "rest" in payload else 0)
        if (mass - 1).abs().max() > MASS_TOLERANCE:
            raise ValueError(f"a position's probabilities sum to {float(mass[(mass - 1).abs().argmax()]):.6g}, not 1")
        if "indices" in payload:
            ids = payload["indices"]
            if not torch.equal(ids, ids.round()) or ids.min() < 0 or ids.max() >= self.vocab:
                raise ValueError(f"token ids that are not integers in [0, {self.vocab})")
            ordered = ids.long().sort(dim=-1).values
            if (ordered[:, 1:] == ordered[:, :-1]).any():
                raise ValueError("a position names one token twice")


def mixture(payloads: Iterable[Mapping[str, Tensor]], weights: Sequence[float], encoding: Encoding) -> Tensor:
    """Σ_i w_i dense(payload_i) / Σ_i w_i: the clients' distributions weighted by data size,
    densified one client at a time."""
    weights = [float(w) for w in weights]
    total = sum(weights)
    if not weights or total <= 0 or min(weights) < 0:
        raise ValueError(f"weights {weights} must be non-negative and not all zero")
    out = None
    for payload, w in zip(payloads, weights, strict=True):
        term = encoding.dense(payload) * (w / total)
        out = term if out is None else out + term
    return out


def kl_per_position(target: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """KL(target ‖ softmax(logits / T)) at each position (0·log 0 = 0)."""
    log_q = F.log_softmax(logits.float() / temperature, dim=-1)
    return F.kl_div(log_q, target.float(), reduction="none").sum(dim=-1)


def distillation_loss(target: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """T² · mean KL(target ‖ softmax(logits / T)): Hinton et al.'s scaling keeps the gradient's
    size independent of T."""
    return temperature**2 * kl_per_position(target, logits, temperature).mean()
