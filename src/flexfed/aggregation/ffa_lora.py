"""FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313): freeze A, train and average only B.

Every client draws the same A from a shared seed (``shared_a``) and never updates it, so the
average of the B's is the exact average of the updates: sum_i p_i s B_i A = s (sum_i p_i B_i) A.
It also halves the traffic (r d numbers per matrix each way) and keeps the aggregate linear in
what clients send, which is what differential-privacy noise and secure aggregation need. The
aggregator checks that the A's really are identical and refuses otherwise, since a differing A
would silently turn the exact average into FedIT's approximation.

On the wire only B travels (r d numbers per matrix each way): every party rebuilds A with
``shared_a`` (``common``), and the round-0 global adapter is B = 0 with that A.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flexfed.aggregation.base import SharedFactorAggregator, payload_key, payload_parts, seeded_generator
from flexfed.lora import Adapter, Factors


def shared_a(seed: int, name: str, rank: int, d_in: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The frozen A of module ``name``: PEFT's init, U(-1/sqrt(d_in), 1/sqrt(d_in)), from a shared seed.

    PEFT's kaiming_uniform_(a=sqrt(5)) has exactly this bound. The generator is seeded from the
    run seed and the module name (crc32, stable across processes and Python versions), so every
    client, in any process, draws the same A for the same module.
    """
    generator = seeded_generator(seed, name)
    bound = 1.0 / math.sqrt(d_in)
    return ((torch.rand(rank, d_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound).to(dtype)


class FFALoRA(SharedFactorAggregator):
    name = "ffa-lora"
    frozen = "a"
    trainable = ("b",)

    def common(self, name, shape, rank, scale, seed) -> Factors:
        d_out, d_in = shape
        return Factors(b=torch.zeros(d_out, rank), a=shared_a(seed, name, rank, d_in), scale=scale)

    def initial(self, peft_init, common) -> Adapter:
        return dict(common)

    def encode(self, adapter, common):
        return {payload_key(n, "b"): f.b for n, f in adapter.items()}

    def decode(self, payload, modules, common, scale) -> Adapter:
        parts = payload_parts(payload, modules, ("b",))
        return {m: Factors(b=t["b"], a=common[m].a, scale=common[m].scale) for m, t in parts.items()}
