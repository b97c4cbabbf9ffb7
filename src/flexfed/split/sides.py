"""The two sides of a split training step: ``ClientSession`` (a client's round, on its node) and
``ServerPart`` (the server's blocks, one copy per client in SplitFed v1, one for all in v2).

A step, the server computing the loss::

    client: h = blocks[0, ℓ)(batch)                -> h, mask, labels
    server: loss = head(blocks[ℓ, L)(h)); backward  -> dL/dh, ‖server grads‖²
    client: backward from dL/dh; clip; step          -> next h ... (its ‖grads‖² with it)
    server: clip; step (on the client's ‖grads‖²)

U-shape (``split.tail_layers``): the server returns its blocks' output instead of a loss, the
client runs its tail and the head, computes the loss and sends the gradient at the server's
output; the server answers with the gradient at the cut. Labels and outputs never leave.

Gradient clipping (``training.max_grad_norm``) is over all of a step's LoRA gradients, as in
ordinary training: each side sends the squared norm of its own, both clip with the total, so
the split step is the whole model's step. Each side keeps its factors and optimizer as tensors
of its own (``parts.bound``) and takes gradients with ``torch.autograd.grad``: nothing
accumulates in shared ``.grad`` fields, so clients interleaved step by step cannot mix.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import replace
from typing import Mapping, Sequence

import torch

from flexfed.client import batch_schedule, collate, group_means, head_logits, head_token_losses, local_steps
from flexfed.cost import FlopCount, StepCost
from flexfed.data.prompts import IGNORE_INDEX
from flexfed.lora import Adapter, Factors
from flexfed.split import wire
from flexfed.split.parts import Cut, block_of, bound, decoder_of, part_architecture, run_blocks
from flexfed.split.prompt import prepend


class SplitModel:
    """The trainer's model as both sides use it: the cut, the active LoRA slot, autocast."""

    def __init__(self, trainer, cut: Cut, ranks: Mapping[str, int], wire_dtype: str):
        self.trainer, self.cut, self.wire_dtype = trainer, cut, wire_dtype
        self.device = trainer.device
        self.ranks = dict(ranks)  # every adapted module's rank: the slot's layout, so PEFT's scales are right
        self.dtype = trainer.base_model.dtype
        config = trainer.base_model.config
        self.hidden_size, self.vocab = config.hidden_size, config.vocab_size

    def slot(self) -> str:
        return self.trainer.use_slot(self.ranks)

    def autocast(self):
        t = self.trainer
        return torch.autocast(self.device.type, dtype=t.autocast or torch.float32, enabled=t.autocast is not None)

    def forward(self, factors, blocks: range, mask, **inputs) -> torch.Tensor:
        slot = self.slot()  # first: it wraps the model with PEFT on first use
        model = self.trainer.peft_model
        with bound(model, slot, factors), self.autocast():
            return run_blocks(model, blocks, mask, **inputs)

    def first_inputs(self, batch, prompt: torch.Tensor | None):
        """The first part's inputs for ``batch``: the mask, the decoder's input (token ids, or with
        a soft prompt the embeddings with the prompt's n vectors in front) and the labels.

        With a prompt the sequence is n positions longer from here on, on the wire too: the mask
        has n ones in front (every row attends to the prompt) and the labels n ignored positions,
        so no loss is taken on a virtual token (PEFT's prompt tuning does the same)."""
        mask, ids, labels = batch["attention_mask"], batch["input_ids"], batch["labels"]
        if prompt is None:
            return mask, {"input_ids": ids}, labels
        embeds, mask = prepend(decoder_of(self.trainer.base_model)[1].embed_tokens, prompt, ids, mask)  # frozen: no LoRA on the embeddings
        labels = torch.cat([labels.new_full((ids.shape[0], prompt.shape[0]), IGNORE_INDEX), labels], dim=1)
        return mask, {"hidden": embeds}, labels

    @torch.no_grad()
    def el2n(self, factors, blocks: list[int], batch, prompt: torch.Tensor | None) -> torch.Tensor:
        """Each row's EL2N score (Paul et al. 2021, SFPrompt's pruning criterion) on the client's
        own path: its head blocks straight into its tail blocks, the norm and the LM head, the
        server's blocks skipped (SFPrompt's local-loss path). Per labelled token the L2 norm of
        softmax(logits) - onehot(label), averaged over the row's labelled tokens: near 0 for a
        token the model already predicts with confidence. Nothing is sent."""
        slot = self.slot()
        model = self.trainer.peft_model
        mask, inputs, labels = self.first_inputs(batch, prompt)
        with bound(model, slot, factors), self.autocast():
            out = run_blocks(model, blocks, mask, final_norm=True, **inputs)
            logits, keep = head_logits(decoder_of(model)[0], out, labels)
        error = torch.softmax(logits.float(), dim=-1)
        error[torch.arange(error.shape[0], device=error.device), labels[:, 1:][keep]] -= 1.0
        rows = labels.shape[0]
        return group_means(torch.linalg.vector_norm(error, dim=-1), keep, torch.arange(rows, device=keep.device), rows)

    def head_losses(self, factors, blocks: range, hidden, mask, labels) -> torch.Tensor:
        """Per-token losses from the blocks ``blocks`` (the model's last ones), the norm and the head."""
        slot = self.slot()
        model = self.trainer.peft_model
        with bound(model, slot, factors), self.autocast():
            out = run_blocks(model, blocks, mask, hidden=hidden, final_norm=True)
            return head_token_losses(decoder_of(model)[0], out, labels)[0]


