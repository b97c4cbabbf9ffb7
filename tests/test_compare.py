"""`flexfed compare`: every family end to end on the tiny model, bytes equal to the formulas, the
budget calibration, the report and its plots, the scaling shapes, and the error paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flexfed.cli import main
from flexfed.config import ConfigError, load_config
from flexfed.experiments import compare, formulas
from flexfed.models import load_skeleton
from flexfed.report import read_metrics

EVERY_FAMILY = {
    "fedit": {"federation.method": "fedit"},
    "flexlora": {"federation.method": "flexlora", "resources.distribution": "uniform"},
    "kd-top16": {"federation.method": "kd"},
    "kd-labels": {"federation.method": "kd", "kd.encoding": "labels", "kd.labels": [" yes", " no", "A"]},
    "split-l1": {"federation.method": "split", "split.cut_layer": 1},
    "split-l2-u": {"federation.method": "split", "split.cut_layer": 2, "split.tail_layers": 1},
    "split-prompt": {"federation.method": "split", "split.cut_layer": 1, "split.client_adapter": "prompt", "split.prompt_tokens": 4},
    "fedkseed": {"federation.method": "fedkseed", "training.batch_size": 1},
    "fedkseed-pro": {"federation.method": "fedkseed-pro", "training.batch_size": 1},
}


def _file(tmp_path: Path, settings: dict, **extra) -> Path:
    raw = {"base": "tiny", "set": {"model.name": "tiny-llama-4", "federation.rounds": 2, "eval.seen_examples": 4,
                                   "eval.unseen_examples": 4, "eval.validation_examples": 2},
           "settings": settings, "reference": "fedit", "seeds": [0], **extra}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def every_family(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    out = tmp / "out"
    code = main(["compare", str(_file(tmp, EVERY_FAMILY)), "--out", str(out), "--quiet", "--threads-per-job", "1"])
    return code, out


def test_compare_runs_every_family_and_writes_the_table_and_plots(every_family):
    code, out = every_family
    assert code == 0
    result = json.loads((out / compare.OUT / "comparison.json").read_text())
    assert [r["setting"] for r in result["settings"]] == list(EVERY_FAMILY)
    assert {r["family"] for r in result["settings"]} == {"weights", "kd", "split", "zo"}
    for name in ("comparison.md", "pareto.png", "accuracy-vs-bytes.png", "scaling.png"):
        assert (out / compare.OUT / name).stat().st_size > 1000, name
    assert (out / "results.md").is_file()  # the sweep's own table, paired against the reference
    md = (out / compare.OUT / "comparison.md").read_text()
    assert "| split-l2-u | split |" in md and "llama-7b" in md


def test_measured_bytes_equal_the_formulas_for_every_family(every_family):
    _, out = every_family
    result = json.loads((out / compare.OUT / "comparison.json").read_text())
    for row in result["settings"]:
        # 2 rounds of the sampled clients, every one of them checked, none different
        assert row["formula_checked"] >= 2, row["setting"]
        assert row["formula_mismatches"] == [], row["setting"]
        # the exact FLOP formula each protocol records agrees with the counter
        assert row["flops_over_analytic"] == pytest.approx(1.0, abs=0.02), row["setting"]


def test_the_check_reports_a_byte_that_was_not_sent(every_family):
    _, out = every_family
    run = out / "runs" / "setting-split-l1_seed0"
    config = load_config(run / "config.yaml")
    rows = read_metrics(run)
    rows[-1]["clients"][0]["bytes_up"] += 1
    shape = formulas.ModelShape.of(load_skeleton(config.model.name), config.model.name)
    found = formulas.check_run(config, shape, rows)
    assert len(found["mismatches"]) == 1 and found["mismatches"][0]["round"] == rows[-1]["round"]


def test_families_differ_as_the_formulas_say(every_family):
    _, out = every_family
    rows = {r["setting"]: r for r in json.loads((out / compare.OUT / "comparison.json").read_text())["settings"]}
    # FedKSeed sends a seed index and a scalar per step: 8 bytes per step up
    zo_up = rows["fedkseed"]["bytes_up"]["mean"]
    assert zo_up % 8 == 0 and zo_up < rows["kd-labels"]["bytes_up"]["mean"] < rows["kd-top16"]["bytes_up"]["mean"]
    # a shallow cut costs the client less compute and memory than training the whole model
    assert rows["split-l1"]["client_flops_per_round"]["mean"] < rows["fedit"]["client_flops_per_round"]["mean"]
    assert rows["split-l1"]["client_memory"]["mean"] < rows["fedit"]["client_memory"]["mean"]


def test_rebuilding_the_report_gives_the_same_table(every_family):
    _, out = every_family
    before = json.loads((out / compare.OUT / "comparison.json").read_text())
    assert main(["report", str(out)]) == 0
    after = json.loads((out / compare.OUT / "comparison.json").read_text())
    strip = lambda r: [{k: v for k, v in s.items() if k not in ("wall_s", "server_s_per_round")} for s in r["settings"]]  # noqa: E731
    assert strip(before) == strip(after)


def test_flops_budget_matches_client_flops_to_the_reference(tmp_path):
    settings = {"fedit": EVERY_FAMILY["fedit"], "fedkseed": EVERY_FAMILY["fedkseed"], "split-l1": EVERY_FAMILY["split-l1"]}
    out = tmp_path / "out"
    path = _file(tmp_path, settings, budget="flops")
    raw = yaml.safe_load(path.read_text())
    raw["set"].update({"federation.rounds": 1, "training.local_steps": 4})
    path.write_text(yaml.safe_dump(raw))
    assert main(["compare", str(path), "--out", str(out), "--quiet", "--threads-per-job", "1"]) == 0
    state = yaml.safe_load((out / compare.STATE).read_text())
    steps = {n: c["steps"] for n, c in state["calibration"].items()}
    assert steps["fedit"] == 4
    assert steps["fedkseed"] > steps["fedit"] and steps["split-l1"] > steps["fedit"]  # cheaper steps, more of them
    result = json.loads((out / compare.OUT / "comparison.json").read_text())
    flops = {r["setting"]: r["client_flops_per_round"]["mean"] for r in result["settings"]}
    for name in ("fedkseed", "split-l1"):
        assert flops[name] == pytest.approx(flops["fedit"], rel=0.2), (name, flops)
    # a second call continues from the saved calibration instead of measuring again
    calibration = (out / "calibration").stat().st_mtime_ns
    assert main(["compare", "--out", str(out), "--quiet"]) == 0
    assert (out / "calibration").stat().st_mtime_ns == calibration


def test_pareto_front():
    points = [(1.0, 0.1), (2.0, 0.3), (3.0, 0.2), (2.0, 0.3), (4.0, 0.5), (0.5, 0.05)]
    assert compare.pareto_front(points) == [5, 0, 1, 3, 4]
    assert compare.pareto_front([(1.0, 0.5), (2.0, 0.4)]) == [0]


def test_scaling_shapes_are_the_published_models():
    shapes = {n: formulas.meta_shape(n, s) for n, s in formulas.SCALES.items()}
    assert shapes["llama-7b"].params == 6_738_415_616  # LLaMA-7B
    assert 1.3e9 < shapes["llama-1.3b"].params < 1.4e9
    smol = formulas.ModelShape.of(load_skeleton("smollm2-135m-instruct"), "smollm2-135m-instruct")
    assert smol.head == 0 and smol.layers == 30 and smol.hidden == 576  # tied embeddings
    assert smol.params - smol.embedding - 30 * smol.block == 576  # the final norm


def test_comparison_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="reference"):
        compare.Comparison.from_dict({"settings": {"a": {}}, "reference": "b"})
    with pytest.raises(ConfigError, match="budget"):
        compare.Comparison.from_dict({"settings": {"a": {}}, "budget": "joules"})
    with pytest.raises(ConfigError, match="settings"):
        compare.Comparison.from_dict({"settings": {}})
    with pytest.raises(ConfigError, match="unknown keys"):
        compare.Comparison.from_dict({"settings": {"a": {}}, "grid": {}})
    with pytest.raises(ConfigError, match="not found"):
        compare.Comparison.load(tmp_path / "nope.yaml")
    # a setting's bad value fails before anything runs, naming the setting
    path = _file(tmp_path, {"fedit": {"federation.method": "fedit"}, "bad": {"split.cut_layer": 0}})
    assert main(["compare", str(path), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert not (tmp_path / "o" / "runs").exists()


def test_a_directory_holds_one_comparison(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    first = compare.Comparison.from_dict({"base": "tiny", "settings": {"fedit": {"federation.method": "fedit"}}})
    (out / compare.STATE).write_text(yaml.safe_dump(first.to_dict()))
    other = compare.Comparison.from_dict({"base": "tiny", "settings": {"fedit": {"federation.method": "flexlora"}}})
    with pytest.raises(ConfigError, match="different comparison"):
        compare.run_comparison(other, out, dry_run=True)


def test_a_run_config_gets_the_default_settings():
    c = compare.Comparison.load(str(Path(compare.builtin_config_path("tiny"))))
    preset = compare.Comparison.load("compare")
    assert c.settings == preset.settings and c.base.endswith("tiny.yaml")
    assert "compare-p3" in compare.packaged_names()


def test_compare_alone_validates_the_default_settings(tmp_path):
    assert main(["compare", "--dry-run", "--out", str(tmp_path / "o")]) == 0
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
