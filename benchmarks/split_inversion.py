"""What the activations at a cut reveal: nearest-token inversion of SmolLM2's hidden states.

The server of a split run sees, for every token of a client's batch, the hidden state after
block ℓ. The simplest attack maps each one back to the vocabulary token whose input embedding is
nearest (cosine similarity) and counts how often that is the token the client actually fed in.
A second column does the same after dividing every dimension, of the hidden states and of the
embeddings alike, by that dimension's spread over the batch's hidden states: a few outlier
dimensions dominate the residual stream after the first blocks and hide the rest from a plain
cosine.
Ordinary base weights, no LoRA (a round's adapter moves them little). Printed per cut: the
share of real (non-padding) tokens recovered, over the training examples of the first clients.

    PYTHONPATH=src python benchmarks/split_inversion.py [--cuts 1 2 4 8 15 29] [--clients 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuts", type=int, nargs="+", default=[1, 2, 4, 8, 15, 29])
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()

    from flexfed.build import Setup
    from flexfed.client import collate
    from flexfed.config import load_config
    from flexfed.split.parts import run_blocks

    setup = Setup(load_config("quickstart", [f"output_dir={tempfile.mkdtemp()}"]))
    model = setup.trainer.base_model
    embeddings = torch.nn.functional.normalize(model.get_input_embeddings().weight.detach().float(), dim=-1)
    examples = [e for shard in setup.federation.clients[: args.clients] for e in setup.examples(shard.client_id)]
    raw_embeddings = model.get_input_embeddings().weight.detach().float()
    recovered, whitened, total = dict.fromkeys(args.cuts, 0), dict.fromkeys(args.cuts, 0), 0
    with torch.no_grad():
        for start in range(0, len(examples), 8):
            batch = collate(examples[start : start + 8], setup.tokenizer.pad_token_id)
            real = batch["attention_mask"].bool()
            total += int(real.sum())
            hidden, done = None, 0
            for cut in sorted(args.cuts):  # block by block: the hidden state after each cut, one forward in all
                if hidden is None:
                    hidden = run_blocks(model, range(cut), batch["attention_mask"], input_ids=batch["input_ids"])
                else:
                    hidden = run_blocks(model, range(done, cut), batch["attention_mask"], hidden=hidden)
                done = cut
                nearest = (torch.nn.functional.normalize(hidden.float(), dim=-1) @ embeddings.T).argmax(-1)
                recovered[cut] += int(((nearest == batch["input_ids"]) & real).sum())
                spread = hidden[real].float().std(dim=0) + 1e-6
                scaled = torch.nn.functional.normalize(raw_embeddings / spread, dim=-1)
                nearest = (torch.nn.functional.normalize(hidden.float() / spread, dim=-1) @ scaled.T).argmax(-1)
                whitened[cut] += int(((nearest == batch["input_ids"]) & real).sum())
    for cut in args.cuts:
        print(json.dumps({"cut_layer": cut, "tokens": total, "recovered": recovered[cut], "share": round(recovered[cut] / total, 4),
                          "recovered_whitened": whitened[cut], "share_whitened": round(whitened[cut] / total, 4)}))


if __name__ == "__main__":
    main()
