"""LoRA-FAIR (Bian et al., 2025, arXiv 2411.14961): refine the averaged B on the server.

FedIT's B̄ Ā (B̄ = Σ p_i B_i, Ā = Σ p_i A_i) is not the ideal update ΔW = Σ_i p_i s_i B_i A_i.
LoRA-FAIR keeps Ā and adds a residual ΔB to B̄, chosen by the paper's objective

    ΔB = argmin  1 − cos(ΔW, (B̄ + ΔB) Ā)  +  λ ‖ΔB‖_F ,        λ = 0.01 (the paper's value)

where cos is the cosine similarity of the two matrices (Frobenius inner product over the product
of norms). Clients start the next round from (B̄ + ΔB, Ā) ("Avg-Initial"). Like FedIT it needs
one common rank.

Why the regulariser matters: the similarity term alone is blind to the size of B (cos is
unchanged when B is scaled), and when Ā is ill-conditioned (clients whose A nearly cancel) an
unregularised fit makes B′ explode. Because ΔB = 0 is always a candidate, the minimiser obeys

    λ ‖ΔB‖_F  ≤  1 − cos(ΔW, B̄ Ā)  ≤  2,     i.e.  ‖B′ − B̄‖_F ≤ (1 − cos₀) / λ ≤ 2 / λ,

and the solver below returns a point whose objective is never above the one at ΔB = 0, so the
bound holds for what it returns, not only for the exact minimiser.

How it is solved (the paper runs SGD on the server; here a 2-D search replaces it). Write X = B̄ + ΔB, C = ΔW Āᵀ (d x r), G = Ā Āᵀ (r x r), m = ‖ΔW‖_F. Then ⟨ΔW, X Ā⟩ = ⟨C, X⟩ and
‖X Ā‖² = tr(X G Xᵀ), and setting the gradient to zero at any minimiser with ΔB ≠ 0 gives
ΔB = a C − b X G with a = ‖ΔB‖/(λ m ‖XĀ‖) > 0 and b = a cos m/‖XĀ‖, hence

    X = (B̄ + a C)(I + b G)⁻¹   for two scalars a > 0, b > −1/g_max.

In the eigenbasis G = V diag(g) Vᵀ the cosine, ‖XĀ‖ and ‖ΔB‖ of that family are sums over the r
columns of a few precomputed column inner products of B̄V and CV, so each (a, b) costs O(r):
a wide log grid over (a, b) and shrinking local grids find the basin, Newton's method on the two
stationarity equations pins the point to rounding, and the result is compared with ΔB = 0 (kept
unless the search is better by more than rounding). Stationary points with b ≤ −1/g_max are not
searched: they need cos < 0 at the optimum, which can beat ΔB = 0 only if B̄Ā already points
away from ΔW. Everything is built from the factors (C = Σ p_i s_i B_i (A_i Āᵀ),
m² from two (K r) x (K r) Grams of the stacked factors); ΔW (d x k) is never formed.

Departures from the paper, stated: the paper writes a similarity S to minimise; cosine distance
1 − cos is what makes "minimise" and "cosine similarity" agree, and ‖·‖ is read as the
Frobenius norm (not squared). The paper solves the problem with SGD; the search above reaches
the minimiser of the same objective instead of an SGD iterate near it. Since the cosine does not
change with positive scales, B′ is given at the clients' common scale s. λ = 0.01 comes from image models (ViT, MLP-Mixer) at rank 16: the cosine term is
dimensionless while ‖ΔB‖ carries the units of B, so the balance depends on the size of B (its
init, learning rate and the LoRA scale). ``regularization`` sets λ.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from flexfed.aggregation.base import Aggregator, require_common_rank, validate
from flexfed.lora import Adapter, Factors, product_norm

PAPER_REGULARIZATION = 0.01  # λ in the paper's experiments

# The 2-D search: log-spaced coarse grid, then local grids shrinking around the best point.
_COARSE_POINTS, _COARSE_SPAN = 121, 30.0  # e^±30 around the natural scale of each coordinate
_LOCAL_POINTS, _LOCAL_ROUNDS, _SHRINK = 9, 30, 0.5
_NEWTON_STEPS, _NEWTON_TOLERANCE, _FD_STEP = 30, 1e-14, 1e-7
_ROUNDING = 1e-12  # an objective gain below this is float64 noise (the objective is O(1))


def cosine_objective(cosine: Tensor, correction_norm: Tensor, regularization: float) -> Tensor:
    """The paper's objective: 1 − cos(ΔW, (B̄ + ΔB) Ā) + λ ‖ΔB‖_F."""
    return 1.0 - cosine + regularization * correction_norm


