"""LoRA-FAIR: the server's residual ΔB minimises the paper's objective and stays bounded.

Every check evaluates the objective densely from ΔW = Σ p_i s_i B_i A_i (float64), independently
of the factor-only solver in ``flexfed.aggregation.lora_fair``.
"""

from __future__ import annotations

import math

import pytest
import torch

from flexfed.aggregation import get_aggregator
from flexfed.aggregation.lora_fair import PAPER_REGULARIZATION
from flexfed.lora import Factors, lora_scale

ALPHA, RANK, D_OUT, D_IN = 16.0, 8, 64, 48


def scale(r: int) -> float:
    return lora_scale(r, ALPHA, False)


def clients(seed: int, count: int = 3, opposite_noise: float | None = None, shared_a: bool = False):
    """Random float64 clients of one module "m". ``opposite_noise``: two clients with
    A_2 = −A_1 + noise (Ā nearly zero, so Ā Āᵀ is ill-conditioned)."""
    g = torch.Generator().manual_seed(seed)
    a0 = torch.randn(RANK, D_IN, generator=g, dtype=torch.float64) / math.sqrt(D_IN)
    out = []
    for i in range(2 if opposite_noise is not None else count):
        if opposite_noise is not None:
            a = a0 if i == 0 else -a0 + opposite_noise * torch.randn(RANK, D_IN, generator=g, dtype=torch.float64)
        elif shared_a:
            a = a0
        else:
            a = torch.randn(RANK, D_IN, generator=g, dtype=torch.float64) / math.sqrt(D_IN)
        b = torch.randn(D_OUT, RANK, generator=g, dtype=torch.float64)
        out.append({"m": Factors(b=b, a=a, scale=scale(RANK))})
    return out


def aggregate(method: str, updates, weights, **options) -> Factors:
    return get_aggregator(method, **options).aggregate(updates, weights, {"m": RANK}, scale)["m"]


def ideal_update(updates, weights) -> torch.Tensor:
    total = sum(weights)
    return sum((w / total) * u["m"].delta(torch.float64) for w, u in zip(weights, updates))


def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum() / (x.norm() * y.norm())


def objective(b: torch.Tensor, a_bar, b_bar, delta_w, lam) -> torch.Tensor:
    """1 − cos(ΔW, B Ā) + λ ‖B − B̄‖_F, dense."""
    return 1 - cosine(delta_w, b @ a_bar) + lam * (b - b_bar).norm()


CASES = [
    pytest.param(dict(seed=0), [1.0, 1.0, 2.0], id="three-random-clients"),
    pytest.param(dict(seed=1, opposite_noise=1e-6), [1.0, 1.0], id="nearly-opposite-A"),
    pytest.param(dict(seed=2, opposite_noise=1e-1), [3.0, 1.0], id="partly-opposite-A"),
]


# Nearly opposite A make the objective so sharp (curvature ~ 1e13) that float64 cannot pin its
# minimiser finely enough for a small gradient; the comparison with Adam below covers that case.
@pytest.mark.parametrize("case, weights", [CASES[0], CASES[2]])
def test_the_correction_is_a_stationary_point_of_the_papers_objective(case, weights):
    updates = clients(**case)
    got, fedit = aggregate("lora-fair", updates, weights), aggregate("fedit", updates, weights)
    assert torch.equal(got.a, fedit.a)  # Ā is FedIT's average, unchanged
    assert not torch.allclose(got.b, fedit.b)  # these cases do get a correction
    b = got.b.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(objective(b, got.a, fedit.b, ideal_update(updates, weights), PAPER_REGULARIZATION), b)
    # each term's gradient is O(1)-O(λ); at the minimiser they cancel
    assert gradient.norm() < 1e-7


