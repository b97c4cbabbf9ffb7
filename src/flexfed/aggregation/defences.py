"""The server's defences around a method's aggregation: robust norm bound, DP clipping, a
coordinate-wise rule instead of the mean, DP noise on the aggregate; and the config checks that
say which methods each one covers.

The math lives in pure modules (``aggregation.space``, ``aggregation.robust``, ``privacy``);
this module only chains them for one round. ``Server.aggregate`` calls ``defended_aggregate``
when any defence is configured and the method's own ``aggregate`` otherwise.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Mapping, Sequence

import torch

from flexfed.aggregation.base import Aggregator, normalized_weights
from flexfed.aggregation.robust import COORDINATE_WISE, coordinatewise, norm_outliers
from flexfed.aggregation.space import SPACES, move_update, moved_parts, update_norm
from flexfed.lora import Adapter, Factors
from flexfed.privacy import add_noise, clip, noise_std, noisy_product


def check_config(config) -> None:
    """``ValueError`` naming the fields when the method cannot honour the privacy / robust settings."""
    method, options = config.federation.method, config.federation.method_options
    privacy, robust = config.privacy, config.robust
    covered = sorted(SPACES)
    if privacy.enabled and method not in SPACES:
        raise ValueError(f"privacy.clip_norm: federation.method {method!r} has no update space to clip in (covered: {covered}); "
                         "FLoRA restarts a fresh LoRA each round and merges stacks, LoRA-FAIR refits B on the server")
    if robust.norm_bound is not None and method not in SPACES:
        raise ValueError(f"robust.norm_bound: federation.method {method!r} has no update space to measure norms in (covered: {covered})")
    if robust.aggregate != "mean" and method not in COORDINATE_WISE:
        raise ValueError(f"robust.aggregate={robust.aggregate!r} needs a method whose clients send the same coordinates and whose "
                         f"server averages them ({list(COORDINATE_WISE)}), not federation.method {method!r}")
    if privacy.local.enabled:
        from flexfed.aggregation import Aggregator

        aggregator = Aggregator.registry[method](**options)
        if aggregator.local_rule() is not None or set(aggregator.trainable) - {"a", "b"}:
            raise ValueError(f"privacy.local: federation.method {method!r} trains with a local penalty or a core between fixed frames, "
                             "whose gradients Opacus does not clip per example; local DP-SGD covers methods that train LoRA's A and/or B")
        if config.federation.sparse_stage.rounds:
            raise ValueError("privacy.local does not cover federation.sparse_stage (SLoRA's sparse rounds)")
        if importlib.util.find_spec("opacus") is None:
            raise ValueError("privacy.local: DP-SGD runs through Opacus, which is not installed: pip install 'flexfed[privacy]'")
    if privacy.enabled:
        if method == "hetlora" and options.get("sparsity_weighted", True):
            raise ValueError("privacy.clip_norm with hetlora needs federation.method_options.sparsity_weighted=false: "
                             "sparsity weights ‖ΔW_i‖/Σ‖ΔW_j‖ depend on every update, so one client moves them all")
        if config.federation.sparse_stage.rounds:
            raise ValueError("privacy.clip_norm does not cover federation.sparse_stage (SLoRA's sparse rounds)")
        if robust.aggregate != "mean":
            raise ValueError(f"privacy's noise is calibrated to the weighted mean; robust.aggregate={robust.aggregate!r} has another sensitivity")
        if importlib.util.find_spec("opacus") is None:
            raise ValueError("privacy.clip_norm: ε is accounted by Opacus, which is not installed: pip install 'flexfed[privacy]'")


def is_defended(config) -> bool:
    return config.privacy.enabled or config.robust.enabled


def defended_aggregate(
    config,
    aggregator: Aggregator,
    aggregate: Callable[[Sequence[Mapping[str, Factors]], Sequence[float]], Adapter],
    previous: Mapping[str, Factors],
    starts: Sequence[Mapping[str, Factors]],
    updates: Sequence[Mapping[str, Factors]],
    weights: Sequence[float],
    link,
    noise_seed: int,
) -> tuple[Adapter, dict]:
    """The round's new global from ``updates`` (each trained from ``starts[i]``) and what the
    defences did: ``norm_bound`` and the indices ``rejected`` or ``clipped`` by it, ``dp_clipped``
    (how many updates privacy clipped), ``noise_std``. ``aggregate(updates, weights)`` is the
    method's own aggregation."""
    space, parts = SPACES[aggregator.name], moved_parts(aggregator.trainable)
    ref = {n: f.scale for n, f in previous.items()} if space == "factors" else None
    robust, privacy = config.robust, config.privacy
    updates, weights, starts = list(updates), list(weights), list(starts)
    report: dict = {}
    if robust.norm_bound is not None:
        norms = [update_norm(space, parts, s, u, ref) for s, u in zip(starts, updates)]
        bound, over = norm_outliers(norms, robust.norm_bound)
        report.update(norm_bound=bound, norms=norms)
        if robust.norm_bound_action == "reject":
            report["rejected"] = over
            kept = [i for i in range(len(updates)) if i not in over]
            updates, weights, starts = [updates[i] for i in kept], [weights[i] for i in kept], [starts[i] for i in kept]
        else:
            report["clipped"] = over
            updates = [move_update(space, parts, s, u, bound / norms[i]) if i in over else u for i, (s, u) in enumerate(zip(starts, updates))]
    if privacy.enabled:
        clipped = [clip(space, parts, s, u, privacy.clip_norm, ref) for s, u in zip(starts, updates)]
        report["dp_clipped"] = sum(norm > privacy.clip_norm for _, norm in clipped)
        updates = [u for u, _ in clipped]
    if robust.aggregate != "mean":
        ranks = {n: f.rank for n, f in updates[0].items()}
        payload = coordinatewise([link.send(u, ranks) for u in updates], robust.aggregate, robust.trim_fraction)
        return link.receive(payload, ranks), report
    if not (privacy.enabled and privacy.noise_multiplier > 0):
        return aggregate(updates, weights), report
    std = noise_std(privacy.noise_multiplier, privacy.clip_norm, normalized_weights(weights))
    report["noise_std"] = std
    generator = torch.Generator().manual_seed(noise_seed)
    if space == "product":  # noise on Σ p_i ΔW_i, then the method's SVD of that one sum
        return aggregate([noisy_product(updates, normalized_weights(weights), std, generator)], [1.0]), report
    new = aggregate(updates, weights)
    frames = link.common({n: f.rank for n, f in new.items()}) if "r" in aggregator.trainable else None
    return add_noise(aggregator.trainable, new, std, generator, frames), report
