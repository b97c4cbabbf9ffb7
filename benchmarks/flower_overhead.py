"""Flower's per-message overhead: a loopback deployment against the in-process simulator.

Both run the same config (tiny model by default, so that training is short and the overhead
shows): ``--nodes`` SuperNodes on loopback through ``flexfed flower supernode``, each hosting
every N-th client, and the simulator in this process. ``--isolation`` lists the SuperNode modes
to run, one deployment each, one after the other under the same load: ``process`` (a resident
ClientApp process serves every message) and ``subprocess`` (Flower starts a ``flwr-clientapp``
process per message, which relays to the node's trainer worker). Per round: wall time, and on
Flower the clients' medians of the round trip (push to reply), their own training time on the
node (``seconds``), the ClientApp handler's time on the node (``time_clientapp_s``: training plus
decoding, encoding and any relay) and Flower's part (``time_flower_s``: the round trip less the
handler: transport, polling, task dispatch, process starts). Per mode, the last line is
``flower overhead ratio X``: Flower's round wall time over the simulator's (median over rounds
after the first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from aggregation import machine
from flexfed.config import load_config
from flexfed.engines import simulation
from flexfed.engines.flower.deploy import LocalFederation, node_config_string
from flexfed.engines.flower.project import write_app


def rounds_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8, help="registered clients (iid partition)")
    parser.add_argument("--sample-fraction", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--isolation", default="subprocess,process", help="SuperNode modes to run, in this order (comma-separated; repeats allowed)")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.isolation.split(",") if m.strip()]

    tmp = Path(tempfile.mkdtemp(prefix="flexfed-flower-overhead-"))
    settings = [
        f"federation.rounds={args.rounds}", f"federation.sample_fraction={args.sample_fraction}", "data.partition=iid",
        f"data.num_clients={args.clients}", f"eval.every={args.rounds}", "eval.seen_examples=2", "eval.unseen_examples=2",
        f"flower.min_nodes={args.nodes}",
    ]
    inproc_config = load_config(args.config, [*settings, f"output_dir={tmp / 'inproc'}"])
    load = os.getloadavg()
    began = time.perf_counter()
    simulation.run(inproc_config, show_progress=False)
    inproc_wall = time.perf_counter() - began
    inproc = rounds_of(inproc_config.run_dir)
    later = slice(1, None) if len(inproc) > 1 else slice(None)
    sim_round = statistics.median(i["time_round_s"] for i in inproc[later])
    print(f"machine: {machine()}; CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"simulator: wall {inproc_wall:.1f} s; median round {sim_round:.2f} s (after the first); load average {' '.join(f'{x:.2f}' for x in load)} before it")

    for n, mode in enumerate(modes):
        where = tmp / f"{n}-{mode}"
        flower_config = load_config(args.config, [*settings, f"output_dir={where / 'flower'}"])
        fed = LocalFederation(where / "fed")
        load = os.getloadavg()
        try:
            fed.start_superlink()
            for k in range(args.nodes):
                fed.start_supernode(f"node{k}", node_config_string(partition=(k, args.nodes)), isolation=mode)
            began = time.perf_counter()
            status = fed.run_to_end(write_app(where / "app", flower_config), flower_config.run_dir, args.timeout)
            flower_wall = time.perf_counter() - began
        finally:
            fed.stop()
        if status.get("status") != "finished:completed":
            raise SystemExit(f"the Flower run ({mode}) did not complete: {status}")
        flower = rounds_of(flower_config.run_dir)
        print(f"\n--isolation {mode}: config {args.config}, {args.nodes} SuperNodes on loopback, {args.clients} clients, "
              f"{flower[0]['clients_sampled']} sampled a round, {args.rounds} rounds; wall incl. start: Flower {flower_wall:.1f} s, "
              f"simulator {inproc_wall:.1f} s; load average {' '.join(f'{x:.2f}' for x in load)} before, "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} after")
        print(f"{'round':>5} {'sim s':>7} {'flower s':>9} {'trip s':>7} {'train s':>8} {'outside s':>10} {'clientapp s':>12} {'flower part s':>14}")
        for f, i in zip(flower, inproc):
            clients = f["clients"]
            med = lambda key: statistics.median(c[key] for c in clients)  # noqa: E731
            print(f"{f['round']:>5} {i['time_round_s']:7.2f} {f['time_round_s']:9.2f} {med('time_roundtrip_s'):7.2f} "
                  f"{med('seconds'):8.2f} {med('time_outside_client_s'):10.2f} {med('time_clientapp_s'):12.2f} {med('time_flower_s'):14.2f}")
        ratio = statistics.median(f["time_round_s"] for f in flower[later]) / sim_round
        clients = [c for f in flower[later] for c in f["clients"]]
        print(f"per-message overhead (median time outside the client's compute): {statistics.median(c['time_outside_client_s'] for c in clients):.2f} s; "
              f"of it Flower's part (round trip less the ClientApp handler): {statistics.median(c['time_flower_s'] for c in clients):.2f} s")
        print(f"flower overhead ratio {ratio:.2f} (--isolation {mode})")


if __name__ == "__main__":
    main()
