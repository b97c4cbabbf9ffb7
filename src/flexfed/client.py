"""Local training of one client: start from the adapter the server sent, train, return the factors.

One ``LocalTrainer`` wraps the base model with PEFT once and keeps one adapter slot per rank
layout, so a new client costs a copy of its starting factors, not a new model.

A method may add a ``LocalRule`` (``Aggregator.local_rule``, e.g. HetLoRA's rank self-pruning):
its penalty joins the loss at every step of ``fit`` and its ``finish`` decides what is sent.

Beyond plain LoRA, the trainer serves two methods: Fed-SB trains only an r x r core R (the
slot's ``lora_A`` weight is parametrized as R @ A with the frame A a buffer, so reading the
adapter still gives ``Factors(b=B, a=R @ A)``), and FLoRA trains on base weights with the
global update merged in (``set_base_update``).
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from flexfed.aggregation.base import LocalRule
from flexfed.config import LocalDPConfig, LoraConfig, TrainingConfig
from flexfed.cost import Architecture, StepCost
from flexfed.data.prompts import IGNORE_INDEX as IGNORE
from flexfed.data.prompts import EncodedExample
from flexfed.lora import Adapter, Factors, get_adapter, lora_modules, lora_scale, peft_config, set_adapter
from flexfed.fused import use_low_precision_branch
from flexfed.precision import PAD_MULTIPLE, padded_width, resolve, use_bf16_weights

log = logging.getLogger(__name__)

Loss = Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]  # (model, batch) -> the loss to minimise


class ClientFailure(RuntimeError):
    """A client could not produce an update (e.g. its examples failed to load); the message names it."""


# What one client fails with without stopping the round: the server leaves that client out, logs
# the reason and aggregates the others. Every engine and trainer catches exactly these.
CLIENT_ERRORS = (FloatingPointError, ValueError, RuntimeError)


@dataclass
class ClientResult:
    client_id: str
    adapter: Adapter
    num_examples: int
    loss: float  # mean training loss over the local steps
    tokens: int  # real (non-padding) tokens processed
    seconds: float
    losses: list[float] = field(default_factory=list)
    sparse: dict[str, torch.Tensor] = field(default_factory=dict)  # SLoRA's sparse stage: values trained
    cost: dict = field(default_factory=dict)  # flops, flops_analytic, peak_memory_bytes, peak_memory_source (``cost``)


def pick_device(name: str) -> torch.device:
    """A device setting (``auto``: CUDA when available, else the CPU) as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def collate(examples: Sequence[EncodedExample], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded batch, its width rounded up to a ``multiple``; padding carries no loss and no attention."""
    width = padded_width(max(len(e.input_ids) for e in examples), multiple)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, sort by length inside windows of 8 batches, then shuffle the batches.

    Batches of similar lengths waste little compute on padding; the windows and the final
    shuffle keep the order random from epoch to epoch.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 8
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_schedule(lengths: Sequence[int], batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """Example indices of each local step: length-bucketed epochs, a fresh one when one runs out."""
    rng = random.Random(seed)
    batches: list[list[int]] = []
    for _ in range(steps):
        if not batches:
            batches = length_bucketed_batches(lengths, batch_size, rng)
        yield batches.pop()


def response_logits(model, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict each labelled token (one row per labelled position, rows in
    order, positions in order within a row), and where those are (rows x positions, shifted).

    Computes the output projection only where there is a label: prompt and padding positions
    dominate the sequence, and the vocabulary-sized projection is the costliest layer there.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return head_logits(base, hidden, batch["labels"])


def head_logits(base, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``response_logits`` from the decoder's last hidden states on (a split model runs its head apart).

    Without gradients (evaluation, teachers, zeroth-order losses) a bfloat16 head computes in
    float32: bf16 logits carry 3 significant digits (steps of 0.125 at 16-32), which put the
    evaluation loss of a trained SmolLM2 adapter 7% high (1.221 against 1.133). Training keeps
    the head in the weights' dtype: adapters trained so evaluated alike (1.133 against 1.140)."""
    keep = labels[:, 1:] != IGNORE
    head, x = base.get_output_embeddings(), hidden[:, :-1][keep]
    if torch.is_grad_enabled() or head.weight.dtype in (torch.float32, torch.float64):
        return head(x), keep
    return F.linear(x.float(), head.weight.float(), None if head.bias is None else head.bias.float()), keep


def head_token_losses(base, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``response_token_losses`` from the decoder's last hidden states on."""
    logits, keep = head_logits(base, hidden, labels)
    return F.cross_entropy(logits.float(), labels[:, 1:][keep], reduction="none"), keep


def response_token_losses(model, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy at every labelled position, and where those are (rows x positions, shifted)."""
    logits, keep = response_logits(model, batch)
    return F.cross_entropy(logits.float(), batch["labels"][:, 1:][keep], reduction="none"), keep


def local_steps(training: TrainingConfig, num_examples: int) -> int:
    """A client's optimisation steps in a round: ``training.local_steps``, or its epochs' batches."""
    if training.local_steps is not None:
        return training.local_steps
    return max(1, math.ceil(training.local_epochs * math.ceil(num_examples / training.batch_size)))


def group_means(token_losses: torch.Tensor, keep: torch.Tensor, group_of_row: torch.Tensor, groups: int) -> torch.Tensor:
    """Each group's mean token loss, (groups,), from ``response_token_losses``' per-token losses
    and where they are; ``group_of_row``: the group of each batch row (an example, a client)."""
    owner = group_of_row[:, None].expand_as(keep)[keep]
    sums = torch.zeros(groups, device=keep.device, dtype=token_losses.dtype).index_add(0, owner, token_losses)
    return sums / torch.bincount(owner, minlength=groups).clamp(min=1)


def example_mean(token_losses: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The mean over examples of each example's mean token loss: each example's share of the
    gradient depends on that example alone, as DP-SGD's per-example clipping needs (the token
    mean's denominator mixes every example's length)."""
    rows = keep.shape[0]
    return group_means(token_losses, keep, torch.arange(rows, device=keep.device), rows).mean()


def response_loss(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Causal-LM loss on the response: equal to ``model(**batch).loss``, only cheaper."""
    return response_token_losses(model, batch)[0].mean()


class LocalTrainer:
    """Trains client adapters on one shared PEFT-wrapped base model."""

    def __init__(self, base_model, lora: LoraConfig, training: TrainingConfig, pad_id: int, device: str | torch.device = "cpu",
                 local_dp: LocalDPConfig | None = None, writes_base: bool = False):
        """``writes_base``: the method writes into the base weights, which keeps them float32
        (``flexfed.precision``)."""
        self.device = torch.device(device)
        self.local_dp = local_dp if local_dp is not None and local_dp.enabled else None
        self.base_model = base_model.to(self.device)
        self.lora = lora
        self.training = training
        self.pad_id = pad_id
        self.precision = resolve(training.precision, self.device, writes_base)  # fp32, bf16 or autocast
        self.autocast = torch.bfloat16 if self.precision == "autocast" else None
        self.pad_multiple = PAD_MULTIPLE if self.precision == "bf16" else 1
        self.peft_model = None
        self._slots: dict[tuple, str] = {}
        self._base_weights: dict[str, torch.Tensor] | None = None  # W0 of merged modules (FLoRA)
        try:  # read before PEFT wraps the model
            self.arch = Architecture.of(self.base_model, training, self.autocast is not None)
        except (AttributeError, ValueError):  # not a decoder-only LM the formulas know: no cost figures
            self.arch = None
        if self.precision == "bf16":
            use_bf16_weights(self.base_model)
        log.info("training precision %s: %s on %s", training.precision, self.precision, self.device)

    def _slot(self, ranks: Mapping[str, int]) -> str:
        """The adapter slot for this rank layout, created on first use."""
        key = tuple(sorted(ranks.items()))
        if key not in self._slots:
            from peft import get_peft_model

            name = f"ranks{len(self._slots)}"
            config = peft_config(self.base_model.config.name_or_path, ranks, self.lora.alpha, self.lora.rslora)
            config.target_modules = sorted({n for n in ranks})  # exactly these modules, by full name
            if self.peft_model is None:
                self.peft_model = get_peft_model(self.base_model, config, adapter_name=name)
            else:
                self.peft_model.add_adapter(name, config)
            if self.precision == "bf16" and self.local_dp is None:  # Opacus's per-example hooks need PEFT's lora_A/lora_B modules called
                use_low_precision_branch(self.peft_model, name)
            self._slots[key] = name
        return self._slots[key]

    def use_slot(self, ranks: Mapping[str, int]) -> str:
        """Make the adapter slot of this rank layout the active one (created on first use); its
        name. A split client binds its own factor tensors into the slot's layers (``split.parts``)."""
        name = self._slot(ranks)
        self.peft_model.set_adapter(name)
        return name

    def activate(self, start: Adapter, trainable: Sequence[str] = ("a", "b"), frames: Mapping[str, Factors] | None = None) -> str:
        """Load ``start`` into its slot; only the ``trainable`` factors get gradients.

        ``("a",)``/``("b",)``/both: plain LoRA factors. ``("r",)``: Fed-SB's core between the fixed
        ``frames`` (``Factors(b=B, a=A)`` per module), with ``start`` = ``Factors(b=B, a=R @ A)``.
        """
        name = self._slot({n: f.rank for n, f in start.items()})
        self.peft_model.set_adapter(name)
        layers = lora_modules(self.peft_model)
        for layer in layers.values():  # a slot keeps no core from an earlier Fed-SB client
            _unfreeze_frame(layer.lora_A[name])
        set_adapter(self.peft_model, start, adapter_name=name)
        if set(trainable) - {"a", "b"} and tuple(trainable) != ("r",):
            raise ValueError(f"the trainer trains LoRA factors 'a' and/or 'b', or Fed-SB's core 'r' alone, not {sorted(trainable)}")
        if tuple(trainable) == ("r",):
            if frames is None or set(frames) != set(start):
                raise ValueError("training the core 'r' needs the fixed frames of every module")
            for n, layer in layers.items():
                if not torch.equal(start[n].b, frames[n].b):
                    raise ValueError(f"{n}: the start's B is not the module's fixed frame")
                _freeze_frame(layer.lora_A[name], frames[n].a)
            wanted = (f"lora_A.{name}.parametrizations.weight.original",)
        else:
            wanted = tuple(f"lora_{x.upper()}.{name}." for x in trainable)
        for pname, p in self.peft_model.named_parameters():
            p.requires_grad_(any(w in pname for w in wanted))
        return name

    @contextmanager
    def merged(self, adapter: Adapter) -> Iterator[torch.nn.Module]:
        """The model with ``adapter`` folded into its base weights, for inference.

        Decoding through PEFT's LoRA layers adds a pair of small GEMMs per adapted module and
        generated token (210 with SmolLM2 and 7 target projections): 9% of the decoding time on
        an idle CPU, 3x on one shared with other jobs (``benchmarks/evaluation.py``). The base
        weight tensors are swapped, not updated in place, and put back untouched, so training
        afterwards sees bit-identical weights. A bfloat16 base is not merged into: rounding
        W + s B A to bfloat16 would erase most of a small update, so the adapter stays a branch.
        """
        self.activate(adapter)
        if self.base_model.dtype not in (torch.float32, torch.float64):
            yield self.peft_model
            return
        layers = lora_modules(self.peft_model)
        originals: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name, layer in layers.items():
                    weight = layer.get_base_layer().weight
                    originals[name] = weight.data
                    weight.data = weight.data + adapter[name].delta(weight.dtype).to(weight.device)
            with self.peft_model.disable_adapter():
                yield self.peft_model
        finally:
            for name, original in originals.items():
                layers[name].get_base_layer().weight.data = original

    def _optimizer(self, params, t: TrainingConfig):
        if t.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)

    def train(
        self,
        client_id: str,
        start: Adapter,
        examples: Sequence[EncodedExample],
        seed: int,
        trainable: Sequence[str] = ("a", "b"),
        frames: Mapping[str, Factors] | None = None,
        rule: LocalRule | None = None,
        loss: Loss | None = None,
        training: TrainingConfig | None = None,
    ) -> ClientResult:
        """Train from ``start`` on ``examples``; deterministic for a given ``seed`` (``frames``: see
        ``activate``; ``rule``: the method's penalty and pruning, see the module docstring;
        ``loss`` and ``training``: see ``fit``)."""
        began = time.perf_counter()
        name = self.activate(start, trainable, frames)
        params = [p for p in self.peft_model.parameters() if p.requires_grad]
        penalty = None
        if rule is not None:
            live = {n: (layer.lora_B[name].weight, layer.lora_A[name].weight) for n, layer in lora_modules(self.peft_model).items()}
            penalty = lambda: rule.penalty(live)  # noqa: E731
        losses, tokens, cost = self.fit(client_id, self.peft_model, params, examples, seed, penalty, {n: f.rank for n, f in start.items()}, loss, training)
        return ClientResult(
            client_id=client_id,
            adapter=self.finish(start, get_adapter(self.peft_model, adapter_name=name), rule),
            num_examples=len(examples),
            loss=sum(losses) / len(losses),
            tokens=tokens,
            seconds=time.perf_counter() - began,
            losses=losses,
            cost=cost,
        )

    def scale(self, rank: int) -> float:
        return lora_scale(rank, self.lora.alpha, self.lora.rslora)

    def finish(self, start: Adapter, trained: Adapter, rule: LocalRule | None) -> Adapter:
        """What the client sends: the trained adapter, or what the method's rule makes of it."""
        return trained if rule is None else rule.finish(start, trained, self.scale)

    def cost(self, ranks: Mapping[str, int]) -> StepCost | None:
        """A new client's cost counter for LoRA ``ranks`` (None when the model's shape is unknown)."""
        if self.arch is None:
            return None
        shapes = {n: tuple(self.base_linear(n).weight.shape) for n in ranks}
        return StepCost(self.arch, self.device, sum(r * sum(shapes[n]) for n, r in ranks.items()), shapes, ranks)

    def fit(
        self,
        client_id: str,
        model,
        params: list[torch.Tensor],
        examples: Sequence[EncodedExample],
        seed: int,
        penalty: Callable[[], torch.Tensor] | None = None,
        ranks: Mapping[str, int] | None = None,
        loss: Loss | None = None,
        training: TrainingConfig | None = None,
    ) -> tuple[list[float], int, dict]:
        """The local optimisation loop: per-step data losses, real tokens processed, and the
        client's cost (``flexfed.cost``; ``ranks``: the LoRA ranks trained, none for SLoRA's stage).

        ``penalty`` (the method's regulariser over the live factors) is added to what is minimised;
        the recorded losses stay the data loss, comparable across methods. ``loss`` replaces the
        response cross-entropy (KD's distillation; its batch also holds ``rows``, the indices of
        its examples in ``examples``), and ``training`` the trainer's optimiser and step budget."""
        if not examples:
            raise ValueError(f"client {client_id}: no training examples")
        t = training or self.training
        optimizer = self._optimizer(params, t)
        with self._example_dp(model, optimizer, penalty, t) as optimizer:
            return self._fit(client_id, model, params, optimizer, examples, seed, penalty, ranks, loss or response_loss, t)

    @contextmanager
    def _example_dp(self, model, optimizer, penalty, t: TrainingConfig) -> Iterator[torch.optim.Optimizer]:
        """The optimizer, made DP-SGD's by Opacus when ``privacy.local`` is on: per-example
        gradients (``GradSampleModule``'s hooks, removed afterwards: the model is shared by every
        client), each clipped to C, summed, noised with N(0, (σC)²) and divided by the batch size."""
        if self.local_dp is None:
            yield optimizer
            return
        if penalty is not None:
            raise ValueError("privacy.local: a method's local penalty has no per-example gradient to clip")
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        hooked = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        try:
            with warnings.catch_warnings():
                # Opacus's backward hooks fire on module outputs only, as the frozen base needs no input gradients
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                yield DPOptimizer(optimizer, noise_multiplier=self.local_dp.noise_multiplier, max_grad_norm=self.local_dp.clip_norm,
                                  expected_batch_size=t.batch_size, loss_reduction="mean")
        finally:
            hooked._close()

    def _fit(self, client_id, model, params, optimizer, examples, seed, penalty, ranks, loss_of: Loss, t: TrainingConfig) -> tuple[list[float], int, dict]:
        torch.manual_seed(seed)
        lengths = [len(e.input_ids) for e in examples]
        losses, tokens = [], 0
        cost = self.cost(ranks or {})
        if cost:
            cost.reset_peak()
        model.train()
        for indices in batch_schedule(lengths, t.batch_size, local_steps(t, len(examples)), seed):
            batch = collate([examples[i] for i in indices], self.pad_id, self.pad_multiple)
            batch = {k: v.to(self.device) for k, v in {**batch, "rows": torch.tensor(indices)}.items()}
            counter = cost.flop_counter() if cost else None
            with counter or nullcontext():
                with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
                    if self.local_dp is None:
                        loss = loss_of(model, batch)
                    else:
                        token_losses, keep = response_token_losses(model, batch)
                        loss = token_losses.mean()
                if self.local_dp is not None:  # DP-SGD clips each example's gradient: the loss must separate by example
                    objective = example_mean(token_losses, keep)
                else:
                    objective = loss if penalty is None else loss + penalty()
                if not torch.isfinite(objective):
                    raise FloatingPointError(f"client {client_id}: non-finite training loss at step {len(losses)}")
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
            if cost:
                cost.add(batch, counter.get_total_flops() if counter else None)
            if t.max_grad_norm and self.local_dp is None:  # DP-SGD clips per example instead
                torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            tokens += int(batch["attention_mask"].sum())
        model.eval()
        if cost:
            cost.record_peak()
        return losses, tokens, cost.result() if cost else {}

    def set_base_update(self, update: Mapping[str, Factors] | None) -> None:
        """Base weights W0 + s B A for the modules in ``update`` (FLoRA merges the global update
        into the base); None or empty restores W0."""
        work = torch.promote_types(self.base_model.dtype, torch.float32)
        self.set_base_delta({n: f.delta(work) for n, f in (update or {}).items()})

    def set_base_delta(self, deltas: Mapping[str, torch.Tensor] | None) -> None:
        """Base weights W0 + delta for the modules in ``deltas``, the others W0 (None: all W0).

        W0 is kept aside on first use, so updates are never compounded and the same delta always
        gives the same weights, bit for bit."""
        if self._base_weights is None:
            if not deltas:
                return
            self._base_weights = {n: self.base_linear(n).weight.detach().clone() for n in deltas}
        deltas = deltas or {}
        unknown = sorted(set(deltas) - set(self._base_weights))
        if unknown:
            raise KeyError(f"no base weight kept for {unknown[:3]}")
        with torch.no_grad():
            for n, w0 in self._base_weights.items():
                weight = self.base_linear(n).weight
                if n in deltas:
                    work = torch.promote_types(w0.dtype, torch.float32)
                    weight.copy_((w0.to(work) + deltas[n].to(device=w0.device, dtype=work)).to(w0.dtype))
                else:
                    weight.copy_(w0)

    def base_linear(self, name: str) -> torch.nn.Linear:
        module = self.base_model.get_submodule(name)
        return getattr(module, "base_layer", module)  # inside a PEFT LoRA layer once wrapped


class _CoreTimesFrame(torch.nn.Module):
    """Fed-SB parametrization of ``lora_A``: weight = R @ A, with R (r x r) the trained tensor and
    the frame A a buffer. ``right_inverse`` recovers R from a weight, which sets R's start."""

    def __init__(self, frame: torch.Tensor):
        super().__init__()
        self.register_buffer("frame", frame)

    def forward(self, core: torch.Tensor) -> torch.Tensor:
        return core @ self.frame

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        from flexfed.aggregation.fed_sb import core_of

        return core_of(weight, self.frame)


def _freeze_frame(linear: torch.nn.Linear, frame: torch.Tensor) -> None:
    from torch.nn.utils import parametrize

    frame = frame.to(device=linear.weight.device, dtype=linear.weight.dtype)
    parametrize.register_parametrization(linear, "weight", _CoreTimesFrame(frame), unsafe=True)


def _unfreeze_frame(linear: torch.nn.Linear) -> None:
    """Back to a plain weight holding R @ A (a no-op on a layer that is not parametrized)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(linear, "weight"):
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
