"""Client-level DP: clipping in each method's space, noise calibrated to the weights, ε from
Opacus's accountant, and no change at all when the mechanism is inert (σ = 0, huge clip)."""

import json
import math

import pytest
import torch

from flexfed.aggregation.space import SPACES, move_update, moved_parts, update_norm
from flexfed.config import ConfigError
from flexfed.engines.simulation import Simulation, run
from flexfed.lora import Factors
from flexfed.privacy import add_noise, clip, epsilon, noise_std
from flexfed.server import load_checkpoint

FAST = ["eval.seen_examples=2", "eval.unseen_examples=2", "eval.validation_examples=0"]
METHODS = [
    ("fedit", "homogeneous", {}),
    ("ffa-lora", "homogeneous", {}),
    ("fed-sb", "homogeneous", {}),
    ("hetlora", "uniform", {"sparsity_weighted": False, "prune": False}),
    ("flexlora", "uniform", {}),
]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _factors(d, k, r, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return Factors(b=torch.randn(d, r, generator=g), a=torch.randn(r, k, generator=g), scale=scale)


def _method_settings(method, distribution, options):
    opts = "{" + ", ".join(f"{k}: {str(v).lower()}" for k, v in options.items()) + "}"
    return [f"federation.method={method}", f"resources.distribution={distribution}", f"federation.method_options={opts}"]


def _updates(server, state, seed=0):
    """Each sampled client's start, moved by a random change in its trained factors (no training)."""
    g = torch.Generator().manual_seed(seed)
    link, out = server.link, []
    for c in server.sample(1):
        start = link.receive(server.downlink(state, c), server.ranks_of(c))
        moved, parts = {}, moved_parts(link.aggregator.trainable)  # Fed-SB's R moves a = R A (the wire keeps R)
        for n, f in start.items():
            b = f.b + 0.01 * torch.randn(f.b.shape, generator=g) if "b" in parts else f.b
            a = f.a + 0.01 * torch.randn(f.a.shape, generator=g) if "a" in parts else f.a
            moved[n] = Factors(b=b, a=a, scale=f.scale)
        out.append(server.receive(c, link.send(moved, server.ranks_of(c))))  # through the wire, as a client's
    return out


def _equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[n].a, b[n].a) and torch.equal(a[n].b, b[n].b) and a[n].scale == b[n].scale for n in a)


# ----------------------------------------------------------------------------- the mechanism


def test_product_space_clipping_goes_through_the_factors_and_matches_the_dense_clip():
    start = {"m": _factors(12, 9, 3, 0)}
    update = {"m": _factors(12, 9, 3, 1)}
    dense = update["m"].delta(torch.float64) - start["m"].delta(torch.float64)
    assert update_norm("product", ("a", "b"), start, update) == pytest.approx(float(dense.norm()), rel=1e-10)
    clipped, norm = clip("product", ("a", "b"), start, update, 1.5)
    assert norm == pytest.approx(float(dense.norm()), rel=1e-10)
    moved = clipped["m"].delta(torch.float64) - start["m"].delta(torch.float64)
    assert float(moved.norm()) == pytest.approx(1.5, rel=1e-5)
    assert torch.allclose(moved, dense * (1.5 / norm), atol=1e-5)


def test_factor_space_clipping_moves_only_the_trained_factors():
    start = {"m": _factors(6, 5, 2, 0)}
    trained = {"m": Factors(b=start["m"].b + 3.0, a=start["m"].a, scale=start["m"].scale)}  # FFA-LoRA: only B moved
    clipped, norm = clip("factors", ("b",), start, trained, 1.0)
    assert norm == pytest.approx(3.0 * math.sqrt(12))
    assert clipped["m"].a is trained["m"].a  # the frozen A is untouched, bit for bit
    assert float((clipped["m"].b - start["m"].b).norm()) == pytest.approx(1.0, rel=1e-6)
    same, _ = clip("factors", ("b",), start, trained, 1e9)
    assert same["m"] is trained["m"]  # within the bound: the update itself, not a multiple of it


