"""The aggregation methods' math: exactness, per-client scales, invariances and error paths."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexfed.aggregation import Aggregator, get_aggregator
from flexfed.aggregation.ffa_lora import shared_a
from flexfed.aggregation.flexlora import flexlora_triplets, split_factors
from flexfed.aggregation.flora import merge_into_base, merged_delta
from flexfed.aggregation.fedit import fedit_average
from flexfed.lora import Factors, lora_scale

ALPHA = 16.0


SHAPES = {
    "layers.0.q_proj": (24, 24),
    "layers.1.q_proj": (24, 24),
    "layers.0.up_proj": (40, 24),
    "layers.0.down_proj": (24, 40),
}


def scale_fn(alpha: float = ALPHA, rslora: bool = False):
    return lambda r: lora_scale(r, alpha, rslora)


def client(
    ranks: int | dict[str, int], seed: int, alpha: float = ALPHA, rslora: bool = False, shapes=SHAPES
) -> dict[str, Factors]:
    """A random float64 client adapter; ``ranks`` is one rank for all modules or per module."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (d, k) in shapes.items():
        r = ranks if isinstance(ranks, int) else ranks[name]
        out[name] = Factors(
            b=torch.randn(d, r, generator=g, dtype=torch.float64),
            a=torch.randn(r, k, generator=g, dtype=torch.float64) / math.sqrt(k),
            scale=lora_scale(r, alpha, rslora),
        )
    return out


def weighted_sum(updates, weights, name) -> torch.Tensor:
    """The ground truth: sum_i p_i s_i B_i A_i, dense, float64."""
    total = sum(weights)
    return sum((w / total) * u[name].delta(torch.float64) for w, u in zip(weights, updates))


def best_rank(m: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - y) / torch.linalg.norm(y))


def full_ranks(shapes=SHAPES) -> dict[str, int]:
    return {n: min(d, k) for n, (d, k) in shapes.items()}


# ----------------------------------------------------------------------------- FlexLoRA


@pytest.mark.parametrize("svd", ["auto", "exact", "randomized", "dense"])
def test_flexlora_at_full_rank_returns_the_exact_weighted_sum(svd):
    updates = [client(2, 0), client(5, 1), client(9, 2)]
    weights = [3.0, 1.0, 2.0]
    agg = get_aggregator("flexlora", svd=svd)
    out = agg.aggregate(updates, weights, full_ranks(), scale_fn())
    for name in SHAPES:
        assert out[name].rank == min(SHAPES[name])
        assert rel(out[name].delta(torch.float64), weighted_sum(updates, weights, name)) < 1e-10


@given(
    ranks=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    weights=st.lists(st.floats(0.1, 10.0), min_size=5, max_size=5),
    seed=st.integers(0, 10_000),
    rslora=st.booleans(),
)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fast_exact_path_matches_the_dense_svd_on_every_client_product(ranks, weights, seed, rslora):
    """Every client's rank-r product from the factored path equals the dense SVD's (rel. 1e-5)."""
    updates = [client(r, seed + i, rslora=rslora) for i, r in enumerate(ranks)]
    weights = weights[: len(ranks)]
    scale = scale_fn(rslora=rslora)
    max_ranks = {n: max(ranks) for n in SHAPES}
    agg = get_aggregator("flexlora", svd="exact")
    global_adapter = agg.aggregate(updates, weights, max_ranks, scale)
    total = sum(weights)
    reference = flexlora_triplets(updates, [w / total for w in weights], max_ranks, method="dense", dtype=torch.float64)
    for r in sorted(set(ranks)):
        mine = agg.distribute(global_adapter, {n: r for n in SHAPES}, scale)
        for name in SHAPES:
            u, s, vh = reference[name]
            expected = (u[:, :r] * s[:r]) @ vh[:r]
            assert rel(mine[name].delta(torch.float64), expected) <= 1e-5
            # and the dense path itself is the best rank-r approximation of the true sum
            assert rel(expected, best_rank(weighted_sum(updates, weights, name), r)) <= 1e-8


