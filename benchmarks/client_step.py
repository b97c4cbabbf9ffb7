"""Client training speed: a plain PEFT + PyTorch loop against flexfed's ``LocalTrainer``.

Both train LoRA (rank 8 on q,k,v,o, AdamW, lr 1e-3) on SmolLM2-135M-Instruct for the same
number of optimizer steps over the same real examples (P3 tasks from ``../shared/data/p3-tasks``,
or the built-in suite when that is absent), in one process:

  plain    ``get_peft_model`` once, then the loop written the usual way: shuffled batches padded to
           their longest example, ``model(**batch, labels=labels).loss`` (logits over the whole
           vocabulary at every position), fp32.
  flexfed  ``LocalTrainer.train``: logits only where there is a label, length-bucketed batches,
           one PEFT wrap, and ``--precision`` (default ``auto``: where bf16 GEMMs are measured
           native, the frozen base in bf16 with LoRA, optimizer and loss in fp32, fp32 attention
           and batch widths padded to 16; see ``flexfed.precision``). Only real tokens count.

The timed runs alternate (plain, flexfed, plain, flexfed, ...) after an untimed warm-up, so both
see the same machine state; the median over repetitions is reported. Tokens are real
(non-padding) tokens, the same for both sides since both see every example once per epoch.

Achieved FLOP/s counts the *necessary* work only (what the flexfed side does): per real token
2 P (forward) + 2 P (input gradients) through the frozen decoder weights P, attention scores, and
per labelled token 4 d V for the output projection; both sides are divided by the same count, so
work the plain loop wastes on padding and prompt logits does not count as useful. The GEMM peak
is measured here, on matrices of a training step's shape.

Agreement: (1) on one identical batch, the two losses agree to float32 round-off (to bf16 rounding on the
bf16 path); (2) after
training, both adapters' losses on the same held-out batches agree within ``--tolerance``
(relative); the batch order differs between the two, so the trajectories differ by SGD noise
only. The last line is ``client_step ratio X`` (flexfed tokens/s over plain tokens/s).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from flexfed.client import LocalTrainer, collate, response_loss
from flexfed.config import LoraConfig, TrainingConfig
from flexfed.data import encode_for_training, load_tasks
from flexfed.lora import get_adapter, init_adapter, peft_config, set_adapter, target_shapes
from flexfed.models import load_model, load_tokenizer
from flexfed.precision import bf16_gemm_speedup

P3 = Path(os.environ.get("FLEXFED_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "p3-tasks"


def real_examples(tokenizer, count: int, max_prompt: int, max_response: int, seed: int):
    """``count`` encoded examples spread over tasks (P3 if present, else the built-in suite)."""
    if P3.is_dir():
        tasks, source = load_tasks("prompt-completion", P3, seed=seed), f"P3 ({P3})"
    else:
        tasks, source = load_tasks("builtin", seed=seed), "built-in suite (P3 data not found)"
    rng = random.Random(seed)
    pairs = [(t, ex) for t in tasks for ex in t.examples]
    rng.shuffle(pairs)
    encoded = [
        encode_for_training(tokenizer, t.definition, ex.input, ex.target, max_prompt + max_response, max_response)
        for t, ex in pairs[:count]
    ]
    return encoded, source


def prompts_of(examples) -> list[list[int]]:
    """Each encoded example's prompt: its tokens before the first labelled one."""
    return [e.input_ids[: next(i for i, x in enumerate(e.labels) if x != -100)] for e in examples]


def alternate(sides: dict, repeats: int) -> tuple[dict[str, list[float]], dict]:
    """Run each side once untimed, then ``repeats`` timed rounds of all sides in turn (so every
    side sees the same machine state): seconds per side, and each side's last output."""
    for fn in sides.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    outputs = {}
    for _ in range(repeats):
        for name, fn in sides.items():
            began = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - began)
    return times, outputs


