"""Clients trained together (``training.clients_per_pass=K``) against one at a time.

The same K clients (one built-in task each, the quickstart's prompt and token limits), the same
start adapter, seeds and local steps, trained twice on one base model: by ``LocalTrainer.train``
one after another, then by ``MultiClientTrainer`` K per pass. Prints wall time and real
(non-padding) tokens per second of each, their ratio, and how far the trained adapters differ.

The gain is meant for accelerators, where one client's small batch leaves the device idle. On a
CPU one client already fills the cores, so expect no gain there (and a loss from padding every
client's batch to the widest one in the pass); the numbers show what the stacking costs.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from flexfed.client import LocalTrainer
from flexfed.config import load_config
from flexfed.data import builtin_suite
from flexfed.federation import encode_example
from flexfed.lora import init_adapter, target_shapes
from flexfed.models import load_model, load_tokenizer
from flexfed.multiclient import ClientJob, train_clients


def jobs_for(config, tokenizer, shapes, k: int, ranks: list[int]) -> list[ClientJob]:
    tasks = builtin_suite(seed=0, examples_per_task=16)[:k]
    jobs = []
    for i, task in enumerate(tasks):
        r = ranks[i % len(ranks)]
        start = init_adapter(shapes, {n: min(r, *shapes[n]) for n in shapes}, config.lora.alpha, config.lora.rslora, seed=i)
        examples = [encode_example(config, tokenizer, task, ex) for ex in task.examples]
        jobs.append(ClientJob(f"client-{i}", start, examples, seed=i))
    return jobs


def relative_difference(alone, joint, start) -> float:
    """||joint - alone|| / ||alone - start|| over all of one client's factors together."""
    diff = update = 0.0
    for n, f in alone.items():
        for x in ("a", "b"):
            diff += float((getattr(joint[n], x) - getattr(f, x)).double().norm() ** 2)
            update += float((getattr(f, x) - getattr(start[n], x)).double().norm() ** 2)
    return (diff / update) ** 0.5


def timed(trainer, jobs, per_pass: int) -> tuple[float, list]:
    began = time.perf_counter()
    results = train_clients(trainer, jobs, per_pass)
    return time.perf_counter() - began, results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama or smollm2-135m-instruct (or any causal LM)")
    parser.add_argument("--clients", type=int, default=4, help="K: clients, all trained in one pass")
    parser.add_argument("--steps", type=int, default=2, help="local steps per client")
    parser.add_argument("--ranks", default="8", help="comma-separated ranks, dealt to clients in turn")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = load_config(
        "quickstart",
        [
            f"model.name={args.model}",
            f"training.local_steps={args.steps}",
            f"training.precision={args.precision}",
            f"training.optimizer={args.optimizer}",
        ],
    )
    tokenizer = load_tokenizer(config.model.name)
    model = load_model(config.model.name)
    shapes = target_shapes(model, config.lora.target_modules)
    trainer = LocalTrainer(model, config.lora, config.training, tokenizer.pad_token_id)
    jobs = jobs_for(config, tokenizer, shapes, args.clients, [int(r) for r in args.ranks.split(",")])
    train_clients(trainer, jobs[:2], 2)  # warm-up: PEFT wrapping, allocator, kernels
    train_clients(trainer, jobs[:1], 1)

    t_seq, seq = timed(trainer, jobs, 1)
    t_joint, joint = timed(trainer, jobs, args.clients)
    tokens = sum(r.tokens for r in seq)
    assert tokens == sum(r.tokens for r in joint)
    worst = max(relative_difference(s.adapter, j.adapter, job.start) for s, j, job in zip(seq, joint, jobs))
    print(f"model {args.model}, {args.clients} clients x {args.steps} steps x batch {config.training.batch_size}, ranks {args.ranks}, "
          f"{args.optimizer}, precision {args.precision} ({trainer.autocast or 'fp32'}), {args.threads} threads, load {os.getloadavg()[0]:.2f}")
    print(f"{'':>26} {'seconds':>8} {'tokens':>7} {'tokens/s':>9}")
    print(f"{'one client at a time':>26} {t_seq:8.2f} {tokens:7d} {tokens / t_seq:9.1f}")
    print(f"{f'{args.clients} clients per pass':>26} {t_joint:8.2f} {tokens:7d} {tokens / t_joint:9.1f}")
    print(f"joint / sequential throughput: {t_seq / t_joint:.2f}x; "
          f"adapters differ by at most {worst:.1e} of the client's update (Frobenius, all factors)")


if __name__ == "__main__":
    main()
