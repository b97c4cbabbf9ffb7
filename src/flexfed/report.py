"""Run reports: plots, a Markdown summary and a JSON headline from one or more run directories.

A run directory holds ``config.yaml`` and ``metrics.jsonl`` (one JSON object per round; round 0
is the untouched base model). ``write_report([run])`` reports one run; ``write_report([a, b, c],
out)`` overlays several (e.g. FlexLoRA vs HetLoRA vs FedIT), one colour per run. Plots are drawn
on bare ``Figure`` objects, so no GUI backend or pyplot state is involved.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import yaml
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

SPLITS = ("seen", "unseen")
PLOTS = ("rouge_l.png", "loss.png", "communication.png", "clients.png")
SIZE, DPI = (11, 4.5), 120


# ---------------------------------------------------------------- reading


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl sorted by round (a repeated round keeps its last line)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file (is {run_dir} a flexfed run directory?)")
    rows = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict) or type(row.get("round")) is not int:
            raise ValueError(f"{path}:{i}: expected a JSON object with an integer 'round'")
        rows[row["round"]] = row
    return [rows[r] for r in sorted(rows)]


def _config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _get(d: dict, dotted: str):
    for key in dotted.split("."):
        d = d.get(key) if isinstance(d, dict) else None
    return d


def finite_or_none(v) -> float | None:
    """A finite number as float, else None: a diverged run's NaN is reported as missing."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _series(rows: list[dict], key: str, min_round: int = 0) -> tuple[list[int], list[float]]:
    """Rounds and values of ``key``, skipping rounds where it is null or absent."""
    pts = [(r["round"], finite_or_none(r.get(key))) for r in rows if r["round"] >= min_round]
    pts = [(x, y) for x, y in pts if y is not None]
    return [x for x, _ in pts], [y for _, y in pts]


def _registered(rows: list[dict]) -> int | None:
    """Clients in the federation, as the engine recorded at round 0 (older runs: None)."""
    return next((int(r["clients_registered"]) for r in rows if finite_or_none(r.get("clients_registered")) is not None), None)


def _rank_key(client: dict) -> str:
    """'8' for a client with one rank everywhere, '30/8' for mixed per-module ranks."""
    ranks = client.get("ranks")
    vals = sorted({int(v) for v in ranks.values()}, reverse=True) if isinstance(ranks, dict) and ranks else []
    return "/".join(map(str, vals)) if vals else "?"


def _rank_order(key: str) -> list[int]:
    return [-int(x) for x in key.split("/") if x.isdigit()]


def _labels(run_dirs: list[Path]) -> list[str]:
    names = [d.name for d in run_dirs]
    return names if len(set(names)) == len(names) else [f"{d.parent.name}/{d.name}" for d in run_dirs]


# ---------------------------------------------------------------- headline numbers


