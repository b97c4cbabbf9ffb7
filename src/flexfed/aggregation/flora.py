"""FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976): stack client factors for the exact sum.

Per adapted matrix the server concatenates

    B = [B_1, ..., B_K]  (d x R),    A = [c_1 A_1; ...; c_K A_K]  (R x k),   c_i = p_i s(r_i) / s(R)

with R = sum_i r_i, so that s(R) B A = sum_i p_i s(r_i) B_i A_i exactly, whatever the ranks: no
padding or averaging noise. The stacked adapter is a valid rank-R LoRA adapter at scale s(R).

A round differs from FlexLoRA's: the stacked update is *merged into the base weights* (everyone
receives the R (d + k) numbers of every matrix), and each client then starts a *fresh* LoRA of
its own rank (PEFT's default init, B = 0). ``merges_into_base`` says so to the server and
client; ``distribute`` returns the stacked adapter unchanged, i.e. what goes down the wire, and
``merged_delta`` / ``merge_into_base`` turn it into weight updates.

The cumulative update (everything merged so far, W = W0 + ΔW) is kept as one more exact stack,
``flora_accumulate``: the rounds' stacks concatenated, which is a PEFT LoRA adapter of the original
base model. Once its rank would exceed min(d_out, d_in) it is re-factored by a full SVD of the
dense ΔW at rank min(d_out, d_in) (every singular triplet kept: exact up to rounding), so it never
grows past the size of a dense factorization.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from flexfed.aggregation.base import Aggregator, Scale, validate
from flexfed.lora import Adapter, Factors


def flora_stack(factors: Sequence[Factors], p: Sequence[float], scale: Scale) -> Factors:
    """The stacked rank-R adapter whose product is exactly sum_i p_i s_i B_i A_i (p_i = 0 skipped)."""
    kept = [(pi, f) for pi, f in zip(p, factors) if pi > 0]
    total = sum(f.rank for _, f in kept)
    target = scale(total)
    dtype = factors[0].b.dtype
    b = torch.cat([f.b.to(dtype) for _, f in kept], dim=1)
    a = torch.cat([(f.a.double() * (pi * f.scale / target)).to(dtype) for pi, f in kept], dim=0)
    return Factors(b=b, a=a, scale=target)


def merged_delta(global_adapter: Mapping[str, Factors], dense: bool = True, dtype: torch.dtype = torch.float32):
    """What merging adds to each base weight: dense tensors s B A, or the factors themselves."""
    if not dense:
        return dict(global_adapter)
    return {name: f.delta(dtype) for name, f in global_adapter.items()}


def merge_into_base(weights: Mapping[str, Tensor], global_adapter: Mapping[str, Factors]) -> dict[str, Tensor]:
    """New base weights W + s B A (module name -> d_out x d_in tensor), computed in float32 or better."""
    missing = sorted(set(global_adapter) - set(weights))
    if missing:
        raise KeyError(f"no base weight for adapted modules {missing[:3]}")
    out = {}
    for name, f in global_adapter.items():
        w = weights[name]
        if tuple(w.shape) != f.shape:
            raise ValueError(f"{name}: base weight {tuple(w.shape)} does not match the update {f.shape}")
        work = torch.promote_types(w.dtype, torch.float32)
        out[name] = (w.to(work) + f.delta(work)).to(w.dtype)
    return out


def flora_accumulate(merged: Mapping[str, Factors], stack: Mapping[str, Factors], scale: Scale) -> Adapter:
    """``merged`` + ``stack`` as one adapter: concatenated, or re-factored at full rank by SVD (see above)."""
    out = dict(merged)
    for name, f in stack.items():
        if name not in out:
            out[name] = f
            continue
        total = flora_stack([out[name], f], [1.0, 1.0], scale)
        full = min(total.shape)
        if total.rank > full:
            u, sv, vh = torch.linalg.svd(total.delta(torch.float64), full_matrices=False)
            dtype = total.b.dtype
            total = Factors(b=(u * (sv / scale(full))).to(dtype), a=vh.to(dtype), scale=scale(full))
        out[name] = total
    return out


class FLoRA(Aggregator):
    name = "flora"
    merges_into_base = True

    def initial(self, peft_init, common) -> Adapter:
        return {}  # nothing merged yet, nothing to send down

    def accumulate(self, merged, global_adapter, scale) -> Adapter:
        return flora_accumulate(merged, global_adapter, scale)

    def kept(self, global_adapter) -> Adapter:
        return {}  # the global is the stack to merge next: unchanged means nothing new to merge

    def evaluated(self, global_adapter, fresh) -> Adapter:
        return fresh  # the global update is in the base

    def over_base(self, global_adapter, merged, fresh) -> Adapter:
        return dict(merged) or fresh  # zero before any merge

    def sent_alone(self, start, merged) -> Adapter:
        """A node keeps no base between rounds (and may not have been sampled last round): it is
        sent the whole cumulative update, to merge into W0, instead of the last stack."""
        return dict(merged)

    def client_base(self, received) -> Adapter | None:
        return received() or None

    def start(self, received, fresh) -> Adapter:
        return fresh()  # what was received went into the base; LoRA restarts

    def written(self, updates, weights, ranks, scale) -> dict[int | None, Adapter]:
        if ranks is not None:
            raise ValueError(f"{self.name} writes its exact stacked adapter (rank = sum of input ranks); do not pass ranks")
        return {None: self.aggregate(updates, weights, {}, scale)}

    def aggregate(self, updates, weights, max_ranks, scale, previous=None) -> Adapter:
        names, p = validate(updates, weights)
        return {n: flora_stack([u[n] for u in updates], p, scale) for n in names}

    def distribute(self, global_adapter, ranks, scale) -> Adapter:
        """The stacked adapter itself: the client merges it into its base, then starts a fresh LoRA."""
        return dict(global_adapter)
