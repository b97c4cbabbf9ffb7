"""SLoRA's first stage (Babakniya et al., 2023, arXiv 2308.06522): sparse fine-tuning, then LoRA from its SVD.

For the first rounds of a run, clients fine-tune a fixed random subset (``density``) of the
entries of every adapted weight instead of LoRA factors. The subset is drawn from the run seed
and the module name, so it costs no traffic and is the same for every client: a client sends
the ``density · d · k`` values of each matrix and the server's weighted mean of them is the exact
FedAvg of the sparse updates. When the stage ends, the accumulated sparse update ΔW_s of each
matrix is replaced by its best rank-r_max approximation, split as FlexLoRA splits its SVD
(B = U_r Σ_r / s(r), A = V_rᵀ), and the LoRA stage — FedIT, HetLoRA, FlexLoRA — starts from
that adapter instead of ΔW = 0. The base weights are never changed (as in FlexLoRA); the part of
ΔW_s beyond rank r_max is dropped, and ``lora_start`` reports how much of it was kept.

Pure tensor functions live here; ``SparseDelta`` is the client side (the weight of an adapted
``nn.Linear`` becomes W0 + scatter(values) while the stage trains).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from flexfed.aggregation.base import normalized_weights, seeded_generator
from flexfed.aggregation.flexlora import split_factors
from flexfed.aggregation.lowrank import dense_top_singular
from flexfed.lora import Adapter, Factors

SparseUpdate = dict[str, Tensor]  # module name -> values at that module's indices (float32)


def sparse_indices(shapes: Mapping[str, tuple[int, int]], density: float, seed: int) -> dict[str, Tensor]:
    """Sorted flat indices of the trained entries of each matrix: round(density · d · k) of them, at least one."""
    if not 0 < density <= 1:
        raise ValueError(f"sparse density must be in (0, 1], got {density}")
    out = {}
    for name, (d_out, d_in) in sorted(shapes.items()):
        generator = seeded_generator(seed, "sparse", name)
        count = max(1, round(density * d_out * d_in))
        out[name] = torch.randperm(d_out * d_in, generator=generator)[:count].sort().values
    return out


def zero_update(indices: Mapping[str, Tensor]) -> SparseUpdate:
    return {name: torch.zeros(len(idx)) for name, idx in indices.items()}


def average_updates(updates: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> SparseUpdate:
    """Σ p_i v_i per module: with shared indices, exactly the weighted mean of the sparse updates."""
    if len(updates) != len(weights):
        raise ValueError(f"got {len(updates)} sparse updates but {len(weights)} weights")
    p = normalized_weights(weights)
    names = sorted(updates[0])
    for i, u in enumerate(updates):
        if sorted(u) != names:
            raise ValueError(f"sparse update {i} has modules {sorted(set(u) ^ set(names))[:3]} that update 0 does not")
        for name in names:
            if u[name].shape != updates[0][name].shape or not torch.isfinite(u[name]).all():
                raise ValueError(f"sparse update {i}: {name} has shape {tuple(u[name].shape)} or non-finite values")
    return {n: sum(pi * u[n].double() for pi, u in zip(p, updates)).float() for n in names}


def dense_delta(shape: tuple[int, int], indices: Tensor, values: Tensor) -> Tensor:
    return torch.zeros(shape[0] * shape[1], dtype=values.dtype).index_put_((indices,), values).view(shape)


def lora_start(
    shapes: Mapping[str, tuple[int, int]],
    indices: Mapping[str, Tensor],
    values: Mapping[str, Tensor],
    ranks: Mapping[str, int],
    scale,
) -> tuple[Adapter, float]:
    """The LoRA adapter (rank ``ranks[name]``) closest to the sparse update, and the share of its
    energy ‖ΔW_r‖²/‖ΔW_s‖² kept over all matrices."""
    adapter, kept, total = {}, 0.0, 0.0
    for name in sorted(shapes):
        delta = dense_delta(shapes[name], indices[name], values[name].double())
        u, s, vh = dense_top_singular(delta.unsqueeze(0), ranks[name])
        b, a = split_factors((u[0], s[0], vh[0]), scale(ranks[name]))
        # A zero component (no sparse signal in that direction) still needs a nonzero A row to
        # train from, as a fresh LoRA has: V's rows are orthonormal, so A = Vh is kept as is.
        adapter[name] = Factors(b=b.float(), a=a.float(), scale=scale(ranks[name]))
        kept += float((s[0] ** 2).sum())
        total += float(delta.square().sum())
    return adapter, (kept / total if total > 0 else 1.0)


class SparseDelta(nn.Module):
    """Parametrization W = W0 + scatter(values): gradients reach only the chosen entries."""

    def __init__(self, base: Tensor, indices: Tensor):
        super().__init__()
        self.register_buffer("base", base.detach(), persistent=False)
        self.register_buffer("indices", indices, persistent=False)

    def forward(self, values: Tensor) -> Tensor:
        flat = self.base.reshape(-1).index_add(0, self.indices, values.to(self.base.dtype))
        return flat.view_as(self.base)

    def right_inverse(self, weight: Tensor) -> Tensor:
        return (weight.reshape(-1)[self.indices] - self.base.reshape(-1)[self.indices]).float()


def attach(linears: Mapping[str, nn.Linear], indices: Mapping[str, Tensor], start: Mapping[str, Tensor]) -> dict[str, nn.Parameter]:
    """Make each linear's weight W0 + scatter(values), values = ``start``; returns the value parameters."""
    params = {}
    for name, linear in linears.items():
        parametrize.register_parametrization(linear, "weight", SparseDelta(linear.weight, indices[name]), unsafe=True)
        values = linear.parametrizations.weight.original
        with torch.no_grad():
            values.copy_(start[name])
        values.requires_grad_(True)
        params[name] = values
    return params


def detach(linears: Mapping[str, nn.Linear]) -> None:
    """Undo ``attach``: each weight is W0 again, bit for bit (values are zeroed before removal)."""
    for linear in linears.values():
        if parametrize.is_parametrized(linear, "weight"):
            with torch.no_grad():
                linear.parametrizations.weight.original.zero_()
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
            linear.weight.requires_grad_(False)