def summarize(run_dir: str | Path, name: str | None = None) -> dict:
    """Headline numbers of one run: settings, Rouge-L at round 0 vs the last evaluated round, cost."""
    run_dir = Path(run_dir)
    rows, cfg = read_metrics(run_dir), _config(run_dir)
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no rounds recorded yet")
    trained = [r for r in rows if r["round"] > 0]
    clients = [c for r in trained for c in r.get("clients") or []]
    sampled = [c for r in trained if (c := finite_or_none(r.get("clients_sampled"))) is not None]
    s = {
        "run": name or run_dir.name,
        "method": _get(cfg, "federation.method") or rows[-1].get("method"),
        "model": _get(cfg, "model.name"),
        "seed": cfg.get("seed"),
        "rounds": rows[-1]["round"],
        "rounds_planned": _get(cfg, "federation.rounds"),
        "clients": _registered(rows) or _get(cfg, "data.num_clients") or len({c["id"] for c in clients if "id" in c}) or None,
        "clients_per_round": sum(sampled) / len(sampled) if sampled else None,
        "ranks": sorted({_rank_key(c) for c in clients}, key=_rank_order),
    }
    for split in SPLITS:
        xs, ys = _series(rows, f"rouge_l_{split}")
        base = ys[0] if xs and xs[0] == 0 else None
        final = ys[-1] if xs else None
        s[f"rouge_l_{split}_round0"], s[f"rouge_l_{split}_final"] = base, final
        s[f"rouge_l_{split}_gain"] = final - base if base is not None and final is not None else None
        s[f"rouge_l_{split}_final_round"] = xs[-1] if xs else None
    s.update(_unseen_at(rows, "final", _series(rows, "rouge_l_unseen")[0][-1:]))
    s.update(best_round(rows))
    s.update(_unseen_at(rows, "at_best", [s["best_round"]] if s["best_round"] is not None else []))
    for k in ("bytes_up", "bytes_down", "tokens_trained", "time_train_s", "time_aggregate_s", "time_eval_s", "time_round_s"):
        s[k] = sum(_series(rows, k)[1])
    s["bytes_total"] = s["bytes_up"] + s["bytes_down"]
    # Client cost (runs before it was recorded: None): FLOPs per client per round, peak training memory.
    flops = [c["flops"] for c in clients if c.get("flops") is not None]
    peaks = [c["peak_memory_bytes"] for c in clients if c.get("peak_memory_bytes") is not None]
    s["client_flops_mean"] = _mean(flops)
    s["client_flops_analytic_mean"] = _mean([c["flops_analytic"] for c in clients if c.get("flops_analytic") is not None])
    s["client_peak_memory_bytes"] = max(peaks) if peaks else None
    s["client_peak_memory_source"] = next((c["peak_memory_source"] for c in clients if "peak_memory_source" in c), None)
    # Flower: a client's messages' round trips, and what of them was not its own compute
    trips = [c for c in clients if c.get("time_roundtrip_s") is not None]
    s["client_roundtrip_s_median"] = statistics.median(c["time_roundtrip_s"] for c in trips) if trips else None
    s["client_outside_s_median"] = statistics.median(c["time_outside_client_s"] for c in trips) if trips else None
    s["client_compute_s_median"] = statistics.median(c["seconds"] for c in trips) if trips else None
    apps = [c for c in trips if c.get("time_clientapp_s") is not None]  # recorded since the resident ClientApp
    s["client_clientapp_s_median"] = statistics.median(c["time_clientapp_s"] for c in apps) if apps else None
    s["client_flower_s_median"] = statistics.median(c["time_flower_s"] for c in apps) if apps else None
    # privacy: ε(δ) spent by the last recorded round (None: no privacy, or σ = 0)
    s["epsilon"] = finite_or_none(rows[-1].get("epsilon"))
    s["privacy"] = {k: _get(cfg, f"privacy.{k}") for k in ("clip_norm", "noise_multiplier", "delta", "accountant")}
    cats = [r for r in rows if isinstance(r.get("rouge_l_unseen_by_category"), dict)]
    if cats:
        first = cats[0]["rouge_l_unseen_by_category"] if cats[0]["round"] == 0 else {}
        last = cats[-1]["rouge_l_unseen_by_category"]
        s["rouge_l_unseen_by_category"] = {c: {"round0": finite_or_none(first.get(c)), "final": finite_or_none(v)} for c, v in sorted(last.items())}
    return s


def best_round(rows: list[dict]) -> dict:
    """The round with the best validation Rouge-L (the earliest of ties), never chosen on a test
    split: choosing on unseen scores would report the test set's luckiest round. Runs without a
    validation split (older runs, ``eval.validation_examples: 0``) have no best round."""
    xs, ys = _series(rows, "rouge_l_validation")
    if not xs:
        return {"best_by": None, "best_round": None, "best_rouge_l_validation": None}
    best = max(range(len(xs)), key=lambda i: (ys[i], -xs[i]))
    return {"best_by": "rouge_l_validation", "best_round": xs[best], "best_rouge_l_validation": ys[best]}


def _unseen_at(rows: list[dict], label: str, rounds: list[int]) -> dict:
    """Unseen Rouge-L, equal-weight over tasks and weighted by task size, at one round (or None)."""
    row = next((r for r in rows if rounds and r["round"] == rounds[0]), {})
    return {f"rouge_l_unseen{kind}_{label}": finite_or_none(row.get(f"rouge_l_unseen{kind}")) for kind in ("", "_weighted")}


# ---------------------------------------------------------------- formatting


def human_bytes(n: float) -> str:
    unit, div = _byte_unit(n)
    return f"{n / div:.3g} {unit}" if div > 1 else f"{int(n)} B"


