"""The in-process simulator: every sampled client trains in turn on one shared base model.

Starts and updates go through the method's wire payloads (``Server.downlink``, ``Link``) exactly
as they would between machines, so bytes are measured from what is sent and the Flower engine
trains from and aggregates the same tensors. Methods that merge into the base (FLoRA) share the
merge too: the base weights are set to W0 + the cumulative update once before the round's
clients train and before evaluation, instead of once per client.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flexfed import attacks, config as config_lib
from flexfed.aggregation.base import Payload, payload_bytes, truncate
from flexfed.client import CLIENT_ERRORS, ClientResult, LocalTrainer, pick_device
from flexfed.config import RunConfig
from flexfed.evaluation import evaluate
from flexfed.federation import Federation, build_federation, client_examples
from flexfed.lora import module_kind, target_shapes
from flexfed.models import load_model, load_tokenizer
from flexfed.multiclient import ClientJob, clients_per_pass, train_clients
from flexfed.resources import TrainingMemory, client_profiles
from flexfed.server import Server, ServerState, derived_seed, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


class RunExists(RuntimeError):
    pass



class Simulation:
    """Wires model, federation, server and trainer for one run directory."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.run_dir = config.run_dir
        self.device = pick_device(config.device)
        dtype = getattr(torch, config.model.dtype)
        self.tokenizer = load_tokenizer(config.model.name)
        model = load_model(config.model.name, dtype=dtype, seed=config.seed)
        shapes = target_shapes(model, config.lora.target_modules)
        self.federation: Federation = build_federation(config, self.tokenizer)
        memory = TrainingMemory.for_run(config, model, shapes, self.device) if config.resources.distribution == "memory" else None
        profiles, assignment = client_profiles(config.resources, config.lora, shapes, len(self.federation.clients), config.seed, memory)
        base_norms = {n: float(model.get_submodule(n).weight.detach().double().norm()) for n in shapes}
        self.server = Server(config, shapes, profiles, assignment, [c.client_id for c in self.federation.clients], base_norms)
        self.trainer = LocalTrainer(model, config.lora, config.training, self.tokenizer.pad_token_id, self.device)
        self.time_clients = 0.0  # wall seconds of the last round's ``execute``
        self.tracker = None  # made when the run directory is ready (``start``)
        a = config.attack
        self.attackers = attacks.attackers([c.client_id for c in self.federation.clients], a.fraction, derived_seed(config.seed, "attackers")) if a.fraction else set()

    # ------------------------------------------------------------------ pieces of a round

    def sync_base(self, state: ServerState) -> None:
        """The shared base weights of ``state``'s global model: W0 + the merged update (FLoRA) or
        + the sparse update (SLoRA's first stage), else W0."""
        self.trainer.set_base_delta(self.server.base_delta(state))

    def evaluate(self, state: ServerState) -> dict:
        began = time.perf_counter()
        self.sync_base(state)
        e = self.config.eval
        out = {}
        predictions = []
        f = self.federation
        with self.trainer.merged(self.server.peft_view(self.server.eval_adapter(state))) as model:
            results = {split: evaluate(model, self.tokenizer, items, e.max_new_tokens, e.batch_size)
                       for split, items in (("seen", f.eval_seen), ("unseen", f.eval_unseen), ("validation", f.eval_validation))}
        for split, res in results.items():
            for key in ("rouge_l", "rouge_l_weighted", "rouge_l_by_task", "rouge_l_by_category"):
                out[key.replace("rouge_l", f"rouge_l_{split}")] = res[key]
            out[f"eval_loss_{split}"] = res["loss"]
            predictions += [{"split": split, **p} for p in res["predictions"]]
        pred_dir = self.run_dir / "predictions"
        pred_dir.mkdir(parents=True, exist_ok=True)
        with open(pred_dir / f"round-{state.round:04d}.jsonl", "w") as fh:
            fh.writelines(json.dumps(p) + "\n" for p in predictions)
        out["time_eval_s"] = time.perf_counter() - began
        return out

    def downlink(self, state: ServerState, client: int) -> Payload:
        """What client ``client`` is sent this round; an engine may send something else."""
        return self.server.downlink(state, client)

    def execute(self, round_: int, downs: dict[int, Payload], progress: Progress | None) -> dict[int, tuple[ClientResult, Payload] | Exception]:
        """Train each client from what it was sent; returns its result and the payload it sends back.
        An engine overrides this to train elsewhere."""
        task = progress.add_task(f"round {round_} clients", total=len(downs)) if progress else None
        advance = (lambda: progress.advance(task)) if progress else None
        link = self.server.link
        jobs = {}
        for c, down in downs.items():
            shard, ranks, seed = self.federation.clients[c], self.server.ranks_of(c), self.server.client_seed(round_, c)
            examples = partial(client_examples, self.config, self.tokenizer, self.federation, shard)  # loaded when it starts
            jobs[c] = ClientJob(shard.client_id, link.start(down, ranks, seed), examples, seed, link.common(ranks))
        per_pass = clients_per_pass(self.config.training.clients_per_pass, self.device)
        results = train_clients(self.trainer, list(jobs.values()), per_pass, link.aggregator.trainable, advance, link.aggregator.local_rule())
        outcomes: dict[int, tuple[ClientResult, Payload] | Exception] = {}
        for c, result in zip(jobs, results):
            outcomes[c] = result if isinstance(result, Exception) else (result, link.send(result.adapter, self.server.ranks_of(c)))
        if progress:
            progress.remove_task(task)
        return outcomes

    def train_round(self, state: ServerState, round_: int, progress: Progress | None) -> tuple[list, list, list[dict], list[dict]]:
        """Train every sampled client; returns accepted updates, their weights, client records, failures."""
        self.sync_base(state)
        downs = {c: self.downlink(state, c) for c in self.server.sample(round_)}
        began = time.perf_counter()
        outcomes = self.execute(round_, downs, progress)
        self.time_clients = time.perf_counter() - began  # the clients' own work: data, training, transport
        outcomes = self.attack(round_, downs, outcomes)  # simulated attackers (config ``attack``), if any
        updates, weights, records, failures = [], [], [], []
        for c, down in downs.items():
            shard = self.federation.clients[c]
            outcome = outcomes.get(c, TimeoutError("no reply"))
            try:
                if isinstance(outcome, Exception):
                    raise outcome
                result, up = outcome
                update = self.server.receive(c, up)
            except Exception as err:  # noqa: BLE001 - any client failure only drops that client
                log.warning("round %d: client %s left out: %s", round_, shard.client_id, err)
                failures.append({"id": shard.client_id, "reason": f"{type(err).__name__}: {err}", "bytes_down": payload_bytes(down)})
                continue
            updates.append(update)
            weights.append(self.client_weight(round_, c, result))
            records.append(self._client_record(c, result, payload_bytes(down), payload_bytes(up)))
            if shard.client_id in self.attackers:
                records[-1]["attacker"] = True
            sent = _ranks_by_kind({n: f.rank for n, f in update.items()})
            if sent != records[-1]["ranks"]:  # the client cut its own rank (HetLoRA's self-pruning)
                records[-1]["ranks_sent"] = sent
        return updates, weights, records, failures

    def attack(self, round_: int, downs: dict[int, Payload], outcomes: dict) -> dict:
        """Outcomes with each attacker's update poisoned (``flexfed.attacks``), as if it had sent it."""
        if not self.attackers:
            return outcomes
        link, kind = self.server.link, self.config.attack.kind
        out = dict(outcomes)
        for c, outcome in outcomes.items():
            client_id = self.federation.clients[c].client_id
            if client_id not in self.attackers or isinstance(outcome, Exception):
                continue
            result, up = outcome
            ranks = self.server.ranks_of(c)
            trained = link.receive(up, ranks)
            start = link.start(downs[c], ranks, self.server.client_seed(round_, c))
            start = {n: truncate(f, trained[n].rank, trained[n].scale) for n, f in start.items()}  # a client that pruned (HetLoRA)
            poisoned = attacks.poison(kind, link.aggregator.trainable, start, trained, self.config.attack.scale, derived_seed(self.config.seed, "attack", round_, client_id))
            out[c] = (result, link.send(poisoned, {n: f.rank for n, f in poisoned.items()}))
        return out

    def client_weight(self, round_: int, c: int, result: ClientResult) -> int:
        """The client's aggregation weight n_i: the size of its shard, which the server assigned.

        A client's own count is not trusted (on Flower a node reports it): one that reports a
        different number is logged, and its weight stays the shard's size.
        """
        shard = self.federation.clients[c]
        if result.num_examples != shard.num_examples:
            log.warning("round %d: client %s reported %d training examples; its shard holds %d, which is its weight", round_, shard.client_id, result.num_examples, shard.num_examples)
        return shard.num_examples

    def _client_record(self, c: int, result: ClientResult, bytes_down: int, bytes_up: int) -> dict:
        shard = self.federation.clients[c]
        return {
            "id": shard.client_id,
            "task": shard.task,
            "profile": self.server.profiles[self.server.client_profile[c]].name,
            "ranks": _ranks_by_kind(self.server.ranks_of(c)),
            "examples": shard.num_examples,
            "tokens": result.tokens,
            "seconds": result.seconds,
            "loss": result.loss,
            "bytes_down": bytes_down,
            "bytes_up": bytes_up,
        }

    def train_sparse_round(self, state: ServerState, round_: int, progress: Progress | None) -> tuple[list, list, list[dict], list[dict]]:
        """SLoRA's first stage: sampled clients train sparse changes to the base, in turn (simulator only)."""
        self.sync_base(state)
        sampled = self.server.sample(round_)
        task = progress.add_task(f"round {round_} clients (sparse)", total=len(sampled)) if progress else None
        # Clients receive the current global values and send their change: one float per chosen entry.
        nbytes = sum(4 * len(idx) for idx in self.server.sparse_indices.values())
        updates, weights, records, failures = [], [], [], []
        began = time.perf_counter()
        for c in sampled:
            shard = self.federation.clients[c]
            try:
                examples = client_examples(self.config, self.tokenizer, self.federation, shard)
                result = self.trainer.train_sparse(shard.client_id, self.server.sparse_indices, examples, self.server.client_seed(round_, c))
                self.server.check_sparse(c, result.sparse)
            except CLIENT_ERRORS as err:
                log.warning("round %d: client %s left out: %s", round_, shard.client_id, err)
                failures.append({"id": shard.client_id, "reason": f"{type(err).__name__}: {err}", "bytes_down": nbytes})
            else:
                updates.append(result.sparse)
                weights.append(self.client_weight(round_, c, result))
                records.append(self._client_record(c, result, nbytes, nbytes))
            if progress:
                progress.advance(task)
        self.time_clients = time.perf_counter() - began
        if progress:
            progress.remove_task(task)
        return updates, weights, records, failures

    def round(self, state: ServerState, round_: int, progress: Progress | None) -> ServerState:
        began = time.perf_counter()
        sparse_stage = self.server.in_sparse_stage(round_)
        train = self.train_sparse_round if sparse_stage else self.train_round
        log.debug("round %d: clients training", round_)  # phase markers (the crash tests kill on them)
        updates, weights, records, failures = train(state, round_, progress)
        log.debug("round %d: aggregating", round_)
        time_train = time.perf_counter() - began
        t0 = time.perf_counter()
        advance = self.server.advance_sparse if sparse_stage else self.server.advance
        state = advance(state, round_, updates, weights)
        time_aggregate = time.perf_counter() - t0
        total = sum(r["examples"] for r in records)
        record = {
            "round": round_,
            "method": self.config.federation.method,
            "stage": "sparse" if sparse_stage else "lora",
            "train_loss": sum(r["loss"] * r["examples"] for r in records) / total if total else None,
            "clients_sampled": len(records) + len(failures),
            "clients_reported": len(records),
            "clients_failed": failures,
            "bytes_up": sum(r["bytes_up"] for r in records),
            "bytes_down": sum(r["bytes_down"] for r in records + failures),
            "tokens_trained": sum(r["tokens"] for r in records),
            "time_train_s": time_train,
            "time_aggregate_s": time_aggregate,
            "aggregate_rejected": state.rejected,  # why the previous global was kept, if it was
            "epsilon": self.server.epsilon(round_),  # privacy: ε(privacy.delta) spent so far (null: no guarantee)
        }
        if state.defence is not None:  # what privacy / robust aggregation did, indices mapped to client ids
            ids = [r["id"] for r in records]
            record["defence"] = {k: ([ids[i] for i in v] if k in ("rejected", "clipped") else v) for k, v in state.defence.items()}
        record.update(self._maybe_evaluate(state))
        record["time_round_s"] = time.perf_counter() - began
        # The framework's own cost: sampling, start adapters, update checks, aggregation, records.
        record["time_overhead_s"] = record["time_round_s"] - self.time_clients - record["time_eval_s"]
        record["clients"] = records
        state.metrics = [*state.metrics, record]
        return state

    def _maybe_evaluate(self, state: ServerState) -> dict:
        last = state.round == self.config.federation.rounds
        if state.round == 0 or last or state.round % self.config.eval.every == 0:
            return self.evaluate(state)
        skipped = {f"{metric}_{split}": None for metric in ("rouge_l", "eval_loss") for split in ("seen", "unseen", "validation")}
        return {**skipped, "time_eval_s": 0.0}

    # ------------------------------------------------------------------ the run

    def persist(self, state: ServerState) -> None:
        """Adapter, metrics line and checkpoint of a finished round, checkpoint last."""
        self.server.save_global(self.run_dir / "adapters" / f"round-{state.round:04d}", self.server.global_update(state))
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(state.metrics[-1]) + "\n")
        if self.tracker is not None:
            self.tracker.log(state.metrics[-1])
        log.debug("round %d: writing checkpoint", state.round)
        save_checkpoint(self.run_dir, state)

    def open_tracker(self, purge_from: int | None = None) -> None:
        if self.config.tracking.tensorboard:
            from flexfed.tracking import TensorBoardTracker

            self.tracker = TensorBoardTracker(self.run_dir, purge_from)

    def start(self, resume: bool, overwrite: bool) -> ServerState:
        state = load_checkpoint(self.run_dir) if resume else None
        if resume and state is None:
            raise RunExists(f"{self.run_dir}: nothing to resume (no checkpoint)")
        if state is not None:
            self.server.use_ranks(state)  # clients that pruned their ranks stay pruned
            log.info("resuming %s after round %d", self.run_dir, state.round)
            # Lines written after the checkpoint belong to a round that will be redone.
            with open(self.run_dir / "metrics.jsonl", "w") as fh:
                fh.writelines(json.dumps(m) + "\n" for m in state.metrics)
            self.open_tracker(purge_from=state.round + 1)  # and so do TensorBoard's points past it
            return state
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            if not overwrite:
                raise RunExists(f"{self.run_dir} already holds a run; use --resume to continue it or --overwrite to start over")
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(config_lib.dump(self.config))
        self.open_tracker()
        state = self.server.initial_state()
        self.server.use_ranks(state)  # every client at its profile's ranks
        log.info("round 0: evaluating the untouched model")
        registered = len(self.federation.clients)  # the federation's size; later rounds record only the sampled clients
        state.metrics = [{"round": 0, "method": self.config.federation.method, "clients_registered": registered, "train_loss": None, "epsilon": self.server.epsilon(0), **self.evaluate(state)}]
        self.persist(state)
        return state

    def run(self, resume: bool = False, overwrite: bool = False, show_progress: bool = True, stop_after: int | None = None) -> Path:
        """Run (or continue) to ``federation.rounds``; ``stop_after`` ends early, as a crash would."""
        state = self.start(resume, overwrite)
        if state.round == 0:
            _log_eval(state.metrics[-1])
        rounds = self.config.federation.rounds
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False) if show_progress else None
        with progress or nullcontext():
            task = progress.add_task("rounds", total=rounds, completed=state.round) if progress else None
            for r in range(state.round + 1, rounds + 1):
                if stop_after is not None and r > stop_after:
                    break
                state = self.round(state, r, progress)
                self.persist(state)
                _log_eval(state.metrics[-1])
                if progress:
                    progress.advance(task)
        if self.tracker is not None:
            self.tracker.close()
        return self.run_dir


def _ranks_by_kind(ranks) -> dict[str, int]:
    """Per-module ranks folded to one per module kind (they agree within a kind by construction)."""
    return {module_kind(m): r for m, r in sorted(ranks.items())}


def _log_eval(m: dict) -> None:
    parts = [f"round {m['round']}"]
    if m.get("train_loss") is not None:
        parts.append(f"train loss {m['train_loss']:.3f}")
    if m.get("rouge_l_unseen") is not None:
        parts.append(f"Rouge-L seen {m['rouge_l_seen']:.3f} unseen {m['rouge_l_unseen']:.3f}")
        if m.get("rouge_l_validation") is not None:
            parts.append(f"validation {m['rouge_l_validation']:.3f}")
        parts.append(f"eval loss unseen {m['eval_loss_unseen']:.3f}")
    log.info(", ".join(parts))


def run(config: RunConfig, resume: bool = False, overwrite: bool = False, show_progress: bool = True, stop_after: int | None = None) -> Path:
    return Simulation(config).run(resume=resume, overwrite=overwrite, show_progress=show_progress, stop_after=stop_after)