def test_flexlora_honours_each_clients_own_scale():
    """alpha/r and alpha/sqrt(r) per client; one global scale would get the sum wrong."""
    for rslora in (False, True):
        updates = [client(2, 10, rslora=rslora), client(12, 11, rslora=rslora)]
        out = get_aggregator("flexlora").aggregate(updates, [1, 1], full_ranks(), scale_fn(rslora=rslora))
        for name in SHAPES:
            truth = weighted_sum(updates, [1, 1], name)
            assert rel(out[name].delta(torch.float64), truth) < 1e-10
            # what a single global scale s(r_max) would have produced: visibly different
            single = sum(0.5 * scale_fn(rslora=rslora)(12) * (u[name].b @ u[name].a) for u in updates)
            assert rel(single, truth) > 0.1


def test_flexlora_with_a_shared_a_and_equal_ranks_agrees_with_fedit():
    shared = client(6, 99)
    updates = []
    for seed in (1, 2, 3):
        own = client(6, seed)
        updates.append({n: Factors(b=own[n].b, a=shared[n].a, scale=own[n].scale) for n in SHAPES})
    weights = [1.0, 2.0, 5.0]
    flex = get_aggregator("flexlora").aggregate(updates, weights, {n: 6 for n in SHAPES}, scale_fn())
    fedit = get_aggregator("fedit").aggregate(updates, weights, {n: 6 for n in SHAPES}, scale_fn())
    for name in SHAPES:
        assert rel(flex[name].delta(torch.float64), fedit[name].delta(torch.float64)) < 1e-10


def test_flexlora_serves_ranks_above_the_rank_of_the_update():
    """Few low-rank clients, a rank-20 client registered: missing components are B = 0, A orthonormal."""
    updates = [client(2, 0), client(3, 1)]
    out = get_aggregator("flexlora").aggregate(updates, [1, 1], {n: 20 for n in SHAPES}, scale_fn())
    for name in SHAPES:
        f = out[name]
        assert f.rank == 20
        assert rel(f.delta(torch.float64), weighted_sum(updates, [1, 1], name)) < 1e-10
        assert torch.allclose(f.a @ f.a.mT, torch.eye(20, dtype=f.a.dtype), atol=1e-10)
        assert float(f.b[:, 5:].abs().max()) < 1e-10


def test_flexlora_sqrt_split_gives_the_same_products_with_balanced_factors():
    updates = [client(3, 0), client(8, 1)]
    scale = scale_fn()
    ref = get_aggregator("flexlora")
    sqrt = get_aggregator("flexlora", split="sqrt")
    g_ref = ref.aggregate(updates, [1, 2], {n: 8 for n in SHAPES}, scale)
    g_sqrt = sqrt.aggregate(updates, [1, 2], {n: 8 for n in SHAPES}, scale)
    for r in (3, 8):
        a = ref.distribute(g_ref, {n: r for n in SHAPES}, scale)
        b = sqrt.distribute(g_sqrt, {n: r for n in SHAPES}, scale)
        for name in SHAPES:
            assert b[name].scale == scale(r)
            assert rel(b[name].delta(torch.float64), a[name].delta(torch.float64)) < 1e-10
            # balanced: component j of sqrt(s) B and of sqrt(s) A have equal norms
            assert torch.allclose(b[name].b.norm(dim=0), b[name].a.norm(dim=1), rtol=1e-8)


def test_flexlora_splits_hand_out_the_same_fresh_lora():
    """Round 1's global is PEFT's init (B = 0): the balanced split must not rescale its A, or the
    two splits would start from different adapters (a 5x smaller A for a rank-8 client under r_max = 200)."""
    scale = scale_fn()
    fresh = {n: Factors(b=torch.zeros(d, 20, dtype=torch.float64), a=torch.randn(20, k, dtype=torch.float64), scale=scale(20)) for n, (d, k) in SHAPES.items()}
    for r in (3, 20):
        ref = get_aggregator("flexlora").distribute(fresh, {n: r for n in SHAPES}, scale)
        sqrt = get_aggregator("flexlora", split="sqrt").distribute(fresh, {n: r for n in SHAPES}, scale)
        for name in SHAPES:
            assert torch.equal(ref[name].a, sqrt[name].a) and torch.equal(ref[name].b, sqrt[name].b)
            assert torch.equal(sqrt[name].a, fresh[name].a[:r])