def test_noise_std_follows_the_weights_and_the_noise_has_it():
    assert noise_std(1.2, 0.5, [0.25] * 4) == pytest.approx(1.2 * 0.5 / 4)  # uniform: σ S / m
    assert noise_std(1.2, 0.5, [0.7, 0.1, 0.2]) == pytest.approx(1.2 * 0.5 * 0.7)  # the heaviest client decides
    zero = {"m": Factors(b=torch.zeros(300, 4), a=torch.zeros(4, 200), scale=1.0)}
    noisy = add_noise(("a", "b"), zero, 0.3, torch.Generator().manual_seed(0))
    assert float(noisy["m"].b.std()) == pytest.approx(0.3, rel=0.05) and float(noisy["m"].a.std()) == pytest.approx(0.3, rel=0.05)
    only_b = add_noise(("b",), zero, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(only_b["m"].a, zero["m"].a)
    # Fed-SB: noise drawn for the r x r core, carried as Z A with A's rows orthonormal
    frame = torch.linalg.qr(torch.randn(200, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0].mT.float()
    core = add_noise(("r",), zero, 0.3, torch.Generator().manual_seed(0), {"m": Factors(b=zero["m"].b, a=frame, scale=1.0)})
    z = core["m"].a.double() @ frame.double().mT
    assert torch.allclose(z @ frame.double(), core["m"].a.double(), atol=1e-5)  # within the frame's row space


def test_epsilon_is_opacus_rdp_and_prv():
    from opacus.accountants import PRVAccountant, RDPAccountant

    rdp = RDPAccountant()
    prv = PRVAccountant()
    for _ in range(7):
        rdp.step(noise_multiplier=0.9, sample_rate=0.2)
        prv.step(noise_multiplier=0.9, sample_rate=0.2)
    assert epsilon(0.9, 0.2, 7, 1e-5, "rdp") == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-12)
    assert epsilon(0.9, 0.2, 7, 1e-5, "prv") == pytest.approx(prv.get_epsilon(1e-5), rel=1e-6)
    assert epsilon(0.9, 0.2, 0, 1e-5) == 0.0 and epsilon(0.0, 0.2, 3, 1e-5) == math.inf


# ----------------------------------------------------------------------------- in a run


def test_epsilon_on_every_round_matches_the_accountant_computed_independently(tiny_config):
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    config = tiny_config("federation.rounds=3", "eval.every=3", "privacy.clip_norm=0.05", "privacy.noise_multiplier=1.3", "privacy.delta=1e-4", *FAST)
    sim = Simulation(config)
    sim.run(show_progress=False)
    metrics = _metrics(config.run_dir)
    n = metrics[0]["clients_registered"]
    per_round = len(sim.server.sample(1))
    q = per_round / n
    assert q == pytest.approx(math.ceil(config.federation.sample_fraction * n) / n)
    assert metrics[0]["epsilon"] == 0.0
    for m in metrics[1:]:
        orders = RDPAccountant.DEFAULT_ALPHAS
        expected, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=1.3, steps=m["round"], orders=orders), delta=1e-4)
        assert m["epsilon"] == pytest.approx(expected, rel=1e-12)
        assert m["defence"]["noise_std"] == pytest.approx(1.3 * 0.05 / m["clients_reported"])  # equal shards: σ S / m
    assert metrics[1]["epsilon"] < metrics[2]["epsilon"] < metrics[3]["epsilon"]
    from flexfed.report import summarize, write_report

    assert summarize(config.run_dir)["epsilon"] == metrics[-1]["epsilon"]  # and the report says it
    assert f"| {config.name} | {metrics[-1]['epsilon']:.3g} | 0.0001 | 1.3 | 0.05 | rdp |" in (write_report([config.run_dir]) / "summary.md").read_text()


@pytest.mark.parametrize("method, distribution, options", METHODS)
def test_sigma_zero_and_a_huge_clip_equal_the_plain_aggregate_bit_for_bit(tiny_config, method, distribution, options):
    settings = _method_settings(method, distribution, options)
    plain = Simulation(tiny_config(*settings)).server
    private = Simulation(tiny_config(*settings, "privacy.clip_norm=1e30", "privacy.noise_multiplier=0")).server
    state = plain.initial_state()
    updates = _updates(plain, state)
    a = plain.advance(state, 1, updates, [3.0, 1.0, 2.0, 5.0, 4.0][: len(updates)])
    b = private.advance(private.initial_state(), 1, updates, [3.0, 1.0, 2.0, 5.0, 4.0][: len(updates)])
    assert a.rejected is None and b.rejected is None and b.defence == {"dp_clipped": 0}
    assert _equal(a.global_adapter, b.global_adapter)


