"""Sweeps: one base config expanded over a grid of settings and seeds into run directories.

A sweep file (YAML)::

    base: tiny                      # a packaged config name, or a path (relative to this file)
    out: runs/my-sweep              # the sweep directory (relative to where flexfed runs; --out wins)
    set: {federation.rounds: 2}     # overrides for every run (dotted keys)
    grid:                           # the cells: the product of the axes
      federation.method: [fedit, flexlora]     # an axis over one dotted key
      regime:                                  # a named axis: each option is a set of overrides
        sgd: {training.optimizer: sgd, training.lr: 0.01}
        adamw: {training.optimizer: adamw}
    include:                        # extra cells outside the product (any axes, or new keys)
      - {federation.method: hetlora, regime: adamw}
    seeds: [0, 1, 2]
    baseline: federation.method=fedit   # paired differences against this option (optional)

expands to one run per cell and seed, ``SWEEP_DIR/runs/<cell>_seed<N>``, each run by ``flexfed
run`` with the overrides as ``--set`` (so the run writes its own resolved config.yaml). Every
expanded config is validated before any run starts. ``SWEEP_DIR/sweep.yaml`` holds the resolved
sweep; it marks the directory as a sweep, and running the sweep again skips finished runs and
resumes interrupted ones from their last checkpoint.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flexfed.config import ConfigError, RunConfig, builtin_config_path, load_config

log = logging.getLogger(__name__)

MARKER = "sweep.yaml"
RUNS = "runs"
LOGS = "logs"
# Set by the sweep for each run; an axis or override over them would be overwritten or ambiguous.
RESERVED = ("name", "seed", "output_dir")


# ---------------------------------------------------------------- the sweep description


def _text(value: Any) -> str:
    """A value as ``--set`` reads it back: YAML flow style, so 1e-4, [q_proj, v_proj], 'on' round-trip."""
    if isinstance(value, str) and "\n" not in value:
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass  # e.g. "[unclosed": quoted below
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()


def _value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def _overrides(mapping: Any, where: str) -> dict[str, str]:
    """``{dotted.key: value}`` (values in any YAML type) as ``{dotted.key: text}``. A nested
    mapping is flattened to dotted keys, so ``{training: {lr: 0.1}}`` changes only the learning
    rate instead of replacing the whole training section."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping of dotted config keys to values, got {mapping!r}")
    out = {}
    for key, value in mapping.items():
        key = str(key).strip()
        if key in RESERVED:
            raise ConfigError(f"{where}: {key!r} is set by the sweep for each run (use seeds: for seeds)")
        if isinstance(value, dict) and value:
            out.update({f"{key}.{k}": v for k, v in _overrides(value, where).items()})
        else:
            out[key] = _text(value)
    return out


