"""``flexfed run | sweep | report | resources | aggregate | flower``."""

from __future__ import annotations

import argparse
import logging
import warnings
import sys
from pathlib import Path

from rich.logging import RichHandler

log = logging.getLogger("flexfed")


def _run(args) -> int:
    from flexfed.config import load_config
    from flexfed.engines import simulation
    from flexfed.report import print_summary, write_report

    if args.resume:
        if args.config:
            raise SystemExit("--resume continues a run with its saved config.yaml; do not pass --config")
        run_dir = Path(args.resume)
        config = load_config(run_dir / "config.yaml", args.set)
        config = config.model_copy(update={"output_dir": str(run_dir.parent), "name": run_dir.name})
    else:
        config = load_config(args.config, args.set)
    if args.engine == "flower-sim":
        from flexfed.engines.flower import sim

        run_dir = sim.run(config, resume=bool(args.resume), overwrite=args.overwrite, show_progress=not args.quiet)
    else:
        run_dir = simulation.run(config, resume=bool(args.resume), overwrite=args.overwrite, show_progress=not args.quiet)
    report_dir = write_report([run_dir])
    print_summary([run_dir])
    log.info("run directory: %s (report: %s)", run_dir, report_dir / "summary.md")
    return 0


def _sweep(args) -> int:
    from rich.console import Console

    from flexfed.experiments import results, sweep

    spec, sweep_dir = sweep.open_sweep(args.file, args.out, args.config, args.set, args.grid, args.seeds, args.baseline)
    runs = sweep.prepare(spec, sweep_dir)
    if args.dry_run:
        for run in runs:
            log.info("%s  [%s]", run.run_dir.name, sweep.run_state(run))
        log.info("%d runs validated; nothing run (--dry-run)", len(runs))
        return 0
    outcomes = sweep.execute(spec, runs, sweep_dir, jobs=args.jobs, threads_per_job=args.threads_per_job, show_progress=not args.quiet)
    table = results.write_results(spec, runs, sweep_dir)
    Console().print(results.console_table(table))
    log.info("sweep results: %s (results.md, results.csv, results.json, curves-*.png)", sweep_dir)
    failed = [o.spec.run_dir.name for o in outcomes if o.returncode != 0]
    if failed:
        log.error("%d run(s) failed: %s; run the sweep again to retry them", len(failed), ", ".join(failed))
        return 1
    return 0


def _compare(args) -> int:
    from rich.console import Console

    from flexfed.experiments import compare

    comparison, sweep_dir = compare.open_comparison(args.file, args.out, args.set, args.seeds, args.budget)
    result = compare.run_comparison(comparison, sweep_dir, jobs=args.jobs, threads_per_job=args.threads_per_job,
                                    show_progress=not args.quiet, dry_run=args.dry_run)
    if result is None:
        log.info("%d settings x %d seeds validated; nothing run (--dry-run)", len(comparison.settings), len(comparison.seeds))
        return 0
    Console().print(compare.console_table(result))
    log.info("comparison: %s (comparison.md, comparison.json, %s)", sweep_dir / compare.OUT, ", ".join(result["plots"]))
    status = 0
    if result["failed"]:
        log.error("%d run(s) failed: %s; run the comparison again to retry them", len(result["failed"]), ", ".join(result["failed"]))
        status = 1
    wrong = {r["setting"]: len(r["formula_mismatches"]) for r in result["settings"] if r["formula_mismatches"]}
    if wrong:
        log.error("measured bytes differ from the formulas (a bug): %s; see comparison.md", wrong)
        status = 1
    return status


def _report(args) -> int:
    from flexfed.experiments.sweep import MARKER
    from flexfed.report import print_summary, write_report

    dirs = [Path(d) for d in args.run_dirs]
    if len(dirs) == 1 and (dirs[0] / "compare.yaml").is_file():  # a comparison: its sweep table and the comparison
        from flexfed.experiments import compare

        result = compare.report_comparison(dirs[0])
        log.info("comparison rebuilt in %s", dirs[0] / compare.OUT)
        return 0
    if len(dirs) == 1 and (dirs[0] / MARKER).is_file():  # a sweep directory: rebuild its table and curves
        from rich.console import Console

        from flexfed.experiments import results

        table = results.report_sweep(dirs[0])
        Console().print(results.console_table(table))
        log.info("sweep results rebuilt in %s", dirs[0])
        return 0
    out = write_report(dirs, Path(args.out) if args.out else None)
    print_summary(dirs)
    log.info("report written to %s", out)
    return 0