def clip_coefficient(squared_norms: Sequence[float], max_norm: float | None) -> float:
    """What ``torch.nn.utils.clip_grad_norm_`` multiplies the gradients by, from the squared
    norms of every party's gradients."""
    if not max_norm:
        return 1.0
    total = math.sqrt(sum(squared_norms))
    return min(1.0, max_norm / (total + 1e-6))


def squared_norm(grads: Sequence[torch.Tensor]) -> float:
    return float(sum(float(torch.linalg.vector_norm(g.float())) ** 2 for g in grads))


def _gradients(output: torch.Tensor, grad_output: torch.Tensor | None, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """d output / d inputs for a client's own tensors. ``backward(inputs=...)`` rather than
    ``autograd.grad``: the FLOP counter's module hooks refuse the latter (PyTorch 2.x), and
    these tensors are the session's own, so their ``.grad`` fields are free to use."""
    for t in inputs:
        t.grad = None
    torch.autograd.backward(output, grad_output, inputs=list(inputs))
    grads = [t.grad for t in inputs]
    for t in inputs:
        t.grad = None
    return grads


class Trainable:
    """LoRA factors (and a client's soft prompt) as trainable tensors of one party, with their
    optimizer: one optimizer and one clipping norm over all of them, as for LoRA alone."""

    def __init__(self, trainer, adapter: Adapter, prompt: torch.Tensor | None = None):
        device = trainer.device
        self.scales = {n: f.scale for n, f in adapter.items()}
        # Contiguous copies: an aggregate's factors may be strided views (an SVD's), and a matmul
        # on another memory layout rounds differently, which would break bit-exact resume.
        own = lambda t: torch.nn.Parameter(t.detach().to(device, torch.float32).clone(memory_format=torch.contiguous_format))  # noqa: E731
        self.factors = {n: (own(f.a), own(f.b)) for n, f in sorted(adapter.items())}
        self.prompt = None if prompt is None else own(prompt)
        self.optimizer = trainer._optimizer(self.params(), trainer.training)  # the trainer's own optimizer settings
        self.max_grad_norm = trainer.training.max_grad_norm

    def params(self, modules=None) -> list[torch.nn.Parameter]:
        """The LoRA factors of ``modules`` (None: all, and the prompt)."""
        lora = [p for n, pair in self.factors.items() if modules is None or n in modules for p in pair]
        return lora + ([self.prompt] if modules is None and self.prompt is not None else [])

    def subset(self, modules) -> dict:
        return {n: pair for n, pair in self.factors.items() if n in modules}

    def step(self, grads: Mapping[torch.nn.Parameter, torch.Tensor], squared_norms: Sequence[float]) -> None:
        coefficient = clip_coefficient(squared_norms, self.max_grad_norm)
        for p in self.params():
            g = grads[p]
            p.grad = g * coefficient if coefficient < 1.0 else g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def adapter(self) -> Adapter:
        return {n: Factors(b=b.detach().cpu().clone(), a=a.detach().cpu().clone(), scale=self.scales[n]) for n, (a, b) in self.factors.items()}


class ClientSession:
    """One client's round on its side: its batches (pruned, with ``split.prune_fraction``), its
    client part (LoRA, or a soft prompt with ``split.client_adapter=prompt``), its cost."""

    def __init__(self, model: SplitModel, client_id: str, start: Adapter, examples, seed: int, prompt: torch.Tensor | None = None,
                 prune_fraction: float = 0.0):
        if not examples:
            raise ValueError(f"client {client_id}: no training examples")
        trainer = model.trainer
        self.model, self.client_id, self.num_examples = model, client_id, len(examples)
        self.trainable = Trainable(trainer, start, prompt)
        cut = model.cut
        self.head_modules = {n for n in start if block_of(n) in cut.head_blocks}
        self.tail_modules = {n for n in start if block_of(n) in cut.tail_blocks}
        self.examples = self._pruned(examples, prune_fraction) if prune_fraction else list(examples)
        self.pruned = len(examples) - len(self.examples)
        steps = local_steps(trainer.training, len(self.examples))  # the trainer's rule: epochs of the kept examples' batches
        self.schedule = batch_schedule([len(e.input_ids) for e in self.examples], trainer.training.batch_size, steps, seed)
        self.losses: list[float] = []
        self.tokens = 0
        self.began = time.perf_counter()
        self.cost = None
        if trainer.arch is not None:
            arch = part_architecture(trainer.arch, trainer.base_model, cut.client_blocks(), head=cut.u_shape)
            if prompt is not None:  # block 0's input is now trained (the prompt): its q, k, v need input gradients too
                arch = replace(arch, first_qkv=0)
            shapes = {n: (f.b.shape[0], f.a.shape[1]) for n, f in start.items()}
            ranks = {n: f.rank for n, f in start.items()}
            # LoRA parameters cost FLOPs per token; a prompt's cost is its n positions, counted in the
            # sequence's width (``backward``), not per token.
            self.cost = StepCost(arch, model.device, sum(r * sum(shapes[n]) for n, r in ranks.items()), shapes, ranks)
            self.cost.reset_peak()
        self.flops_counted = 0  # FLOPs counted so far on the first step (it spans several messages)
        self.batch = self.hidden = None
        self.grads: dict = {}
        self.step_loss: float | None = None

    def _pruned(self, examples, fraction: float) -> list:
        """SFPrompt's local pruning: the examples left after dropping the ``fraction`` (rounded
        down) with the lowest EL2N scores (``SplitModel.el2n``), scored with the round's start
        client part. Ties go by index, so the kept set is a function of the data and the start."""
        m, trainer = self.model, self.model.trainer
        factors = self.trainable.subset(self.head_modules | self.tail_modules)
        blocks = self.model.cut.client_blocks()
        size = trainer.training.batch_size
        scores = []
        for start in range(0, len(examples), size):
            batch = {k: v.to(m.device) for k, v in collate(examples[start:start + size], trainer.pad_id).items()}
            scores += m.el2n(factors, blocks, batch, self.trainable.prompt).tolist()
        count = int(fraction * len(examples) + 1e-9)  # ⌊f·n⌋, not one less when f·n rounds to just below an integer
        drop = set(sorted(range(len(examples)), key=lambda i: (scores[i], i))[:count])
        return [e for i, e in enumerate(examples) if i not in drop]

    def _counter(self):
        counting = self.cost is not None and self.cost.counted is None
        return FlopCount() if counting else None

    def _counted(self, counter) -> None:
        if counter is not None:
            self.flops_counted += counter.get_total_flops()

    # ----------------------------------------------------------------- the messages it sends

    def forward(self) -> dict[str, torch.Tensor] | None:
        """The next batch's activations at the cut (and its mask, and labels unless U-shaped);
        None when the round's steps are done."""
        indices = next(self.schedule, None)
        if indices is None:
            return None
        m = self.model
        batch = {k: v.to(m.device) for k, v in collate([self.examples[i] for i in indices], m.trainer.pad_id).items()}
        self.step_tokens = int(batch["attention_mask"].sum())  # the data's tokens, not the prompt's
        counter = self._counter()
        with counter or nullcontext():
            mask, inputs, labels = m.first_inputs(batch, self.trainable.prompt)
            # From here on the batch is the one the model sees: with a prompt, n positions longer.
            self.batch = {"input_ids": batch["input_ids"], "attention_mask": mask, "labels": labels}
            self.hidden = m.forward(self.trainable.subset(self.head_modules), m.cut.head_blocks, mask, **inputs)
        self._counted(counter)
        arrays = {"hidden": wire.send(self.hidden, m.wire_dtype), "attention_mask": self.batch["attention_mask"].to(torch.uint8).cpu()}
        if not m.cut.u_shape:
            arrays["labels"] = self.batch["labels"].cpu()
        return arrays

    def tail(self, server_out: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        """U-shape: the loss from the server's output through the tail and head; the gradient at
        that output to send back, and the loss."""
        m = self.model
        out = wire.received(server_out, tuple(self.hidden.shape), f"client {self.client_id}: the server's output", m.dtype, m.device).requires_grad_(True)
        counter = self._counter()
        with counter or nullcontext():
            losses = m.head_losses(self.trainable.subset(self.tail_modules), m.cut.tail_blocks, out, self.batch["attention_mask"], self.batch["labels"])
            loss = losses.mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"client {self.client_id}: non-finite training loss at step {len(self.losses)}")
            tail_params = self.trainable.params(self.tail_modules)
            grads = _gradients(loss, None, [out, *tail_params])
        self._counted(counter)
        self.grads = dict(zip(tail_params, grads[1:]))
        self.step_loss = float(loss.detach())
        return {"grad": wire.send(grads[0], m.wire_dtype)}, self.step_loss

    def backward(self, grad: torch.Tensor, server_squared_norm: float, loss: float | None) -> float:
        """Finish the step from the gradient at the cut: the client part's gradients, clipped with
        the server's norm, one optimizer step. Its own squared gradient norm, for the server."""
        m = self.model
        g = wire.received(grad, tuple(self.hidden.shape), f"client {self.client_id}: the gradient at the cut", self.hidden.dtype, m.device)
        head_params = self.trainable.params(self.head_modules) + ([self.trainable.prompt] if self.trainable.prompt is not None else [])
        counter = self._counter()
        with counter or nullcontext():
            grads = _gradients(self.hidden, g, head_params)
        self._counted(counter)
        self.grads.update(zip(head_params, grads))
        mine = squared_norm(list(self.grads.values()))
        self.trainable.step(self.grads, [mine, server_squared_norm])
        if self.cost is not None:
            # The formula reads the sequence's shape as the model sees it (with a prompt, n positions
            # wider than the token ids: the mask's) and the labels.
            shape = {"input_ids": self.batch["attention_mask"], "labels": self.batch["labels"]}
            self.cost.add(shape, self.flops_counted if self.cost.counted is None else None)
        self.losses.append(self.step_loss if loss is None else loss)
        self.tokens += self.step_tokens
        self.grads, self.hidden, self.step_loss = {}, None, None
        return mine

    def finish(self) -> tuple[Adapter, dict]:
        """The trained client part and the round's statistics."""
        cost = {}
        if self.cost is not None:
            self.cost.record_peak()
            cost = self.cost.result()
        stats = {
            "client": self.client_id, "num_examples": self.num_examples, "loss": sum(self.losses) / len(self.losses), "losses": list(self.losses),
            "tokens": self.tokens, "seconds": time.perf_counter() - self.began, "steps": len(self.losses), "pruned": self.pruned, **cost,
        }
        return self.trainable.adapter(), stats

    def prompt(self) -> torch.Tensor:
        """The trained soft prompt (n x h, fp32), as it goes on the wire."""
        return self.trainable.prompt.detach().cpu().clone()


class ServerPart:
    """The server's blocks with their LoRA: a forward and backward per client step."""

    def __init__(self, model: SplitModel, adapter: Adapter):
        self.model = model
        self.trainable = Trainable(model.trainer, adapter)

    def _input(self, arrays, who: str):
        m = self.model
        batch = wire.batch_received(arrays, m.vocab, m.device, with_labels=not m.cut.u_shape)
        rows, tokens = batch["attention_mask"].shape
        hidden = wire.received(arrays.get("hidden"), (rows, tokens, m.hidden_size), f"{who}: activations", m.dtype, m.device).requires_grad_(True)
        return hidden, batch

    def loss_step(self, arrays, who: str):
        """The loss from the client's activations; the gradient at the cut, the server part's
        gradients (kept until the client's norm arrives), the loss."""
        m = self.model
        hidden, batch = self._input(arrays, who)
        losses = m.head_losses(self.trainable.factors, m.cut.server_blocks, hidden, batch["attention_mask"], batch["labels"])
        loss = losses.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{who}: non-finite training loss")
        params = self.trainable.params()
        grads = torch.autograd.grad(loss, [hidden, *params])
        return grads[0], dict(zip(params, grads[1:])), float(loss.detach())

    def forward(self, arrays, who: str):
        """U-shape: the server blocks' output (with the graph, for ``backward``)."""
        m = self.model
        hidden, batch = self._input(arrays, who)
        out = m.forward(self.trainable.factors, m.cut.server_blocks, batch["attention_mask"], hidden=hidden)
        return hidden, out

    def backward(self, hidden, out, grad, who: str):
        """U-shape: from the gradient at the server's output, the one at the cut and the part's own."""
        m = self.model
        g = wire.received(grad, tuple(out.shape), f"{who}: the gradient at the server's output", out.dtype, m.device)
        params = self.trainable.params()
        grads = torch.autograd.grad(out, [hidden, *params], grad_outputs=g)
        return grads[0], dict(zip(params, grads[1:]))

    def step(self, grads, server_squared: float, client_squared: float) -> None:
        self.trainable.step(grads, [server_squared, client_squared])

    def adapter(self) -> Adapter:
        return self.trainable.adapter()