def test_flexlora_memory_chunks_do_not_change_the_result():
    updates = [client(4, 0), client(7, 1)]
    p = [0.5, 0.5]
    ranks = {n: 6 for n in SHAPES}
    whole = flexlora_triplets(updates, p, ranks)
    chunked = flexlora_triplets(updates, p, ranks, chunk_bytes=1)
    for name in SHAPES:
        for x, y in zip(whole[name], chunked[name]):
            assert torch.allclose(x, y, atol=1e-12)


def test_split_factors_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        split_factors((torch.eye(2), torch.ones(2), torch.eye(2)), 1.0, "cube-root")
    with pytest.raises(ValueError, match="split"):
        get_aggregator("flexlora", split="cube-root")
    with pytest.raises(ValueError, match="SVD method"):
        get_aggregator("flexlora", svd="magic")
    with pytest.raises(ValueError, match="SVD method"):
        flexlora_triplets([client(2, 0)], [1.0], {n: 2 for n in SHAPES}, method="qr")


# ----------------------------------------------------------------------------- every method


HOMOGENEOUS = ["fedit", "ffa-lora", "fed-sb", "lora-fair"]


def test_every_method_is_registered():
    assert set(Aggregator.registry) == {"fedit", "hetlora", "flexlora", "flora", "ffa-lora", "fed-sb", "lora-fair"}


@pytest.mark.parametrize("method", sorted(Aggregator.registry))
def test_with_one_client_every_method_returns_that_clients_update(method):
    update = client(5, 7)
    scale = scale_fn()
    agg = get_aggregator(method)
    global_adapter = agg.aggregate([update], [3.0], {n: 5 for n in SHAPES}, scale)
    back = agg.distribute(global_adapter, {n: 5 for n in SHAPES}, scale)
    for name in SHAPES:
        assert rel(back[name].delta(torch.float64), update[name].delta(torch.float64)) < 1e-10


@pytest.mark.parametrize("method", sorted(Aggregator.registry))
def test_every_method_is_invariant_to_client_order(method):
    if method in HOMOGENEOUS:
        shared = client(4, 50)
        updates = []
        for seed in (1, 2, 3):
            own = client(4, seed)
            b = shared if method == "fed-sb" else own
            a = shared if method == "ffa-lora" else own
            updates.append({n: Factors(b=b[n].b, a=a[n].a, scale=own[n].scale) for n in SHAPES})
    else:
        updates = [client(r, seed) for seed, r in enumerate((3, 8, 5))]
    weights = [1.0, 4.0, 2.0]
    scale = scale_fn()
    max_ranks = {n: 8 for n in SHAPES} if method not in HOMOGENEOUS else {n: 4 for n in SHAPES}
    agg = get_aggregator(method)
    forward = agg.aggregate(updates, weights, max_ranks, scale)
    backward = agg.aggregate(updates[::-1], weights[::-1], max_ranks, scale)
    for name in SHAPES:
        assert rel(forward[name].delta(torch.float64), backward[name].delta(torch.float64)) < 1e-10
        if method in ("flexlora", "hetlora", *HOMOGENEOUS):  # the factors themselves, not just the product
            assert torch.allclose(forward[name].b, backward[name].b, atol=1e-9)
            assert torch.allclose(forward[name].a, backward[name].a, atol=1e-9)


@pytest.mark.parametrize("method", HOMOGENEOUS)
def test_homogeneous_methods_refuse_mixed_ranks(method):
    with pytest.raises(ValueError, match="same rank"):
        get_aggregator(method).aggregate([client(4, 0), client(8, 1)], [1, 1], {n: 8 for n in SHAPES}, scale_fn())
    assert not get_aggregator(method).mixed_ranks


@pytest.mark.parametrize("method", HOMOGENEOUS)
def test_homogeneous_methods_refuse_to_serve_another_rank(method):
    agg = get_aggregator(method)
    g = agg.aggregate([client(4, 0)], [1], {n: 4 for n in SHAPES}, scale_fn())
    with pytest.raises(ValueError, match="common rank 4"):
        agg.distribute(g, {n: 2 for n in SHAPES}, scale_fn())