@dataclass(frozen=True)
class Axis:
    """One dimension of the grid: option label -> the overrides that option applies."""

    name: str
    options: dict[str, dict[str, str]]

    @classmethod
    def parse(cls, name: str, spec: Any) -> Axis:
        if isinstance(spec, list):  # a dotted key over plain values
            if name in RESERVED:
                raise ConfigError(f"grid: {name!r} is set by the sweep for each run (use seeds: for seeds)")
            options = {_text(v): {name: _text(v)} for v in spec}
        elif isinstance(spec, dict):  # a named axis: label -> overrides
            options = {str(label): _overrides(sets, f"grid.{name}.{label}") for label, sets in spec.items()}
        else:
            raise ConfigError(f"grid.{name}: expected a list of values or a mapping of named options, got {spec!r}")
        if not options:
            raise ConfigError(f"grid.{name}: no values")
        if isinstance(spec, list) and len(options) != len(spec):
            raise ConfigError(f"grid.{name}: repeated values")
        return cls(name, options)

    @property
    def short(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Cell:
    """One combination of settings: axis -> option label, and the overrides they amount to."""

    values: dict[str, str]
    overrides: dict[str, str]
    name: str


@dataclass(frozen=True)
class RunSpec:
    cell: Cell
    seed: int
    run_dir: Path
    overrides: list[str]  # every --set of the run, in order
    config: RunConfig


@dataclass
class Sweep:
    base: str
    overrides: dict[str, str] = field(default_factory=dict)
    axes: list[Axis] = field(default_factory=list)
    include: list[dict[str, str]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    baseline: tuple[str, str] | None = None

    # -------------------------------------------------------- reading and writing

    @classmethod
    def from_dict(cls, raw: dict, relative_to: Path | None = None) -> Sweep:
        if not isinstance(raw, dict):
            raise ConfigError("a sweep file needs a mapping at the top level")
        unknown = sorted(set(raw) - {"base", "set", "grid", "include", "seeds", "baseline", "out"})
        if unknown:
            raise ConfigError(f"sweep: unknown key(s) {unknown} (expected base, set, grid, include, seeds, baseline, out)")
        if "base" not in raw:
            raise ConfigError("sweep: 'base' (a packaged config name or a config file) is required")
        base = str(raw["base"])
        if relative_to is not None and (relative_to / base).is_file():
            base = str((relative_to / base).resolve())
        seeds = raw.get("seeds", [0])
        seeds = [seeds] if isinstance(seeds, int) else seeds
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds):
            raise ConfigError(f"sweep.seeds: expected a list of distinct integers, got {raw.get('seeds')!r}")
        grid = raw.get("grid") or {}
        if not isinstance(grid, dict):
            raise ConfigError("sweep.grid: expected a mapping of axes")
        axes = [Axis.parse(str(name), spec) for name, spec in grid.items()]
        include = raw.get("include") or []
        if not isinstance(include, list) or not all(isinstance(c, dict) and c for c in include):
            raise ConfigError("sweep.include: expected a list of non-empty mappings (axis or dotted key -> value)")
        include = [{str(k): _text(v) for k, v in c.items()} for c in include]
        baseline = raw.get("baseline")
        sweep = cls(base, _overrides(raw.get("set") or {}, "sweep.set"), axes, include, seeds, parse_baseline(baseline) if baseline else None)
        sweep.cells()  # include cells and the baseline must name real axes/options
        return sweep

    @classmethod
    def load(cls, path: str | Path) -> Sweep:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"sweep file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        return cls.from_dict(raw, path.parent)

    def to_dict(self) -> dict:
        """The sweep as a sweep file reads it (``from_dict(to_dict())`` is the same sweep)."""
        values = lambda sets: {k: _value(v) for k, v in sets.items()}  # noqa: E731
        raw: dict[str, Any] = {"base": self.base, "set": values(self.overrides)}
        raw["grid"] = {a.name: ([_value(v) for v in a.options] if _plain(a) else {k: values(v) for k, v in a.options.items()}) for a in self.axes}
        raw["include"] = [values(c) for c in self.include]
        raw["seeds"] = list(self.seeds)
        raw["baseline"] = f"{self.baseline[0]}={self.baseline[1]}" if self.baseline else None
        return raw

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # -------------------------------------------------------- expansion

    def cells(self) -> list[Cell]:
        """The grid's cells in order (first axis slowest), then the include cells not already in it."""
        by_name = {a.name: a for a in self.axes}
        cells: list[Cell] = []
        for combo in itertools.product(*(a.options.items() for a in self.axes)):
            values = {a.name: label for a, (label, _) in zip(self.axes, combo)}
            cells.append(self._cell(values, {k: v for _, sets in combo for k, v in sets.items()}))
        for extra in self.include:
            values, sets = {}, {}
            for key, label in extra.items():
                axis = by_name.get(key)
                if axis is not None and not _plain(axis):
                    if label not in axis.options:
                        raise ConfigError(f"sweep.include: {key}={label!r} is not one of the options {sorted(axis.options)}")
                    sets.update(axis.options[label])
                elif key in RESERVED:
                    raise ConfigError(f"sweep.include: {key!r} is set by the sweep for each run")
                else:
                    sets[key] = label
                values[key] = label
            cells.append(self._cell(values, sets))
        unique: dict[str, Cell] = {}
        for c in cells:
            if c.name in unique and unique[c.name].overrides != c.overrides:
                raise ConfigError(f"sweep: two different cells would share the run name {c.name!r}")
            unique.setdefault(c.name, c)
        if self.baseline:
            key, label = self.baseline
            if not any(c.values.get(key) == label for c in unique.values()):
                raise ConfigError(f"sweep.baseline: no cell has {key}={label} (axes: {[a.name for a in self.axes]})")
        return list(unique.values())

    def _cell(self, values: dict[str, str], sets: dict[str, str]) -> Cell:
        shorts = [k.rsplit(".", 1)[-1] for k in values]
        # The key's last part names it unless two axes share that part; "_" separates the settings.
        parts = [f"{_slug(k.rsplit('.', 1)[-1] if shorts.count(k.rsplit('.', 1)[-1]) == 1 else k)}-{_slug(v)}" for k, v in values.items()]
        name = "_".join(parts) or "base"
        return Cell(values, sets, name)

    def runs(self, sweep_dir: Path) -> list[RunSpec]:
        """Every run of the sweep, its config validated; a bad key or value fails here, naming it."""
        root = (Path(sweep_dir) / RUNS).resolve()
        specs = []
        # Seed by seed, so a sweep stopped part-way has every cell at the first seeds.
        cells = self.cells()
        for seed in self.seeds:
            for cell in cells:
                name = f"{cell.name}_seed{seed}"
                sets = [f"{k}={v}" for k, v in {**self.overrides, **cell.overrides}.items()]
                sets += [f"seed={seed}", f"name={name}", f"output_dir={root}"]
                try:
                    config = load_config(self.base, sets)
                except ConfigError as err:
                    raise ConfigError(f"sweep cell {cell.name} (seed {seed}): {err}") from None
                specs.append(RunSpec(cell, seed, root / name, sets, config))
        return specs


def _plain(axis: Axis) -> bool:
    """An axis over one dotted key's values (as opposed to named sets of overrides)."""
    return all(sets == {axis.name: label} for label, sets in axis.options.items())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")


def parse_baseline(text: str) -> tuple[str, str]:
    key, sep, value = str(text).partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"baseline expects AXIS=VALUE (e.g. federation.method=fedit), got {text!r}")
    return key.strip(), _text(yaml.safe_load(value.strip())) if value.strip() else ""


