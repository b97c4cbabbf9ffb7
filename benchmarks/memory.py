"""Training-memory estimate (resources.TrainingMemory) against the measured peak of real steps.

Each case runs in a fresh process: load the model, then two steps of ``LocalTrainer.train``
(the second one holds the optimizer state), after a warm-up step, on worst-case batches: every sequence
``max_tokens`` long with ``max_response_tokens`` labelled positions. The printed figures leave
out the frozen weights, which both sides count the same way (params x bytes):

  measured  CPU: the peak resident set size during ``train`` minus the RSS just before it. The
            kernel's high-water mark is reset first (/proc/self/clear_refs, "5"), so nothing is
            sampled and no spike is missed; glibc is told to mmap every block above 64 KiB so
            freed tensors leave RSS at once. CUDA: torch.cuda.max_memory_allocated minus the
            allocation before the call.
  estimate  adapter + activations + logits of ``TrainingMemory.estimate``.

    python benchmarks/memory.py                       # SmolLM2-135M and the tiny model, CPU
    python benchmarks/memory.py --device cuda --batch 16 --tokens 512
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(case: dict) -> dict:
    """One case, in this process: the measured peak above the start, and the estimate."""
    import torch

    from flexfed.client import LocalTrainer
    from flexfed.config import LoraConfig, TrainingConfig
    from flexfed.data.prompts import IGNORE_INDEX, EncodedExample
    from flexfed.lora import init_adapter, target_shapes
    from flexfed.models import load_model
    from flexfed.resources import RANK_TYPES, TrainingMemory, resolve_type

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD; setting it disables the dynamic rule
    except (OSError, AttributeError):
        pass
    torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    model = load_model(case["model"], dtype=getattr(torch, case["dtype"]))
    shapes = target_shapes(model, MODULES)
    ranks = resolve_type(case["type"], *RANK_TYPES[case["type"]], shapes).ranks
    b, t, r = case["batch"], case["tokens"], case["response"]
    training = TrainingConfig(batch_size=b, local_steps=2, precision=case["precision"], optimizer=case["optimizer"])
    memory = TrainingMemory.from_model(model, shapes, batch_size=b, max_tokens=t, response_tokens=r,
                                       autocast=case["precision"] == "bf16" and case["dtype"] == "float32",
                                       optimizer_states=2 if case["optimizer"] == "adamw" else 0)
    est = memory.estimate(ranks)
    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(b):
        ids = torch.randint(3, model.config.vocab_size, (t,), generator=gen).tolist()
        examples.append(EncodedExample(input_ids=ids, labels=[IGNORE_INDEX] * (t - r) + ids[t - r:],
                                       truncated_prompt=False, truncated_response=False))
    trainer = LocalTrainer(model, LoraConfig(alpha=16), training, pad_id=2, device=device)
    # Warm up on a rank-1 slot of its own: imports, thread pools and kernels load outside the measurement.
    trainer.train("warm-up", init_adapter(shapes, dict.fromkeys(shapes, 1), 16.0, False, seed=0), examples[:1], seed=0)
    start = init_adapter(shapes, ranks, 16.0, False, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer.train("c", start, examples, seed=0)
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - before
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        before = rss("VmRSS")
        trainer.train("c", start, examples, seed=0)
        measured = rss("VmHWM") - before
    return {**case, "measured": measured, "estimate": est.total - est.weights, "weights": est.weights,
            "adapter": est.adapter, "activations": est.activations, "logits": est.logits}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="tiny-llama,smollm2-135m-instruct")
    p.add_argument("--types", default="T1,T2,T3,T4")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--response", type=int, default=64)
    p.add_argument("--precisions", default="fp32,bf16", help="training.precision values (bf16 = bf16 autocast)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one JSON case and print the result
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    print(f"LoRA on {', '.join(MODULES)}; AdamW; batch {args.batch} x {args.tokens} tokens ({args.response} labelled); "
          f"device {args.device}; frozen weights left out of both columns")
    print(f"{'model':<24}{'precision':<10}{'type':<6}{'measured MiB':>14}{'estimate MiB':>14}{'est/meas':>10}"
          f"{'adapter':>9}{'activ.':>9}{'logits':>9}")
    for model in args.models.split(","):
        for precision in args.precisions.split(","):
            for type_ in args.types.split(","):
                case = dict(model=model, dtype="float32", precision=precision, type=type_, batch=args.batch, tokens=args.tokens,
                            response=args.response, optimizer="adamw", device=args.device, threads=args.threads)
                out = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"case {case} failed:\n{out.stderr[-3000:]}")
                m = json.loads(out.stdout.strip().splitlines()[-1])
                mib = lambda k: m[k] / 2**20  # noqa: E731
                print(f"{model:<24}{precision:<10}{type_:<6}{mib('measured'):>14.1f}{mib('estimate'):>14.1f}"
                      f"{m['estimate'] / m['measured']:>10.2f}{mib('adapter'):>9.1f}{mib('activations'):>9.1f}{mib('logits'):>9.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
