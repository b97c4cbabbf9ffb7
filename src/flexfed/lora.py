"""LoRA adapter tensors: the one scaling rule, moving factors in and out of a model, PEFT files.

An adapter is a plain mapping ``module name -> Factors`` (the name as in the base model's
``named_modules()``, e.g. ``model.layers.0.self_attn.q_proj``). Everything the server and the
aggregators touch is this mapping; model objects stay on the client side.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

_PEFT_PREFIX = "base_model.model."
_WEIGHTS = "adapter_model.safetensors"
_CONFIG = "adapter_config.json"


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
    """s(r): alpha/r as in PEFT, or alpha/sqrt(r) for rsLoRA. The only place this rule lives."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclass(frozen=True)
class Factors:
    """One adapted matrix: the update is ``scale * b @ a``."""

    b: Tensor  # (d_out, r)
    a: Tensor  # (r, d_in)
    scale: float

    def __post_init__(self):
        if self.b.ndim != 2 or self.a.ndim != 2 or self.b.shape[1] != self.a.shape[0]:
            raise ValueError(f"LoRA factors do not chain: b {tuple(self.b.shape)}, a {tuple(self.a.shape)}")

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.b.shape[0], self.a.shape[1]

    def to(self, device: torch.device | str) -> "Factors":
        return Factors(b=self.b.to(device), a=self.a.to(device), scale=self.scale)

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.scale * (self.b.to(dtype) @ self.a.to(dtype))

    def norm(self) -> float:
        """‖s B A‖_F, in float64: finite for any finite factors (inf only beyond float64)."""
        return abs(self.scale) * float(product_norm(self.b.double(), self.a.double()))


def product_norm(b: Tensor, a: Tensor) -> Tensor:
    """‖B A‖_F from the r x r Gram matrices, tr((BᵀB)(AAᵀ)) = ‖BA‖_F²: no d x k product.

    Differentiable (a method may penalise it in training); at exactly zero, where the square root
    has no derivative, the gradient is taken as 0, a subgradient, so a zero product gets no NaN."""
    squared = ((b.mT @ b) * (a @ a.mT)).sum().clamp_min(0)
    positive = squared > 0
    return torch.where(positive, torch.where(positive, squared, 1.0).sqrt(), 0.0)


Adapter = dict[str, Factors]


