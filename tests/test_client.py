import random

import pytest
import torch

from flexfed.client import LocalTrainer, collate, length_bucketed_batches, response_loss
from flexfed.config import load_config
from flexfed.data import encode_for_training
from flexfed.lora import Factors, init_adapter, lora_scale, target_shapes
from flexfed.models import tiny_llama


@pytest.fixture(scope="module")
def examples(tokenizer):
    pairs = [("Reverse the word.", w, w[::-1]) for w in ["apple", "river", "stone", "cloud", "green", "table", "music", "light"]]
    return [encode_for_training(tokenizer, d, x, y, 96, 16) for d, x, y in pairs]


def _trainer(tokenizer, *overrides, rank=4):
    config = load_config("tiny", [f"lora.rank={rank}", *overrides])
    model = tiny_llama()
    shapes = target_shapes(model, config.lora.target_modules)
    trainer = LocalTrainer(model, config.lora, config.training, tokenizer.pad_token_id)
    start = init_adapter(shapes, {n: rank for n in shapes}, config.lora.alpha, config.lora.rslora, seed=0)
    return trainer, start, config


def test_response_loss_equals_the_full_logits_loss(tokenizer, examples):
    model = tiny_llama()
    batch = collate(examples[:4], tokenizer.pad_token_id)
    full = model(**batch).loss
    torch.testing.assert_close(response_loss(model, batch), full, rtol=1e-5, atol=1e-5)


def test_length_buckets_cover_every_example_once():
    lengths = [random.Random(i).randint(5, 50) for i in range(37)]
    batches = length_bucketed_batches(lengths, 4, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(37))
    assert all(len(b) <= 4 for b in batches)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_training_lowers_the_loss_and_is_deterministic(tokenizer, examples, optimizer):
    lr = "0.01" if optimizer == "adamw" else "0.5"
    trainer, start, _ = _trainer(tokenizer, f"training.optimizer={optimizer}", f"training.lr={lr}", "training.local_steps=12", "training.precision=fp32")
    one = trainer.train("c1", start, examples, seed=3)
    two = trainer.train("c1", start, examples, seed=3)
    assert one.losses[-1] < one.losses[0]
    assert one.num_examples == len(examples) and len(one.losses) == 12
    # 12 steps of 4 from 8 examples = 6 whole epochs, each example's real tokens counted once each
    assert one.tokens == 6 * sum(len(e.input_ids) for e in examples)
    for n in start:
        assert torch.equal(one.adapter[n].a, two.adapter[n].a) and torch.equal(one.adapter[n].b, two.adapter[n].b)
        assert one.adapter[n].scale == lora_scale(4, 8)
    assert any(not torch.equal(one.adapter[n].b, start[n].b) for n in start)


def test_switching_rank_slots_leaves_other_clients_untouched(tokenizer, examples):
    trainer, start4, config = _trainer(tokenizer, "training.precision=fp32")
    shapes = {n: (f.b.shape[0], f.a.shape[1]) for n, f in start4.items()}
    start2 = init_adapter(shapes, {n: 2 for n in shapes}, config.lora.alpha, False, seed=1)
    first = trainer.train("a", start4, examples, seed=0)
    trainer.train("b", start2, examples, seed=0)
    again = trainer.train("a", start4, examples, seed=0)
    assert {f.rank for f in again.adapter.values()} == {4}
    for n in start4:
        assert torch.equal(first.adapter[n].b, again.adapter[n].b)
    assert len(trainer._slots) == 2  # one PEFT model, two adapter slots, no re-wrapping


def test_empty_client_is_an_error(tokenizer):
    trainer, start, _ = _trainer(tokenizer)
    with pytest.raises(ValueError, match="client empty: no training examples"):
        trainer.train("empty", start, [], seed=0)


