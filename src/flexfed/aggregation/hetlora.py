"""HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432): heterogeneous ranks, zero-padded and averaged.

Server (``hetlora_average``). Client i (rank r_i) is zero-padded to the global rank g and A and B
are summed position by position with weights w_i. The paper's weights are sparsity-weighted:
w_i = ‖ΔW_i‖_F / Σ_j ‖ΔW_j‖_F with ΔW_i = s(r_i) B_i A_i, computed from the r x r Gram matrices
(no d x k product). With ``sparsity_weighted=False`` the weights are p_i = n_i / Σ n_j instead.
A client of rank r starts the next round from the first r components of the global (``truncate``).

Client (``RankSelfPruning``, on by default). The local loss gains λ Σ_m ‖B_m,t A_m,t‖_F over the
trailing components t = [⌊γ r_m⌋, r_m) of every adapted matrix m. After local training, if that
sum is smaller than it was in the start the client was served, the client cuts every matrix to
rank ⌊γ r_m⌋ and sends only those components; the server then serves it that rank from the next
round on (``Server.ranks_of``), so repeated pruning shrinks a client geometrically while its tail
keeps fading.

Scales: client i's product is s(r_i) B_i A_i, but the global adapter is used at scale s(g).
Before padding, s(r_i)/s(g) is folded into B_i, so a single client comes back unchanged and
every client's contribution to the product keeps its true size (averaging raw factors would
inflate low-rank clients' share by r_max/r_i under alpha/r). On the way down, ``truncate`` moves
s(g)/s(r) back into B: the client's s(r) B A equals the global's first r components exactly.
Pruning re-expresses the kept components at s(⌊γ r⌋) the same way, so the kept product is unchanged.

Choices and departures from the paper:

- Components no client of the round reached keep the previous global's values. The paper's
  zero-padded sum would set them to A = B = 0, and a component with both factors zero has zero
  gradient forever: a later high-rank client would start from and keep dead components.
- Components some clients reached follow the paper's formula as written: no renormalisation per
  component, so component j is Σ_{i: r_i > j} w_i (B_i, A_i) and shrinks by the weight of the
  clients that did not reach it (the paper's zero-padding, whose sparsity weights are meant to
  favour the clients that carry more).
- Sparsity weights use only clients with n_i > 0 (a client with no examples contributes
  nothing); if every update is zero (e.g. B = 0 before any training) the weights fall back to p_i.
- Weights are computed per adapted matrix (the paper's ΔW_k is one matrix's reconstruction).
- The global rank is ``max(max_ranks[m], r_i, previous rank)``; the paper fixes it at r_max.
- Ranks here can differ per matrix (rank types give attention and MLP their own ranks); the
  pruning decision is still one per client, as in the paper (one rank per client): the penalty
  sums over every matrix, and a pruned client cuts each matrix to ⌊γ r_m⌋. A matrix at rank 1
  has no tail (⌊γ⌋ = 0 would leave nothing) and is never penalised or cut.
- The penalty is on the raw factors, ‖B_t A_t‖_F, as the paper writes it (not on s(r) B_t A_t);
  the reported training loss is the data loss alone.
- Defaults γ = 0.99, λ = 0.01: the rule above is the paper's; these two values could not be
  checked against the paper's text here, so they are options (``gamma``, ``lambda``).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from flexfed.aggregation.base import Aggregator, LocalRule, Scale, truncate, validate
from flexfed.lora import Adapter, Factors, product_norm


def sparsity_weights(factors: Sequence[Factors], p: Sequence[float]) -> list[float]:
    """The paper's w_i = ‖ΔW_i‖_F / Σ_j ‖ΔW_j‖_F over the clients with p_i > 0 (p_i if all are 0)."""
    norms = [f.norm() if pi > 0 else 0.0 for f, pi in zip(factors, p)]
    total = sum(norms)
    if total == 0:  # nothing trained yet (e.g. B = 0 everywhere): no norm to weigh by
        return list(p)
    return [n / total for n in norms]


def _pad(t: Tensor, size: int, dim: int) -> Tensor:
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def hetlora_average(
    factors: Sequence[Factors],
    p: Sequence[float],
    rank: int,
    scale: Scale,
    previous: Factors | None = None,
    sparsity_weighted: bool = True,
) -> Factors:
    """Zero-pad every client to the global rank g at scale s(g) and sum with weights w_i.

    Components beyond every client's rank keep ``previous`` (the current global), re-expressed at
    s(g); without ``previous`` they are zero. See the module docstring for the weights.
    """
    g = max(rank, *(f.rank for f in factors), previous.rank if previous is not None else 0)
    target = scale(g)
    weights = sparsity_weights(factors, p) if sparsity_weighted else list(p)
    b = sum(w * _pad(f.b.double() * (f.scale / target), g, 1) for w, f in zip(weights, factors))
    a = sum(w * _pad(f.a.double(), g, 0) for w, f in zip(weights, factors))
    reached = max(f.rank for f, w in zip(factors, weights) if w > 0)  # a zero weight trains nothing here
    if previous is not None and previous.rank > reached:
        # No client trained these components this round: keep them as they were (same product).
        kept = slice(reached, previous.rank)
        b[:, kept] = previous.b[:, kept].double() * (previous.scale / target)
        a[kept] = previous.a[kept].double()
    first = factors[0]
    return Factors(b=b.to(first.b.dtype), a=a.to(first.a.dtype), scale=target)


