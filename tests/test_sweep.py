"""``flexfed sweep``: expansion, validation before any run, skip/resume, and the table's numbers
recomputed here from the runs' metrics.jsonl."""

import csv
import json
import logging
import math
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from flexfed.cli import main
from flexfed.experiments import stats
from flexfed.experiments.sweep import Sweep, from_command_line, split_values

FAST = ["--set", "federation.rounds=2", "--set", "eval.seen_examples=2", "--set", "eval.unseen_examples=2"]


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("df,table", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (10, 2.228), (30, 2.042)])
def test_t_quantile_matches_the_printed_table(df, table):
    assert stats.t_quantile(0.975, df) == pytest.approx(table, abs=5e-4)


def test_t_quantile_closed_forms():
    # df = 1 is the Cauchy distribution; df = 2 has q = (2p - 1) / sqrt(2 p (1 - p)).
    for p in (0.6, 0.9, 0.975, 0.995):
        assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
        assert stats.t_quantile(1 - p, 7) == pytest.approx(-stats.t_quantile(p, 7), rel=1e-12)


def test_interval_of_paired_differences():
    treatment, baseline = {0: 11.0, 1: 22.0, 2: 33.0, 3: 99.0}, {0: 10.0, 1: 20.0, 2: 30.0}  # seed 3 has no pair
    d = stats.paired_difference(treatment, baseline)
    half = 4.302653 * 1.0 / math.sqrt(3)  # differences [1, 2, 3]: mean 2, s = 1, t(0.975, 2)
    assert (d.n, d.mean, d.std) == (3, 2.0, 1.0)
    assert d.low == pytest.approx(2 - half, abs=1e-6) and d.high == pytest.approx(2 + half, abs=1e-6)
    single = stats.paired_difference({0: 5.0}, {0: 3.0})
    assert (single.mean, single.std, single.low, single.high) == (2.0, None, None, None)
    assert stats.paired_difference({0: 1.0}, {1: 1.0}) is None


# ---------------------------------------------------------------- expansion


