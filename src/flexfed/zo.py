"""FedKSeed and FedKSeed-Pro: zeroth-order federated full-parameter tuning with a finite pool of seeds.

After Qin et al., "Federated Full-Parameter Tuning of Billion-Sized Language Models with
Communication Cost under 18 Kilobytes" (ICML 2024, arXiv 2312.06353); docs/zo.md.

The math, as pure functions over tensors:

- A pool of K seeds, every party derives it from the run seed (``seed_pool``). Seed j stands for
  a Gaussian direction z_j over the tuned parameters, regenerated chunk by chunk whenever it is
  needed (``add_direction``): a generator seeded per (seed, chunk) draws ``zo.chunk`` elements at
  a time, so no full-model random tensor is ever materialised and every party that walks the
  same chunks in the same order on the same kind of device gets the same numbers.
- A local step (``zo_step``) samples a seed, takes the loss at w + εz and at w - εz under
  ``no_grad`` (inference memory: no activations kept, no gradient, no optimizer state, no copy of
  the weights), forms the projected gradient g = (L+ - L-) / 2ε and moves w by -η g z, the restore
  and the step fused in one pass over z. A client returns its τ (seed index, g) pairs.
- The server sums each seed's scalars over the clients, weighted by n_i / Σ n
  (``aggregate_scalars``): one vector A_r of K scalars per round. The global model after round r
  is the base replayed through A_1..A_r (``replay_round``: -η A_r[j] z_j for every seed used,
  in ascending order), so every party that replays the same history holds the same weights, bit
  for bit; the server never ships weights.
- FedKSeed-Pro samples seeds with probabilities from their importance, the mean amplitude |g| of
  every scalar the server has received for the seed (``seed_probabilities``), min-max scaled and
  through a softmax; the server broadcasts them with the scalars.

The protocol: the server sends each client the round vectors it lacks (``known``: what it was
sent before; all of them to a client that joins late, the catch-up whose rounds and replay cost
the client reports) and, for Pro, the probabilities. A client brings its weights to the global
model by replaying them from the base, trains τ steps, and replies with its pairs and the hash of
the weights it started from; the server refuses a reply whose start is not its own global model.
A Flower node keeps the history it was sent (K floats a round) and, since its own training leaves
its weights moved, reloads the base and replays the whole history before each client it serves;
a node that lost its history (restarted) replies with what it holds instead, and the server sends
the rest in a second exchange of the same round (both counted in the bytes).
In the in-process simulator the server keeps the global weights on the CPU and restores the
shared trainer from them (the server's copy, not a client's).

Departures from the paper (also in docs/zo.md):

- Seeds are derived from the run seed by hashing, not drawn from an RNG; z is drawn per chunk.
- A round's global update is replayed as its own step (-η A_r[j] z_j per round) rather than as
  one sum over all rounds per seed: the same model up to rounding, and it makes replay bit-exact
  for any party that holds the rounds. A client that missed rounds downloads each of them (K
  floats a round) instead of one K-vector of cumulative sums.
- FedKSeed-Pro: a seed no client has used yet gets the mean importance of the used ones (the
  paper does not say); the restore after L- and the update are one pass over z (a rounding-level
  difference from three passes).
- Replies carry seed indices as float32 (exact below 2^24) because a payload has one dtype; the
  bytes are what is measured.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable, Sequence

import torch

from flexfed.client import CLIENT_ERRORS, batch_schedule, collate, local_steps, response_loss
from flexfed.cost import FlopCount
from flexfed.data.prompts import IGNORE_INDEX as IGNORE
from flexfed.protocol import Message, Protocol
from flexfed.server import ServerState, UpdateRejected, derived_seed

log = logging.getLogger(__name__)

GENESIS = hashlib.sha256(b"flexfed-zo").hexdigest()  # the hash of an empty history


# ----------------------------------------------------------------------------- the math


def seed_pool(run_seed: int, k: int) -> list[int]:
    """The K seeds every party derives from the run seed."""
    return [derived_seed(run_seed, "zo-pool", j) for j in range(k)]


@dataclass(frozen=True)
class Chunk:
    param: int  # index into the tuned parameters
    start: int
    stop: int


def chunk_plan(params: Sequence[torch.Tensor], chunk: int) -> list[Chunk]:
    """The slices of the flattened parameters z is drawn in, in the order every party walks them."""
    return [Chunk(i, a, min(a + chunk, p.numel())) for i, p in enumerate(params) for a in range(0, p.numel(), chunk)]


def add_direction(params: Sequence[torch.Tensor], plan: Sequence[Chunk], seed: int, scale: float, device: torch.device) -> None:
    """params += scale * z(seed), z drawn chunk by chunk on ``device`` (the kind of device decides
    the stream: parties that must agree draw on the same kind). A parameter held elsewhere (the
    server's copy on the CPU) is updated through a chunk-sized buffer on ``device``."""
    generator = torch.Generator(device=device)
    with torch.no_grad():
        for k, c in enumerate(plan):
            generator.manual_seed(derived_seed(seed, k))
            z = torch.randn(c.stop - c.start, generator=generator, device=device, dtype=torch.float32)
            target = params[c.param].view(-1)[c.start : c.stop]
            work = target if target.device == z.device else target.to(device)
            work.add_(z, alpha=scale)
            if work is not target:
                target.copy_(work)


def zo_step(loss: Callable[[], float], params, plan, seed: int, eps: float, lr: float, device) -> tuple[float, float]:
    """One two-point zeroth-order step in place; returns (projected gradient g, mean of the two losses)."""
    add_direction(params, plan, seed, eps, device)
    plus = loss()
    add_direction(params, plan, seed, -2 * eps, device)
    minus = loss()
    g = (plus - minus) / (2 * eps)
    add_direction(params, plan, seed, eps - lr * g, device)  # back to w, then -η g z, in one pass
    return g, (plus + minus) / 2


def aggregate_scalars(updates: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float], k: int) -> torch.Tensor:
    """A_r[j] = Σ_i p_i Σ_{t: s_it = j} g_it with p_i = n_i / Σ n (float64 sums in client order, float32 out)."""
    total = float(sum(weights))
    out = torch.zeros(k, dtype=torch.float64)
    for (seeds, scalars), w in zip(updates, weights, strict=True):
        out.index_add_(0, seeds, scalars.double() * (w / total))
    return out.float()


