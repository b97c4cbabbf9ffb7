"""Split-FedLLM on SmolLM2-135M: a client's FLOPs, memory and bytes by cut layer, and exactness.

For each cut ℓ (default 1, 4, 15, 29 of SmolLM2's 30 blocks) one client trains one round of
``--steps`` local steps through the split protocol (the server computing the loss), and the same
client trains the whole model with ordinary LoRA from the same start on the same batches. Printed
per cut: the client's counted FLOPs and its peak-memory figure (``peak_memory_source``), the
bytes per step each way from the messages sent, and the largest difference of the per-step
losses and of the trained factors against ordinary training. Last, the same for ordinary LoRA
training of the whole model (what a FedIT client computes).

    PYTHONPATH=src python benchmarks/split.py [--cuts 1 4 15 29] [--steps 2] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuts", type=int, nargs="+", default=[1, 4, 15, 29])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--wire-dtype", default="model")
    args = parser.parse_args()

    from flexfed.build import Setup
    from flexfed.config import load_config
    from flexfed.protocol import converse
    from flexfed.split.protocol import SplitProtocol

    config = load_config("quickstart", [f"output_dir={tempfile.mkdtemp()}", "federation.method=split", f"training.precision={args.precision}",
                                        f"training.local_steps={args.steps}", f"split.wire_dtype={args.wire_dtype}"])
    setup = Setup(config)
    client = setup.federation.clients[0].client_id
    examples = setup.examples(client)
    rows = []
    reference = None
    for cut in args.cuts:
        config.split.cut_layer = cut
        protocol = SplitProtocol(setup)
        state = protocol.initial_state()
        sent = []

        def deliver(wave, protocol=protocol):
            replies = dict(zip(wave, protocol.serve(setup, list(wave.values()))))
            sent.extend((wave[c], replies[c]) for c in wave)
            return replies

        began = time.perf_counter()
        outcome = converse({0: protocol.conversation(state, 1, 0, True)}, deliver)[0]
        seconds = time.perf_counter() - began
        if not hasattr(outcome, "update"):
            raise SystemExit(f"cut {cut}: the client failed: {outcome.error}")
        if reference is None:
            began = time.perf_counter()
            reference = setup.trainer.train(client, state.global_adapter, examples, protocol.server.client_seed(1, 0))
            reference_seconds = time.perf_counter() - began
        trained = {**outcome.update.client, **outcome.update.server}
        factor_diff = max(float((trained[n].a - reference.adapter[n].a).abs().max()) for n in trained)
        factor_diff = max(factor_diff, max(float((trained[n].b - reference.adapter[n].b).abs().max()) for n in trained))
        loss_diff = max(abs(a - b) for a, b in zip(outcome.stats["losses"], reference.losses))
        s = outcome.stats
        rows.append({
            "cut_layer": cut, "client_flops": s["flops"], "client_flops_analytic": s["flops_analytic"], "client_peak_memory_bytes": s["peak_memory_bytes"],
            "peak_memory_source": s["peak_memory_source"], "bytes_up_per_step": outcome.update.bytes_up_per_step,
            "bytes_down_per_step": outcome.update.bytes_down_per_step, "bytes_start_and_end": outcome.bytes_up + outcome.bytes_down
            - sum(outcome.update.bytes_up_per_step) - sum(outcome.update.bytes_down_per_step),
            "max_loss_diff": loss_diff, "max_factor_diff": factor_diff, "seconds": round(seconds, 1),
        })
        print(json.dumps(rows[-1]), flush=True)
    r = reference
    print(json.dumps({"cut_layer": None, "client_flops": r.cost["flops"], "client_flops_analytic": r.cost["flops_analytic"],
                      "client_peak_memory_bytes": r.cost["peak_memory_bytes"], "peak_memory_source": r.cost["peak_memory_source"],
                      "seconds": round(reference_seconds, 1), "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
