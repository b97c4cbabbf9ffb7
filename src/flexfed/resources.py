"""Client resources: which LoRA rank each client can afford on each adapted module.

A *rank type* gives a rank per module kind (attention q,k,v,o vs MLP gate,up,down); a
*distribution* says what share of clients has each type (FlexLoRA paper, Table 1 and Fig. 3).
Ranks are capped at min(d_out, d_in) of each module: a rank-200 type on SmolLM2's 576 x 192
k/v projections trains rank 192 there, because a larger rank adds no expressiveness.

Instead of shares of types, clients may have memory budgets (``distribution: memory``): each
gets the largest type whose estimated peak training memory (``TrainingMemory``) fits its budget.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Mapping, Sequence

from flexfed.lora import ATTENTION, MLP, module_kind

log = logging.getLogger(__name__)

GIB = 2**30

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


def quota_counts(num_clients: int, mix: Mapping[str, float]) -> dict[str, int]:
    """How many of ``num_clients`` get each name of ``mix`` (shares, any positive scale).

    Largest remainder (Hamilton): each name gets the whole part of its quota N·share/Σshares,
    and the seats left go one each to the largest fractional parts. Ties go to the larger share,
    then to the name that sorts first (T2 before T3). Shares are read as the decimals they are
    written as (0.05 is 1/20, not the nearest binary float), so 50 x 0.05 is exactly 2.5 and
    the tie is a true tie. The counts sum to N and differ from every quota by less than one.
    """
    shares = {n: Fraction(repr(float(w))) for n, w in mix.items() if w > 0}
    total = sum(shares.values())
    if not shares or total <= 0:
        raise ValueError(f"rank-type shares must be non-negative and not all zero, got {dict(mix)}")
    quotas = {n: num_clients * w / total for n, w in shares.items()}
    counts = {n: math.floor(q) for n, q in quotas.items()}
    left = num_clients - sum(counts.values())
    by_remainder = sorted(shares, key=lambda n: (-(quotas[n] - counts[n]), -shares[n], n))
    for n in by_remainder[:left]:
        counts[n] += 1
    return dict(sorted(counts.items()))


def assign_types(num_clients: int, mix: Mapping[str, float], seed: int) -> list[str]:
    """Each client's type: exactly ``quota_counts`` of each, in an order shuffled by the seed.

    Drawing each client independently would make the realised shares noisy (50 clients of
    heavy-tail-light drew 41/1/3/5 instead of 40/2.5/2.5/5); quotas keep them as close as
    whole clients allow, and the shuffle still decides which client is which type."""
    assignment = [n for n, c in quota_counts(num_clients, mix).items() for _ in range(c)]
    random.Random(f"{seed}/rank-types").shuffle(assignment)
    return assignment


def max_ranks(profiles: Sequence[RankProfile]) -> dict[str, int]:
    """The largest rank any profile uses on each module: what the global adapter must keep."""
    out: dict[str, int] = {}
    for p in profiles:
        for m, r in p.ranks.items():
            out[m] = max(out.get(m, 0), r)
    return out


def rank_types(resources) -> dict[str, tuple[int, int]]:
    """T1..T4 with the config's ``types`` added or overriding: name -> (attention rank, MLP rank)."""
    return {**RANK_TYPES, **{n: (t.attention, t.mlp) for n, t in resources.types.items()}}


def client_mix(resources) -> dict[str, float]:
    """Shares of clients by rank type, or by budget under ``distribution: memory`` (equal shares
    unless ``mix`` says otherwise); names with share 0 are left out."""
    if resources.distribution == "memory":
        mix = resources.mix or dict.fromkeys(resources.budgets_gib, 1.0)
    elif resources.distribution == "custom":
        mix = resources.mix
    else:
        mix = DISTRIBUTIONS[resources.distribution]
    return {n: mix[n] for n in sorted(mix) if mix[n] > 0}


