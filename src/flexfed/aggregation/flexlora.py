"""FlexLoRA (Bai et al., NeurIPS 2024, arXiv 2402.11505): average full-size updates, then SVD.

Every client trains at its own rank r_i. Per adapted matrix the server rebuilds

    dW = sum_i p_i s(r_i) B_i A_i = U Σ Vᵀ

and a client of rank r starts the next round from the rank-r truncation: B = U_r Σ_r / s(r),
A = V_rᵀ (the reference split of the official code), so that s(r) B A = U_r Σ_r V_rᵀ. Each
update's own scale s(r_i) (``Factors.scale``) enters the sum; a single global alpha/r would
weight a rank-8 client 25x too little against a rank-200 one.

The global adapter is the *cumulative* update at rank ``max_ranks[name]`` (base weights never
change): its components are ordered by singular value, so ``distribute`` is plain truncation.

Only the top r_max triplets are ever needed, so the dense d x k SVD is avoided: modules are
grouped by shape and client ranks (e.g. every layer's q_proj), each group is processed in
memory-bounded chunks with batched linear algebra, and ``lowrank.choose_method`` picks the exact
factored path, randomized subspace iteration or the dense SVD from a cost model.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Literal, Mapping, Sequence, get_args

import torch
from torch import Tensor

from flexfed.aggregation.base import Aggregator, truncate, validate
from flexfed.aggregation.lowrank import (
    RTOL,
    Method,
    choose_method,
    dense_top_singular,
    exact_top_singular,
    randomized_top_singular,
)
from flexfed.lora import Adapter, Factors

Split = Literal["reference", "sqrt"]
Triplets = tuple[Tensor, Tensor, Tensor]  # U (d, r), S (r,), Vh (r, k)


def stack_updates(
    factors: Sequence[Sequence[Factors]], p: Sequence[float], dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Stacked factors of L same-shaped modules (``factors[m][i]``: module m, client i).

    b[m] = [p_1 s_1 B_1, ..., p_K s_K B_K] (d x R), a[m] = [A_1; ...; A_K] (R x k), so that
    b[m] @ a[m] = sum_i p_i s_i B_i A_i with each client's own scale s_i.
    """
    (d, k), ranks, device = factors[0][0].shape, [f.rank for f in factors[0]], factors[0][0].b.device
    b = torch.empty(len(factors), d, sum(ranks), dtype=dtype, device=device)
    a = torch.empty(len(factors), sum(ranks), k, dtype=dtype, device=device)
    for m, module in enumerate(factors):
        column = 0
        for pi, f in zip(p, module):
            columns = slice(column, column + f.rank)
            b[m, :, columns] = f.b
            b[m, :, columns] *= pi * f.scale  # after the copy: in `dtype`, not in a bf16 client's dtype
            a[m, columns] = f.a
            column += f.rank
    return b, a


def sum_updates(factors: Sequence[Sequence[Factors]], p: Sequence[float], dtype: torch.dtype = torch.float32) -> Tensor:
    """Dense dW[m] = sum_i p_i s_i B_i A_i of L same-shaped modules (``factors[m][i]``), (L, d, k).

    Accumulated client by client (one rank-r_i GEMM each): as fast as one GEMM on the stacked
    factors and without their copy, which is 450 MB for 80 clients on a 5504 x 2048 matrix.
    """
    (d, k), device = factors[0][0].shape, factors[0][0].b.device
    w = torch.zeros(len(factors), d, k, dtype=dtype, device=device)
    for m, module in enumerate(factors):
        for pi, f in zip(p, module):
            w[m].addmm_(f.b.to(dtype), f.a.to(dtype), alpha=pi * f.scale)
    return w