@pytest.mark.parametrize("case, weights", CASES)
def test_no_generic_optimiser_finds_a_lower_objective(case, weights):
    updates = clients(**case)
    got, fedit = aggregate("lora-fair", updates, weights), aggregate("fedit", updates, weights)
    delta_w = ideal_update(updates, weights)
    ours = float(objective(got.b, got.a, fedit.b, delta_w, PAPER_REGULARIZATION))
    g = torch.Generator().manual_seed(7)
    for start in (fedit.b, fedit.b + torch.randn(fedit.b.shape, generator=g, dtype=torch.float64)):
        b = start.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([b], lr=1e-2)
        for _ in range(1500):
            optimiser.zero_grad()
            objective(b, got.a, fedit.b, delta_w, PAPER_REGULARIZATION).backward()
            optimiser.step()
        assert float(objective(b.detach(), got.a, fedit.b, delta_w, PAPER_REGULARIZATION)) >= ours - 1e-12


def test_correction_stays_bounded_when_clients_a_nearly_cancel():
    """Regression: A_2 = −A_1 + 1e-6 noise made Ā Āᵀ nearly singular and the old least-squares
    B' explode (‖B'‖ ≈ 1.8e6 against ‖B̄‖ ≈ 16). ΔB = 0 is a candidate, so the minimiser has
    λ ‖ΔB‖ ≤ 1 − cos(ΔW, B̄ Ā) ≤ 2."""
    updates, weights = clients(seed=1, opposite_noise=1e-6), [1.0, 1.0]
    got, fedit = aggregate("lora-fair", updates, weights), aggregate("fedit", updates, weights)
    start = 1 - float(cosine(ideal_update(updates, weights), fedit.b @ fedit.a))
    assert float((got.b - fedit.b).norm()) <= start / PAPER_REGULARIZATION <= 2 / PAPER_REGULARIZATION


def test_clients_sharing_a_get_no_correction():
    """With one A, ΔW = s B̄ A exactly: cos = 1 already, so the optimum is ΔB = 0 (B' = B̄)."""
    updates, weights = clients(seed=3, shared_a=True), [2.0, 1.0, 1.0]
    got, fedit = aggregate("lora-fair", updates, weights), aggregate("fedit", updates, weights)
    assert torch.equal(got.b, fedit.b) and torch.equal(got.a, fedit.a)


def test_without_regularization_it_reaches_the_best_cosine_any_b_can():
    """λ = 0: max over B of cos(ΔW, B Ā) is ‖ΔW P‖ / ‖ΔW‖, P the projector on Ā's row space."""
    updates, weights = clients(seed=4), [1.0, 2.0, 1.0]
    got = aggregate("lora-fair", updates, weights, regularization=0.0)
    delta_w = ideal_update(updates, weights)
    projector = torch.linalg.pinv(got.a) @ got.a
    best = float((delta_w @ projector).norm() / delta_w.norm())
    assert float(cosine(delta_w, got.b @ got.a)) == pytest.approx(best, abs=1e-9)


def test_a_larger_regularization_keeps_b_closer_to_the_average():
    updates, weights = clients(seed=5), [1.0, 1.0, 1.0]
    fedit = aggregate("fedit", updates, weights)
    distances = [float((aggregate("lora-fair", updates, weights, regularization=lam).b - fedit.b).norm()) for lam in (0.001, 0.01, 0.05)]
    assert distances[0] > distances[1] > distances[2]


def test_zero_correction_is_returned_exactly_when_it_is_optimal():
    """ΔB = 0 is a local minimiser iff ‖∇(1 − cos) at B̄‖ ≤ λ (the subgradient of λ‖ΔB‖ at 0 is
    the λ-ball); here it is also the global one and the aggregate is FedIT's, bit for bit."""
    updates, weights = clients(seed=6), [1.0, 1.0, 1.0]
    fedit = aggregate("fedit", updates, weights)
    b = fedit.b.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(1 - cosine(ideal_update(updates, weights), b @ fedit.a), b)
    lam = 2 * float(gradient.norm())
    assert torch.equal(aggregate("lora-fair", updates, weights, regularization=lam).b, fedit.b)
    assert not torch.equal(aggregate("lora-fair", updates, weights, regularization=lam / 4).b, fedit.b)


def test_regularization_must_be_non_negative():
    with pytest.raises(ValueError, match="regularization"):
        get_aggregator("lora-fair", regularization=-0.1)
