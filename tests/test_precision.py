"""The bf16 training path (``flexfed.precision``): what it resolves to, and that it trains like fp32."""

import pytest
import torch

from flexfed import precision
from flexfed.client import LocalTrainer, collate, response_loss
from flexfed.config import load_config
from flexfed.data import encode_for_training
from flexfed.evaluation import generate_ids
from flexfed.lora import Factors, init_adapter, lora_modules, target_shapes
from flexfed.models import tiny_llama

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def examples(tokenizer):
    words = ["apple", "river", "stone", "cloud", "green", "table", "music", "light", "ocean", "tiger", "paper", "glass"]
    return [encode_for_training(tokenizer, "Reverse the word." * (1 + i % 4), w, w[::-1], 96, 16) for i, w in enumerate(words)]


def _trainer(tokenizer, precision_setting, *overrides, writes_base=False):
    config = load_config("tiny", ["lora.rank=4", f"training.precision={precision_setting}", *overrides])
    model = tiny_llama()
    shapes = target_shapes(model, config.lora.target_modules)
    trainer = LocalTrainer(model, config.lora, config.training, tokenizer.pad_token_id, writes_base=writes_base)
    start = init_adapter(shapes, {n: 4 for n in shapes}, config.lora.alpha, config.lora.rslora, seed=0)
    return trainer, start


def test_settings_resolve_per_machine_and_method(monkeypatch):
    assert precision.resolve("fp32", CPU) == "fp32"
    assert precision.resolve("autocast", CPU) == "autocast"
    assert precision.resolve("bf16", CPU) == "bf16"
    monkeypatch.setattr(precision, "bf16_native", lambda device: True)
    assert precision.resolve("auto", CPU) == "bf16"
    assert precision.resolve("auto", CPU, writes_base=True) == "fp32"  # FLoRA, SLoRA, FedKSeed keep fp32 bases
    monkeypatch.setattr(precision, "bf16_native", lambda device: False)
    assert precision.resolve("auto", CPU) == "fp32"  # emulated bf16 is slower than fp32
    with pytest.raises(ValueError, match="writes into the base weights"):
        precision.resolve("bf16", CPU, writes_base=True)


def test_methods_that_write_the_base_say_so():
    assert load_config("tiny", ["federation.method=flora"]).federation.writes_base
    assert load_config("tiny", ["federation.method=fedkseed", "training.precision=fp32"]).federation.writes_base
    assert not load_config("tiny", ["federation.method=flexlora"]).federation.writes_base


def test_bf16_stores_the_base_in_bf16_and_trains_fp32_factors(tokenizer, examples):
    trainer, start = _trainer(tokenizer, "bf16")
    assert trainer.autocast is None and trainer.pad_multiple == precision.PAD_MULTIPLE
    assert all(p.dtype == torch.bfloat16 for n, p in trainer.base_model.named_parameters() if "lora_" not in n)
    result = trainer.train("c0", start, examples, seed=0)
    factors = [p for n, p in trainer.peft_model.named_parameters() if "lora_" in n]
    assert factors and all(p.dtype == torch.float32 for p in factors)
    assert all(f.a.dtype == torch.float32 and f.b.dtype == torch.float32 for f in result.adapter.values())


def test_bf16_training_matches_fp32_within_tolerance(tokenizer, examples):
    """Same start, seed and batches: per-step losses within 2% and the learned updates s·B·A within
    10% (relative Frobenius) of fp32's; bf16 rounds the activations, not the factors."""
    results = {}
    for setting in ("fp32", "bf16"):
        trainer, start = _trainer(tokenizer, setting, "training.local_steps=8", "training.lr=0.01")  # the same start both times
        results[setting] = trainer.train("c0", start, examples, seed=3)
    fp32, bf16 = results["fp32"], results["bf16"]
    torch.testing.assert_close(torch.tensor(bf16.losses), torch.tensor(fp32.losses), rtol=0.02, atol=0.0)
    assert fp32.losses[-1] < fp32.losses[0] and bf16.losses[-1] < bf16.losses[0]
    for name, f in fp32.adapter.items():
        learned = f.delta(torch.float32) - start[name].delta(torch.float32)
        gap = bf16.adapter[name].delta(torch.float32) - f.delta(torch.float32)
        assert gap.norm() <= 0.1 * learned.norm(), name


def test_padding_to_a_multiple_leaves_the_loss_unchanged(tokenizer, examples):
    model = tiny_llama()
    exact, padded = collate(examples[:3], tokenizer.pad_token_id), collate(examples[:3], tokenizer.pad_token_id, multiple=16)
    assert padded["input_ids"].shape[1] % 16 == 0 and padded["input_ids"].shape[1] >= exact["input_ids"].shape[1]
    torch.testing.assert_close(response_loss(model, padded), response_loss(model, exact), rtol=1e-5, atol=1e-6)


def test_fp32_attention_keeps_padding_masked(tokenizer):
    """Left-padded rows (generation's layout) score the same through ``flexfed_sdpa`` as through
    Transformers' SDPA: the custom attention keeps the padding mask."""
    model, reference = tiny_llama(), tiny_llama()
    precision.use_bf16_weights(model)
    reference.to(torch.bfloat16)
    ids = torch.tensor([[tokenizer.pad_token_id] * 5 + list(range(10, 21)), list(range(30, 46))])
    mask = (torch.arange(16) >= torch.tensor([[5], [0]])).long()
    with torch.enable_grad():  # the float32 branch
        ours = model(input_ids=ids, attention_mask=mask).logits.float()
    theirs = reference(input_ids=ids, attention_mask=mask).logits.float()
    torch.testing.assert_close(ours[:, 5:], theirs[:, 5:], rtol=0.05, atol=0.05)


def test_bf16_evaluation_keeps_the_adapter_as_a_branch(tokenizer, examples):
    trainer, start = _trainer(tokenizer, "bf16")
    adapter = {n: Factors(b=torch.randn_like(f.b) * 0.5, a=f.a, scale=f.scale) for n, f in start.items()}
    trainer.activate(adapter)
    before = {n: layer.get_base_layer().weight.clone() for n, layer in lora_modules(trainer.peft_model).items()}
    batch = collate(examples[:2], tokenizer.pad_token_id)
    with torch.no_grad():
        through_branch = response_loss(trainer.peft_model, batch)
        with trainer.merged(adapter) as model:
            evaluated = response_loss(model, batch)
            prompts = [e.input_ids[:8] for e in examples[:3]]
            assert len(generate_ids(model, tokenizer, prompts, 4, 2)) == 3  # bf16 head: the contiguous-input path
    assert evaluated == through_branch  # no bf16 rounding of W + s·B·A
    after = {n: layer.get_base_layer().weight for n, layer in lora_modules(trainer.peft_model).items()}
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_explicit_bf16_refused_for_a_method_that_writes_the_base(tokenizer):
    with pytest.raises(ValueError, match="fp32 or auto"):
        _trainer(tokenizer, "bf16", writes_base=True)