def test_fed_sb_trains_only_the_core_between_fixed_frames(tokenizer, examples):
    from flexfed.aggregation import get_aggregator
    from flexfed.aggregation.fed_sb import sb_core, sb_factors
    from flexfed.lora import get_adapter

    trainer, plain, config = _trainer(tokenizer, "training.precision=fp32", "training.lr=0.01", "training.local_steps=6")
    shapes = {n: (f.b.shape[0], f.a.shape[1]) for n, f in plain.items()}
    agg = get_aggregator("fed-sb")
    frames = {n: agg.common(n, shapes[n], 4, lora_scale(4, 8), 0) for n in shapes}
    cores = {n: torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) * 0.1 for n in shapes}
    start = {n: sb_factors(f.b, cores[n], f.a, f.scale) for n, f in frames.items()}
    frames_before = {n: (f.b.clone(), f.a.clone()) for n, f in frames.items()}

    result = trainer.train("c1", start, examples, seed=3, trainable=("r",), frames=frames)
    assert result.losses[-1] < result.losses[0]
    layers = {n: m for n, m in trainer.peft_model.named_modules() if n.endswith("lora_A.ranks0")}
    assert all([n for n, _ in m.named_parameters()] == ["parametrizations.weight.original"] for m in layers.values())  # R alone
    for n, f in result.adapter.items():
        assert torch.equal(f.b, frames[n].b)  # B unchanged, bit for bit
        assert torch.equal(frames[n].b, frames_before[n][0]) and torch.equal(frames[n].a, frames_before[n][1])
        core = sb_core(f, frames[n].a)
        torch.testing.assert_close(core @ frames[n].a, f.a)  # the update lies in the A frame's row space
        assert not torch.allclose(core, cores[n])  # and R moved
    frame_buffers = [m.parametrizations.weight[0].frame for m in layers.values()]
    assert all(any(torch.equal(fb, f.a) for f in frames.values()) for fb in frame_buffers)

    # The same slot then serves plain LoRA: the parametrization is gone and A trains again.
    again = trainer.train("c2", plain, examples, seed=3)
    assert not any("parametrizations" in n for n, _ in trainer.peft_model.named_parameters())
    assert any(not torch.equal(again.adapter[n].a, plain[n].a) for n in plain)
    assert get_adapter(trainer.peft_model, "ranks0").keys() == plain.keys()


def test_base_update_sets_and_restores_the_base_weights(tokenizer, examples):
    trainer, start, _ = _trainer(tokenizer, "training.precision=fp32")
    name = sorted(start)[0]
    w0 = trainer.base_linear(name).weight.detach().clone()
    update = {n: Factors(b=torch.ones_like(f.b), a=f.a, scale=f.scale) for n, f in start.items()}
    trainer.set_base_update(update)
    trainer.set_base_update(update)  # never compounded
    torch.testing.assert_close(trainer.base_linear(name).weight, w0 + update[name].delta())
    trainer.train("c", start, examples[:4], seed=0)  # training does not touch the base
    torch.testing.assert_close(trainer.base_linear(name).weight, w0 + update[name].delta())
    trainer.set_base_update(None)
    assert torch.equal(trainer.base_linear(name).weight, w0)


def test_merged_inference_matches_the_adapter_and_restores_the_weights(tokenizer, examples):
    trainer, start, _ = _trainer(tokenizer, "training.precision=fp32", "training.local_steps=4", "training.lr=0.05")
    trained = trainer.train("c1", start, examples, seed=0).adapter  # B != 0: the merge changes the output
    batch = collate(examples[:4], tokenizer.pad_token_id)
    trainer.activate(trained)
    with torch.no_grad():
        through_adapter = trainer.peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    before = {n: p.detach().clone() for n, p in trainer.base_model.named_parameters()}
    with trainer.merged(trained) as model, torch.no_grad():
        merged = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(merged, through_adapter, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the adapter layers are on again, over the original weights
        assert torch.equal(trainer.peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, through_adapter)
    for n, p in trainer.base_model.named_parameters():
        assert torch.equal(p, before[n]), n  # put back bit for bit
    again = trainer.train("c1", start, examples, seed=0).adapter
    assert all(torch.equal(again[n].b, trained[n].b) for n in trained)
