"""The KD protocol (``federation.method=kd``): clients send distributions on a public proxy set.

A round, FedDF-style (``kd.mode=feddf``):

1. The server's global model answers the proxy prompts greedily (once per round); those
   response tokens are the scored positions. Each sampled client is sent the global adapter
   (the modules of its layers) and the response tokens.
2. The client trains from the global adapter on its private data (``LocalTrainer.train``, the
   one training loop), scores the proxy set with its trained model and sends its distributions
   at temperature T in the configured encoding (``distill.Encoding``), never its weights.
3. The server mixes the distributions weighted by the clients' data sizes (``distill.mixture``),
   optionally mixes in its own previous distribution (``kd.mix_previous``), and distils the
   mixture into the global adapter on the proxy set: ``kd.server_steps`` steps of
   T²·KL(target ‖ student at T) through the same training loop.

``kd.mode=fedmd`` adds FedMD's digest: the server also keeps the round's mixture (the
consensus) with its response tokens and sends both the next round; a client first distils the
consensus (``kd.client_distill_steps`` steps) and then trains on its private data.

Clients may run a smaller model than the server (``kd.client_layers``: the first ℓ decoder
layers of the same checkpoint, the same tokenizer and head); they start from the global
adapter's modules of those layers. Their training and scoring then cost about ℓ/L of the
body's FLOPs (the embeddings and the vocabulary projection are unchanged).

Departures from the papers (docs/kd.md): FedDF averages the clients' logits and initialises the
distillation from the FedAvg of their weights; here clients share no weights, so distillation
starts from the previous global adapter, and distributions (not logits) are averaged, which is
what lets a top-k encoding be combined at all. FedMD's clients are persistent and each keeps its
own model, with no global one; here sampled clients are stateless and start from the server's
distilled adapter, which is the model evaluated. The proxy set is prompts whose responses the
global model generates, so no public labels (FedMD's public labelled set) are needed.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from flexfed.aggregation.base import payload_key, payload_parts
from flexfed.client import CLIENT_ERRORS, LocalTrainer, collate, response_logits
from flexfed.cost import FlopCount
from flexfed.evaluation import generate_ids
from flexfed.kd import proxy as proxy_lib
from flexfed.kd.distill import Encoding, distillation_loss, kl_per_position, mixture, probabilities
from flexfed.lora import Adapter, Factors, init_adapter, lora_scale, module_kind, save_adapter, target_shapes
from flexfed.protocol import Message, Protocol
from flexfed.server import ServerState, UpdateRejected, derived_seed

log = logging.getLogger(__name__)

RESPONSES = "proxy.responses"  # the round's response token ids (a message's tensor)
CONSENSUS = "consensus."  # FedMD: the last round's mixture, encoded, and its responses
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_config(config) -> None:
    """Settings the KD protocol cannot honour, refused with the field to change."""
    refusals = {
        "privacy.clip_norm (client-level DP bounds weight updates; KD sends distributions)": config.privacy.enabled,
        "robust (its defences are over weight updates)": config.robust.enabled,
        "attack.fraction (simulated attackers poison weight updates)": config.attack.fraction > 0,
        f"resources.distribution={config.resources.distribution!r} (KD trains one LoRA rank, lora.rank)": config.resources.distribution != "homogeneous",
    }
    refused = [what for what, bad in refusals.items() if bad]
    if refused:
        raise ValueError(f"federation.method=kd cannot honour {'; '.join(refused)}")


def keep_layers(model, layers: int):
    """``model`` cut to its first ``layers`` decoder layers (same embeddings, final norm and head)."""
    decoder = model.get_decoder()
    total = len(decoder.layers)
    if not 1 <= layers <= total:
        raise ValueError(f"kd.client_layers={layers}: the model has {total} decoder layers")
    decoder.layers = decoder.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    return model


def label_token_ids(tokenizer, labels: Sequence[str]) -> tuple[int, ...]:
    """Each label word's single token id; ``ValueError`` naming a label that is not one token."""
    ids = []
    for label in labels:
        tokens = tokenizer.encode(label, add_special_tokens=False)
        if len(tokens) != 1:
            raise ValueError(f"kd.labels: {label!r} is {len(tokens)} tokens {tokens}, not one")
        ids.append(tokens[0])
    return tuple(ids)