def split_values(text: str) -> list[Any]:
    """``fedit,flexlora`` or ``[q_proj,v_proj],[q_proj]``: commas outside brackets separate values."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [yaml.safe_load(p.strip()) if p.strip() else "" for p in parts]


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """``--set key=value`` items as a mapping (values read as YAML)."""
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value.strip()) if value.strip() else ""
    return out


def from_command_line(base: str | None, sets: list[str], grid: list[str], seeds: str | None, baseline: str | None) -> Sweep:
    """The sweep that ``flexfed sweep --config --set --grid KEY=V1,V2 --seeds 0,1`` describes."""
    raw: dict[str, Any] = {"base": base or "quickstart", "set": parse_sets(sets), "grid": {}}
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--grid expects key=value1,value2,..., got {item!r}")
        raw["grid"][key.strip()] = split_values(values)
    if seeds:
        raw["seeds"] = [int(s) for s in seeds.split(",")]
    if baseline:
        raw["baseline"] = baseline
    return Sweep.from_dict(raw, Path.cwd())


def open_sweep(file: str | None, out: str | None, base: str | None = None, sets: list[str] = (), grid: list[str] = (),
               seeds: str | None = None, baseline: str | None = None) -> tuple[Sweep, Path]:
    """The sweep and its directory from a sweep file, the command line, or a sweep directory alone
    (``--out DIR`` holding sweep.yaml continues that sweep). ``baseline`` overrides the file's;
    with a file, ``sets`` add to (and win over) its ``set`` and ``seeds`` replace its seeds."""
    described = bool(base or sets or grid or seeds)
    if file and (base or grid):
        raise ConfigError("give a sweep file or --config/--grid, not both (--set and --seeds may adjust a sweep file)")
    if file:
        path = Path(file)
        if not path.exists() and path.suffix == "" and packaged_sweep(file).is_file():
            path = packaged_sweep(file)
        sweep = Sweep.load(path)
        sweep.overrides.update(_overrides(parse_sets(list(sets)), "--set"))
        if seeds:
            sweep.seeds = [int(s) for s in seeds.split(",")]
        # Like a run config's output_dir, the file's ``out`` is relative to where flexfed runs.
        sweep_dir = Path(out or (yaml.safe_load(path.read_text()) or {}).get("out") or Path("runs") / path.stem)
    elif described:
        if not out:
            raise ConfigError("--out SWEEP_DIR is required for a sweep described on the command line")
        sweep = from_command_line(base, list(sets), list(grid), seeds, None)
        sweep_dir = Path(out)
    elif out and (Path(out) / MARKER).is_file():
        sweep, sweep_dir = Sweep.load(Path(out) / MARKER), Path(out)
    else:
        raise ConfigError("describe a sweep: a sweep file, or --config with --grid/--seeds and --out (or --out of an existing sweep directory)")
    if baseline:
        sweep.baseline = parse_baseline(baseline)
        sweep.cells()  # the baseline must name a cell's option
    return sweep, sweep_dir


def packaged_sweep(name: str) -> Path:
    """A sweep file shipped with flexfed, e.g. ``table2-p3``."""
    return builtin_config_path(f"sweeps/{name}")


def base_exists(base: str) -> bool:
    return Path(base).is_file() or builtin_config_path(base).exists()


# ---------------------------------------------------------------- state of the runs


def run_state(spec: RunSpec) -> str:
    """``done`` (checkpoint of the last round), ``partial`` (an earlier checkpoint), ``new``."""
    from flexfed.server import checkpoint_round

    done = checkpoint_round(spec.run_dir) if spec.run_dir.is_dir() else None
    if done is None:
        return "new"
    saved = spec.run_dir / "config.yaml"
    if saved.is_file():  # the run must be the one this sweep describes, or resuming it would mix two
        ours = spec.config.model_dump(mode="json", exclude={"output_dir"})
        theirs = {k: v for k, v in (yaml.safe_load(saved.read_text()) or {}).items() if k != "output_dir"}
        if ours != theirs:
            raise ConfigError(f"{spec.run_dir}: its config.yaml differs from the sweep's config for this cell; move it away or use another sweep directory")
    return "done" if done >= spec.config.federation.rounds else "partial"


# ---------------------------------------------------------------- execution


@dataclass
class Outcome:
    spec: RunSpec
    state: str  # what it was before: new / partial / done
    returncode: int  # 0 for a run that was already done


def check_methods(specs: list[RunSpec]) -> None:
    """The engine's start-up checks of method against ranks (``aggregation.weights.check_method``), for every
    run before any starts. They need the model's layer shapes, read on the meta device (no weights,
    no data). ``distribution: memory`` is left to the run: its types follow a memory estimate."""
    import torch

    from flexfed.aggregation import get_aggregator
    from flexfed.lora import target_shapes
    from flexfed.models import load_skeleton
    from flexfed.resources import client_profiles
    from flexfed.aggregation.weights import check_method
    from flexfed.protocol import family_of

    shapes: dict[tuple, dict] = {}
    for spec in specs:
        c = spec.config
        if c.resources.distribution == "memory":
            continue
        if c.federation.method == "split":  # its client parts are aggregated by a weights-protocol method
            from flexfed.split.checks import client_method_config

            c = client_method_config(c)
        elif family_of(c.federation.method):
            continue  # a protocol of its own (protocol.FAMILIES) checks its config when built
        try:
            key = (c.model.name, c.model.dtype, tuple(c.lora.target_modules))
            if key not in shapes:
                shapes[key] = target_shapes(load_skeleton(c.model.name, getattr(torch, c.model.dtype)), c.lora.target_modules)
            profiles, _ = client_profiles(c.resources, c.lora, shapes[key], 1, c.seed)
            check_method(c, get_aggregator(c.federation.method, **c.federation.method_options), profiles)
        except (ValueError, OSError) as err:
            raise ConfigError(f"sweep cell {spec.cell.name} (seed {spec.seed}): {err}") from None


def prepare(sweep: Sweep, sweep_dir: Path) -> list[RunSpec]:
    """Check the sweep, its runs and its directory, write sweep.yaml; returns the validated runs."""
    sweep_dir = Path(sweep_dir)
    if not base_exists(sweep.base):
        raise ConfigError(f"sweep.base: config {sweep.base!r} not found (a packaged config name or a YAML file)")
    specs = sweep.runs(sweep_dir)
    check_methods(specs)
    marker = sweep_dir / MARKER
    if marker.is_file():
        saved = Sweep.from_dict(yaml.safe_load(marker.read_text()))
        runs_of = lambda sw: {k: v for k, v in sw.to_dict().items() if k != "baseline"}  # noqa: E731 - the baseline only shapes the table
        if runs_of(saved) != runs_of(sweep):
            raise ConfigError(f"{sweep_dir} holds a different sweep ({marker}); continue it with `flexfed sweep --out {sweep_dir}` alone, or choose another --out")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(sweep.dump())
    return specs


def execute(sweep: Sweep, specs: list[RunSpec], sweep_dir: Path, jobs: int = 1, threads_per_job: int | None = None, show_progress: bool = True) -> list[Outcome]:
    """Run what is not done yet: resume partial runs, start new ones, ``jobs`` at a time.

    ``jobs=1`` runs ``flexfed run`` in this process; more run each in a subprocess (its own torch
    thread pool, so concurrent runs do not fight over one) with ``threads_per_job`` threads.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    threads = threads_per_job or default_threads(jobs)
    states = {s.run_dir: run_state(s) for s in specs}
    todo = [s for s in specs if states[s.run_dir] != "done"]
    outcomes = {s.run_dir: Outcome(s, "done", 0) for s in specs if states[s.run_dir] == "done"}
    log.info("sweep %s: %d runs, %d done, %d to resume, %d to start (%d at a time, %d threads each)", sweep_dir, len(specs),
             len(outcomes), sum(states[s.run_dir] == "partial" for s in todo), sum(states[s.run_dir] == "new" for s in todo), jobs, threads)
    (Path(sweep_dir) / LOGS).mkdir(parents=True, exist_ok=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not show_progress)
    with progress:
        task = progress.add_task("sweep runs", total=len(specs), completed=len(outcomes))

        def one(spec: RunSpec) -> Outcome:
            argv = _argv(sweep, spec, states[spec.run_dir])
            log_path = Path(sweep_dir) / LOGS / f"{spec.run_dir.name}.log"
            code = _in_process(argv, threads, log_path) if jobs == 1 else _subprocess(argv, threads, log_path)
            return Outcome(spec, states[spec.run_dir], code)

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = [pool.submit(one, s) for s in todo]
            for future in as_completed(futures):
                out = future.result()
                outcomes[out.spec.run_dir] = out
                verb = "resumed" if out.state == "partial" else "ran"
                if out.returncode == 0:
                    log.info("%s %s", verb, out.spec.run_dir.name)
                else:
                    log.error("run %s failed (exit code %d; log: %s)", out.spec.run_dir.name, out.returncode, Path(sweep_dir) / LOGS / f"{out.spec.run_dir.name}.log")
                progress.advance(task)
    return [outcomes[s.run_dir] for s in specs]


