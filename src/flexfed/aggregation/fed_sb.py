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

Frames: a departure from the paper, stated. LoRA-SB derives B and A from the SVD of a first full
fine-tuning gradient, so that B R A starts in the subspace that matters most. Federated, that
gradient lives on the clients: using it would take d x k numbers of traffic (or one client's
data deciding the frames for everyone). flexfed does not implement that initialisation. It
draws *seeded orthonormal frames* (``seeded_frames``) from the run seed, the module name and the
rank: every party builds the same B and A with no traffic and no data, and only R ever crosses
the wire (r² numbers per matrix each way). The price is a frame that is not adapted to the
task, so R starts from a random r-dimensional subspace; the round-0 core is R = 0 (ΔW = 0, like
PEFT's B = 0), whose gradient s Bᵀ G Aᵀ is not zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexfed.aggregation.base import SharedFactorAggregator, payload_key, payload_parts, seeded_generator
from flexfed.lora import Adapter, Factors


def sb_factors(b: Tensor, core: Tensor, a: Tensor, scale: float) -> Factors:
    """A LoRA-SB adapter s B R A as ``Factors(b=B, a=R @ A)``."""
    if core.shape != (b.shape[1], a.shape[0]):
        raise ValueError(f"core {tuple(core.shape)} does not fit B {tuple(b.shape)} and A {tuple(a.shape)}")
    return Factors(b=b, a=core @ a, scale=scale)


def sb_core(f: Factors, a: Tensor) -> Tensor:
    """R from ``Factors(b=B, a=R @ A)`` given the fixed A (full row rank): R = (R A) A⁺, in float64."""
    return core_of(f.a, a)


def core_of(weight: Tensor, a: Tensor) -> Tensor:
    """The R with R @ a = ``weight`` (least squares; exact up to rounding when a has full row rank)."""
    return torch.linalg.lstsq(a.double().mT, weight.double().mT).solution.mT.to(weight.dtype)


def seeded_frames(seed: int, name: str, shape: tuple[int, int], rank: int) -> tuple[Tensor, Tensor]:
    """Orthonormal frames B (d_out x r, orthonormal columns) and A (r x d_in, orthonormal rows),
    from the run seed, module name and rank: the same on every machine (see the module docstring)."""
    d_out, d_in = shape
    generator = seeded_generator(seed, name, rank, "fed-sb")
    b = torch.linalg.qr(torch.randn(d_out, rank, generator=generator, dtype=torch.float64))[0]
    a = torch.linalg.qr(torch.randn(d_in, rank, generator=generator, dtype=torch.float64))[0].mT
    return b.float().contiguous(), a.float().contiguous()


class FedSB(SharedFactorAggregator):
    name = "fed-sb"
    frozen = "b"
    trainable = ("r",)

    def common(self, name, shape, rank, scale, seed) -> Factors:
        """The two frames as one ``Factors(b=B, a=A)`` (the LoRA-SB adapter with R = I)."""
        b, a = seeded_frames(seed, name, shape, rank)
        return Factors(b=b, a=a, scale=scale)

    def initial(self, peft_init, common) -> Adapter:
        return {n: sb_factors(f.b, torch.zeros(f.rank, f.rank), f.a, f.scale) for n, f in common.items()}

    def encode(self, adapter, common):
        return {payload_key(n, "r"): sb_core(f, common[n].a) for n, f in adapter.items()}

    def decode(self, payload, modules, common, scale) -> Adapter:
        parts = payload_parts(payload, modules, ("r",))
        return {m: sb_factors(common[m].b, t["r"].to(common[m].a.dtype), common[m].a, common[m].scale) for m, t in parts.items()}