def test_grid_named_axes_and_include_expand_deterministically(tmp_path):
    sweep = Sweep.from_dict({
        "base": "tiny",
        "set": {"federation.rounds": 1, "training.lr": 1e-4},
        "grid": {"federation.method": ["fedit", "flexlora"],
                 "regime": {"sgd": {"training": {"optimizer": "sgd", "lr": 0.01}}, "adamw": {"training.optimizer": "adamw"}}},
        "include": [{"federation.method": "hetlora", "regime": "adamw", "resources.distribution": "uniform"}],
        "seeds": [3, 1],
        "baseline": "federation.method=fedit",
    })
    names = [c.name for c in sweep.cells()]
    assert names == ["method-fedit_regime-sgd", "method-fedit_regime-adamw", "method-flexlora_regime-sgd",
                     "method-flexlora_regime-adamw", "method-hetlora_regime-adamw_distribution-uniform"]
    runs = sweep.runs(tmp_path)
    # seed by seed: every cell at the first seed before any at the second
    assert [r.run_dir.name for r in runs[:2]] == ["method-fedit_regime-sgd_seed3", "method-fedit_regime-adamw_seed3"]
    assert runs[len(runs) // 2].seed == 1
    sgd = runs[0].config
    assert (sgd.training.optimizer, sgd.training.lr, sgd.seed, sgd.federation.rounds) == ("sgd", 0.01, 3, 1)
    assert sgd.training.batch_size == 4  # a nested option changes its keys only; the rest stays tiny's
    assert runs[1].config.training.lr == 1e-4  # the sweep-wide value where no option sets it
    extra = runs[-1].config
    assert (extra.federation.method, extra.resources.distribution, extra.training.optimizer) == ("hetlora", "uniform", "adamw")
    assert sgd.run_dir == (tmp_path / "runs" / "method-fedit_regime-sgd_seed3").resolve()
    # What sweep.yaml stores reads back to the same sweep.
    again = Sweep.from_dict(yaml.safe_load(sweep.dump()))
    assert again.to_dict() == sweep.to_dict()
    assert [r.config for r in again.runs(tmp_path)] == [r.config for r in runs]


def test_command_line_values_keep_their_types(tmp_path):
    assert split_values("[q_proj,v_proj],[q_proj],fedit,1e-4,0.5") == [["q_proj", "v_proj"], ["q_proj"], "fedit", "1e-4", 0.5]
    sweep = from_command_line("tiny", ["federation.rounds=1"], ["lora.target_modules=[q_proj,v_proj],[q_proj]", "training.lr=0.001,0.01"], "0,1", None)
    runs = sweep.runs(tmp_path)
    assert len(runs) == 2 * 2 * 2
    assert runs[0].config.lora.target_modules == ["q_proj", "v_proj"] and runs[0].config.training.lr == 0.001
    assert runs[0].run_dir.name == "target_modules-q_proj-v_proj_lr-0.001_seed0"


@pytest.mark.parametrize("args,named", [
    (["--grid", "federation.methd=fedit,flexlora"], "federation.methd: unknown key"),
    (["--grid", "federation.method=fedit,nosuch"], "federation.method 'nosuch' is not one of"),
    (["--grid", "training.lr=0.001,-1"], "training.lr: Input should be greater than 0"),
    (["--grid", "seed=0,1"], "'seed' is set by the sweep"),
    # Schema-valid but refused by the engine: FedIT averages factors and cannot take mixed ranks.
    (["--grid", "resources.distribution=homogeneous,uniform"], "sweep cell distribution-uniform (seed 0): federation.method 'fedit' needs one common rank"),
    (["--set", "federation.rounds=3", "--grid", "federation.sparse_stage.rounds=0,1", "--grid", "federation.method=fedit,flora"],
     "sweep cell rounds-1_method-flora (seed 0): federation.sparse_stage (SLoRA) starts LoRA from an SVD"),
    (["--grid", "federation.method=fedit,flexlora", "--baseline", "federation.method=fedavg"], "no cell has federation.method=fedavg"),
])
def test_bad_grid_fails_before_any_run_naming_the_key(tmp_path, caplog, args, named):
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", "tiny", *args, "--out", str(out)]) == 2
    assert named in caplog.text
    assert not out.exists()  # nothing written, nothing run


def test_a_run_that_fails_leaves_the_others_and_is_named(tmp_path, caplog):
    # A sweep file, its base config beside it; one cell's data directory is missing, which only
    # the run itself finds out.
    data = tmp_path / "tasks"
    data.mkdir()
    for task in ("alpha_one", "alpha_two", "beta_one", "beta_two"):
        (data / f"{task}.jsonl").write_text("".join(json.dumps({"prompt": f"{task} {i}?", "completion": f"{i}<|endoftext|>"}) + "\n" for i in range(6)))
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"name": "tiny-llama"}, "data": {"source": "prompt-completion", "path": str(data), "holdout_by": "task"}}))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml",
        "set": {"federation": {"rounds": 1, "sample_fraction": 0.5}, "training.local_steps": 1, "eval": {"seen_examples": 2, "unseen_examples": 2, "max_new_tokens": 2}},
        "grid": {"data": {"present": {}, "absent": {"data.path": str(tmp_path / "missing")}}},
        "out": str(tmp_path / "out"),
    }, sort_keys=False))
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--quiet"]) == 1
    assert "1 run(s) failed: data-absent_seed0" in caplog.text
    assert f"data.path '{tmp_path / 'missing'}'" in (tmp_path / "out" / "logs" / "data-absent_seed0.log").read_text()
    table = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(c["cell"], c["seeds"]) for c in table["cells"]] == [("data-present", [0]), ("data-absent", [])]
    assert table["sweep"]["base"] == str(tmp_path / "base.yaml")  # resolved beside the sweep file


# ---------------------------------------------------------------- a whole sweep


GRID = ["--grid", "federation.method=fedit,flexlora", "--grid", "lora.rank=2,4", "--seeds", "0,1", "--baseline", "federation.method=fedit"]
CELLS = ["method-fedit_rank-2", "method-fedit_rank-4", "method-flexlora_rank-2", "method-flexlora_rank-4"]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """A 2 x 2 grid with 2 seeds; one run interrupted after round 1 before the sweep starts."""
    from flexfed.config import load_config
    from flexfed.engines.simulation import run

    out = tmp_path_factory.mktemp("sweep") / "grid"
    interrupted = load_config("tiny", ["federation.rounds=2", "eval.seen_examples=2", "eval.unseen_examples=2", "federation.method=flexlora",
                                       "lora.rank=4", "seed=1", "name=method-flexlora_rank-4_seed1", f"output_dir={(out / 'runs').resolve()}"])
    run(interrupted, show_progress=False, stop_after=1)
    round1 = interrupted.run_dir / "predictions" / "round-0001.jsonl"
    written = round1.stat().st_mtime_ns
    assert main(["sweep", "--config", "tiny", *FAST, *GRID, "--out", str(out), "--quiet"]) == 0
    assert round1.stat().st_mtime_ns == written  # resumed after round 1, not started over
    return out


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _without_timing(table: dict) -> dict:
    table = json.loads(json.dumps(table))
    table.pop("plots", None)
    for cell in table["cells"]:
        cell["metrics"].pop("wall_s", None)
        (cell.get("difference") or {}).pop("wall_s", None)
    return table


