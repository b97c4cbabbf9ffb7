"""The pieces of a model cut between a client and the server: which blocks each side runs, a
forward through a range of blocks, LoRA factors bound into the trainer's PEFT layers, and the
cost formula of a part.

A Llama-style decoder is ``embed_tokens -> layers[0..L-1] -> norm`` and the LM head. With cut
layer ℓ and ``tail`` U-shape blocks, the client runs the embeddings and blocks ``[0, ℓ)`` (and
``[L - tail, L)``, the final norm and the head), the server runs ``[ℓ, L - tail)`` (and the norm,
head and loss when there is no tail). ``run_blocks`` runs a range through the Hugging Face
decoder itself, with its module list swapped for the range, so the causal mask and the rotary
embeddings are computed by the very code ordinary training uses: the split model is the same
function as the whole one.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, Mapping

import torch

from flexfed.cost import Architecture
from flexfed.lora import lora_modules


@dataclass(frozen=True)
class Cut:
    """Where a model of ``layers`` decoder blocks is cut."""

    layers: int
    cut_layer: int
    tail_layers: int = 0

    def __post_init__(self):
        if not 0 < self.cut_layer < self.layers:
            raise ValueError(f"split.cut_layer={self.cut_layer}: the model has {self.layers} decoder blocks, so it must lie in 1..{self.layers - 1}")
        if self.tail_layers and self.cut_layer + self.tail_layers >= self.layers:
            raise ValueError(
                f"split.cut_layer={self.cut_layer} with split.tail_layers={self.tail_layers} leaves the server no block of the model's {self.layers}"
            )

    @property
    def u_shape(self) -> bool:
        return self.tail_layers > 0

    @property
    def server_blocks(self) -> range:
        return range(self.cut_layer, self.layers - self.tail_layers)

    @property
    def head_blocks(self) -> range:
        return range(0, self.cut_layer)

    @property
    def tail_blocks(self) -> range:
        return range(self.layers - self.tail_layers, self.layers)

    def client_blocks(self) -> list[int]:
        return [*self.head_blocks, *self.tail_blocks]

    def side(self, module: str) -> str:
        """``client`` or ``server``: who trains the LoRA of ``module`` (``model.layers.3.mlp.up_proj``)."""
        return "server" if block_of(module) in self.server_blocks else "client"


def block_of(module: str) -> int:
    """The decoder block of an adapted module's name (``...layers.3.self_attn.q_proj`` -> 3)."""
    parts = module.split(".")
    try:
        return int(parts[parts.index("layers") + 1])
    except (ValueError, IndexError):
        raise ValueError(f"{module}: not inside a decoder block (lora.target_modules must name layers of the blocks)") from None


def decoder_of(model):
    """The causal LM under a PEFT wrapper, and its decoder."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base, base.get_decoder()


@contextmanager
def _only_blocks(decoder, blocks: range, final_norm: bool) -> Iterator[None]:
    layers, norm = decoder.layers, decoder.norm
    decoder.layers = torch.nn.ModuleList([layers[i] for i in blocks])
    if not final_norm:
        decoder.norm = torch.nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, norm


def run_blocks(model, blocks: range, attention_mask: torch.Tensor, *, input_ids: torch.Tensor | None = None, hidden: torch.Tensor | None = None, final_norm: bool = False) -> torch.Tensor:
    """The hidden states after ``blocks``, from token ids (the first part: embeddings first) or
    from the hidden states of the block before; ``final_norm``: the last part, norm applied."""
    _, decoder = decoder_of(model)
    with _only_blocks(decoder, blocks, final_norm):
        if input_ids is not None:
            return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return decoder(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False).last_hidden_state


@contextmanager
def bound(model, slot: str, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """The PEFT layers of ``slot`` computing with ``factors`` (module -> (A, B) tensors) in place of
    their own weights, for the time of a forward pass.

    Each party keeps its factors (and their optimizer) as tensors of its own, so many clients,
    or v1's server-part copies, train on one PEFT model without copying factors in and out."""
    layers = lora_modules(model)
    saved = []
    try:
        for name, (a, b) in factors.items():
            layer = layers[name]
            for linear, weight in ((layer.lora_A[slot], a), (layer.lora_B[slot], b)):
                saved.append((linear, linear._parameters["weight"]))
                linear._parameters["weight"] = weight
        yield
    finally:
        for linear, weight in reversed(saved):
            linear._parameters["weight"] = weight


def part_architecture(arch: Architecture, model, blocks: list[int], head: bool) -> Architecture:
    """The cost formula's view of the blocks ``blocks`` (and the LM head when ``head``) alone:
    their linear weights, attention, and the vocabulary term only where the loss is computed.
    Block 0's q, k, v need no input gradient (their input, the embeddings, is frozen); any other
    first block's do, as its gradient goes to the other side."""
    _, decoder = decoder_of(model)
    # The frozen base only, whether or not PEFT has wrapped the model yet (its LoRA layers are
    # Linear modules too, and ``q_proj`` becomes ``q_proj.base_layer``).
    linears = {n.removesuffix(".base_layer"): m for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" not in n}
    mine = {n: m for n, m in linears.items() if n.startswith("layers.") and int(n.split(".")[1]) in blocks}
    first_qkv = sum(m.weight.numel() for n, m in mine.items() if n.startswith("layers.0.") and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj"))
    block_params = sum(p.numel() for i in blocks for n, p in decoder.layers[i].named_parameters() if ".lora_" not in f".{n}")
    embeddings = decoder.embed_tokens.weight.numel()
    params = block_params + (embeddings if 0 in blocks or head else 0) + (decoder.norm.weight.numel() if head else 0)
    body = sum(m.weight.numel() for m in mine.values())
    memory = replace(arch.memory, params=params, linear_params=body + (embeddings if head else 0), layers=len(blocks), vocab=arch.vocab if head else 0)
    return replace(arch, body=body, first_qkv=first_qkv, layers=len(blocks), vocab=arch.vocab if head else 0, memory=memory)
