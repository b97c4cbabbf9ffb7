"""The hand-fused pieces of the bf16 step (``flexfed.fused``): exact algebra in float64, bf16
within rounding of the eager modules, and where the trainer installs them."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from flexfed.client import LocalTrainer
from flexfed.config import load_config
from flexfed.fused import LoraBranch, LowPrecisionBranch, RMSNorm, fuse_rms_norms
from flexfed.lora import Factors, init_adapter, lora_modules, target_shapes
from flexfed.models import tiny_llama


def _branch_inputs(dtype, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, generator=g, dtype=torch.float64).to(dtype)
    result = torch.randn(2, 5, 7, generator=g, dtype=torch.float64).to(dtype)
    a = torch.randn(3, 12, generator=g, dtype=torch.float64)
    b = torch.randn(7, 3, generator=g, dtype=torch.float64)
    return [t.requires_grad_(requires_grad) for t in (x, result, a, b)]


def test_lora_branch_gradients_are_exact_in_float64():
    x, result, a, b = _branch_inputs(torch.float64)
    assert torch.autograd.gradcheck(lambda *t: LoraBranch.apply(*t, 0.75), (x, result, a, b))


def test_lora_branch_equals_peft_formula_and_keeps_factor_gradients_float32():
    x64, r64, a64, b64 = _branch_inputs(torch.float64)
    (r64 + (x64 @ a64.T @ b64.T) * 2.0).square().sum().backward()
    x, result, a, b = _branch_inputs(torch.bfloat16, requires_grad=False)
    x.requires_grad_(), result.requires_grad_()
    a, b = a.float().requires_grad_(), b.float().requires_grad_()
    out = LoraBranch.apply(x, result, a, b, 2.0)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    for ours, exact in ((out.detach(), r64 + (x64 @ a64.T @ b64.T) * 2.0), (x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        assert (ours.double() - exact.detach()).norm() <= 0.03 * exact.norm()  # bf16 inputs and GEMMs


def test_rms_norm_matches_llama_and_its_gradient_is_exact():
    norm = LlamaRMSNorm(12, eps=1e-5).double().requires_grad_(False)
    norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: RMSNorm.apply(t, norm.weight, 1e-5), (x,))
    x32, w32 = x.detach().float(), norm.weight.float()
    assert torch.equal(RMSNorm.apply(x32, w32, 1e-5), norm.float()(x32))

    low, x16 = LlamaRMSNorm(12).to(torch.bfloat16).requires_grad_(False), x.detach().to(torch.bfloat16)
    low.weight.copy_(norm.weight)
    assert torch.equal(RMSNorm.apply(x16, low.weight, low.variance_epsilon), low(x16))  # Transformers' forward, op for op

    kept = x32.clone()
    RMSNorm.apply(x32, w32, 1e-5)
    assert torch.equal(x32, kept)  # a float32 input is not normalised in place


def test_fused_norm_defers_to_the_module_while_its_weight_trains():
    model = tiny_llama()
    assert fuse_rms_norms(model) == 2 * model.config.num_hidden_layers + 1
    norm = model.model.norm
    norm.weight.requires_grad_(True)
    norm(torch.randn(2, 3, model.config.hidden_size)).sum().backward()
    assert norm.weight.grad is not None


@pytest.mark.parametrize("setting, fused", [("bf16", True), ("fp32", False)])
def test_trainer_installs_the_fused_pieces_on_the_bf16_path_only(tokenizer, setting, fused):
    config = load_config("tiny", ["lora.rank=4", f"training.precision={setting}"])
    model = tiny_llama()
    shapes = target_shapes(model, config.lora.target_modules)
    trainer = LocalTrainer(model, config.lora, config.training, tokenizer.pad_token_id)
    start = init_adapter(shapes, {n: 4 for n in shapes}, config.lora.alpha, config.lora.rslora, seed=0)
    name = trainer.activate(start)
    layers = lora_modules(trainer.peft_model).values()
    assert all(isinstance(layer.lora_variant.get(name), LowPrecisionBranch) == fused for layer in layers)
    assert ("forward" in vars(model.model.norm)) == fused
    layer = next(iter(layers))  # PEFT's merge and unmerge work through the variant too
    weight = layer.get_base_layer().weight.detach().clone()
    layer.lora_B[name].weight.data.normal_()
    layer.merge(safe_merge=True)
    assert not torch.equal(layer.get_base_layer().weight, weight)
    layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, weight, rtol=0.02, atol=0.02)


def test_fed_sb_core_trains_through_the_fused_branch(tokenizer):
    """Fed-SB's A is a parametrized R @ frame: the branch's gradient of A reaches R; B stays."""
    config = load_config("tiny", ["lora.rank=4", "training.precision=bf16", "training.local_steps=3", "training.lr=0.05"])
    model = tiny_llama()
    shapes = target_shapes(model, config.lora.target_modules)
    trainer = LocalTrainer(model, config.lora, config.training, tokenizer.pad_token_id)
    start = init_adapter(shapes, {n: 4 for n in shapes}, config.lora.alpha, config.lora.rslora, seed=0)
    start = {n: Factors(b=torch.randn_like(f.b) * 0.1, a=f.a, scale=f.scale) for n, f in start.items()}
    frames = dict(start)  # the core R starts at the identity
    from flexfed.data import encode_for_training

    examples = [encode_for_training(tokenizer, "Copy.", w, w, 48, 8) for w in ("alpha", "beta", "gamma", "delta")]
    result = trainer.train("c0", start, examples, seed=0, trainable=("r",), frames=frames)
    for n, f in result.adapter.items():
        assert torch.equal(f.b, start[n].b)
    assert any(not torch.allclose(f.a, start[n].a) for n, f in result.adapter.items())


def test_without_gradients_the_branch_is_pefts_own(tokenizer):
    """Evaluation through the bf16 slot computes exactly what PEFT's plain branch computes."""
    from flexfed.client import collate, response_loss
    from flexfed.data import encode_for_training

    config = load_config("tiny", ["lora.rank=4", "training.precision=bf16"])
    model = tiny_llama()
    shapes = target_shapes(model, config.lora.target_modules)
    trainer = LocalTrainer(model, config.lora, config.training, tokenizer.pad_token_id)
    start = init_adapter(shapes, {n: 4 for n in shapes}, config.lora.alpha, config.lora.rslora, seed=0)
    name = trainer.activate({n: Factors(b=torch.randn_like(f.b), a=f.a, scale=f.scale) for n, f in start.items()})
    batch = collate([encode_for_training(tokenizer, "Copy.", w, w, 48, 8) for w in ("alpha", "gamma")], tokenizer.pad_token_id)
    with torch.no_grad():
        ours = response_loss(trainer.peft_model, batch)
        for layer in lora_modules(trainer.peft_model).values():
            del layer.lora_variant[name]
            layer.cast_input_dtype_enabled = True
        assert torch.equal(ours, response_loss(trainer.peft_model, batch))
