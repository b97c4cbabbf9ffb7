"""What each family costs a client in a round, by formula (SPEC §9): bytes each way, FLOPs, memory.

Two uses, one set of formulas:

* **the check** (``check_run``): every client of a finished run, its measured bytes (summed over
  the messages actually sent) beside what the formula gives for what that client did — its
  ranks, its padded tokens S·B·T, the scored positions, its catch-up rounds. Bytes must be equal;
  a difference is a bug in the protocol or here, never rounding.
* **the scaling view** (``scale_rows``): the same formulas with the same client workload at the
  shapes of larger LLaMA models (``SCALES``, built on the meta device: no weights), so a user sees
  how each family's traffic and client cost grow from the 135M model they measured.

Bytes, per client per round (b = 4: factors, distributions, scalars and ids all travel as
float32; w = the split wire's element size)::

    LoRA (fedit, flexlora, hetlora)  up = down = sum over adapted matrices of r (d_in + d_out) b
    FFA-LoRA                         up = down = sum of r d_out b (A is frozen, rebuilt from the seed)
    KD (FedDF)                       up = the encoding of the scored positions (full: V b; top-k:
                                     k (b + b) + b; labels: (labels + 1) b, per position)
                                     down = the client layers' adapter + the responses, prompts x width x b
    Split, cut after l blocks        up = SBT (h w + 1 + 8) + client adapter  (activations, mask, labels)
                                     down = SBT h w + client adapter          (their gradients)
    Split, U-shape                   up = SBT (2 h w + 1) + adapter; down = 2 SBT h w + adapter
    Split, soft prompt (SFPrompt)    the adapter is the prompt, n h b each way; SBT counts its n positions
    FedKSeed (K seeds, tau steps)    up = 2 b tau (seed index and scalar); down = K b per missed round
                                     (+ K b probabilities for FedKSeed-Pro)

Client FLOPs by SPEC's approximations, with P the parameters of the decoder blocks (SPEC writes
P; the embeddings are left out here as in the usual 6N rule, since a lookup costs no FLOPs and
the head is computed on labelled positions only; with them, SmolLM2's 4 P would overstate a step
by its 28M embedding parameters) and P_client those of the blocks the client runs::

    LoRA, FedKSeed      4 P SBT     (forward + input gradients; or two forwards)
    KD                  4 P SBT + 2 P x proxy tokens
    Split               4 P_client SBT, P_client = l/L of the blocks (+ the tail blocks for U-shape)

The exact FLOP formula each protocol also records (``flops_analytic``: ``cost.Architecture``,
attention's T² and the head on labelled positions included) stays beside the counted value; the
approximation above is what the scaling view extrapolates, with its measured ratio at 135M shown
so a reader can correct it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from flexfed.lora import module_kind, target_shapes

FLOAT = 4  # bytes of every float32 on the wire
LABEL = 8  # int64 labels sent with split activations
MASK = 1  # uint8 attention mask
WEIGHT_METHODS = ("fedit", "flexlora", "hetlora")  # send both factors of every adapted matrix each way
B_ONLY_METHODS = ("ffa-lora",)
ZO_METHODS = ("fedkseed", "fedkseed-pro")
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

# Larger LLaMA shapes for the scaling view (published configs; vocabulary 32,000).
SCALES = {
    "llama-1.3b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}


def family(method: str) -> str:
    """``weights``, ``kd``, ``split`` or ``zo``."""
    if method in ZO_METHODS:
        return "zo"
    return method if method in ("kd", "split") else "weights"


@dataclass(frozen=True)
class ModelShape:
    """What the formulas read off a causal LM (real or on the meta device)."""

    name: str
    params: int  # P: every parameter, tied embeddings once
    embedding: int  # the input embedding matrix
    head: int  # the output projection's own parameters (0 when tied to the embeddings)
    layers: int
    hidden: int
    vocab: int
    block: int  # parameters of one decoder block
    linears: Mapping[str, tuple[int, int]]  # every linear layer of the blocks: name -> (d_out, d_in)
    model: object  # the module, for the memory estimate

    @classmethod
    def of(cls, model, name: str) -> ModelShape:
        c = model.config
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        linears = target_shapes(model, sorted({module_kind(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and LAYER.search(n)}))
        return cls(name=name, params=sum(p.numel() for p in model.parameters()), embedding=embed.numel(),
                   head=0 if head is embed else head.numel(),
                   layers=c.num_hidden_layers, hidden=c.hidden_size, vocab=c.vocab_size,
                   block=sum(p.numel() for p in model.get_decoder().layers[0].parameters()), linears=linears, model=model)

    def modules(self, target_modules: Sequence[str], layers: Sequence[int] | None = None) -> dict[str, tuple[int, int]]:
        """The adapted matrices (of the given block indices, or all)."""
        keep = set(target_modules)
        out = {}
        for name, shape in self.linears.items():
            found = LAYER.search(name)
            if module_kind(name) in keep and (layers is None or (found and int(found.group(1)) in layers)):
                out[name] = shape
        return out


def meta_shape(name: str, scale: Mapping) -> ModelShape:
    """A LLaMA of the given config on the meta device: shapes without weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**scale, tie_word_embeddings=False))
    return ModelShape.of(model, name)


