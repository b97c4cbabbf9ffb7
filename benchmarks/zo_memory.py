"""FedKSeed's client memory against inference: the peak of zeroth-order steps and of plain forwards.

Each case runs in a fresh process: load the model, warm up with one forward under ``no_grad``,
then measure either two inference forwards (``inference``) or two FedKSeed local steps
(``zo``: ``flexfed.zo.train_local``, four forwards and six passes of z) on the same worst-case
batch (every sequence ``--tokens`` long, ``--response`` labelled positions).

  CPU   the process's peak resident set (VmHWM, reset first through /proc/self/clear_refs; glibc
        told to mmap blocks above 64 KiB so freed tensors leave RSS at once), weights included.
  CUDA  torch.cuda.max_memory_allocated, weights included.

    python benchmarks/zo_memory.py                          # SmolLM2-135M, CPU
    python benchmarks/zo_memory.py --device cuda --batch 16 --tokens 512
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys

from memory import rss  # VmRSS / VmHWM of this process, as the LoRA memory benchmark measures them


def measure(case: dict) -> dict:
    import torch

    from flexfed import zo
    from flexfed.client import LocalTrainer, collate, response_loss
    from flexfed.config import LoraConfig, TrainingConfig
    from flexfed.data.prompts import IGNORE_INDEX, EncodedExample
    from flexfed.models import load_model

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
    torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    model = load_model(case["model"])
    b, t, r = case["batch"], case["tokens"], case["response"]
    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(b):
        ids = torch.randint(3, model.config.vocab_size, (t,), generator=gen).tolist()
        examples.append(EncodedExample(input_ids=ids, labels=[IGNORE_INDEX] * (t - r) + ids[t - r:], truncated_prompt=False, truncated_response=False))
    trainer = LocalTrainer(model, LoraConfig(), TrainingConfig(batch_size=b, local_steps=2, precision="fp32"), pad_id=2, device=device)
    batch = {k: v.to(device) for k, v in collate(examples, 2).items()}

    def forward():
        with torch.no_grad():
            return response_loss(trainer.base_model, batch).item()

    forward()  # warm-up: kernels, thread pools
    params = [p for _, p in zo.tuned_parameters(trainer.base_model, None)]
    plan = zo.chunk_plan(params, case["chunk"])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    if case["kind"] == "inference":
        forward(), forward()
    else:
        zo.train_local(trainer, params, plan, zo.seed_pool(0, 16), None, examples, 2, 0, 1e-3, 1e-7, case["chunk"])
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = rss("VmHWM")
    return {**case, "peak": peak, "weights": sum(p.numel() * p.element_size() for p in params)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--response", type=int, default=64)
    p.add_argument("--chunk", type=int, default=2**20)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    out = {}
    for kind in ("inference", "zo"):
        case = dict(kind=kind, model=args.model, device=args.device, batch=args.batch, tokens=args.tokens, response=args.response,
                    chunk=args.chunk, threads=args.threads)
        res = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"case {case} failed:\n{res.stderr[-3000:]}")
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    mib = lambda x: x / 2**20  # noqa: E731
    inf, z = out["inference"]["peak"], out["zo"]["peak"]
    print(f"{args.model} on {args.device}, batch {args.batch} x {args.tokens} tokens ({args.response} labelled), chunk {args.chunk}, "
          f"weights {mib(out['zo']['weights']):.1f} MiB")
    print(f"peak, inference (2 forwards):   {mib(inf):8.1f} MiB")
    print(f"peak, FedKSeed (2 local steps): {mib(z):8.1f} MiB   ratio {z / inf:.3f}")


if __name__ == "__main__":
    main()