def _resources(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from flexfed.config import load_config
    from flexfed.client import pick_device
    from flexfed.lora import target_shapes
    from flexfed.models import load_skeleton
    from flexfed.resources import GIB, TrainingMemory, client_mix, fit_budgets, quota_counts, rank_types, resolve_type

    config = load_config(args.config, args.set)
    model = load_skeleton(config.model.name, getattr(torch, config.model.dtype))
    shapes = target_shapes(model, config.lora.target_modules)
    memory = TrainingMemory.for_run(config, model, shapes, pick_device(config.device))
    types = rank_types(config.resources)
    gib = lambda b: f"{b / GIB:.3g}"  # noqa: E731
    table = Table(title=f"Estimated peak training memory per client (GiB), {config.model.name}",
                  caption=f"{memory.describe()}; LoRA on {', '.join(config.lora.target_modules)}; before process overhead")
    for col in ("type", "attn/MLP", "LoRA", "weights", "adapter", "activ.", "logits", "total"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for name in sorted(types):
        profile = resolve_type(name, *types[name], shapes)
        e = memory.estimate(profile.ranks)
        params = sum(r * sum(shapes[m]) for m, r in profile.ranks.items())
        table.add_row(name, "/".join(map(str, types[name])), f"{params / 1e6:.2f} M", *map(gib, (e.weights, e.adapter, e.activations, e.logits, e.total)))
    console = Console()
    console.print(table)
    if config.resources.distribution == "memory":
        for budget, profile in fit_budgets(config.resources.budgets_gib, types, memory).items():
            console.print(f"budget {budget} ({config.resources.budgets_gib[budget]:g} GiB) -> {profile.name}")
    num_clients = config.data.num_clients
    if num_clients and config.resources.distribution != "homogeneous":
        counts = quota_counts(num_clients, client_mix(config.resources))
        console.print(f"clients per {'budget' if config.resources.distribution == 'memory' else 'rank type'} "
                      f"({num_clients} clients, {config.resources.distribution}): " + ", ".join(f"{n} {c}" for n, c in counts.items()))
    return 0


def _aggregate(args) -> int:
    from flexfed.merge import merge_adapters

    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    ranks = [int(r) for r in args.rank.split(",")]
    written = merge_adapters(args.adapters, method=args.method, weights=weights, ranks=ranks, out=Path(args.out))
    for path in written:
        log.info("wrote %s", path)
    return 0


def _flower_certs(args) -> int:
    from flexfed.engines.flower.deploy import make_certs

    paths = make_certs(args.dir, hosts=args.host, nodes=args.nodes, days=args.days)
    for name in sorted(paths):
        log.info("wrote %s", paths[name])
    log.info("development certificates only: keep ca.key and supernode-*.key private")
    return 0


def _flower_app(args) -> int:
    from flexfed.config import load_config
    from flexfed.engines.flower.project import write_app

    config = load_config(args.config, args.set)
    out = write_app(args.dir, config, resume=args.resume, overwrite=args.overwrite)
    log.info("Flower App for run %s written to %s; submit it with: flwr run %s <superlink connection> --stream", config.name, out, out)
    return 0


def _flower_superlink(args) -> int:
    import os

    from flexfed.engines.flower.deploy import flower_env, reap_children, superlink_command

    if args.insecure == bool(args.certs):
        raise SystemExit("pass --certs DIR (TLS; see `flexfed flower certs`) or --insecure")
    if args.insecure and not args.no_auth:
        raise SystemExit("SuperNode authentication needs TLS: pass --certs DIR, or --insecure together with --no-auth")
    cmd = superlink_command(args.port, args.host, None if args.insecure else args.certs, auth=not args.no_auth, database=args.database)
    log.info("%s", " ".join(cmd))
    reap_children()  # kept across exec: the SuperLink's app processes are reaped, not left as zombies
    os.execvpe(cmd[0], cmd, flower_env())
    return 0  # not reached


def _flower_supernode(args) -> int:
    from flexfed.engines.flower.deploy import node_config_string, run_supernode

    if bool(args.partition) == bool(args.clients) and not args.node_config:
        raise SystemExit("give the clients this node hosts: --partition P/N or --clients ID,ID,...")
    partition = None
    if args.partition:
        pid, _, num = args.partition.partition("/")
        partition = (int(pid), int(num))
    node_config = node_config_string(args.clients.split(",") if args.clients else None, partition)
    node_config = " ".join(x for x in (node_config, args.node_config) if x)
    if args.insecure == bool(args.root_certificates):
        raise SystemExit("pass --root-certificates CA (TLS) or --insecure")
    return run_supernode(args.superlink, node_config, port=args.port, root_certificates=args.root_certificates, auth_key=args.auth_key,
                         isolation=args.isolation)


def _flower_connect(args) -> int:
    from flexfed.engines.flower.deploy import write_connection

    if args.insecure == bool(args.root_certificates):
        raise SystemExit("pass --root-certificates CA (TLS) or --insecure")
    path = write_connection(args.name, args.address, args.root_certificates, default=args.default)
    log.info("SuperLink connection %r written to %s", args.name, path)
    return 0


def _add_flower_parser(sub) -> None:
    flower = sub.add_parser("flower", help="deploy on Flower: certificates, the Flower App, SuperLink and SuperNode")
    fsub = flower.add_subparsers(dest="flower_command", required=True)

    certs = fsub.add_parser("certs", help="development CA, SuperLink TLS certificate and SuperNode authentication keys")
    certs.add_argument("dir")
    certs.add_argument("--host", action="append", default=[], help="a name or IP address the SuperLink is reached at (repeat; localhost is always added)")
    certs.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to write (default 3)")
    certs.add_argument("--days", type=int, default=365)
    certs.set_defaults(func=_flower_certs)

    app = fsub.add_parser("app", help="write the Flower App (pyproject.toml with the resolved config) that `flwr run` submits")
    app.add_argument("dir")
    app.add_argument("--config", "-c", help="YAML config file, or the name of a packaged config")
    app.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    app.add_argument("--resume", action="store_true", help="continue the run directory on the SuperLink's machine")
    app.add_argument("--overwrite", action="store_true", help="replace the run directory on the SuperLink's machine")
    app.set_defaults(func=_flower_app)

    link = fsub.add_parser("superlink", help="start flower-superlink with TLS and SuperNode authentication")
    link.add_argument("--certs", help="directory written by `flexfed flower certs`")
    link.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, as flower-superlink; 0.0.0.0 for SuperNodes on other machines)")
    link.add_argument("--port", type=int, default=9092)
    link.add_argument("--database", help="SQLite file for the SuperLink's state (default: in memory)")
    link.add_argument("--no-auth", action="store_true", help="accept any SuperNode (no authentication)")
    link.add_argument("--insecure", action="store_true", help="no TLS (loopback experiments only)")
    link.set_defaults(func=_flower_superlink)

    node = fsub.add_parser("supernode", help="start a SuperNode with a resident ClientApp process that keeps the model loaded")
    node.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    node.add_argument("--partition", metavar="P/N", help="host every client whose index is P modulo N")
    node.add_argument("--clients", metavar="ID,...", help="host exactly these client ids")
    node.add_argument("--node-config", default="", help='more node config, e.g. \'data-path="/data/ni" device="cuda:0"\'')
    node.add_argument("--root-certificates", help="the CA certificate (ca.crt) that signed the SuperLink's")
    node.add_argument("--auth-key", help="this node's private authentication key (supernode-K.key)")
    node.add_argument("--insecure", action="store_true", help="no TLS (loopback experiments only)")
    node.add_argument("--port", type=int, default=9094, help="the SuperNode's local runtime API port")
    node.add_argument("--isolation", choices=("process", "subprocess"), default="process",
                      help="process (default): one resident ClientApp process serves every message; subprocess: Flower starts a "
                           "ClientApp process per message, relaying to a trainer worker (for nodes that also run other Flower apps)")
    node.set_defaults(func=_flower_supernode)

    conn = fsub.add_parser("connect", help="add a SuperLink connection to Flower's config.toml for `flwr run`")
    conn.add_argument("name")
    conn.add_argument("address", help="HOST:PORT of the SuperLink")
    conn.add_argument("--root-certificates", help="the CA certificate (ca.crt)")
    conn.add_argument("--insecure", action="store_true")
    conn.add_argument("--default", action="store_true", help="make it the default connection")
    conn.set_defaults(func=_flower_connect)


def _add_sweep_execution(parser) -> None:
    """How a sweep's runs execute; shared by `sweep` and `compare`."""
    parser.add_argument("--jobs", "-j", type=int, default=1, help="runs at a time; above 1 each runs in its own process (default 1)")
    parser.add_argument("--threads-per-job", type=int, help="torch/OpenMP threads of each run (default: cores / jobs)")
    parser.add_argument("--dry-run", action="store_true", help="validate every run's config and list the runs; run nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexfed", description="Federated LoRA fine-tuning of LLMs with heterogeneous ranks")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federation (with no config: the quickstart)")
    run.add_argument("--config", "-c", help="YAML config file, or the name of a packaged config (quickstart, ...)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. training.lr=1e-4")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    run.add_argument("--engine", default="simulation", choices=["simulation", "flower-sim"])
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=_run)

    sweep = sub.add_parser("sweep", help="runs over a grid of settings and seeds, then one table of mean ± std and paired differences",
                           description="Expand a base config over a grid and seeds into runs (SWEEP_DIR/runs/<cell>_seed<N>), skip finished runs, "
                           "resume interrupted ones, and write results.md/.csv/.json and curves-*.png into SWEEP_DIR.")
    sweep.add_argument("file", nargs="?", help="a sweep YAML file (base, set, grid, include, seeds, baseline, out)")
    sweep.add_argument("--config", "-c", help="base config (packaged name or YAML file) for a sweep given on the command line")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="one grid axis (repeat for more)")
    sweep.add_argument("--seeds", metavar="S1,S2", help="comma-separated seeds (default 0)")
    sweep.add_argument("--baseline", metavar="KEY=VALUE", help="paired differences against the cells with this setting, e.g. federation.method=fedit")
    sweep.add_argument("--out", help="the sweep directory (alone: continue the sweep it holds)")
    _add_sweep_execution(sweep)
    sweep.set_defaults(func=_sweep)

    cmp = sub.add_parser("compare", help="every family (weights, KD, split, zeroth-order) on the same tasks and seeds at a matched client budget",
                         description="Run a comparison (a sweep over named settings, SWEEP_DIR/runs/setting-<name>_seed<N>) and write "
                         "SWEEP_DIR/comparison/: the table of accuracy, bytes, client FLOPs and memory, Pareto plots, the measured bytes "
                         "checked against the formulas, and the scaling view at 1.3B and 7B shapes.")
    cmp.add_argument("file", nargs="?", help="a comparison file or packaged name (compare, compare-p3), or a run config: the default settings on it")
    cmp.add_argument("--budget", choices=("steps", "flops", "time"), help="matched per client per round to the reference setting (default: the file's)")
    cmp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    cmp.add_argument("--seeds", metavar="S1,S2", help="comma-separated seeds (default: the file's)")
    cmp.add_argument("--out", help="the comparison directory (alone: continue the comparison it holds)")
    _add_sweep_execution(cmp)
    cmp.set_defaults(func=_compare)

    report = sub.add_parser("report", help="plots and a Markdown summary of one run, a comparison of several, or a sweep's table")
    report.add_argument("run_dirs", nargs="+")
    report.add_argument("--out", help="output directory (required for several runs)")
    report.set_defaults(func=_report)

    res = sub.add_parser("resources", help="estimated training memory of each rank type for a config's model and batch")
    res.add_argument("--config", "-c", help="YAML config file, or the name of a packaged config")
    res.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    res.set_defaults(func=_resources)

    agg = sub.add_parser("aggregate", help="aggregate saved PEFT LoRA adapters of any ranks into one")
    agg.add_argument("adapters", nargs="+", help="PEFT adapter directories")
    agg.add_argument("--method", default="flexlora")
    agg.add_argument("--weights", help="comma-separated client weights (default: equal)")
    agg.add_argument("--rank", required=True, help="output rank, or several comma-separated (OUT/rank-R each)")
    agg.add_argument("--out", required=True)
    agg.set_defaults(func=_aggregate)

    _add_flower_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
    )
    for noisy in ("httpx", "urllib3", "transformers", "peft", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    from flexfed.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    except Exception as err:  # noqa: BLE001 - the run-exists and similar user errors
        if type(err).__name__ == "RunExists":
            log.error("%s", err)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
