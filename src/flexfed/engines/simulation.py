"""The in-process simulator: every sampled client trains in turn on one shared base model."""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flexfed import config as config_lib
from flexfed.client import ClientResult, LocalTrainer
from flexfed.config import RunConfig
from flexfed.evaluation import evaluate
from flexfed.federation import Federation, build_federation, client_examples
from flexfed.lora import Adapter, adapter_bytes, module_kind, target_shapes
from flexfed.models import load_model, load_tokenizer
from flexfed.resources import TrainingMemory, client_profiles
from flexfed.server import Server, ServerState, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


class RunExists(RuntimeError):
    pass


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
        self.server = Server(config, shapes, profiles, assignment, [c.client_id for c in self.federation.clients])
        self.trainer = LocalTrainer(model, config.lora, config.training, self.tokenizer.pad_token_id, self.device)

    # ------------------------------------------------------------------ pieces of a round

    def evaluate(self, state: ServerState) -> dict:
        began = time.perf_counter()
        self.trainer.activate(self.server.peft_view(state.global_adapter))
        e = self.config.eval
        out = {}
        predictions = []
        for split, items in (("seen", self.federation.eval_seen), ("unseen", self.federation.eval_unseen)):
            res = evaluate(self.trainer.peft_model, self.tokenizer, items, e.max_new_tokens, e.batch_size)
            out[f"rouge_l_{split}"] = res["rouge_l"]
            out[f"eval_loss_{split}"] = res["loss"]
            out[f"rouge_l_{split}_by_category"] = res["rouge_l_by_category"]
            predictions += [{"split": split, **p} for p in res["predictions"]]
        pred_dir = self.run_dir / "predictions"
        pred_dir.mkdir(parents=True, exist_ok=True)
        with open(pred_dir / f"round-{state.round:04d}.jsonl", "w") as fh:
            fh.writelines(json.dumps(p) + "\n" for p in predictions)
        out["time_eval_s"] = time.perf_counter() - began
        return out

    def execute(self, round_: int, starts: dict[int, Adapter], progress: Progress | None) -> dict[int, ClientResult | Exception]:
        """Train each client from its start adapter; an engine overrides this to train elsewhere."""
        task = progress.add_task(f"round {round_} clients", total=len(starts)) if progress else None
        outcomes: dict[int, ClientResult | Exception] = {}
        for c, start in starts.items():
            shard = self.federation.clients[c]
            try:
                examples = client_examples(self.config, self.tokenizer, self.federation, shard)
                seed = self.server.client_seed(round_, c)
                outcomes[c] = self.trainer.train(shard.client_id, start, examples, seed, self.server.aggregator.trainable)
            except (FloatingPointError, ValueError, RuntimeError) as err:
                outcomes[c] = err
            if progress:
                progress.advance(task)
        if progress:
            progress.remove_task(task)
        return outcomes

    def train_round(self, state: ServerState, round_: int, progress: Progress | None) -> tuple[list, list, list[dict], list[dict]]:
        """Train every sampled client; returns accepted updates, their weights, client records, failures."""
        starts = {c: self.server.start_adapter(state, c) for c in self.server.sample(round_)}
        outcomes = self.execute(round_, starts, progress)
        updates, weights, records, failures = [], [], [], []
        for c, start in starts.items():
            shard = self.federation.clients[c]
            result = outcomes.get(c, TimeoutError("no reply"))
            try:
                if isinstance(result, Exception):
                    raise result
                self.server.check_update(c, result.adapter)
            except Exception as err:  # noqa: BLE001 - any client failure only drops that client
                log.warning("round %d: client %s left out: %s", round_, shard.client_id, err)
                failures.append({"id": shard.client_id, "reason": f"{type(err).__name__}: {err}", "bytes_down": adapter_bytes(start)})
                continue
            updates.append(result.adapter)
            weights.append(result.num_examples)
            records.append(
                {
                    "id": shard.client_id,
                    "task": shard.task,
                    "profile": self.server.profiles[self.server.client_profile[c]].name,
                    "ranks": _ranks_by_kind(self.server.ranks_of(c)),
                    "examples": result.num_examples,
                    "tokens": result.tokens,
                    "seconds": result.seconds,
                    "loss": result.loss,
                    "bytes_down": adapter_bytes(start),
                    "bytes_up": adapter_bytes(result.adapter),
                }
            )
        return updates, weights, records, failures

    def round(self, state: ServerState, round_: int, progress: Progress | None) -> ServerState:
        began = time.perf_counter()
        updates, weights, records, failures = self.train_round(state, round_, progress)
        time_train = time.perf_counter() - began
        t0 = time.perf_counter()
        if len(updates) >= self.config.federation.min_clients:
            new_global = self.server.aggregate(state, updates, weights)
        else:
            log.warning("round %d: %d clients reported, fewer than min_clients=%d; global adapter unchanged", round_, len(updates), self.config.federation.min_clients)
            new_global = state.global_adapter
        time_aggregate = time.perf_counter() - t0
        state = ServerState(round=round_, global_adapter=new_global, metrics=state.metrics)
        total = sum(r["examples"] for r in records)
        record = {
            "round": round_,
            "method": self.config.federation.method,
            "train_loss": sum(r["loss"] * r["examples"] for r in records) / total if total else None,
            "clients_sampled": len(records) + len(failures),
            "clients_reported": len(records),
            "clients_failed": failures,
            "bytes_up": sum(r["bytes_up"] for r in records),
            "bytes_down": sum(r["bytes_down"] for r in records + failures),
            "tokens_trained": sum(r["tokens"] for r in records),
            "time_train_s": time_train,
            "time_aggregate_s": time_aggregate,
        }
        record.update(self._maybe_evaluate(state))
        record["time_round_s"] = time.perf_counter() - began
        record["clients"] = records
        state.metrics = [*state.metrics, record]
        return state

    def _maybe_evaluate(self, state: ServerState) -> dict:
        last = state.round == self.config.federation.rounds
        if state.round == 0 or last or state.round % self.config.eval.every == 0:
            return self.evaluate(state)
        return {"rouge_l_seen": None, "rouge_l_unseen": None, "eval_loss_seen": None, "eval_loss_unseen": None, "time_eval_s": 0.0}

    # ------------------------------------------------------------------ the run

    def persist(self, state: ServerState) -> None:
        """Adapter, metrics line and checkpoint of a finished round, checkpoint last."""
        self.server.save_global(self.run_dir / "adapters" / f"round-{state.round:04d}", state.global_adapter)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(state.metrics[-1]) + "\n")
        save_checkpoint(self.run_dir, state)

    def start(self, resume: bool, overwrite: bool) -> ServerState:
        state = load_checkpoint(self.run_dir) if resume else None
        if resume and state is None:
            raise RunExists(f"{self.run_dir}: nothing to resume (no checkpoint)")
        if state is not None:
            log.info("resuming %s after round %d", self.run_dir, state.round)
            # Lines written after the checkpoint belong to a round that will be redone.
            with open(self.run_dir / "metrics.jsonl", "w") as fh:
                fh.writelines(json.dumps(m) + "\n" for m in state.metrics)
            return state
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            if not overwrite:
                raise RunExists(f"{self.run_dir} already holds a run; use --resume to continue it or --overwrite to start over")
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(config_lib.dump(self.config))
        state = self.server.initial_state()
        log.info("round 0: evaluating the untouched model")
        registered = len(self.federation.clients)  # the federation's size; later rounds record only the sampled clients
        state.metrics = [{"round": 0, "method": self.config.federation.method, "clients_registered": registered, "train_loss": None, **self.evaluate(state)}]
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
        parts.append(f"eval loss unseen {m['eval_loss_unseen']:.3f}")
    log.info(", ".join(parts))


def run(config: RunConfig, resume: bool = False, overwrite: bool = False, show_progress: bool = True, stop_after: int | None = None) -> Path:
    return Simulation(config).run(resume=resume, overwrite=overwrite, show_progress=show_progress, stop_after=stop_after)
