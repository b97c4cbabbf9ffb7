"""FlexLoRA server aggregation: the fast path (lowrank.choose_method) against the dense reference.

Both run in one process on the same random client updates and the same subset of layers, through
the same code (``flexlora_triplets``) except for the SVD: ``method="auto"`` against
``method="dense"`` (form dW, full ``torch.linalg.svd``, float32 like the official FlexLoRA code).

Scenarios (rank types of the FlexLoRA paper: T1 = 8 everywhere, T2 = 30, T3 = 30 on attention and
200 on MLP, T4 = 200; LoRA on q,k,v,o,gate,up,down):
  (a)  1.3B-shaped (hidden 2048, MLP 5504, 24 layers), 80 sampled clients, heavy-tail-strong
       5/5/10/80 -- the paper's setting. R = sum of client ranks ~ 13,000 >> d: randomized path.
  (b)  7B-shaped (hidden 4096, MLP 11008, 32 layers), 10 clients, heavy-tail-light 80/5/5/10
       (mostly weak clients): R ~ 300 << d, the factored exact path's regime (SPEC §3: R = 284).
  (b') the same 7B shape and 10 clients, heavy-tail-strong: R ~ 1,700 = 0.4 d, near the
       crossover of the cost model; shown so the dependence on R is visible. --no-strong-b skips it.

Random factors: A ~ U(±1/sqrt(d_in)) (PEFT's init), B ~ N(0, 0.01²), alpha = 16, s(r) = alpha/r;
client weights = example counts drawn from 16..520 (the paper's range). Accuracy: for every
module and every client rank r present, the relative Frobenius distance between the fast and the
dense rank-r products U_r Σ_r V_rᵀ, maximised; plus ‖dW − Ŵ_r‖ / ‖dW − W_r*‖ (near-optimality). On
the first q_proj of each scenario both are also compared with a float64 dense SVD, which shows
how much of the difference is the float32 reference's own round-off.

Peak memory: resident set size sampled every 2 ms by a psutil thread during each call, minus the
RSS just before the call (torch's allocations are invisible to tracemalloc). glibc is told to mmap
every block above 64 KiB so that freed memory leaves RSS at once; sampling can still miss spikes
shorter than 2 ms.

The dense SVDs take minutes per layer on 2 cores, hence ``--layers`` (default 1): both paths
process the same first N layers, and the output says so.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass

import psutil
import torch

from flexfed.aggregation.flexlora import flexlora_triplets
from flexfed.aggregation.lowrank import RTOL, choose_method
from flexfed.lora import ATTENTION, Factors, lora_scale
from flexfed.resources import DISTRIBUTIONS, RANK_TYPES, resolve_type

ALPHA = 16.0


@dataclass
class Scenario:
    label: str
    model: str
    hidden: int
    intermediate: int
    total_layers: int
    clients: int
    distribution: str


def module_shapes(hidden: int, intermediate: int, layers: int) -> dict[str, tuple[int, int]]:
    shapes = {}
    for i in range(layers):
        for kind in ATTENTION:
            shapes[f"model.layers.{i}.self_attn.{kind}"] = (hidden, hidden)
        shapes[f"model.layers.{i}.mlp.gate_proj"] = (intermediate, hidden)
        shapes[f"model.layers.{i}.mlp.up_proj"] = (intermediate, hidden)
        shapes[f"model.layers.{i}.mlp.down_proj"] = (hidden, intermediate)
    return shapes


def make_clients(shapes, n_clients: int, distribution: str, seed: int):
    """Random client adapters with rank types drawn from ``distribution``; returns updates, weights, types."""
    g = torch.Generator().manual_seed(seed)
    shares = DISTRIBUTIONS[distribution]
    probs = torch.tensor([shares.get(t, 0.0) for t in RANK_TYPES])
    types = [list(RANK_TYPES)[int(i)] for i in torch.multinomial(probs, n_clients, replacement=True, generator=g)]
    weights = [float(n) for n in torch.randint(16, 521, (n_clients,), generator=g)]
    updates = []
    for t in types:
        adapter = {}
        for name, r in resolve_type(t, *RANK_TYPES[t], shapes).ranks.items():
            d, k = shapes[name]
            a = (torch.rand(r, k, generator=g) * 2 - 1) / math.sqrt(k)
            b = torch.randn(d, r, generator=g) * 0.01
            adapter[name] = Factors(b=b, a=a, scale=lora_scale(r, ALPHA))
        updates.append(adapter)
    return updates, weights, types


def return_freed_memory_to_the_os() -> None:
    """Make glibc mmap every block above 64 KiB, so that freeing it lowers RSS right away.

    By default glibc raises its mmap threshold after each free (up to 32 MiB) and keeps such
    blocks in the heap: RSS would then neither drop after one call nor rise during the next, and
    the second path measured would look free.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD; setting it disables the dynamic rule
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak resident set size above the starting value, sampled by a background thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.process = interval, psutil.Process()

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def delta(self) -> int:
        return self.peak - self.start


