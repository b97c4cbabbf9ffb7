"""Training precision: which numbers a client step computes in, chosen per machine.

``training.precision``:

- ``fp32``: everything in float32.
- ``bf16``: the frozen base weights are stored in bfloat16 once; the LoRA factors, their
  gradients, the optimizer state and the loss stay float32 (PEFT computes the adapter branch in
  the factors' dtype). Three details make it fast on CPUs with AMX / AVX-512 BF16
  (``benchmarks/client_step.py``):

  * attention is computed in float32 when a backward pass follows (``flexfed_sdpa``): PyTorch's
    CPU flash-attention backward runs faster in float32 than in bfloat16 (5.5 against 8.2 ms
    for one SmolLM2 layer at batch 4 x 208 tokens on a Xeon with AMX);
  * batch widths are padded to a multiple of ``PAD_MULTIPLE``: oneDNN builds a GEMM kernel for
    every new matrix shape, and a new width at every step made the base GEMMs 4x slower
    (365 against 1,716 GFLOP/s in a 576 x 1536 projection);
  * generation slices the last position before the output head; ``evaluation`` makes that
    slice contiguous (a strided bf16 input made PyTorch copy the whole head once per row);
  * the LoRA branch runs in bf16 as one autograd function, and RMSNorm as another
    (``flexfed.fused``): PEFT's float32 branch cast every adapted projection's input to float32
    and back, and element-wise work is most of a bf16 step's time on a CPU.

  Evaluation runs in bf16 too, and reads losses higher than fp32 does on a trained adapter
  (5-8% on SmolLM2 after a round; the no-grad output head computes in fp32, ``client.head_logits``,
  which removes a quarter of that): compare losses across machines in fp32 (docs/results.md).

- ``autocast``: float32 weights under ``torch.autocast(bfloat16)``, which re-casts every frozen
  weight at every step (slower than ``bf16`` on the machines measured; kept for comparison).
- ``auto``: ``bf16`` where the device computes bfloat16 natively, else ``fp32``. On a CPU,
  "natively" needs the instructions (AVX-512 BF16 or AMX) and a measurement: a bfloat16 GEMM of
  a training step's shape must run at least ``NATIVE_SPEEDUP`` times faster than float32, so a
  CPU that emulates bfloat16 keeps float32. Methods that write into the base weights (``writes_base``: FLoRA's
  merges, FedKSeed's perturbations of size ε) stay float32 under ``auto``, since bfloat16 would
  round those writes away; asking them for ``bf16`` explicitly is an error.
"""

from __future__ import annotations

import time
from functools import lru_cache

import torch

PAD_MULTIPLE = 16  # batch widths on the bf16 path: rows x 16k tokens, a few GEMM shapes per run
NATIVE_SPEEDUP = 1.5  # bf16 GEMMs at least this much faster than fp32 count as native
ATTENTION = "flexfed_sdpa"


@lru_cache(maxsize=None)
def bf16_gemm_speedup(threads: int) -> float:
    """bf16 over fp32 GEMM throughput on this CPU (1024 x 576 @ 576 x 1536), the best of three
    tries: a try can land on a moment the machine is busy, never on a faster machine. Measured
    once per process and thread count (``threads``: the cache key)."""
    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(1024, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        a @ b, a @ b
        times = []
        for _ in range(10):
            began = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - began)
        return min(times)

    return max(best(torch.float32) / best(torch.bfloat16) for _ in range(3))


def bf16_native(device: torch.device) -> bool:
    """bf16 runs natively: on a CPU, the instructions exist (AVX-512 BF16 or AMX) and measured
    bf16 GEMMs beat fp32 by ``NATIVE_SPEEDUP`` (6-8x with AMX; below 1 where emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        has_instructions = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return has_instructions and bf16_gemm_speedup(torch.get_num_threads()) >= NATIVE_SPEEDUP
    return False


def resolve(precision: str, device: torch.device, writes_base: bool = False) -> str:
    """``fp32``, ``bf16`` or ``autocast`` for a ``training.precision`` setting on ``device``."""
    if precision == "auto":
        return "bf16" if bf16_native(device) and not writes_base else "fp32"
    if precision == "bf16" and writes_base:
        raise ValueError("training.precision=bf16: this method writes into the base weights, which bfloat16 would round "
                         "(FLoRA merges, FedKSeed's ε-perturbations); use fp32 or auto")
    return precision


def base_dtype(config, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype a run's trainer holds its base weights in on ``device`` (``model.dtype``, or
    bfloat16 when the precision resolves to ``bf16``)."""
    if resolve(config.training.precision, torch.device(device), config.federation.writes_base) == "bf16":
        return torch.bfloat16
    return getattr(torch, config.model.dtype)


def use_bf16_weights(model: torch.nn.Module) -> None:
    """Store ``model``'s frozen weights in bfloat16, route its attention through ``flexfed_sdpa``
    and its RMSNorms through the fused one (``flexfed.fused``)."""
    from flexfed.fused import fuse_rms_norms

    model.to(torch.bfloat16)
    fuse_rms_norms(model)
    if hasattr(model, "set_attn_implementation"):
        _register_attention()
        model.set_attn_implementation(ATTENTION)


@lru_cache(maxsize=1)
def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _sdpa)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # without a mask function, padding would be attended


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    """PyTorch's SDPA as Transformers calls it, in float32 when a backward pass will follow."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not torch.is_grad_enabled() or query.dtype == torch.float32:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def padded_width(width: int, multiple: int) -> int:
    return -(-width // multiple) * multiple