def replay_round(params, plan, pool: Sequence[int], scalars: torch.Tensor, lr: float, device) -> int:
    """Apply round vector ``scalars`` (A_r): -η A_r[j] z_j for each used seed, ascending; returns how many."""
    used = torch.nonzero(scalars).flatten().tolist()
    for j in used:
        add_direction(params, plan, pool[j], -lr * float(scalars[j]), device)
    return len(used)


def seed_probabilities(amplitude_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """FedKSeed-Pro's sampling probabilities: mean |g| per seed, min-max scaled to [0, 1], softmax.

    The softmax of values in [0, 1] keeps every seed's probability within a factor e of any
    other's, so no seed stops being explored. Unused seeds get the used ones' mean importance."""
    used = count > 0
    if not used.any():
        return torch.full_like(amplitude_sum, 1 / len(amplitude_sum), dtype=torch.float32)
    importance = torch.where(used, amplitude_sum / count.clamp(min=1), (amplitude_sum[used] / count[used]).mean())
    low, high = importance.min(), importance.max()
    scaled = (importance - low) / (high - low) if high > low else torch.zeros_like(importance)
    return torch.softmax(scaled, dim=0).float()


def sample_seeds(probabilities: torch.Tensor | None, k: int, steps: int, seed: int) -> list[int]:
    """The seed index of each local step: uniform (FedKSeed) or by ``probabilities`` (Pro); the
    same draw on every machine (Python's RNG, not a device's)."""
    rng = random.Random(seed)
    if probabilities is None:
        return [rng.randrange(k) for _ in range(steps)]
    return rng.choices(range(k), weights=probabilities.tolist(), k=steps)


def chain_hash(previous: str, scalars: torch.Tensor) -> str:
    """The history's hash after one more round vector."""
    return hashlib.sha256(previous.encode() + scalars.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def weights_hash(params: Sequence[torch.Tensor]) -> str:
    """SHA-256 of the tuned weights' bytes, in order (the check that a client started from the global model)."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tuned_parameters(model: torch.nn.Module, patterns: Sequence[str] | None) -> list[tuple[str, torch.Tensor]]:
    """The parameters zeroth-order steps move, in the model's order: all (``patterns`` None), or
    those whose name matches one of the fnmatch ``patterns``; a pattern that matches none is an error."""
    named = list(model.named_parameters())  # tied weights once
    if patterns is None:
        return named
    for pattern in patterns:
        if not any(fnmatch(n, pattern) for n, _ in named):
            raise ValueError(f"zo.modules: {pattern!r} matches no parameter of {type(model).__name__} (e.g. {named[0][0]!r})")
    return [(n, p) for n, p in named if any(fnmatch(n, pattern) for pattern in patterns)]


# ----------------------------------------------------------------------------- a client's cost


def inference_memory(memory, rows: int, width: int, labelled: int, chunk: int) -> int:
    """CPU estimate of a zeroth-order step's peak: the weights, one chunk of z, one layer's working
    activations under ``no_grad`` (residual and norm, q/k/v, the MLP's gate, up and product) and
    the labelled positions' logits in fp32 with their log-softmax."""
    tokens = rows * width
    a = 2 if memory.autocast or memory.weight_bytes == 2 else 4
    layer = tokens * (2 * memory.hidden * 4 + (memory.q_dim + 2 * memory.kv_dim + 3 * memory.intermediate) * a)
    return memory.params * memory.weight_bytes + 4 * chunk + layer + labelled * memory.vocab * 8


@dataclass
class LocalResult:
    seeds: list[int]
    scalars: list[float]
    losses: list[float]
    tokens: int
    cost: dict


def train_local(trainer, params, plan, pool, probabilities, examples, steps: int, seed: int, eps: float, lr: float, chunk: int, client_id: str = "") -> LocalResult:
    """τ zeroth-order steps of one client on ``trainer``'s model (moved in place)."""
    model, device = trainer.base_model, trainer.device
    chosen = sample_seeds(probabilities, len(pool), steps, derived_seed(seed, "zo-seeds"))
    lengths = [len(e.input_ids) for e in examples]
    scalars, losses, tokens, counted, formula, first, widest, padded = [], [], 0, None, 0, 0, (0, 0, 0), 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.eval()
    for step, (j, indices) in enumerate(zip(chosen, batch_schedule(lengths, trainer.training.batch_size, steps, seed), strict=True)):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in indices], trainer.pad_id).items()}

        def loss() -> float:
            with torch.no_grad(), torch.autocast(device.type, dtype=trainer.autocast or torch.float32, enabled=trainer.autocast is not None):
                value = response_loss(model, batch).item()
            if value != value or value in (float("inf"), float("-inf")):
                raise FloatingPointError(f"client {client_id}: non-finite training loss at step {step}")
            return value

        counter = FlopCount() if counted is None and trainer.arch else None
        with counter or nullcontext():
            g, mean_loss = zo_step(loss, params, plan, pool[j], eps, lr, device)
        scalars.append(g)
        losses.append(mean_loss)
        tokens += int(batch["attention_mask"].sum())
        if trainer.arch:
            rows, width = batch["input_ids"].shape
            labelled = (batch["labels"][:, 1:] != IGNORE).sum(dim=1)
            flops = 2 * trainer.arch.forward_flops(rows, width, int(labelled.sum()))
            formula += flops
            padded += rows * width
            if counter is not None:
                counted, first = counter.get_total_flops(), flops
            widest = max(widest, (rows, width, int(labelled.max())))
    cost = {}
    if trainer.arch:
        if device.type == "cuda":
            peak, source = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
        else:
            rows, width, labelled = widest
            peak, source = inference_memory(trainer.arch.memory, rows, width, rows * labelled, chunk), "estimate"
        cost = {"flops": round(counted * formula / first) if counted and first else 0, "flops_analytic": formula, "tokens_padded": padded,
                "peak_memory_bytes": int(peak), "peak_memory_source": source}
    return LocalResult(chosen, scalars, losses, tokens, cost)


