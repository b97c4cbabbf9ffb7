"""Fed-SB (Singhal et al., 2025, arXiv 2502.15436): federated LoRA-SB, average only an r x r core.

LoRA-SB (Ponkshe et al., 2024, arXiv 2411.19557) adapts W + s B R A with B (d x r) and A (r x k)
fixed after initialization and only R (r x r) trained. With B and A common to all clients,
sum_i p_i s B R_i A = s B (sum_i p_i R_i) A: averaging R is the exact average of the updates, and
a client sends r² numbers per matrix.

Representation. flexfed's adapters are ``Factors(b, a, scale)`` so that every method shares the
server loop, PEFT files and byte accounting code. A Fed-SB update is carried with the core folded
into A: ``Factors(b=B, a=R @ A)`` (``sb_factors``). This is also what a PEFT LoRA layer holds if
its ``lora_A`` weight is parametrized as R @ A with A a buffer, so ``lora.get_adapter`` reads it
without special cases. Averaging the ``a`` of clients that share ``b`` bit for bit is then
exactly averaging R (``sum_i p_i R_i A = R̄ A``); the aggregator checks that B is shared. The core
itself, e.g. for sending r² numbers, is recovered with ``sb_core``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexfed.aggregation.base import Aggregator, average_with_frozen, validate
from flexfed.lora import Adapter, Factors


def sb_factors(b: Tensor, core: Tensor, a: Tensor, scale: float) -> Factors:
    """A LoRA-SB adapter s B R A as ``Factors(b=B, a=R @ A)``."""
    if core.shape != (b.shape[1], a.shape[0]):
        raise ValueError(f"core {tuple(core.shape)} does not fit B {tuple(b.shape)} and A {tuple(a.shape)}")
    return Factors(b=b, a=core @ a, scale=scale)


def sb_core(f: Factors, a: Tensor) -> Tensor:
    """R from ``Factors(b=B, a=R @ A)`` given the fixed A (full row rank): R = (R A) A⁺."""
    work = torch.promote_types(f.a.dtype, torch.float32)
    return torch.linalg.lstsq(a.to(work).mT, f.a.to(work).mT).solution.mT.to(f.a.dtype)


def sb_frames(gradient: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Fixed frames B = U_r, A = V_rᵀ from the top singular vectors of a first-step gradient.

    LoRA-SB initializes its frames so that B R A spans the best rank-r approximation of the
    first full fine-tuning update; the core R is then trained from there (zero is a valid start:
    with orthonormal B and A its gradient Bᵀ G Aᵀ is not zero).
    """
    u, _, vh = torch.linalg.svd(gradient.to(torch.promote_types(gradient.dtype, torch.float32)), full_matrices=False)
    return u[:, :rank].contiguous(), vh[:rank].contiguous()


class FedSB(Aggregator):
    name = "fed-sb"
    mixed_ranks = False
    trainable = ("r",)

    def aggregate(self, updates, weights, max_ranks, scale) -> Adapter:
        names, p = validate(updates, weights)
        return {n: average_with_frozen([u[n] for u in updates], p, frozen="b", method=self.name) for n in names}
