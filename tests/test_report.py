import json
import math
import random

import pytest
import yaml
from PIL import Image
from rich.console import Console

from flexfed.report import PLOTS, print_summary, read_metrics, summarize, write_report

RANKS = [{"q_proj": 8, "gate_proj": 8}, {"q_proj": 30, "gate_proj": 30}, {"q_proj": 30, "gate_proj": 8}]
TASKS = ["reverse_words", "arithmetic", "sort_numbers", "capitalize", "copy", "count_vowels"]


def make_run(root, name="flexlora", method="flexlora", rounds=12, every=3, seed=0, gain=0.25):
    """A realistic fake run: round 0 evaluated, then every `every` rounds and the last one."""
    rng = random.Random(seed)
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "name": name, "seed": seed, "model": {"name": "smollm2-135m-instruct"},
        "federation": {"method": method, "rounds": rounds, "sample_fraction": 0.2},
        "lora": {"rank": 8, "alpha": 16}, "data": {"source": "builtin", "num_clients": 20}}))
    rows = []
    for r in range(rounds + 1):
        p = 1 - math.exp(-r / 4)
        evaluated = r == 0 or r % every == 0 or r == rounds
        clients = [] if r == 0 else [
            {"id": f"c{rng.randrange(20):04d}", "task": rng.choice(TASKS), "examples": 48,
             "ranks": (ranks := rng.choice(RANKS)), "tokens": (tok := rng.randint(1500, 3000)),
             "seconds": tok * (0.0008 + 0.00004 * max(ranks.values())) * rng.uniform(0.9, 1.1),
             "loss": 2.6 - 0.9 * p - 0.01 * max(ranks.values()) + rng.gauss(0, 0.1),
             "bytes_up": 4096 * sum(ranks.values()) * 100, "bytes_down": 4096 * sum(ranks.values()) * 100}
            for _ in range(4)]
        ev = lambda v: round(v + rng.gauss(0, 0.005), 4) if evaluated else None
        rows.append({
            "round": r, "method": method, "train_loss": None if r == 0 else sum(c["loss"] for c in clients) / 4,
            "eval_loss_seen": ev(2.5 - 0.8 * p), "eval_loss_unseen": ev(2.8 - 0.5 * p),
            "rouge_l_seen": ev(0.2 + gain * 1.4 * p), "rouge_l_unseen": ev(0.15 + gain * p),
            "rouge_l_unseen_weighted": ev(0.12 + gain * p), "rouge_l_validation": ev(0.18 + gain * 1.2 * p),
            "rouge_l_unseen_by_category": {"arithmetic": ev(0.1 + gain * p), "copy": ev(0.3 + gain * p)} if evaluated else None,
            "bytes_up": sum(c["bytes_up"] for c in clients), "bytes_down": sum(c["bytes_down"] for c in clients),
            "tokens_trained": sum(c["tokens"] for c in clients), "clients_sampled": 4 if r else 0,
            "clients_reported": 4 if r else 0, "time_train_s": sum(c["seconds"] for c in clients) if r else 0.0,
            "time_aggregate_s": 0.05 if r else 0.0, "time_eval_s": 30.0 if evaluated else 0.0,
            "time_round_s": 42.5, "clients": clients, "some_future_key": [1, 2]})
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run, rows


def check_pngs(out, plots=PLOTS):
    for name in plots:
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 800


