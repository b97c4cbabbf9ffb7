"""Top singular triplets of a weighted sum of LoRA products, without a dense SVD where possible.

FlexLoRA needs, for every adapted matrix, the best rank-r approximation of

    dW = sum_i c_i B_i A_i        (c_i = p_i * s(r_i), B_i: d x r_i, A_i: r_i x k)

Everything here works on the stacked factors, batched over a leading dimension of same-shaped
matrices (e.g. the q_proj of every layer):

    B_s = [c_1 B_1, ..., c_K B_K]  (L, d, R)      A_s = [A_1; ...; A_K]  (L, R, k)

so that dW = B_s @ A_s with R = sum_i r_i. Three ways give the top ``rank`` triplets (U, S, Vh):

``exact``
    Never forms dW. With G_A = A_s A_sᵀ = L Lᵀ (Cholesky), dW dWᵀ = (B_s L)(B_s L)ᵀ, so the top
    left singular subspace of dW is B_s L times the top eigenvectors of the R x R matrix
    M = Lᵀ (B_sᵀ B_s) L. A Rayleigh-Ritz step (QR of that basis, SVD of the small rank x k matrix
    Qᵀ dW = (Qᵀ B_s) A_s) then gives orthonormal U and Vh and the exact triplets. Costs
    O((d + k) R² + R³), all in float64: squaring into Gram matrices doubles the exponent of the
    condition number, which float64 absorbs (errors ~1e-12 on the client products) and float32
    would not (~1e-5 on clustered spectra).
``randomized``
    For R comparable to or above min(d, k), where the Gram matrices are larger than dW itself:
    form dW once with one GEMM, then subspace iteration with oversampling (Halko, Martinsson &
    Tropp 2011, Alg. 4.4), stopping once the rank-r error, which is known exactly at every step,
    is estimated within a factor 1 + ``rtol`` of optimal (see ``randomized_top_singular``).
``dense``
    The reference: form dW and take the full ``torch.linalg.svd``. Also the cheapest choice for
    tiny matrices.

``choose_method`` picks one from a flop-count cost model (``flexlora.flexlora_triplets`` applies it).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

Method = Literal["auto", "exact", "randomized", "dense"]

# The randomized path stops when its rank-r error is estimated within 1 + RTOL of optimal. The
# estimate trails the true excess by up to ~30% on slowly converging spectra, so 5e-4 keeps the
# error within 1.001 of optimal with margin (tests check 1.001).
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
# The randomized path's cost assumes this many power iterations; with a 2 x rank block the
# adaptive stopping rule needed 2 to 6 on summed client updates.
_ASSUMED_POWER_ITERATIONS = 4


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


def method_costs(d: int, k: int, total_rank: int, rank: int) -> dict[str, float]:
    """Estimated cost (float32-GEMM flop equivalents) of each path for one d x k matrix."""
    R, r = total_rank, rank
    l = min(rank + default_oversample(rank), min(d, k))
    exact = (
        _FP64 * (2 * (d + k) * R * R + 4 * R**3 + 2 * d * R * r + 2 * (d + k) * R * r)
        + _EIGH * R**3
        + _FP64 * (_qr_cost(d, r) + _svd_cost(r, k))
        + 12 * _CALL
    )
    form = 2.0 * d * k * R
    q = _ASSUMED_POWER_ITERATIONS
    randomized = (
        form + (2 * q + 2) * 2.0 * d * k * l + (q + 1) * (_qr_cost(d, l) + _qr_cost(k, l) + 6 * _CALL) + _svd_cost(l, k)
    )
    dense = form + _svd_cost(d, k) + 2 * _CALL
    return {"exact": exact, "randomized": randomized, "dense": dense}


def choose_method(d: int, k: int, total_rank: int, rank: int) -> str:
    """The cheapest path by ``method_costs``; exact and dense win ties over randomized.

    In practice: ``exact`` while R is below roughly 0.2-0.4 min(d, k) (for a square 4096 matrix
    and rank 200, up to R ~ 1500), ``randomized`` above that, ``dense`` only for matrices so small
    that the full SVD costs about as much as a few passes over dW.
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
    b, a = b.double(), a.double()
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
    k x l, l = rank + oversample. When the block is wide (k <= 8 l), wᵀw is formed once and each
    step is a k x k x l product instead of two passes over w: for 5504 x 2048 and l = 400, five
    times cheaper per step.

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
    gram = w.mT @ w if k <= 2 * _ASSUMED_POWER_ITERATIONS * width else None

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
