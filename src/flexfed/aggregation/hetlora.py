"""HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432): zero-pad heterogeneous ranks and average.

Client i (rank r_i) is zero-padded to the global rank g = max(max_ranks[name], r_i) and A and B
are averaged position by position, optionally weighting client i by the Frobenius norm of its
update (the paper's "sparsity-weighted" aggregation, which favours clients whose adapters carry
more). A client of rank r starts the next round from the first r components of the global.

Scales: client i's product is s(r_i) B_i A_i, but the global adapter is used at scale s(g).
Before padding, s(r_i)/s(g) is folded into B_i, so a single client comes back unchanged and
every client's contribution to the product keeps its true size (averaging raw factors would
inflate low-rank clients' share by r_max/r_i under alpha/r). On the way down, ``truncate`` moves
s(g)/s(r) back into B: the client's s(r) B A equals the global's first r components exactly.
HetLoRA relies on its clients' rank self-pruning to put the important directions first; the
truncation is a prefix, not a best rank-r approximation (that is FlexLoRA).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from flexfed.aggregation.base import Aggregator, Scale, validate
from flexfed.lora import Adapter, Factors


def _update_norm(f: Factors) -> float:
    """‖s B A‖_F from the r x r Gram matrices: tr((BᵀB)(AAᵀ)) = ‖BA‖_F², no d x k product."""
    b, a = f.b.double(), f.a.double()
    return abs(f.scale) * float(((b.mT @ b) * (a @ a.mT)).sum().clamp_min(0).sqrt())


def _pad(t: Tensor, size: int, dim: int) -> Tensor:
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def hetlora_average(
    factors: Sequence[Factors], p: Sequence[float], rank: int, scale: Scale, norm_weighted: bool = False
) -> Factors:
    """Zero-pad every client to rank ``max(rank, r_i)`` at scale s(that rank) and average."""
    g = max(rank, *(f.rank for f in factors))
    target = scale(g)
    weights = list(p)
    if norm_weighted:
        norms = [pi * _update_norm(f) for pi, f in zip(p, factors)]
        if sum(norms) > 0:  # all-zero updates (e.g. B = 0 before training): plain p_i
            weights = [n / sum(norms) for n in norms]
    b = sum(w * _pad(f.b.double() * (f.scale / target), g, 1) for w, f in zip(weights, factors))
    a = sum(w * _pad(f.a.double(), g, 0) for w, f in zip(weights, factors))
    first = factors[0]
    return Factors(b=b.to(first.b.dtype), a=a.to(first.a.dtype), scale=target)


class HetLoRA(Aggregator):
    """HetLoRA. Option: ``norm_weighted`` (weight clients by p_i ‖s_i B_i A_i‖_F)."""

    name = "hetlora"

    def __init__(self, norm_weighted: bool = False):
        self.norm_weighted = norm_weighted

    def aggregate(self, updates, weights, max_ranks, scale) -> Adapter:
        names, p = validate(updates, weights)
        return {
            n: hetlora_average([u[n] for u in updates], p, max_ranks.get(n, 1), scale, self.norm_weighted)
            for n in names
        }
