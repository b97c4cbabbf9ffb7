"""A split run's soft prompt outside training (``split.client_adapter=prompt``): the model to
evaluate, with the prompt's n vectors in front of every input, and the prompt saved as a PEFT
prompt-tuning adapter.

Evaluation calls ``model.generate`` and, for its loss, the decoder and the LM head directly
(``flexfed.evaluation``, ``client.response_logits``). ``PromptedModel`` answers both with the
prompt prepended, so the evaluated function is the one the split clients trained: the same
embeddings, a mask of n ones in front, positions 0..n-1 for the prompt.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import ContextManager, Iterator

import torch

from flexfed.split.parts import decoder_of

PROMPT_WEIGHTS = "adapter_model.safetensors"


class _PromptedDecoder(torch.nn.Module):
    """The decoder with the prompt in front; its hidden states are the input tokens' only."""

    def __init__(self, decoder, prompt: torch.Tensor):
        super().__init__()
        self.decoder, self.prompt = decoder, prompt

    def forward(self, input_ids, attention_mask, **kwargs):
        embeds, mask = prepend(self.decoder.embed_tokens, self.prompt, input_ids, attention_mask)
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        return SimpleNamespace(last_hidden_state=out.last_hidden_state[:, self.prompt.shape[0]:])


def prepend(embed_tokens, prompt: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The input embeddings with the prompt in front, and the mask with n ones in front."""
    embeds = embed_tokens(input_ids)
    rows, n = input_ids.shape[0], prompt.shape[0]
    embeds = torch.cat([prompt.to(embeds.device, embeds.dtype).unsqueeze(0).expand(rows, -1, -1), embeds], dim=1)
    return embeds, torch.cat([attention_mask.new_ones(rows, n), attention_mask], dim=1)


class PromptedModel(torch.nn.Module):
    """A causal LM with a soft prompt, as ``flexfed.evaluation`` uses a model."""

    def __init__(self, model, prompt: torch.Tensor):
        super().__init__()
        self.model = model
        self.base, decoder = decoder_of(model)
        self.prompt = prompt.to(next(model.parameters()).device)
        self.decoder = _PromptedDecoder(decoder, self.prompt)

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, **kwargs):
        """``input_ids`` followed by the generated tokens, as ``generate`` returns them for token
        inputs (with embeddings as the input Hugging Face returns the new tokens alone). Rows are
        left-padded: the prompt goes in front of the padding, and the positions, counted over the
        mask, are 0..n-1 for the prompt and n.. for the tokens, as in training."""
        embeds, mask = prepend(self.base.get_input_embeddings(), self.prompt, input_ids, attention_mask)
        new = self.base.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


@contextmanager
def prompted(merged: ContextManager, prompt: torch.Tensor) -> Iterator[PromptedModel]:
    """``merged``'s model (the trainer's, LoRA folded in) with ``prompt`` in front of every input."""
    with merged as model:
        yield PromptedModel(model, prompt)


def save_prompt(path: Path, prompt: torch.Tensor, model_config) -> Path:
    """``prompt`` as a PEFT prompt-tuning adapter directory: ``PeftModel.from_pretrained(model,
    path)`` on the base model with the server part's LoRA merged in gives the trained model.

    (PEFT cannot hold a prompt-tuning adapter and a LoRA adapter in one model, so the LoRA is
    the round's adapter directory and the prompt this one, beside it.)"""
    from peft import PromptTuningConfig, TaskType
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prompt.shape[0], token_dim=prompt.shape[1], num_transformer_submodules=1,
        num_attention_heads=model_config.num_attention_heads, num_layers=model_config.num_hidden_layers,
        base_model_name_or_path=model_config.name_or_path,
    )
    config.save_pretrained(str(path))
    save_file({"prompt_embeddings": prompt.detach().float().cpu().contiguous()}, str(path / PROMPT_WEIGHTS), metadata={"format": "pt"})
    return path
