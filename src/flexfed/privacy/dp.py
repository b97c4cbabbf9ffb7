"""Clipping and Gaussian noise of DP-FedAvg over a method's updates (pure tensor functions)."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from flexfed.aggregation.space import Space, move_update, update_norm
from flexfed.lora import Adapter, Factors


def clip(space: Space, parts: tuple[str, ...], start: Mapping[str, Factors], update: Mapping[str, Factors], clip_norm: float, ref_scales=None) -> tuple[Adapter, float]:
    """The update clipped to ``clip_norm`` about its start, and its norm before clipping.

    An update within the bound is returned untouched (not multiplied by 1), so a huge bound
    changes nothing, bit for bit.
    """
    norm = update_norm(space, parts, start, update, ref_scales)
    if norm <= clip_norm:
        return dict(update), norm
    return move_update(space, parts, start, update, clip_norm / norm), norm


def noise_std(noise_multiplier: float, clip_norm: float, p: Sequence[float]) -> float:
    """σ S max_i p_i: one client moves Σ p_i x_i by at most p_i S (uniform weights: σ S / m)."""
    return noise_multiplier * clip_norm * max(p)


def add_noise(parts: tuple[str, ...], aggregate: Mapping[str, Factors], std: float, generator: torch.Generator, frames: Mapping[str, Factors] | None = None) -> Adapter:
    """N(0, std²) on every trained coordinate of the aggregate (the global's factors).

    ``parts`` as in the method's ``trainable``: ("a", "b") noises both factors, ("b",) only B
    (FFA-LoRA's A is frozen and shared), ("r",) the core R of Fed-SB's a = R A: the noise
    Z A with Z (r x r) drawn in R's space and ``frames[name].a`` the method's fixed A.
    """
    out = {}
    for name in sorted(aggregate):
        f = aggregate[name]
        b, a = f.b, f.a
        if "b" in parts:
            b = b + std * torch.randn(b.shape, generator=generator, dtype=torch.float64).to(b.dtype)
        if "a" in parts:
            a = a + std * torch.randn(a.shape, generator=generator, dtype=torch.float64).to(a.dtype)
        if "r" in parts:
            frame = frames[name].a
            z = std * torch.randn(f.rank, f.rank, generator=generator, dtype=torch.float64)
            a = a + (z @ frame.double()).to(a.dtype)
        out[name] = Factors(b=b, a=a, scale=f.scale)
    return out


def noisy_product(updates: Sequence[Mapping[str, Factors]], p: Sequence[float], std: float, generator: torch.Generator) -> Adapter:
    """Σ_i p_i s_i B_i A_i + N(0, std²) per module, as factors (dense sum, identity A, scale 1)
    that a product-space method (FlexLoRA) aggregates as one update with weight 1.

    The noise must go on the sum of products, before FlexLoRA's SVD: the singular vectors are not
    a function of bounded sensitivity, the sum is. The sum is dense (d x k) as in FlexLoRA's own
    dense path; only the clipping avoids forming each client's product.
    """
    from flexfed.aggregation.flexlora import sum_updates

    out = {}
    for name in sorted(updates[0]):
        w = sum_updates([[u[name] for u in updates]], p, torch.float64)[0]
        w += std * torch.randn(w.shape, generator=generator, dtype=torch.float64)
        dtype = updates[0][name].b.dtype
        out[name] = Factors(b=w.to(dtype), a=torch.eye(w.shape[1], dtype=dtype), scale=1.0)
    return out
