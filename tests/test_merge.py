"""Offline aggregation of PEFT adapter directories (flexfed.merge)."""

from __future__ import annotations

import pytest
import torch

from flexfed.lora import ATTENTION, MLP, get_adapter, load_adapter, lora_scale, peft_config, save_adapter
from flexfed.merge import merge_adapters
from flexfed.models import TINY, tiny_llama

ALPHA = 16.0
# get_peft_model on a model built in memory (no hub id) renames the config's base model; harmless here
pytestmark = pytest.mark.filterwarnings("ignore:The PEFT config's `base_model_name_or_path` was renamed")



def module_names() -> list[str]:
    return [
        f"model.layers.{i}.{'self_attn' if kind in ATTENTION else 'mlp'}.{kind}"
        for i in range(2)
        for kind in ATTENTION + MLP
    ]


def write_client(path, ranks: dict[str, int], seed: int, alpha: float = ALPHA, rslora: bool = False, base: str = TINY):
    """Train-like client adapter: a PEFT model on the tiny Llama with random nonzero B, saved to ``path``."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(), peft_config(base, ranks, alpha, rslora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    adapter = get_adapter(model)
    save_adapter(path, adapter, base, alpha, rslora)
    return adapter


def truth(adapters, weights, name):
    total = sum(weights)
    return sum((w / total) * a[name].delta(torch.float64) for w, a in zip(weights, adapters))


def best_rank(m, r):
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    names = module_names()
    specs = [
        ({n: 4 for n in names}, ALPHA, False),
        ({n: (8 if n.endswith(MLP) else 2) for n in names}, ALPHA, False),
        ({n: 6 for n in names}, 8.0, True),  # another alpha, rsLoRA: read with its own scale
    ]
    dirs, adapters = [], []
    for i, (ranks, alpha, rslora) in enumerate(specs):
        dirs.append(root / f"client-{i}")
        adapters.append(write_client(dirs[-1], ranks, seed=i, alpha=alpha, rslora=rslora))
    return dirs, adapters


def test_flexlora_merge_round_trips_through_peft_files(clients, tmp_path):
    dirs, adapters = clients
    weights = [1.0, 2.0, 3.0]
    written = merge_adapters(dirs, "flexlora", out=tmp_path / "out", weights=weights, ranks=[3, 40])
    assert written == [tmp_path / "out" / "rank-3", tmp_path / "out" / "rank-40"]
    for path, r in zip(written, (3, 40)):
        merged = load_adapter(path)
        assert merged.base_model == TINY and merged.alpha == ALPHA and not merged.rslora
        for name in module_names():
            f = merged.adapter[name]
            d, k = f.shape
            assert f.rank == min(r, d, k)  # uniform rank, capped by the module's shape
            assert f.scale == lora_scale(f.rank, ALPHA)
            expected = best_rank(truth(adapters, weights, name), f.rank)
            assert torch.allclose(f.delta(torch.float64), expected, atol=1e-5 * float(expected.norm()))


def test_merged_adapter_loads_in_peft_with_the_expected_weight_delta(clients, tmp_path):
    from peft import PeftModel

    dirs, adapters = clients
    (out,) = merge_adapters(dirs, "flexlora", out=tmp_path / "one", ranks=[5])
    assert out == tmp_path / "one"
    model = PeftModel.from_pretrained(tiny_llama(), str(out))
    checked = 0
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            base_name = name.removeprefix("base_model.model.")
            expected = best_rank(truth(adapters, [1, 1, 1], base_name), 5)
            delta = module.get_delta_weight("default").double()
            assert torch.allclose(delta, expected, atol=1e-5 * float(expected.norm()))
            checked += 1
    assert checked == len(module_names())


@pytest.mark.parametrize("method", ["hetlora", "flora"])
def test_other_heterogeneous_methods_merge(clients, tmp_path, method):
    dirs, adapters = clients
    (out,) = merge_adapters(dirs, method, out=tmp_path / method, weights=[1, 1, 2])
    merged = load_adapter(out)
    name = "model.layers.0.mlp.up_proj"
    if method == "flora":  # exact stacked sum of ranks 4 + 8 + 6
        assert merged.adapter[name].rank == 18
        assert torch.allclose(merged.adapter[name].delta(torch.float64), truth(adapters, [1, 1, 2], name), atol=1e-6)
        with pytest.raises(ValueError, match="do not pass ranks"):
            merge_adapters(dirs, method, out=tmp_path / "x", ranks=[4])
    else:
        assert merged.adapter[name].rank == 8  # the largest input rank


def test_homogeneous_methods_need_one_rank(clients, tmp_path):
    dirs, _ = clients
    with pytest.raises(ValueError, match="same rank"):
        merge_adapters(dirs, "fedit", out=tmp_path / "fedit")
    (out,) = merge_adapters([dirs[0], dirs[0]], "fedit", out=tmp_path / "fedit-ok")
    assert load_adapter(out).adapter["model.layers.1.self_attn.k_proj"].rank == 4
    with pytest.raises(ValueError, match="common rank 4"):
        merge_adapters([dirs[0], dirs[0]], "fedit", out=tmp_path / "fedit-2", ranks=[2])


def test_merge_errors_name_the_offending_directory(clients, tmp_path):
    dirs, _ = clients
    other_base = tmp_path / "other-base"
    write_client(other_base, {n: 4 for n in module_names()}, seed=5, base="some/other-model")
    with pytest.raises(ValueError, match=f"{other_base}: base model 'some/other-model'"):
        merge_adapters([dirs[0], other_base], "flexlora", out=tmp_path / "o1")
    attention_only = tmp_path / "attention-only"
    write_client(attention_only, {n: 4 for n in module_names() if n.endswith(ATTENTION)}, seed=6)
    with pytest.raises(ValueError, match=f"{attention_only}: adapts different modules"):
        merge_adapters([dirs[0], attention_only], "flexlora", out=tmp_path / "o2")
    with pytest.raises(ValueError, match="2 weights for 3 adapter directories"):
        merge_adapters(dirs, "flexlora", out=tmp_path / "o3", weights=[1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        merge_adapters(dirs, "flexlora", out=tmp_path / "o4", weights=[1, -2, 1])
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        merge_adapters([dirs[0], tmp_path / "missing"], "flexlora", out=tmp_path / "o5")
    with pytest.raises(ValueError, match="unknown aggregation method"):
        merge_adapters(dirs, "fedavg", out=tmp_path / "o6")
    with pytest.raises(ValueError, match="positive"):
        merge_adapters(dirs, "flexlora", out=tmp_path / "o7", ranks=[0])