def client_profiles(resources, lora, shapes: Mapping[str, tuple[int, int]], num_clients: int, seed: int, memory: TrainingMemory | None = None):
    """(profiles, profile index of each client) for a run's ``resources`` and ``lora`` config.

    Clients store an index into a short profile list, so 10,000 clients cost 10,000 small ints.
    ``distribution: memory`` needs ``memory``, the estimate that decides which type fits a budget.
    """
    if resources.distribution == "homogeneous":
        too_big = {m: min(s) for m, s in shapes.items() if lora.rank > min(s)}
        if too_big:
            name, cap = next(iter(too_big.items()))
            raise ValueError(f"lora.rank={lora.rank} is larger than layer {name} allows (min(d_out, d_in) = {cap})")
        log.info("clients per rank type: homogeneous (rank %d) %d", lora.rank, num_clients)
        return [resolve_type("homogeneous", lora.rank, lora.rank, shapes)], [0] * num_clients
    types = rank_types(resources)
    if resources.distribution == "memory":
        if memory is None:
            raise ValueError("resources.distribution=memory needs a training-memory estimate for the model")
        mix = client_mix(resources)
        names = sorted(mix)
        fits = fit_budgets({n: resources.budgets_gib[n] for n in names}, types, memory)
        chosen = sorted({p.name for p in fits.values()})  # several budgets may get the same type
        profiles = [next(p for p in fits.values() if p.name == n) for n in chosen]
        index = {b: chosen.index(fits[b].name) for b in names}
    else:
        mix = client_mix(resources)
        unknown = sorted(set(mix) - set(types))
        if unknown:
            raise ValueError(f"resources.mix names unknown rank types {unknown}; known: {sorted(types)}")
        names = sorted(mix)
        profiles = [resolve_type(n, *types[n], shapes) for n in names]
        index = {n: i for i, n in enumerate(names)}
    assignment = [index[n] for n in assign_types(num_clients, mix, seed)]
    log.info("clients per rank type: %s", ", ".join(f"{p.name} {assignment.count(i)}" for i, p in enumerate(profiles)))
    return profiles, assignment


# ----------------------------------------------------------------------------- memory budgets

# Projections that read the same tensor: in full precision LoRA keeps one copy of it for all.
_SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of one client's training step, by what holds them."""

    weights: int  # the frozen base model
    adapter: int  # LoRA parameters, their gradients, the optimizer's state
    activations: int  # kept for backward by the decoder layers and the LoRA layers
    logits: int  # the output projection on labelled positions, at its peak in backward

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations + self.logits