def test_single_run_report(tmp_path):
    run, rows = make_run(tmp_path)
    out = write_report([run])
    assert out == run / "report"
    check_pngs(out)
    md = (out / "summary.md").read_text()
    for name in PLOTS:
        assert f"]({name})" in md
    s = json.loads((out / "summary.json").read_text())["runs"][0]
    assert s["method"] == "flexlora" and s["model"] == "smollm2-135m-instruct" and s["seed"] == 0 and s["rounds"] == 12
    for split in ("seen", "unseen"):
        assert s[f"rouge_l_{split}_round0"] == rows[0][f"rouge_l_{split}"]
        assert s[f"rouge_l_{split}_final"] == rows[-1][f"rouge_l_{split}"]
        assert s[f"rouge_l_{split}_gain"] == pytest.approx(rows[-1][f"rouge_l_{split}"] - rows[0][f"rouge_l_{split}"])
    evaluated = [r for r in rows if r["rouge_l_unseen"] is not None]
    assert s["best_round"] == max(evaluated, key=lambda r: r["rouge_l_validation"])["round"]
    assert s["bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert s["bytes_total"] == sum(r["bytes_up"] + r["bytes_down"] for r in rows)
    assert s["time_eval_s"] == pytest.approx(30.0 * len(evaluated))
    assert s["ranks"] == ["30", "30/8", "8"]  # one key per rank mix, largest first
    assert s["rouge_l_unseen_by_category"]["copy"]["final"] == rows[-1]["rouge_l_unseen_by_category"]["copy"]
    assert f"{s['rouge_l_unseen_gain']:+.3f}" in md


def test_final_is_last_evaluated_round(tmp_path):
    run, rows = make_run(tmp_path, rounds=7, every=3)
    rows[-1].update(rouge_l_seen=None, rouge_l_unseen=None, eval_loss_seen=None, eval_loss_unseen=None)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = summarize(run)
    assert s["rounds"] == 7 and s["rouge_l_unseen_final_round"] == 6
    assert s["rouge_l_unseen_final"] == rows[6]["rouge_l_unseen"]


def test_minimal_rows_without_optional_keys(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 0, "rouge_l_seen": 0.2}\n\n{"round": 1, "train_loss": 2.0}\n')
    out = write_report([run])
    check_pngs(out, PLOTS[:3])
    s = json.loads((out / "summary.json").read_text())["runs"][0]
    assert s["rouge_l_seen_gain"] == 0.0 and s["rouge_l_unseen_final"] is None and s["bytes_total"] == 0
    assert "clients.png" not in (out / "summary.md").read_text()


def test_comparison(tmp_path):
    methods = [("flexlora", 0.3), ("hetlora", 0.2), ("fedit", 0.15)]
    runs = [make_run(tmp_path, m, m, seed=i, gain=g)[0] for i, (m, g) in enumerate(methods)]
    with pytest.raises(ValueError, match="output directory"):
        write_report(runs)
    out = write_report(runs, tmp_path / "cmp")
    check_pngs(out)
    sums = json.loads((out / "summary.json").read_text())["runs"]
    assert [s["run"] for s in sums] == ["flexlora", "hetlora", "fedit"]
    md = (out / "summary.md").read_text()
    assert all(f"| {m} | {m} |" in md for m in ("flexlora", "hetlora", "fedit"))
    console = Console(record=True, width=200)
    print_summary(runs, console)
    assert "hetlora" in console.export_text()


def test_same_dir_names_are_disambiguated(tmp_path):
    runs = [make_run(tmp_path / parent, "run", method)[0] for parent, method in (("a", "fedit"), ("b", "hetlora"))]
    console = Console(record=True, width=100)
    print_summary(runs, console)
    text = console.export_text()
    assert "a/run (fedit)" in text and "b/run (hetlora)" in text


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    assert read_metrics(tmp_path) == []
    with pytest.raises(ValueError, match="no rounds recorded"):
        write_report([tmp_path])
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1, "train_loss": 2.\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: malformed JSON"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: expected a JSON object"):
        read_metrics(tmp_path)


def test_clients_are_the_registered_ones_not_those_seen(tmp_path):
    run, rows = make_run(tmp_path)  # 4 of at most 20 client ids per round; config says num_clients 20
    seen = {c["id"] for r in rows for c in r["clients"]}
    assert summarize(run)["clients"] == 20  # older runs: the config's count
    rows[0]["clients_registered"] = 57
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert summarize(run)["clients"] == 57 != len(seen)
    assert "| 57 |" in (write_report([run]) / "summary.md").read_text()


def test_best_round_is_chosen_on_validation_and_unseen_reported_there_and_last(tmp_path):
    """Validation peaks at round 1, unseen at round 2: the best round is 1, with unseen scores there."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"round": 0, "rouge_l_validation": 0.10, "rouge_l_unseen": 0.20, "rouge_l_unseen_weighted": 0.25},
        {"round": 1, "rouge_l_validation": 0.40, "rouge_l_unseen": 0.30, "rouge_l_unseen_weighted": 0.35},
        {"round": 2, "rouge_l_validation": 0.30, "rouge_l_unseen": 0.50, "rouge_l_unseen_weighted": 0.45},
        {"round": 3, "rouge_l_validation": 0.40, "rouge_l_unseen": 0.10, "rouge_l_unseen_weighted": 0.15},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = summarize(run)
    assert (s["best_by"], s["best_round"], s["best_rouge_l_validation"]) == ("rouge_l_validation", 1, 0.40)  # earliest of ties
    assert (s["rouge_l_unseen_at_best"], s["rouge_l_unseen_weighted_at_best"]) == (0.30, 0.35)
    assert (s["rouge_l_unseen_final"], s["rouge_l_unseen_weighted_final"]) == (0.10, 0.15)
    md = (write_report([run]) / "summary.md").read_text()
    assert "| run | 1 | 0.400 | 0.300 | 0.350 | 3 | 0.100 | 0.150 |" in md
    console = Console(record=True, width=100)
    print_summary([run], console)
    assert "1: 0.300" in console.export_text()


def test_no_best_round_without_a_validation_split(tmp_path):
    """Never fall back to choosing on the unseen (test) scores."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 0, "rouge_l_unseen": 0.2}\n{"round": 1, "rouge_l_unseen": 0.5}\n')
    s = summarize(run)
    assert s["best_round"] is None and s["best_by"] is None and s["rouge_l_unseen_at_best"] is None
