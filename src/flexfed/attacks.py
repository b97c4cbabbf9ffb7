"""Simulated poisoning: a seeded share of clients send a malicious but well-formed update.

Kinds (``attack.kind``), each acting on the factors a client trains, about the start it was sent
(``flexfed.aggregation.space``), so the update keeps its ranks, shapes and scale and passes the
server's format checks:

- ``scale``: the honest change multiplied by ``attack.scale`` (boosting, Bhagoji et al. 2019);
- ``sign_flip``: the honest change reversed;
- ``noise``: Gaussian noise with the honest change's norm, so a norm check alone cannot tell it.
"""

from __future__ import annotations

import random
from typing import Literal, Mapping, Sequence

import torch

from flexfed.aggregation.base import seeded_generator
from flexfed.aggregation.space import move_update, moved_parts, replace_update, update_norm
from flexfed.lora import Adapter, Factors

Kind = Literal["scale", "sign_flip", "noise"]


def attackers(client_ids: Sequence[str], fraction: float, seed: int) -> set[str]:
    """round(fraction x N) clients, drawn once from the run seed: the same ones every round."""
    k = round(fraction * len(client_ids))
    if fraction > 0:
        k = max(k, 1)
    return set(random.Random(seed).sample(sorted(client_ids), k))


def poison(kind: Kind, trainable: tuple[str, ...], start: Mapping[str, Factors], trained: Mapping[str, Factors], scale: float, seed: int) -> Adapter:
    """What an attacker sends instead of ``trained`` (which it trained honestly from ``start``)."""
    parts = moved_parts(trainable)
    if kind == "scale":
        return move_update("factors", parts, start, trained, scale)
    if kind == "sign_flip":
        return move_update("factors", parts, start, trained, -1.0)
    if kind == "noise":
        norm = update_norm("factors", parts, start, trained)
        directions = {}
        for name in sorted(trained):
            g = seeded_generator(seed, name)
            directions[name] = {p: torch.randn(getattr(trained[name], p).shape, generator=g, dtype=torch.float64) for p in parts}
        return replace_update(parts, start, directions, norm)
    raise ValueError(f"unknown attack kind {kind!r}")


__all__ = ["Kind", "attackers", "poison"]
