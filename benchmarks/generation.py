"""Generation speed: flexfed's evaluation decoding against plain ``model.generate`` in float32.

Both sides decode the same real prompts (P3 tasks from ``../shared/data/p3-tasks``, or the
built-in suite when that is absent) greedily, up to ``--new-tokens`` tokens or the first stop
token, on SmolLM2-135M-Instruct with a rank-8 LoRA on all seven projections whose B factors are
nonzero (a trained adapter's shape), in one process:

  plain    the float32 PEFT model, prompts in the given order, batches of ``--batch-size`` left
           padded by the tokenizer, ``model.generate`` as most evaluation scripts call it.
  flexfed  what a run's evaluation does (``flexfed.evaluation.generate_ids`` on the trainer's
           model, precision ``--precision``, default ``auto``: bfloat16 where measured native):
           prompts sorted by length, the adapter merged into float32 weights or kept as a branch
           over bfloat16 ones (``LocalTrainer.merged``), a contiguous input to the output head.

The timed runs alternate after an untimed warm-up; the median is reported. Tokens are generated
tokens up to and including each completion's stop token. Agreement: how many completions are
identical, and the mean Rouge-L of each side against the references (bfloat16 rounding flips
near-ties, which changes some completions). The last line is ``generation ratio X`` (flexfed
prompts/s over plain prompts/s).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from aggregation import machine
from client_step import alternate, gemm_peak, prompts_of, real_examples
from flexfed.client import LocalTrainer
from flexfed.config import LoraConfig, TrainingConfig
from flexfed.evaluation import _stop_ids, generate_ids, rouge_l
from flexfed.lora import Factors, init_adapter, target_shapes
from flexfed.models import load_model, load_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def plain_generate(model, tokenizer, prompts, new_tokens: int, batch_size: int, stops) -> list[list[int]]:
    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer.pad({"input_ids": prompts[start : start + batch_size]}, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
        for row in gen[:, batch["input_ids"].shape[1] :].tolist():
            end = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
            out.append(row[:end])
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    lora = LoraConfig(rank=8, alpha=16, target_modules=TARGETS)
    plain_trainer = LocalTrainer(load_model(), lora, TrainingConfig(precision="fp32"), tokenizer.pad_token_id)
    trainer = LocalTrainer(load_model(), lora, TrainingConfig(precision=args.precision), tokenizer.pad_token_id)
    shapes = target_shapes(trainer.base_model, TARGETS)
    start = init_adapter(shapes, {n: 8 for n in shapes}, lora.alpha, lora.rslora, seed=0)
    adapter = {n: Factors(b=torch.randn_like(f.b) * 0.02, a=f.a, scale=f.scale) for n, f in start.items()}
    examples, source = real_examples(tokenizer, args.prompts, 160, 32, seed=0)
    prompts = prompts_of(examples)
    references = [[tokenizer.decode([t for t in e.labels if t != -100], skip_special_tokens=True).strip()] for e in examples]
    stops = _stop_ids(tokenizer)

    def plain():
        plain_trainer.activate(adapter)
        return plain_generate(plain_trainer.peft_model, tokenizer, prompts, args.new_tokens, args.batch_size, stops)

    def flexfed():
        with trainer.merged(adapter) as model:
            return generate_ids(model, tokenizer, prompts, args.new_tokens, args.batch_size)

    times, outputs = alternate({"plain": plain, "flexfed": flexfed}, args.repeats)

    print(machine())
    peak = gemm_peak(torch.bfloat16 if trainer.precision == "bf16" else torch.float32, seconds=1.0)
    print(f"GEMM peak here ({'bf16' if trainer.precision == 'bf16' else 'fp32'}, 1024 x 576 @ 576 x 1536): {peak / 1e9:.0f} GFLOP/s")
    print(f"data: {source}; {len(prompts)} prompts (mean {statistics.mean(map(len, prompts)):.0f} tokens), batch {args.batch_size}, "
          f"up to {args.new_tokens} new tokens; flexfed precision {args.precision} -> {trainer.precision}")
    print(f"{'':10}{'seconds':>10}{'prompts/s':>11}{'tokens/s':>10}{'Rouge-L':>9}")
    rate = {}
    for name in ("plain", "flexfed"):
        seconds = statistics.median(times[name])
        tokens = sum(map(len, outputs[name]))
        rate[name] = len(prompts) / seconds
        texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs[name]]
        rouge = statistics.mean(rouge_l(t, r) for t, r in zip(texts, references))
        print(f"{name:10}{seconds:10.2f}{rate[name]:11.2f}{tokens / seconds:10.1f}{rouge:9.3f}")
    same = sum(a == b for a, b in zip(outputs["plain"], outputs["flexfed"]))
    print(f"identical completions: {same}/{len(prompts)}")
    print(f"generation ratio {rate['flexfed'] / rate['plain']:.2f}")


if __name__ == "__main__":
    main()