def adapter_bytes(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int], b_only: bool = False) -> int:
    """Bytes of the LoRA factors of ``shapes`` at the per-kind ``ranks`` (A is r x d_in, B d_out x r)."""
    return FLOAT * sum(ranks[module_kind(n)] * (d_out if b_only else d_out + d_in) for n, (d_out, d_in) in shapes.items())


def client_layers(config, shape: ModelShape) -> list[int]:
    """The blocks a client runs: all, KD's ``client_layers``, or split's head and tail."""
    method = config.federation.method
    if method == "split":
        s = config.split
        return list(range(s.cut_layer)) + list(range(shape.layers - s.tail_layers, shape.layers))
    if method == "kd" and config.kd.client_layers is not None:
        return list(range(config.kd.client_layers))
    return list(range(shape.layers))


def wire_bytes(config) -> int:
    if config.split.wire_dtype != "model":
        return 2
    from flexfed.client import pick_device
    from flexfed.precision import base_dtype

    return base_dtype(config, pick_device(config.device)).itemsize


def kd_up(config, vocab: int, positions: int) -> int:
    from flexfed.kd.distill import Encoding

    kd = config.kd
    encoding = Encoding(kd.encoding, vocab, kd.k if kd.encoding == "top-k" else 0, tuple(range(len(kd.labels))))
    return encoding.nbytes(positions)


def client_bytes(config, shape: ModelShape, round_row: Mapping, client: Mapping) -> tuple[int, int] | None:
    """(up, down) bytes the formula gives for this client in this round; None where there is none
    (a method outside those above, KD's FedMD digest)."""
    method = config.federation.method
    ranks = client.get("ranks") or {}
    targets = config.lora.target_modules
    if method in WEIGHT_METHODS + B_ONLY_METHODS:
        both = adapter_bytes(shape.modules(targets), ranks, b_only=method in B_ONLY_METHODS)
        return both, both
    if method == "kd":
        if config.kd.mode != "feddf":
            return None
        adapter = adapter_bytes(shape.modules(targets, client_layers(config, shape)), ranks)
        responses = round_row["kd_prompts"] * config.kd.proxy.max_new_tokens * FLOAT
        return kd_up(config, shape.vocab, round_row["kd_positions"]), adapter + responses
    if method == "split":
        if config.split.client_adapter == "prompt":  # SFPrompt: n soft-prompt vectors instead of client LoRA
            adapter = config.split.prompt_tokens * shape.hidden * FLOAT
        else:
            adapter = adapter_bytes(shape.modules(targets, client_layers(config, shape)), ranks)
        tokens, w, h = client["tokens_padded"], wire_bytes(config), shape.hidden
        if config.split.tail_layers:
            return tokens * (2 * h * w + MASK) + adapter, tokens * 2 * h * w + adapter
        return tokens * (h * w + MASK + LABEL) + adapter, tokens * h * w + adapter
    if method in ZO_METHODS:
        k = config.zo.seeds
        return 2 * FLOAT * client["zo_steps"], k * FLOAT * (client.get("catch_up_rounds", 0) + (method == "fedkseed-pro"))
    return None


def client_params(config, shape: ModelShape) -> int:
    """P_client: the parameters of the blocks a client runs. Embeddings are left out as in the usual
    6N rule (a lookup costs no FLOPs), and so is the head, computed on labelled positions only."""
    return len(client_layers(config, shape)) * shape.block


