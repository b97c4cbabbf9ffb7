"""Several clients trained in one forward/backward pass, each with its own LoRA adapter.

On a GPU one client's small batch leaves the device mostly idle. Here up to K sampled clients
share every pass: their batches are stacked into one batch of K equal blocks (block k belongs to
client k) and run once through the frozen base model, and every adapted linear layer adds, block
by block, ``s_k · (x_k A_kᵀ) B_kᵀ`` with a matmul batched over clients. Each client keeps its own
factors, optimizer, gradient clipping and mean loss. The base model is frozen and the clients'
parameters are disjoint, so the gradient of the summed per-client losses with respect to client
k's factors is exactly the gradient of client k's own loss: the results equal
``LocalTrainer.train`` one client at a time (same seeds, batches and optimizer steps) up to
floating-point rounding from the different matmul shapes and padding.

Ranks: the factors are zero-padded to the largest rank in the pass when they are stacked. The
padding is built anew at each forward and is not a parameter, so every optimizer sees exactly
the client's own shapes. Clients are queued by rank layout, so most passes hold one layout and
pad nothing; a client that finishes its local steps makes room for the next in the queue.

Failure isolation: a client whose loss is not finite leaves with a ``FloatingPointError``, as in
the sequential trainer, and its loss is kept out of the backward pass. Batch rows never mix in a
transformer, so its NaNs cannot reach the other clients. An error of the pass itself (e.g. out
of memory) fails the clients in that pass only; lower ``training.clients_per_pass`` then.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from flexfed.aggregation.base import LocalRule
from flexfed.cost import FlopCount
from flexfed.client import CLIENT_ERRORS, ClientResult, LocalTrainer, batch_schedule, collate, group_means, local_steps, response_token_losses
from flexfed.data.prompts import IGNORE_INDEX as IGNORE
from flexfed.data.prompts import EncodedExample
from flexfed.lora import Adapter, Factors
from flexfed.precision import padded_width

@dataclass
class ClientJob:
    client_id: str
    start: Adapter
    # Or a function that loads them, called when the client starts: then only the clients in
    # training hold their data, however many are queued.
    examples: Sequence[EncodedExample] | Callable[[], Sequence[EncodedExample]]
    seed: int
    frames: Mapping[str, Factors] | None = None  # Fed-SB's fixed frames (see LocalTrainer.activate)

    def load_examples(self) -> Sequence[EncodedExample]:
        return self.examples() if callable(self.examples) else self.examples


def clients_per_pass(setting: int | str, device: torch.device) -> int:
    """``training.clients_per_pass`` resolved: "auto" is 1 on a CPU and 8 on an accelerator."""
    if setting == "auto":
        return 1 if device.type == "cpu" else 8
    return int(setting)


def train_clients(
    trainer: LocalTrainer,
    jobs: Sequence[ClientJob],
    per_pass: int,
    trainable: Sequence[str] = ("a", "b"),
    on_done: Callable[[], None] | None = None,
    rule: LocalRule | None = None,
) -> list[ClientResult | Exception]:
    """Train every job, ``per_pass`` clients at a time; a result or the client's error, in job order.
    ``rule``: the method's local penalty and pruning (``LocalTrainer.train``)."""
    if per_pass > 1 and set(trainable) <= {"a", "b"} and trainer.local_dp is None:  # DP-SGD: Opacus hooks one model, one client
        return MultiClientTrainer(trainer).train(jobs, per_pass, trainable, on_done, rule)
    # One at a time: K = 1 gains nothing from stacking, and factors other than A and B
    # (e.g. a Fed-SB core) are the sequential trainer's business.
    outcomes: list[ClientResult | Exception] = []
    for job in jobs:
        try:
            outcomes.append(trainer.train(job.client_id, job.start, job.load_examples(), job.seed, trainable, job.frames, rule))
        except CLIENT_ERRORS as err:
            outcomes.append(err)
        if on_done:
            on_done()
    return outcomes


def _layout(adapter: Adapter) -> tuple:
    return tuple(sorted((n, f.rank) for n, f in adapter.items()))