def test_fedit_averages_factors_not_products():
    updates = [client(3, 0), client(3, 1)]
    f = fedit_average([u["layers.0.q_proj"] for u in updates], [0.5, 0.5])
    assert torch.allclose(f.b, (updates[0]["layers.0.q_proj"].b + updates[1]["layers.0.q_proj"].b) / 2)
    assert rel(f.delta(torch.float64), weighted_sum(updates, [1, 1], "layers.0.q_proj")) > 0.1


# ----------------------------------------------------------------------------- HetLoRA


def test_hetlora_zero_pads_with_each_clients_scale():
    small, big = client(2, 0), client(6, 1)
    scale = scale_fn()
    agg = get_aggregator("hetlora", sparsity_weighted=False)  # plain example weights: p = (1/2, 1/2)
    g = agg.aggregate([small, big], [1, 1], {n: 6 for n in SHAPES}, scale)
    for name in SHAPES:
        f = g[name]
        assert f.rank == 6 and f.scale == scale(6)
        # a single low-rank client padded to rank 6 still has its own product
        solo = agg.aggregate([small], [1], {n: 6 for n in SHAPES}, scale)[name]
        assert rel(solo.delta(torch.float64), small[name].delta(torch.float64)) < 1e-12
        # columns 2..5 of B come from the rank-6 client only, halved by the average
        assert torch.allclose(f.b[:, 2:], 0.5 * big[name].b[:, 2:], atol=1e-12)
    # the rank-2 client gets the first two components, at its own scale, same product
    down = agg.distribute(g, {n: 2 for n in SHAPES}, scale)
    for name in SHAPES:
        assert down[name].scale == scale(2)
        expected = g[name].scale * g[name].b[:, :2] @ g[name].a[:2]
        assert torch.allclose(down[name].delta(torch.float64), expected, atol=1e-12)


def _known_factors(rank: int, size: float, d: int = 6, k: int = 5) -> Factors:
    """B A = size · E_11 (one unit entry), so ‖s(r) B A‖_F = s(r) · size exactly."""
    b = torch.zeros(d, rank, dtype=torch.float64)
    a = torch.zeros(rank, k, dtype=torch.float64)
    b[0, 0], a[0, 0] = size, 1.0
    return Factors(b=b, a=a, scale=lora_scale(rank, ALPHA))


def test_hetlora_sparsity_weights_are_the_papers_formula_and_on_by_default():
    from flexfed.aggregation.hetlora import sparsity_weights

    clients = [_known_factors(2, 1.0), _known_factors(4, 3.0), _known_factors(8, 2.0)]
    norms = [ALPHA / 2 * 1.0, ALPHA / 4 * 3.0, ALPHA / 8 * 2.0]  # s(r_i) ‖B_i A_i‖_F = 8, 12, 4
    expected = [n / sum(norms) for n in norms]  # 1/3, 1/2, 1/6, whatever the example counts
    assert sparsity_weights(clients, [0.7, 0.2, 0.1]) == pytest.approx(expected, abs=1e-15)
    # a client without examples takes no part; all-zero updates fall back to the example weights
    assert sparsity_weights(clients, [0.5, 0.5, 0.0]) == pytest.approx([0.4, 0.6, 0.0], abs=1e-15)
    zero = [Factors(b=0 * f.b, a=f.a, scale=f.scale) for f in clients]
    assert sparsity_weights(zero, [0.7, 0.2, 0.1]) == [0.7, 0.2, 0.1]
    # the default aggregator uses them: the global's column 0 is sum_i w_i s(r_i)/s(8) B_i[:, 0]
    g = get_aggregator("hetlora").aggregate([{"m": f} for f in clients], [7, 2, 1], {"m": 8}, scale_fn())["m"]
    column = sum(w * f.scale / lora_scale(8, ALPHA) * f.b[0, 0] for w, f in zip(expected, clients))
    assert float(g.b[0, 0]) == pytest.approx(float(column), rel=1e-14)
    assert float(g.a[0, 0]) == pytest.approx(1.0, rel=1e-14)  # every client's A[0, 0] is 1, weights sum to 1
    # sparsity weighting off: p_i = n_i / sum n_j
    plain = get_aggregator("hetlora", sparsity_weighted=False).aggregate([{"m": f} for f in clients], [7, 2, 1], {"m": 8}, scale_fn())["m"]
    column = sum(p * f.scale / lora_scale(8, ALPHA) * f.b[0, 0] for p, f in zip([0.7, 0.2, 0.1], clients))
    assert float(plain.b[0, 0]) == pytest.approx(float(column), rel=1e-14)