def _byte_unit(n: float) -> tuple[str, float]:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return unit, div
    return "B", 1.0


def human_seconds(t: float) -> str:
    return f"{t:.1f} s" if t < 120 else f"{t / 60:.1f} min" if t < 7200 else f"{t / 3600:.2f} h"


def _f(v, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _scaled(v: float | None, factor: float) -> float | None:
    return None if v is None else v * factor


# ---------------------------------------------------------------- plots


def _figure(runs: dict[str, list[dict]], rows: int = 1, cols: int = 2, height: float = SIZE[1], **kw):
    """A grid of axes with grids on; x is the round axis: integer ticks, 0 .. last round of any run."""
    fig = Figure(figsize=(SIZE[0] + 2.5 * (cols - 2), height), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    last = max([rows_[-1]["round"] for rows_ in runs.values() if rows_] + [1])
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.set_xlim(-0.04 * last, 1.04 * last)
    return fig, axes


def _legend(ax, runs, colors, styles: dict[str, dict] | None = None):
    """One entry per run (colour) when there are several, then one per line style (``Line2D`` kwargs)."""
    handles = [Line2D([], [], color=c, lw=2, label=n) for n, c in zip(runs, colors)] if len(runs) > 1 else []
    grey = "0.35" if len(runs) > 1 else colors[0]
    handles += [Line2D([], [], color=grey, label=label, **kw) for label, kw in (styles or {}).items()]
    if handles:
        ax.legend(handles=handles, loc="best", fontsize="small", framealpha=0.85)


def _save(fig, path: Path, what: str, names: list[str]):
    fig.suptitle(f"{what} — {names[0]}" if len(names) == 1 else f"{what} — {len(names)} runs", fontweight="bold")
    for ax in fig.axes:
        if not ax.collections and not any(len(line.get_xdata()) for line in ax.lines):
            ax.text(0.5, 0.5, "nothing recorded", transform=ax.transAxes, ha="center", va="center", color="0.5")
    fig.savefig(path)


def plot_rouge_l(runs: dict[str, list[dict]], path: Path, colors: list) -> None:
    fig, axes = _figure(runs, sharey=True)
    for ax, split in zip(axes[0], SPLITS):
        for (name, rows), c in zip(runs.items(), colors):
            xs, ys = _series(rows, f"rouge_l_{split}")
            ax.plot(xs, ys, "-o", color=c, ms=4)
            if xs and xs[0] == 0:
                ax.axhline(ys[0], color=c, ls=":", lw=1, alpha=0.8)
                ax.plot(0, ys[0], "s", color=c, ms=7, mfc="white", mew=1.5)
            if split == "seen":  # validation: other held-out instances of the seen tasks
                ax.plot(*_series(rows, "rouge_l_validation"), "--^", color=c, ms=4, alpha=0.8)
            best = best_round(rows)["best_round"]
            if best is not None:
                ax.axvline(best, color=c, ls="-.", lw=1, alpha=0.6)
        ax.set(title=f"{split} tasks", xlabel="round")
    axes[0, 0].set_ylabel("Rouge-L F1 (0–1)")
    styles = {"evaluated round": dict(marker="o"), "round 0 (base model)": dict(ls=":", marker="s", mfc="white"),
              "validation (seen tasks)": dict(ls="--", marker="^"), "round chosen on validation": dict(ls="-.", lw=1)}
    _legend(axes[0, 0], list(runs), colors, styles)
    _save(fig, path, "Rouge-L per round", list(runs))


def plot_loss(runs: dict[str, list[dict]], path: Path, colors: list) -> None:
    fig, axes = _figure(runs, sharey=True)
    (tr, ev) = axes[0]
    for (name, rows), c in zip(runs.items(), colors):
        tr.plot(*_series(rows, "train_loss", 1), "-o", color=c, ms=3)
        for split, ls in zip(SPLITS, ("-", "--")):
            ev.plot(*_series(rows, f"eval_loss_{split}"), ls, marker="o", color=c, ms=4)
    tr.set(title="training loss (example-weighted mean over clients)", xlabel="round", ylabel="cross-entropy (nats/token)")
    ev.set(title="evaluation loss (round 0 = base model)", xlabel="round", ylabel="cross-entropy (nats/token)")
    _legend(tr, list(runs), colors)
    _legend(ev, list(runs), colors, {"seen tasks": dict(marker="o"), "unseen tasks": dict(ls="--", marker="o")})
    _save(fig, path, "Loss", list(runs))


def plot_communication(runs: dict[str, list[dict]], path: Path, colors: list) -> None:
    fig, axes = _figure(runs, cols=3)
    up, down, cum = axes[0]
    up.sharey(down)
    series = {n: {k: _series(rows, k, 1) for k in ("bytes_up", "bytes_down")} for n, rows in runs.items()}
    unit, div = _byte_unit(max([v for d in series.values() for _, ys in d.values() for v in ys], default=0))
    cunit, cdiv = _byte_unit(max([sum(sum(ys) for _, ys in d.values()) for d in series.values()], default=0))
    for (name, d), c in zip(series.items(), colors):
        for ax, (xs, ys) in zip((up, down), d.values()):
            ax.plot(xs, [y / div for y in ys], "-o", color=c, ms=3)
        total = {0: 0.0}
        for xs, ys in d.values():
            for x, y in zip(xs, ys):
                total[x] = total.get(x, 0.0) + y
        xs, acc = sorted(total), 0.0
        cum.plot(xs, [(acc := acc + total[x]) / cdiv for x in xs], "-o", color=c, ms=3)
    up.set(title="upload per round (clients → server)", xlabel="round", ylabel=f"{unit} per round", ylim=(0, None))
    down.set(title="download per round (server → clients)", xlabel="round", ylim=(0, None))
    cum.set(title="cumulative, upload + download", xlabel="round", ylabel=f"{cunit} in total", ylim=(0, None))
    _legend(cum, list(runs), colors)
    _save(fig, path, "Communication", list(runs))


def plot_clients(runs: dict[str, list[dict]], path: Path, rank_colors: dict[str, tuple]) -> None:
    """Per run: client loss per round and client seconds vs tokens, coloured by LoRA rank."""
    fig, axes = _figure(runs, len(runs), height=3.6 * len(runs) + 0.6, sharey="col")  # runs comparable row to row
    for (name, rows), (lo, sp) in zip(runs.items(), axes):
        clients = [(r["round"], c) for r in rows if r["round"] > 0 for c in r.get("clients") or []]
        for key, color in rank_colors.items():
            pts = [(x, c) for x, c in clients if _rank_key(c) == key]
            loss = [(x, finite_or_none(c.get("loss"))) for x, c in pts]
            speed = [(finite_or_none(c.get("tokens")), finite_or_none(c.get("seconds"))) for _, c in pts]
            for ax, xy in ((lo, loss), (sp, speed)):
                if xy := [p for p in xy if None not in p]:
                    ax.scatter(*zip(*xy), s=16, color=color, alpha=0.75, lw=0, label=f"rank {key}")
        lo.plot(*_series(rows, "train_loss", 1), "-", color="black", lw=1.5, label="example-weighted mean")
        prefix = f"{name}: " if len(runs) > 1 else ""
        lo.set(title=f"{prefix}client training loss", xlabel="round", ylabel="cross-entropy (nats/token)")
        sp.set(title=f"{prefix}client training time", xlabel="tokens trained in the round", ylabel="seconds", ylim=(0, None))
        sp.xaxis.set_major_locator(MaxNLocator())
        sp.autoscale(axis="x")
        for ax in (lo, sp):
            ax.legend(loc="best", fontsize="small", framealpha=0.85)
    _save(fig, path, "Client heterogeneity by LoRA rank", list(runs))


# ---------------------------------------------------------------- report


def _markdown(sums: list[dict], plots: list[str]) -> str:
    def table(head, body):
        return "\n".join(["| " + " | ".join(map(str, r)) + " |" for r in [head, ["---"] * len(head), *body]])

    def gain(v):
        return _f(v, "+.3f")

    def cell(d):  # one category of one run: final (gain)
        both = d and d["round0"] is not None and d["final"] is not None
        return "–" if not d else f"{_f(d['final'])} ({gain(d['final'] - d['round0'] if both else None)})"

    title = sums[0]["run"] if len(sums) == 1 else ", ".join(s["run"] for s in sums)
    out = [f"# flexfed report: {title}", "", "## Settings", ""]
    out.append(table(["run", "method", "model", "rounds", "clients", "clients/round", "ranks", "seed"], [
        [s["run"], s["method"] or "–", s["model"] or "–",
         f"{s['rounds']}" + (f" of {s['rounds_planned']}" if s["rounds_planned"] not in (None, s["rounds"]) else ""),
         s["clients"] or "–", _f(s["clients_per_round"], ".3g"), ", ".join(s["ranks"]) or "–", _f(s["seed"], "")]
        for s in sums]))
    out += ["", "## Rouge-L (round 0 = base model; final = last evaluated round)", ""]
    head = ["run", "seen r0", "seen final", "seen gain", "unseen r0", "unseen final", "unseen gain", "final round"]
    out.append(table(head, [
        [s["run"], *(x for k in SPLITS for x in (_f(s[f"rouge_l_{k}_round0"]), _f(s[f"rouge_l_{k}_final"]), gain(s[f"rouge_l_{k}_gain"]))),
         _f(s["rouge_l_unseen_final_round"], "")]
        for s in sums]))
    out += ["", "## Unseen Rouge-L at the round chosen on validation and at the last round", "",
            "Rounds are chosen on the validation split (held-out instances of seen tasks), never on unseen "
            "scores. *mean*: equal weight per unseen task; *weighted*: weighted by the tasks' numbers of "
            "examples (FlexLoRA's aggregate).", ""]
    out.append(table(["run", "best round", "validation", "unseen mean", "unseen weighted", "last round", "unseen mean", "unseen weighted"], [
        [s["run"], _f(s["best_round"], ""), _f(s["best_rouge_l_validation"]), _f(s["rouge_l_unseen_at_best"]),
         _f(s["rouge_l_unseen_weighted_at_best"]), _f(s["rouge_l_unseen_final_round"], ""), _f(s["rouge_l_unseen_final"]),
         _f(s["rouge_l_unseen_weighted_final"])]
        for s in sums]))
    out += ["", "## Cost", ""]
    out.append(table(["run", "bytes up", "bytes down", "total", "tokens trained", "train", "aggregate", "eval", "wall"], [
        [s["run"], *(human_bytes(s[k]) for k in ("bytes_up", "bytes_down", "bytes_total")), f"{s['tokens_trained']:,.0f}",
         *(human_seconds(s[k]) for k in ("time_train_s", "time_aggregate_s", "time_eval_s", "time_round_s"))] for s in sums]))
    if any(s.get("client_flops_mean") is not None for s in sums):
        out += ["", "Per client and round: FLOPs counted on a sampled step (PyTorch's flop formulas) and by formula "
                "(flexfed.cost), and the largest peak training memory of any client (*cuda_max_allocated*: CUDA's "
                "allocation high-water mark; *estimate*: resources.TrainingMemory, on a CPU).", ""]
        out.append(table(["run", "client GFLOP / round", "by formula", "client peak memory"], [
            [s["run"], _f(_scaled(s.get("client_flops_mean"), 1e-9), ".4g"), _f(_scaled(s.get("client_flops_analytic_mean"), 1e-9), ".4g"),
             "–" if s.get("client_peak_memory_bytes") is None else f"{human_bytes(s['client_peak_memory_bytes'])} ({s['client_peak_memory_source']})"]
            for s in sums]))
    flower = [s for s in sums if s.get("client_roundtrip_s_median") is not None]
    if flower:
        out += ["", "On Flower, per client and round (medians): the round trip of its messages (push to reply), its own "
                "training time on the node, the rest (outside compute), and the round trip split the other way: the "
                "ClientApp's handler on the node (training, decoding, encoding, any relay) and Flower's part (transport, "
                "the SuperNode's and ServerApp's polling, task dispatch, a ClientApp process start per message in "
                "subprocess isolation).", ""]
        out.append(table(["run", "round trip", "client compute", "outside compute", "ClientApp handler", "Flower"], [
            [s["run"], *(human_seconds(s[k]) for k in ("client_roundtrip_s_median", "client_compute_s_median", "client_outside_s_median")),
             *("–" if s.get(k) is None else human_seconds(s[k]) for k in ("client_clientapp_s_median", "client_flower_s_median"))]
            for s in flower]))
    private = [s for s in sums if (s.get("privacy") or {}).get("clip_norm") is not None]
    if private:
        out += ["", "## Privacy (client-level DP; ε from Opacus's accountant, after the last round)", ""]
        out.append(table(["run", "ε", "δ", "noise multiplier σ", "clip norm S", "accountant"], [
            [s["run"], _f(s["epsilon"], ".3g") if s["epsilon"] is not None else "∞ (σ = 0)", _f(s["privacy"]["delta"], ".3g"),
             _f(s["privacy"]["noise_multiplier"], ".3g"), _f(s["privacy"]["clip_norm"], ".3g"), s["privacy"]["accountant"]] for s in private]))
    cats = sorted({c for s in sums for c in s.get("rouge_l_unseen_by_category", {})})
    if cats:
        out += ["", "## Unseen Rouge-L by category (final, gain over round 0)", ""]
        out.append(table(["category", *(s["run"] for s in sums)],
                         [[c, *(cell(s.get("rouge_l_unseen_by_category", {}).get(c)) for s in sums)] for c in cats]))
    out += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> Path:
    """Plots, summary.md and summary.json for one run (default RUN_DIR/report) or a comparison."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    if out_dir is None:
        if len(run_dirs) > 1:
            raise ValueError("comparing several runs needs an output directory")
        out_dir = run_dirs[0] / "report"
    out_dir = Path(out_dir)
    names = _labels(run_dirs)
    sums = [summarize(d, n) for d, n in zip(run_dirs, names)]
    runs = {n: read_metrics(d) for n, d in zip(names, run_dirs)}
    out_dir.mkdir(parents=True, exist_ok=True)

    import matplotlib as mpl

    colors = [mpl.colormaps["tab10"](i % 10) for i in range(len(runs))]
    ranks = sorted({k for s in sums for k in s["ranks"]}, key=_rank_order)
    rank_colors = {k: mpl.colormaps["Dark2"](i % 8) for i, k in enumerate(ranks)}  # same rank, same colour in every run
    plots = ["rouge_l.png", "loss.png", "communication.png"]
    plot_rouge_l(runs, out_dir / plots[0], colors)
    plot_loss(runs, out_dir / plots[1], colors)
    plot_communication(runs, out_dir / plots[2], colors)
    if rank_colors:
        plots.append("clients.png")
        plot_clients(runs, out_dir / plots[3], rank_colors)
    (out_dir / "summary.md").write_text(_markdown(sums, plots))
    (out_dir / "summary.json").write_text(json.dumps({"runs": sums, "plots": plots}, indent=2) + "\n")
    return out_dir


def headline_table(sums: list[dict]):
    """The headline numbers as a ``rich`` table, one row per run; fits an 80-column terminal."""
    from rich import box
    from rich.table import Table

    t = Table(title="flexfed report", caption="Rouge-L at the last evaluated round (unseen: gain over round 0); "
              "best: the round chosen on validation and the unseen Rouge-L there", box=box.SIMPLE_HEAD, header_style="bold",
              pad_edge=False)
    names = [s["run"] if s["method"] in (None, s["run"]) else f"{s['run']} ({s['method']})" for s in sums]
    t.add_column("run", min_width=min(20, max(len(w) for n in names for w in n.split())))
    for col in ("rounds", "seen", "unseen", "best", "comm", "wall"):
        t.add_column(col, justify="right", no_wrap=True)
    for s, name in zip(sums, names):
        unseen = f"{_f(s['rouge_l_unseen_final'])} ({_f(s['rouge_l_unseen_gain'], '+.3f')})"
        best = "–" if s["best_round"] is None else f"{s['best_round']}: {_f(s['rouge_l_unseen_at_best'])}"
        t.add_row(name, str(s["rounds"]), _f(s["rouge_l_seen_final"]), unseen, best,
                  human_bytes(s["bytes_total"]), human_seconds(s["time_round_s"]))
    return t


def print_summary(run_dirs: list[str | Path], console=None) -> None:
    """Print the headline table of one or more runs (what ``flexfed report`` shows after writing)."""
    from rich.console import Console

    run_dirs = [Path(d) for d in run_dirs]
    (console or Console()).print(headline_table([summarize(d, n) for d, n in zip(run_dirs, _labels(run_dirs))]))