def test_every_run_finished(finished_sweep):
    runs = sorted(p.name for p in (finished_sweep / "runs").iterdir())
    assert runs == sorted(f"{c}_seed{s}" for c in CELLS for s in (0, 1))
    for name in runs:
        assert [r["round"] for r in _rows(finished_sweep / "runs" / name)] == [0, 1, 2]
    saved = yaml.safe_load((finished_sweep / "runs" / "method-fedit_rank-4_seed1" / "config.yaml").read_text())
    assert (saved["federation"]["method"], saved["lora"]["rank"], saved["seed"]) == ("fedit", 4, 1)


def test_table_means_stds_and_differences_recomputed_from_the_runs(finished_sweep):
    table = json.loads((finished_sweep / "results.json").read_text())
    assert [c["cell"] for c in table["cells"]] == CELLS
    assert table["metrics"] == ["rouge_l_unseen", "rouge_l_seen", "rouge_l_validation", "rouge_l_unseen_weighted", "eval_loss_unseen",
                                "eval_loss_seen", "eval_loss_validation", "rouge_l_unseen_at_best_validation", "bytes_up", "bytes_down", "wall_s"]
    runs = finished_sweep / "runs"

    def final(cell, seed, key):
        rows = _rows(runs / f"{cell}_seed{seed}")
        if key in ("bytes_up", "bytes_down"):
            return sum(r.get(key, 0) for r in rows)
        return rows[-1][key]

    for cell in table["cells"]:
        for key in ("rouge_l_unseen", "eval_loss_unseen", "eval_loss_seen", "bytes_up", "bytes_down"):
            values = [final(cell["cell"], s, key) for s in (0, 1)]
            got = cell["metrics"][key]
            assert got["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
            assert got["std"] == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-15)
    # The unseen score at the round best on validation (the earliest of ties), never chosen on unseen.
    for cell in table["cells"]:
        values = []
        for seed in (0, 1):
            rows = [r for r in _rows(runs / f"{cell['cell']}_seed{seed}") if r.get("rouge_l_validation") is not None]
            best = max(rows, key=lambda r: (r["rouge_l_validation"], -r["round"]))
            values.append(best["rouge_l_unseen"])
        assert cell["metrics"]["rouge_l_unseen_at_best_validation"]["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
    # Bytes up: rank r sends r * (in + out) floats per adapted matrix; FlexLoRA and FedIT send the same.
    bytes_up = {c["cell"]: c["metrics"]["bytes_up"]["mean"] for c in table["cells"]}
    assert bytes_up["method-fedit_rank-4"] == 2 * bytes_up["method-fedit_rank-2"] == bytes_up["method-flexlora_rank-4"]
    # Paired differences: flexlora minus fedit at the same rank and seed; 2 seeds -> t(0.975, 1) = 12.7062.
    flex = next(c for c in table["cells"] if c["cell"] == "method-flexlora_rank-2")
    assert flex["baseline"] == "method-fedit_rank-2"
    diffs = [final("method-flexlora_rank-2", s, "eval_loss_unseen") - final("method-fedit_rank-2", s, "eval_loss_unseen") for s in (0, 1)]
    d = flex["difference"]["eval_loss_unseen"]
    half = 12.7062047 * statistics.stdev(diffs) / math.sqrt(2)
    assert d["n"] == 2 and d["mean"] == pytest.approx(statistics.fmean(diffs), rel=1e-9, abs=1e-12)
    assert (d["low"], d["high"]) == (pytest.approx(d["mean"] - half, abs=1e-9), pytest.approx(d["mean"] + half, abs=1e-9))
    assert "difference" not in table["cells"][0]  # the baseline cell itself
    # The CSV holds the same numbers.
    with open(finished_sweep / "results.csv") as fh:
        rows = {r["cell"]: r for r in csv.DictReader(fh)}
    assert float(rows["method-flexlora_rank-2"]["eval_loss_unseen_diff_ci_low"]) == d["low"]
    assert rows["method-fedit_rank-4"]["lora.rank"] == "4"
    assert sorted(p.name for p in finished_sweep.glob("curves-*.png")) == sorted(
        f"curves-{m}.png" for m in ("rouge_l_unseen", "rouge_l_seen", "rouge_l_validation", "eval_loss_unseen", "eval_loss_seen", "train_loss"))


def test_rerun_skips_finished_runs_and_resumes_to_the_same_table(finished_sweep, caplog):
    caplog.set_level(logging.INFO, logger="flexfed")
    before = _without_timing(json.loads((finished_sweep / "results.json").read_text()))
    runs = finished_sweep / "runs"
    # A run killed after round 1 (its round-2 checkpoint and metrics line never written) and one never started.
    killed = runs / "method-fedit_rank-2_seed0"
    shutil.rmtree(killed / "checkpoints" / "round-0002")
    shutil.rmtree(killed / "adapters" / "round-0002")
    (killed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(killed)[:2]))
    shutil.rmtree(runs / "method-flexlora_rank-2_seed1")
    untouched = {p.name: (p / "metrics.jsonl").stat().st_mtime_ns for p in runs.iterdir()}
    # The sweep directory alone continues its sweep; two runs at a time, each in its own process.
    assert main(["sweep", "--out", str(finished_sweep), "--jobs", "2", "--threads-per-job", "1", "--quiet"]) == 0
    assert "8 runs, 6 done, 1 to resume, 1 to start" in caplog.text
    for name, mtime in untouched.items():
        if name != killed.name:
            assert (runs / name / "metrics.jsonl").stat().st_mtime_ns == mtime
    after = _without_timing(json.loads((finished_sweep / "results.json").read_text()))
    assert after == before
    # `flexfed report SWEEP_DIR` rebuilds the same table.
    (finished_sweep / "results.json").unlink()
    assert main(["report", str(finished_sweep)]) == 0
    assert _without_timing(json.loads((finished_sweep / "results.json").read_text())) == before


