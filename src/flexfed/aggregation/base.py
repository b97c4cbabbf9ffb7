"""The aggregator interface: server-side federated LoRA math as pure functions over tensors.

An aggregator never touches files, models or the network. It sees client adapters
(``module name -> Factors``) with their weights and returns the new global adapter; it then says
what a client of given ranks starts the next round from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Mapping, Sequence

import torch

from flexfed.lora import Adapter, Factors

Scale = Callable[[int], float]  # rank -> s(rank); built from lora.lora_scale with the run's alpha


def normalized_weights(weights: Sequence[float]) -> list[float]:
    """p_i = n_i / sum_j n_j; rejects empty, negative or all-zero weights."""
    if len(weights) == 0:
        raise ValueError("no client updates to aggregate")
    if any(w < 0 or w != w for w in weights):
        raise ValueError(f"client weights must be non-negative numbers, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("client weights sum to zero")
    return [float(w) / total for w in weights]


def check_same_modules(updates: Sequence[Mapping[str, Factors]]) -> list[str]:
    names = sorted(updates[0])
    for i, u in enumerate(updates[1:], start=1):
        if sorted(u) != names:
            diff = sorted(set(names) ^ set(u))
            raise ValueError(f"client update {i} adapts different modules than update 0: {diff[:3]}")
    return names


def truncate(f: Factors, rank: int, scale: float) -> Factors:
    """The first ``rank`` components of ``f``, re-expressed at scale ``scale`` (same update)."""
    if rank > f.rank:
        raise ValueError(f"cannot give rank {rank} from a global adapter of rank {f.rank}")
    ratio = f.scale / scale
    return Factors(b=f.b[:, :rank] * ratio, a=f.a[:rank].clone(), scale=scale)


class Aggregator(ABC):
    """A federated LoRA method. Subclasses register themselves by ``name``."""

    name: ClassVar[str]
    registry: ClassVar[dict[str, type["Aggregator"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            Aggregator.registry[cls.name] = cls

    @abstractmethod
    def aggregate(
        self,
        updates: Sequence[Mapping[str, Factors]],
        weights: Sequence[float],
        max_ranks: Mapping[str, int],
        scale: Scale,
    ) -> Adapter:
        """New global adapter from the clients that reported this round.

        ``max_ranks`` is the largest rank any registered client uses per module: the global
        adapter keeps at least that many components so every client can be served.
        """

    def distribute(self, global_adapter: Mapping[str, Factors], ranks: Mapping[str, int], scale: Scale) -> Adapter:
        """The adapter a client with ``ranks`` (module name -> rank) starts its round from."""
        return {name: truncate(f, ranks[name], scale(ranks[name])) for name, f in global_adapter.items()}


def get_aggregator(name: str, **options) -> Aggregator:
    from flexfed import aggregation  # noqa: F401  (imports register every method)

    try:
        cls = Aggregator.registry[name]
    except KeyError:
        raise ValueError(f"unknown aggregation method {name!r}; choose from {sorted(Aggregator.registry)}") from None
    return cls(**options)