class _Client:
    """One client's training state: factors, optimizer, batch schedule, losses."""

    def __init__(self, trainer: LocalTrainer, job: ClientJob, trainable: Sequence[str], modules: Sequence[str]):
        self.examples = job.load_examples()
        if not self.examples:
            raise ValueError(f"client {job.client_id}: no training examples")
        if sorted(job.start) != list(modules):
            raise ValueError(f"client {job.client_id}: adapts other modules than the clients trained with it")
        self.job = job
        self.pad_id = trainer.pad_id
        device = trainer.device
        # Trained in float32 whatever the base dtype, as PEFT keeps its LoRA weights.
        self.a = {n: f.a.to(device, torch.float32).clone().requires_grad_("a" in trainable) for n, f in job.start.items()}
        self.b = {n: f.b.to(device, torch.float32).clone().requires_grad_("b" in trainable) for n, f in job.start.items()}
        self.scale = {n: f.scale for n, f in job.start.items()}
        self.params = [t for n in sorted(job.start) for t in (self.a[n], self.b[n]) if t.requires_grad]
        self.optimizer = trainer._optimizer(self.params, trainer.training)
        lengths = [len(e.input_ids) for e in self.examples]
        steps = local_steps(trainer.training, len(self.examples))
        self.schedule = batch_schedule(lengths, trainer.training.batch_size, steps, job.seed)
        self.losses: list[float] = []
        self.tokens = 0
        self.cost = trainer.cost({n: f.rank for n, f in job.start.items()})
        self.seconds = 0.0
        self.advance()  # every client has at least one step

    def advance(self) -> bool:
        """Load the next local batch (on the CPU) into ``batch``; False after the last step."""
        indices = next(self.schedule, None)
        self.batch = None if indices is None else collate([self.examples[i] for i in indices], self.pad_id)
        return self.batch is not None

    def step(self, max_grad_norm: float | None) -> None:
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def result(self) -> ClientResult:
        adapter = {n: Factors(b=self.b[n].detach().cpu().clone(), a=self.a[n].detach().cpu().clone(), scale=self.scale[n]) for n in self.a}
        return ClientResult(
            client_id=self.job.client_id,
            adapter=adapter,
            num_examples=len(self.examples),
            loss=sum(self.losses) / len(self.losses),
            tokens=self.tokens,
            seconds=self.seconds,
            losses=self.losses,
            cost=self.cost.result() if self.cost else {},
        )


