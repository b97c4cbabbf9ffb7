"""How much DP noise each method's global update carries, for the same (σ, S, clients).

Every method gets the same DP-FedAvg mechanism (``flexfed.defences``: clip each client's update to
S in the method's space, N(0, (σ S / m)²) on each trained coordinate of the aggregate). What
differs is where the noise lands, and so what it does to the update the model uses, s·B·A:

- FedIT noises B and A; the global product (B̄ + Z_B)(Ā + Z_A) gains Z_B Ā + B̄ Z_A + Z_B Z_A.
  The cross term Z_B Z_A is noise times noise, and B̄ Z_A grows with B̄ as training goes on.
- FFA-LoRA noises only B; A is fixed and shared: the product gains Z_B A, linear in the noise.
- Fed-SB noises only the r x r core: the product gains B Z A, r² noisy numbers per matrix.
- FlexLoRA noises the dense sum Σ p_i ΔW_i (d x k numbers), then keeps its top-r SVD.

Synthetic, one SmolLM2-135M q_proj (576 x 576), rank 8, alpha 16, m clients whose updates are
at the clip norm; reports ‖noisy product − noiseless product‖_F / ‖noiseless product‖_F,
averaged over seeds. Run: ``python benchmarks/privacy_noise.py``.
"""

from __future__ import annotations

import argparse
import math

import torch

from flexfed.aggregation import get_aggregator
from flexfed.aggregation.fed_sb import sb_factors, seeded_frames
from flexfed.aggregation.ffa_lora import shared_a
from flexfed.aggregation.space import SPACES, moved_parts
from flexfed.config import load_config
from flexfed.defences import defended_aggregate
from flexfed.lora import Factors, lora_scale

D = K = 576
R, ALPHA = 8, 16.0


def _start(method: str, b_scale: float, g: torch.Generator) -> Factors:
    """A global a few rounds in: B no longer zero (``b_scale``), A PEFT-like or the method's own."""
    s = lora_scale(R, ALPHA)
    if method == "ffa-lora":
        return Factors(b=b_scale * torch.randn(D, R, generator=g), a=shared_a(0, "m", R, K), scale=s)
    if method == "fed-sb":
        b, a = seeded_frames(0, "m", (D, K), R)
        return sb_factors(b, b_scale * torch.randn(R, R, generator=g), a, s)
    a = (torch.rand(R, K, generator=g) * 2 - 1) / math.sqrt(K)
    return Factors(b=b_scale * torch.randn(D, R, generator=g), a=a, scale=s)


class _Link:  # what defended_aggregate needs of a Link: Fed-SB's frames
    def common(self, ranks):
        b, a = seeded_frames(0, "m", (D, K), R)
        return {"m": Factors(b=b, a=a, scale=lora_scale(R, ALPHA))}


def measure(method: str, sigma: float, clip: float, clients: int, b_scale: float, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    aggregator = get_aggregator(method)
    start = {"m": _start(method, b_scale, g)}
    parts = moved_parts(aggregator.trainable)
    updates = []
    for _ in range(clients):  # a random change of the trained factors, then clipped by the mechanism
        f = start["m"]
        b = f.b + 0.1 * torch.randn(f.b.shape, generator=g) if "b" in parts else f.b
        a = f.a + 0.1 * torch.randn(f.a.shape, generator=g) if "a" in parts else f.a
        updates.append({"m": Factors(b=b, a=a, scale=f.scale)})
    config = load_config("tiny", [f"federation.method={method}", f"privacy.clip_norm={clip}", f"privacy.noise_multiplier={sigma}"])
    quiet = load_config("tiny", [f"federation.method={method}", f"privacy.clip_norm={clip}", "privacy.noise_multiplier=0"])
    scale = lambda r: lora_scale(r, ALPHA)  # noqa: E731

    def plain(us, ws):
        return aggregator.aggregate(us, ws, {"m": R}, scale, previous=start)

    starts = [start] * clients
    weights = [1.0] * clients
    clean, _ = defended_aggregate(quiet, aggregator, plain, start, starts, updates, weights, _Link(), seed)
    noisy, report = defended_aggregate(config, aggregator, plain, start, starts, updates, weights, _Link(), seed)
    reference = clean["m"].delta(torch.float64)
    return float((noisy["m"].delta(torch.float64) - reference).norm() / reference.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"σ = {args.sigma}, S = {args.clip}, m = {args.clients}: noise std {args.sigma * args.clip / args.clients:.3g} per coordinate")
    print("| method (space) | B of the global ~ | relative error of the global s·B·A |")
    print("|---|---|---|")
    for b_scale in (0.01, 0.1):
        for method in ("fedit", "ffa-lora", "fed-sb", "flexlora"):
            errs = [measure(method, args.sigma, args.clip, args.clients, b_scale, s) for s in range(args.seeds)]
            print(f"| {method} ({SPACES[method]}) | N(0, {b_scale}²) | {sum(errs) / len(errs):.3g} |")


if __name__ == "__main__":
    main()