def test_a_different_sweep_in_the_same_directory_is_refused(finished_sweep, caplog):
    assert main(["sweep", "--config", "tiny", *FAST, "--grid", "federation.method=fedit", "--out", str(finished_sweep)]) == 2
    assert "holds a different sweep" in caplog.text


# ---------------------------------------------------------------- the paper's configs


def test_table2_sweep_expands_to_recipes_by_settings_and_validates(tmp_path, caplog):
    from flexfed.experiments.sweep import open_sweep

    caplog.set_level(logging.INFO, logger="flexfed")
    assert main(["sweep", "table2-p3", "--out", str(tmp_path / "t2"), "--dry-run"]) == 0  # every run's config validated
    assert "81 runs validated" in caplog.text
    sweep, _ = open_sweep("table2-p3", str(tmp_path / "t2"))
    runs = sweep.runs(tmp_path / "t2")
    cells = {(r.config.training.optimizer, r.config.federation.sparse_stage.rounds, r.config.federation.method, r.config.resources.distribution) for r in runs}
    distributions = ("uniform", "heavy-tail-light", "heavy-tail-strong", "normal")
    expected = {(opt, stage, m, d) for opt, stage in (("sgd", 0), ("adamw", 0), ("adamw", 1))
                for m, d in [("fedit", "homogeneous"), *((m, d) for m in ("flexlora", "hetlora") for d in distributions)]}
    assert cells == expected and len(runs) == 27 * 3
    assert {r.config.data.source for r in runs} == {"prompt-completion"}
    assert {tuple(r.config.lora.target_modules) for r in runs} == {("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    assert {r.config.federation.sample_fraction for r in runs} == {0.05}


@pytest.mark.parametrize("config", ["flexlora-paper-p3", "flexlora-paper-ni"])
def test_paper_config_without_its_data_names_data_path(tmp_path, caplog, config):
    missing = tmp_path / "no-such-data"
    # The tiny model keeps it fast; the data is looked up before any training.
    argv = ["run", "--config", config, "--set", f"data.path={missing}", "--set", "model.name=tiny-llama", "--set", f"output_dir={tmp_path}", "--quiet"]
    assert main(argv) == 2
    assert f"data.path '{missing}'" in caplog.text and "no such file or directory" in caplog.text
