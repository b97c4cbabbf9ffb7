"""The round loop of every protocol and engine: sampling, rounds, evaluation, checkpoints, metrics, resume.

``Runner`` composes a ``Setup`` (``flexfed.build``: tokenizer, federation, model, trainer), a
protocol (``flexfed.protocol``: what travels, what each side computes) and an executor, which
carries each sampled client's conversation: ``InProcess`` here (the clients train in turn, or
several per pass, on the runner's own trainer), ``FlowerExecutor`` through a Flower SuperLink.
Everything else is the runner's, so both engines write the same run directory from a config.

A round: sample; the protocol opens one conversation per sampled client; the executor drives
them (``protocol.converse``); the protocol combines the updates of the clients that finished
into the next state; the runner evaluates, writes the metrics line and the checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flexfed import config as config_lib
from flexfed.build import Setup
from flexfed.config import RunConfig
from flexfed.evaluation import evaluate
from flexfed.protocol import Failure, Outcome, Protocol, converse
from flexfed.server import ServerState, load_checkpoint, sample_clients, save_checkpoint

log = logging.getLogger(__name__)

COST_FIELDS = ("flops", "flops_analytic", "tokens_padded", "peak_memory_bytes", "peak_memory_source")


class RunExists(RuntimeError):
    pass


CLI_HINT = "use --resume to continue it or --overwrite to start over"


def build_protocol(setup: Setup, serve: bool = True) -> Protocol:
    """The run's protocol: its method's family (``protocol.FAMILIES``), else the weights
    protocol with the method as its aggregator; ``serve=False``: a node's end."""
    import importlib

    from flexfed.protocol import family_of

    target = family_of(setup.config.federation.method)
    if target is None:
        from flexfed.aggregation.weights import WeightsProtocol

        return WeightsProtocol(setup, serve)
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(setup, serve)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, hint: str = CLI_HINT) -> ServerState | None:
    """The checkpoint to resume from; ``RunExists`` if the run directory cannot be used
    (``hint``: how to continue or replace it on the engine at hand)."""
    state = load_checkpoint(run_dir) if resume else None
    if resume and state is None:
        raise RunExists(f"{run_dir}: nothing to resume (no checkpoint)")
    if state is None and not overwrite and run_dir.exists() and any(run_dir.iterdir()):
        raise RunExists(f"{run_dir} already holds a run; {hint}")
    return state


class Executor:
    """Carries conversations to the clients. This one trains them in this process, on the
    runner's trainer, which shares the server's base weights (``shares_base``)."""

    name = "in-process"
    shares_base = True

    def attach(self, runner: Runner) -> None:
        self.runner = runner

    def open(self) -> None:
        """Before round 0 is evaluated (e.g. reach the nodes)."""

    def opened(self) -> None:
        """After round 0 is evaluated."""

    def run(self, round_: int, conversations: dict, progress: Progress | None) -> dict[int, Outcome | Failure]:
        task = progress.add_task(f"round {round_} clients", total=len(conversations)) if progress else None
        advance = (lambda: progress.advance(task)) if progress else None
        r = self.runner

        def deliver(wave):
            return dict(zip(wave, r.protocol.serve(r.setup, list(wave.values()), advance)))

        out = converse(conversations, deliver)
        if progress:
            progress.remove_task(task)
        return out

    def annotate(self, record: dict) -> None:
        """Add the executor's own fields to a round's metrics record (e.g. bytes on the wire)."""


InProcess = Executor


