import math

import pytest
import torch
from peft import PeftModel

from flexfed.lora import Factors, init_adapter, load_adapter, lora_scale, save_adapter, target_shapes
from flexfed.models import TINY, tiny_llama


def test_scale_rules():
    assert lora_scale(8, 16) == 2.0
    assert lora_scale(16, 16, rslora=True) == 4.0
    with pytest.raises(ValueError):
        lora_scale(0, 16)


def test_factors_must_chain():
    with pytest.raises(ValueError, match="do not chain"):
        Factors(b=torch.zeros(4, 2), a=torch.zeros(3, 5), scale=1.0)


def _random_adapter(shapes, ranks, alpha, rslora=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        n: Factors(b=torch.randn(shapes[n][0], ranks[n], generator=g), a=torch.randn(ranks[n], shapes[n][1], generator=g), scale=lora_scale(ranks[n], alpha, rslora))
        for n in shapes
    }


@pytest.mark.parametrize("rslora", [False, True])
def test_saved_adapter_loads_in_peft_with_mixed_ranks_and_applies_its_math(tmp_path, rslora):
    model = tiny_llama()
    shapes = target_shapes(model, ["q_proj", "v_proj", "up_proj"])
    ranks = {n: (3 if "up_proj" in n else 5) for n in shapes}
    ranks["model.layers.1.self_attn.q_proj"] = 7  # one odd module: needs rank_pattern by full name
    adapter = _random_adapter(shapes, ranks, alpha=12, rslora=rslora)
    save_adapter(tmp_path, adapter, TINY, alpha=12, rslora=rslora)

    loaded = load_adapter(tmp_path)
    assert loaded.alpha == 12 and loaded.rslora == rslora and loaded.base_model == TINY
    assert loaded.target_modules == ("q_proj", "up_proj", "v_proj")
    for n, f in adapter.items():
        assert torch.equal(loaded.adapter[n].a, f.a) and torch.equal(loaded.adapter[n].b, f.b)
        assert math.isclose(loaded.adapter[n].scale, f.scale)

    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    merged = peft_model.merge_and_unload()
    base = dict(tiny_llama().named_parameters())
    for n, f in adapter.items():
        got = dict(merged.named_parameters())[f"{n}.weight"] - base[f"{n}.weight"]
        torch.testing.assert_close(got, f.delta(), rtol=1e-4, atol=1e-5)


def test_save_refuses_a_scale_that_is_not_the_rule(tmp_path):
    adapter = {"m.q_proj": Factors(b=torch.zeros(4, 2), a=torch.zeros(2, 4), scale=1.0)}
    with pytest.raises(ValueError, match="not s\\(2\\)"):
        save_adapter(tmp_path, adapter, TINY, alpha=16)


def test_load_errors_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_adapter(tmp_path)


def test_init_adapter_is_a_zero_update_and_seeded():
    shapes = {"a.q_proj": (8, 6), "a.v_proj": (4, 6)}
    one = init_adapter(shapes, {"a.q_proj": 3, "a.v_proj": 2}, alpha=16, rslora=False, seed=1)
    two = init_adapter(shapes, {"a.q_proj": 3, "a.v_proj": 2}, alpha=16, rslora=False, seed=1)
    for n in shapes:
        assert torch.count_nonzero(one[n].delta()) == 0
        assert torch.equal(one[n].a, two[n].a)
        assert one[n].a.abs().max() <= 1 / math.sqrt(6)


def test_target_shapes_finds_layers_and_rejects_unknown_kinds():
    model = tiny_llama()
    shapes = target_shapes(model, ["k_proj", "down_proj"])
    assert shapes["model.layers.0.self_attn.k_proj"] == (32, 64)
    assert shapes["model.layers.1.mlp.down_proj"] == (64, 160)
    with pytest.raises(ValueError, match="qq_proj"):
        target_shapes(model, ["qq_proj"])