# ----------------------------------------------------------------------------- the protocol


@dataclass
class Update:
    """A client's checked reply: its steps' seed indices and scalars, and what it cost to catch up."""

    seeds: torch.Tensor  # int64
    scalars: torch.Tensor  # float32
    catch_up: dict


def check_config(config) -> None:
    """``ValueError`` naming the setting a zeroth-order run cannot honour."""
    method = config.federation.method
    if config.privacy.enabled:
        raise ValueError(f"privacy.clip_norm: {method} has no clipped-and-noised update space (its updates are seed scalars)")
    if config.robust.enabled:
        raise ValueError(f"robust: {method} has no robust aggregation of seed scalars; leave robust at its defaults")
    if config.attack.fraction:
        raise ValueError(f"attack.fraction: {method} has no simulated attackers")
    if config.resources.distribution != "homogeneous":
        raise ValueError(f"resources.distribution={config.resources.distribution!r}: {method} trains no LoRA, so rank heterogeneity does not apply")


class FedKSeed(Protocol):
    """``serve=False``: a node's end (no server state)."""

    pro = False

    def __init__(self, setup, serve: bool = True):
        config = setup.config
        check_config(config)
        self.config, self.zo, self.setup = config, config.zo, setup
        self.pool = seed_pool(config.seed, self.zo.seeds)
        tuned_parameters(setup.trainer.base_model, self.zo.modules)  # a pattern that matches nothing fails here
        self.k = self.zo.seeds
        # The server's state: the round vectors A_1..A_r and their hash chain, FedKSeed-Pro's
        # importance statistics, and how many rounds each client was sent (client index -> count).
        self.history: list[torch.Tensor] = []
        self.chain: list[str] = [GENESIS]
        self.amplitude_sum = torch.zeros(self.k, dtype=torch.float64)
        self.amplitude_count = torch.zeros(self.k, dtype=torch.float64)
        self.known: dict[int, int] = {}
        self.client_ids = [c.client_id for c in setup.federation.clients]
        self.global_weights: list[torch.Tensor] | None = None  # the server's copy, on the CPU (in-process engine)
        self.global_round = 0
        self._hash: tuple[int, str] = (-1, "")
        self.trainer_dirty = False  # the shared trainer moved by a client since it was last restored
        # A node's state: the history it was sent, and how many of its rounds its weights hold (None: moved by training).
        self.store: list[torch.Tensor] = []
        self.store_chain: list[str] = [GENESIS]
        self.node_round: int | None = 0

    # ------------------------------------------------------------------ weights

    def _params(self, trainer) -> list[torch.Tensor]:
        return [p for _, p in tuned_parameters(trainer.base_model, self.zo.modules)]

    def _plan(self, params):
        return chunk_plan(params, self.zo.chunk)

    def _server_weights(self, trainer) -> list[torch.Tensor]:
        """The server's copy of the global weights, replayed up to the last combined round."""
        if self.global_weights is None:
            if self.trainer_dirty:
                raise RuntimeError("the server's copy of the weights must be taken from the untouched base")
            self.global_weights = [p.detach().to("cpu", copy=True) for p in self._params(trainer)]
            self.global_round = 0
        plan = self._plan(self.global_weights)
        while self.global_round < len(self.history):
            replay_round(self.global_weights, plan, self.pool, self.history[self.global_round], self.zo.lr, trainer.device)
            self.global_round += 1
        return self.global_weights

    def global_hash(self) -> str:
        """SHA-256 of the server's global weights (computed once per round)."""
        weights = self._server_weights(self.setup.trainer)
        if self._hash[0] != self.global_round:
            self._hash = (self.global_round, weights_hash(weights))
        return self._hash[1]

    def sync(self, trainer, state: ServerState) -> None:
        weights = self._server_weights(trainer)
        with torch.no_grad():
            for p, w in zip(self._params(trainer), weights, strict=True):
                p.copy_(w)
        self.trainer_dirty = False

    @contextmanager
    def evaluated(self, trainer, state: ServerState):
        self.sync(trainer, state)
        yield trainer.base_model

    # ------------------------------------------------------------------ the server's side

    def initial_state(self) -> ServerState:
        return ServerState(round=0, global_adapter={})

    def probabilities(self) -> torch.Tensor | None:
        return seed_probabilities(self.amplitude_sum, self.amplitude_count) if self.pro else None

    def conversation(self, state: ServerState, round_: int, client: int, shares_base: bool):
        who = self.client_ids[client]
        have = self.known.get(client, 0)
        meta = {"client": who, "round": round_, "seed": derived_seed(self.config.seed, "zo-client", round_, who), "shares_base": shares_base}
        try:
            for _ in range(2):
                reply = yield self.downlink(have, meta)
                if "holds_rounds" not in reply.meta:
                    break
                # A node that lost the history it was sent (restarted, or it served another run) says
                # what it holds; it gets the rest in a second exchange of the same round.
                held = int(reply.meta["holds_rounds"])
                have = held if 0 <= held < have and self.chain[held] == str(reply.meta.get("holds_chain")) else 0
            else:
                raise UpdateRejected(f"client {who}: still lacks the history after it was sent from round {have + 1}")
            update = self.check(who, reply)
        except BaseException:
            self.known.pop(client, None)  # it may hold anything now: send it everything next time
            raise
        self.known[client] = len(self.history)
        return update

    def downlink(self, have: int, meta: dict) -> Message:
        """The round vectors after the first ``have`` (K float32 each), Pro's probabilities, and the
        history's hashes that let a node check it continues what it holds."""
        missing = torch.stack(self.history[have:]) if have < len(self.history) else torch.zeros(0, self.k)
        arrays = {"scalars": missing}
        if self.pro:
            arrays["probabilities"] = self.probabilities().view(1, -1)
        return Message(arrays, {**meta, "first": have + 1, "chain_before": self.chain[have], "chain": self.chain[-1]})

    def check(self, who: str, reply: Message) -> Update:
        """``UpdateRejected`` unless the reply is one seed index in the pool and one finite scalar per
        step, from the global weights."""
        seeds, scalars = reply.arrays.get("seeds"), reply.arrays.get("scalars")
        if seeds is None or scalars is None or set(reply.arrays) != {"seeds", "scalars"}:
            raise UpdateRejected(f"client {who}: a reply holds 'seeds' and 'scalars', got {sorted(reply.arrays)}")
        if seeds.shape != scalars.shape or seeds.dim() != 2 or seeds.shape[0] != 1 or seeds.shape[1] < 1:
            raise UpdateRejected(f"client {who}: seeds {tuple(seeds.shape)} and scalars {tuple(scalars.shape)} must both be 1 x steps")
        index = seeds.flatten().double()
        if not (torch.all(index == index.round()) and torch.all((index >= 0) & (index < self.k))):
            raise UpdateRejected(f"client {who}: seed indices must be integers in [0, {self.k})")
        if not torch.isfinite(scalars).all():
            raise UpdateRejected(f"client {who}: non-finite scalar gradients")
        start = reply.meta.get("start_sha256")
        expected = self.global_hash()
        if start != expected:
            raise UpdateRejected(f"client {who}: trained from weights {str(start)[:12]}, not the global model {expected[:12]} (replay diverged)")
        catch_up = {k: reply.meta[k] for k in ("catch_up_rounds", "replay_rounds", "replay_seeds", "replay_seconds") if k in reply.meta}
        return Update(index.long(), scalars.flatten().float(), catch_up)

    def combine(self, state: ServerState, round_: int, updates: Sequence[Update], weights) -> ServerState:
        if len(updates) >= self.config.federation.min_clients:
            vector = aggregate_scalars([(u.seeds, u.scalars) for u in updates], weights, self.k)
        else:
            log.warning("round %d: %d clients reported, fewer than min_clients=%d; the round's update is empty", round_, len(updates), self.config.federation.min_clients)
            vector = torch.zeros(self.k)
        for u in updates:  # FedKSeed-Pro's importance: every scalar received, unweighted
            self.amplitude_sum.index_add_(0, u.seeds, u.scalars.double().abs())
            self.amplitude_count.index_add_(0, u.seeds, torch.ones(len(u.seeds), dtype=torch.float64))
        self.history.append(vector)
        self.chain.append(chain_hash(self.chain[-1], vector))
        return ServerState(round=round_, global_adapter={}, metrics=state.metrics)

    def client_fields(self, round_: int, client: int, update) -> dict:
        return {"zo_steps": len(update.seeds), **update.catch_up} if update else {}

    def round_fields(self, state: ServerState, round_: int, reported) -> dict:
        if round_ == 0 or round_ > len(self.history):
            return {}
        p = self.probabilities()
        fields = {"zo_history_sha256": self.chain[round_], "zo_seeds_updated": int(torch.count_nonzero(self.history[round_ - 1]))}
        if p is not None:
            fields["zo_probability_max_over_min"] = float(p.max() / p.min())
        return fields

    # ------------------------------------------------------------------ checkpoints

    def _round_file(self, run_dir: Path, round_: int) -> Path:
        return Path(run_dir) / "zo" / f"round-{round_:04d}.safetensors"

    def save(self, run_dir, state: ServerState) -> None:
        """The round's vector, Pro's statistics and what each client was sent, beside the checkpoint
        (written first; a resume reads the rounds its checkpoint covers and checks their hashes)."""
        if state.round == 0:
            return
        from safetensors.torch import save_file

        known = torch.tensor([self.known.get(c, -1) for c in range(len(self.client_ids))], dtype=torch.int64)
        tensors = {"scalars": self.history[state.round - 1], "amplitude_sum": self.amplitude_sum, "amplitude_count": self.amplitude_count, "known": known}
        path = self._round_file(run_dir, state.round)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(path)

    def resume(self, state: ServerState) -> None:
        if state.round == len(self.history):
            return
        from safetensors.torch import load_file

        recorded = {m["round"]: m.get("zo_history_sha256") for m in state.metrics}
        self.history, self.chain = [], [GENESIS]
        for r in range(1, state.round + 1):
            path = self._round_file(self.config.run_dir, r)
            if not path.exists():
                raise RuntimeError(f"{path}: missing; the checkpoint of round {state.round} needs every round's seed scalars")
            tensors = load_file(str(path))
            self.history.append(tensors["scalars"])
            self.chain.append(chain_hash(self.chain[-1], tensors["scalars"]))
            if self.chain[-1] != recorded.get(r):
                raise RuntimeError(f"{path}: its scalars do not match the hash recorded for round {r} in the checkpoint's metrics")
        self.amplitude_sum, self.amplitude_count = tensors["amplitude_sum"], tensors["amplitude_count"]
        self.known = {c: int(n) for c, n in enumerate(tensors["known"].tolist()) if n >= 0}
        self.global_weights, self.global_round, self._hash = None, 0, (-1, "")  # replayed from the base on first use

    # ------------------------------------------------------------------ the client's side

    def continues(self, meta) -> bool:
        """Whether the history this node holds continues into the message's first round."""
        first = int(meta["first"])
        return first - 1 <= len(self.store) and self.store_chain[first - 1] == meta["chain_before"]

    def _catch_up(self, setup, message: Message, params, plan) -> dict:
        """Bring a node's history and weights to the message's global model (replayed from the base)."""
        m, who = message.meta, str(message.meta["client"])
        first, rows = int(m["first"]), message.arrays["scalars"]
        if rows.dim() != 2 or rows.shape[1] != self.k:
            raise ValueError(f"client {who}: round vectors of shape {tuple(rows.shape)}, expected rounds x {self.k}")
        store, chain = self.store[: first - 1] + [r.float() for r in rows], self.store_chain[:first]
        for r in store[first - 1 :]:
            chain.append(chain_hash(chain[-1], r))
        if chain[-1] != m["chain"]:
            raise ValueError(f"client {who}: the history received does not hash to the server's")
        self.store, self.store_chain = store, chain
        began, seeds, replayed = time.perf_counter(), 0, 0
        if self.node_round is None:  # moved by training since: back to the base, then the whole history
            from flexfed.models import load_model

            base = load_model(self.config.model.name, dtype=getattr(torch, self.config.model.dtype), seed=self.config.seed)
            with torch.no_grad():
                for p, w in zip(params, [p for _, p in tuned_parameters(base, self.zo.modules)], strict=True):
                    p.copy_(w)
            del base
            self.node_round = 0
        while self.node_round < len(self.store):
            seeds += replay_round(params, plan, self.pool, self.store[self.node_round], self.zo.lr, setup.trainer.device)
            self.node_round += 1
            replayed += 1
        return {"catch_up_rounds": int(rows.shape[0]), "replay_rounds": replayed, "replay_seeds": seeds, "replay_seconds": time.perf_counter() - began}

    def serve(self, setup, messages: Sequence[Message], on_done=None) -> list[Message | Exception]:
        trainer = setup.trainer
        params = self._params(trainer)
        plan = self._plan(params)
        out: list[Message | Exception] = []
        for message in messages:
            who = str(message.meta["client"])
            try:
                began = time.perf_counter()
                if not message.meta["shares_base"] and not self.continues(message.meta):
                    out.append(Message({}, {"client": who, "holds_rounds": len(self.store), "holds_chain": self.store_chain[-1]}))
                    continue
                if message.meta["shares_base"]:  # the server's own trainer: restore it from the server's copy
                    if self.trainer_dirty:
                        self.sync(trainer, None)
                    catch_up = {"catch_up_rounds": int(message.arrays["scalars"].shape[0])}
                else:
                    catch_up = self._catch_up(setup, message, params, plan)
                start = weights_hash(params)
                probabilities = message.arrays["probabilities"].flatten() if self.pro else None
                if probabilities is not None and (len(probabilities) != self.k or not torch.isfinite(probabilities).all() or (probabilities < 0).any()):
                    raise ValueError(f"client {who}: seed probabilities must be {self.k} finite non-negative numbers")
                examples = setup.examples(who)
                if not examples:
                    raise ValueError(f"client {who}: no training examples")
                self.trainer_dirty, self.node_round = True, None
                steps = local_steps(trainer.training, len(examples))
                z = self.zo
                result = train_local(trainer, params, plan, self.pool, probabilities, examples, steps, int(message.meta["seed"]), z.eps, z.lr, z.chunk, who)
                stats = {"client": who, "num_examples": len(examples), "loss": sum(result.losses) / len(result.losses), "losses": result.losses,
                         "tokens": result.tokens, "seconds": time.perf_counter() - began, **result.cost, **catch_up, "start_sha256": start}
                arrays = {"seeds": torch.tensor([result.seeds], dtype=torch.float32), "scalars": torch.tensor([result.scalars], dtype=torch.float32)}
                out.append(Message(arrays, stats))
            except CLIENT_ERRORS as err:
                out.append(err)
            if on_done:
                on_done()
        return out


class FedKSeedPro(FedKSeed):
    pro = True
