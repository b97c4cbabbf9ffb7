"""Split-FedLLM (``federation.method=split``): the model cut between each client and the server.

After SplitFed (Thapa et al., AAAI 2022) for LLM fine-tuning with LoRA: a client keeps the
embeddings and decoder blocks ``1..ℓ`` (``split.cut_layer``) with their LoRA and its data; the
server runs the remaining blocks, the head and the loss, with LoRA of its own
(``split.server_rank``). A round, per sampled client, is one conversation:

1. down: the client part's start adapter (the ``split.client_method`` payload, e.g. FedIT's
   factors, FlexLoRA's at the client's rank); up: the activations of the first batch at the cut,
   the attention mask and the labels;
2. per local step: down the gradient at the cut (and the loss, and the server's squared gradient
   norm); up the next batch's activations (and the client's squared norm). Both sides clip with
   the total norm, so a step is the whole model's step (``sides``);
3. up, after the last step: the trained client part, checked like a weights-protocol update.

U-shape (``split.tail_layers`` > 0, as in SFPrompt, arXiv 2407.17533): the client also keeps
the last blocks and the head; each step is two exchanges (activations up, the server's output
down, its gradient up, the gradient at the cut down) and labels never leave the client.

Server side: v1 (``split.server_mode``) trains a copy of the server part per client, and the
copies are averaged with the clients' weights at the round's end; v2 trains one server part for
the round, updated by each client's steps in turn. The client parts are aggregated by the
configured weights-protocol method (``split.client_method``: FedIT, FlexLoRA with mixed client
ranks, ...). A client that fails mid-round is left out; in v1 its copy is dropped, in v2 the
shared part it touched is discarded (the round's server part keeps its previous value).

Departures from SplitFed: LoRA adapters (not whole weights) train on both sides; the server part
is averaged factor by factor (FedIT's rule) in v1; in v2 the clients' steps interleave one step
each in the order of their ids (the executor drives every conversation a wave at a time) rather
than one client's whole round after another; the fed server and the main server are one party.

SFPrompt options: ``split.client_adapter=prompt`` trains ``split.prompt_tokens`` virtual-token
embeddings on the client instead of client LoRA (FedAvg-ed with the data-size weights, kept in
``ServerState.tensors`` so checkpoints carry it); ``split.prune_fraction`` makes each client drop
the examples it already fits (lowest EL2N on its own head and tail) before it trains.

Engines: in-process, and Flower SuperNodes (``flexfed flower supernode``), where each message of
the conversation is a Flower message and a client's session lives in its node's trainer process
between them. Flower's simulation engine is refused (``engines.flower.sim``): its ClientApp
actors are shared by every virtual node, so a client's next step may reach another process.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from flexfed.aggregation.base import normalized_weights
from flexfed.aggregation.fedit import fedit_average
from flexfed.aggregation.weights import check_method, ranks_by_kind
from flexfed.client import CLIENT_ERRORS
from flexfed.lora import Adapter, init_adapter
from flexfed.protocol import Message, Protocol
from flexfed.resources import client_profiles
from flexfed.server import Link, Server, ServerState, derived_seed
from flexfed.split.checks import check_config, client_method_config
from flexfed.split.parts import Cut
from flexfed.split.prompt import prompted, save_prompt
from flexfed.split import wire
from flexfed.split.sides import ClientSession, ServerPart, SplitModel, squared_norm

log = logging.getLogger(__name__)

PROMPT = "split.prompt"  # the soft prompt's key in ServerState.tensors (checkpointed with them)


@dataclass
class SplitUpdate:
    """A client's finished round, as the server keeps it."""

    client: Adapter | torch.Tensor  # its trained client part, checked (split.client_adapter=prompt: its soft prompt)
    server: Adapter | None  # v1: its copy of the server part (v2: None, the part is shared)
    steps: int
    bytes_up_per_step: list[int] = field(default_factory=list)  # activations (+ mask, labels) sent per step
    bytes_down_per_step: list[int] = field(default_factory=list)  # gradients (+ U-shape's output) received per step
    pruned: int = 0  # examples the client pruned this round (split.prune_fraction)


