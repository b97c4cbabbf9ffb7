"""A sweep's results: one table (mean ± std over seeds per cell, paired differences against a
baseline cell with a 95% t interval) as Markdown, CSV and JSON, and overlaid curves per metric.

Every number is read from the runs' ``metrics.jsonl`` through ``report.read_metrics``. Metrics a
run does not record (older runs, other evaluation settings) are left out of the table.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from flexfed.experiments.stats import mean, paired_difference, sample_std
from flexfed.experiments.sweep import RunSpec, Sweep
from flexfed.report import best_round, finite_or_none, human_bytes, human_seconds, read_metrics

log = logging.getLogger(__name__)

# Values of the last round, in table order; those no run records are skipped.
FINAL = ("rouge_l_unseen", "rouge_l_seen", "rouge_l_validation", "rouge_l_unseen_weighted",
         "eval_loss_unseen", "eval_loss_seen", "eval_loss_validation")
# Derived over all rounds.
BEST = "rouge_l_unseen_at_best_validation"  # the unseen score of the round best on validation
TOTALS = ("bytes_up", "bytes_down")
WALL = "wall_s"  # timing: differs between identical runs, so comparisons of tables leave it out
CURVES = ("rouge_l_unseen", "rouge_l_seen", "rouge_l_validation", "eval_loss_unseen", "eval_loss_seen", "train_loss")
LABELS = {
    "rouge_l_unseen": "Rouge-L unseen", "rouge_l_seen": "Rouge-L seen", "rouge_l_validation": "Rouge-L validation",
    "rouge_l_unseen_weighted": "Rouge-L unseen (weighted)", "eval_loss_unseen": "eval loss unseen",
    "eval_loss_seen": "eval loss seen", "eval_loss_validation": "eval loss validation", "train_loss": "train loss",
    BEST: "Rouge-L unseen @ best val.", "bytes_up": "bytes up", "bytes_down": "bytes down", WALL: "wall time",
}


def run_metrics(rows: list[dict]) -> dict[str, float]:
    """The final numbers of one run from its metrics rows (round 0 first, the last round last)."""
    last = rows[-1]
    out = {k: v for k in FINAL if (v := finite_or_none(last.get(k))) is not None}
    chosen = best_round(rows)["best_round"]  # on validation only, as in every run's report
    at_best = next((finite_or_none(r.get("rouge_l_unseen")) for r in rows if r["round"] == chosen), None)
    if at_best is not None:
        out[BEST] = at_best
    for k in TOTALS:
        out[k] = sum(finite_or_none(r.get(k)) or 0.0 for r in rows)
    # Round 0 has no round time, only its evaluation.
    out[WALL] = sum(finite_or_none(r.get("time_round_s")) or (finite_or_none(r.get("time_eval_s")) or 0.0) for r in rows)
    return out


def collect(specs: list[RunSpec]) -> dict[str, dict[int, list[dict]]]:
    """cell name -> seed -> metrics rows, for every finished run (unfinished ones are skipped)."""
    found: dict[str, dict[int, list[dict]]] = {}
    for spec in specs:
        try:
            rows = read_metrics(spec.run_dir)
        except FileNotFoundError:
            continue
        if not rows or rows[-1]["round"] < spec.config.federation.rounds:
            log.warning("%s is not finished; left out of the table", spec.run_dir.name)
            continue
        found.setdefault(spec.cell.name, {})[spec.seed] = rows
    return found


def build_table(sweep: Sweep, specs: list[RunSpec], runs: dict[str, dict[int, list[dict]]]) -> dict:
    """The sweep's table from ``collect``'s runs: per cell, each metric's per-seed values, mean
    and std, and the paired difference against the baseline cell (same other settings, same seed)."""
    cells = list(dict.fromkeys(s.cell.name for s in specs))
    values_of = {s.cell.name: s.cell.values for s in specs}
    per_seed = {c: {seed: run_metrics(rows) for seed, rows in runs.get(c, {}).items()} for c in cells}
    order = [*FINAL, BEST, *TOTALS, WALL]
    metrics = [m for m in order if any(m in v for c in per_seed.values() for v in c.values())]
    rows = []
    for c in cells:
        row = {"cell": c, "settings": values_of[c], "seeds": sorted(per_seed[c]), "metrics": {}}
        for m in metrics:
            by_seed = {seed: v[m] for seed, v in per_seed[c].items() if m in v}
            xs = [by_seed[s] for s in sorted(by_seed)]
            row["metrics"][m] = {"values": {str(s): by_seed[s] for s in sorted(by_seed)}, "mean": mean(xs) if xs else None, "std": sample_std(xs)}
        base = _baseline_cell(sweep, values_of[c], values_of)
        row["baseline"] = base
        if base is not None and base != c:
            row["difference"] = {}
            for m in metrics:
                a = {s: v[m] for s, v in per_seed[c].items() if m in v}
                b = {s: v[m] for s, v in per_seed[base].items() if m in v}
                diff = paired_difference(a, b)
                row["difference"][m] = diff.as_dict() if diff else None
        rows.append(row)
    return {"sweep": sweep.to_dict(), "metrics": metrics, "baseline": f"{sweep.baseline[0]}={sweep.baseline[1]}" if sweep.baseline else None, "cells": rows}


def _baseline_cell(sweep: Sweep, values: dict[str, str], values_of: dict[str, dict[str, str]]) -> str | None:
    """The cell with the baseline's option on its axis and this cell's other settings."""
    if not sweep.baseline or sweep.baseline[0] not in values:
        return None
    want = {**values, sweep.baseline[0]: sweep.baseline[1]}
    return next((c for c, v in values_of.items() if v == want), None)


# ---------------------------------------------------------------- writing


def _fmt(metric: str, v: float | None, signed: bool = False) -> str:
    if v is None:
        return "–"
    if metric in TOTALS:
        return ("+" if signed and v >= 0 else "−" if v < 0 else "") + human_bytes(abs(v))
    if metric == WALL:
        return ("+" if signed and v >= 0 else "−" if v < 0 else "") + human_seconds(abs(v))
    return format(v, "+.4f" if signed else ".4f")


def _mean_std(metric: str, stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    return _fmt(metric, stat["mean"]) + ("" if stat["std"] is None else f" ± {_fmt(metric, stat['std'])}")


def _difference(metric: str, d: dict | None) -> str:
    if d is None:
        return "–"
    text = _fmt(metric, d["mean"], signed=True)
    if d["low"] is not None:
        text += f" [{_fmt(metric, d['low'], signed=True)}, {_fmt(metric, d['high'], signed=True)}]"
    return text


def markdown(table: dict) -> str:
    metrics = table["metrics"]
    def md(head, body):
        return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|", *("| " + " | ".join(r) + " |" for r in body)]
    seeds = sorted({s for r in table["cells"] for s in r["seeds"]})
    out = ["# Sweep results", "", f"Base config `{table['sweep']['base']}`; seeds {seeds}. Each value is the mean ± "
           "sample standard deviation over seeds of the last round's value (bytes and wall time: totals over the run; "
           "wall time counts the rounds and the round-0 evaluation, not loading the model).", ""]
    out += md(["cell", "seeds", *(LABELS.get(m, m) for m in metrics)],
              [[r["cell"], str(len(r["seeds"])), *(_mean_std(m, r["metrics"][m]) for m in metrics)] for r in table["cells"]])
    diffs = [r for r in table["cells"] if r.get("difference")]
    if table["baseline"]:
        out += ["", f"## Paired differences against {table['baseline']}", "",
                "Cell minus the baseline cell with the same other settings, seed by seed: mean [95% t interval].", ""]
        out += md(["cell", "baseline", *(LABELS.get(m, m) for m in metrics)],
                  [[r["cell"], r["baseline"], *(_difference(m, r["difference"].get(m)) for m in metrics)] for r in diffs]) if diffs else ["(no cell pairs with a baseline cell)"]
    plots = table.get("plots") or []
    if plots:
        out += ["", "## Curves (mean over seeds, band ± one standard deviation)", ""] + [f"![{p[:-4]}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def write_csv(table: dict, path: Path) -> None:
    axes = list(dict.fromkeys(k for r in table["cells"] for k in r["settings"]))
    head = ["cell", *axes, "seeds"]
    for m in table["metrics"]:
        head += [f"{m}_mean", f"{m}_std"]
    if table["baseline"]:
        head.append("baseline")
        for m in table["metrics"]:
            head += [f"{m}_diff_mean", f"{m}_diff_ci_low", f"{m}_diff_ci_high"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head)
        for r in table["cells"]:
            row = [r["cell"], *(r["settings"].get(a, "") for a in axes), len(r["seeds"])]
            for m in table["metrics"]:
                row += [_cell_value(r["metrics"][m]["mean"]), _cell_value(r["metrics"][m]["std"])]
            if table["baseline"]:
                row.append(r["baseline"] or "")
                for m in table["metrics"]:
                    d = (r.get("difference") or {}).get(m)
                    row += [_cell_value(d and d["mean"]), _cell_value(d and d["low"]), _cell_value(d and d["high"])]
            w.writerow(row)


def _cell_value(v) -> str:
    return "" if v is None else repr(float(v))


def plot_curves(specs: list[RunSpec], runs: dict[str, dict[int, list[dict]]], out_dir: Path) -> list[str]:
    """One PNG per metric recorded over rounds: a line per cell (mean over seeds), band ± std.

    More than 10 cells over several axes are split into one panel per option of the first axis
    (e.g. per recipe), so each panel holds few lines and the same setting keeps its colour.
    """
    import matplotlib as mpl
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    values = {s.cell.name: s.cell.values for s in specs if s.cell.name in runs}
    cells = list(values)
    axis_names = list(dict.fromkeys(k for v in values.values() for k in v))
    split = len(cells) > 10 and len(axis_names) > 1 and all(axis_names[0] in v for v in values.values())
    panel_of = {c: values[c][axis_names[0]] if split else "" for c in cells}
    line_of = {c: " / ".join(v for k, v in values[c].items() if not split or k != axis_names[0]) or c for c in cells}
    panels = list(dict.fromkeys(panel_of.values()))
    lines = list(dict.fromkeys(line_of.values()))
    palette = mpl.colormaps["tab10" if len(lines) <= 10 else "tab20"]
    color = {name: palette(i % palette.N) for i, name in enumerate(lines)}
    style = {name: ("-", "--", ":")[(i // palette.N) % 3] for i, name in enumerate(lines)}
    short = lambda names: " / ".join(n.rsplit(".", 1)[-1] for n in names)  # noqa: E731
    written = []
    for metric in CURVES:
        series = {}
        for c in cells:
            by_round: dict[int, list[float]] = {}
            for rows in runs[c].values():
                for r in rows:
                    if (v := finite_or_none(r.get(metric))) is not None:
                        by_round.setdefault(r["round"], []).append(v)
            if by_round:
                xs = sorted(by_round)
                series[c] = (xs, [mean(by_round[x]) for x in xs], [sample_std(by_round[x]) or 0.0 for x in xs], max(len(v) for v in by_round.values()))
        if not series:
            continue
        fig = Figure(figsize=(max(8, 4.2 * len(panels) + 3), 4.8), dpi=120, layout="constrained")
        axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
        for ax, panel in zip(axes, panels):
            for c, (xs, ys, sds, _) in series.items():
                if panel_of[c] != panel:
                    continue
                ax.plot(xs, ys, style[line_of[c]], marker="o", ms=3.5, color=color[line_of[c]], label=line_of[c])
                ax.fill_between(xs, np.array(ys) - np.array(sds), np.array(ys) + np.array(sds), color=color[line_of[c]], alpha=0.15, lw=0)
            ax.set(xlabel="round", title=f"{short(axis_names[:1])} = {panel}" if split else None)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel(LABELS.get(metric, metric))
        seeds = max(v[3] for v in series.values())
        fig.suptitle(f"{LABELS.get(metric, metric)}: mean over {seeds} seed{'s' * (seeds != 1)}, band ± 1 std", fontweight="bold")
        title = short(axis_names[1:] if split else axis_names)
        legend = {}  # every line once, in cell order, whichever panel it is drawn in
        for ax in axes:
            for handle, text in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(text, handle)
        order = sorted(legend, key=lines.index)
        handles, labels = [legend[t] for t in order], order
        if len(lines) > 8 or split:
            fig.legend(handles, labels, title=title, fontsize="x-small", title_fontsize="x-small", loc="outside right upper", handlelength=3)
        else:
            axes[0].legend(handles, labels, title=title, fontsize="small", title_fontsize="small", loc="best", framealpha=0.85, handlelength=3)
        name = f"curves-{metric}.png"
        fig.savefig(out_dir / name)
        written.append(name)
    return written


def write_results(sweep: Sweep, specs: list[RunSpec], sweep_dir: Path) -> dict:
    """results.md, results.csv, results.json and curves-*.png in the sweep directory."""
    sweep_dir = Path(sweep_dir)
    runs = collect(specs)
    table = build_table(sweep, specs, runs)
    table["plots"] = plot_curves(specs, runs, sweep_dir)
    (sweep_dir / "results.md").write_text(markdown(table))
    write_csv(table, sweep_dir / "results.csv")
    (sweep_dir / "results.json").write_text(json.dumps(table, indent=2) + "\n")
    return table


def console_table(table: dict, columns: tuple[str, ...] = ("rouge_l_unseen", "rouge_l_seen", BEST, WALL)):
    """The headline of the table for an 80-column terminal (the files hold every metric)."""
    from rich import box
    from rich.table import Table

    shown = [m for m in columns if m in table["metrics"]]
    diff = "rouge_l_unseen" if table["baseline"] and "rouge_l_unseen" in table["metrics"] else None
    short = {"rouge_l_unseen": "RL unseen", "rouge_l_seen": "RL seen", BEST: "RL@val", "bytes_up": "up", WALL: "wall"}
    t = Table(title="flexfed sweep", caption="mean±std over seeds (RL: Rouge-L)" + (f"; Δ: paired difference vs {table['baseline']} [95% CI]" if diff else ""),
              box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
    t.add_column(" / ".join(dict.fromkeys(k.rsplit(".", 1)[-1] for r in table["cells"] for k in r["settings"])) or "cell", min_width=16)
    t.add_column("n", justify="right")
    for m in shown:
        t.add_column(short.get(m, m), justify="right", no_wrap=True)
    if diff:
        t.add_column("Δ RL unseen", justify="right")
    for r in table["cells"]:
        cols = [_compact(m, r["metrics"][m]) for m in shown]
        if diff:
            d = (r.get("difference") or {}).get(diff)
            cols.append("baseline" if r["baseline"] == r["cell"] else "–" if d is None else
                        f"{d['mean']:+.3f}" + ("" if d["low"] is None else f" [{d['low']:+.3f}, {d['high']:+.3f}]"))
        t.add_row(" / ".join(r["settings"].values()) or r["cell"], str(len(r["seeds"])), *cols)
    return t


def _compact(metric: str, stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    if metric in TOTALS or metric == WALL:
        return _fmt(metric, stat["mean"])
    return f"{stat['mean']:.3f}" + ("" if stat["std"] is None else f"±{stat['std']:.3f}")


def report_sweep(sweep_dir: str | Path) -> dict:
    """Rebuild a sweep directory's table and curves from its sweep.yaml and its runs."""
    from flexfed.experiments.sweep import MARKER

    sweep_dir = Path(sweep_dir)
    sweep = Sweep.load(sweep_dir / MARKER)
    return write_results(sweep, sweep.runs(sweep_dir), sweep_dir)
