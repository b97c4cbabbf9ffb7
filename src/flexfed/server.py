"""The server's side of a LoRA round: sample, hand out start adapters, check updates, aggregate, checkpoint.

Nothing here trains or evaluates; the weights protocol (``aggregation.weights``) calls these
pieces, for every engine alike. ``Link`` is the part both ends of a
client's exchange share (a Flower node builds its own from the run config): what is sent for a
start adapter or an update, and what a client trains from.
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

from flexfed import privacy
from flexfed.aggregation import defences
from flexfed.aggregation import Aggregator, get_aggregator
from flexfed.aggregation.base import Payload, truncate
from flexfed.client import pick_device
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


def sample_clients(config: RunConfig, n: int, round_: int) -> list[int]:
    """Clients for this round: a seeded draw of ``ceil(fraction * n)``, sorted."""
    k = max(1, math.ceil(config.federation.sample_fraction * n - 1e-9))
    return sorted(random.Random(derived_seed(config.seed, "sample", round_)).sample(range(n), k))


@dataclass
class ServerState:
    round: int
    global_adapter: Adapter
    metrics: list[dict] = field(default_factory=list)
    # Why this round's aggregate was refused (the previous global kept); None when it was accepted.
    # Recorded in the round's metrics line, not checkpointed.
    rejected: str | None = None
    # Methods that merge into the base (FLoRA): the cumulative update, W = W0 + base_update.
    # ``global_adapter`` is then the last round's stack, what clients receive next.
    base_update: Adapter = field(default_factory=dict)
    # SLoRA's sparse stage: the cumulative sparse update's values (empty outside the stage).
    sparse: dict[str, torch.Tensor] = field(default_factory=dict)
    # Clients that cut their own ranks (HetLoRA's self-pruning): client id -> module -> rank,
    # what the server serves them from then on; everyone else gets their profile's ranks.
    client_ranks: dict[str, dict[str, int]] = field(default_factory=dict)
    # What the server's defences (privacy, robust aggregation) did this round; like ``rejected``,
    # recorded in the round's metrics line, not checkpointed.
    defence: dict | None = None
    # A protocol's own named tensors that the next round needs (KD's FedMD consensus), checkpointed.
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class Link:
    """One client's exchange with the server, as both ends see it (pure tensors, no model).

    ``send`` turns an adapter into the payload that crosses the wire and ``receive`` turns a
    payload back into an adapter; the factors a method never sends (``common``) are rebuilt from
    the run seed on each side. ``start`` is what a client trains from: the decoded start, or for
    methods that merge into the base a fresh LoRA drawn from the client's seed.
    """

    def __init__(self, aggregator: Aggregator, shapes: Mapping[str, tuple[int, int]], alpha: float, rslora: bool, seed: int):
        self.aggregator = aggregator
        self.shapes = dict(shapes)
        self.alpha, self.rslora, self.seed = alpha, rslora, seed
        self._common: dict[tuple, Adapter] = {}

    @classmethod
    def from_config(cls, config: RunConfig, shapes: Mapping[str, tuple[int, int]]) -> "Link":
        aggregator = get_aggregator(config.federation.method, **config.federation.method_options)
        return cls(aggregator, shapes, config.lora.alpha, config.lora.rslora, config.seed)

    def scale(self, rank: int) -> float:
        return lora_scale(rank, self.alpha, self.rslora)

    def common(self, ranks: Mapping[str, int]) -> Adapter:
        """The factors every party derives from the run seed (empty for methods that send everything)."""
        key = tuple(sorted(ranks.items()))
        if key not in self._common:
            found = {n: self.aggregator.common(n, self.shapes[n], r, self.scale(r), self.seed) for n, r in key}
            self._common[key] = {n: f for n, f in found.items() if f is not None}
        return self._common[key]

    def send(self, adapter: Mapping[str, Factors], ranks: Mapping[str, int]) -> Payload:
        return self.aggregator.encode(adapter, self.common(ranks))

    def receive(self, payload: Mapping[str, torch.Tensor], ranks: Mapping[str, int]) -> Adapter:
        return self.aggregator.decode(payload, sorted(ranks), self.common(ranks), self.scale)

    def start(self, payload: Mapping[str, torch.Tensor], ranks: Mapping[str, int], client_seed: int) -> Adapter:
        shapes = {n: self.shapes[n] for n in ranks}
        fresh = lambda: init_adapter(shapes, ranks, self.alpha, self.rslora, derived_seed(client_seed, "fresh"))  # noqa: E731
        return self.aggregator.start(lambda: self.receive(payload, ranks), fresh)


class Server:
    def __init__(
        self,
        config: RunConfig,
        shapes: Mapping[str, tuple[int, int]],
        profiles: Sequence[RankProfile],
        client_profile: Sequence[int],
        client_ids: Sequence[str],
        base_norms: Mapping[str, float] | None = None,
    ):
        """``base_norms``: ‖W0‖_F of each adapted module, which bounds the updates the server
        accepts (``federation.max_update_ratio``); None accepts any finite update."""
        self.config = config
        self.base_norms = dict(base_norms or {})
        self.shapes = dict(shapes)
        self.profiles = list(profiles)
        self.client_profile = list(client_profile)
        self.client_ids = list(client_ids)
        self.max_ranks = max_ranks(self.profiles)
        self.aggregator = get_aggregator(config.federation.method, **config.federation.method_options)
        self.link = Link(self.aggregator, self.shapes, config.lora.alpha, config.lora.rslora, config.seed)
        self.local_rule = self.aggregator.local_rule()
        self.aggregation_device = pick_device(config.federation.server_device)
        self.client_ranks: dict[str, dict[str, int]] = {}  # the current state's (``use_ranks``)
        self._reported_ranks: dict[str, dict[str, int]] = {}  # lower ranks received this round
        self.defence: dict | None = None  # what the defences did in the last ``aggregate``

    def scale(self, rank: int) -> float:
        return lora_scale(rank, self.config.lora.alpha, self.config.lora.rslora)

    def initial_state(self) -> ServerState:
        return ServerState(round=0, global_adapter=self.aggregator.initial(self._peft_init(), self.link.common(self.max_ranks)))

    def _peft_init(self) -> Adapter:
        return init_adapter(self.shapes, self.max_ranks, self.config.lora.alpha, self.config.lora.rslora, derived_seed(self.config.seed, "init"))

    def ranks_of(self, client: int) -> Mapping[str, int]:
        """The ranks the client is served: its profile's, or those it pruned itself down to."""
        return self.client_ranks.get(self.client_ids[client]) or self.profiles[self.client_profile[client]].ranks

    def use_ranks(self, state: ServerState) -> None:
        """Serve the clients at the ranks recorded in ``state`` (a fresh or resumed run)."""
        self.client_ranks = {c: dict(r) for c, r in state.client_ranks.items()}
        self._reported_ranks = {}

    def sample(self, round_: int) -> list[int]:
        return sample_clients(self.config, len(self.client_ids), round_)

    def client_seed(self, round_: int, client: int) -> int:
        return derived_seed(self.config.seed, "train", round_, self.client_ids[client])

    def start_adapter(self, state: ServerState, client: int) -> Adapter:
        """What the client is sent (FLoRA: the last stack, to merge into its base)."""
        return self.aggregator.distribute(state.global_adapter, self.ranks_of(client), self.scale)

    def downlink(self, state: ServerState, client: int, shares_base: bool = True) -> Payload:
        """What the client is sent: its start, or for a client that does not share the server's
        base weights what the method sends one instead (``Aggregator.sent_alone``)."""
        start = self.start_adapter(state, client)
        if not shares_base:
            start = self.aggregator.sent_alone(start, state.base_update)
        return self.link.send(start, self.ranks_of(client))

    def receive(self, client: int, payload: Mapping[str, torch.Tensor]) -> Adapter:
        """The client's update decoded from its payload and checked; ``UpdateRejected`` otherwise."""
        try:
            update = self.link.receive(payload, self.ranks_of(client))
        except (KeyError, ValueError, RuntimeError, IndexError, TypeError) as err:
            raise UpdateRejected(f"client {self.client_ids[client]}: malformed payload: {err}") from None
        self.check_update(client, update)
        ranks = {n: f.rank for n, f in update.items()}
        if ranks != dict(self.ranks_of(client)):  # it pruned: serve it these ranks from the next round
            self._reported_ranks[self.client_ids[client]] = ranks
        return update

    def check_update(self, client: int, update: Mapping[str, Factors]) -> None:
        """Raise ``UpdateRejected`` unless ``update`` has the client's modules, ranks, shapes and finite values."""
        who = f"client {self.client_ids[client]}"
        ranks = self.ranks_of(client)
        if set(update) != set(ranks):
            diff = sorted(set(update) ^ set(ranks))
            raise UpdateRejected(f"{who}: wrong modules (unexpected or missing: {diff[:3]})")
        if self.local_rule is not None and {n: f.rank for n, f in update.items()} == self.local_rule.pruned_ranks(ranks):
            ranks = self.local_rule.pruned_ranks(ranks)  # a client that pruned itself (HetLoRA), every module at once
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
        self.check_bounded(update, who)

    def check_bounded(self, adapter: Mapping[str, Factors], who: str) -> None:
        """``UpdateRejected`` unless every module's update s B A is finite and within
        ``federation.max_update_ratio`` x ‖W0‖_F of its base weight.

        Finite factors can still carry an update that overflows float32 or dwarfs the model
        (B = 3e37): such a client, or such an aggregate, must never become the global model.
        """
        ratio = self.config.federation.max_update_ratio
        for name, f in adapter.items():
            norm = f.norm()
            representable = torch.finfo(f.b.dtype).max  # beyond it s·B·A overflows to inf in the model
            if not norm <= representable:
                raise UpdateRejected(f"{who}: {name} update s·B·A has norm {norm:.4g}, not representable in {f.b.dtype}")
            bound = ratio * self.base_norms[name] if ratio is not None and name in self.base_norms else math.inf
            if norm > bound:
                raise UpdateRejected(f"{who}: {name} update s·B·A has norm {norm:.4g}, above federation.max_update_ratio={ratio:g} x ‖W0‖_F = {bound:.4g}")

    def aggregate(self, state: ServerState, updates: Sequence[Mapping[str, Factors]], weights: Sequence[float], round_: int | None = None) -> Adapter:
        def plain(updates, weights):
            device = self.aggregation_device
            if device.type == "cpu":
                return self.aggregator.aggregate(updates, weights, self.max_ranks, self.scale, previous=state.global_adapter)

            def moved(adapter: Mapping[str, Factors] | None, to: torch.device) -> Adapter | None:
                return None if adapter is None else {n: f.to(to) for n, f in adapter.items()}

            new_global = self.aggregator.aggregate([moved(u, device) for u in updates], weights, self.max_ranks, self.scale, previous=moved(state.global_adapter, device))
            return moved(new_global, torch.device("cpu"))

        self.defence = None
        if not defences.is_defended(self.config):
            return plain(updates, weights)
        # ---- privacy / robust aggregation (flexfed.aggregation.defences): each update measured about its start
        starts = [self.aggregator.distribute(state.global_adapter, {n: f.rank for n, f in u.items()}, self.scale) for u in updates]
        seed = derived_seed(self.config.seed, "dp-noise", state.round + 1 if round_ is None else round_)
        new, self.defence = defences.defended_aggregate(self.config, self.aggregator, plain, state.global_adapter, starts, updates, weights, self.link, seed)
        return new

    def epsilon(self, round_: int) -> float | None:
        """ε(privacy.delta) spent after ``round_`` rounds (None without privacy or noise: no guarantee)."""
        p = self.config.privacy
        if not p.enabled or (p.noise_multiplier == 0 and round_ > 0):
            return None
        rate = len(self.sample(1)) / len(self.client_ids)  # clients per round / clients registered
        return privacy.epsilon(p.noise_multiplier, rate, round_, p.delta, p.accountant)

    def aggregate_mean(self, state: ServerState, mean) -> Adapter:
        """The global adapter from a round's ``SecureMean`` (secure aggregation: the weighted mean
        of the payloads, no individual update), by the method's own aggregate (``aggregation.secure``)."""
        if mean.dense:
            dense = {n: mean.payload[f"{n}.dw"] for n in self.shapes}
            return self.aggregator.aggregate_dense(dense, self.max_ranks, self.scale)
        if mean.padded:  # every module's factors at the global rank g = max_ranks (the global's, without pruning), at s(g)
            for n, f in state.global_adapter.items():
                if f.rank != self.max_ranks[n] or mean.payload[f"{n}.a"].shape[0] != f.rank:
                    raise ValueError(f"{n}: padded to rank {mean.payload[f'{n}.a'].shape[0]}, the global has rank {f.rank} (max {self.max_ranks[n]})")
            padded = {n: Factors(b=mean.payload[f"{n}.b"], a=mean.payload[f"{n}.a"], scale=self.scale(mean.payload[f"{n}.a"].shape[0])) for n in self.shapes}
            index = {c: i for i, c in enumerate(self.client_ids)}
            reached = {n: max(self.ranks_of(index[c])[n] for c in mean.clients) for n in self.shapes}
            return self.aggregator.aggregate_padded(padded, reached, state.global_adapter)
        # every client of a "payload" method shares one rank (``mixed_ranks`` is False): the mean is one update of it
        update = self.link.receive(mean.payload, self.max_ranks)
        return self.aggregator.aggregate([update], [1.0], self.max_ranks, self.scale, previous=state.global_adapter)

    def advance(self, state: ServerState, round_: int, updates: Sequence[Mapping[str, Factors]], weights: Sequence[float], mean=None) -> ServerState:
        """The state after ``round_``: aggregate (if enough clients reported); the method's hooks say
        what becomes of the base (``Aggregator.accumulate``) and what a round without one keeps.
        ``mean``: a ``SecureMean`` that stands for the round's updates (secure aggregation)."""
        # Clients that pruned their ranks this round did so on their own: it holds whatever the
        # server makes of their updates.
        self.client_ranks, self._reported_ranks = {**state.client_ranks, **self._reported_ranks}, {}
        kept = self.aggregator.kept(state.global_adapter)
        unchanged = ServerState(round=round_, global_adapter=kept, metrics=state.metrics, base_update=state.base_update, client_ranks=self.client_ranks)
        reported = len(updates) if mean is None else len(mean.clients)
        if reported < self.config.federation.min_clients:
            log.warning("round %d: %d clients reported, fewer than min_clients=%d; global model unchanged", round_, reported, self.config.federation.min_clients)
            return unchanged
        try:
            new_global = self.aggregate(state, updates, weights, round_) if mean is None else self.aggregate_mean(state, mean)
            self.check_bounded(new_global, f"round {round_}'s aggregate")
            base_update = self.aggregator.accumulate(state.base_update, new_global, self.scale)
            self.check_bounded(base_update, f"round {round_}'s merged update")
        except (ValueError, RuntimeError, FloatingPointError) as err:  # UpdateRejected, LinAlgError among them
            unchanged.rejected = f"{type(err).__name__}: {err}"
            unchanged.defence = self.defence
            log.warning("round %d: aggregate refused, global model unchanged: %s", round_, unchanged.rejected)
            return unchanged
        return ServerState(round=round_, global_adapter=new_global, metrics=state.metrics, base_update=base_update, client_ranks=unchanged.client_ranks, defence=self.defence)

    def base_delta(self, state: ServerState) -> dict[str, torch.Tensor]:
        """What the base weights carry beyond W0 in ``state`` (dense, per module)."""
        return {n: f.delta() for n, f in state.base_update.items()}

    def global_update(self, state: ServerState) -> Adapter:
        """The global model's update over the original base weights, as one adapter."""
        return self.aggregator.over_base(state.global_adapter, state.base_update, self._peft_init())

    def eval_adapter(self, state: ServerState) -> Adapter:
        """The adapter evaluated on top of the base weights of ``base_delta``."""
        return self.aggregator.evaluated(state.global_adapter, self._peft_init())

    def peft_view(self, adapter: Mapping[str, Factors]) -> Adapter:
        """The global adapter with each module at the scale PEFT expects for its rank."""
        return {n: truncate(f, f.rank, self.scale(f.rank)) for n, f in adapter.items()}

    def save_global(self, path: Path, adapter: Mapping[str, Factors]) -> Path:
        return save_adapter(path, self.peft_view(adapter), self.config.model.name, self.config.lora.alpha, self.config.lora.rslora)


