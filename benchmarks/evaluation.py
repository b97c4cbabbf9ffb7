"""Evaluation speed: greedy generation through PEFT's LoRA layers against flexfed's merged weights.

Both sides decode the same real prompts (P3 tasks from ``../shared/data/p3-tasks``, or the
built-in suite when that is absent) with ``flexfed.evaluation.generate`` (batched, sorted by
length, KV cache) on SmolLM2-135M-Instruct with a rank-8 LoRA on all seven projections whose
B factors are nonzero (a trained adapter's shape):

  adapter  the PEFT model with the adapter active, as evaluation ran before: every projection
           adds x Aᵀ Bᵀ at every generated token.
  merged   ``LocalTrainer.merged``: s B A folded into the base weights for the evaluation, the
           original weight tensors put back afterwards.

The timed runs alternate after an untimed warm-up; the median is reported. Agreement: how many
of the greedy completions are identical (the two differ by float32 rounding only, which can flip
a near-tie), and the largest logit difference on one batch. The last line is
``evaluation ratio X`` (adapter seconds over merged seconds).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from aggregation import machine
from client_step import alternate, gemm_peak, prompts_of, real_examples
from flexfed.client import LocalTrainer, collate
from flexfed.config import LoraConfig, TrainingConfig
from flexfed.evaluation import generate
from flexfed.lora import Factors, init_adapter, target_shapes
from flexfed.models import load_model, load_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    tokenizer, model = load_tokenizer(), load_model()
    lora = LoraConfig(rank=8, alpha=16, target_modules=TARGETS)
    trainer = LocalTrainer(model, lora, TrainingConfig(precision="fp32"), tokenizer.pad_token_id)
    shapes = target_shapes(model, TARGETS)
    start = init_adapter(shapes, {n: 8 for n in shapes}, lora.alpha, lora.rslora, seed=0)
    adapter = {n: Factors(b=torch.randn_like(f.b) * 0.02, a=f.a, scale=f.scale) for n, f in start.items()}
    examples, source = real_examples(tokenizer, args.prompts, 160, 32, seed=0)
    prompts = prompts_of(examples)

    def through_adapter():
        trainer.activate(adapter)
        return generate(trainer.peft_model, tokenizer, prompts, args.new_tokens, args.batch_size)

    def merged():
        with trainer.merged(adapter) as m:
            return generate(m, tokenizer, prompts, args.new_tokens, args.batch_size)

    times, outputs = alternate({"adapter": through_adapter, "merged": merged}, args.repeats)

    batch = {k: v for k, v in collate(examples[: args.batch_size], tokenizer.pad_token_id).items() if k != "labels"}
    with torch.no_grad():
        trainer.activate(adapter)
        reference = trainer.peft_model(**batch).logits
        with trainer.merged(adapter) as m:
            gap = float((m(**batch).logits - reference).abs().max())

    print(f"machine: {machine()}; CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"fp32 GEMM peak {gemm_peak(torch.float32) / 1e9:.0f} GFLOP/s; load average {os.getloadavg()[0]:.2f}")
    print(f"settings: {len(prompts)} prompts from {source}, {args.new_tokens} new tokens, batch {args.batch_size}, "
          f"rank-8 LoRA on {len(shapes)} modules, median of {args.repeats}")
    generated = len(prompts) * args.new_tokens
    for name, ts in times.items():
        print(f"{name:8s} {statistics.median(ts):7.2f} s  ({generated / statistics.median(ts):6.1f} generated tokens/s)")
    same = sum(a == b for a, b in zip(outputs["adapter"], outputs["merged"]))
    print(f"agreement: {same}/{len(prompts)} identical completions; max |logit difference| {gap:.2e}")
    print(f"evaluation ratio {statistics.median(times['adapter']) / statistics.median(times['merged']):.2f}")


if __name__ == "__main__":
    main()