def gemm_peak(dtype: torch.dtype, m: int = 1024, k: int = 576, n: int = 1536, seconds: float = 2.0) -> float:
    """Best FLOP/s of ``m x k @ k x n`` (a training step's shape: tokens x hidden x MLP width)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best


def useful_flops(model, examples) -> float:
    """Necessary FLOPs for one pass over ``examples`` (see the module docstring)."""
    cfg = model.config
    body = sum(m.weight.numel() for m in model.get_decoder().layers.modules() if isinstance(m, torch.nn.Linear))
    flops = 0.0
    for e in examples:
        n = len(e.input_ids)
        labelled = sum(1 for x in e.labels[1:] if x != -100)
        attention = 2 * 2 * n * n * cfg.hidden_size * cfg.num_hidden_layers  # QKᵀ and PV, forward
        flops += 4 * body * n + 2 * attention + 4 * cfg.hidden_size * cfg.vocab_size * labelled  # forward + input gradients
    return flops


class PlainLoop:
    """The loop most LoRA tutorials write: full logits, padded shuffled batches, fp32."""

    def __init__(self, model, lora: LoraConfig, ranks, lr: float, pad_id: int):
        from peft import get_peft_model

        config = peft_config(model.config.name_or_path, ranks, lora.alpha, lora.rslora)
        config.target_modules = sorted(ranks)
        self.model = get_peft_model(model, config, adapter_name="plain")
        self.lr, self.pad_id = lr, pad_id

    def train(self, examples, batch_size: int, steps: int, seed: int, start) -> tuple[list[float], int, float]:
        set_adapter(self.model, start, adapter_name="plain")
        params = [p for n, p in self.model.named_parameters() if "lora_" in n and ".plain." in n]
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        rng, order = random.Random(seed), []
        losses, tokens = [], 0
        self.model.train()
        began = time.perf_counter()
        for _ in range(steps):
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch = collate([examples[order.pop()] for _ in range(min(batch_size, len(order)))], self.pad_id)
            loss = self.model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.item())
            tokens += int(batch["attention_mask"].sum())
        self.model.eval()
        return losses, tokens, time.perf_counter() - began


def held_out_loss(adapter, trainer: LocalTrainer, batches) -> float:
    trainer.activate(adapter)
    with torch.no_grad():
        total = sum(response_loss(trainer.peft_model, b).item() * int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    return total / sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-prompt", type=int, default=160)
    ap.add_argument("--max-response", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--tolerance", type=float, default=0.03, help="relative held-out loss agreement")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "autocast"], help="flexfed's training.precision")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(args.model)
    n_train = args.steps * args.batch_size
    examples, source = real_examples(tokenizer, n_train + 32, args.max_prompt, args.max_response, args.seed)
    train, held = examples[:n_train], examples[n_train:]
    lora = LoraConfig(rank=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    training = TrainingConfig(lr=1e-3, batch_size=args.batch_size, local_steps=args.steps, precision=args.precision)

    flex_model = load_model(args.model, seed=args.seed)
    plain_model = load_model(args.model, seed=args.seed)
    shapes = target_shapes(flex_model, lora.target_modules)
    ranks = {n: lora.rank for n in shapes}
    start = init_adapter(shapes, ranks, lora.alpha, lora.rslora, seed=args.seed)
    trainer = LocalTrainer(flex_model, lora, training, tokenizer.pad_token_id)
    plain = PlainLoop(plain_model, lora, ranks, training.lr, tokenizer.pad_token_id)
    precision = trainer.precision != "fp32"

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"data: {source}; {n_train} training examples, batch {args.batch_size}, {args.steps} steps, "
          f"prompt <= {args.max_prompt}, response <= {args.max_response} tokens")
    print(f"flexfed precision: {args.precision} -> {trainer.precision}; bf16 GEMMs {bf16_gemm_speedup(torch.get_num_threads()):.2g}x fp32 here"
          + ("" if precision else " (bf16 not native on this CPU)"))

    # (1) one identical batch through both loss functions
    batch = collate(train[: args.batch_size], tokenizer.pad_token_id)
    trainer.activate(start)
    plain.train(train, args.batch_size, 0, 0, start)  # loads ``start`` into the plain wrapper
    with torch.no_grad():
        same = (plain.model(**batch).loss.item(), response_loss(trainer.peft_model, batch).item())
    print(f"same batch: plain loss {same[0]:.6f}, flexfed loss {same[1]:.6f}, |diff| {abs(same[0] - same[1]):.1e}")

    # warm-up: a few untimed steps on each side (one-off allocator and kernel set-up)
    t = time.perf_counter()
    plain.train(train, args.batch_size, 2, args.seed, start)
    trainer.train("warm-up", start, train[: 2 * args.batch_size], args.seed)
    print(f"warm-up (2 steps each): {time.perf_counter() - t:.1f} s")

    flops = useful_flops(flex_model, train)
    runs = {"plain": [], "flexfed": []}
    for rep in range(args.repeats):
        losses_p, tok_p, sec_p = plain.train(train, args.batch_size, args.steps, args.seed + rep, start)
        runs["plain"].append((tok_p / sec_p, sec_p, losses_p))
        result = trainer.train("bench", start, train, args.seed + rep)
        runs["flexfed"].append((result.tokens / result.seconds, result.seconds, result.losses))
        print(f"repeat {rep + 1}: plain {tok_p / sec_p:.1f} tok/s ({sec_p:.1f} s), flexfed {result.tokens / result.seconds:.1f} tok/s ({result.seconds:.1f} s)")
    flex_adapter = result.adapter
    plain_adapter = get_adapter(plain.model, adapter_name="plain")

    peak32 = gemm_peak(torch.float32)
    peak16 = gemm_peak(torch.bfloat16) if precision else None
    peak = peak16 if precision else peak32
    print()
    print(f"GEMM peak here: fp32 {peak32 / 1e9:.0f} GFLOP/s" + (f", bf16 {peak16 / 1e9:.0f} GFLOP/s" if peak16 else " (bf16 not native: not the target)"))
    print(f"useful work: {flops / 1e9:.0f} GFLOP per pass ({flops / sum(len(e.input_ids) for e in train) / 1e9:.2f} GFLOP per token)")
    print(f"{'':10}{'tokens/s':>10}{'seconds':>10}{'GFLOP/s':>10}{'of peak':>10}{'first loss':>12}{'last-4 loss':>12}")
    medians = {}
    for side, rs in runs.items():
        tps = statistics.median(r[0] for r in rs)
        sec = statistics.median(r[1] for r in rs)
        medians[side] = tps
        last = rs[-1][2]
        print(f"{side:10}{tps:10.1f}{sec:10.1f}{flops / sec / 1e9:10.1f}{flops / sec / peak:10.0%}{last[0]:12.3f}{statistics.mean(last[-4:]):12.3f}")

    held_batches = [collate(held[i : i + 8], tokenizer.pad_token_id) for i in range(0, len(held), 8)]
    loss_p = held_out_loss(plain_adapter, trainer, held_batches)
    loss_f = held_out_loss(flex_adapter, trainer, held_batches)
    loss_0 = held_out_loss(start, trainer, held_batches)
    rel = abs(loss_p - loss_f) / loss_p
    print(f"held-out loss ({len(held)} examples): untrained {loss_0:.3f}, plain {loss_p:.3f}, flexfed {loss_f:.3f}; "
          f"relative difference {rel:.1%} ({'within' if rel <= args.tolerance else 'OUTSIDE'} {args.tolerance:.0%})")
    print(f"client_step ratio {medians['flexfed'] / medians['plain']:.2f}")


if __name__ == "__main__":
    main()
