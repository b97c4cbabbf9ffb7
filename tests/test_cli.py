import torch

from flexfed.cli import main
from flexfed.lora import Factors, load_adapter, lora_scale, save_adapter
from flexfed.models import TINY


def _adapter(rank, seed, alpha=16):
    g = torch.Generator().manual_seed(seed)
    names = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.self_attn.v_proj": (32, 64)}
    return {n: Factors(b=torch.randn(o, rank, generator=g), a=torch.randn(rank, i, generator=g), scale=lora_scale(rank, alpha)) for n, (o, i) in names.items()}


def test_aggregate_command_writes_one_adapter_per_rank(tmp_path):
    a, b = _adapter(4, 0), _adapter(8, 1)
    save_adapter(tmp_path / "a", a, TINY, alpha=16)
    save_adapter(tmp_path / "b", b, TINY, alpha=16)
    out = tmp_path / "out"
    code = main(["aggregate", "--method", "flexlora", "--weights", "1,3", "--rank", "12,4", "--out", str(out), str(tmp_path / "a"), str(tmp_path / "b")])
    assert code == 0
    full = load_adapter(out / "rank-12").adapter
    for name in a:
        expected = 0.25 * a[name].delta() + 0.75 * b[name].delta()  # rank 12 = 4 + 8: exact
        torch.testing.assert_close(full[name].delta(), expected, rtol=1e-4, atol=1e-4)
    assert {f.rank for f in load_adapter(out / "rank-4").adapter.values()} == {4}


def test_run_then_report(tmp_path):
    assert main(["run", "--config", "tiny", "--quiet", "--set", f"output_dir={tmp_path}", "--set", "federation.rounds=1"]) == 0
    assert (tmp_path / "tiny" / "report" / "summary.md").exists()
    assert main(["report", str(tmp_path / "tiny")]) == 0


def test_bad_config_exits_with_a_message(tmp_path, caplog):
    assert main(["run", "--config", "tiny", "--set", "training.lrr=1", "--set", f"output_dir={tmp_path}"]) == 2
    assert "training.lrr: unknown key" in caplog.text