def client_flops(config, shape: ModelShape, round_row: Mapping, client: Mapping) -> float:
    """SPEC §9's approximation of the client's FLOPs in the round."""
    flops = 4 * client_params(config, shape) * client["tokens_padded"]
    if config.federation.method == "kd":
        flops += 2 * client_params(config, shape) * round_row.get("kd_proxy_tokens", round_row["kd_positions"])
    return float(flops)


def client_memory(config, shape: ModelShape, client: Mapping) -> int:
    """Peak training memory by ``resources.TrainingMemory`` (inference memory for zeroth-order) for
    the config's worst batch, on the client's part of the model."""
    from flexfed.resources import TrainingMemory

    t = config.training
    model = shape.model
    layers = client_layers(config, shape)
    shapes = shape.modules(config.lora.target_modules, layers)
    memory = TrainingMemory.from_model(model, shapes, batch_size=t.batch_size, max_tokens=config.data.max_tokens,
                                       response_tokens=config.data.max_response_tokens,
                                       optimizer_states=2 if t.optimizer == "adamw" else int(t.momentum > 0))
    if config.federation.method in ZO_METHODS:
        from flexfed.zo import inference_memory

        return inference_memory(memory, t.batch_size, config.data.max_tokens, t.batch_size * config.data.max_response_tokens, config.zo.chunk)
    ranks = client.get("ranks") or {}
    estimate = memory.estimate({n: ranks[module_kind(n)] for n in shapes})
    if len(layers) == shape.layers:
        return estimate.total
    # A client part: its share of the weights and activations; the logits only if it keeps the head.
    part = client_params(config, shape) * memory.weight_bytes
    activations = estimate.activations * len(layers) // shape.layers
    keeps_head = config.federation.method == "kd" or config.split.tail_layers
    return part + estimate.adapter + activations + (estimate.logits if keeps_head else 0)


# ---------------------------------------------------------------------------- the check


def check_run(config, shape: ModelShape, rows: Sequence[Mapping]) -> dict:
    """Every client-round of a run: measured bytes against the formula, and SPEC's FLOP
    approximation against the counted FLOPs. ``mismatches`` lists each difference in bytes."""
    pairs, mismatches, flop_ratios, exact_ratios = 0, [], [], []
    for row in rows:
        for client in row.get("clients", []):
            if client.get("bytes_up") is None:
                continue
            expected = client_bytes(config, shape, row, client)
            if expected is not None:
                pairs += 1
                if (client["bytes_up"], client["bytes_down"]) != expected:
                    mismatches.append({"round": row["round"], "client": client["id"], "measured": [client["bytes_up"], client["bytes_down"]],
                                       "formula": list(expected)})
            if client.get("flops") and client.get("tokens_padded"):
                flop_ratios.append(client["flops"] / client_flops(config, shape, row, client))
                if client.get("flops_analytic"):
                    exact_ratios.append(client["flops"] / client["flops_analytic"])
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"checked": pairs, "mismatches": mismatches, "flops_over_spec": mean(flop_ratios), "flops_over_analytic": mean(exact_ratios)}


# ---------------------------------------------------------------------------- the scaling view


def typical_client(rows: Sequence[Mapping]) -> tuple[dict, dict]:
    """The median client (by padded tokens) of a run's last trained round, with that round: the
    workload to scale. The last round, since the first differs (FedKSeed has no history to send)."""
    trained = [row for row in rows if row.get("clients")]
    found = sorted((c["tokens_padded"], i, c) for i, c in enumerate(trained[-1]["clients"]) if c.get("tokens_padded")) if trained else []
    if not found:
        raise ValueError("no client of the last round records tokens_padded (a run from before the field existed?)")
    return dict(trained[-1]), dict(found[len(found) // 2][2])


def scale_rows(config, shapes: Sequence[ModelShape], row: Mapping, client: Mapping) -> list[dict]:
    """Bytes, FLOPs and memory of one client-round's workload at each model shape."""
    out = []
    for shape in shapes:
        ranks = dict(client.get("ranks") or {})
        if not ranks and family(config.federation.method) != "zo":
            ranks = {k: config.lora.rank for k in config.lora.target_modules}
        c = {**client, "ranks": ranks}
        up_down = client_bytes(config, shape, row, c)
        out.append({"model": shape.name, "params": shape.params, "bytes_up": up_down[0] if up_down else None,
                    "bytes_down": up_down[1] if up_down else None, "client_flops": client_flops(config, shape, row, c),
                    "client_memory": client_memory(config, shape, c)})
    return out