# ----------------------------------------------------------------------------- the client's side


def kept_rank(rank: int, gamma: float) -> int:
    """⌊γ r⌋, but never below 1: the rank a pruned matrix keeps (r itself when r = 1)."""
    return max(1, math.floor(gamma * rank))


class RankSelfPruning(LocalRule):
    """HetLoRA's local rank self-pruning (see the module docstring): penalty λ Σ_m ‖B_m,t A_m,t‖_F on
    the trailing components, and a cut to ⌊γ r_m⌋ when that sum fell during local training."""

    def __init__(self, gamma: float, lam: float):
        self.gamma = gamma
        self.lam = lam

    def tail_norm(self, factors: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor:
        """Σ_m ‖B_m,t A_m,t‖_F over ``module -> (B, A)`` (differentiable)."""
        total = None
        for b, a in factors.values():
            keep = kept_rank(a.shape[0], self.gamma)
            if keep == a.shape[0]:
                continue
            norm = product_norm(b[:, keep:], a[keep:])
            total = norm if total is None else total + norm
        if total is None:
            first = next(iter(factors.values()))[1]
            return first.new_zeros(())
        return total

    def penalty(self, factors: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor:
        return self.lam * self.tail_norm(factors)

    def pruned_ranks(self, ranks: Mapping[str, int]) -> dict[str, int]:
        return {n: kept_rank(r, self.gamma) for n, r in ranks.items()}

    def finish(self, start: Mapping[str, Factors], trained: Mapping[str, Factors], scale: Scale) -> Adapter:
        def tail(adapter):
            return float(self.tail_norm({n: (f.b.double(), f.a.double()) for n, f in adapter.items()}))

        if tail(trained) >= tail(start):
            return dict(trained)
        ranks = self.pruned_ranks({n: f.rank for n, f in trained.items()})
        return {n: truncate(f, ranks[n], scale(ranks[n])) for n, f in trained.items()}


class HetLoRA(Aggregator):
    """HetLoRA. Options (``federation.method_options``):

    - ``sparsity_weighted`` (default true): weights ‖ΔW_i‖ / Σ‖ΔW_j‖; false: n_i / Σ n_j.
    - ``prune`` (default true): the clients' rank self-pruning, with ``gamma`` (0 < γ < 1,
      default 0.99) and ``lambda`` (λ >= 0, default 0.01).
    """

    name = "hetlora"

    def __init__(self, sparsity_weighted: bool = True, prune: bool = True, gamma: float = 0.99, **options):
        lam = options.pop("lambda", 0.01)
        if options:
            raise ValueError(f"hetlora: unknown options {sorted(options)}; choose from sparsity_weighted, prune, gamma, lambda")
        for key, value in (("sparsity_weighted", sparsity_weighted), ("prune", prune)):
            if not isinstance(value, bool):
                raise ValueError(f"hetlora: {key} must be true or false, got {value!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < 1:
            raise ValueError(f"hetlora: gamma must be a number in (0, 1) (the kept share of the rank), got {gamma!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0 or math.isinf(lam):
            raise ValueError(f"hetlora: lambda must be a finite number >= 0 (the tail penalty's weight), got {lam!r}")
        self.sparsity_weighted = sparsity_weighted
        self.pruning = RankSelfPruning(float(gamma), float(lam)) if prune else None
        # Under secure aggregation the server has only Σ p_i (padded factors): n_i weights and the ranks it served
        self.secure_mean = "padded" if not sparsity_weighted and not prune else None

    def aggregate(self, updates, weights, max_ranks, scale, previous=None) -> Adapter:
        names, p = validate(updates, weights)
        previous = previous or {}
        return {
            n: hetlora_average([u[n] for u in updates], p, max_ranks.get(n, 1), scale, previous.get(n), self.sparsity_weighted)
            for n in names
        }

    def local_rule(self) -> LocalRule | None:
        return self.pruning

    def aggregate_padded(self, mean, reached, previous) -> Adapter:
        """``hetlora_average`` with p_i weights, from Σ p_i (B_i s(r_i)/s(g), A_i) zero-padded to g
        (secure aggregation): the components beyond ``reached`` keep ``previous``, as there."""
        out = {}
        for n, f in mean.items():
            b, a = f.b.clone(), f.a.clone()
            old = (previous or {}).get(n)
            if old is not None and old.rank > reached[n]:
                kept = slice(reached[n], old.rank)
                b[:, kept] = (old.b[:, kept].double() * (old.scale / f.scale)).to(b.dtype)
                a[kept] = old.a[kept].to(a.dtype)
            out[n] = Factors(b=b, a=a, scale=f.scale)
        return out
