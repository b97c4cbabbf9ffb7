"""Robust aggregation against poisoned but well-formed updates, as pure functions over tensors.

- ``norm_outliers``: the server's norm bound. Updates whose norm (in the method's space,
  ``flexfed.aggregation.space``) exceeds ``multiple`` x the round's median norm are rejected or
  clipped to the bound. Works for every method that has a space (FedIT, FFA-LoRA, Fed-SB,
  HetLoRA, FlexLoRA).
- ``coordinate_median`` / ``trimmed_mean``: replace the weighted mean by a coordinate-wise
  median or trimmed mean of what clients send. Only meaningful where every client sends the same
  coordinates and the method's aggregate is their mean: FedIT (A and B), FFA-LoRA (B), Fed-SB (R)
  (``COORDINATE_WISE``). FlexLoRA sums products (a coordinate-wise median would need every
  client's dense d x k update), HetLoRA pads mixed ranks with zeros (a median of padding is
  meaningless), FLoRA stacks and LoRA-FAIR refines on the server: these refuse.

The median and the trimmed mean are unweighted (each reporting client counts once), as in Yin et
al. 2018; the weighted mean's example counts are exactly what an attacker could inflate.
"""

from __future__ import annotations

import math
import statistics
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

Rule = Literal["median", "trimmed_mean"]
COORDINATE_WISE = ("fedit", "ffa-lora", "fed-sb")


def norm_outliers(norms: Sequence[float], multiple: float) -> tuple[float, list[int]]:
    """The round's bound (``multiple`` x the median norm) and the indices of the updates above it."""
    if not norms:
        return math.inf, []
    bound = multiple * statistics.median(norms)
    return bound, [i for i, n in enumerate(norms) if n > bound]


def coordinate_median(tensors: Sequence[Tensor]) -> Tensor:
    """The coordinate-wise median (mean of the two middle values for an even count), in float64."""
    stacked = torch.stack([t.double() for t in tensors]).sort(dim=0).values
    m = stacked.shape[0]
    middle = stacked[(m - 1) // 2] if m % 2 else (stacked[m // 2 - 1] + stacked[m // 2]) / 2
    return middle.to(tensors[0].dtype)


def trimmed_mean(tensors: Sequence[Tensor], fraction: float) -> Tensor:
    """The coordinate-wise mean after dropping the ⌊fraction m⌋ largest and smallest values."""
    m = len(tensors)
    k = math.floor(fraction * m)
    if m - 2 * k < 1:
        raise ValueError(f"trimmed mean of {m} updates with trim fraction {fraction} keeps none")
    stacked = torch.stack([t.double() for t in tensors]).sort(dim=0).values
    return stacked[k : m - k].mean(dim=0).to(tensors[0].dtype)


def coordinatewise(payloads: Sequence[Mapping[str, Tensor]], rule: Rule, fraction: float = 0.1) -> dict[str, Tensor]:
    """One payload from many, key by key, by ``rule``; every payload must hold the same keys and shapes."""
    if not payloads:
        raise ValueError("no client updates to aggregate")
    keys = sorted(payloads[0])
    for i, p in enumerate(payloads):
        if sorted(p) != keys:
            raise ValueError(f"client update {i} holds different tensors than update 0")
    out = {}
    for key in keys:
        tensors = [p[key] for p in payloads]
        if any(t.shape != tensors[0].shape for t in tensors):
            raise ValueError(f"{key}: client updates differ in shape; a coordinate-wise {rule} needs one shape")
        out[key] = coordinate_median(tensors) if rule == "median" else trimmed_mean(tensors, fraction)
    return out