class Runner:
    def __init__(self, config: RunConfig, executor: Executor | None = None, protocol: Callable[[Setup], Protocol] = build_protocol):
        self.config = config
        self.run_dir = config.run_dir
        self.executor = executor or InProcess()
        self.setup = Setup(config)
        self.protocol = protocol(self.setup)
        self.protocol.check_executor(self.executor)
        self.executor.attach(self)
        self.time_clients = 0.0  # wall seconds of the last round's conversations
        self.tracker = None  # made when the run directory is ready (``start``)

    # What tests and tools reach through the runner.
    tokenizer = property(lambda self: self.setup.tokenizer)
    federation = property(lambda self: self.setup.federation)
    trainer = property(lambda self: self.setup.trainer)
    device = property(lambda self: self.setup.device)
    server = property(lambda self: self.protocol.server)

    # ------------------------------------------------------------------ pieces of a round

    def evaluate(self, state: ServerState) -> dict:
        began = time.perf_counter()
        e = self.config.eval
        out = {}
        predictions = []
        f = self.federation
        with self.protocol.evaluated(self.trainer, state) as model:
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

    def client_weight(self, round_: int, c: int, reported: int) -> int:
        """The client's aggregation weight n_i: the size of its shard, which the server assigned.

        A client's own count is not trusted (on Flower a node reports it): one that reports a
        different number is logged, and its weight stays the shard's size.
        """
        shard = self.federation.clients[c]
        if reported != shard.num_examples:
            log.warning("round %d: client %s reported %d training examples; its shard holds %d, which is its weight", round_, shard.client_id, reported, shard.num_examples)
        return shard.num_examples

    def round(self, state: ServerState, round_: int, progress: Progress | None) -> ServerState:
        began = time.perf_counter()
        shares = self.executor.shares_base
        if shares:
            self.protocol.sync(self.trainer, state)
        sampled = sample_clients(self.config, len(self.federation.clients), round_)
        conversations = {c: self.protocol.conversation(state, round_, c, shares) for c in sampled}
        t0 = time.perf_counter()
        log.debug("round %d: clients training", round_)  # phase markers (the crash tests kill on them)
        outcomes = self.executor.run(round_, conversations, progress)
        self.time_clients = time.perf_counter() - t0  # the clients' own work: data, training, transport
        updates, weights, records, failures = [], [], [], []
        for c in sampled:
            shard, outcome = self.federation.clients[c], outcomes[c]
            if isinstance(outcome, Failure):
                log.warning("round %d: client %s left out: %s", round_, shard.client_id, outcome.error)
                failures.append({"id": shard.client_id, "reason": f"{type(outcome.error).__name__}: {outcome.error}", "bytes_down": outcome.bytes_down,
                                 **({"bytes_down_unconfirmed": outcome.bytes_unconfirmed} if outcome.bytes_unconfirmed else {})})
                continue
            s = outcome.stats
            updates.append(outcome.update)
            weights.append(self.client_weight(round_, c, int(s["num_examples"])))
            records.append({
                "id": shard.client_id, "task": shard.task, **self.protocol.client_fields(round_, c, outcome.update),
                "examples": shard.num_examples, "tokens": int(s["tokens"]), "seconds": float(s["seconds"]), "loss": float(s["loss"]),
                "bytes_down": outcome.bytes_down, "bytes_up": outcome.bytes_up, **{k: s[k] for k in COST_FIELDS if k in s},
            })
        time_train = time.perf_counter() - began
        t0 = time.perf_counter()
        log.debug("round %d: aggregating", round_)
        state = self.protocol.combine(state, round_, updates, weights)
        time_aggregate = time.perf_counter() - t0
        total = sum(r["examples"] for r in records)
        record = {
            "round": round_,
            "method": self.config.federation.method,
            "stage": self.protocol.stage(round_),
            "train_loss": sum(r["loss"] * r["examples"] for r in records) / total if total else None,
            "clients_sampled": len(records) + len(failures),
            "clients_reported": len(records),
            "clients_failed": failures,
            "bytes_up": sum(r["bytes_up"] for r in records),
            "bytes_down": sum(r["bytes_down"] for r in records + failures),
            "tokens_trained": sum(r["tokens"] for r in records),
            "flops": sum(r.get("flops", 0) for r in records),
            "time_train_s": time_train,
            "time_aggregate_s": time_aggregate,
            "aggregate_rejected": state.rejected,  # why the previous global was kept, if it was
            **self.protocol.round_fields(state, round_, [r["id"] for r in records]),
        }
        record.update(self._maybe_evaluate(state))
        record["time_round_s"] = time.perf_counter() - began
        # The framework's own cost: sampling, start adapters, update checks, aggregation, records.
        record["time_overhead_s"] = record["time_round_s"] - self.time_clients - record["time_eval_s"]
        record["clients"] = records
        self.executor.annotate(record)
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
        self.protocol.save(self.run_dir, state)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(state.metrics[-1]) + "\n")
        if self.tracker is not None:
            self.tracker.log(state.metrics[-1])
        log.debug("round %d: writing checkpoint", state.round)
        save_checkpoint(self.run_dir, state)

    def open_tracker(self, purge_from: int | None = None) -> None:
        if self.config.tracking.tensorboard or self.config.tracking.mlflow:
            from flexfed.tracking import Trackers

            self.tracker = Trackers(self.config, self.run_dir, purge_from)

    # How a user asks to continue or replace a run directory on this engine (Flower: run config keys).
    resume_hint = CLI_HINT

    def start(self, resume: bool, overwrite: bool) -> ServerState:
        checkpoint = self.check_run_dir(resume, overwrite)  # before the executor waits for anyone
        self.executor.open()
        state = self._start(checkpoint, overwrite)
        self.executor.opened()
        return state

    def check_run_dir(self, resume: bool, overwrite: bool) -> ServerState | None:
        return check_run_dir(self.run_dir, resume, overwrite, self.resume_hint)

    def _start(self, state: ServerState | None, overwrite: bool) -> ServerState:
        if state is not None:
            self.protocol.resume(state)
            log.info("resuming %s after round %d", self.run_dir, state.round)
            # Lines written after the checkpoint belong to a round that will be redone.
            with open(self.run_dir / "metrics.jsonl", "w") as fh:
                fh.writelines(json.dumps(m) + "\n" for m in state.metrics)
            self.open_tracker(purge_from=state.round + 1)  # and so do the trackers' points past it
            return state
        if self.run_dir.exists() and any(self.run_dir.iterdir()):  # overwrite: checked by ``check_run_dir``
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(config_lib.dump(self.config))
        self.open_tracker()
        state = self.protocol.initial_state()
        self.protocol.resume(state)
        log.info("round 0: evaluating the untouched model")
        registered = len(self.federation.clients)  # the federation's size; later rounds record only the sampled clients
        state.metrics = [{"round": 0, "method": self.config.federation.method, "clients_registered": registered, "train_loss": None, **self.protocol.round_fields(state, 0, []), **self.evaluate(state)}]
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