class MultiClientTrainer:
    """Trains clients K at a time on the base model of a ``LocalTrainer``, without its PEFT slots."""

    def __init__(self, trainer: LocalTrainer):
        self.trainer = trainer
        self._stacked: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ the adapted layers

    def _hook(self, name: str):
        def add_lora(module, args, output):
            a, b, s = self._stacked[name]  # (K, r, d_in), (K, d_out, r), (K, 1, 1)
            x = args[0].reshape(a.shape[0], -1, args[0].shape[-1])  # K client blocks of rows
            if x.dtype == torch.bfloat16:  # the bf16 path: the branch in bf16, as ``fused.LoraBranch`` does
                return torch.baddbmm(output.reshape(x.shape[0], -1, output.shape[-1]), torch.bmm(x, a.to(x.dtype).mT),
                                     (b * s).to(x.dtype).mT).reshape(output.shape)
            delta = torch.bmm(torch.bmm(x.to(a.dtype), a.mT), b.mT)
            return output + (delta * s.to(delta.dtype)).reshape(output.shape).to(output.dtype)

        return add_lora

    def _stack(self, clients: Sequence[_Client]) -> None:
        """Each module's factors stacked over the pass's clients, zero-padded to its largest rank."""
        device = self.trainer.device
        for name in clients[0].a:
            r = max(c.a[name].shape[0] for c in clients)
            a = torch.stack([F.pad(c.a[name], (0, 0, 0, r - c.a[name].shape[0])) for c in clients])
            b = torch.stack([F.pad(c.b[name], (0, r - c.b[name].shape[1])) for c in clients])
            s = torch.tensor([c.scale[name] for c in clients], device=device).view(-1, 1, 1)
            self._stacked[name] = (a, b, s)

    @contextmanager
    def _patched(self, names: Sequence[str]):
        """LoRA hooks on the base layers, PEFT's own adapters off, the base frozen; all undone after."""
        model, peft = self.trainer.base_model, self.trainer.peft_model
        flags = [(p, p.requires_grad) for p in model.parameters()]
        handles = [self.trainer.base_linear(n).register_forward_hook(self._hook(n)) for n in names]
        try:
            with peft.disable_adapter() if peft is not None else nullcontext():
                model.requires_grad_(False)
                model.train()
                yield
        finally:
            model.eval()
            for h in handles:
                h.remove()
            for p, flag in flags:
                p.requires_grad_(flag)
            self._stacked.clear()

    # ------------------------------------------------------------------ training

    def _joint_batch(self, batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """K client batches as K equal blocks of rows, right-padded to the widest
        (rounded up to the trainer's ``pad_multiple``).

        Filler rows (a client's last batch may be short) attend to all their pad tokens, which keeps
        them finite, and carry no label, so they add nothing to any loss or gradient.
        """
        rows = max(b["input_ids"].shape[0] for b in batches)
        width = padded_width(max(b["input_ids"].shape[1] for b in batches), self.trainer.pad_multiple)
        shape = (len(batches) * rows, width)
        ids = torch.full(shape, self.trainer.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        mask = torch.ones(shape, dtype=torch.long)
        for k, b in enumerate(batches):
            n, w = b["input_ids"].shape
            block = slice(k * rows, k * rows + n)
            ids[block, :w], labels[block, :w] = b["input_ids"], b["labels"]
            mask[block] = 0
            mask[block, :w] = b["attention_mask"]
        device = self.trainer.device
        return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}

    def _losses(self, batch: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        """Each client's mean response loss: (K,)."""
        t = self.trainer
        with torch.autocast(t.device.type, dtype=t.autocast or torch.float32, enabled=t.autocast is not None):
            token_losses, keep = response_token_losses(t.base_model, batch)
        return group_means(token_losses, keep, torch.arange(keep.shape[0], device=keep.device) // (keep.shape[0] // k), k)

    def _pass(self, active: Sequence[_Client], rule: LocalRule | None = None) -> list[Exception | None]:
        """One joint step of every active client; the error of each client that must leave.

        A method's ``rule`` adds each client's penalty on its own factors to that client's loss
        (as in ``LocalTrainer._fit``); the recorded losses stay the data losses."""
        costs = [c.cost for c in active if c.cost]
        counter = FlopCount() if any(c.counted is None for c in costs) else None
        for c in costs:
            c.reset_peak()
        with counter or nullcontext():
            self._stack(active)
            losses = self._losses(self._joint_batch([c.batch for c in active]), len(active))
            if rule is not None:
                penalties = torch.stack([rule.penalty({n: (c.b[n], c.a[n]) for n in c.a}).to(losses.dtype) for c in active])
                objectives = losses + penalties
            else:
                objectives = losses
            finite = torch.isfinite(objectives)
            if finite.any():
                objectives[finite].sum().backward()
        # The pass's counted FLOPs, shared by the formula's share of each client's batch.
        formulas = [c.cost.step_flops(c.batch) if c.cost else 0 for c in active]
        for c, f in zip(active, formulas):
            if c.cost:
                c.cost.record_peak()
                c.cost.add(c.batch, round(counter.get_total_flops() * f / sum(formulas)) if counter else None)
        errors: list[Exception | None] = []
        for c, loss, ok in zip(active, losses.tolist(), finite.tolist()):
            if not ok:
                errors.append(FloatingPointError(f"client {c.job.client_id}: non-finite training loss at step {len(c.losses)}"))
                continue
            c.step(self.trainer.training.max_grad_norm)
            c.losses.append(loss)
            c.tokens += int(c.batch["attention_mask"].sum())
            errors.append(None)
        return errors

    def train(
        self,
        jobs: Sequence[ClientJob],
        per_pass: int,
        trainable: Sequence[str] = ("a", "b"),
        on_done: Callable[[], None] | None = None,
        rule: LocalRule | None = None,
    ) -> list[ClientResult | Exception]:
        outcomes: list[ClientResult | Exception | None] = [None] * len(jobs)

        def finish(i: int, outcome: ClientResult | Exception) -> None:
            outcomes[i] = outcome
            if on_done:
                on_done()

        modules = sorted(jobs[0].start) if jobs else []
        # Same-layout clients next to each other, so that most passes pad no rank.
        queue = deque(sorted(range(len(jobs)), key=lambda i: _layout(jobs[i].start)))
        active: list[tuple[int, _Client]] = []
        with self._patched(modules):
            while queue or active:
                while queue and len(active) < per_pass:
                    i = queue.popleft()
                    try:  # set up on admission: only the clients in a pass hold factors on the device
                        active.append((i, _Client(self.trainer, jobs[i], trainable, modules)))
                    except CLIENT_ERRORS as err:
                        finish(i, err)
                if not active:
                    continue
                began = time.perf_counter()
                try:
                    errors = self._pass([c for _, c in active], rule)
                except CLIENT_ERRORS as err:
                    errors = [err] * len(active)
                share = (time.perf_counter() - began) / len(active)
                still = []
                for (i, c), err in zip(active, errors):
                    c.seconds += share
                    if err is not None:
                        finish(i, err)
                    elif not c.advance():
                        result = c.result()
                        result.adapter = self.trainer.finish(c.job.start, result.adapter, rule)
                        finish(i, result)
                    else:
                        still.append((i, c))
                active = still
        return outcomes