# ----------------------------------------------------------------------------- checkpoints

_CHECKPOINTS = "checkpoints"


_SUMS = "SHA256SUMS"  # written last: a checkpoint whose files do not match it is damaged


class CheckpointError(ValueError):
    """No checkpoint of a run can be read back intact."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, state: ServerState, keep: int = 2) -> Path:
    """Write the state to ``checkpoints/round-NNNN`` atomically (write aside, fsync, then rename),
    with the SHA-256 of every file in ``SHA256SUMS`` so a damaged one is detected on resume."""
    root = Path(run_dir) / _CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{state.round:04d}"
    tmp = root / f".tmp-round-{state.round:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    scales = _save_factors(tmp / "global.safetensors", state.global_adapter)
    base_scales = _save_factors(tmp / "base_update.safetensors", state.base_update)
    if state.sparse:
        save_file({n: v.contiguous() for n, v in state.sparse.items()}, str(tmp / "sparse.safetensors"))
    if state.tensors:
        save_file({n: v.contiguous() for n, v in state.tensors.items()}, str(tmp / "tensors.safetensors"))
    meta = {"round": state.round, "scales": scales, "base_scales": base_scales, "metrics": state.metrics, "client_ranks": state.client_ranks}
    (tmp / "state.json").write_text(json.dumps(meta))
    from flexfed.models import sha256_file  # here: importing models (transformers) costs seconds

    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        _fsync(tmp / name)
    (tmp / _SUMS).write_text(json.dumps({name: sha256_file(tmp / name) for name in files}))
    _fsync(tmp / _SUMS)
    _fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(root)
    for old in sorted(root.glob("round-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> dict:
    """The checkpoint's state.json, after checking every file against ``SHA256SUMS``;
    ``CheckpointError`` naming the file if one is missing, truncated or altered."""
    sums_path = path / _SUMS
    if not sums_path.exists() and (path / "state.json").exists():  # written before checksums existed
        try:
            return json.loads((path / "state.json").read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path / 'state.json'}: unreadable ({err})") from None
    try:
        sums = json.loads(sums_path.read_text())
        if not isinstance(sums, dict) or "state.json" not in sums:
            raise ValueError("no entry for state.json")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{sums_path}: unreadable ({err})") from None
    from flexfed.models import sha256_file

    for name, expected in sums.items():
        try:
            actual = sha256_file(path / name)
        except OSError as err:
            raise CheckpointError(f"{path / name}: unreadable ({err})") from None
        if actual != expected:
            raise CheckpointError(f"{path / name}: SHA-256 {actual[:12]}… does not match {_SUMS} ({str(expected)[:12]}…): truncated or corrupted")
    try:
        return json.loads((path / "state.json").read_text())
    except ValueError as err:  # checksummed yet unparsable: written so by a bug, not by a crash
        raise CheckpointError(f"{path / 'state.json'}: not valid JSON ({err})") from None


def _intact_checkpoints(run_dir: Path):
    """(path, state.json) of each intact checkpoint, newest first; damaged ones are logged and skipped."""
    damaged = []
    for path in sorted((Path(run_dir) / _CHECKPOINTS).glob("round-*"), reverse=True):
        try:
            yield path, verify_checkpoint(path)
        except CheckpointError as err:
            log.warning("checkpoint %s is damaged, trying the previous one: %s", path.name, err)
            damaged.append(str(err))
    if damaged:
        raise CheckpointError(f"{Path(run_dir) / _CHECKPOINTS}: no intact checkpoint: " + "; ".join(damaged))


def _newest_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    return next(_intact_checkpoints(run_dir), None)


def checkpoint_round(run_dir: Path) -> int | None:
    """The round of a run's newest intact checkpoint (what --resume continues after)."""
    found = _newest_checkpoint(run_dir)
    return None if found is None else found[1]["round"]