class _ColumnStatistics:
    """What the objective over X = (B̄ + a C)(I + b G)⁻¹ needs, in G's eigenbasis: O(r) per (a, b)."""

    def __init__(self, b_bar: Tensor, target: Tensor, gram: Tensor, target_norm: float):
        eigenvalues, basis = torch.linalg.eigh(gram)
        self.g = eigenvalues.clamp_min(0.0)  # G is PSD; clamp rounding below zero
        p, q = b_bar @ basis, target @ basis
        self.pp, self.pq, self.qq = (p * p).sum(0), (p * q).sum(0), (q * q).sum(0)
        self.m = target_norm

    def terms(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(cos(ΔW, X Ā), ‖X Ā‖, ‖ΔB‖) at every (a, b) pair (broadcast shapes)."""
        a, b = a.unsqueeze(-1), b.unsqueeze(-1)
        denom = 1.0 + b * self.g  # > 0 on the searched range b > −1/g_max
        inner = ((self.pq + a * self.qq) / denom).sum(-1)  # ⟨C, X⟩
        product = (self.g * (self.pp + 2 * a * self.pq + a * a * self.qq) / denom**2).sum(-1).clamp_min(0.0).sqrt()
        # ΔB V = (a Q − b P g) / (1 + b g), column by column
        correction = ((a * a * self.qq - 2 * a * b * self.g * self.pq + (b * self.g) ** 2 * self.pp) / denom**2).sum(-1)
        tiny = torch.finfo(product.dtype).tiny
        cosine = torch.where(product > 0, inner / (self.m * product.clamp_min(tiny)), torch.zeros_like(product))
        return cosine, product, correction.clamp_min(0.0).sqrt()

    def objective(self, a: Tensor, b: Tensor, regularization: float) -> Tensor:
        cosine, _, correction = self.terms(a, b)
        return cosine_objective(cosine, correction, regularization)


class _Search:
    """Minimise the objective over a = a_scale e^φ and b = (e^θ − 1)/g_max.

    θ covers b from −1/g_max (θ → −∞) to +∞ in one smooth coordinate with b = 0 at θ = 0. Grids
    find the basin; comparing objective values pins a minimiser only to ~√ε (the objective is flat
    there), so Newton's method on the stationarity equations finishes to ~ε."""

    def __init__(self, stats: _ColumnStatistics, a_scale: float, regularization: float):
        self.stats, self.a_scale, self.lam = stats, a_scale, regularization
        self.g_max = float(stats.g.max())

    def ab(self, phi: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        return self.a_scale * phi.exp(), torch.expm1(theta) / self.g_max

    def values(self, phi: Tensor, theta: Tensor) -> Tensor:
        a, b = self.ab(phi[:, None], theta[None, :])
        return self.stats.objective(a, b, self.lam)

    def grid(self) -> tuple[float, float, float]:
        dtype = self.stats.g.dtype
        phi = torch.linspace(-_COARSE_SPAN, _COARSE_SPAN, _COARSE_POINTS, dtype=dtype)
        theta = phi.clone()
        step = float(phi[1] - phi[0])
        grid = self.values(phi, theta)
        i, j = divmod(int(torch.argmin(grid)), grid.shape[1])
        best_phi, best_theta, best = float(phi[i]), float(theta[j]), float(grid[i, j])
        offsets = torch.linspace(-1.0, 1.0, _LOCAL_POINTS, dtype=dtype)
        for _ in range(_LOCAL_ROUNDS):
            grid = self.values(best_phi + step * offsets, best_theta + step * offsets)
            i, j = divmod(int(torch.argmin(grid)), grid.shape[1])
            if float(grid[i, j]) <= best:  # the centre is on the grid, so this never gets worse
                best_phi, best_theta, best = best_phi + step * float(offsets[i]), best_theta + step * float(offsets[j]), float(grid[i, j])
            step *= _SHRINK
        return best_phi, best_theta, best

    def residual(self, point: Tensor) -> Tensor:
        """Stationarity, relative: log a = log(‖ΔB‖ / (λ m ‖XĀ‖)) and b ‖XĀ‖ / (a m) = cos."""
        a, b = self.ab(point[0], point[1])
        cosine, product, correction = self.stats.terms(a, b)
        m = self.stats.m
        return torch.stack([torch.log(a * self.lam * m * product / correction), b * product / (a * m) - cosine])

    def newton(self, phi: float, theta: float) -> tuple[float, float]:
        point = torch.tensor([phi, theta], dtype=self.stats.g.dtype)
        r = self.residual(point)
        for _ in range(_NEWTON_STEPS):
            if not bool(torch.isfinite(r).all()) or float(r.norm()) < _NEWTON_TOLERANCE:
                break
            jacobian = torch.stack(
                [(self.residual(point + _FD_STEP * e) - r) / _FD_STEP for e in torch.eye(2, dtype=point.dtype)], dim=1
            )
            try:
                step = torch.linalg.solve(jacobian, -r)
            except RuntimeError:  # singular Jacobian: keep the grid's point
                break
            for _halving in range(30):  # backtrack until the residual shrinks
                trial = point + step
                r_trial = self.residual(trial)
                if bool(torch.isfinite(r_trial).all()) and float(r_trial.norm()) < float(r.norm()):
                    point, r = trial, r_trial
                    break
                step = step / 2
            else:
                break
        return float(point[0]), float(point[1])

    def minimise(self) -> tuple[float, float, float]:
        """(a, b, objective) of the best point found."""
        phi, theta, best = self.grid()
        if self.lam > 0:  # with λ = 0 the first equation has no finite a; the grid's point stays
            n_phi, n_theta = self.newton(phi, theta)
            as_tensor = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
            value = float(self.values(as_tensor(n_phi), as_tensor(n_theta))[0, 0])
            if value <= best + _ROUNDING:  # same minimum, located to rounding instead of √ε
                phi, theta, best = n_phi, n_theta, value
        a, b = self.ab(torch.tensor(phi, dtype=torch.float64), torch.tensor(theta, dtype=torch.float64))
        return float(a), float(b), best


def lora_fair_refine(factors: Sequence[Factors], p: Sequence[float], regularization: float = PAPER_REGULARIZATION) -> Factors:
    """(B̄ + ΔB, Ā) at the first client's scale; see the module docstring."""
    require_common_rank(factors, "lora-fair")
    first = factors[0]
    a_bar = sum(pi * f.a.double() for pi, f in zip(p, factors))
    b_bar = sum(pi * f.b.double() for pi, f in zip(p, factors))
    # ΔW = [p_1 s_1 B_1, …] @ [A_1; …]: everything below needs only products with these stacks
    weighted_b = torch.cat([(pi * f.scale) * f.b.double() for pi, f in zip(p, factors)], dim=1)
    stacked_a = torch.cat([f.a.double() for f in factors], dim=0)
    target = weighted_b @ (stacked_a @ a_bar.mT)  # C = ΔW Āᵀ
    target_norm = float(product_norm(weighted_b, stacked_a))  # ‖ΔW‖_F
    gram = a_bar @ a_bar.mT
    target_size = float(torch.linalg.norm(target))
    if target_norm == 0.0 or target_size == 0.0 or float(gram.diagonal().sum()) == 0.0:
        # no update, or nothing Ā can express of it: the cosine cannot improve, so ΔB = 0
        return Factors(b=b_bar.to(first.b.dtype), a=a_bar.to(first.a.dtype), scale=first.scale)
    stats = _ColumnStatistics(b_bar, target, gram, target_norm)
    zero = torch.zeros((), dtype=torch.float64)
    at_zero = float(stats.objective(zero, zero, regularization))
    # natural scale of a: ‖a C‖ = 1/λ, the size the bound allows ΔB (or 1 when λ = 0)
    a_scale = 1.0 / (regularization if regularization > 0 else 1.0) / target_size
    a, b, best = _Search(stats, a_scale, regularization).minimise()
    if best >= at_zero - _ROUNDING:  # keep B̄ unless the search really improves on it
        b_new = b_bar
    else:
        b_new = torch.linalg.solve(torch.eye(gram.shape[0], dtype=gram.dtype) + b * gram, (b_bar + a * target).mT).mT
    return Factors(b=b_new.to(first.b.dtype), a=a_bar.to(first.a.dtype), scale=first.scale)


class LoRAFAIR(Aggregator):
    """LoRA-FAIR. Option: ``regularization`` (λ on ‖ΔB‖_F; default the paper's 0.01)."""

    name = "lora-fair"
    mixed_ranks = False

    def __init__(self, regularization: float = PAPER_REGULARIZATION):
        if not regularization >= 0:
            raise ValueError(f"lora-fair: regularization must be >= 0, got {regularization}")
        self.regularization = regularization

    def aggregate(self, updates, weights, max_ranks, scale, previous=None) -> Adapter:
        names, p = validate(updates, weights)
        return {n: lora_fair_refine([u[n] for u in updates], p, self.regularization) for n in names}
