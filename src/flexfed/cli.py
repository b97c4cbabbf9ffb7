"""``flexfed run | report | aggregate``."""

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
    if args.engine != "simulation":
        raise SystemExit(f"engine {args.engine!r} is not available yet; use --engine simulation")
    run_dir = simulation.run(config, resume=bool(args.resume), overwrite=args.overwrite, show_progress=not args.quiet)
    report_dir = write_report([run_dir])
    print_summary([run_dir])
    log.info("run directory: %s (report: %s)", run_dir, report_dir / "summary.md")
    return 0


def _report(args) -> int:
    from flexfed.report import print_summary, write_report

    dirs = [Path(d) for d in args.run_dirs]
    out = write_report(dirs, Path(args.out) if args.out else None)
    print_summary(dirs)
    log.info("report written to %s", out)
    return 0


def _aggregate(args) -> int:
    from flexfed.merge import merge_adapters

    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    ranks = [int(r) for r in args.rank.split(",")]
    written = merge_adapters(args.adapters, method=args.method, weights=weights, ranks=ranks, out=Path(args.out))
    for path in written:
        log.info("wrote %s", path)
    return 0


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

    report = sub.add_parser("report", help="plots and a Markdown summary of one run, or a comparison of several")
    report.add_argument("run_dirs", nargs="+")
    report.add_argument("--out", help="output directory (required for several runs)")
    report.set_defaults(func=_report)

    agg = sub.add_parser("aggregate", help="aggregate saved PEFT LoRA adapters of any ranks into one")
    agg.add_argument("adapters", nargs="+", help="PEFT adapter directories")
    agg.add_argument("--method", default="flexlora")
    agg.add_argument("--weights", help="comma-separated client weights (default: equal)")
    agg.add_argument("--rank", required=True, help="output rank, or several comma-separated (OUT/rank-R each)")
    agg.add_argument("--out", required=True)
    agg.set_defaults(func=_aggregate)
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