def _gradient_on(f: Factors, rows: slice, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ‖x (s B A)ᵀ − y‖² with respect to B[:, rows] and A[rows]."""
    b, a = f.b.clone().requires_grad_(True), f.a.clone().requires_grad_(True)
    loss = ((x @ (f.scale * b @ a).mT - y) ** 2).sum()
    loss.backward()
    return b.grad[:, rows], a.grad[rows]


def test_hetlora_components_no_client_reached_keep_training():
    """Regression: a round of rank-2 clients used to zero A and B of components 2..5 of a rank-6
    global, and a later rank-6 client then had exactly zero gradient there, forever."""
    scale = scale_fn()
    name = "layers.0.q_proj"
    g = torch.Generator().manual_seed(3)
    previous = {name: Factors(b=torch.zeros(24, 6, dtype=torch.float64), a=torch.randn(6, 24, generator=g, dtype=torch.float64), scale=scale(6))}
    agg = get_aggregator("hetlora")
    low = [{name: client(2, seed)[name]} for seed in (0, 1)]
    new = agg.aggregate(low, [1, 1], {name: 6}, scale, previous=previous)[name]
    # the untouched components are the previous global's, with the same product
    assert torch.equal(new.a[2:], previous[name].a[2:])
    assert torch.allclose(new.scale * new.b[:, 2:] @ new.a[2:], previous[name].scale * previous[name].b[:, 2:] @ previous[name].a[2:])
    start = agg.distribute({name: new}, {name: 6}, scale)[name]  # the next rank-6 client's start
    x, y = torch.randn(16, 24, generator=g, dtype=torch.float64), torch.randn(16, 24, generator=g, dtype=torch.float64)
    grad_b, grad_a = _gradient_on(start, slice(2, 6), x, y)
    assert start.a[2:].abs().sum() > 0 and grad_b.abs().sum() > 0  # B's columns 2..5 train again
    # without the previous global (the old behaviour) the same components are dead: zero factors, zero gradients
    dead = agg.distribute(agg.aggregate(low, [1, 1], {name: 6}, scale), {name: 6}, scale)[name]
    grad_b, grad_a = _gradient_on(dead, slice(2, 6), x, y)
    assert not dead.a[2:].any() and not dead.b[:, 2:].any()
    assert not grad_b.any() and not grad_a.any()


def test_hetlora_pruning_penalty_gradient_is_its_formula():
    from flexfed.aggregation.hetlora import RankSelfPruning

    rule = RankSelfPruning(gamma=0.5, lam=0.3)
    g = torch.Generator().manual_seed(0)
    b = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(4, 1, generator=g, dtype=torch.float64, requires_grad=True)  # rank 1: no tail
    a1 = torch.randn(1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    penalty = rule.penalty({"m": (b, a), "one": (b1, a1)})
    tail = b[:, 3:].detach() @ a[3:].detach()  # ⌊0.5 · 6⌋ = 3 components kept, 3 penalised
    assert float(penalty.detach()) == pytest.approx(0.3 * float(tail.norm()), rel=1e-12)
    penalty.backward()
    # d λ‖B_t A_t‖_F / dB_t = λ (B_t A_t) A_tᵀ / ‖B_t A_t‖_F, and likewise for A_t; the head has none
    assert torch.allclose(b.grad[:, 3:], 0.3 * tail @ a[3:].detach().mT / tail.norm(), atol=1e-12)
    assert torch.allclose(a.grad[3:], 0.3 * b[:, 3:].detach().mT @ tail / tail.norm(), atol=1e-12)
    assert not b.grad[:, :3].any() and not a.grad[:3].any()
    assert b1.grad is None and a1.grad is None
    # an all-zero tail (B = 0 at the start of training) has penalty 0 and gradient 0, not NaN
    zero_b = torch.zeros(7, 6, dtype=torch.float64, requires_grad=True)
    rule.penalty({"m": (zero_b, a)}).backward()
    assert torch.equal(zero_b.grad, torch.zeros_like(zero_b))


def test_hetlora_client_prunes_only_when_its_tail_shrank():
    from flexfed.aggregation.hetlora import RankSelfPruning

    scale = scale_fn()
    rule = RankSelfPruning(gamma=0.5, lam=0.1)
    start = client({n: 4 for n in SHAPES} | {"layers.0.up_proj": 1}, 0)
    faded = {n: Factors(b=torch.cat([f.b[:, :2], 0.5 * f.b[:, 2:]], 1), a=f.a, scale=f.scale) for n, f in start.items()}
    grown = {n: Factors(b=torch.cat([f.b[:, :2], 2 * f.b[:, 2:]], 1), a=f.a, scale=f.scale) for n, f in start.items()}
    assert rule.finish(start, grown, scale) == grown  # the tail grew: nothing is cut
    pruned = rule.finish(start, faded, scale)
    assert {n: f.rank for n, f in pruned.items()} == rule.pruned_ranks({n: f.rank for n, f in start.items()})
    assert pruned["layers.0.up_proj"].rank == 1 and pruned["layers.0.q_proj"].rank == 2  # rank 1 stays 1
    for n, f in pruned.items():  # the kept components carry the same product at their new scale
        assert f.scale == scale(f.rank)
        kept = faded[n].scale * faded[n].b[:, : f.rank] @ faded[n].a[: f.rank]
        assert torch.allclose(f.delta(torch.float64), kept, atol=1e-12)


def test_hetlora_options_are_checked():
    agg = get_aggregator("hetlora")
    assert agg.sparsity_weighted and agg.local_rule() is not None  # the paper's method by default
    assert (agg.local_rule().gamma, agg.local_rule().lam) == (0.99, 0.01)
    assert get_aggregator("hetlora", prune=False).local_rule() is None
    assert get_aggregator("hetlora", **{"lambda": 0.5, "gamma": 0.9}).local_rule().lam == 0.5
    for options, match in [
        ({"gamma": 1.0}, "gamma"),
        ({"gamma": 0}, "gamma"),
        ({"lambda": -1}, "lambda"),
        ({"prune": "yes"}, "prune"),
        ({"norm_weighted": True}, "unknown options"),
    ]:
        with pytest.raises(ValueError, match=match):
            get_aggregator("hetlora", **options)
    for method in sorted(Aggregator.registry):  # every other method trains plainly
        if method != "hetlora":
            assert get_aggregator(method).local_rule() is None


# ----------------------------------------------------------------------------- FLoRA


def test_flora_stacking_is_the_exact_weighted_sum_and_merges_into_the_base():
    updates = [client(2, 0, alpha=8), client(7, 1, alpha=32), client(4, 2, rslora=True)]
    weights = [1.0, 0.0, 3.0]  # a zero-weight client is left out of the stack
    agg = get_aggregator("flora")
    assert agg.merges_into_base
    g = agg.aggregate(updates, weights, {}, scale_fn())
    base = {n: torch.randn(*shape, dtype=torch.float64) for n, shape in SHAPES.items()}
    merged = merge_into_base(base, g)
    deltas = merged_delta(g, dtype=torch.float64)
    for name in SHAPES:
        assert g[name].rank == 2 + 4 and g[name].scale == scale_fn()(6)
        truth = weighted_sum(updates, weights, name)
        assert rel(g[name].delta(torch.float64), truth) < 1e-12
        assert rel(deltas[name], truth) < 1e-12
        assert torch.allclose(merged[name], base[name] + truth, atol=1e-12)
    assert agg.distribute(g, {n: 2 for n in SHAPES}, scale_fn()) == g
    assert merged_delta(g, dense=False) == g


def test_merge_into_base_checks_shapes():
    g = get_aggregator("flora").aggregate([client(2, 0)], [1], {}, scale_fn())
    with pytest.raises(ValueError, match="does not match"):
        merge_into_base({n: torch.zeros(3, 3) for n in SHAPES}, g)
    with pytest.raises(KeyError, match="no base weight"):
        merge_into_base({}, g)


# ----------------------------------------------------------------------------- FFA-LoRA, Fed-SB


def test_ffa_lora_is_exact_with_a_shared_a_and_refuses_different_as():
    agg = get_aggregator("ffa-lora")
    assert agg.trainable == ("b",)
    updates = []
    for seed in (0, 1, 2):
        own = client(4, seed)
        updates.append(
            {
                n: Factors(b=own[n].b, a=shared_a(7, n, 4, SHAPES[n][1], torch.float64), scale=own[n].scale)
                for n in SHAPES
            }
        )
    g = agg.aggregate(updates, [1, 2, 3], {n: 4 for n in SHAPES}, scale_fn())
    for name in SHAPES:
        assert rel(g[name].delta(torch.float64), weighted_sum(updates, [1, 2, 3], name)) < 1e-12
        assert torch.equal(g[name].a, updates[0][name].a)
    with pytest.raises(ValueError, match="different frozen A"):
        agg.aggregate([updates[0], client(4, 5)], [1, 1], {n: 4 for n in SHAPES}, scale_fn())


def test_shared_a_is_deterministic_per_seed_and_module_with_peft_bounds():
    a = shared_a(3, "layers.0.q_proj", 8, 100)
    assert torch.equal(a, shared_a(3, "layers.0.q_proj", 8, 100))
    assert not torch.equal(a, shared_a(3, "layers.1.q_proj", 8, 100))
    assert not torch.equal(a, shared_a(4, "layers.0.q_proj", 8, 100))
    assert float(a.abs().max()) <= 1 / math.sqrt(100)


# Fed-SB's frames, core averaging and payload: tests/test_fed_sb.py


# LoRA-FAIR's objective and bounds: tests/test_lora_fair.py


# ----------------------------------------------------------------------------- error paths


@pytest.mark.parametrize("method", sorted(Aggregator.registry))
def test_error_paths(method):
    agg = get_aggregator(method)
    scale = scale_fn()
    ranks = {n: 4 for n in SHAPES}
    u0, u1 = client(4, 0), client(4, 1)
    missing = {n: f for n, f in u1.items() if n != "layers.1.q_proj"}
    with pytest.raises(ValueError, match="different modules"):
        agg.aggregate([u0, missing], [1, 1], ranks, scale)
    reshaped = dict(u1, **{"layers.0.q_proj": client(4, 2, shapes={"layers.0.q_proj": (24, 40)})["layers.0.q_proj"]})
    with pytest.raises(ValueError, match="shape"):
        agg.aggregate([u0, reshaped], [1, 1], ranks, scale)
    broken = dict(
        u1,
        **{"layers.0.q_proj": Factors(b=u1["layers.0.q_proj"].b * float("nan"), a=u1["layers.0.q_proj"].a, scale=1.0)},
    )
    with pytest.raises(ValueError, match="NaN"):
        agg.aggregate([u0, broken], [1, 1], ranks, scale)
    for bad, message in (
        ([1, -1], "non-negative"),
        ([0, 0], "sum to zero"),
        ([1], "2 client updates but 1 weights"),
        ([1, float("nan")], "non-negative"),
    ):
        with pytest.raises(ValueError, match=message):
            agg.aggregate([u0, u1], bad, ranks, scale)
    with pytest.raises(ValueError, match="no client updates"):
        agg.aggregate([], [], ranks, scale)


def test_unknown_method_and_missing_max_ranks():
    with pytest.raises(ValueError, match="unknown aggregation method 'fedavg'"):
        get_aggregator("fedavg")
    with pytest.raises(ValueError, match="max_ranks lacks"):
        get_aggregator("flexlora").aggregate([client(2, 0)], [1], {}, scale_fn())