def _fix_signs(u: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each (u_j, v_j) pair so u_j's largest-magnitude entry is positive.

    Singular vectors are defined up to a joint sign; fixing it makes the factors handed to
    clients independent of client order and of the path that computed them.
    """
    pivot = u.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(u, -2, pivot))
    signs[signs == 0] = 1
    return u * signs, vh * signs.mT


def flexlora_triplets(
    updates: Sequence[Mapping[str, Factors]],
    p: Sequence[float],
    ranks: Mapping[str, int],
    *,
    method: Method = "auto",
    dtype: torch.dtype | None = None,
    rtol: float = RTOL,
    chunk_bytes: int = 512 << 20,
) -> dict[str, Triplets]:
    """Top ``ranks[name]`` singular triplets of sum_i p_i s_i B_i A_i for every module.

    Modules with the same shape, client ranks and target rank are batched; each batch is cut
    into chunks whose working set (dense dW on the randomized/dense paths, float64 stacked factors
    and Gram matrices on the exact path) stays under ``chunk_bytes``, so no more than one chunk of
    dense updates is ever alive. Clients with p_i = 0 are skipped. ``dtype`` is the precision of
    dW on the randomized and dense paths (default: float64 for float64 clients, else float32).
    ``method="dense"`` with ``dtype=torch.float64`` is the reference (form dW, full SVD) for tests
    and benchmarks.
    """
    if not ranks:
        return {}
    # dW in float64 for float64 clients (tests), else float32 (float32, bf16 and fp16 clients).
    dtype = dtype or torch.promote_types(updates[0][next(iter(ranks))].b.dtype, torch.float32)
    active = [(pi, u) for pi, u in zip(p, updates) if pi > 0]
    weights, clients = [pi for pi, _ in active], [u for _, u in active]
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name in sorted(ranks):
        first = clients[0][name]
        d, k = first.shape
        rank = min(ranks[name], d, k)
        groups[(d, k, tuple(u[name].rank for u in clients), rank)].append(name)

    out: dict[str, Triplets] = {}
    for (d, k, client_ranks, rank), names in groups.items():
        total_rank = sum(client_ranks)
        chosen = choose_method(d, k, total_rank, rank) if method == "auto" else method
        if chosen == "exact":  # float64 stacked factors, Gram matrices, basis
            per_matrix = 8 * ((d + k) * total_rank + 3 * total_rank**2 + 2 * (d + k) * rank)
        else:  # dW, the SVD's work space or the iteration's Gram matrix and blocks
            per_matrix = dtype.itemsize * 3 * d * k
        chunk = max(1, chunk_bytes // per_matrix)
        for start in range(0, len(names), chunk):
            part = names[start : start + chunk]
            factors = [[u[n] for u in clients] for n in part]
            if chosen == "exact":
                # stacked straight into float64: p_i s_i B_i is not rounded to float32 first
                u, s, vh = exact_top_singular(*stack_updates(factors, weights, torch.float64), rank)
            elif chosen == "randomized":
                u, s, vh = randomized_top_singular(sum_updates(factors, weights, dtype), rank, rtol=rtol)
            elif chosen == "dense":
                u, s, vh = dense_top_singular(sum_updates(factors, weights, dtype), rank)
            else:
                raise ValueError(f"unknown SVD method {chosen!r}; choose from {get_args(Method)}")
            u, vh = _fix_signs(u, vh)
            for i, name in enumerate(part):
                out[name] = (u[i], s[i], vh[i])
            del u, s, vh
    return out


def split_factors(triplets: Triplets, scale: float, split: Split = "reference") -> tuple[Tensor, Tensor]:
    """(B, A) with ``scale * B @ A = U Σ Vh``.

    ``reference``: B = U Σ / scale, A = Vh (FlexLoRA's official split).
    ``sqrt``: B = U sqrt(Σ/scale), A = sqrt(Σ/scale) Vh -- the balanced split, equal norms per
    component. A component with Σ = 0 keeps A = Vh (and B = 0) so the client can still train it,
    as with a fresh LoRA (B = 0, A nonzero) rather than a dead one (both zero).
    """
    u, s, vh = triplets
    if split == "reference":
        return u * (s / scale), vh
    if split == "sqrt":
        root = (s / scale).sqrt()
        live = s > s.max() * max(u.shape[0], vh.shape[1]) * torch.finfo(s.dtype).eps
        return u * root, vh * torch.where(live, root, torch.ones_like(root)).unsqueeze(-1)
    raise ValueError(f"unknown FlexLoRA split {split!r}; choose from {get_args(Split)}")


class FlexLoRA(Aggregator):
    """FlexLoRA. Options: ``split`` ('reference' | 'sqrt'), ``svd`` ('auto' | 'exact' |
    'randomized' | 'dense'), ``rtol`` of the randomized path, ``chunk_bytes`` memory bound."""

    name = "flexlora"

    def __init__(
        self, split: Split = "reference", svd: Method = "auto", rtol: float = RTOL, chunk_bytes: int = 512 << 20
    ):
        if split not in get_args(Split):
            raise ValueError(f"unknown FlexLoRA split {split!r}; choose from {get_args(Split)}")
        if svd not in get_args(Method):
            raise ValueError(f"unknown SVD method {svd!r}; choose from {get_args(Method)}")
        self.split, self.svd, self.rtol, self.chunk_bytes = split, svd, rtol, chunk_bytes

    def aggregate(self, updates, weights, max_ranks, scale, previous=None) -> Adapter:
        names, p = validate(updates, weights)
        missing = sorted(set(names) - set(max_ranks))
        if missing:
            raise ValueError(f"flexlora: max_ranks lacks modules {missing[:3]}")
        triplets = flexlora_triplets(
            updates, p, {n: max_ranks[n] for n in names}, method=self.svd, rtol=self.rtol, chunk_bytes=self.chunk_bytes
        )
        return self._factors(triplets, {n: updates[0][n].b.dtype for n in names}, scale)

    def _factors(self, triplets: Mapping[str, Triplets], dtypes: Mapping[str, torch.dtype], scale) -> Adapter:
        out = {}
        for name, dtype in dtypes.items():
            rank = triplets[name][1].shape[0]
            b, a = split_factors(triplets[name], scale(rank), self.split)
            out[name] = Factors(b=b.to(dtype), a=a.to(dtype), scale=scale(rank))
        return out

    secure_mean = "dense"  # its SVD needs Σ p_i s_i B_i A_i

    def aggregate_dense(self, dense, max_ranks, scale) -> Adapter:
        """The same SVD and split from dW = Σ p_i s_i B_i A_i already summed (secure aggregation:
        the weighted mean of the clients' dense updates), one module at a time."""
        triplets = {}
        for name in sorted(dense):
            w = dense[name].to(torch.promote_types(dense[name].dtype, torch.float32))
            d, k = w.shape
            rank = min(max_ranks[name], d, k)
            if self.svd == "randomized":
                u, s, vh = randomized_top_singular(w.unsqueeze(0), rank, rtol=self.rtol)
            else:  # the sum is dense already: the exact SVD costs no more than forming it did
                u, s, vh = dense_top_singular(w.unsqueeze(0), rank)
            u, vh = _fix_signs(u, vh)
            triplets[name] = (u[0], s[0], vh[0])
        return self._factors(triplets, {n: torch.float32 if dense[n].dtype == torch.float64 else dense[n].dtype for n in dense}, scale)

    def distribute(self, global_adapter, ranks, scale) -> Adapter:
        if self.split == "reference":
            return super().distribute(global_adapter, ranks, scale)
        out = {}
        for name, f in global_adapter.items():
            # truncate() moves s_max/s(r) into B; the balanced split shares it between B and A.
            t = truncate(f, ranks[name], scale(ranks[name]))
            if not f.b.any():  # a fresh LoRA (round 1): no product to balance, so both splits start alike
                out[name] = t
                continue
            root = math.sqrt(f.scale / t.scale)
            out[name] = Factors(b=t.b / root, a=t.a * root, scale=t.scale)
        return out
