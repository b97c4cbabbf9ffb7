"""Top singular triplets of a weighted sum of LoRA products, without a dense SVD where possible.

FlexLoRA needs, for every adapted matrix, the best rank-r approximation of

    dW = sum_i c_i B_i A_i        (c_i = p_i * s(r_i), B_i: d x r_i, A_i: r_i x k)

All functions are batched over a leading dimension of same-shaped matrices (e.g. the q_proj of
every layer). With the stacked factors

    B_s = [c_1 B_1, ..., c_K B_K]  (L, d, R)      A_s = [A_1; ...; A_K]  (L, R, k)

dW = B_s @ A_s, R = sum_i r_i. Three ways give the top ``rank`` triplets (U, S, Vh):

``exact``
    Never forms dW. With G_A = A_s A_sᵀ = L Lᵀ (Cholesky), dW dWᵀ = (B_s L)(B_s L)ᵀ, so the top
    left singular subspace of dW is B_s L times the top eigenvectors of the R x R matrix
    M = Lᵀ (B_sᵀ B_s) L. A Rayleigh-Ritz step (QR of that basis, SVD of the small rank x k matrix
    Qᵀ dW = (Qᵀ B_s) A_s) then gives orthonormal U and Vh and the exact triplets. Costs
    O((d + k) R² + R³), all in float64: squaring into Gram matrices doubles the exponent of the
    condition number, which float64 absorbs (errors ~1e-12 on the client products) and float32
    would not (~1e-5 on clustered spectra).
``randomized``
    For R comparable to or above min(d, k), where the R x R Gram matrices cost more than dW
    itself: form dW once (``flexlora.sum_updates``), then subspace iteration with oversampling,
    stopping once the rank-r error, which is known exactly at every step, is estimated within a
    factor 1 + ``rtol`` of optimal (see ``randomized_top_singular``).
``dense``
    The reference: form dW and take the full ``torch.linalg.svd``. Also the cheapest choice for
    tiny matrices.

``choose_method`` picks one from a flop-count cost model (``flexlora.flexlora_triplets`` applies it).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Method = Literal["auto", "exact", "randomized", "dense"]

# The randomized path stops when its rank-r error is estimated within 1 + RTOL of optimal. The
# estimate can trail the true excess while convergence is still speeding up, so RTOL is half the
# 1.001 that tests demand: over 1,500 random spectra the worst ratio seen was 1.0007.
RTOL = 5e-4

# Costs in units of one float32 GEMM flop, measured with torch 2.13 (MKL) on a 2-core AVX-512
# EPYC: a float64 GEMM flop costs 2.2, a float64 eigh of n x n ~9 n³ float64 flops, a float32
# SVD of m x n (m >= n) ~ 10 m n² + 17 n³ and a Householder QR ~ 15 m n² (panel factorization is
# memory bound). Only the ratios matter, and only near the crossover; they hold within ~2x on
# other x86 BLAS.
_FP64 = 2.2
_EIGH = 9.0 * _FP64
# Fixed cost of one LAPACK/BLAS call (~20 us), so that tiny matrices take the one-call dense SVD.
_CALL = 3e6
# The randomized path's cost assumes this many steps; with a 2 x rank block the adaptive stopping
# rule took 5 (attention) and 7 (MLP) on the benchmark's 80 summed client updates.
_ASSUMED_STEPS = 6


def default_oversample(rank: int) -> int:
    """Extra columns for the randomized range finder: ``rank`` (at least 10), i.e. a 2 x rank block.

    Subspace iteration converges like (σ_{l+1}/σ_rank)^(2q). Summed client updates have slowly
    decaying spectra around rank 200; on the benchmark's 80-client MLP matrices a 2 x rank block
    reaches 1.001-optimality in 5 iterations where rank + 50 needs 11, so the wider block is
    cheaper overall.
    """
    return max(10, rank)


def _svd_cost(m: int, n: int) -> float:
    m, n = max(m, n), min(m, n)
    return 10.0 * m * n * n + 17.0 * n**3


def _qr_cost(m: int, n: int) -> float:
    return 15.0 * m * n * n


def _gram_pays(n: int, width: int) -> bool:
    """Whether the randomized path forms the n x n Gram matrix of the smaller side (see there)."""
    return n <= 2 * _ASSUMED_STEPS * width


def method_costs(d: int, k: int, total_rank: int, rank: int) -> dict[str, float]:
    """Estimated cost (float32-GEMM flop equivalents) of each path for one d x k matrix."""
    R, r = total_rank, rank
    n, m = min(d, k), max(d, k)
    l = min(rank + default_oversample(rank), n)
    exact = (
        _FP64 * (2 * (d + k) * R * R + 4 * R**3 + 2 * d * R * r + 2 * (d + k) * R * r)
        + _EIGH * R**3
        + _FP64 * (_qr_cost(d, r) + _svd_cost(r, k))
        + 12 * _CALL
    )
    form = 2.0 * d * k * R
    if _gram_pays(n, l):
        setup, step = 2.0 * m * n * n, 2.0 * n * n * l
    else:
        setup, step = 0.0, 4.0 * m * n * l
    step += _qr_cost(n, l) + 2.0 * n * l * l + 4 * _CALL
    final = 2.0 * m * n * l + _qr_cost(m, l) + _svd_cost(l, l)
    randomized = form + setup + (_ASSUMED_STEPS + 1) * step + final
    dense = form + _svd_cost(d, k) + 2 * _CALL
    return {"exact": exact, "randomized": randomized, "dense": dense}


def choose_method(d: int, k: int, total_rank: int, rank: int) -> str:
    """The cheapest path by ``method_costs``; exact and dense win ties over randomized.

    With rank 200: ``exact`` up to R = 1280 on 2048 x 2048, 1408 on 5504 x 2048, 2000 on
    4096 x 4096 and 2384 on 11008 x 4096 (about half of min(d, k)), ``randomized`` above;
    ``dense`` only for matrices so small that call overheads dominate (SmolLM2's 576-wide ones).
    """
    costs = method_costs(d, k, total_rank, rank)
    exactish = min(("exact", "dense"), key=costs.__getitem__)
    return exactish if costs[exactish] <= costs["randomized"] else "randomized"


# ----------------------------------------------------------------------------- the three paths


def _orthonormal_completion(y: Tensor, columns: int, generator: torch.Generator) -> Tensor:
    """``y`` (L, d, c) with ``columns - c`` random columns appended; QR later orthonormalizes.

    Needed when dW has fewer than ``rank`` components (R < rank): the missing triplets have
    singular value 0 and any orthonormal directions will do; a fixed generator keeps the result
    deterministic.
    """
    missing = columns - y.shape[-1]
    if missing <= 0:
        return y
    noise = torch.randn(*y.shape[:-1], missing, generator=generator, dtype=y.dtype).to(y.device)
    return torch.cat([y, noise], dim=-1)


def _svd_wide(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of a short wide (L, r, k) matrix as QR of its transpose plus an r x r SVD.

    LAPACK's SVD of a 250 x 4096 matrix is several times slower than this on CPU.
    """
    q, r = torch.linalg.qr(m.mT)  # m = rᵀ qᵀ
    u, s, vh = torch.linalg.svd(r.mT)
    return u, s, vh @ q.mT


def _rayleigh_ritz(basis: Tensor, b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Triplets of dW = b @ a restricted to span(basis): U Σ Vh = Q Qᵀ dW, U and Vh orthonormal."""
    q, _ = torch.linalg.qr(basis)
    u_small, s, vh = _svd_wide((q.mT @ b) @ a)  # Qᵀ dW, never forming dW
    return q @ u_small, s, vh


def _psd_factor(gram: Tensor) -> Tensor:
    """Some L with L Lᵀ = gram for a PSD ``gram``: Cholesky, or eigh where Cholesky fails.

    Cholesky fails when the stacked A's are rank deficient (clients sharing an A, R > k);
    ``W sqrt(Λ)`` is then an exact factor, with round-off negatives clamped to zero.
    """
    factor, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()):
        evals, evecs = torch.linalg.eigh(gram)
        factor = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)
    return factor


def exact_top_singular(
    b: Tensor, a: Tensor, rank: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-``rank`` triplets of b @ a (shapes (L, d, R), (L, R, k)) without forming it.

    Returns float64 U (L, d, rank), S (L, rank) descending, Vh (L, rank, k).
    """
    _check_rank(b.shape[-2], a.shape[-1], rank)
    generator = generator or torch.Generator().manual_seed(0)
    b, a = b.double(), a.double()  # no copy when the caller stacked them in float64
    factor = _psd_factor(a @ a.mT)  # G_A = L Lᵀ
    m = factor.mT @ (b.mT @ b) @ factor  # M = Lᵀ G_B L, same nonzero spectrum as dWᵀ dW
    _, evecs = torch.linalg.eigh(m)  # ascending
    keep = min(rank, evecs.shape[-1])
    top = evecs[..., -keep:].flip(-1)
    basis = _orthonormal_completion(b @ (factor @ top), rank, generator)
    return _rayleigh_ritz(basis, b, a)


def _squared_norm(w: Tensor, rows: int = 1024) -> Tensor:
    """‖w‖_F² per matrix, accumulated in float64 a block of rows at a time (no float64 copy of w)."""
    return sum(block.double().square().sum((-2, -1)) for block in w.split(rows, dim=-2))


def randomized_top_singular(
    w: Tensor,
    rank: int,
    *,
    oversample: int | None = None,
    rtol: float = RTOL,
    max_iters: int = 30,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` triplets of dense ``w`` (L, d, k) by subspace iteration, with a stopping rule.

    The iteration runs on the smaller side: with d >= k (else on wᵀ), V ← orth(wᵀw V), V being
    k x l, l = rank + oversample (Halko, Martinsson & Tropp 2011, Alg. 4.4, in Gram form). When
    the block is wide (k <= 12 l), wᵀw is formed once and each step is a k x k x l product
    instead of two passes over w: for 5504 x 2048 and l = 400, five times cheaper per step.

    For orthonormal V, the best rank-r approximation of w within its row space V, Ŵ = (wV)_r Vᵀ,
    has the *exactly computable* error ‖w − Ŵ‖_F² = ‖w‖_F² − Σ_{i≤r} σ̂_i², where σ̂² are the
    eigenvalues of Vᵀ wᵀw V. The iteration stops when the estimated remaining gain in Σ σ̂_i²,
    last_gain · ρ/(1−ρ) with ρ the ratio of the last two gains (geometric convergence; ρ kept in
    [1/2, 0.99]), is below ((1+rtol)² − 1) times the current squared error, i.e. when the error is
    estimated within a factor 1 + rtol of optimal; or when the gain drops to the precision floor of
    ``w``'s dtype; or after ``max_iters`` steps. The estimate is a posteriori, not a bound: tests
    check ‖w − Ŵ‖ ≤ 1.001 ‖w − w_r*‖ on fast- and slow-decaying spectra with the default ``RTOL``.
    The triplets come from a final Rayleigh-Ritz step on w itself (SVD of wV).
    """
    if w.shape[-2] < w.shape[-1]:
        u, s, vh = randomized_top_singular(
            w.mT, rank, oversample=oversample, rtol=rtol, max_iters=max_iters, generator=generator
        )
        return vh.mT, s, u.mT
    d, k = w.shape[-2:]
    _check_rank(d, k, rank)
    oversample = default_oversample(rank) if oversample is None else oversample
    width = min(rank + oversample, k)
    generator = generator or torch.Generator().manual_seed(0)
    total = _squared_norm(w)
    # wᵀw (or w(wᵀ·)) squares the condition number: energies below ~eps ‖w‖² are noise.
    floor = 64 * torch.finfo(w.dtype).eps * total
    tolerance = (1 + rtol) ** 2 - 1
    gram = w.mT @ w if _gram_pays(k, width) else None

    def times_gram(v: Tensor) -> Tensor:
        return gram @ v if gram is not None else w.mT @ (w @ v)

    v, _ = torch.linalg.qr(torch.randn(*w.shape[:-2], k, width, generator=generator, dtype=w.dtype).to(w.device))
    captured, gains = None, []
    for step in range(max_iters + 1):
        z = times_gram(v)
        projected = (v.mT @ z).double()
        now = torch.linalg.eigvalsh((projected + projected.mT) / 2)[..., -rank:].sum(-1)  # Σ_{i≤r} σ̂_i²
        if captured is not None:
            gains.append(now - captured)
        captured = now
        if len(gains) >= 2:
            gain, previous = gains[-1], gains[-2]
            # Floored at 1/2 (remaining >= last gain): in the first steps after the random start
            # the gains shrink much faster than the asymptotic rate, and an estimate built on that
            # transient would stop too early.
            ratio = (gain / previous.clamp_min(torch.finfo(torch.float64).tiny)).clamp(0.5, 0.99)
            remaining = gain * ratio / (1 - ratio)
            error2 = (total - captured).clamp_min(0)
            if bool(((remaining <= tolerance * error2) | (gain <= floor)).all()):
                break
        if step == max_iters:
            break
        v, _ = torch.linalg.qr(z)
    # Rayleigh-Ritz on w with the V whose energy was measured: w V = Q_y R_y, R_y = U_r Σ V_rᵀ.
    q_y, r_y = torch.linalg.qr(w @ v)
    u_r, s, vh_r = torch.linalg.svd(r_y)
    return q_y @ u_r[..., :rank], s[..., :rank], (vh_r @ v.mT)[..., :rank, :]


def dense_top_singular(w: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The reference: the first ``rank`` triplets of the full SVD of dense ``w`` (L, d, k)."""
    _check_rank(w.shape[-2], w.shape[-1], rank)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


def _check_rank(d: int, k: int, rank: int) -> None:
    if not 1 <= rank <= min(d, k):
        raise ValueError(f"rank {rank} is outside 1..min(d, k) = {min(d, k)} for a {d} x {k} matrix")
