"""Robust aggregation and simulated attackers: a norm bound about the round's median, coordinate-
wise median / trimmed mean where the method's space allows it, seeded attackers of three kinds."""

import json

import pytest
import torch

from flexfed.aggregation.robust import coordinate_median, coordinatewise, norm_outliers, trimmed_mean
from flexfed.aggregation.space import update_norm
from flexfed.attacks import attackers, poison
from flexfed.config import ConfigError
from flexfed.engines.simulation import Simulation
from flexfed.lora import Factors

FAST = ["eval.seen_examples=2", "eval.unseen_examples=2", "eval.validation_examples=0"]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_coordinatewise_rules():
    ts = [torch.tensor([1.0, 10.0]), torch.tensor([2.0, -5.0]), torch.tensor([100.0, 0.0]), torch.tensor([3.0, 1.0])]
    assert torch.equal(coordinate_median(ts), torch.tensor([2.5, 0.5]))
    assert torch.equal(coordinate_median(ts[:3]), torch.tensor([2.0, 0.0]))
    assert torch.equal(trimmed_mean(ts, 0.25), torch.tensor([2.5, 0.5]))
    assert torch.equal(trimmed_mean(ts, 0.0), torch.stack(ts).mean(0))
    with pytest.raises(ValueError, match="keeps none"):
        trimmed_mean(ts[:2], 0.49 + 0.01)
    with pytest.raises(ValueError, match="different tensors"):
        coordinatewise([{"x": ts[0]}, {"y": ts[1]}], "median")
    assert norm_outliers([1.0, 1.1, 0.9, 5.0], 2.0) == (pytest.approx(2.1), [3])  # 2 x the median 1.05


def test_attackers_are_seeded_and_attacks_keep_the_format():
    ids = [f"c{i}" for i in range(20)]
    assert attackers(ids, 0.1, 7) == attackers(ids, 0.1, 7) and len(attackers(ids, 0.1, 7)) == 2
    g = torch.Generator().manual_seed(0)
    start = {"m": Factors(b=torch.randn(6, 2, generator=g), a=torch.randn(2, 5, generator=g), scale=4.0)}
    trained = {"m": Factors(b=start["m"].b + 0.1, a=start["m"].a - 0.2, scale=4.0)}
    honest = update_norm("factors", ("a", "b"), start, trained)
    scaled = poison("scale", ("a", "b"), start, trained, 5.0, 1)
    assert torch.allclose(scaled["m"].b - start["m"].b, 5 * (trained["m"].b - start["m"].b))
    flipped = poison("sign_flip", ("a", "b"), start, trained, 5.0, 1)
    assert torch.allclose(flipped["m"].a - start["m"].a, -(trained["m"].a - start["m"].a))
    noise = poison("noise", ("a", "b"), start, trained, 5.0, 1)
    assert update_norm("factors", ("a", "b"), start, noise) == pytest.approx(honest, rel=1e-5)  # a plausible norm
    assert torch.equal(noise["m"].b, poison("noise", ("a", "b"), start, trained, 5.0, 1)["m"].b)  # seeded
    only_b = poison("scale", ("b",), start, trained, 5.0, 1)
    assert only_b["m"].a is trained["m"].a
    for adapter in (scaled, flipped, noise):
        assert adapter["m"].b.shape == (6, 2) and adapter["m"].a.shape == (2, 5) and adapter["m"].scale == 4.0


def test_the_norm_bound_rejects_scaled_attackers_and_records_them(tiny_config):
    config = tiny_config("federation.rounds=1", "federation.sample_fraction=0.5", "attack.fraction=0.1", "attack.scale=20", "robust.norm_bound=3", *FAST)
    sim = Simulation(config)
    sim.run(show_progress=False)
    record = _metrics(config.run_dir)[1]
    sampled_attackers = {c["id"] for c in record["clients"] if c.get("attacker")}
    assert sampled_attackers and sampled_attackers <= sim.protocol.attackers
    assert set(record["defence"]["rejected"]) == sampled_attackers
    assert record["aggregate_rejected"] is None


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
@pytest.mark.parametrize("method", ["fedit", "ffa-lora", "fed-sb"])
def test_coordinatewise_rules_for_the_methods_that_allow_them(tiny_config, method, rule):
    server = Simulation(tiny_config(f"federation.method={method}", f"robust.aggregate={rule}", "robust.trim_fraction=0.2", "federation.max_update_ratio=null")).server
    state = server.initial_state()
    link = server.link
    g = torch.Generator().manual_seed(0)
    updates = []
    for i, c in enumerate(server.sample(1)):
        payload = {k: t + 0.01 * torch.randn(t.shape, generator=g) for k, t in server.downlink(state, c).items()}
        if i == 0:  # one outlier, far off
            payload = {k: t + 1e3 for k, t in payload.items()}
        updates.append(server.receive(c, payload))
    after = server.advance(state, 1, updates, [1.0] * len(updates))
    assert after.rejected is None
    ranks = server.ranks_of(0)
    sent = link.send(after.global_adapter, ranks)
    assert all(float(t.abs().max()) < 1.0 for t in sent.values())  # the outlier did not drag the aggregate
    if method == "ffa-lora":
        assert all(torch.equal(after.global_adapter[n].a, state.global_adapter[n].a) for n in state.global_adapter)


@pytest.mark.parametrize(
    "settings, message",
    [
        (["federation.method=flexlora", "resources.distribution=uniform", "robust.aggregate=median"], "robust.aggregate='median' needs a method"),
        (["federation.method=hetlora", "resources.distribution=uniform", "robust.aggregate=trimmed_mean"], "not federation.method 'hetlora'"),
        (["federation.method=flora", "robust.norm_bound=3"], "robust.norm_bound: federation.method 'flora'"),
        (["robust.norm_bound=0.5"], "robust.norm_bound"),
        (["robust.trim_fraction=0.5"], "robust.trim_fraction"),
        (["attack.fraction=1.5"], "attack.fraction"),
        (["attack.kind=backdoor"], "attack.kind"),
    ],
)
def test_robust_settings_a_method_cannot_honour_are_refused(tiny_config, settings, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*settings)