def load_checkpoint(run_dir: Path) -> ServerState | None:
    """The newest intact checkpoint of a run (a damaged newest one falls back to the one before),
    or None if it has none; ``CheckpointError`` if it has some but none is intact."""
    found = _newest_checkpoint(run_dir)
    if found is None:
        return None
    path, meta = found
    adapter = _load_factors(path / "global.safetensors", meta["scales"])
    base_update = _load_factors(path / "base_update.safetensors", meta.get("base_scales", {}))
    sparse_values = load_file(str(path / "sparse.safetensors")) if (path / "sparse.safetensors").exists() else {}
    tensors = load_file(str(path / "tensors.safetensors")) if (path / "tensors.safetensors").exists() else {}
    client_ranks = {c: {n: int(r) for n, r in ranks.items()} for c, ranks in meta.get("client_ranks", {}).items()}
    return ServerState(round=meta["round"], global_adapter=adapter, metrics=meta["metrics"], base_update=base_update, sparse=sparse_values, client_ranks=client_ranks, tensors=tensors)


def _save_factors(path: Path, adapter: Mapping[str, Factors]) -> dict[str, float]:
    """Write the factors bit for bit; returns the scales (kept in state.json)."""
    tensors = {}
    for name, f in adapter.items():
        tensors[f"{name}.a"] = f.a.contiguous()
        tensors[f"{name}.b"] = f.b.contiguous()
    save_file(tensors, str(path))
    return {name: f.scale for name, f in adapter.items()}


def _load_factors(path: Path, scales: Mapping[str, float]) -> Adapter:
    if not scales:
        return {}
    tensors = load_file(str(path))
    return {n: Factors(b=tensors[f"{n}.b"], a=tensors[f"{n}.a"], scale=s) for n, s in scales.items()}
