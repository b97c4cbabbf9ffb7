"""FedIT: the weighted average of A and of B separately, for clients that share one rank."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from flexfed.aggregation.base import Aggregator, Scale, check_same_modules, normalized_weights
from flexfed.lora import Adapter, Factors


def fedit_average(factors: Sequence[Factors], p: Sequence[float]) -> Factors:
    """B = sum p_i B_i, A = sum p_i A_i (not the average of the products: that is the point)."""
    ranks = {f.rank for f in factors}
    if len(ranks) != 1:
        raise ValueError(f"fedit needs every client at the same rank, got ranks {sorted(ranks)}; use flexlora or hetlora")
    b = sum(pi * f.b.double() for pi, f in zip(p, factors))
    a = sum(pi * f.a.double() for pi, f in zip(p, factors))
    first = factors[0]
    return Factors(b=b.to(first.b.dtype), a=a.to(first.a.dtype), scale=first.scale)


class FedIT(Aggregator):
    name = "fedit"

    def aggregate(self, updates, weights, max_ranks, scale) -> Adapter:
        p = normalized_weights(weights)
        return {n: fedit_average([u[n] for u in updates], p) for n in check_same_modules(updates)}
