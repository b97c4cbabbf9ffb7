import pytest
import torch

from flexfed.lora import lora_scale
from flexfed.aggregation.sparse import attach, average_updates, dense_delta, detach, lora_start, sparse_indices

SHAPES = {"m.q_proj": (12, 10), "m.k_proj": (6, 10)}


def test_indices_are_seeded_sorted_unique_and_sized():
    a, b, c = sparse_indices(SHAPES, 0.1, 0), sparse_indices(SHAPES, 0.1, 0), sparse_indices(SHAPES, 0.1, 1)
    for name, (d, k) in SHAPES.items():
        assert torch.equal(a[name], b[name])
        assert len(a[name]) == round(0.1 * d * k) == len(torch.unique(a[name]))
        assert torch.all(a[name][1:] > a[name][:-1]) and a[name].max() < d * k
    assert not torch.equal(a["m.q_proj"], c["m.q_proj"])
    with pytest.raises(ValueError, match="density"):
        sparse_indices(SHAPES, 0.0, 0)


def test_average_is_the_weighted_mean_of_the_dense_updates():
    idx = sparse_indices(SHAPES, 0.3, 0)
    g = torch.Generator().manual_seed(0)
    ups = [{n: torch.randn(len(i), generator=g) for n, i in idx.items()} for _ in range(3)]
    mean = average_updates(ups, [1, 2, 5])
    for n, shape in SHAPES.items():
        want = sum(w / 8 * dense_delta(shape, idx[n], u[n].double()) for w, u in zip([1, 2, 5], ups))
        torch.testing.assert_close(dense_delta(shape, idx[n], mean[n].double()), want, rtol=1e-6, atol=1e-7)
    bad = dict(ups[0], **{"m.q_proj": torch.full_like(ups[0]["m.q_proj"], float("nan"))})
    with pytest.raises(ValueError, match="non-finite"):
        average_updates([ups[0], bad], [1, 1])


def test_lora_start_recovers_a_low_rank_update_exactly_with_per_rank_scale():
    g = torch.Generator().manual_seed(1)
    idx = sparse_indices(SHAPES, 1.0, 0)
    want = {n: torch.randn(d, 2, generator=g, dtype=torch.float64) @ torch.randn(2, k, generator=g, dtype=torch.float64) for n, (d, k) in SHAPES.items()}
    values = {n: want[n].reshape(-1)[idx[n]].float() for n in SHAPES}
    scale = lambda r: lora_scale(r, 16.0)  # noqa: E731
    adapter, kept = lora_start(SHAPES, idx, values, {"m.q_proj": 4, "m.k_proj": 3}, scale)
    assert kept == pytest.approx(1.0, abs=1e-6)
    for n in SHAPES:
        assert adapter[n].scale == scale(adapter[n].rank)
        torch.testing.assert_close(adapter[n].delta(torch.float64), want[n], rtol=1e-5, atol=1e-5)


def test_sparse_delta_trains_only_the_chosen_entries_and_detach_restores_the_base():
    torch.manual_seed(0)
    linear = torch.nn.Linear(10, 12, bias=False)
    linear.weight.requires_grad_(False)
    base = linear.weight.detach().clone()
    idx = sparse_indices({"l": (12, 10)}, 0.2, 0)
    start = {"l": torch.randn(len(idx["l"]))}
    params = attach({"l": linear}, idx, start)
    x = torch.randn(3, 10)
    out = linear(x)
    torch.testing.assert_close(out, x @ (base + dense_delta((12, 10), idx["l"], start["l"])).T)
    out.square().sum().backward()
    assert params["l"].grad is not None and params["l"].grad.shape == (len(idx["l"]),)
    detach({"l": linear})
    assert torch.equal(linear.weight, base) and not linear.weight.requires_grad


def test_slora_stage_then_flexlora_runs_resumes_bit_exact_and_accounts_bytes(tiny_config):
    import json

    from safetensors.torch import load_file

    from flexfed.engines.simulation import Simulation
    from flexfed.server import load_checkpoint

    overrides = ["federation.method=flexlora", "resources.distribution=uniform", "federation.rounds=3",
                 "federation.sparse_stage.rounds=2", "federation.sparse_stage.density=0.05"]
    config = tiny_config("name=slora", *overrides)
    sim = Simulation(config)
    run_dir = sim.run(show_progress=False, stop_after=1)
    mid = load_checkpoint(run_dir)
    assert mid.round == 1 and mid.sparse and all(v.abs().sum() > 0 for v in mid.sparse.values())
    Simulation(config).run(resume=True, show_progress=False)
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [m.get("stage") for m in metrics] == [None, "sparse", "sparse", "lora"]
    values = sum(len(i) for i in sim.protocol.sparse.indices.values()) * 4
    for m in metrics[1:3]:
        assert all(c["bytes_up"] == c["bytes_down"] == values for c in m["clients"])
    end = load_checkpoint(run_dir)
    assert not end.sparse and any(f.b.abs().sum() > 0 for f in end.global_adapter.values())

    straight = Simulation(tiny_config("name=slora-straight", *overrides)).run(show_progress=False)
    a = load_file(str(run_dir / "adapters/round-0003/adapter_model.safetensors"))
    b = load_file(str(straight / "adapters/round-0003/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sparse_stage_is_refused_where_it_cannot_run(tiny_config):
    from flexfed.config import ConfigError
    from flexfed.engines.flower.serverapp import check_supported
    from flexfed.engines.simulation import Simulation

    with pytest.raises((ConfigError, ValueError), match="sparse_stage.rounds"):
        tiny_config("federation.rounds=2", "federation.sparse_stage.rounds=2")
    with pytest.raises(ValueError, match="needs a method that trains both factors"):
        Simulation(tiny_config("federation.method=ffa-lora", "federation.rounds=2", "federation.sparse_stage.rounds=1"))
    with pytest.raises(ValueError, match="simulation engine only"):
        check_supported(tiny_config("federation.rounds=2", "federation.sparse_stage.rounds=1"))