@dataclass(frozen=True)
class TrainingMemory:
    """An estimate of one client's peak memory in a LoRA training step: ``estimate(ranks)``.

    It counts the tensors that dominate, for the worst batch the data allows: ``batch_size``
    sequences of ``max_tokens`` tokens with ``response_tokens`` labelled positions each. Not
    counted: the process itself (Python, libraries, a CUDA context), allocator slack and
    short-lived buffers inside one operation; leave headroom for those.

    With N = batch_size x max_tokens, Rt = batch_size x response_tokens, L layers, hidden h,
    MLP width i, query width q = heads x head_dim, key/value width kv = kv_heads x head_dim,
    vocabulary V, w = bytes per weight, a = bytes per activation inside the frozen layers (2
    under bf16 autocast or with bf16 weights, else 4), b = bytes per LoRA activation (2 under
    autocast, else 4: PEFT keeps adapters in fp32) and S optimizer states (AdamW 2, SGD with
    momentum 1, plain SGD 0)::

      weights     = params x w
      adapter     = lora_params x 4 x (2 + S)          fp32 parameters, gradients, states
      activations = N x L x (2h x 4 + (q + 2kv + 3i) x a)
                        the residual stream at both norms (fp32: autocast leaves it so, and
                        LoRA's fp32 output promotes it in a bf16 model); q, k, v for attention;
                        gate, up and silu(gate) in the MLP. Frozen projections keep no input:
                        their input gradient needs only the weight.
                  + N x sum over adapted modules of (r + d_in) x b
                        LoRA's rank-r intermediate and its input. In full precision q,k,v (and
                        gate,up) share one input; otherwise each module casts its own copy.
                  + (linear_params + lora_params) x 2, under autocast only
                        the bf16 copy of every weight that a projection keeps for its input
                        gradient (autocast does not cache the casts of frozen weights, so each
                        projection keeps its own).
      logits      = Rt x V x 12
                        the fp32 log-softmax kept for backward, the gradient arriving at it and
                        the one leaving it (the projection is computed on labelled positions
                        only, see ``client.response_loss``).

    The peak is at the start of backward, when every saved activation is still alive. On
    SmolLM2-135M the activation terms match what autograd saves to within 1% in fp32 and 5%
    under autocast, and the whole estimate came within 2% of the measured peak of real fp32
    steps for T1, T3 and T4 (``benchmarks/memory.py``).
    """

    params: int  # all parameters of the base model, tied embeddings once
    linear_params: int  # those in linear layers, the output projection included
    layers: int
    hidden: int
    intermediate: int
    q_dim: int
    kv_dim: int
    vocab: int
    shapes: Mapping[str, tuple[int, int]]  # adapted module -> (d_out, d_in)
    batch_size: int
    max_tokens: int
    response_tokens: int
    weight_bytes: int = 4
    autocast: bool = False
    optimizer_states: int = 2

    @classmethod
    def from_model(cls, model, shapes: Mapping[str, tuple[int, int]], **workload) -> TrainingMemory:
        """Read the architecture off a Hugging Face causal LM (real or on the meta device)."""
        import torch

        c = model.config
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if getattr(c, k, None) is None]
        if missing:
            raise ValueError(f"cannot estimate training memory for {c.model_type}: its config has no {', '.join(missing)}")
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        return cls(
            params=sum(p.numel() for p in model.parameters()),
            linear_params=linear,
            layers=c.num_hidden_layers,
            hidden=c.hidden_size,
            intermediate=c.intermediate_size,
            q_dim=heads * head_dim,
            kv_dim=(getattr(c, "num_key_value_heads", None) or heads) * head_dim,
            vocab=c.vocab_size,
            shapes=dict(shapes),
            weight_bytes=next(model.parameters()).element_size(),
            **workload,
        )

    @classmethod
    def for_run(cls, config, model, shapes: Mapping[str, tuple[int, int]], device="cpu") -> TrainingMemory:
        """The estimate for a run's training and data settings; precision ``auto`` is resolved for ``device``."""
        import torch

        from flexfed.precision import resolve

        t = config.training
        precision = resolve(t.precision, torch.device(device), config.federation.writes_base)
        memory = cls.from_model(
            model,
            shapes,
            batch_size=t.batch_size,
            max_tokens=config.data.max_tokens,
            response_tokens=config.data.max_response_tokens,
            autocast=precision == "autocast" and model.dtype == torch.float32,
            optimizer_states=2 if t.optimizer == "adamw" else int(t.momentum > 0),  # SGD keeps a buffer only with momentum
        )
        return replace(memory, weight_bytes=2) if precision == "bf16" else memory  # the trainer stores the base in bf16

    def estimate(self, ranks: Mapping[str, int]) -> MemoryEstimate:
        """Peak bytes for a client training the LoRA ``ranks`` (adapted module -> rank)."""
        a = 2 if self.autocast or self.weight_bytes == 2 else 4
        b = 2 if self.autocast else 4
        tokens = self.batch_size * self.max_tokens
        lora_params = sum(r * sum(self.shapes[m]) for m, r in ranks.items())
        if a == 4:  # full precision: modules reading the same tensor keep it once
            groups = {(m.rsplit(".", 1)[0], _SHARED_INPUT.get(module_kind(m), m)): self.shapes[m][1] for m in ranks}
            inputs = sum(groups.values())
        else:
            inputs = sum(self.shapes[m][1] for m in ranks)
        layer = 2 * self.hidden * 4 + (self.q_dim + 2 * self.kv_dim + 3 * self.intermediate) * a
        activations = tokens * (self.layers * layer + (sum(ranks.values()) + inputs) * b)
        if self.autocast:
            activations += 2 * (self.linear_params + lora_params)
        return MemoryEstimate(
            weights=self.params * self.weight_bytes,
            adapter=lora_params * 4 * (2 + self.optimizer_states),
            activations=activations,
            logits=self.batch_size * self.response_tokens * self.vocab * 12,
        )

    def describe(self) -> str:
        precision = "bf16 autocast" if self.autocast else "bf16" if self.weight_bytes == 2 else "fp32"
        return f"batch {self.batch_size} x {self.max_tokens} tokens ({self.response_tokens} labelled), {precision}"


def fit_budgets(budgets_gib: Mapping[str, float], types: Mapping[str, tuple[int, int]], memory: TrainingMemory) -> dict[str, RankProfile]:
    """Each budget's rank type: the one with the largest estimate that fits (GiB = 2**30 bytes)."""
    profiles = [resolve_type(n, *types[n], memory.shapes) for n in sorted(types)]
    need = {p.name: memory.estimate(p.ranks).total for p in profiles}
    profiles.sort(key=lambda p: need[p.name])
    out = {}
    for budget, gib in budgets_gib.items():
        fitting = [p for p in profiles if need[p.name] <= gib * GIB]
        if not fitting:
            p = profiles[0]
            raise ValueError(
                f"resources.budgets_gib.{budget} = {gib:g} GiB fits no rank type: the smallest, {p.name}, "
                f"needs an estimated {need[p.name] / GIB:.3g} GiB ({memory.describe()})"
            )
        out[budget] = fitting[-1]
    return out


__all__ = [
    "ATTENTION", "DISTRIBUTIONS", "GIB", "MLP", "RANK_TYPES", "MemoryEstimate", "RankProfile", "TrainingMemory",
    "assign_types", "client_profiles", "fit_budgets", "max_ranks", "rank_types", "resolve_type",
]
