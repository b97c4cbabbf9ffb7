"""Secure aggregation's side of the math: which methods can run when the server learns only the
weighted mean of the round's payloads, and how that mean becomes the method's global adapter.

Under secure aggregation (``flower.secure_aggregation: secaggplus``, carried by Flower's SecAgg+
in ``flexfed.engines.flower.secagg``) every node sends a masked, quantised vector and the server
recovers only M = Σ_i n_i x_i / Σ_i n_i over the nodes that finished, where x_i is what client i
would have sent (``Aggregator.encode`` of its trained adapter) and n_i the weight the server
assigned it (its shard size). A method runs under it when its aggregate is a function of M:

- ``secure_mean = "payload"``: the aggregate is linear in the payload, so the method's own
  ``aggregate`` of M, decoded as one update of weight 1, *is* the aggregate of the round (FedIT's
  Σ p_i A_i and Σ p_i B_i; FFA-LoRA's Σ p_i B_i and Fed-SB's Σ p_i R_i beside the factors every
  party derives from the seed).
- ``secure_mean = "dense"``: the method needs Σ p_i s_i B_i A_i, which no sum of factors gives
  (FlexLoRA's SVD). With ``flower.secaggplus.dense`` each client sends its dense
  ΔW_i = s(r_i) B_i A_i instead (``dense_arrays``): d·k values per matrix instead of r_i (d + k).
- ``secure_mean = "padded"``: HetLoRA with ``sparsity_weighted: false`` and ``prune: false``: each
  client sends its factors zero-padded to the global rank g, B_i scaled by s(r_i)/s(g)
  (``padded_arrays``), so M is HetLoRA's p_i-weighted padded sum; the components beyond the
  largest rank of the round keep the previous global (``HetLoRA.aggregate_padded``).
- ``None``: refused (``check_config``), e.g. FLoRA stacks the factors, LoRA-FAIR refits B from
  the individual factors, HetLoRA's sparsity weights ‖ΔW_i‖/Σ‖ΔW_j‖ and its self-pruned ranks need
  each update.

Departures from the plain round: no update can be checked or bounded one by one
(``Server.check_update``); only the recovered aggregate is (``Server.check_bounded``), and
defences that look at each update (``privacy.clip_norm``, ``robust``) and the simulated attacks
are refused. The mean carries SecAgg+'s quantisation error (see ``tolerance``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

DENSE = "dw"  # payload part of a module's dense update under ``flower.secaggplus.dense``


@dataclass(frozen=True)
class SecureMean:
    """What the server holds of a round under secure aggregation: the weighted mean of the
    payloads of ``clients`` (ids, in the round's order), never any one of them."""

    payload: Mapping  # payload key -> tensor: Σ_i n_i x_i / Σ_i n_i
    clients: tuple[str, ...]
    dense: bool = False  # the payload holds dense ΔW per module (``DENSE``), not the method's parts
    padded: bool = False  # the payload holds every module's factors zero-padded to the global rank, at s(g)


def check_config(config) -> None:
    """``ValueError`` naming what to change when ``config`` asks for secure aggregation that its
    method or settings cannot run under (the server would need individual updates)."""
    f = config.flower
    if f.secure_aggregation == "off":
        return
    from flexfed.aggregation import Aggregator
    from flexfed.protocol import FAMILIES

    method = config.federation.method
    runs = ("FedIT, FFA-LoRA and Fed-SB (their payloads' weighted sum), FlexLoRA with flower.secaggplus.dense: true, "
            "HetLoRA with federation.method_options {sparsity_weighted: false, prune: false}")
    if method in FAMILIES:
        what = {"kd": "distributions on the public proxy set, which the server distils from one by one",
                "split": "activations and gradients every local step, which the server trains on one by one",
                }.get(method, "seeds and scalar gradients, each replayed by the server and every client in turn")
        raise ValueError(f"flower.secure_aggregation: {method!r} exchanges {what}, not a weighted sum of updates; SecAgg+ runs {runs}")
    aggregator = Aggregator.registry[method](**config.federation.method_options)
    mode = aggregator.secure_mean
    if mode is None:
        why = {"flora": "FLoRA stacks every client's factors (its global has the sum of their ranks)",
               "lora-fair": "LoRA-FAIR refits B on the server from each client's factors",
               "hetlora": "HetLoRA's sparsity weights ‖ΔW_i‖/Σ‖ΔW_j‖ (sparsity_weighted) and its clients' rank self-pruning (prune) need each update",
               }.get(method, f"{method!r} needs each client's update")
        raise ValueError(f"flower.secure_aggregation: {why}; SecAgg+ gives the server only the weighted sum. It runs {runs}")
    if mode == "dense" and not f.secaggplus.dense:
        raise ValueError(f"flower.secure_aggregation: {method!r} needs Σ p_i s_i B_i A_i (its SVD), which no sum of factors gives; "
                         "set flower.secaggplus.dense: true to have each client send its dense ΔW_i = s B_i A_i under SecAgg+ "
                         "(d·k values per matrix instead of r·(d + k))")
    if f.secaggplus.dense and mode != "dense":
        raise ValueError(f"flower.secaggplus.dense is FlexLoRA's option; {method!r} aggregates its payloads' weighted sum as they are")
    refused = {
        "privacy.clip_norm (server-side DP clips each update; privacy.local, on the clients, is fine)": config.privacy.enabled,
        "robust (norm_bound / aggregate look at each update)": config.robust.enabled,
        "attack.fraction": config.attack.fraction > 0,
        "federation.sparse_stage (SLoRA)": config.federation.sparse_stage.rounds > 0,
    }
    on = [name for name, enabled in refused.items() if enabled]
    if on:
        raise ValueError(f"flower.secure_aggregation: the server sees only the sum of the updates; it cannot run {', '.join(on)}")


def dense_arrays(arrays: Mapping[str, np.ndarray], modules: Sequence[str], scales: Sequence[float]) -> dict[str, np.ndarray]:
    """``module.dw`` -> s B A (float32) of every module, from a payload of both factors (NumPy only:
    a relaying ClientApp never loads PyTorch)."""
    out = {}
    for module, scale in zip(modules, scales, strict=True):
        b, a = arrays[f"{module}.b"], arrays[f"{module}.a"]
        out[f"{module}.{DENSE}"] = (np.float32(scale) * (b.astype(np.float32) @ a.astype(np.float32))).astype(np.float32)
    return out


def padded_arrays(arrays: Mapping[str, np.ndarray], modules: Sequence[str], ranks: Sequence[int], ratios: Sequence[float]) -> dict[str, np.ndarray]:
    """Both factors of every module zero-padded to rank ``ranks[m]``, B times ``ratios[m]`` =
    s(r_i)/s(g) (HetLoRA's padding; float32, NumPy only)."""
    out = {}
    for module, rank, ratio in zip(modules, ranks, ratios, strict=True):
        b, a = arrays[f"{module}.b"], arrays[f"{module}.a"]
        r = a.shape[0]
        if r > rank:
            raise ValueError(f"{module}: rank {r} is above the global rank {rank}")
        padded_b = np.zeros((b.shape[0], rank), np.float32)
        padded_a = np.zeros((rank, a.shape[1]), np.float32)
        padded_b[:, :r] = b.astype(np.float64) * ratio
        padded_a[:r] = a
        out[f"{module}.b"], out[f"{module}.a"] = padded_b, padded_a
    return out


def tolerance(nodes: int, clipping_range: float, quantization_range: int) -> float:
    """Bound on |recovered mean - true weighted mean| per value: each of ``nodes`` nodes rounds its
    weighted value (n_i/max_weight · x_i, max_weight = the largest weight) stochastically to a step of
    2C/Q; the sum's error is below nodes·2C/Q and the mean divides it by Σ n_i/max_weight >= 1."""
    return nodes * 2.0 * clipping_range / quantization_range
