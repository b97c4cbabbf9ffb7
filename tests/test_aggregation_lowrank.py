"""The three ways to the top singular triplets of a sum of LoRA products (aggregation.lowrank)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexfed.aggregation.lowrank import (
    choose_method,
    dense_top_singular,
    exact_top_singular,
    randomized_top_singular,
)


def product(triplets, r):
    u, s, vh = triplets
    return (u[..., :r].double() * s[..., None, :r].double()) @ vh[..., :r, :].double()


def with_spectrum(d, k, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, len(sigma), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, len(sigma), generator=g, dtype=torch.float64))
    return (u * sigma) @ v.mT


SPECTRA = {
    "fast": lambda n: 0.8 ** torch.arange(n, dtype=torch.float64),
    "slow": lambda n: 1 / torch.arange(1, n + 1, dtype=torch.float64).sqrt(),
    "flat": lambda n: 1 + 0.01 * torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
}


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_path_is_near_optimal(spectrum, seed):
    d, k, rank = 160, 120, 12
    w = with_spectrum(d, k, SPECTRA[spectrum](k), seed)[None]
    s = torch.linalg.svdvals(w[0])
    optimal = float(s[rank:].square().sum().sqrt())
    got = randomized_top_singular(w, rank, generator=torch.Generator().manual_seed(seed))
    error = float(torch.linalg.norm(w - product(got, rank)))
    assert error <= 1.001 * optimal
    u, _, vh = got
    assert torch.allclose(u.mT @ u, torch.eye(rank, dtype=u.dtype).expand(1, -1, -1), atol=1e-10)
    assert torch.allclose(vh @ vh.mT, torch.eye(rank, dtype=u.dtype).expand(1, -1, -1), atol=1e-10)


@given(
    d=st.integers(20, 120),
    k=st.integers(20, 120),
    rank=st.integers(1, 15),
    decay=st.floats(0.0, 3.0),
    geometric=st.booleans(),
    seed=st.integers(0, 1000),
)
@settings(max_examples=30, deadline=None)
def test_randomized_path_is_near_optimal_on_random_spectra(d, k, rank, decay, geometric, seed):
    n = min(d, k)
    rank = min(rank, n)
    i = torch.arange(n, dtype=torch.float64)
    sigma = torch.exp(-decay * i / 4) if geometric else (1 + i) ** -decay
    w = with_spectrum(d, k, sigma, seed)[None]
    optimal = float(sigma[rank:].square().sum().sqrt())
    got = randomized_top_singular(w, rank, generator=torch.Generator().manual_seed(seed))
    assert float(torch.linalg.norm(w - product(got, rank))) <= 1.001 * optimal + 1e-12 * float(sigma[0])


def test_randomized_path_in_float32_on_a_sum_of_many_client_updates():
    """The benchmark's regime: R >> d, dW formed once in float32."""
    g = torch.Generator().manual_seed(0)
    d, k, total_rank, rank = 96, 80, 400, 10
    b = torch.randn(1, d, total_rank, generator=g) * torch.rand(total_rank, generator=g)
    a = torch.randn(1, total_rank, k, generator=g)
    got = randomized_top_singular(b @ a, rank)
    w = (b.double() @ a.double())[0]
    s = torch.linalg.svdvals(w)
    assert float(torch.linalg.norm(w - product(got, rank)[0])) <= 1.001 * float(s[rank:].square().sum().sqrt())


@pytest.mark.parametrize(
    "d, k, ranks, rank",
    [
        (50, 40, [3, 5, 2], 6),  # R < rank(dW) target: plain case
        (50, 40, [20, 20, 20], 15),  # R > k: the stacked A's are rank deficient
        (30, 60, [1], 5),  # fewer components than asked: completion with orthonormal vectors
    ],
)
def test_exact_path_equals_the_dense_svd(d, k, ranks, rank):
    g = torch.Generator().manual_seed(3)
    b = torch.randn(2, d, sum(ranks), generator=g, dtype=torch.float64)
    a = torch.randn(2, sum(ranks), k, generator=g, dtype=torch.float64)
    exact = exact_top_singular(b, a, rank)
    dense = dense_top_singular(b @ a, rank)
    available = min(rank, sum(ranks))
    for r in range(1, available + 1):
        assert (
            float(torch.linalg.norm(product(exact, r) - product(dense, r)) / torch.linalg.norm(product(dense, r)))
            < 1e-10
        )
    assert torch.allclose(exact[1][..., :available], dense[1][..., :available], rtol=1e-10)
    u, _, vh = exact
    eye = torch.eye(rank, dtype=torch.float64).expand(2, -1, -1)
    assert torch.allclose(u.mT @ u, eye, atol=1e-10) and torch.allclose(vh @ vh.mT, eye, atol=1e-10)


def test_cost_model_regimes():
    # the SPEC's measured case: 4096 x 4096, R = 284 -> factored exact path
    assert choose_method(4096, 4096, 284, 200) == "exact"
    # 80 clients of rank up to 200 on 2048-d layers -> form dW once, randomized
    assert choose_method(2048, 2048, 13_000, 200) == "randomized"
    assert choose_method(2048, 5504, 14_500, 200) == "randomized"
    # a tiny model: nothing beats a full SVD of a 64 x 64 matrix
    assert choose_method(64, 64, 200, 8) in ("dense", "exact")


def test_bad_rank():
    b, a = torch.randn(1, 10, 3), torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="outside 1..min"):
        exact_top_singular(b, a, 9)
    with pytest.raises(ValueError, match="outside 1..min"):
        dense_top_singular(b @ a, 0)
    with pytest.raises(ValueError, match="outside 1..min"):
        randomized_top_singular(b @ a, 11)
