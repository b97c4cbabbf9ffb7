"""Flower at scale: 1,000 registered clients, 1% sampled, on flower-sim and on a loopback deployment.

Three runs of the same config (tiny model by default), one after the other:

- ``sim``: the in-process simulator (``flexfed run``), as the reference;
- ``flower-sim``: Flower's simulation engine (``flexfed run --engine flower-sim``), one virtual
  SuperNode per registered client unless ``--sim-nodes`` says otherwise;
- ``deploy``: a SuperLink and ``--nodes`` SuperNodes (``flexfed flower supernode``, resident
  ClientApp) as separate processes on loopback; every node hosts every N-th client.

Each run's processes are sampled every 0.5 s from /proc: the peak resident set size of the run
(the whole process tree for ``sim`` and ``flower-sim``), and for ``deploy`` separately the
SuperLink (``flower-superlink``), the ServerApp it starts (``flwr-serverapp``, which holds the
model for evaluation) and the SuperNodes (each: ``flexfed flower supernode``, ``flower-supernode``
and the resident ClientApp), the largest one. Per run, from metrics.jsonl: the median round time
(rounds after the first, none of which evaluates) and its ratio to the simulator's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from flexfed.config import load_config
from flexfed.engines.flower.deploy import LocalFederation, node_config_string
from flexfed.engines.flower.project import write_app


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, RSS bytes, command line) for every process we can read."""
    out = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            rss = int(open(f"/proc/{pid}/statm").read().split()[1]) * page
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        out[int(pid)] = (ppid, rss, cmd)
    return out


def _tree(table, root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            found.append(pid)
        todo += kids.get(pid, [])
    return found


class Sampler:
    """Peak RSS per named group of process trees, sampled every 0.5 s in a thread."""

    def __init__(self, groups):
        self.groups = groups  # () -> {name: [root pids]}
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            table = _proc_table()
            for name, roots in self.groups().items():
                rss = sum(table[p][1] for r in roots for p in _tree(table, r))
                self.peak[name] = max(self.peak.get(name, 0), rss)
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def rounds_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]


def median_round(run_dir: Path) -> float:
    rounds = rounds_of(run_dir)
    later = rounds[1:] if len(rounds) > 1 else rounds
    return statistics.median(r["time_round_s"] for r in later)


def run_cli(settings: list[str], engine: str, config: str, log: Path) -> tuple[float, dict]:
    sets = [a for s in settings for a in ("--set", s)]
    cmd = [sys.executable, "-m", "flexfed.cli", "run", "--config", config, "--engine", engine, "--quiet", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        began = time.perf_counter()
        with Sampler(lambda: {"run": [proc.pid]}) as sampler:
            code = proc.wait()
        wall = time.perf_counter() - began
    if code != 0:
        raise SystemExit(f"{engine} run failed ({code}); log: {log}\n{log.read_text()[-3000:]}")
    return wall, sampler.peak


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--sample-fraction", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples-per-task", type=int, default=64, help="enough training examples for one per client")
    parser.add_argument("--nodes", type=int, default=8, help="SuperNodes of the loopback deployment")
    parser.add_argument("--sim-nodes", type=int, default=0, help="flower-sim's virtual SuperNodes (0: one per client)")
    parser.add_argument("--runs", default="sim,flower-sim,deploy")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]

    tmp = Path(tempfile.mkdtemp(prefix="flexfed-flower-scale-"))
    settings = [
        f"federation.rounds={args.rounds}", f"federation.sample_fraction={args.sample_fraction}", "data.partition=iid",
        f"data.num_clients={args.clients}", f"data.examples_per_task={args.examples_per_task}", f"eval.every={args.rounds}", "eval.seen_examples=2", "eval.unseen_examples=2",
        f"flower.min_nodes={args.nodes}", f"flower.num_supernodes={args.sim_nodes or args.clients}",
    ]
    print(f"settings: config {args.config}, {args.clients} clients, sample fraction {args.sample_fraction}, {args.rounds} rounds; "
          f"flower-sim {args.sim_nodes or args.clients} virtual SuperNodes; deployment {args.nodes} SuperNodes; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = {}
    for run in runs:
        load = os.getloadavg()
        if run in ("sim", "flower-sim"):
            config = load_config(args.config, [*settings, f"output_dir={tmp / run}"])
            wall, peak = run_cli([*settings, f"output_dir={tmp / run}"], "simulation" if run == "sim" else "flower-sim", args.config, tmp / f"{run}.log")
            memory = f"peak RSS (process tree) {gib(peak['run'])}"
        elif run == "deploy":
            config = load_config(args.config, [*settings, f"output_dir={tmp / run}"])
            fed = LocalFederation(tmp / "fed")
            try:
                link = fed.start_superlink()
                nodes = [fed.start_supernode(f"node{k}", node_config_string(partition=(k, args.nodes))) for k in range(args.nodes)]

                def groups():
                    table = _proc_table()
                    apps = [p for p in _tree(table, link.pid) if p != link.pid and "flwr-serverapp" in table[p][2]]
                    return {"superlink": [link.pid], "serverapp": apps, **{n.name: [n.pid] for n in nodes}}

                began = time.perf_counter()
                with Sampler(groups) as sampler:
                    status = fed.run_to_end(write_app(tmp / "app", config), config.run_dir, args.timeout)
                wall = time.perf_counter() - began
            finally:
                fed.stop()
            if status.get("status") != "finished:completed":
                raise SystemExit(f"the deployment's run did not complete: {status}")
            # The SuperLink's own process tree includes the ServerApp it started: report both.
            node_peak = max(sampler.peak.get(n.name, 0) for n in nodes)
            memory = (f"peak RSS: SuperLink with its ServerApp {gib(sampler.peak['superlink'])} (the ServerApp alone "
                      f"{gib(sampler.peak.get('serverapp', 0))}); largest SuperNode {gib(node_peak)}, all {args.nodes} nodes "
                      f"{gib(sum(sampler.peak.get(n.name, 0) for n in nodes))}")
        else:
            raise SystemExit(f"unknown run {run!r}")
        results[run] = median_round(config.run_dir)
        rounds = rounds_of(config.run_dir)
        ratio = f"; {results[run] / results['sim']:.2f}x the simulator's" if "sim" in results and run != "sim" else ""
        times = ", ".join(f"{r['time_round_s']:.2f}" for r in rounds)
        print(f"{run}: wall {wall:.1f} s (incl. start); median round {results[run]:.2f} s{ratio}; rounds {times} s; "
              f"{rounds[-1]['clients_sampled']} sampled a round; "
              f"{memory}; load average {' '.join(f'{x:.2f}' for x in load)} before")


if __name__ == "__main__":
    main()
