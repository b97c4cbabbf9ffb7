"""Aggregate PEFT LoRA adapter directories offline: the math of one server round, on files.

``merge_adapters`` backs ``flexfed aggregate``: it reads client adapters of any ranks, checks they
adapt the same modules of the same base model, aggregates them with a registered method and writes
PEFT adapters at the requested ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from flexfed.aggregation import get_aggregator
from flexfed.lora import AdapterFile, load_adapter, lora_scale, save_adapter


def _check_compatible(files: Sequence[AdapterFile], dirs: Sequence[Path]) -> None:
    """Same base model, same adapted modules, same shapes as the first directory."""
    first, first_dir = files[0], dirs[0]
    for f, d in zip(files[1:], dirs[1:]):
        if f.base_model != first.base_model:
            raise ValueError(f"{d}: base model {f.base_model!r} differs from {first.base_model!r} in {first_dir}")
        if set(f.adapter) != set(first.adapter):
            extra, missing = sorted(set(f.adapter) - set(first.adapter)), sorted(set(first.adapter) - set(f.adapter))
            raise ValueError(
                f"{d}: adapts different modules than {first_dir} "
                f"(target modules {list(f.target_modules)} vs {list(first.target_modules)}; "
                f"extra {extra[:3]}, missing {missing[:3]})"
            )
        for name, factors in f.adapter.items():
            if factors.shape != first.adapter[name].shape:
                raise ValueError(f"{d}: {name} has shape {factors.shape}, {first_dir} has {first.adapter[name].shape}")


def merge_adapters(
    dirs: Sequence[str | Path],
    method: str,
    *,
    out: str | Path,
    weights: Sequence[float] | None = None,
    ranks: Sequence[int] | None = None,
    alpha: float | None = None,
    rslora: bool | None = None,
    **method_options,
) -> list[Path]:
    """Aggregate the adapters in ``dirs`` with ``method`` and write one PEFT adapter per rank.

    ``weights``: one per directory (e.g. example counts), default equal. ``ranks``: the output
    ranks, each applied to every module and capped at min(d_out, d_in) of that module; default
    the largest input rank. One rank is written to ``out``, several to ``out/rank-<r>``.
    ``alpha``/``rslora`` of the output default to the first adapter's; every input is read with its
    own alpha, so inputs trained with different alphas are combined correctly. Methods that merge
    into the base (flora) write their exact stacked adapter (rank = sum of input ranks) and take
    no ``ranks``. Returns the written directories.
    """
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise ValueError("no adapter directories to aggregate")
    files = [load_adapter(d) for d in dirs]
    _check_compatible(files, dirs)
    weights = [1.0] * len(dirs) if weights is None else list(weights)
    if len(weights) != len(dirs):
        raise ValueError(f"got {len(weights)} weights for {len(dirs)} adapter directories")
    alpha = files[0].alpha if alpha is None else alpha
    rslora = files[0].rslora if rslora is None else rslora

    def scale(rank: int) -> float:
        return lora_scale(rank, alpha, rslora)

    aggregator = get_aggregator(method, **method_options)
    written = []
    for r, adapter in aggregator.written([f.adapter for f in files], weights, ranks, scale).items():
        path = Path(out) if r is None else Path(out) / f"rank-{r}"
        written.append(save_adapter(path, adapter, files[0].base_model, alpha, rslora))
    return written