def timed(fn):
    with PeakRSS() as mem:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, seconds, mem.delta


def product(triplets, r):
    u, s, vh = triplets
    return (u[:, :r].double() * s[:r].double()) @ vh[:r].double()


def relative(x, y) -> float:
    return float(torch.linalg.norm(x - y) / torch.linalg.norm(y))


def compare(fast, dense, updates, p, client_ranks):
    """Max relative error of the rank-r products and max near-optimality ratio over modules and r."""
    worst_error, worst_ratio = 0.0, 0.0
    for name in fast:
        dw = sum(pi * u[name].delta(torch.float64) for pi, u in zip(p, updates))
        for r in sorted(client_ranks[name]):
            ours, ref = product(fast[name], r), product(dense[name], r)
            worst_error = max(worst_error, relative(ours, ref))
            worst_ratio = max(worst_ratio, float(torch.linalg.norm(dw - ours) / torch.linalg.norm(dw - ref)))
        del dw
    return worst_error, worst_ratio


def float64_check(fast, dense, updates, p, name, client_ranks):
    """On one module: both paths against a float64 dense SVD."""
    truth = flexlora_triplets(
        [{name: u[name]} for u in updates], p, {name: fast[name][1].shape[0]}, method="dense", dtype=torch.float64
    )
    t = truth[name]
    fast_error = max(relative(product(fast[name], r), product(t, r)) for r in client_ranks[name])
    dense_error = max(relative(product(dense[name], r), product(t, r)) for r in client_ranks[name])
    return fast_error, dense_error


