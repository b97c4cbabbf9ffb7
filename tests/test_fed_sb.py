"""Fed-SB as it runs: seeded orthonormal frames, a zero core at round 0, only R on the wire,
and the exact average of the cores."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch

from flexfed.aggregation import get_aggregator
from flexfed.aggregation.base import payload_bytes
from flexfed.aggregation.fed_sb import sb_core, sb_factors, seeded_frames
from flexfed.lora import lora_scale
from flexfed.server import Link

SHAPES = {"layers.0.self_attn.k_proj": (12, 40), "layers.0.mlp.up_proj": (56, 40), "layers.1.mlp.down_proj": (40, 56)}
RANK, ALPHA, SEED = 4, 8.0, 11


def link() -> Link:
    return Link(get_aggregator("fed-sb"), SHAPES, ALPHA, False, SEED)


def frames_digest(seed: int, name: str, shape: tuple[int, int], rank: int) -> str:
    b, a = seeded_frames(seed, name, shape, rank)
    return hashlib.sha256(b.numpy().tobytes() + a.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("name, shape", SHAPES.items())
def test_frames_are_orthonormal(name, shape):
    b, a = seeded_frames(SEED, name, shape, RANK)
    assert b.shape == (shape[0], RANK) and a.shape == (RANK, shape[1])
    eye = torch.eye(RANK)
    assert torch.allclose(b.mT @ b, eye, atol=1e-6)  # orthonormal columns
    assert torch.allclose(a @ a.mT, eye, atol=1e-6)  # orthonormal rows


def test_frames_depend_only_on_seed_module_and_rank():
    name, shape = "layers.0.mlp.up_proj", SHAPES["layers.0.mlp.up_proj"]
    first = frames_digest(SEED, name, shape, RANK)
    assert frames_digest(SEED, name, shape, RANK) == first
    assert first != frames_digest(SEED + 1, name, shape, RANK)
    assert first != frames_digest(SEED, "layers.1.mlp.up_proj", shape, RANK)
    assert first != frames_digest(SEED, name, shape, RANK + 1)


def test_frames_are_the_same_in_another_process():
    """Server and clients build the frames in separate processes (Flower): bit for bit equal."""
    name, shape = "layers.1.mlp.down_proj", SHAPES["layers.1.mlp.down_proj"]
    code = (
        "import hashlib; from flexfed.aggregation.fed_sb import seeded_frames; "
        f"b, a = seeded_frames({SEED}, {name!r}, {shape!r}, {RANK}); "
        "print(hashlib.sha256(b.numpy().tobytes() + a.numpy().tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == frames_digest(SEED, name, shape, RANK)


def test_common_and_initial_are_the_seeded_frames_with_a_zero_core():
    ranks = dict.fromkeys(SHAPES, RANK)
    common = link().common(ranks)
    initial = get_aggregator("fed-sb").initial({}, common)
    for name, shape in SHAPES.items():
        b, a = seeded_frames(SEED, name, shape, RANK)
        assert torch.equal(common[name].b, b) and torch.equal(common[name].a, a)
        assert common[name].scale == lora_scale(RANK, ALPHA, False)
        # round 0: B is the frame, R = 0, so the carried a = R A is zero and ΔW = 0
        assert torch.equal(initial[name].b, b)
        assert torch.equal(initial[name].a, torch.zeros(RANK, shape[1]))


def test_only_the_core_crosses_the_wire():
    """r² numbers per matrix each way (fp32: 4 r² bytes), and receiving rebuilds the adapter."""
    carrier, ranks = link(), dict.fromkeys(SHAPES, RANK)
    common = carrier.common(ranks)
    g = torch.Generator().manual_seed(0)
    cores = {n: torch.randn(RANK, RANK, generator=g) for n in SHAPES}
    adapter = {n: sb_factors(f.b, cores[n], f.a, f.scale) for n, f in common.items()}
    payload = carrier.send(adapter, ranks)
    assert set(payload) == {f"{n}.r" for n in SHAPES}
    assert all(t.shape == (RANK, RANK) for t in payload.values())
    assert payload_bytes(payload) == len(SHAPES) * RANK * RANK * 4
    for n, t in payload.items():
        assert torch.allclose(t, cores[n.removesuffix(".r")], atol=1e-5)
    received = carrier.receive(payload, ranks)
    for n in SHAPES:
        assert torch.equal(received[n].b, common[n].b)
        assert torch.allclose(received[n].a, adapter[n].a, atol=1e-5)


def test_averaging_the_cores_is_the_exact_average_of_the_updates():
    ranks = dict.fromkeys(SHAPES, RANK)
    common = link().common(ranks)
    name = "layers.0.mlp.up_proj"
    f = common[name]
    b, a = f.b.double(), f.a.double()
    g = torch.Generator().manual_seed(1)
    cores = [torch.randn(RANK, RANK, generator=g, dtype=torch.float64) for _ in range(3)]
    weights = [2.0, 1.0, 1.0]
    updates = [{name: sb_factors(b, c, a, f.scale)} for c in cores]
    agg = get_aggregator("fed-sb")
    assert agg.trainable == ("r",)
    got = agg.aggregate(updates, weights, {name: RANK}, lambda r: lora_scale(r, ALPHA, False))[name]
    mean_core = sum(w * c for w, c in zip(weights, cores)) / sum(weights)
    # the product, densely: Σ p_i s B R_i A = s B R̄ A
    truth = sum(w * u[name].delta(torch.float64) for w, u in zip(weights, updates)) / sum(weights)
    assert torch.allclose(got.delta(torch.float64), truth, atol=1e-12)
    assert torch.allclose(sb_core(got, a), mean_core, atol=1e-10)
    with pytest.raises(ValueError, match="different frozen B"):
        agg.aggregate([updates[0], {name: sb_factors(b + 1, cores[0], a, f.scale)}], [1, 1], {name: RANK}, lambda r: 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        sb_factors(b, torch.eye(RANK + 1, dtype=torch.float64), a, f.scale)