def test_sigma_zero_and_a_huge_clip_equal_a_plain_run_bit_for_bit(tiny_config):
    plain = tiny_config("name=plain", *FAST)
    private = tiny_config("name=private", "privacy.clip_norm=1e30", "privacy.noise_multiplier=0", *FAST)
    run(plain, show_progress=False)
    run(private, show_progress=False)
    assert _equal(load_checkpoint(plain.run_dir).global_adapter, load_checkpoint(private.run_dir).global_adapter)
    assert [m["epsilon"] for m in _metrics(private.run_dir)] == [0.0, None, None]  # σ = 0: no guarantee


@pytest.mark.parametrize("method, distribution, options", METHODS)
def test_clipping_bounds_each_update_and_noise_reaches_only_what_the_method_trains(tiny_config, method, distribution, options):
    settings = _method_settings(method, distribution, options)
    server = Simulation(tiny_config(*settings, "privacy.clip_norm=0.01", "privacy.noise_multiplier=0.5")).server
    state = server.initial_state()
    updates = _updates(server, state)
    after = server.advance(state, 1, updates, [1.0] * len(updates))
    assert after.rejected is None
    assert after.defence["dp_clipped"] == len(updates) and after.defence["noise_std"] == pytest.approx(0.5 * 0.01 / len(updates))
    # each clipped update, measured in the method's space, is at the clip norm
    space, parts = SPACES[method], moved_parts(server.aggregator.trainable)
    ref = {n: f.scale for n, f in state.global_adapter.items()}
    for u in updates:
        start = server.aggregator.distribute(state.global_adapter, {n: f.rank for n, f in u.items()}, server.scale)
        clipped, _ = clip(space, parts, start, u, 0.01, ref if space == "factors" else None)
        assert update_norm(space, parts, start, clipped, ref if space == "factors" else None) == pytest.approx(0.01, rel=1e-4)
    if method == "ffa-lora":  # the shared A never gets noise: every client must keep receiving it
        assert all(torch.equal(after.global_adapter[n].a, state.global_adapter[n].a) for n in state.global_adapter)
    if method == "fed-sb":  # nor do Fed-SB's frames
        assert all(torch.equal(after.global_adapter[n].b, state.global_adapter[n].b) for n in state.global_adapter)


@pytest.mark.parametrize(
    "settings, message",
    [
        (["federation.method=flora", "resources.distribution=uniform", "privacy.clip_norm=1"], "privacy.clip_norm: federation.method 'flora'"),
        (["federation.method=lora-fair", "privacy.clip_norm=1"], "privacy.clip_norm: federation.method 'lora-fair'"),
        (["federation.method=hetlora", "privacy.clip_norm=1"], "sparsity_weighted=false"),
        (["privacy.clip_norm=1", "robust.aggregate=median"], "privacy's noise is calibrated to the weighted mean"),
        (["privacy.clip_norm=0"], "privacy.clip_norm"),
        (["privacy.noise_multiplier=-1", "privacy.clip_norm=1"], "privacy.noise_multiplier"),
        (["privacy.delta=1", "privacy.clip_norm=1"], "privacy.delta"),
        (["privacy.clip_norm=1", "federation.sparse_stage.rounds=1"], "sparse_stage"),
        (["federation.method=hetlora", "privacy.local.clip_norm=1"], "privacy.local: federation.method 'hetlora'"),
        (["federation.method=fed-sb", "privacy.local.clip_norm=1"], "privacy.local: federation.method 'fed-sb'"),
        (["privacy.local.clip_norm=1", "federation.sparse_stage.rounds=1"], "privacy.local does not cover"),
        (["privacy.local.clip_norm=-1"], "privacy.local.clip_norm"),
    ],
)
def test_settings_privacy_cannot_honour_are_refused_naming_the_field(tiny_config, settings, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*settings)


def test_move_update_with_c_one_is_the_update_itself():
    start, update = {"m": _factors(4, 3, 2, 0)}, {"m": _factors(4, 3, 2, 1)}
    assert move_update("product", ("a", "b"), start, update, 1)["m"] is update["m"]


# ----------------------------------------------------------------------------- local (example-level) DP-SGD


