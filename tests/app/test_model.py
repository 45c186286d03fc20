"""Model loading: the bundled model's cache, local directories, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.model import ModelNotFound, load_model, resolve_model_dir


def test_missing_directory_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFound, match=str(missing)):
        resolve_model_dir(missing, tmp_path)


def test_directory_without_config_or_weights_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="config.json"):
        resolve_model_dir(tmp_path, tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="weights"):
        resolve_model_dir(tmp_path, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFound, match="tokenizer"):
        resolve_model_dir(tmp_path, tmp_path)


def test_local_model_directory_loads_like_the_bundled_one(lm) -> None:  # noqa: ANN001
    settings = Settings()
    cached = resolve_model_dir(None, settings.cache_dir)  # the prepared safetensors directory
    assert (cached / "model.safetensors").is_file()
    local = load_model(cached, settings.cache_dir)
    ids = torch.tensor([[1, 4093, 28, 3000, 30]])
    with torch.inference_mode():
        a = local.model(ids).logits
        b = lm.model(ids).logits
    assert torch.equal(a, b)
    assert local.name == cached.name
