"""The weights protocol: clients train LoRA adapters and send their factors (FedLLM).

Every method of ``flexfed.aggregation`` runs through it. A round is one exchange per client:
the server sends the method's payload of the client's start (``Server.downlink``), the client
trains from it on its private data and sends the method's payload of its trained adapter, and
the server checks the updates and aggregates them (``Server.advance``). What a method changes
about that round is said by its ``Aggregator`` hooks (FLoRA: ``accumulate``, ``client_base``,
``start``, ``sent_alone``, ...), and SLoRA's first rounds are a stage of this protocol
(``SparseStage``), not a branch of the runner or the engines.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import torch

from flexfed import attacks
from flexfed.aggregation import sparse
from flexfed.aggregation.base import Aggregator, truncate
from flexfed.aggregation.secure import SecureMean
from flexfed.client import CLIENT_ERRORS, ClientResult
from flexfed.config import RunConfig
from flexfed.lora import module_kind
from flexfed.multiclient import ClientJob, clients_per_pass, train_clients
from flexfed.protocol import Message, Protocol
from flexfed.resources import RankProfile, TrainingMemory, client_profiles
from flexfed.server import Link, Server, ServerState, UpdateRejected, derived_seed

log = logging.getLogger(__name__)


def check_method(config: RunConfig, aggregator: Aggregator, profiles: Sequence[RankProfile]) -> None:
    """Settings the method cannot serve, known once the rank profiles are: mixed ranks for a
    one-rank method, SLoRA's sparse stage for a method that does not train both factors.
    (A sweep checks every run with this before the first one starts.)"""
    method = config.federation.method
    if not aggregator.mixed_ranks and len({tuple(sorted(p.ranks.items())) for p in profiles}) > 1:
        raise ValueError(f"federation.method {method!r} needs one common rank; resources.distribution={config.resources.distribution!r} mixes ranks")
    if config.federation.sparse_stage.rounds and (aggregator.merges_into_base or tuple(aggregator.trainable) != ("a", "b")):
        raise ValueError(f"federation.sparse_stage (SLoRA) starts LoRA from an SVD: it needs a method that trains both factors, not {method!r}")


def trains_plain_lora(aggregator: Aggregator) -> bool:
    """Whether the method's clients train both LoRA factors on untouched base weights, so that
    another protocol (Split-FedLLM's client parts) can train the adapter in pieces."""
    return not aggregator.merges_into_base and tuple(aggregator.trainable) == ("a", "b")


def weights_only_settings(config: RunConfig) -> list[str]:
    """The settings ``config`` turns on that only this protocol honours (another refuses them)."""
    on = {
        "privacy.clip_norm": config.privacy.enabled,
        "robust (norm_bound / aggregate)": config.robust.enabled,
        "attack.fraction": config.attack.fraction > 0,
        "federation.sparse_stage.rounds": config.federation.sparse_stage.rounds > 0,
    }
    return [name for name, enabled in on.items() if enabled]


def check_engine(config: RunConfig, executor: str) -> None:
    """What an executor cannot run yet, refused before anything is built."""
    if config.federation.sparse_stage.rounds and executor != "in-process":
        raise ValueError("federation.sparse_stage (SLoRA's sparse first stage) runs on the simulation engine only, not on Flower yet")
    if config.flower.secure_aggregation != "off" and executor != "flower":
        raise ValueError(f"flower.secure_aggregation={config.flower.secure_aggregation!r} runs on Flower (SuperNodes mask their updates), "
                         f"not on the {executor} engine; set it to off or run with flexfed flower")


def ranks_by_kind(ranks) -> dict[str, int]:
    """Per-module ranks folded to one per module kind (they agree within a kind by construction)."""
    return {module_kind(m): r for m, r in sorted(ranks.items())}


def client_stats(result: ClientResult) -> dict:
    """What a client reports beside its payload (the ``meta`` of its reply)."""
    stats = {"client": result.client_id, "num_examples": int(result.num_examples), "loss": float(result.loss), "losses": [float(x) for x in result.losses]}
    return {**stats, "tokens": int(result.tokens), "seconds": float(result.seconds), **result.cost}


class WeightsProtocol(Protocol):
    """``serve=False``: a node's end only (the link and the stages, no server state)."""

    def __init__(self, setup, serve: bool = True):
        config, trainer = setup.config, setup.trainer
        self.config, self.shapes = config, setup.shapes
        self.server: Server | None = None
        self.link = Link.from_config(config, self.shapes)
        if serve:
            memory = TrainingMemory.for_run(config, setup.model, self.shapes, setup.device) if config.resources.distribution == "memory" else None
            clients = setup.federation.clients
            profiles, assignment = client_profiles(config.resources, config.lora, self.shapes, len(clients), config.seed, memory)
            base_norms = {n: float(trainer.base_linear(n).weight.detach().double().norm()) for n in self.shapes}
            self.server = Server(config, self.shapes, profiles, assignment, [c.client_id for c in clients], base_norms)
            self.shard_sizes = [c.num_examples for c in clients]
            check_method(config, self.server.aggregator, profiles)
            self.link = self.server.link
        a = config.attack
        self.attackers = attacks.attackers([c.client_id for c in setup.federation.clients], a.fraction, derived_seed(config.seed, "attackers")) if serve and a.fraction else set()
        stage = config.federation.sparse_stage
        self.sparse = SparseStage(self, sparse.sparse_indices(self.shapes, stage.density, derived_seed(config.seed, "sparse"))) if stage.rounds else None

    @property
    def aggregator(self) -> Aggregator:
        return self.link.aggregator

    def stage(self, round_: int) -> str:
        return "sparse" if self.sparse and round_ <= self.config.federation.sparse_stage.rounds else "lora"

    def check_executor(self, executor) -> None:
        check_engine(self.config, executor.name)

    def initial_state(self) -> ServerState:
        return self.server.initial_state()

    def resume(self, state: ServerState) -> None:
        self.server.use_ranks(state)  # clients that pruned their ranks stay pruned

    def base_delta(self, state: ServerState) -> dict[str, torch.Tensor]:
        """What the base weights carry beyond W0 in ``state``: the sparse update during SLoRA's
        stage, else the merged update (FLoRA; nothing for the other methods)."""
        return self.sparse.base_delta(state) if state.sparse else self.server.base_delta(state)

    def sync(self, trainer, state: ServerState) -> None:
        trainer.set_base_delta(self.base_delta(state))

    def evaluated(self, trainer, state: ServerState):
        self.sync(trainer, state)
        return trainer.merged(self.server.peft_view(self.server.eval_adapter(state)))

    def save(self, run_dir: Path, state: ServerState) -> None:
        self.server.save_global(Path(run_dir) / "adapters" / f"round-{state.round:04d}", self.server.global_update(state))

    def client_fields(self, round_: int, client: int, update) -> dict:
        s = self.server
        fields = {"profile": s.profiles[s.client_profile[client]].name, "ranks": ranks_by_kind(s.ranks_of(client))}
        if update and not isinstance(update, SecureMean) and self.stage(round_) == "lora":
            sent = ranks_by_kind({n: f.rank for n, f in update.items()})
            if sent != fields["ranks"]:  # the client cut its own rank (HetLoRA's self-pruning)
                fields["ranks_sent"] = sent
        if s.client_ids[client] in self.attackers:
            fields["attacker"] = True
        if self.config.privacy.local.enabled:
            fields["epsilon_local"] = self.local_epsilon(round_, client)
        return fields

    def local_epsilon(self, round_: int, client: int) -> float:
        """ε(privacy.delta) of the client's example-level DP-SGD over every round it trained in up
        to ``round_`` (its own data's guarantee; steps sample B of its n examples, q = B/n)."""
        from flexfed.client import local_steps
        from flexfed.privacy import epsilon

        p, t = self.config.privacy, self.config.training
        examples = self.shard_sizes[client]
        rounds = sum(client in self.server.sample(r) for r in range(1, round_ + 1))
        return epsilon(p.local.noise_multiplier, min(1.0, t.batch_size / examples), rounds * local_steps(t, examples), p.delta, p.accountant)

    def round_fields(self, state: ServerState, round_: int, reported) -> dict:
        fields = {"epsilon": self.server.epsilon(round_)}  # privacy: ε(privacy.delta) spent so far (null: no guarantee)
        if state.defence is not None:  # what privacy / robust aggregation did, indices mapped to client ids
            fields["defence"] = {k: ([reported[i] for i in v] if k in ("rejected", "clipped") else v) for k, v in state.defence.items()}
        return fields

    # ------------------------------------------------------------------ the exchange

    def conversation(self, state: ServerState, round_: int, client: int, shares_base: bool):
        if self.stage(round_) == "sparse":
            return (yield from self.sparse.conversation(state, round_, client, shares_base))
        s = self.server
        ranks = s.ranks_of(client)
        modules = sorted(ranks)
        meta = {"stage": "lora", "client": s.client_ids[client], "round": round_, "seed": s.client_seed(round_, client), "shares_base": shares_base}
        down = s.downlink(state, client, shares_base)
        reply = yield Message(down, {**meta, "modules": modules, "ranks": [ranks[m] for m in modules]})
        up = reply.arrays
        if s.client_ids[client] in self.attackers:  # simulated attackers (config ``attack``) send a poisoned update
            up = self.poison(round_, client, down, up)
        return s.receive(client, up)

    def poison(self, round_: int, client: int, down, up):
        """The payload ``up`` as an attacker would send it (``flexfed.attacks``)."""
        s, link = self.server, self.link
        ranks = s.ranks_of(client)
        trained = link.receive(up, ranks)
        start = link.start(down, ranks, s.client_seed(round_, client))
        start = {n: truncate(f, trained[n].rank, trained[n].scale) for n, f in start.items()}  # a client that pruned (HetLoRA)
        seed = derived_seed(self.config.seed, "attack", round_, s.client_ids[client])
        poisoned = attacks.poison(self.config.attack.kind, link.aggregator.trainable, start, trained, self.config.attack.scale, seed)
        return link.send(poisoned, {n: f.rank for n, f in poisoned.items()})

    def serve(self, setup, messages: Sequence[Message], on_done=None) -> list[Message | Exception]:
        if messages and messages[0].meta.get("stage") == "sparse":
            return self.sparse.serve(setup, messages, on_done)
        shared = all(m.meta["shares_base"] for m in messages)
        # Clients that share the server's base train together (several per pass on an accelerator);
        # each of the others first merges what it was sent into W0, so they go one at a time.
        groups = [list(messages)] if shared else [[m] for m in messages]
        out = []
        for group in groups:
            out += self._train(setup, group, on_done)
        return out

    def _train(self, setup, messages: Sequence[Message], on_done) -> list[Message | Exception]:
        link, trainer, agg = self.link, setup.trainer, self.aggregator
        jobs, outcomes = {}, {}
        for i, m in enumerate(messages):
            client, seed = str(m.meta["client"]), int(m.meta["seed"])
            ranks = {str(n): int(r) for n, r in zip(m.meta["modules"], m.meta["ranks"], strict=True)}
            try:
                if not m.meta["shares_base"]:
                    trainer.set_base_update(agg.client_base(lambda: link.receive(m.arrays, ranks) if m.arrays else {}))
                start = link.start(m.arrays, ranks, seed)
            except CLIENT_ERRORS as err:
                outcomes[i] = err
                continue
            jobs[i] = (ranks, ClientJob(client, start, partial(setup.examples, client), seed, link.common(ranks)))
        per_pass = clients_per_pass(self.config.training.clients_per_pass, setup.device)
        results = train_clients(trainer, [job for _, job in jobs.values()], per_pass, agg.trainable, on_done, agg.local_rule())
        for (i, (ranks, _)), result in zip(jobs.items(), results):
            outcomes[i] = result if isinstance(result, Exception) else Message(link.send(result.adapter, ranks), client_stats(result))
        return [outcomes[i] for i in range(len(messages))]

    def combine(self, state: ServerState, round_: int, updates, weights) -> ServerState:
        if self.stage(round_) == "sparse":
            return self.sparse.combine(state, round_, updates, weights)
        if updates and isinstance(updates[0], SecureMean):  # secure aggregation: every client's outcome is the round's mean
            return self.server.advance(state, round_, [], [], mean=updates[0])
        return self.server.advance(state, round_, updates, weights)


class SparseStage:
    """SLoRA's first stage (``aggregation.sparse``): clients train a change to a fixed random subset
    of the base weights' entries, receiving the current values and sending their change."""

    def __init__(self, protocol: WeightsProtocol, indices: Mapping[str, torch.Tensor]):
        self.protocol, self.indices = protocol, dict(indices)

    def base_delta(self, state: ServerState) -> dict[str, torch.Tensor]:
        shapes = self.protocol.shapes
        return {n: sparse.dense_delta(shapes[n], idx, state.sparse[n]) for n, idx in self.indices.items()}

    def conversation(self, state: ServerState, round_: int, client: int, shares_base: bool):
        s = self.protocol.server
        values = state.sparse or sparse.zero_update(self.indices)
        meta = {"stage": "sparse", "client": s.client_ids[client], "round": round_, "seed": s.client_seed(round_, client), "shares_base": shares_base}
        reply = yield Message(dict(values), meta)
        self.check(s.client_ids[client], reply.arrays)
        return dict(reply.arrays)

    def check(self, who: str, values: Mapping[str, torch.Tensor]) -> None:
        """``UpdateRejected`` unless ``values`` has one finite value per chosen entry of every module."""
        if set(values) != set(self.indices):
            raise UpdateRejected(f"client {who}: wrong modules in its sparse update: {sorted(set(values) ^ set(self.indices))[:3]}")
        for name, v in values.items():
            if v.shape != self.indices[name].shape or not v.is_floating_point() or not torch.isfinite(v).all():
                raise UpdateRejected(f"client {who}: {name} sparse values have shape {tuple(v.shape)}, expected {tuple(self.indices[name].shape)} finite floats")

    def serve(self, setup, messages: Sequence[Message], on_done=None) -> list[Message | Exception]:
        out = []
        for m in messages:
            client = str(m.meta["client"])
            try:
                if not m.meta["shares_base"]:
                    setup.trainer.set_base_delta(self.base_delta(ServerState(0, {}, sparse=dict(m.arrays))))
                result = train_sparse(setup.trainer, client, self.indices, setup.examples(client), int(m.meta["seed"]))
                out.append(Message(result.sparse, client_stats(result)))
            except CLIENT_ERRORS as err:
                out.append(err)
            if on_done:
                on_done()
        return out

    def combine(self, state: ServerState, round_: int, updates, weights) -> ServerState:
        """Add the clients' mean change; after the stage's last round, start LoRA from the best
        rank-r_max approximation of the whole sparse update."""
        config, server = self.protocol.config, self.protocol.server
        values = state.sparse or sparse.zero_update(self.indices)
        if len(updates) >= config.federation.min_clients:
            mean = sparse.average_updates(updates, weights)
            values = {n: values[n] + mean[n] for n in values}
        else:
            log.warning("round %d: %d clients reported, fewer than min_clients=%d; sparse update unchanged", round_, len(updates), config.federation.min_clients)
        if self.protocol.stage(round_ + 1) == "sparse":
            return ServerState(round=round_, global_adapter=state.global_adapter, metrics=state.metrics, sparse=values)
        adapter, kept = sparse.lora_start(self.protocol.shapes, self.indices, values, server.max_ranks, server.scale)
        log.info("round %d: sparse stage over; LoRA starts from its rank-r_max SVD, keeping %.1f%% of its energy", round_, 100 * kept)
        return ServerState(round=round_, global_adapter=adapter, metrics=state.metrics)


def train_sparse(trainer, client_id: str, indices: Mapping[str, torch.Tensor], examples, seed: int) -> ClientResult:
    """Train a change to the ``indices`` entries of each adapted base weight, on top of the
    current base, with LoRA switched off; ``sparse`` holds the change."""
    began = time.perf_counter()
    model = trainer.peft_model if trainer.peft_model is not None else trainer.base_model
    model.requires_grad_(False)  # only the sparse values train (``activate`` sets LoRA's flags again)
    linears = {n: trainer.base_linear(n) for n in indices}
    params = sparse.attach(linears, indices, sparse.zero_update(indices))
    try:
        with trainer.peft_model.disable_adapter() if trainer.peft_model is not None else nullcontext():
            losses, tokens, cost = trainer.fit(client_id, model, list(params.values()), examples, seed)
        values = {n: p.detach().cpu().clone() for n, p in params.items()}
    finally:
        sparse.detach(linears)
    return ClientResult(client_id, {}, len(examples), sum(losses) / len(losses), tokens, time.perf_counter() - began, losses, values, cost)
