"""Hand-fused pieces of a bf16 training step on a CPU: fewer passes over memory than eager PyTorch.

On a CPU with AMX the bf16 GEMMs of a SmolLM2 step take about a third of its time; the rest is
element-wise work, and a bf16 element-wise op on data out of cache runs at a few GB/s. Two
pieces of the step are rewritten here as autograd functions whose backward does only what the
frozen base needs (``benchmarks/client_step.py``, docs/results.md):

- ``LoraBranch``, PEFT's LoRA branch in the activations' dtype. PEFT computes ``s·B(A x)`` in the
  factors' dtype: with float32 factors over a bf16 base, every adapted projection casts its input
  to float32, runs two float32 GEMMs, scales, adds and casts back, and autograd does the same in
  reverse. Here the factors are cast to bf16 once per call (r × d, tiny), the branch runs as two
  bf16 GEMMs added onto the base output by ``addmm``, and the backward returns float32 gradients
  for the float32 factors (which the optimizer updates in float32, as before). Installed as a PEFT
  ``LoraVariant`` (PEFT's own hook for DoRA and the like), so adapters, slots and saving are
  PEFT's as ever. Only under autograd: without gradients (evaluation) the branch is PEFT's own,
  so a run evaluates exactly what a user's ``PeftModel`` on the same bf16 base computes.
- ``RMSNorm``, Llama's RMSNorm with a frozen weight: the forward is Transformers' own, op for
  op (the same numbers), and a backward that recomputes the normalised input from the bf16 input and the
  per-row scale instead of keeping float32 copies (eager autograd keeps four).

Both compute what the eager modules compute up to bf16 rounding (tests/test_fused.py).
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import LoraVariant

from flexfed.lora import lora_modules


class LoraBranch(torch.autograd.Function):
    """``result + scale · (x Aᵀ) Bᵀ`` in ``x``'s dtype; the gradients of ``a`` and ``b`` in theirs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, result: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        a_low, b_low = a.to(x.dtype), (b * scale).to(x.dtype)
        xa = rows @ a_low.T
        out = torch.addmm(result.reshape(-1, result.shape[-1]), xa, b_low.T)
        ctx.save_for_backward(rows, xa, a_low, b_low)
        ctx.scale, ctx.factor_dtypes, ctx.x_shape = scale, (a.dtype, b.dtype), x.shape
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, xa, a_low, b_low = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gb = g @ b_low  # scale · g B: (tokens, r)
        grad_x = (gb @ a_low).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_a = (gb.T @ rows).to(ctx.factor_dtypes[0]) if ctx.needs_input_grad[2] else None
        grad_b = (g.T @ xa).to(ctx.factor_dtypes[1]).mul_(ctx.scale) if ctx.needs_input_grad[3] else None
        return grad_x, grad, grad_a, grad_b, None


class LowPrecisionBranch(LoraVariant):
    """The plain LoRA branch through ``LoraBranch``. Merging is the plain one (``W + s B A``);
    flexfed does not merge into a bf16 base (``LocalTrainer.merged``), but PEFT's own merge works."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        pass

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        x = module.lora_dropout[active_adapter](x)
        if not torch.is_grad_enabled():  # inference: exactly PEFT's branch, as a user's PeftModel computes it
            return result + lora_b(lora_a(x.to(lora_a.weight.dtype))) * module.scaling[active_adapter]
        return LoraBranch.apply(x, result, lora_a.weight, lora_b.weight, module.scaling[active_adapter])


def use_low_precision_branch(peft_model, adapter_name: str) -> None:
    """Route adapter ``adapter_name``'s LoRA branches through ``LoraBranch``; PEFT then passes
    the layers' input uncast (``cast_input_dtype_enabled``), in the base's dtype."""
    for layer in lora_modules(peft_model).values():
        layer.lora_variant[adapter_name] = LowPrecisionBranch()  # PEFT holds variant instances
        layer.cast_input_dtype_enabled = False


class RMSNorm(torch.autograd.Function):
    """Llama's RMSNorm, ``w · (x / rms(x))`` with the statistics in float32 and ``w`` frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(_stats_dtype(x), copy=True)  # a copy even of a float32 x: it is scaled in place
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, rstd, weight)
        return xf.mul_(rstd).to(x.dtype).mul_(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        x_hat = x.to(_stats_dtype(x), copy=True).mul_(rstd)
        g = (grad * weight).to(x_hat.dtype)
        dot = (g * x_hat).mean(-1, keepdim=True)
        return g.sub_(x_hat.mul_(dot)).mul_(rstd).to(x.dtype), None, None


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Give every Llama-style RMSNorm of ``model`` (a ``weight`` and ``variance_epsilon``) the
    fused forward, used while its weight is frozen; the number fused."""
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = _fused_norm_forward.__get__(module)
            count += 1
    return count


def _fused_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad:  # a caller unfroze it: the module's own forward has its gradient
        return type(self).forward(self, hidden_states)
    return RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)
