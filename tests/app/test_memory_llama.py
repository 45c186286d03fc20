"""The memory-reading forward pass against the stock transformers model."""

from __future__ import annotations

import numpy as np
import torch

from app.memory_llama import ReadConfig, WindowCache, attend, forward, reference_logits
from app.model import LoadedModel

# fp32 on CPU: the hand-written forward differs from transformers' only by summation order
TOL = 2e-4


def _ids(lm: LoadedModel) -> torch.Tensor:
    msgs = [{"role": "user", "content": "Name three colours of the rainbow, please."}]
    out = lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    return torch.tensor(out["input_ids"])


def test_empty_memory_equals_stock_model(lm: LoadedModel) -> None:
    from memory_store import MemoryParams, SessionMemory

    cfg = lm.model.config
    ids = _ids(lm)
    ref = reference_logits(lm.model, ids)
    empty = SessionMemory(
        cfg.num_hidden_layers, cfg.num_key_value_heads, 64, cfg.hidden_size, MemoryParams()
    )
    for memory in (None, empty):
        window = WindowCache(lm.model, 256)
        out = forward(lm.model, ids, window, memory, ReadConfig())
        assert (out.logits - ref).abs().max().item() < TOL
    # incremental: the window cache (keys kept before RoPE, rotated on append) gives the same
    window = WindowCache(lm.model, 256)
    first = forward(lm.model, ids[:7], window, None, ReadConfig())
    rest = forward(lm.model, ids[7:], window, None, ReadConfig())
    assert (torch.cat([first.logits, rest.logits]) - ref).abs().max().item() < TOL


def test_repositioned_window_equals_reencoding(lm: LoadedModel) -> None:
    """Dropping the front of the window and rotating the rest anew equals encoding the rest from
    position 0: attention depends on relative positions only (layer 0 keys are context-free)."""
    ids = _ids(lm)
    window = WindowCache(lm.model, 256)
    forward(lm.model, ids, window, None, ReadConfig())
    window.drop_range(0, 5)
    fresh = WindowCache(lm.model, 256)
    fresh.append(
        window.keys[:, :, : window.length].clone(), window.values[:, :, : window.length].clone()
    )
    assert torch.allclose(
        window.keys_rot[:, :, : window.length], fresh.keys_rot[:, :, : fresh.length]
    )


class _OneEntryMemory:
    """A memory of one key/value per KV head, to check the joint softmax by hand."""

    def __init__(self, key: np.ndarray, value: np.ndarray, strength: float) -> None:
        self.key, self.value, self.strength = key, value, strength

    def entry_count(self) -> int:
        return 1

    def token_count(self) -> int:
        return 0

    def search(self, layer: int, queries: np.ndarray, k: int):  # noqa: ANN201
        from types import SimpleNamespace

        h, q, d = queries.shape
        scores = np.einsum("hqd,hd->hq", queries, self.key)[..., None]  # (H, Q, 1)
        return SimpleNamespace(
            ids=np.zeros((h, q, 1), dtype=np.int64),
            scores=scores.astype(np.float32),
            log_strength=np.full((h, q, 1), np.log(self.strength), dtype=np.float32),
            values=np.broadcast_to(self.value[:, None, None, :], (h, q, 1, d)).astype(np.float32),
        )


def test_memory_logit_joins_one_softmax() -> None:
    torch.manual_seed(0)
    hq, h, t, d = 4, 2, 3, 8
    q, k, v = torch.randn(hq, t, d), torch.randn(h, t, d), torch.randn(h, t, d)
    key, value = np.random.randn(h, d).astype(np.float32), np.random.randn(h, d).astype(np.float32)
    mem = _OneEntryMemory(key, value, strength=0.5)
    out, ids, w_mem, _ = attend(q, k, v, d**-0.5, 0, mem, 0, 1)
    # oracle: append the memory key as an extra, always-visible key with logit + log(strength)
    expected = []
    for head in range(hq):
        kv = head // (hq // h)
        logits = q[head] @ k[kv].T * d**-0.5
        logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        extra = (q[head] @ torch.from_numpy(key[kv])) * d**-0.5 + np.log(0.5)
        w = torch.softmax(torch.cat([logits, extra[:, None]], dim=1), dim=1)
        expected.append(w[:, :t] @ v[kv] + w[:, t:] * torch.from_numpy(value[kv]))
    expected_t = torch.stack(expected).transpose(0, 1).reshape(t, hq * d)
    assert torch.allclose(out, expected_t, atol=1e-5)
    assert ids is not None and w_mem is not None and (w_mem > 0).all() and (w_mem < 1).all()