def default_threads(jobs: int) -> int:
    """Cores / jobs, but no more than OMP_NUM_THREADS when it is set: on a shared machine more
    threads than free cores make OpenMP spin, and a tiny model's runs get many times slower."""
    share = max(1, (os.cpu_count() or 1) // max(1, jobs))
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return min(share, int(limit)) if limit.isdigit() and int(limit) > 0 else share


def _argv(sweep: Sweep, spec: RunSpec, state: str) -> list[str]:
    if state == "partial":
        return ["run", "--resume", str(spec.run_dir), "--quiet"]
    # --overwrite: a directory without any checkpoint holds a run that died before round 0 was saved.
    return ["run", "--config", sweep.base, *itertools.chain.from_iterable(("--set", s) for s in spec.overrides), "--quiet", "--overwrite"]


def _in_process(argv: list[str], threads: int, log_path: Path) -> int:
    import torch

    from flexfed.cli import main

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    # The run's log lines also go to its log file, as a subprocess's output does.
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        with open(log_path, "a") as out, contextlib.redirect_stdout(out):  # the run's own summary table
            return main(argv)
    except Exception:  # noqa: BLE001 - one failed run must not stop the others
        log.exception("flexfed %s failed", " ".join(argv))
        return 1
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        torch.set_num_threads(before)


def _subprocess(argv: list[str], threads: int, log_path: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log_path, "a") as fh:
        return subprocess.run([sys.executable, "-m", "flexfed.cli", *argv], stdout=fh, stderr=subprocess.STDOUT, env=env, check=False).returncode