def _dp_trainer(clip_norm: float, noise_multiplier: float, lr: float = 1.0):
    """A tiny-Llama trainer doing one plain SGD step (no momentum, decay or global clip) under
    DP-SGD, and six random examples of 20-40 tokens, 3-9 of them labelled."""
    from conftest import random_examples

    from flexfed.client import LocalTrainer
    from flexfed.config import LocalDPConfig, LoraConfig, TrainingConfig
    from flexfed.lora import init_adapter, target_shapes
    from flexfed.models import tiny_llama

    model = tiny_llama(vocab_size=64)
    lora = LoraConfig(rank=2, target_modules=["q_proj", "v_proj"])
    shapes = target_shapes(model, lora.target_modules)
    training = TrainingConfig(local_steps=1, batch_size=6, optimizer="sgd", lr=lr, weight_decay=0.0, max_grad_norm=None, precision="fp32")
    trainer = LocalTrainer(model, lora, training, 0, local_dp=LocalDPConfig(clip_norm=clip_norm, noise_multiplier=noise_multiplier))
    examples = random_examples(6, 1, (20, 40), (3, 9))
    start = init_adapter(shapes, dict.fromkeys(shapes, 2), lora.alpha, False, 0)
    for i, f in enumerate(start.values()):  # B != 0, so that A gets gradients too
        f.b.copy_(torch.randn(f.b.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    return trainer, start, examples


def test_local_dp_sgd_steps_by_the_mean_of_per_example_clipped_gradients():
    """With σ = 0, one SGD step moves the factors by -lr x mean_i clip_C(g_i), g_i the gradient of
    example i's own mean token loss, computed here one example at a time."""
    from flexfed.client import collate, example_mean, response_token_losses

    clip_norm = 0.05  # below every example's gradient norm, so every clip is active
    trainer, start, examples = _dp_trainer(clip_norm, 0.0)
    result = trainer.train("c", start, examples, 0)

    trainer.local_dp = None  # per-example gradients by hand, on the same model and start
    slot = trainer.activate(start)
    params = {n: p for n, p in trainer.peft_model.named_parameters() if p.requires_grad}
    clipped = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for example in examples:
        trainer.peft_model.zero_grad(set_to_none=True)
        example_mean(*response_token_losses(trainer.peft_model, collate([example], 0))).backward()
        norm = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in params.values())))
        norms.append(norm)
        for n, p in params.items():
            clipped[n] += p.grad * min(1.0, clip_norm / norm)
    assert min(norms) > clip_norm
    for module, f in result.adapter.items():
        for factor, layer in (("a", "lora_A"), ("b", "lora_B")):
            expected = getattr(start[module], factor) - clipped[f"base_model.model.{module}.{layer}.{slot}.weight"] / len(examples)
            assert torch.allclose(getattr(f, factor), expected, atol=1e-6), (module, factor)


def test_local_dp_sgd_noise_has_sigma_c_over_the_batch_and_runs_are_reproducible():
    """Clip C tiny: the step is almost all noise, N(0, (σ C / B)²) per coordinate of each factor."""
    sigma, clip_norm, lr = 2.0, 1e-3, 1.0
    trainer, start, examples = _dp_trainer(clip_norm, sigma, lr)
    first = trainer.train("c", start, examples, 0)
    again = trainer.train("c", start, examples, 0)
    other = trainer.train("c", start, examples, 1)
    moved = torch.cat([(getattr(f, x) - getattr(start[n], x)).flatten() for n, f in first.adapter.items() for x in ("a", "b")])
    expected = lr * sigma * clip_norm / len(examples)
    assert moved.std().item() == pytest.approx(expected, rel=0.1)  # clipped gradients move it by <= lr C/B = 1.7e-4 in norm
    assert all(torch.equal(f.a, again.adapter[n].a) and torch.equal(f.b, again.adapter[n].b) for n, f in first.adapter.items())
    assert not all(torch.equal(f.b, other.adapter[n].b) for n, f in first.adapter.items())


def test_a_run_with_local_dp_records_each_clients_epsilon_over_its_participations(tiny_config):
    from flexfed.client import local_steps

    config = tiny_config("federation.rounds=3", "federation.sample_fraction=0.3", "privacy.local.clip_norm=1", "privacy.local.noise_multiplier=1.1",
                         "eval.every=3", "eval.seen_examples=2", "eval.unseen_examples=2")
    sim = Simulation(config)
    sim.run(show_progress=False)
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    seen: dict[str, int] = {}
    for record in records:
        for c in record["clients"]:
            seen[c["id"]] = seen.get(c["id"], 0) + 1
            n = c["examples"]
            steps = seen[c["id"]] * local_steps(config.training, n)
            assert c["epsilon_local"] == pytest.approx(epsilon(1.1, config.training.batch_size / n, steps, config.privacy.delta))
    assert max(seen.values()) > 1  # some client trained twice: its ε grew