class SplitProtocol(Protocol):
    """``serve=False``: a node's end only (its clients' sessions, no server state)."""

    def __init__(self, setup, serve: bool = True):
        config = setup.config
        check_config(config)
        self.config, self.setup = config, setup
        s = config.split
        trainer = setup.trainer
        self.cut = Cut(trainer.base_model.config.num_hidden_layers, s.cut_layer, s.tail_layers)
        self.prompt = s.client_adapter == "prompt"
        self.prompt_shape = (s.prompt_tokens, trainer.base_model.config.hidden_size)
        # With a soft prompt the client's blocks carry no LoRA: the client part is the prompt alone
        # (the weights-protocol server below then only keeps the clients' ids, seeds and profiles).
        self.client_shapes = {} if self.prompt else {n: sh for n, sh in setup.shapes.items() if self.cut.side(n) == "client"}
        self.server_shapes = {n: sh for n, sh in setup.shapes.items() if self.cut.side(n) == "server"}
        if not self.server_shapes:
            raise ValueError(f"split.cut_layer={s.cut_layer}: no adapted module (lora.target_modules) lies in the server's blocks")
        self.server_rank = s.server_rank or config.lora.rank
        self.client_config = client_method_config(config)
        self.link = Link.from_config(self.client_config, self.client_shapes)
        self.sessions: dict[str, ClientSession] = {}  # client id -> its round in progress (this node's)
        self.server: Server | None = None
        if serve:
            clients = setup.federation.clients
            profiles, assignment = client_profiles(config.resources, config.lora, self.client_shapes, len(clients), config.seed)
            base_norms = {n: float(trainer.base_linear(n).weight.detach().double().norm()) for n in self.client_shapes}
            self.server = Server(self.client_config, self.client_shapes, profiles, assignment, [c.client_id for c in clients], base_norms)
            check_method(self.client_config, self.server.aggregator, profiles)
            self.link = self.server.link
        self._shared: tuple[int, ServerPart] | None = None  # v2: (round, the round's one server part)
        self._discarded: set[int] = set()  # v2: rounds whose shared part a failed client touched
        self._fate: str | None = None  # what became of the server part in the last combine

    # ------------------------------------------------------------------ the parts of the state

    def model(self, client_ranks) -> SplitModel:
        ranks = {**client_ranks, **dict.fromkeys(self.server_shapes, self.server_rank)}
        return SplitModel(self.setup.trainer, self.cut, ranks, self.config.split.wire_dtype)

    def client_view(self, state: ServerState) -> ServerState:
        """``state`` with the client parts' global adapter only: the weights-protocol server's state."""
        return ServerState(round=state.round, global_adapter={n: state.global_adapter[n] for n in self.client_shapes},
                           metrics=state.metrics, client_ranks=state.client_ranks)

    def server_adapter(self, state: ServerState) -> Adapter:
        return {n: state.global_adapter[n] for n in self.server_shapes}

    def stage(self, round_: int) -> str:
        return "split"

    def initial_state(self) -> ServerState:
        """One LoRA start for the whole model, drawn as ordinary training draws it (every module
        in name order from the run's init seed), then cut: the client part at the clients' largest
        ranks, the server part at ``split.server_rank``."""
        s = self.server
        lora = self.config.lora
        # Every module is drawn, a prompt run's client modules too (at lora.rank, then dropped), so
        # the server part starts where a client-LoRA run's does: the two compare from one start.
        ranks = {**dict.fromkeys(self.setup.shapes, lora.rank), **s.max_ranks, **dict.fromkeys(self.server_shapes, self.server_rank)}
        init = init_adapter(self.setup.shapes, ranks, lora.alpha, lora.rslora, derived_seed(self.config.seed, "init"))
        client = s.aggregator.initial({n: init[n] for n in self.client_shapes}, self.link.common(s.max_ranks))
        tensors = {PROMPT: self.initial_prompt()} if self.prompt else {}
        return ServerState(round=0, global_adapter={**client, **{n: init[n] for n in self.server_shapes}}, tensors=tensors)

    def initial_prompt(self) -> torch.Tensor:
        """The soft prompt's start: the input embeddings of n vocabulary tokens drawn from the run's
        seed (PEFT's ``sample_vocab`` init), so it starts at the scale of real token embeddings."""
        embeddings = self.setup.trainer.base_model.get_input_embeddings().weight
        g = torch.Generator().manual_seed(derived_seed(self.config.seed, "prompt"))
        tokens = torch.randint(embeddings.shape[0], (self.prompt_shape[0],), generator=g)
        return embeddings.detach()[tokens.to(embeddings.device)].float().cpu().clone()

    def resume(self, state: ServerState) -> None:
        self.server.use_ranks(state)
        self._shared = None

    def evaluated(self, trainer, state: ServerState):
        s = self.server
        merged = trainer.merged({**s.peft_view(s.eval_adapter(self.client_view(state))), **self.server_adapter(state)})
        return prompted(merged, state.tensors[PROMPT]) if self.prompt else merged

    def save(self, run_dir: Path, state: ServerState) -> None:
        s = self.server
        whole = {**s.global_update(self.client_view(state)), **self.server_adapter(state)}
        path = s.save_global(Path(run_dir) / "adapters" / f"round-{state.round:04d}", whole)
        if self.prompt:
            save_prompt(Path(path) / "prompt", state.tensors[PROMPT], self.setup.trainer.base_model.config)

    def client_fields(self, round_: int, client: int, update) -> dict:
        s = self.server
        fields = {"profile": s.profiles[s.client_profile[client]].name, "ranks": ranks_by_kind(s.ranks_of(client)), "cut_layer": self.cut.cut_layer}
        if update is not None:
            fields.update(steps=update.steps, bytes_up_per_step=update.bytes_up_per_step, bytes_down_per_step=update.bytes_down_per_step)
            if self.config.split.prune_fraction:
                fields["pruned"] = update.pruned
        return fields

    def round_fields(self, state: ServerState, round_: int, reported) -> dict:
        s = self.config.split
        return {"split": {"cut_layer": s.cut_layer, "tail_layers": s.tail_layers, "server_mode": s.server_mode, "wire_dtype": s.wire_dtype,
                          "server_rank": self.server_rank, "server_part": self._fate if round_ else None, "client_adapter": s.client_adapter,
                          **({"prompt_tokens": s.prompt_tokens} if self.prompt else {}), **({"prune_fraction": s.prune_fraction} if s.prune_fraction else {})}}

    # ------------------------------------------------------------------ the server's side

    def _server_part(self, state: ServerState, round_: int, model: SplitModel) -> ServerPart:
        if self.config.split.server_mode == "v1":
            return ServerPart(model, self.server_adapter(state))
        if self._shared is None or self._shared[0] != round_:
            self._shared = (round_, ServerPart(model, self.server_adapter(state)))
        return self._shared[1]

    def conversation(self, state: ServerState, round_: int, client: int, shares_base: bool):
        s = self.server
        who = f"client {s.client_ids[client]}"
        ranks = s.ranks_of(client)
        modules = sorted(ranks)
        meta = {"op": "start", "client": s.client_ids[client], "round": round_, "seed": s.client_seed(round_, client),
                "shares_base": shares_base, "modules": modules, "ranks": [ranks[m] for m in modules]}
        who_meta = {"client": meta["client"], "seed": meta["seed"]}  # every message names its client (and seed: a Flower node reads both)
        model = self.model(ranks)
        part = self._server_part(state, round_, model)
        up, down = [], []
        pending = None  # the server part's last step: its gradients and squared norm, until the client's norm arrives
        try:
            start = {"prompt": state.tensors[PROMPT]} if self.prompt else s.downlink(self.client_view(state), client, shares_base)
            reply = yield Message(start, meta)
            while reply.meta.get("op") == "activations":
                if pending is not None:
                    part.step(pending[0], pending[1], _client_norm(reply, who))
                up.append(reply.nbytes)
                if self.cut.u_shape:
                    hidden, out = part.forward(reply.arrays, who)
                    sent = Message({"hidden": wire.send(out, self.config.split.wire_dtype)}, {"op": "output", **who_meta})
                    reply = yield sent
                    if reply.meta.get("op") != "gradient":
                        raise ValueError(f"{who}: expected the gradient at the server's output, got {reply.meta.get('op')!r}")
                    grad_in, grads = part.backward(hidden, out, reply.arrays.get("grad"), who)
                    up[-1] += reply.nbytes
                    down_bytes, loss = sent.nbytes, None
                else:
                    grad_in, grads, loss = part.loss_step(reply.arrays, who)
                    down_bytes = 0
                server_sq = squared_norm(list(grads.values()))
                pending = (grads, server_sq)
                message = Message({"grad": wire.send(grad_in, self.config.split.wire_dtype)}, {"op": "gradient", **who_meta, "server_grad_sq": server_sq, **({} if loss is None else {"loss": loss})})
                down.append(down_bytes + message.nbytes)
                reply = yield message
            if reply.meta.get("op") != "done":
                raise ValueError(f"{who}: expected activations or its trained client part, got {reply.meta.get('op')!r}")
            if pending is None:
                raise ValueError(f"{who}: finished without a training step")
            part.step(pending[0], pending[1], _client_norm(reply, who))
            update = self._received_prompt(reply.arrays, who) if self.prompt else s.receive(client, reply.arrays)
            pruned = reply.meta.get("pruned", 0)
            if isinstance(pruned, bool) or not isinstance(pruned, int) or pruned < 0:
                raise ValueError(f"{who}: pruned {pruned!r} is not a count of examples")
        except BaseException:  # closed (its node is gone) or refused: what it touched must not count
            if self.config.split.server_mode == "v2":
                self._discarded.add(round_)
            raise
        return SplitUpdate(update, part.adapter() if self.config.split.server_mode == "v1" else None, len(up), up, down, pruned)

    def _received_prompt(self, arrays, who: str) -> torch.Tensor:
        """A client's trained soft prompt, checked like any update: its shape, fp32, finite."""
        prompt = arrays.get("prompt")
        if set(arrays) != {"prompt"} or not isinstance(prompt, torch.Tensor) or prompt.dtype != torch.float32 or tuple(prompt.shape) != self.prompt_shape:
            raise ValueError(f"{who}: expected its soft prompt alone, an fp32 {self.prompt_shape} tensor (split.prompt_tokens x hidden)")
        if not torch.isfinite(prompt).all():
            raise ValueError(f"{who}: its soft prompt has non-finite values")
        return prompt

    def combine(self, state: ServerState, round_: int, updates: Sequence[SplitUpdate], weights) -> ServerState:
        s = self.server
        tensors = state.tensors
        if not self.prompt:
            client_state = s.advance(self.client_view(state), round_, [u.client for u in updates], weights)
        else:  # FedAvg of the prompts with the data-size weights; kept, like LoRA, below min_clients
            client_state = self.client_view(state)
            if len(updates) >= self.config.federation.min_clients:
                p = normalized_weights(weights)
                tensors = {**tensors, PROMPT: sum(w * u.client for w, u in zip(p, updates))}
        server = self.server_adapter(state)
        mode = self.config.split.server_mode
        if len(updates) < self.config.federation.min_clients:
            self._fate = "kept"
        elif mode == "v2" and round_ in self._discarded:
            self._fate = "discarded"
            log.warning("round %d: a client failed mid-round; the shared server part it touched is discarded", round_)
        elif mode == "v2":
            server, self._fate = self._shared[1].adapter(), "updated"
        else:
            p = normalized_weights(weights)
            server, self._fate = {n: fedit_average([u.server[n] for u in updates], p) for n in self.server_shapes}, "averaged"
        self._shared = None
        self._discarded.discard(round_)
        return ServerState(round=round_, global_adapter={**client_state.global_adapter, **server}, metrics=state.metrics,
                           rejected=client_state.rejected, client_ranks=client_state.client_ranks, tensors=tensors)

    # ------------------------------------------------------------------ the clients' side

    def serve(self, setup, messages: Sequence[Message], on_done=None) -> list[Message | Exception]:
        out = []
        for m in messages:
            client = str(m.meta["client"])
            try:
                reply, finished = self._serve_one(setup, client, m)
            except CLIENT_ERRORS as err:
                self.sessions.pop(client, None)
                reply, finished = err, True
            out.append(reply)
            if finished and on_done:
                on_done()
        return out

    def _serve_one(self, setup, client: str, m: Message) -> tuple[Message, bool]:
        op = m.meta.get("op")
        if op == "start":
            ranks = {str(n): int(r) for n, r in zip(m.meta["modules"], m.meta["ranks"], strict=True)}
            if set(ranks) != set(self.client_shapes):
                raise ValueError(f"client {client}: the start names modules that are not the client part's at split.cut_layer={self.cut.cut_layer}")
            seed = int(m.meta["seed"])
            prompt = self._received_prompt(m.arrays, f"client {client}: the start") if self.prompt else None
            start = {} if self.prompt else self.link.start(m.arrays, ranks, seed)
            self.sessions[client] = ClientSession(self.model(ranks), client, start, setup.examples(client), seed, prompt, self.config.split.prune_fraction)
            return self._next(client, None), False
        session = self.sessions.get(client)
        if session is None:
            raise ValueError(f"client {client}: no round in progress for a {op!r} message")
        if op == "output":  # U-shape: run the tail and the head on the server's output
            arrays, loss = session.tail(m.arrays.get("hidden"))
            return Message(arrays, {"op": "gradient", "client": client, "loss": loss}), False
        if op == "gradient":
            mine = session.backward(m.arrays.get("grad"), float(m.meta["server_grad_sq"]), m.meta.get("loss"))
            reply = self._next(client, mine)
            return reply, reply.meta["op"] == "done"
        raise ValueError(f"client {client}: unknown message {op!r}")

    def _next(self, client: str, grad_sq: float | None) -> Message:
        """The session's next batch's activations, or (its steps done) its trained client part."""
        session = self.sessions[client]
        extra = {"client": client} if grad_sq is None else {"client": client, "grad_sq": grad_sq}  # every reply names its client
        arrays = session.forward()
        if arrays is not None:
            return Message(arrays, {"op": "activations", **extra})
        del self.sessions[client]
        adapter, stats = session.finish()
        ranks = {n: f.rank for n, f in adapter.items()}
        arrays = {"prompt": session.prompt()} if self.prompt else self.link.send(adapter, ranks)
        return Message(arrays, {"op": "done", **extra, **stats})


def _client_norm(reply: Message, who: str) -> float:
    """The squared norm of the client's gradients that the server clips with: a finite,
    non-negative number, or the client fails (a NaN would poison the server part)."""
    value = reply.meta.get("grad_sq")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{who}: grad_sq {value!r} is not a finite non-negative number")
    return float(value)
