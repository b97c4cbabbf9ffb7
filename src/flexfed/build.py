"""One builder for every party that trains: tokenizer, federation, model and trainer from a config.

The in-process runner and a Flower node build the same ``Setup`` from the same config, so a
client id means the same data, and a module name the same weights, everywhere. The model and
trainer are made on first use: a Flower node answers which clients it hosts without loading one.
"""

from __future__ import annotations

from functools import cached_property

import torch

from flexfed.client import pick_device
from flexfed.config import RunConfig
from flexfed.federation import Federation, build_federation, client_examples
from flexfed.models import load_model, load_tokenizer


class Setup:
    def __init__(self, config: RunConfig):
        self.config = config
        self.device = pick_device(config.device)
        self.tokenizer = load_tokenizer(config.model.name)
        self.federation: Federation = build_federation(config, self.tokenizer)

    @cached_property
    def trainer(self):
        from flexfed.client import LocalTrainer
        from flexfed.lora import target_shapes

        c = self.config
        model = load_model(c.model.name, dtype=getattr(torch, c.model.dtype), seed=c.seed)
        self.shapes = target_shapes(model, c.lora.target_modules)  # adapted module -> (d_out, d_in)
        return LocalTrainer(model, c.lora, c.training, self.tokenizer.pad_token_id, self.device, c.privacy.local, c.federation.writes_base)

    @property
    def model(self):
        """The base model (``trainer.base_model``; PEFT wraps it in place once a client trains)."""
        return self.trainer.base_model

    def shard_index(self, client_id: str) -> int:
        for i, shard in enumerate(self.federation.clients):
            if shard.client_id == client_id:
                return i
        raise ValueError(f"client {client_id!r} is not in this federation")

    def examples(self, client_id: str):
        """The client's encoded training examples (``ClientFailure`` if they cannot be loaded)."""
        shard = self.federation.clients[self.shard_index(client_id)]
        return client_examples(self.config, self.tokenizer, self.federation, shard)
