"""A client's compute and memory in a round: FLOPs (counted and by formula) and peak training memory.

FLOPs are counted with PyTorch's flop formulas (``FlopCount``, the op-level core of
``torch.utils.flop_counter.FlopCounterMode``) on one step, the client's
first (forward, backward), and extended to the round's steps by the formula's ratio: counted x
formula(all steps) / formula(that step). The formula (``Architecture.step_flops``), for a batch
of B rows padded to T tokens with R labelled positions, N the weights of the decoder's linear
layers, N0 those of the first layer's q, k, v (their input needs no gradient), P the LoRA
parameters, L layers and q the query width::

    2 N B T          forward through the frozen body
  + 2 (N - N0) B T   input gradients through it (no weight gradients: it is frozen)
  + 6 P B T          LoRA: forward, input and weight gradients
  + 14 L q B T^2     attention: QKᵀ and its product with V (4 L q B T² forward, 2.5x that backward)
  + 4 h V R          the output projection on labelled positions only, forward and input gradient

On SmolLM2-135M this is ~0.42 GFLOP per training token (SPEC).

Peak memory (``peak_memory_bytes``): on CUDA ``torch.cuda.max_memory_allocated`` over the
client's training (its passes, when clients share them); on a CPU, where PyTorch keeps no
allocation high-water mark, the estimate of ``resources.TrainingMemory`` (weights, adapter and
optimizer state, activations, logits) for the client's largest batch. ``peak_memory_source``
says which. A process's resident-set high-water mark is no per-client measure: memory a client
frees stays resident in the allocator, so the next client's training adds next to nothing to it
(``benchmarks/memory.py`` measures it in a fresh process per case instead).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from flexfed.data.prompts import IGNORE_INDEX as IGNORE


def _count_cpu_attention() -> None:
    """PyTorch counts the CUDA attention kernels but not the CPU one: count it with the same formulas."""
    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
    def forward(query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
    def backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_count_cpu_attention()


class FlopCount(TorchDispatchMode):
    """Sums the FLOPs of the ops run inside it, by PyTorch's own formulas (``flop_registry``).

    ``FlopCounterMode`` does the same per module, through module hooks on the forward and
    backward; those hooks reorder autograd's gradient sums, so a step counted under it differs in
    the last bits from the same step uncounted. This mode only watches ops: a counted step is
    bit-identical to an uncounted one (tested), and cheaper."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out

    def get_total_flops(self) -> int:
        return self.total


@dataclass(frozen=True)
class Architecture:
    """What the FLOP formula and the CPU memory estimate need to know of a base model."""

    body: int  # N
    first_qkv: int  # N0
    layers: int
    q_dim: int
    hidden: int
    vocab: int
    memory: object  # resources.TrainingMemory, workload to be filled in per client

    @classmethod
    def of(cls, model, training, autocast: bool) -> Architecture:
        """Read off a Hugging Face causal LM before PEFT wraps it."""
        from flexfed.resources import TrainingMemory

        decoder = model.get_decoder()
        linears = {n: m for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)}
        first = [m for n, m in linears.items() if n.startswith("layers.0.") and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")]
        memory = TrainingMemory.from_model(
            model, {}, batch_size=0, max_tokens=0, response_tokens=0, autocast=autocast and model.dtype == torch.float32,
            optimizer_states=2 if training.optimizer == "adamw" else int(training.momentum > 0),
        )
        return cls(
            body=sum(m.weight.numel() for m in linears.values()),
            first_qkv=sum(m.weight.numel() for m in first),
            layers=memory.layers, q_dim=memory.q_dim, hidden=memory.hidden, vocab=memory.vocab, memory=memory,
        )

    def forward_flops(self, rows: int, width: int, scored: int) -> int:
        """One inference pass (no gradients) over B rows of T tokens, the head on ``scored``
        positions: 2 N B T through the body, 4 L q B T² attention, 2 h V per scored position."""
        return 2 * self.body * rows * width + 4 * self.layers * self.q_dim * rows * width * width + 2 * self.hidden * self.vocab * scored

    def step_flops(self, rows: int, width: int, labelled: int, lora_params: int) -> int:
        tokens = rows * width
        body = 2 * self.body * tokens + 2 * (self.body - self.first_qkv) * tokens + 6 * lora_params * tokens
        return body + 14 * self.layers * self.q_dim * rows * width * width + 4 * self.hidden * self.vocab * labelled


class StepCost:
    """Accumulates one client's cost over its local steps: ``measure`` the first one, ``add`` each."""

    def __init__(self, arch: Architecture, device: torch.device, lora_params: int, shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int]):
        self.arch, self.device, self.lora_params = arch, device, lora_params
        self.shapes, self.ranks = dict(shapes), dict(ranks)
        self.counted: int | None = None
        self.first = 0  # the formula's FLOPs of the counted step
        self.formula = 0
        self.widest = (0, 0, 0)  # rows, width, labelled per row: the largest batch
        self.padded = 0  # rows x width summed over the steps: the tokens the formulas of SPEC §9 count
        self.peak = 0

    def flop_counter(self):
        """The context to run the counted step in (a fresh counter for the first step, else none)."""
        return FlopCount() if self.counted is None else None

    def step_flops(self, batch: Mapping[str, torch.Tensor]) -> int:
        rows, width = batch["input_ids"].shape
        return self.arch.step_flops(rows, width, int((batch["labels"][:, 1:] != IGNORE).sum()), self.lora_params)

    def add(self, batch: Mapping[str, torch.Tensor], counted: int | None = None) -> None:
        """One local step on ``batch``; ``counted``: the FLOPs counted on it, if it was counted."""
        flops = self.step_flops(batch)
        self.formula += flops
        if counted is not None and self.counted is None:
            self.counted, self.first = counted, flops
        rows, width = batch["input_ids"].shape
        self.padded += rows * width
        self.widest = max(self.widest, (rows, width, int((batch["labels"][:, 1:] != IGNORE).sum(dim=1).max())))

    def record_peak(self) -> None:
        """Take CUDA's allocation high-water mark since the last ``reset_peak`` (no-op on a CPU)."""
        if self.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def result(self) -> dict:
        counted = round(self.counted * self.formula / self.first) if self.counted and self.first else 0
        if self.device.type == "cuda":
            peak, source = self.peak, "cuda_max_allocated"
        else:
            rows, width, labelled = self.widest
            memory = replace(self.arch.memory, shapes=self.shapes, batch_size=rows, max_tokens=width, response_tokens=labelled)
            peak, source = memory.estimate(self.ranks).total, "estimate"
        return {"flops": counted, "flops_analytic": self.formula, "tokens_padded": self.padded, "peak_memory_bytes": int(peak), "peak_memory_source": source}
