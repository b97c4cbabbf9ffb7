"""FedIT: the weighted average of A and of B separately, for clients that share one rank."""

from __future__ import annotations

from typing import Sequence

from flexfed.aggregation.base import Aggregator, require_common_rank, validate
from flexfed.lora import Adapter, Factors


def fedit_average(factors: Sequence[Factors], p: Sequence[float]) -> Factors:
    """B = sum p_i B_i, A = sum p_i A_i (not the average of the products: that is the point)."""
    require_common_rank(factors, "fedit")
    b = sum(pi * f.b.double() for pi, f in zip(p, factors))
    a = sum(pi * f.a.double() for pi, f in zip(p, factors))
    first = factors[0]
    return Factors(b=b.to(first.b.dtype), a=a.to(first.a.dtype), scale=first.scale)


class FedIT(Aggregator):
    name = "fedit"
    mixed_ranks = False
    secure_mean = "payload"  # linear in A and B

    def aggregate(self, updates, weights, max_ranks, scale, previous=None) -> Adapter:
        names, p = validate(updates, weights)
        return {n: fedit_average([u[n] for u in updates], p) for n in names}
