"""LoRA-FAIR (Bian et al., 2025, arXiv 2411.14961): refine the averaged B on the server.

FedIT's B̄ Ā (B̄ = sum p_i B_i, Ā = sum p_i A_i) is not the average of the products
dW = sum_i p_i s_i B_i A_i. LoRA-FAIR keeps Ā (clients share it as their next initialization)
and corrects B so that s B' Ā matches dW as well as possible in Frobenius norm:

    B' = argmin_B ‖s B Ā − dW‖_F² + λ s² ‖B − B̄‖_F²
       = (dW Āᵀ / s + λ B̄) (Ā Āᵀ + λ I)⁻¹

The paper adds a regularizer keeping the correction small; here it is the ridge λ =
``ridge`` · tr(Ā Āᵀ) / r (scale-free), and ``ridge = 0`` gives the plain least-squares solution
B' = (dW Āᵀ / s)(Ā Āᵀ)⁺ — the best any B can do with this Ā. dW Āᵀ = sum_i p_i s_i B_i (A_i Āᵀ)
is computed from the factors (d x r), never forming dW. Clients start the next round from
(B', Ā). Like FedIT it needs one common rank.
"""

from __future__ import annotations

from typing import Sequence

import torch

from flexfed.aggregation.base import Aggregator, require_common_rank, validate
from flexfed.lora import Adapter, Factors


def lora_fair_refine(factors: Sequence[Factors], p: Sequence[float], ridge: float = 0.0) -> Factors:
    """(B', Ā) at the first client's scale; see the module docstring."""
    rank = require_common_rank(factors, "lora-fair")
    first = factors[0]
    a_bar = sum(pi * f.a.double() for pi, f in zip(p, factors))
    b_bar = sum(pi * f.b.double() for pi, f in zip(p, factors))
    target = sum((pi * f.scale) * (f.b.double() @ (f.a.double() @ a_bar.mT)) for pi, f in zip(p, factors)) / first.scale
    gram = a_bar @ a_bar.mT
    if ridge > 0:
        lam = ridge * float(gram.diagonal().sum()) / rank
        b = torch.linalg.solve(
            gram + lam * torch.eye(rank, dtype=gram.dtype, device=gram.device), (target + lam * b_bar).mT
        ).mT
    else:
        b = target @ torch.linalg.pinv(gram, hermitian=True)
    return Factors(b=b.to(first.b.dtype), a=a_bar.to(first.a.dtype), scale=first.scale)


class LoRAFAIR(Aggregator):
    """LoRA-FAIR. Option: ``ridge`` (relative regularization towards B̄; 0 = least squares)."""

    name = "lora-fair"
    mixed_ranks = False

    def __init__(self, ridge: float = 0.0):
        if ridge < 0:
            raise ValueError(f"lora-fair: ridge must be >= 0, got {ridge}")
        self.ridge = ridge

    def aggregate(self, updates, weights, max_ranks, scale, previous=None) -> Adapter:
        names, p = validate(updates, weights)
        return {n: lora_fair_refine([u[n] for u in updates], p, self.ridge) for n in names}
