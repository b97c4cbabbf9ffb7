"""Client resources: which LoRA rank each client can afford on each adapted module.

A *rank type* gives a rank per module kind (attention q,k,v,o vs MLP gate,up,down); a
*distribution* says what share of clients has each type (FlexLoRA paper, Table 1 and Fig. 3).
Ranks are capped at min(d_out, d_in) of each module: a rank-200 type on SmolLM2's 576 x 192
k/v projections trains rank 192 there, because a larger rank adds no expressiveness.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Mapping, Sequence

from flexfed.lora import ATTENTION, MLP, module_kind

# FlexLoRA's four types: (attention rank, MLP rank).
RANK_TYPES: dict[str, tuple[int, int]] = {"T1": (8, 8), "T2": (30, 30), "T3": (30, 200), "T4": (200, 200)}

# Shares of T1..T4. "normal" follows the paper's text (most mass on T2 and T3); the released
# code puts it on T3/T4 instead, which is "heavy-tail-strong"-like.
DISTRIBUTIONS: dict[str, dict[str, float]] = {
    "uniform": {"T1": 0.25, "T2": 0.25, "T3": 0.25, "T4": 0.25},
    "heavy-tail-light": {"T1": 0.80, "T2": 0.05, "T3": 0.05, "T4": 0.10},
    "heavy-tail-strong": {"T1": 0.05, "T2": 0.05, "T3": 0.10, "T4": 0.80},
    "normal": {"T1": 0.10, "T2": 0.40, "T3": 0.40, "T4": 0.10},
    "homogeneous": {"T1": 1.0},
}


@dataclass(frozen=True)
class RankProfile:
    """One rank type resolved on a model: module name -> rank."""

    name: str
    ranks: Mapping[str, int]


def module_rank(kind: str, attention_rank: int, mlp_rank: int) -> int:
    if kind in MLP:
        return mlp_rank
    return attention_rank  # attention projections and any other targeted linear layer


def resolve_type(name: str, attention_rank: int, mlp_rank: int, shapes: Mapping[str, tuple[int, int]]) -> RankProfile:
    ranks = {m: min(module_rank(module_kind(m), attention_rank, mlp_rank), *shapes[m]) for m in sorted(shapes)}
    return RankProfile(name, ranks)


def assign_types(num_clients: int, mix: Mapping[str, float], seed: int) -> list[str]:
    """Draw each client's type from ``mix`` (shares), reproducibly."""
    names = sorted(mix)
    rng = random.Random(f"{seed}/rank-types")
    return rng.choices(names, weights=[mix[n] for n in names], k=num_clients)


def max_ranks(profiles: Sequence[RankProfile]) -> dict[str, int]:
    """The largest rank any profile uses on each module: what the global adapter must keep."""
    out: dict[str, int] = {}
    for p in profiles:
        for m, r in p.ranks.items():
            out[m] = max(out.get(m, 0), r)
    return out


def client_profiles(resources, lora, shapes: Mapping[str, tuple[int, int]], num_clients: int, seed: int):
    """(profiles, profile index of each client) for a run's ``resources`` and ``lora`` config.

    Clients store an index into a short profile list, so 10,000 clients cost 10,000 small ints.
    """
    if resources.distribution == "homogeneous":
        too_big = {m: min(s) for m, s in shapes.items() if lora.rank > min(s)}
        if too_big:
            name, cap = next(iter(too_big.items()))
            raise ValueError(f"lora.rank={lora.rank} is larger than layer {name} allows (min(d_out, d_in) = {cap})")
        return [resolve_type("homogeneous", lora.rank, lora.rank, shapes)], [0] * num_clients
    types = dict(RANK_TYPES)
    types.update({n: (t.attention, t.mlp) for n, t in resources.types.items()})
    mix = resources.mix if resources.distribution == "custom" else DISTRIBUTIONS[resources.distribution]
    unknown = sorted(set(mix) - set(types))
    if unknown:
        raise ValueError(f"resources.mix names unknown rank types {unknown}; known: {sorted(types)}")
    names = sorted(n for n in mix if mix[n] > 0)
    profiles = [resolve_type(n, *types[n], shapes) for n in names]
    index = {n: i for i, n in enumerate(names)}
    return profiles, [index[n] for n in assign_types(num_clients, {n: mix[n] for n in names}, seed)]


__all__ = ["ATTENTION", "DISTRIBUTIONS", "MLP", "RANK_TYPES", "RankProfile", "assign_types", "client_profiles", "max_ranks", "resolve_type"]
