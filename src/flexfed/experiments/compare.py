"""``flexfed compare``: the families of federated LLM tuning on the same tasks, clients, model and
seeds, at a matched client budget, and the trade-off between accuracy, bytes and client cost.

A comparison file (YAML; packaged ones in ``configs/compare/``)::

    base: quickstart              # the run config every setting starts from
    out: runs/compare
    set: {federation.rounds: 2}   # overrides for every run
    settings:                     # name -> overrides: one per family and setting compared
      fedit: {federation.method: fedit}
      split-l2: {federation.method: split, split.cut_layer: 2}
    reference: fedit              # the setting whose client budget the others are matched to
    budget: steps                 # steps | flops | time, per client per round
    seeds: [0, 1]

It runs as a sweep with one named axis, ``setting`` (``experiments.sweep``: finished runs are
skipped, interrupted ones resumed, ``--jobs`` applies), and the sweep's table of mean ± std and
paired differences against the reference is written as for any sweep. On top, in
``SWEEP_DIR/comparison/``: the per-setting table of accuracy, bytes, client FLOPs, client memory,
server and wall time; Pareto plots of accuracy against bytes, client FLOPs and client memory with
the frontier marked; accuracy against cumulative bytes; every client's measured bytes checked
against the formulas (``formulas.check_run``); and the scaling view of the same workloads at
1.3B and 7B LLaMA shapes.

The budget:

* ``steps``: every setting trains ``training.local_steps`` steps per client per round (its own,
  where a setting sets one: FedKSeed's batch is 1 example, so a step is cheaper).
* ``flops`` / ``time``: a calibration runs every setting for one round without evaluation at S
  and 2S local steps and fits each client's cost per round, counted FLOPs or training seconds,
  as a + b·steps (KD's proxy scoring is the fixed part a); each setting then trains
  round((C_ref - a)/b) steps, C_ref being the reference's cost at its own steps. The fit and the
  steps are kept in ``SWEEP_DIR/compare.yaml``: a rerun uses them, so the same file and seeds give
  the same runs. Seconds depend on the machine and its load; FLOPs do not.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
import yaml

from flexfed.config import ConfigError, builtin_config_path, load_config
from flexfed.experiments import formulas, results
from flexfed.experiments.stats import mean, sample_std
from flexfed.experiments.sweep import RESERVED, RunSpec, Sweep, _overrides, execute, prepare
from flexfed.report import finite_or_none, human_bytes, read_metrics

log = logging.getLogger(__name__)

AXIS = "setting"
STATE = "compare.yaml"
OUT = "comparison"
BUDGETS = ("steps", "flops", "time")
COST_KEY = {"flops": "flops", "time": "seconds"}


@dataclass
class Comparison:
    base: str
    settings: dict[str, dict[str, str]]
    reference: str
    budget: str = "steps"
    overrides: dict[str, str] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    out: str | None = None
    calibration: dict[str, dict] = field(default_factory=dict)  # setting -> {a, b, steps, ...}

    @classmethod
    def from_dict(cls, raw: dict, relative_to: Path | None = None) -> Comparison:
        where = "comparison"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping with base, settings, reference, budget, seeds")
        unknown = set(raw) - {"base", "out", "set", "settings", "reference", "budget", "seeds", "calibration"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (base, out, set, settings, reference, budget, seeds)")
        base = str(raw.get("base") or "quickstart")
        if relative_to is not None and not builtin_config_path(base).exists() and not Path(base).is_absolute():
            candidate = relative_to / base
            base = str(candidate) if candidate.exists() else base
        settings = raw.get("settings")
        if not isinstance(settings, dict) or not settings:
            raise ConfigError(f"{where}.settings: expected a mapping of setting names to overrides, got {settings!r}")
        parsed = {str(name): _overrides(sets or {}, f"{where}.settings.{name}") for name, sets in settings.items()}
        reference = str(raw.get("reference") or next(iter(parsed)))
        if reference not in parsed:
            raise ConfigError(f"{where}.reference: {reference!r} is not one of the settings {sorted(parsed)}")
        budget = str(raw.get("budget") or "steps")
        if budget not in BUDGETS:
            raise ConfigError(f"{where}.budget: {budget!r}; expected one of {', '.join(BUDGETS)}")
        seeds = raw.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise ConfigError(f"{where}.seeds: expected a list of integers, got {seeds!r}")
        overrides = _overrides(raw.get("set") or {}, f"{where}.set")
        for key in RESERVED:
            if key in overrides:
                raise ConfigError(f"{where}.set: {key!r} is set by the comparison for each run")
        return cls(base, parsed, reference, budget, overrides, list(seeds), raw.get("out"), dict(raw.get("calibration") or {}))

    @classmethod
    def load(cls, path: str | Path) -> Comparison:
        path = Path(path)
        if not path.is_file():
            packaged = builtin_config_path(f"compare/{path}")
            if not packaged.exists():
                raise ConfigError(f"comparison file {str(path)!r} not found (a YAML file or a packaged comparison: {', '.join(packaged_names())})")
            path = packaged
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if isinstance(raw, dict) and "settings" not in raw:  # a run config: the default settings on it
            preset = yaml.safe_load(builtin_config_path("compare/compare").read_text())
            raw = {**preset, "base": str(path), "out": None}
        return cls.from_dict(raw, path.parent)

    def to_dict(self) -> dict:
        from flexfed.experiments.sweep import _value

        out = {"base": self.base, "set": {k: _value(v) for k, v in self.overrides.items()},
               "settings": {n: {k: _value(v) for k, v in s.items()} for n, s in self.settings.items()},
               "reference": self.reference, "budget": self.budget, "seeds": self.seeds}
        if self.calibration:
            out["calibration"] = self.calibration
        return out

    def sweep(self) -> Sweep:
        """The sweep the comparison runs: one named axis over the settings, budget steps included."""
        raw = self.to_dict()
        for name in raw["settings"]:
            steps = self.calibration.get(name, {}).get("steps")
            if steps:
                raw["settings"][name].update({"training.local_steps": steps, "training.local_epochs": None})
        return Sweep.from_dict({"base": self.base, "set": raw["set"], "grid": {AXIS: raw["settings"]}, "seeds": self.seeds,
                                "baseline": f"{AXIS}={self.reference}"})


def packaged_names() -> list[str]:
    return sorted(p.stem for p in builtin_config_path("compare/compare").parent.glob("*.yaml"))


# ---------------------------------------------------------------------------- the budget


def _client_cost(rows: list[dict], key: str) -> float:
    values = [c[key] for r in rows for c in r.get("clients", []) if c.get(key) is not None]
    if not values:
        raise ConfigError(f"calibration: the run recorded no client {key!r}")
    return sum(values) / len(values)


def calibrate(comparison: Comparison, sweep_dir: Path, threads: int | None = None) -> None:
    """Fit every setting's client cost per round at S and 2S steps; set each one's steps to the budget."""
    from flexfed.experiments.sweep import _in_process, default_threads

    if comparison.budget == "steps" or comparison.calibration:
        return
    key = COST_KEY[comparison.budget]
    root = Path(sweep_dir) / "calibration"
    # one round; evaluation cut to the least a run allows (it always evaluates rounds 0 and last)
    probe = {"federation.rounds": "1", "eval.seen_examples": "1", "eval.seen_examples_per_task": "1", "eval.unseen_examples": "1",
             "eval.validation_examples": "0", "eval.max_new_tokens": "1", "training.local_epochs": "null"}
    fits = {}
    for name, sets in comparison.settings.items():
        merged = {**comparison.overrides, **sets}
        config = load_config(comparison.base, [f"{k}={v}" for k, v in merged.items()])
        s = config.training.local_steps or 1
        costs = []
        for steps in (s, 2 * s):
            run = f"{name}-steps{steps}"
            argv = ["run", "--config", comparison.base, *[x for k, v in {**merged, **probe, "training.local_steps": str(steps)}.items() for x in ("--set", f"{k}={v}")],
                    "--set", f"seed={comparison.seeds[0]}", "--set", f"name={run}", "--set", f"output_dir={root}", "--quiet", "--overwrite"]
            log.info("calibration: %s at %d local steps", name, steps)
            root.mkdir(parents=True, exist_ok=True)
            if _in_process(argv, threads or default_threads(1), root / f"{run}.log") != 0:
                raise ConfigError(f"calibration run {root / run} failed; see {root / run}.log")
            costs.append(_client_cost(read_metrics(root / run), key))
        b = (costs[1] - costs[0]) / s
        fits[name] = {"steps_probed": [s, 2 * s], key: costs, "per_step": b, "fixed": costs[0] - b * s, "configured_steps": s}
    ref = fits[comparison.reference]
    target = ref["fixed"] + ref["per_step"] * ref["configured_steps"]
    for name, fit in fits.items():
        steps = (target - fit["fixed"]) / fit["per_step"] if fit["per_step"] > 0 else fit["configured_steps"]
        fit["steps"] = max(1, int(round(steps)))
        if steps < 1:
            fit["note"] = "its fixed cost alone exceeds the reference's budget: 1 step"
        fit["budget"] = target
    comparison.calibration = fits


# ---------------------------------------------------------------------------- running


def run_comparison(comparison: Comparison, sweep_dir: Path, jobs: int = 1, threads_per_job: int | None = None,
                   show_progress: bool = True, dry_run: bool = False) -> dict | None:
    sweep_dir = Path(sweep_dir)
    state = sweep_dir / STATE
    if state.is_file():
        saved = Comparison.from_dict(yaml.safe_load(state.read_text()))
        mine = {k: v for k, v in comparison.to_dict().items() if k != "calibration"}
        if {k: v for k, v in saved.to_dict().items() if k != "calibration"} != mine:
            raise ConfigError(f"{sweep_dir} holds a different comparison ({state}); continue it with `flexfed compare --out {sweep_dir}` alone, or choose another --out")
        comparison.calibration = saved.calibration
    sweep = comparison.sweep()
    specs = sweep.runs(sweep_dir)  # every config validated before anything runs
    if dry_run:
        return None
    sweep_dir.mkdir(parents=True, exist_ok=True)
    calibrate(comparison, sweep_dir, threads_per_job)
    state.write_text(yaml.safe_dump(comparison.to_dict(), sort_keys=False))
    sweep = comparison.sweep()
    specs = prepare(sweep, sweep_dir)
    outcomes = execute(sweep, specs, sweep_dir, jobs, threads_per_job, show_progress)
    failed = [o for o in outcomes if o.returncode != 0]
    results.write_results(sweep, specs, sweep_dir)
    result = write_comparison(comparison, specs, sweep_dir)
    result["failed"] = [o.spec.run_dir.name for o in failed]
    return result


# ---------------------------------------------------------------------------- the report


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (cost no higher and accuracy no lower, one
    of them strictly), in order of cost."""
    front = []
    for i, (c, a) in enumerate(points):
        dominated = any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _stat(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    return {"mean": mean(xs) if xs else None, "std": sample_std(xs) if len(xs) > 1 else None, "n": len(xs)}


def run_summary(rows: list[dict]) -> dict:
    """One run's numbers: accuracy at the last round, bytes, client cost, server and wall time."""
    last = rows[-1]
    trained = [r for r in rows if r["round"] > 0]
    clients = [c for r in trained for c in r.get("clients", [])]
    per_client = lambda key: [c[key] for c in clients if c.get(key) is not None]  # noqa: E731
    total = lambda key: float(sum(finite_or_none(r.get(key)) or 0 for r in trained))  # noqa: E731
    up, down = total("bytes_up"), total("bytes_down")
    n_rounds = max(len(trained), 1)
    client_rounds = max(len(clients), 1)
    cumulative, acc = [], 0.0
    for r in rows:
        acc += (finite_or_none(r.get("bytes_up")) or 0) + (finite_or_none(r.get("bytes_down")) or 0)
        cumulative.append((acc, finite_or_none(r.get("rouge_l_unseen"))))
    return {
        "rouge_l_unseen": finite_or_none(last.get("rouge_l_unseen")), "rouge_l_seen": finite_or_none(last.get("rouge_l_seen")),
        "eval_loss_unseen": finite_or_none(last.get("eval_loss_unseen")), "train_loss": finite_or_none(last.get("train_loss")),
        "bytes_up": up, "bytes_down": down, "bytes_per_round": (up + down) / n_rounds,
        "bytes_per_client_round": (up + down) / client_rounds,
        "client_flops_per_round": mean(per_client("flops")) if per_client("flops") else None,
        "client_memory": max(per_client("peak_memory_bytes")) if per_client("peak_memory_bytes") else None,
        "server_s_per_round": total("time_aggregate_s") / n_rounds,
        "wall_s": sum(finite_or_none(r.get("time_round_s")) or finite_or_none(r.get("time_eval_s")) or 0.0 for r in rows),
        "cumulative": cumulative,
    }


METRICS = ("rouge_l_unseen", "rouge_l_seen", "eval_loss_unseen", "bytes_up", "bytes_down", "bytes_per_round", "bytes_per_client_round",
           "client_flops_per_round", "client_memory", "server_s_per_round", "wall_s")


def collect(specs: list[RunSpec]) -> dict[str, dict]:
    """setting -> {config, runs: {seed: rows}} for every finished run."""
    spec_of = {s.cell.name: s for s in specs}
    return {spec_of[cell].cell.values[AXIS]: {"config": spec_of[cell].config, "runs": runs} for cell, runs in results.collect(specs).items()}


def build_comparison(comparison: Comparison, specs: list[RunSpec]) -> dict:
    from flexfed.models import load_skeleton

    found = collect(specs)
    shapes: dict[str, formulas.ModelShape] = {}
    table, scaling = [], []
    for name in comparison.settings:
        if name not in found:
            continue
        config, runs = found[name]["config"], found[name]["runs"]
        if config.model.name not in shapes:
            shapes[config.model.name] = formulas.ModelShape.of(load_skeleton(config.model.name), config.model.name)
        shape = shapes[config.model.name]
        summaries = {seed: run_summary(rows) for seed, rows in runs.items()}
        checks = [formulas.check_run(config, shape, rows) for rows in runs.values()]
        ratio = lambda key: mean([c[key] for c in checks if c[key] is not None]) if any(c[key] is not None for c in checks) else None  # noqa: E731
        row = {"setting": name, "method": config.federation.method, "family": formulas.family(config.federation.method),
               "seeds": sorted(runs), **{m: _stat([s[m] for s in summaries.values()]) for m in METRICS},
               "local_steps": config.training.local_steps,
               "formula_checked": sum(c["checked"] for c in checks), "formula_mismatches": [m for c in checks for m in c["mismatches"]],
               "flops_over_spec": ratio("flops_over_spec"), "flops_over_analytic": ratio("flops_over_analytic"),
               "cumulative": {seed: s["cumulative"] for seed, s in summaries.items()}}
        if comparison.calibration.get(name):
            row["calibration"] = comparison.calibration[name]
        table.append(row)
        first = runs[min(runs)]
        try:
            typical_row, typical = formulas.typical_client(first)
        except ValueError as err:
            log.warning("scaling view: %s: %s", name, err)
            continue
        for n, scale in formulas.SCALES.items():
            if n not in shapes:  # built once: a 7B model on the meta device still takes a moment
                shapes[n] = formulas.meta_shape(n, scale)
        big = [shape] + [shapes[n] for n in formulas.SCALES]
        measured = {"bytes_up": typical.get("bytes_up"), "bytes_down": typical.get("bytes_down"), "client_flops": typical.get("flops"),
                    "client_memory": typical.get("peak_memory_bytes")}
        scaling.append({"setting": name, "family": row["family"], "measured": measured, "rows": formulas.scale_rows(config, big, typical_row, typical)})
    return {"base": comparison.base, "budget": comparison.budget, "reference": comparison.reference, "seeds": comparison.seeds,
            "settings": table, "scaling": scaling}


def _fmt_stat(stat: dict, fmt) -> str:
    if stat["mean"] is None:
        return "—"
    text = fmt(stat["mean"])
    return f"{text} ± {fmt(stat['std'])}" if stat["std"] is not None else text


def _gflop(v: float | None) -> str:
    return "—" if v is None else f"{v / 1e9:,.1f}"


def markdown(result: dict, plots: list[str]) -> str:
    three = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"# Comparison: {result['base']}, budget `{result['budget']}` matched to `{result['reference']}`, seeds {result['seeds']}", "",
             "Mean ± std over seeds; accuracy at the last round; bytes summed over the rounds; client FLOPs per client per round "
             "(counted); client memory: the largest client's peak (estimated on a CPU); server: aggregation time per round.", "",
             "| setting | family | steps | Rouge-L unseen | Rouge-L seen | loss unseen | bytes up | bytes down | per client-round | client GFLOP/round | client memory | server s/round | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["settings"]:
        steps = "—" if r["local_steps"] is None else f"{r['local_steps']:g}"
        lines.append(f"| {r['setting']} | {r['family']} | {steps} | {_fmt_stat(r['rouge_l_unseen'], three)} | "
                     f"{_fmt_stat(r['rouge_l_seen'], three)} | {_fmt_stat(r['eval_loss_unseen'], three)} | {_fmt_stat(r['bytes_up'], human_bytes)} | "
                     f"{_fmt_stat(r['bytes_down'], human_bytes)} | {_fmt_stat(r['bytes_per_client_round'], human_bytes)} | "
                     f"{_fmt_stat(r['client_flops_per_round'], _gflop)} | {_fmt_stat(r['client_memory'], human_bytes)} | "
                     f"{_fmt_stat(r['server_s_per_round'], lambda v: f'{v:.2f}')} | {_fmt_stat(r['wall_s'], lambda v: f'{v:.0f} s')} |")
    lines += ["", "## Measured against the formulas (SPEC §9, `flexfed.experiments.formulas`)", "",
              "Bytes: every client-round's measured up/down bytes against the formula for what it did; any difference is listed. "
              "FLOPs: counted over the formula the protocol records (exact, attention and head included), and over SPEC's approximation 4·P_client·S·B·T.", "",
              "| setting | client-rounds checked | byte mismatches | counted / exact formula | counted / SPEC ≈ |", "|---|---|---|---|---|"]
    for r in result["settings"]:
        lines.append(f"| {r['setting']} | {r['formula_checked']} | {len(r['formula_mismatches']) or 'none'} | {three(r['flops_over_analytic'])} | {three(r['flops_over_spec'])} |")
    bad = [(r["setting"], m) for r in result["settings"] for m in r["formula_mismatches"]]
    if bad:
        lines += ["", "**Mismatches (a bug to fix):**", ""] + [f"- {s}: round {m['round']} client {m['client']}: measured {m['measured']}, formula {m['formula']}" for s, m in bad[:20]]
    calibrated = [r for r in result["settings"] if r.get("calibration")]
    if calibrated:
        unit = "GFLOP" if result["budget"] == "flops" else "s"
        div = 1e9 if result["budget"] == "flops" else 1.0
        lines += ["", f"## Budget calibration ({result['budget']} per client per round = fixed + per step × steps)", "",
                  f"| setting | fixed ({unit}) | per step ({unit}) | steps | note |", "|---|---|---|---|---|"]
        for r in calibrated:
            c = r["calibration"]
            lines.append(f"| {r['setting']} | {c['fixed'] / div:.3g} | {c['per_step'] / div:.3g} | {c['steps']} | {c.get('note', '')} |")
    if result["scaling"]:
        lines += ["", "## Scaling: the median client-round's workload at larger models (formulas)", "",
                  "Bytes are exact formulas; FLOPs SPEC's approximation (correct by the counted / SPEC ratio above); memory the "
                  "`resources.TrainingMemory` estimate of the client's part for the config's largest batch.", "",
                  "| setting | model | params | bytes up | bytes down | client GFLOP | client memory |", "|---|---|---|---|---|---|---|"]
        for s in result["scaling"]:
            for r in s["rows"]:
                b = lambda v: "—" if v is None else human_bytes(v)  # noqa: E731
                lines.append(f"| {s['setting']} | {r['model']} | {r['params'] / 1e6:,.0f} M | {b(r['bytes_up'])} | {b(r['bytes_down'])} | {_gflop(r['client_flops'])} | {b(r['client_memory'])} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def plot_pareto(result: dict, path: Path) -> None:
    """Accuracy against bytes, client FLOPs and client memory; the frontier as a step line."""
    import matplotlib as mpl
    from matplotlib.figure import Figure

    rows = [r for r in result["settings"] if r["rouge_l_unseen"]["mean"] is not None]
    axes_spec = [("bytes_per_client_round", "bytes per client per round (up + down)"), ("client_flops_per_round", "client FLOPs per round"),
                 ("client_memory", "client peak memory (bytes)")]
    palette = mpl.colormaps["tab10"]
    families = list(dict.fromkeys(r["family"] for r in rows))
    fig = Figure(figsize=(15, 4.8), dpi=120, layout="constrained")
    for ax, (key, label) in zip(fig.subplots(1, 3), axes_spec):
        pts = [(r[key]["mean"], r["rouge_l_unseen"]["mean"], r) for r in rows if r[key]["mean"]]
        for x, y, r in pts:
            ax.errorbar(x, y, yerr=r["rouge_l_unseen"]["std"] or 0, fmt="o", ms=6, capsize=3, color=palette(families.index(r["family"]) % 10),
                        label=r["family"])
            ax.annotate(r["setting"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        front = pareto_front([(x, y) for x, y, _ in pts])
        if front:
            fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
            ax.step(fx, fy, where="post", color="black", lw=1, alpha=0.6, label="Pareto frontier")
            ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="black", lw=1)
        ax.set(xscale="log", xlabel=label, ylabel="Rouge-L unseen (last round)")
        ax.grid(True, alpha=0.3, which="both")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize="x-small")
    fig.suptitle(f"Accuracy against cost, budget: {result['budget']} (mean ± std over seeds {result['seeds']}; frontier circled)", fontweight="bold")
    fig.savefig(path)


def plot_accuracy_vs_bytes(result: dict, path: Path) -> None:
    import matplotlib as mpl
    from matplotlib.figure import Figure

    palette = mpl.colormaps["tab10" if len(result["settings"]) <= 10 else "tab20"]
    fig = Figure(figsize=(8, 5), dpi=120, layout="constrained")
    ax = fig.subplots()
    for i, r in enumerate(result["settings"]):
        curves = list(r["cumulative"].values())
        rounds = min(len(c) for c in curves)
        xs = [mean([c[k][0] for c in curves]) for k in range(rounds)]
        ys = [mean([c[k][1] for c in curves if c[k][1] is not None]) if any(c[k][1] is not None for c in curves) else None for k in range(rounds)]
        pts = [(max(x, 1.0), y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3.5, color=palette(i % palette.N), label=r["setting"])
    ax.set(xscale="log", xlabel="cumulative bytes, all clients, up + down (round 0 at 1 B)", ylabel="Rouge-L unseen")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize="x-small")
    ax.set_title("Accuracy against cumulative traffic (mean over seeds)", fontweight="bold")
    fig.savefig(path)


def plot_scaling(result: dict, path: Path) -> None:
    import matplotlib as mpl
    from matplotlib.figure import Figure

    palette = mpl.colormaps["tab10" if len(result["scaling"]) <= 10 else "tab20"]
    fig = Figure(figsize=(15, 4.8), dpi=120, layout="constrained")
    specs = [("bytes", "bytes per client per round (up + down)"), ("client_flops", "client FLOPs per round (SPEC ≈)"), ("client_memory", "client memory (estimate)")]
    for ax, (key, label) in zip(fig.subplots(1, 3), specs):
        for i, s in enumerate(result["scaling"]):
            xs = [r["params"] for r in s["rows"]]
            ys = [((r["bytes_up"] or 0) + (r["bytes_down"] or 0)) if key == "bytes" else r[key] for r in s["rows"]]
            ax.plot(xs, ys, marker="o", color=palette(i % palette.N), label=s["setting"])
        ax.set(xscale="log", yscale="log", xlabel="model parameters", ylabel=label)
        ax.grid(True, alpha=0.3, which="both")
    fig.axes[0].legend(fontsize="x-small")
    fig.suptitle("Scaling: each setting's measured workload at SmolLM2-135M, LLaMA-1.3B and LLaMA-7B shapes", fontweight="bold")
    fig.savefig(path)


def write_comparison(comparison: Comparison, specs: list[RunSpec], sweep_dir: Path) -> dict:
    out = Path(sweep_dir) / OUT
    out.mkdir(parents=True, exist_ok=True)
    result = build_comparison(comparison, specs)
    plots = []
    if result["settings"]:
        for name, plot in (("pareto.png", plot_pareto), ("accuracy-vs-bytes.png", plot_accuracy_vs_bytes), ("scaling.png", plot_scaling)):
            if name == "scaling.png" and not result["scaling"]:
                continue
            plot(result, out / name)
            plots.append(name)
    (out / "comparison.md").write_text(markdown(result, plots))
    (out / "comparison.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    result["plots"] = plots
    return result


def report_comparison(sweep_dir: str | Path) -> dict:
    """Rebuild the sweep table and the comparison of a comparison directory from its runs."""
    sweep_dir = Path(sweep_dir)
    comparison = Comparison.from_dict(yaml.safe_load((sweep_dir / STATE).read_text()))
    sweep = comparison.sweep()
    specs = sweep.runs(sweep_dir)
    results.write_results(sweep, specs, sweep_dir)
    return write_comparison(comparison, specs, sweep_dir)


def open_comparison(file: str | None, out: str | None, sets: list[str] = (), seeds: str | None = None, budget: str | None = None) -> tuple[Comparison, Path]:
    """The comparison a command line describes: a file (packaged name, comparison file or run
    config) with overrides, or ``--out`` alone to continue the one a directory holds."""
    from flexfed.experiments.sweep import parse_sets

    if file is None and out and (Path(out) / STATE).is_file():
        if sets or seeds or budget:
            raise ConfigError(f"{out} holds a comparison: continue it with --out alone, or give a comparison file to change it")
        return Comparison.from_dict(yaml.safe_load((Path(out) / STATE).read_text())), Path(out)
    file = file or "compare"  # the default settings on the quickstart
    comparison = Comparison.load(file)
    if sets:
        comparison.overrides.update(_overrides(parse_sets(list(sets)), "--set"))
    if seeds:
        comparison.seeds = [int(s) for s in str(seeds).split(",")]
    if budget:
        if budget not in BUDGETS:
            raise ConfigError(f"--budget: {budget!r}; expected one of {', '.join(BUDGETS)}")
        comparison.budget = budget
    sweep_dir = Path(out or comparison.out or f"runs/compare-{Path(file).stem}")
    return comparison, sweep_dir


def console_table(result: dict):
    from rich.table import Table

    table = Table(title=f"comparison (budget: {result['budget']})")
    for col in ("setting", "Rouge-L unseen", "bytes/client-round", "client GFLOP/round", "client memory", "formula"):
        table.add_column(col)
    for r in result["settings"]:
        m = r["rouge_l_unseen"]
        table.add_row(r["setting"], "—" if m["mean"] is None else f"{m['mean']:.3f}", _fmt_stat(r["bytes_per_client_round"], human_bytes),
                      _fmt_stat(r["client_flops_per_round"], _gflop), _fmt_stat(r["client_memory"], human_bytes),
                      "ok" if not r["formula_mismatches"] else f"{len(r['formula_mismatches'])} mismatches")
    return table