def module_kind(name: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``up_proj``."""
    return name.rsplit(".", 1)[-1]


# ----------------------------------------------------------------------------- PEFT models


def lora_modules(model) -> dict[str, torch.nn.Module]:
    """The LoRA-wrapped layers of a PEFT model, keyed by the base model's module name."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            out[name.removeprefix(_PEFT_PREFIX)] = module
    return out


def get_adapter(model, adapter_name: str = "default") -> Adapter:
    """Copy the active LoRA factors out of a PEFT model (detached, on CPU)."""
    out = {}
    for name, layer in lora_modules(model).items():
        out[name] = Factors(
            b=layer.lora_B[adapter_name].weight.detach().cpu().clone(),
            a=layer.lora_A[adapter_name].weight.detach().cpu().clone(),
            scale=float(layer.scaling[adapter_name]),
        )
    return out


def set_adapter(model, adapter: Mapping[str, Factors], adapter_name: str = "default") -> None:
    """Write factors into a PEFT model in place; ranks and scales must match what is there."""
    layers = lora_modules(model)
    if set(layers) != set(adapter):
        missing, extra = sorted(set(layers) - set(adapter)), sorted(set(adapter) - set(layers))
        raise KeyError(f"adapter does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, layer in layers.items():
            f = adapter[name]
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if a.shape != f.a.shape or b.shape != f.b.shape:
                raise ValueError(f"{name}: model has rank {a.shape[0]}, adapter has rank {f.rank}")
            if not math.isclose(layer.scaling[adapter_name], f.scale, rel_tol=1e-6):
                raise ValueError(f"{name}: model scale {layer.scaling[adapter_name]} != adapter scale {f.scale}")
            a.copy_(f.a)
            b.copy_(f.b)


# ----------------------------------------------------------------------------- PEFT files


def _rank_layout(ranks: Mapping[str, int]) -> tuple[int, dict[str, int]]:
    """Most common rank as ``r`` plus a rank_pattern (anchored full names) for the rest."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): r for name, r in ranks.items() if r != common}
    return common, pattern


def peft_config(
    base_model: str,
    ranks: Mapping[str, int],
    alpha: float,
    rslora: bool = False,
    dropout: float = 0.0,
):
    """A ``peft.LoraConfig`` for per-module ranks (module name -> rank)."""
    from peft import LoraConfig

    r, rank_pattern = _rank_layout(ranks)
    kinds = sorted({module_kind(n) for n in ranks})
    return LoraConfig(
        base_model_name_or_path=base_model,
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=rslora,
        target_modules=kinds,
        rank_pattern=rank_pattern,
    )


def save_adapter(path: str | Path, adapter: Mapping[str, Factors], base_model: str, alpha: float, rslora: bool = False) -> Path:
    """Write ``adapter`` as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, f in adapter.items():
        expected = lora_scale(f.rank, alpha, rslora)
        if not math.isclose(f.scale, expected, rel_tol=1e-6):
            raise ValueError(f"{name}: scale {f.scale} is not s({f.rank}) = {expected} for alpha={alpha}")
    config = peft_config(base_model, {n: f.rank for n, f in adapter.items()}, alpha, rslora)
    config.save_pretrained(str(path))
    tensors = {}
    for name, f in adapter.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = f.a.contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = f.b.contiguous()
    save_file(tensors, str(path / _WEIGHTS), metadata={"format": "pt"})
    return path


@dataclass(frozen=True)
class AdapterFile:
    adapter: Adapter
    base_model: str
    alpha: float
    rslora: bool
    target_modules: tuple[str, ...]


def load_adapter(path: str | Path) -> AdapterFile:
    """Read a PEFT LoRA adapter directory (any ranks) without loading a model."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / _CONFIG).is_file() or not (path / _WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: not a PEFT adapter directory (need {_CONFIG} and {_WEIGHTS})")
    config = json.loads((path / _CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path / _CONFIG}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    alpha, rslora = float(config["lora_alpha"]), bool(config.get("use_rslora", False))
    tensors = load_file(str(path / _WEIGHTS))
    names = sorted({k.removeprefix(_PEFT_PREFIX).rsplit(".lora_", 1)[0] for k in tensors})
    adapter = {}
    for name in names:
        try:
            a = tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"]
            b = tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"]
        except KeyError as err:
            raise ValueError(f"{path / _WEIGHTS}: {name} lacks {err.args[0]}") from None
        adapter[name] = Factors(b=b, a=a, scale=lora_scale(a.shape[0], alpha, rslora))
    target = config.get("target_modules") or []
    return AdapterFile(
        adapter=adapter,
        base_model=config.get("base_model_name_or_path") or "",
        alpha=alpha,
        rslora=rslora,
        target_modules=tuple(sorted(target if isinstance(target, list) else [target])),
    )


# ----------------------------------------------------------------------------- shapes and init


def target_shapes(model, target_modules) -> dict[str, tuple[int, int]]:
    """``module name -> (d_out, d_in)`` for every linear layer whose kind is targeted."""
    kinds = set(target_modules)
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module_kind(name) in kinds:
            shapes[name.removeprefix(_PEFT_PREFIX)] = (module.out_features, module.in_features)
    found = {module_kind(n) for n in shapes}
    if kinds - found:
        raise ValueError(f"lora.target_modules {sorted(kinds - found)} match no linear layer of the model")
    return shapes


def init_adapter(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int], alpha: float, rslora: bool, seed: int) -> Adapter:
    """PEFT's default LoRA start, from a seed: A ~ kaiming-uniform(a=sqrt 5), B = 0 (ΔW = 0)."""
    generator = torch.Generator().manual_seed(seed)
    adapter = {}
    for name in sorted(shapes):
        d_out, d_in = shapes[name]
        r = ranks[name]
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_ with a=sqrt(5) gives exactly this bound
        a = (torch.rand(r, d_in, generator=generator) * 2 - 1) * bound
        adapter[name] = Factors(b=torch.zeros(d_out, r), a=a, scale=lora_scale(r, alpha, rslora))
    return adapter