def run(scenario: Scenario, layers: int, seed: int) -> dict:
    shapes = module_shapes(scenario.hidden, scenario.intermediate, layers)
    updates, weights, types = make_clients(shapes, scenario.clients, scenario.distribution, seed)
    total = sum(weights)
    p = [w / total for w in weights]
    max_ranks = {name: max(u[name].rank for u in updates) for name in shapes}
    client_ranks = {name: {u[name].rank for u in updates} for name in shapes}
    examples = {"attn": "model.layers.0.self_attn.q_proj", "mlp": "model.layers.0.mlp.up_proj"}
    totals = {kind: sum(u[n].rank for u in updates) for kind, n in examples.items()}
    paths = {kind: choose_method(*shapes[n], totals[kind], max_ranks[n]) for kind, n in examples.items()}

    fast, fast_s, fast_mem = timed(lambda: flexlora_triplets(updates, p, max_ranks))
    dense, dense_s, dense_mem = timed(
        lambda: flexlora_triplets(updates, p, max_ranks, method="dense", dtype=torch.float32)
    )
    error, ratio = compare(fast, dense, updates, p, client_ranks)
    first = next(iter(shapes))
    fast64, dense64 = float64_check(fast, dense, updates, p, first, client_ranks)
    return {
        "scenario": scenario,
        "types": {t: types.count(t) for t in RANK_TYPES},
        "R": totals,
        "paths": paths,
        "matrices": len(shapes),
        "fast_s": fast_s,
        "dense_s": dense_s,
        "fast_mem": fast_mem,
        "dense_mem": dense_mem,
        "dense_copy": sum(4 * d * k for d, k in shapes.values()),
        "error": error,
        "ratio": ratio,
        "fast64": fast64,
        "dense64": dense64,
    }


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{model}; {os.cpu_count()} logical cores; torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"{'MKL' if torch.backends.mkl.is_available() else 'no MKL'}; Python {platform.python_version()}"
    )


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers", type=int, default=1, help="transformer layers measured in every scenario (default 1)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-strong-b", action="store_true", help="skip the (b') heavy-tail-strong 7B scenario")
    parser.add_argument("--only", choices=["a", "b", "b'"], action="append", help="run only these scenarios")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up when redirected to a file
    return_freed_memory_to_the_os()

    scenarios = [
        Scenario("(a)", "1.3B-shaped", 2048, 5504, 24, 80, "heavy-tail-strong"),
        Scenario("(b)", "7B-shaped", 4096, 11008, 32, 10, "heavy-tail-light"),
    ]
    if not args.no_strong_b:
        scenarios.append(Scenario("(b')", "7B-shaped", 4096, 11008, 32, 10, "heavy-tail-strong"))
    if args.only:
        scenarios = [s for s in scenarios if s.label.strip("()") in args.only]

    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.2f}")
    print(
        f"settings: first {args.layers} layer(s) of each model, 7 adapted matrices per layer (q,k,v,o,gate,up,down), "
        f"alpha={ALPHA:g}, s(r)=alpha/r, seed={args.seed}; dense = float32 dW + full torch.linalg.svd; "
        f"fast = lowrank.choose_method (exact: float64 factored; randomized: float32 dW, rtol {RTOL:g})"
    )
    print("peak memory = max RSS during the call minus RSS before it (psutil, sampled every 2 ms)")
    # warm up BLAS/LAPACK thread pools so the first timed call is not charged for them
    flexlora_triplets([{"w": Factors(torch.randn(64, 4), torch.randn(4, 64), 1.0)}], [1.0], {"w": 4}, method="dense")

    results = []
    for scenario in scenarios:
        layers = min(args.layers, scenario.total_layers)
        r = run(scenario, layers, args.seed)
        results.append(r)
        print(
            f"\n{scenario.label} {scenario.model} (d={scenario.hidden}, MLP {scenario.intermediate}), "
            f"{layers} of {scenario.total_layers} layers, {scenario.clients} clients, {scenario.distribution}: "
            f"types {r['types']}; total client rank R = {r['R']['attn']} (attention), {r['R']['mlp']} (MLP); "
            f"fast path {r['paths']['attn']} (attention), {r['paths']['mlp']} (MLP); "
            f"dense dW of all {scenario.total_layers} layers: {r['dense_copy'] * scenario.total_layers / layers / 2**30:.1f} GiB"
        )
    columns = [  # header, width, cell
        ("", 5, lambda r: r["scenario"].label),
        ("matrices", 8, lambda r: str(r["matrices"])),
        ("dense s", 8, lambda r: f"{r['dense_s']:.2f}"),
        ("fast s", 7, lambda r: f"{r['fast_s']:.2f}"),
        ("speedup", 7, lambda r: f"{r['dense_s'] / r['fast_s']:.1f}x"),
        ("dense peak", 10, lambda r: mib(r["dense_mem"])),
        ("fast peak", 10, lambda r: mib(r["fast_mem"])),
        ("dense copy", 10, lambda r: mib(r["dense_copy"])),
        ("max rel err", 11, lambda r: f"{r['error']:.1e}"),
        ("frob ratio", 10, lambda r: f"{r['ratio']:.6f}"),
        ("fast vs f64", 11, lambda r: f"{r['fast64']:.1e}"),
        ("dense vs f64", 12, lambda r: f"{r['dense64']:.1e}"),
    ]
    print()
    print(" ".join(f"{h:>{w}}" for h, w, _ in columns))
    for r in results:
        print(" ".join(f"{cell(r):>{w}}" for _, w, cell in columns))
    print(
        "\nmax rel err: max over modules and client ranks r of |P_r(fast) - P_r(dense)|_F / |P_r(dense)|_F, "
        "P_r = U_r S_r V_r^T;\nfrob ratio: max |dW - P_r(fast)|_F / |dW - P_r(dense)|_F (1 = as good as the dense SVD);\n"
        "fast/dense vs f64: the max rel err of each against a float64 dense SVD, first q_proj only;\n"
        "dense copy: float32 dW of every adapted matrix measured (the reference forms them chunk by chunk)."
    )
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (other processes on the machine skew both timings)")
    speedup = {r["scenario"].label: f"{r['dense_s'] / r['fast_s']:.1f}" for r in results}
    print(f"aggregation speedup (a) {speedup.get('(a)', 'not run')}, (b) {speedup.get('(b)', 'not run')}")


if __name__ == "__main__":
    main()