def adapter_payload(adapter: Mapping[str, Factors], modules: Sequence[str]) -> dict[str, torch.Tensor]:
    return {payload_key(n, p): getattr(adapter[n], p).float() for n in modules for p in ("a", "b")}


class KDProtocol(Protocol):
    """``serve=False``: a node's end (it scores and trains clients; no server state)."""

    def __init__(self, setup, serve: bool = True):
        config = setup.config
        check_config(config)
        self.setup, self.config, self.kd = setup, config, config.kd
        self.prompts = proxy_lib.load_prompts(config, setup.tokenizer, setup.federation)
        from flexfed.models import load_skeleton

        self.vocab = int(load_skeleton(config.model.name).config.vocab_size)
        labels = label_token_ids(setup.tokenizer, self.kd.labels) if self.kd.encoding == "labels" else ()
        self.encoding = Encoding(self.kd.encoding, self.vocab, self.kd.k if self.kd.encoding == "top-k" else 0, labels)
        t = config.training
        self.server_training = t.model_copy(update={"lr": self.kd.server_lr, "local_steps": self.kd.server_steps, "local_epochs": None, "batch_size": self.kd.batch_size})
        self.digest_training = t.model_copy(update={"local_steps": self.kd.client_distill_steps, "local_epochs": None, "batch_size": self.kd.batch_size})
        self._client_trainer: LocalTrainer | None = None
        self._client_modules: list[str] = []
        self._responses: dict[int, list[list[int]]] = {}  # round -> the global model's answers
        self._round: dict[int, dict] = {}  # round -> fields of its metrics line
        self.server = None  # no weights-protocol Server
        if serve:
            trainer = setup.trainer  # the server's model: its shapes name the global adapter's modules
            self.shapes = setup.shapes
            self.modules = sorted(self.shapes)
            if self.kd.client_layers is not None:
                layers = len(trainer.base_model.get_decoder().layers)
                if self.kd.client_layers > layers:
                    raise ValueError(f"kd.client_layers={self.kd.client_layers}: the server's model has {layers} decoder layers")

    # ------------------------------------------------------------------ both ends

    def within_client_layers(self, names: Sequence[str]) -> list[str]:
        """The adapted modules a client's model has: those of its first ``kd.client_layers`` layers."""
        ell = self.kd.client_layers
        if ell is None:
            return sorted(names)
        return sorted(n for n in names if (m := LAYER.search(n)) is None or int(m.group(1)) < ell)

    def client_trainer(self, setup) -> tuple[LocalTrainer, list[str]]:
        """The clients' trainer and the modules its model adapts: the run's own trainer, or one
        on the first ``kd.client_layers`` layers."""
        if self._client_trainer is None:
            c = self.config
            if self.kd.client_layers is None:
                trainer = setup.trainer
                self._client_modules = sorted(setup.shapes)
            else:
                from flexfed.models import load_model

                model = keep_layers(load_model(c.model.name, dtype=getattr(torch, c.model.dtype), seed=c.seed), self.kd.client_layers)
                self._client_modules = sorted(target_shapes(model, c.lora.target_modules))  # before PEFT wraps it
                trainer = LocalTrainer(model, c.lora, c.training, setup.tokenizer.pad_token_id, setup.device)
            self._client_trainer = trainer
        return self._client_trainer, self._client_modules

    def examples(self, responses: Sequence[Sequence[int]]):
        return proxy_lib.scored_examples(self.prompts, responses)

    def score(self, trainer: LocalTrainer, adapter: Adapter, examples) -> tuple[torch.Tensor, dict]:
        """The logits at every scored position (in order) of the model with ``adapter``, and the
        pass's FLOPs: counted, and by the forward formula (2 N per token, attention, the head on
        the scored positions)."""
        counter = FlopCount()
        analytic, parts = 0, []
        arch = trainer.arch
        with trainer.merged(adapter) as model, torch.no_grad(), counter:
            model.eval()
            for start in range(0, len(examples), self.kd.batch_size):
                batch = collate(examples[start : start + self.kd.batch_size], trainer.pad_id)
                batch = {k: v.to(trainer.device) for k, v in batch.items()}
                logits, keep = response_logits(model, batch)
                parts.append(logits.float().cpu())
                if arch is not None:
                    rows, width = batch["input_ids"].shape
                    analytic += arch.forward_flops(rows, width, int(keep.sum()))
        return torch.cat(parts), {"flops": int(counter.get_total_flops()), "flops_analytic": int(analytic)}

    def distil(self, trainer: LocalTrainer, who: str, start: Adapter, target: torch.Tensor, examples, seed: int, training):
        """``trainer.train`` from ``start`` toward ``target`` (P x V, the examples' scored positions
        in order) by T²·KL at temperature T."""
        offsets = [0]
        for e in examples:
            offsets.append(offsets[-1] + sum(1 for t in e.labels[1:] if t != proxy_lib.IGNORE_INDEX))
        if offsets[-1] != target.shape[0]:
            raise ValueError(f"{who}: {target.shape[0]} target distributions for {offsets[-1]} scored positions")
        temperature = self.kd.temperature

        def loss(model, batch):
            rows = batch["rows"].tolist()
            wanted = torch.cat([target[offsets[i] : offsets[i + 1]] for i in rows]).to(batch["input_ids"].device)
            logits, _ = response_logits(model, batch)
            return distillation_loss(wanted, logits, temperature)

        return trainer.train(who, start, examples, seed, loss=loss, training=training)

    # ------------------------------------------------------------------ the server

    def initial_state(self) -> ServerState:
        c = self.config
        ranks = {n: c.lora.rank for n in self.shapes}
        return ServerState(round=0, global_adapter=init_adapter(self.shapes, ranks, c.lora.alpha, c.lora.rslora, derived_seed(c.seed, "init")))

    def stage(self, round_: int) -> str:
        return self.kd.mode

    def responses(self, state: ServerState, round_: int) -> list[list[int]]:
        """The global model's greedy answers to the proxy prompts for ``round_`` (made once)."""
        if round_ not in self._responses:
            with self.setup.trainer.merged(state.global_adapter) as model:
                model.eval()
                self._responses = {round_: generate_ids(model, self.setup.tokenizer, self.prompts, self.kd.proxy.max_new_tokens, self.kd.batch_size)}
        return self._responses[round_]

    def conversation(self, state: ServerState, round_: int, client: int, shares_base: bool):
        client_id = self.setup.federation.clients[client].client_id
        responses = self.responses(state, round_)
        positions = sum(len(r) for r in responses)
        arrays = {**adapter_payload(state.global_adapter, self.within_client_layers(self.modules)), RESPONSES: proxy_lib.responses_tensor(responses, self.kd.proxy.max_new_tokens)}
        arrays.update(state.tensors)  # FedMD: the last round's consensus and its responses
        meta = {"stage": "kd", "client": client_id, "round": round_, "seed": derived_seed(self.config.seed, "train", round_, client_id), "shares_base": shares_base}
        reply = yield Message(arrays, meta)
        try:
            self.encoding.check(reply.arrays, positions)
        except ValueError as err:
            raise UpdateRejected(f"client {client_id}: {self.encoding.kind} distributions: {err}") from None
        return dict(reply.arrays)

    def combine(self, state: ServerState, round_: int, updates, weights) -> ServerState:
        responses = self.responses(state, round_)
        examples = self.examples(responses)
        info = {"kd_prompts": len(responses), "kd_positions": sum(len(r) for r in responses), "kd_proxy_tokens": sum(len(e.input_ids) for e in examples)}
        self._round[round_] = info
        if len(updates) < self.config.federation.min_clients:
            log.warning("round %d: %d clients reported, fewer than min_clients=%d; global model unchanged", round_, len(updates), self.config.federation.min_clients)
            return ServerState(round=round_, global_adapter=state.global_adapter, metrics=state.metrics, tensors=state.tensors)
        clients = mixture(updates, weights, self.encoding)
        trainer, temperature, beta = self.setup.trainer, self.kd.temperature, self.kd.mix_previous
        before, _ = self.score(trainer, state.global_adapter, examples)
        target = clients if not beta else (1 - beta) * clients + beta * probabilities(before, temperature)
        result = self.distil(trainer, "server", state.global_adapter, target, examples, derived_seed(self.config.seed, "kd-distil", round_), self.server_training)
        after, _ = self.score(trainer, result.adapter, examples)
        info.update(kd_kl_before=float(kl_per_position(target, before, temperature).mean()), kd_kl_after=float(kl_per_position(target, after, temperature).mean()), kd_distil_loss=result.loss)
        tensors = {}
        if self.kd.mode == "fedmd":
            tensors = {CONSENSUS + k: v for k, v in self.encoding.encode(clients).items()}
            tensors[CONSENSUS + "responses"] = proxy_lib.responses_tensor(responses, self.kd.proxy.max_new_tokens)
        adapter = {n: Factors(b=f.b.detach().cpu().float(), a=f.a.detach().cpu().float(), scale=f.scale) for n, f in result.adapter.items()}
        return ServerState(round=round_, global_adapter=adapter, metrics=state.metrics, tensors=tensors)

    def round_fields(self, state: ServerState, round_: int, reported) -> dict:
        return self._round.pop(round_, {})

    def client_fields(self, round_: int, client: int, update) -> dict:
        fields = {"ranks": {module_kind(n): self.config.lora.rank for n in self.modules}}  # as the weights protocol records them
        if self.kd.client_layers is not None:
            fields["layers"] = self.kd.client_layers
        return fields

    def evaluated(self, trainer, state: ServerState):
        return trainer.merged(state.global_adapter)

    def save(self, run_dir, state: ServerState) -> None:
        c = self.config
        save_adapter(Path(run_dir) / "adapters" / f"round-{state.round:04d}", state.global_adapter, c.model.name, c.lora.alpha, c.lora.rslora)

    # ------------------------------------------------------------------ the clients

    def serve(self, setup, messages: Sequence[Message], on_done=None) -> list[Message | Exception]:
        out = []
        for m in messages:
            try:
                out.append(self._serve(setup, m))
            except CLIENT_ERRORS as err:
                out.append(err)
            if on_done:
                on_done()
        return out

    def _serve(self, setup, m: Message) -> Message:
        client, seed = str(m.meta["client"]), int(m.meta["seed"])
        trainer, modules = self.client_trainer(setup)
        c = self.config
        parts = payload_parts({k: v for k, v in m.arrays.items() if k != RESPONSES and not k.startswith(CONSENSUS)}, modules, ("a", "b"))
        start = {n: Factors(b=p["b"], a=p["a"], scale=lora_scale(p["a"].shape[0], c.lora.alpha, c.lora.rslora)) for n, p in parts.items()}
        examples = self.examples(proxy_lib.responses_from_tensor(m.arrays[RESPONSES], len(self.prompts), self.vocab))
        costs = []
        began = time.perf_counter()
        if CONSENSUS + "responses" in m.arrays:  # FedMD's digest: distil the last round's consensus first
            consensus = {k.removeprefix(CONSENSUS): v for k, v in m.arrays.items() if k.startswith(CONSENSUS) and k != CONSENSUS + "responses"}
            shown = self.examples(proxy_lib.responses_from_tensor(m.arrays[CONSENSUS + "responses"], len(self.prompts), self.vocab))
            positions = sum(len(e.labels) - e.labels.count(proxy_lib.IGNORE_INDEX) for e in shown)
            self.encoding.check(consensus, positions)
            digest = self.distil(trainer, client, start, self.encoding.dense(consensus), shown, derived_seed(seed, "digest"), self.digest_training)
            start, costs = digest.adapter, [digest.cost]
        result = trainer.train(client, start, setup.examples(client), seed)
        logits, scoring = self.score(trainer, result.adapter, examples)
        payload = self.encoding.encode(probabilities(logits, self.kd.temperature))
        cost = dict(result.cost)
        for extra in [*costs, scoring]:  # digest and scoring add to the training's FLOPs
            for key in ("flops", "flops_analytic"):
                if key in cost:
                    cost[key] += int(extra.get(key, 0))
        stats = {"client": client, "num_examples": int(result.num_examples), "loss": float(result.loss), "losses": [float(x) for x in result.losses]}
        return Message(payload, {**stats, "tokens": int(result.tokens), "seconds": time.perf_counter() - began, **cost})
