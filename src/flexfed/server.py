"""The server's side of a round: sample, hand out start adapters, check updates, aggregate, checkpoint.

Nothing here trains or evaluates; engines call these pieces in order, so the simulator and the
Flower ServerApp share one implementation of the round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from flexfed.aggregation import get_aggregator
from flexfed.aggregation.base import truncate
from flexfed.config import RunConfig
from flexfed.lora import Adapter, Factors, init_adapter, lora_scale, save_adapter
from flexfed.resources import RankProfile, max_ranks

log = logging.getLogger(__name__)


class UpdateRejected(ValueError):
    """A client update that must not reach the global model."""


def derived_seed(*parts) -> int:
    """A 63-bit seed from the run seed and labels, stable across processes and machines."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class ServerState:
    round: int
    global_adapter: Adapter
    metrics: list[dict] = field(default_factory=list)


class Server:
    def __init__(
        self,
        config: RunConfig,
        shapes: Mapping[str, tuple[int, int]],
        profiles: Sequence[RankProfile],
        client_profile: Sequence[int],
        client_ids: Sequence[str],
    ):
        self.config = config
        self.shapes = dict(shapes)
        self.profiles = list(profiles)
        self.client_profile = list(client_profile)
        self.client_ids = list(client_ids)
        self.max_ranks = max_ranks(self.profiles)
        self.aggregator = get_aggregator(config.federation.method, **config.federation.method_options)
        method = config.federation.method
        if not self.aggregator.mixed_ranks and len({tuple(sorted(p.ranks.items())) for p in self.profiles}) > 1:
            raise ValueError(f"federation.method {method!r} needs one common rank; resources.distribution={config.resources.distribution!r} mixes ranks")
        if self.aggregator.merges_into_base or set(self.aggregator.trainable) - {"a", "b"}:
            # FLoRA rewrites the base weights each round; Fed-SB trains an r x r core: neither fits
            # the LoRA trainer yet. Their aggregation math is available to `flexfed aggregate`.
            raise ValueError(f"federation.method {method!r} is not supported by the simulator yet")

    def scale(self, rank: int) -> float:
        return lora_scale(rank, self.config.lora.alpha, self.config.lora.rslora)

    def initial_state(self) -> ServerState:
        adapter = init_adapter(self.shapes, self.max_ranks, self.config.lora.alpha, self.config.lora.rslora, derived_seed(self.config.seed, "init"))
        return ServerState(round=0, global_adapter=adapter)

    def ranks_of(self, client: int) -> Mapping[str, int]:
        return self.profiles[self.client_profile[client]].ranks

    def sample(self, round_: int) -> list[int]:
        """Clients for this round: a seeded draw of ``ceil(fraction * N)``, sorted."""
        n = len(self.client_ids)
        k = max(1, math.ceil(self.config.federation.sample_fraction * n - 1e-9))
        return sorted(random.Random(derived_seed(self.config.seed, "sample", round_)).sample(range(n), k))

    def client_seed(self, round_: int, client: int) -> int:
        return derived_seed(self.config.seed, "train", round_, self.client_ids[client])

    def start_adapter(self, state: ServerState, client: int) -> Adapter:
        return self.aggregator.distribute(state.global_adapter, self.ranks_of(client), self.scale)

    def check_update(self, client: int, update: Mapping[str, Factors]) -> None:
        """Raise ``UpdateRejected`` unless ``update`` has the client's modules, ranks, shapes and finite values."""
        who = f"client {self.client_ids[client]}"
        ranks = self.ranks_of(client)
        if set(update) != set(ranks):
            diff = sorted(set(update) ^ set(ranks))
            raise UpdateRejected(f"{who}: wrong modules (unexpected or missing: {diff[:3]})")
        for name, f in update.items():
            d_out, d_in = self.shapes[name]
            if f.rank != ranks[name] or f.b.shape != (d_out, ranks[name]) or f.a.shape != (ranks[name], d_in):
                raise UpdateRejected(f"{who}: {name} has b {tuple(f.b.shape)}, a {tuple(f.a.shape)}; expected rank {ranks[name]} of {d_out}x{d_in}")
            if not (f.a.is_floating_point() and f.b.is_floating_point()):
                raise UpdateRejected(f"{who}: {name} is not floating point ({f.a.dtype})")
            if not math.isclose(f.scale, self.scale(f.rank), rel_tol=1e-6):
                raise UpdateRejected(f"{who}: {name} scale {f.scale} is not s({f.rank}) = {self.scale(f.rank)}")
            if not (torch.isfinite(f.a).all() and torch.isfinite(f.b).all()):
                raise UpdateRejected(f"{who}: {name} has non-finite values")

    def aggregate(self, state: ServerState, updates: Sequence[Mapping[str, Factors]], weights: Sequence[float]) -> Adapter:
        return self.aggregator.aggregate(updates, weights, self.max_ranks, self.scale)

    def peft_view(self, adapter: Mapping[str, Factors]) -> Adapter:
        """The global adapter with each module at the scale PEFT expects for its rank."""
        return {n: truncate(f, f.rank, self.scale(f.rank)) for n, f in adapter.items()}

    def save_global(self, path: Path, adapter: Mapping[str, Factors]) -> Path:
        return save_adapter(path, self.peft_view(adapter), self.config.model.name, self.config.lora.alpha, self.config.lora.rslora)


# ----------------------------------------------------------------------------- checkpoints

_CHECKPOINTS = "checkpoints"


def save_checkpoint(run_dir: Path, state: ServerState, keep: int = 2) -> Path:
    """Write the state to ``checkpoints/round-NNNN`` atomically (write aside, then rename)."""
    root = Path(run_dir) / _CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{state.round:04d}"
    tmp = root / f".tmp-round-{state.round:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, scales = {}, {}
    for name, f in state.global_adapter.items():
        tensors[f"{name}.a"] = f.a.contiguous()
        tensors[f"{name}.b"] = f.b.contiguous()
        scales[name] = f.scale
    save_file(tensors, str(tmp / "global.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"round": state.round, "scales": scales, "metrics": state.metrics}))
    with open(tmp / "state.json", "rb") as fh:
        os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("round-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path) -> ServerState | None:
    """The newest complete checkpoint of a run, or None if it has none."""
    found = sorted((Path(run_dir) / _CHECKPOINTS).glob("round-*"))
    if not found:
        return None
    path = found[-1]
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "global.safetensors"))
    adapter = {n: Factors(b=tensors[f"{n}.b"], a=tensors[f"{n}.a"], scale=s) for n, s in meta["scales"].items()}
    return ServerState(round=meta["round"], global_adapter=adapter, metrics=meta["metrics"])
