"""The aggregator interface: server-side federated LoRA math as pure functions over tensors.

An aggregator never touches files, models or the network. It sees client adapters
(``module name -> Factors``) with their weights and returns the new global adapter; it then says
what a client of given ranks starts the next round from.

Three class attributes tell the server and the clients what a method changes about a round:

- ``trainable``: which factors a client trains (``("a", "b")`` for plain LoRA, ``("b",)`` for
  FFA-LoRA, ``("r",)`` for Fed-SB's r x r core); the others stay frozen at what ``distribute``
  handed out.
- ``merges_into_base``: the global update is merged into the frozen base weights each round and
  clients restart a fresh LoRA (FLoRA); otherwise the base never changes and the global adapter
  is the cumulative update (FedIT, FlexLoRA, ...).
- ``mixed_ranks``: clients may train at different ranks. Methods that average factors position
  by position (FedIT, FFA-LoRA, Fed-SB, LoRA-FAIR) need one common rank; their ``aggregate``
  refuses mixed ranks and their ``distribute`` refuses any other rank.

What crosses the wire is explicit, so that byte counts are measured rather than assumed: a
method ``encode``s an adapter (a start going down, an update going up) into a ``Payload`` of
named tensors and ``decode``s it back. Factors that every party derives from the run seed
(``common``: FFA-LoRA's frozen A, Fed-SB's frames) are never sent; both ends rebuild them.
Both engines train from decoded payloads and aggregate decoded payloads, so they see the same
tensors bit for bit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import zlib
from typing import Callable, ClassVar, Literal, Mapping, Sequence

import torch
from torch import Tensor

from flexfed.lora import Adapter, Factors

Scale = Callable[[int], float]  # rank -> s(rank); built from lora.lora_scale with the run's alpha
Payload = dict[str, Tensor]  # what crosses the wire: payload_key(module, part) -> tensor


def payload_key(module: str, part: str) -> str:
    return f"{module}.{part}"


def payload_bytes(payload: Mapping[str, Tensor]) -> int:
    """Bytes of the tensors in a payload, at their own element size."""
    return sum(t.numel() * t.element_size() for t in payload.values())


def seeded_generator(seed: int, *labels) -> torch.Generator:
    """A generator from the run seed and labels (e.g. a module name): crc32 of the joined text,
    stable across processes, machines and Python versions, so every party draws the same numbers."""
    return torch.Generator().manual_seed(zlib.crc32(":".join(map(str, (seed, *labels))).encode()))


def payload_parts(payload: Mapping[str, Tensor], modules: Sequence[str], parts: Sequence[str]) -> dict[str, dict[str, Tensor]]:
    """``module -> part -> tensor``; raises ``ValueError`` unless the payload holds exactly these parts."""
    expected = {payload_key(m, p) for m in modules for p in parts}
    if set(payload) != expected:
        diff = sorted(set(payload) ^ expected)
        raise ValueError(f"payload does not match the modules (unexpected or missing: {diff[:3]})")
    for key in sorted(expected):
        t = payload[key]
        if not isinstance(t, Tensor) or t.ndim != 2:
            raise ValueError(f"payload {key} is {'a tensor of shape ' + str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__}, expected a matrix")
    return {m: {p: payload[payload_key(m, p)] for p in parts} for m in modules}


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
    """The module names every update adapts; every module must have one shape and finite values."""
    if len(updates) == 0:
        raise ValueError("no client updates to aggregate")
    names = sorted(updates[0])
    for i, u in enumerate(updates[1:], start=1):
        if sorted(u) != names:
            diff = sorted(set(names) ^ set(u))
            raise ValueError(f"client update {i} adapts different modules than update 0: {diff[:3]}")
    for name in names:
        shape = updates[0][name].shape
        for i, u in enumerate(updates):
            f = u[name]
            if f.shape != shape:
                raise ValueError(f"{name}: client update {i} has shape {f.shape}, update 0 has {shape}")
            if not (torch.isfinite(f.a).all() and torch.isfinite(f.b).all()):
                raise ValueError(f"{name}: client update {i} contains NaN or infinite values")
    return names


def validate(updates: Sequence[Mapping[str, Factors]], weights: Sequence[float]) -> tuple[list[str], list[float]]:
    """Checks every aggregator runs first: one weight per update, same modules and shapes.

    Returns the module names and the normalized weights p_i.
    """
    if len(weights) != len(updates):
        raise ValueError(f"got {len(updates)} client updates but {len(weights)} weights")
    p = normalized_weights(weights)
    return check_same_modules(updates), p


def require_common_rank(factors: Sequence[Factors], method: str) -> int:
    """The one rank all clients share; methods that average factors position by position need it."""
    ranks = sorted({f.rank for f in factors})
    if len(ranks) != 1:
        raise ValueError(f"{method} needs every client at the same rank, got ranks {ranks}; use flexlora or hetlora")
    return ranks[0]


def average_with_frozen(
    factors: Sequence[Factors], p: Sequence[float], frozen: Literal["a", "b"], method: str
) -> Factors:
    """Average the trained factor of clients that share the frozen one bit for bit.

    With the frozen factor F common to all clients, sum_i p_i s B_i F = s (sum_i p_i B_i) F (and
    likewise with A trained), so averaging the trained factor alone is the exact average of the
    updates. That only holds if F really is common, hence the check.
    """
    require_common_rank(factors, method)
    first = factors[0]
    for i, f in enumerate(factors[1:], start=1):
        if not torch.equal(getattr(f, frozen), getattr(first, frozen)):
            raise ValueError(
                f"{method}: client update {i} has a different frozen {frozen.upper()} than update 0; "
                f"every client must start from the same {frozen.upper()} (shared seed or broadcast)"
            )
        if f.scale != first.scale:
            raise ValueError(f"{method}: client update {i} has scale {f.scale}, update 0 has {first.scale}")
    trained = "b" if frozen == "a" else "a"
    mean = sum(pi * getattr(f, trained).double() for pi, f in zip(p, factors))
    parts = {frozen: getattr(first, frozen).clone(), trained: mean.to(getattr(first, trained).dtype)}
    return Factors(**parts, scale=first.scale)


def truncate(f: Factors, rank: int, scale: float) -> Factors:
    """The first ``rank`` components of ``f``, re-expressed at scale ``scale`` (same update).

    The ratio of the two scales goes into B, so ``scale * b @ a`` of the kept components is
    unchanged: a client at rank r with s(r) = alpha/r sees exactly the global's first r components.
    """
    if rank > f.rank:
        raise ValueError(f"cannot give rank {rank} from a global adapter of rank {f.rank}")
    ratio = f.scale / scale
    return Factors(b=f.b[:, :rank] * ratio, a=f.a[:rank].clone(), scale=scale)


class LocalRule(ABC):
    """A method's addition to local training, applied by the one training loop (``LocalTrainer``).

    ``penalty`` is added to the data loss at every local step (a differentiable function of the
    live factors, ``module -> (B, A)``); ``finish`` turns the trained adapter into the one the
    client sends, possibly at lower ranks, which must then be ``pruned_ranks`` of what it was served.
    """

    @abstractmethod
    def penalty(self, factors: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor:
        """A scalar added to the local loss."""

    @abstractmethod
    def pruned_ranks(self, ranks: Mapping[str, int]) -> dict[str, int]:
        """The only other ranks a client served ``ranks`` may send back."""

    @abstractmethod
    def finish(self, start: Mapping[str, Factors], trained: Mapping[str, Factors], scale: Scale) -> Adapter:
        """The adapter to send, given the start the client was served and what it trained."""


class Aggregator(ABC):
    """A federated LoRA method. Subclasses register themselves by ``name``."""

    name: ClassVar[str]
    registry: ClassVar[dict[str, type["Aggregator"]]] = {}
    trainable: ClassVar[tuple[str, ...]] = ("a", "b")
    merges_into_base: ClassVar[bool] = False
    mixed_ranks: ClassVar[bool] = True
    # Under secure aggregation (``aggregation.secure``): "payload" when ``aggregate`` of the
    # payloads' weighted mean, as one update of weight 1, is the round's aggregate; "dense" when
    # only the mean of the dense s B A serves (``aggregate_dense``); "padded" when it is the mean of
    # the factors zero-padded to the global rank (``aggregate_padded``); None: refused.
    secure_mean: Literal["payload", "dense", "padded"] | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            Aggregator.registry[cls.name] = cls

    def aggregate_dense(self, dense: Mapping[str, Tensor], max_ranks: Mapping[str, int], scale: Scale) -> Adapter:
        """The global adapter from the weighted mean of the clients' dense updates s B_i A_i
        (``secure_mean = "dense"`` only)."""
        raise NotImplementedError(f"{self.name} does not aggregate dense updates")

    def aggregate_padded(self, mean: Mapping[str, Factors], reached: Mapping[str, int], previous: Mapping[str, Factors] | None) -> Adapter:
        """The global adapter from the weighted mean of the clients' factors zero-padded to the
        global rank (``mean``, at s(g)); ``reached``: the largest rank a client of the round had
        (``secure_mean = "padded"`` only)."""
        raise NotImplementedError(f"{self.name} does not aggregate padded factors")

    @abstractmethod
    def aggregate(
        self,
        updates: Sequence[Mapping[str, Factors]],
        weights: Sequence[float],
        max_ranks: Mapping[str, int],
        scale: Scale,
        previous: Mapping[str, Factors] | None = None,
    ) -> Adapter:
        """New global adapter from the clients that reported this round.

        ``max_ranks`` is the largest rank any registered client uses per module: the global
        adapter keeps at least that many components so every client can be served.
        ``previous`` is the current global adapter (None offline, e.g. merging files); a method
        may keep from it what no client of the round trained (HetLoRA); the others ignore it.
        """

    def local_rule(self) -> "LocalRule | None":
        """What the method adds to a client's local training (None: plain local training)."""
        return None

    # ------------------------------------------------------------------ what a round exchanges

    def common(self, name: str, shape: tuple[int, int], rank: int, scale: float, seed: int) -> Factors | None:
        """Factors of module ``name`` that every party derives from the run seed and never sends
        (None: the method sends everything)."""
        return None

    def initial(self, peft_init: Adapter, common: Mapping[str, Factors]) -> Adapter:
        """The round-0 global adapter, given PEFT's default start (B = 0) and the common factors."""
        return peft_init

    def encode(self, adapter: Mapping[str, Factors], common: Mapping[str, Factors]) -> Payload:
        """The tensors that carry ``adapter`` over the wire: by default both factors of every module."""
        return {payload_key(n, p): getattr(f, p) for n, f in adapter.items() for p in ("a", "b")}

    def decode(self, payload: Mapping[str, Tensor], modules: Sequence[str], common: Mapping[str, Factors], scale: Scale) -> Adapter:
        """The adapter carried by ``payload`` (each module at the scale of its rank); ``ValueError`` if malformed."""
        parts = payload_parts(payload, modules, ("a", "b"))
        return {m: Factors(b=t["b"], a=t["a"], scale=scale(t["a"].shape[0])) for m, t in parts.items()}

    # ------------------------------------------------------------------ the base weights
    # Hooks of the weights protocol (``aggregation.weights``). A method that merges its global
    # into the base (FLoRA) keeps ``merged``, the cumulative update over W0, and overrides them;
    # for every other method ``merged`` stays empty and the base stays W0.

    def accumulate(self, merged: Mapping[str, Factors], global_adapter: Mapping[str, Factors], scale: Scale) -> Adapter:
        """The cumulative base update after this round's global: unchanged unless the method merges."""
        return dict(merged)

    def kept(self, global_adapter: Mapping[str, Factors]) -> Adapter:
        """The global adapter after a round that changed nothing (too few clients, refused aggregate)."""
        return dict(global_adapter)

    def evaluated(self, global_adapter: Mapping[str, Factors], fresh: Adapter) -> Adapter:
        """The adapter evaluated on the base W0 + merged (``fresh``: PEFT's default start, zero update)."""
        return dict(global_adapter)

    def over_base(self, global_adapter: Mapping[str, Factors], merged: Mapping[str, Factors], fresh: Adapter) -> Adapter:
        """The global model's whole update over W0, as one adapter (what a round's adapter file holds)."""
        return dict(global_adapter)

    def sent_alone(self, start: Adapter, merged: Mapping[str, Factors]) -> Adapter:
        """What a client that does not share the server's base (a Flower node) is sent instead of ``start``."""
        return start

    def client_base(self, received: Callable[[], Adapter]) -> Adapter | None:
        """The update a client that does not share the server's base merges into W0 (None: W0),
        from what it ``received`` (decoded on call)."""
        return None

    def start(self, received: Callable[[], Adapter], fresh: Callable[[], Adapter]) -> Adapter:
        """What a client trains from: what it ``received``, or a ``fresh`` LoRA (both made on call)."""
        return received()

    def written(self, updates: Sequence[Mapping[str, Factors]], weights: Sequence[float], ranks: Sequence[int] | None, scale: Scale) -> dict[int | None, Adapter]:
        """``flexfed aggregate``: the aggregate served at each output rank (default: the largest
        input rank), each capped at min(d_out, d_in) of its module; key None for a single output."""
        shapes = {name: f.shape for name, f in updates[0].items()}
        if ranks is None:
            ranks = [max(f.rank for u in updates for f in u.values())]
        if not ranks or any(r < 1 for r in ranks):
            raise ValueError(f"output ranks must be positive integers, got {list(ranks)}")
        capped = {r: {name: min(r, d, k) for name, (d, k) in shapes.items()} for r in ranks}
        max_ranks = {name: max(capped[r][name] for r in ranks) for name in shapes}
        global_adapter = self.aggregate(updates, weights, max_ranks, scale)
        out = {r: self.distribute(global_adapter, capped[r], scale) for r in ranks}
        return out if len(ranks) > 1 else {None: out[ranks[0]]}

    def distribute(self, global_adapter: Mapping[str, Factors], ranks: Mapping[str, int], scale: Scale) -> Adapter:
        """The adapter a client with ``ranks`` (module name -> rank) starts its round from."""
        if not self.mixed_ranks:
            for name, f in global_adapter.items():
                if ranks[name] != f.rank:
                    raise ValueError(
                        f"{self.name} serves its one common rank {f.rank}; {name} asked for rank {ranks[name]}"
                    )
        return {name: truncate(f, ranks[name], scale(ranks[name])) for name, f in global_adapter.items()}


class SharedFactorAggregator(Aggregator):
    """A method whose clients all hold the same ``frozen`` factor (FFA-LoRA's A, Fed-SB's B), so
    averaging what they train is the exact average of their updates (``average_with_frozen``)."""

    mixed_ranks = False
    secure_mean = "payload"  # linear in the trained factor
    frozen: ClassVar[Literal["a", "b"]]

    def aggregate(self, updates, weights, max_ranks, scale, previous=None) -> Adapter:
        names, p = validate(updates, weights)
        return {n: average_with_frozen([u[n] for u in updates], p, frozen=self.frozen, method=self.name) for n in names}


def get_aggregator(name: str, **options) -> Aggregator:
    from flexfed import aggregation  # noqa: F401  (imports register every method)

    try:
        cls = Aggregator.registry[name]
    except KeyError:
        raise ValueError(f"unknown aggregation method {name!r}; choose from {sorted(Aggregator.registry)}") from None
    return cls(**options)
