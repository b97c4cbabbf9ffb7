"""A client's update in the space its method aggregates: how large it is, and the update moved
along itself about the start it was trained from (shrunk, scaled, reversed).

Privacy's clipping, the server's norm bound and the simulated attacks all measure and move an
update here, so they agree on what "the update" is:

- ``factors``: methods whose server averages factors (FedIT, FFA-LoRA, Fed-SB, HetLoRA). The
  update is the change of the factors the client trains, δ = x_i − x_start: (A, B) for FedIT and
  HetLoRA, B for FFA-LoRA (A is frozen), the core R for Fed-SB, carried in a = R A with A's rows
  orthonormal so that ‖δa‖_F = ‖δR‖_F. HetLoRA's server folds s(r_i)/s(g) into B before summing,
  so B's change is measured with that factor (``ref_scales``: the global's scale per module).
- ``product``: methods whose server sums the products s B A (FlexLoRA). The update is
  ΔW_i = s_i B_i A_i − s_0 B_0 A_0, measured from r x r Gram matrices of the stacked factors
  [s_i B_i, −s_0 B_0] and [A_i; A_0], never as a dense d x k matrix; moved updates are carried as
  the rank r_i + r_0 factors [c s_i B_i, (1 − c) s_0 B_0], [A_i; A_0] at scale 1, whose product
  is ΔW_0 + c (ΔW_i − ΔW_0).

Pure functions over tensors: no server, no config.
"""

from __future__ import annotations

import math
from typing import Literal, Mapping

import torch

from flexfed.lora import Adapter, Factors, product_norm

Space = Literal["factors", "product"]

# method -> the space its server aggregates in; methods absent here are not covered
SPACES: dict[str, Space] = {"fedit": "factors", "ffa-lora": "factors", "fed-sb": "factors", "hetlora": "factors", "flexlora": "product"}


def moved_parts(trainable: tuple[str, ...]) -> tuple[str, ...]:
    """The factors a client changes: Fed-SB's trained core R lives in ``a`` (= R A)."""
    return tuple("a" if p == "r" else p for p in trainable)


def update_norm(space: Space, parts: tuple[str, ...], start: Mapping[str, Factors], update: Mapping[str, Factors], ref_scales: Mapping[str, float] | None = None) -> float:
    """‖update − start‖ over every module, in the method's space (see the module docstring)."""
    total = 0.0
    for name, f in update.items():
        s0 = start[name]
        if space == "product":
            b = torch.cat([f.b.double() * f.scale, s0.b.double() * -s0.scale], dim=1)
            a = torch.cat([f.a.double(), s0.a.double()], dim=0)
            total += float(product_norm(b, a)) ** 2
            continue
        ratio = f.scale / ref_scales[name] if ref_scales else 1.0
        if "b" in parts:
            total += float(((f.b.double() - s0.b.double()) * ratio).square().sum())
        if "a" in parts:
            total += float((f.a.double() - s0.a.double()).square().sum())
    return math.sqrt(total)


def move_update(space: Space, parts: tuple[str, ...], start: Mapping[str, Factors], update: Mapping[str, Factors], c: float) -> Adapter:
    """start + c (update − start) in the method's space; c = 1 returns ``update`` itself."""
    if c == 1:
        return dict(update)
    out = {}
    for name, f in update.items():
        s0 = start[name]
        if space == "product":
            b = torch.cat([f.b * (c * f.scale), s0.b.to(f.b.dtype) * ((1 - c) * s0.scale)], dim=1)
            out[name] = Factors(b=b, a=torch.cat([f.a, s0.a.to(f.a.dtype)], dim=0), scale=1.0)
            continue
        b = s0.b + c * (f.b - s0.b) if "b" in parts else f.b
        a = s0.a + c * (f.a - s0.a) if "a" in parts else f.a
        out[name] = Factors(b=b.to(f.b.dtype), a=a.to(f.a.dtype), scale=f.scale)
    return out


def replace_update(parts: tuple[str, ...], start: Mapping[str, Factors], directions: Mapping[str, Mapping[str, torch.Tensor]], norm: float) -> Adapter:
    """start + δ with δ along ``directions`` (module -> part -> tensor) scaled to factor-space ``norm``."""
    size = math.sqrt(sum(float(t.double().square().sum()) for d in directions.values() for t in d.values()))
    c = norm / size if size > 0 else 0.0
    out = {}
    for name, s0 in start.items():
        d = directions[name]
        b = s0.b + c * d["b"] if "b" in parts else s0.b
        a = s0.a + c * d["a"] if "a" in parts else s0.a
        out[name] = Factors(b=b.to(s0.b.dtype), a=a.to(s0.a.dtype), scale=s0.scale)
    return out
