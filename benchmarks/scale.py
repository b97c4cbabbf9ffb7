"""Registered clients: 10,000 against 100, with 1% sampled per round.

Both federations split the same built-in task suite (IID, ``data.num_clients``) on the tiny model
and run a few rounds in the in-process simulator. What a registered but unsampled client may
cost is its metadata (a ``ClientShard`` of example indices, a rank-profile index, an id): data
is materialised only for the clients sampled in a round. 1% of 100 is one client, and the
per-round work grows with the clients sampled, so a third run samples the large federation's
count (100) out of the small one: its column against the large one isolates what registering
100x more clients costs. Each run is a fresh subprocess, so peak resident set sizes do not mix.
Printed per run:

- peak RSS of the whole process (``ru_maxrss``) after setup, when every client is registered
  and none has trained, and after the rounds (this adds the sampled clients' work); the
  setup increase from small to large divided by the extra clients is the cost of one
  registered client, printed beside the size of the clients' metadata (shards, ids,
  profile indices; counted object by object);
- setup: building the ``Simulation`` (model, tasks, partition, rank profiles, server);
- framework overhead per round: ``time_overhead_s`` from metrics.jsonl, i.e. round time less
  the clients' own work (``execute``: data and training) and evaluation, averaged over rounds;
- the clients' work per round, for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def deep_size(obj, seen: set | None = None) -> int:
    """Bytes held by a graph of containers, strings, numbers and dataclasses; shared objects once."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, (list, tuple, set)):
        size += sum(deep_size(x, seen) for x in obj)
    elif hasattr(obj, "__dataclass_fields__"):
        size += sum(deep_size(getattr(obj, f), seen) for f in obj.__dataclass_fields__)
    return size


def one_run(num_clients: int, fraction: float, rounds: int, output_dir: str) -> dict:
    import torch

    from flexfed.config import load_config
    from flexfed.engines.simulation import Simulation

    torch.set_num_threads(1)  # the tiny model's matrices are too small to split
    config = load_config(
        "tiny",
        [
            f"output_dir={output_dir}",
            f"name=scale-{num_clients}-{fraction}",
            "data.partition=iid",
            f"data.num_clients={num_clients}",
            "data.examples_per_task=256",  # ~11,000 training examples: at least one per client
            f"federation.sample_fraction={fraction}",
            f"federation.rounds={rounds}",
            "eval.every=1000",  # evaluate at round 0 and the last round only
            "eval.seen_examples=2",
            "eval.unseen_examples=2",
        ],
    )
    began = time.perf_counter()
    sim = Simulation(config)
    setup = time.perf_counter() - began
    setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    sim.run(show_progress=False)
    rows = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    return {
        "clients": len(sim.federation.clients),
        "sampled": rows[0]["clients_sampled"],
        "setup_s": setup,
        "overhead_s": sum(r["time_overhead_s"] for r in rows) / len(rows),
        "clients_s": sum(r["time_round_s"] - r["time_overhead_s"] - r["time_eval_s"] for r in rows) / len(rows),
        "setup_rss_mb": setup_rss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # What exists per registered client: its shard, its id and rank-profile index on the server.
        "metadata_mb": deep_size([sim.federation.clients, sim.server.client_ids, sim.server.client_profile]) / 2**20,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs=2, default=[100, 10_000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--fraction", type=float, default=0.01, help="share of clients sampled per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # run one size, print JSON
    args = parser.parse_args(argv)
    if args.worker:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(one_run(args.worker, args.fraction, args.rounds, tmp)))
        return

    small, large = args.clients
    runs = [(small, args.fraction), (small, min(1.0, args.fraction * large / small)), (large, args.fraction)]
    results = []
    for n, fraction in runs:
        command = [sys.executable, __file__, "--worker", str(n), "--fraction", str(fraction), "--rounds", str(args.rounds)]
        out = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"tiny model, IID split of the built-in suite, {args.rounds} rounds, each run in a fresh process")
    print(f"{'registered clients':>32}" + "".join(f"{r['clients']:>12,}" for r in results) + f"{'ratio':>8}")
    rows = [
        ("sampled per round", "sampled", "{:>12,}"),
        ("peak RSS after setup (MB)", "setup_rss_mb", "{:>12.1f}"),
        ("peak RSS after the rounds (MB)", "peak_rss_mb", "{:>12.1f}"),
        ("client metadata (MB)", "metadata_mb", "{:>12.2f}"),
        ("setup (s)", "setup_s", "{:>12.2f}"),
        ("framework overhead / round (s)", "overhead_s", "{:>12.3f}"),
        ("clients' work / round (s)", "clients_s", "{:>12.3f}"),
    ]
    for label, key, fmt in rows:
        cells = "".join(fmt.format(r[key]) for r in results)
        print(f"{label:>32}{cells}{results[2][key] / results[1][key]:>7.2f}x")
    print(f"ratio: the {large:,}-client run over the {small:,}-client run that samples as many clients")
    # (+ 0.0 turns a rounded -0.0 into 0.0)
    per_client = {k: round((results[2][k] - results[0][k]) * 1024 / (large - small), 2) + 0.0 for k in ("setup_rss_mb", "metadata_mb")}
    print(
        f"per extra registered client: {per_client['setup_rss_mb']:.2f} KiB of peak RSS after setup, "
        f"{per_client['metadata_mb']:.2f} KiB of metadata"
    )


if __name__ == "__main__":
    main()
