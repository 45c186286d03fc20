"""The compiled pieces of a decoding step (app/fused.py) against the torch operations they
replace, and a decoding step with them against one without."""

from __future__ import annotations

import copy
from typing import Any

import numba as nb
import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from app.config import Settings
from app.fused import (
    add_rms_norm,
    bf16_bits,
    exp_nonpositive,
    rope_store,
    silu_mul,
    window_array,
)
from app.memory_llama import (
    FUSED_MAX_TOKENS,
    ReadConfig,
    WindowCache,
    forward,
    fused_norms,
    rope_tables,
)
from app.model import LoadedModel, load_model
from memory_store.kernels import FASTMATH


@nb.njit(fastmath=FASTMATH)
def _exp_all(x):  # type: ignore[no-untyped-def]  # numba compiles it: as decode_attention does
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = exp_nonpositive(x[i])
    return out


def test_exp_nonpositive_within_two_ulp() -> None:
    """Over [-87, 0] (every float32 exponent there, and a dense grid), the compiled loop that
    vectorizes; 0 below -87, for -inf, and 1 at 0."""
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            -np.linspace(0, 87, 1_000_001, dtype=np.float32),
            -(2.0 ** rng.uniform(-30, np.log2(87), 100_000)).astype(np.float32),
        ]
    )
    got = _exp_all(x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
    assert (np.abs(got - want) / ulp).max() <= 2.0
    edge = np.array([0.0, -87.5, -1e30, -np.inf], dtype=np.float32)
    assert _exp_all(edge).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_add_rms_norm_equals_torch() -> None:
    torch.manual_seed(0)
    h = torch.randn(3, 576) * 3
    weight = torch.rand(576) + 0.5
    delta = torch.randn(3, 576).bfloat16()
    summed = h + delta.float()
    ref = (weight * (summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5))).bfloat16()
    out = torch.empty(3, 576, dtype=torch.bfloat16)
    add_rms_norm(h.numpy(), bf16_bits(delta), weight.numpy(), 1e-5, bf16_bits(out))
    assert torch.equal(h, summed)  # the residual stream is updated in place
    # bf16 rounds as torch rounds: at most a rare one-step difference from the sum's order
    assert (out != ref).float().mean().item() < 0.01
    assert (out.float() - ref.float()).abs().max().item() <= 2**-7 * ref.float().abs().max()
    before = h.clone()
    add_rms_norm(h.numpy(), np.empty((0, 576), np.uint16), weight.numpy(), 1e-5, bf16_bits(out))
    assert torch.equal(h, before)  # no delta: nothing added


def test_silu_mul_equals_torch() -> None:
    torch.manual_seed(1)
    gate_up = (torch.randn(2, 256) * 4).bfloat16()
    gate, up = gate_up.float().chunk(2, dim=-1)
    ref = (torch.nn.functional.silu(gate) * up).bfloat16()
    out = torch.empty(2, 128, dtype=torch.bfloat16)
    silu_mul(bf16_bits(gate_up), bf16_bits(out))
    assert (out != ref).float().mean().item() < 0.01


@pytest.mark.parametrize("fp16", [False, True], ids=["float32-window", "float16-window"])
def test_rope_store_equals_transformers_rope(lm: LoadedModel, fp16: bool) -> None:
    """Rotated queries and keys with transformers' bits (a float16 window's key rotated as it
    is kept); the key before and after RoPE and the value land in the window's row ``past``
    and nowhere else."""
    torch.manual_seed(2)
    hq, h, d, past = 9, 3, 64, 37
    dtype = torch.float16 if fp16 else torch.float32
    qkv = torch.randn((hq + 2 * h) * d).bfloat16()
    qkv[hq * d] = 1e-7  # a key element float16 keeps as a subnormal: rounded
    q, k, v = qkv.float().split((hq * d, h * d, h * d))
    kept = k.to(dtype).float()
    assert fp16 == (not torch.equal(kept, k))
    cos, sin = rope_tables(lm.model, past, 1, torch.float32)
    q_ref, k_ref = apply_rotary_pos_emb(
        q.view(hq, 1, d), kept.view(h, 1, d), cos, sin, unsqueeze_dim=0
    )
    keys, values = (torch.zeros(h, 64, d, dtype=dtype) for _ in range(2))
    keys_rot = torch.zeros(h, 64, d)
    q_rot = torch.empty(hq, d)
    rope_store(
        bf16_bits(qkv), cos[0].numpy(), sin[0].numpy(), hq, window_array(keys),
        window_array(keys_rot), window_array(values), past, q_rot.numpy(),
    )  # fmt: skip
    assert torch.equal(q_rot, q_ref[:, 0])
    assert torch.equal(keys_rot[:, past], k_ref[:, 0])
    assert torch.equal(keys[:, past], k.view(h, d).to(dtype))
    assert torch.equal(values[:, past], v.view(h, d).to(dtype))
    others = torch.ones(64, dtype=torch.bool)
    others[past] = False
    assert not keys[:, others].any() and not keys_rot[:, others].any()
    assert not values[:, others].any()


@pytest.fixture(scope="module")
def int4_lm() -> LoadedModel:
    s = Settings()
    return load_model(s.model_path, s.cache_dir, weights="int4")


def test_fused_decoding_step_equals_the_unfused_one(lm: LoadedModel, int4_lm: LoadedModel) -> None:
    """A decoding step of a packed model runs the compiled pieces (fp32 weights do not); its
    output equals the step through torch operations up to the rounding of bf16 activations."""
    assert fused_norms(lm.model) is None  # fp32: the torch path
    model = int4_lm.model
    assert fused_norms(model) is not None
    ids = torch.tensor(int4_lm.tokenizer.encode("The lighthouse keeper climbed the stairs and"))
    window = WindowCache(model, 64)
    first = forward(model, ids, window, None, ReadConfig())
    nxt = first.logits[-1].argmax().view(1)
    twin = copy.deepcopy(window)
    fused = forward(model, nxt, window, None, ReadConfig())
    model.memchat_fused_norms = ()  # as a model the compiled path does not fit
    try:
        plain = forward(model, nxt, twin, None, ReadConfig())
    finally:
        model.memchat_fused_norms = None
    assert window.length == twin.length == len(ids) + 1
    assert fused.logits.argmax() == plain.logits.argmax()
    rel = ((fused.hidden - plain.hidden).norm() / plain.hidden.norm()).item()
    assert rel < 0.02, rel  # measured 0.006: bf16 rounding flips from the norms' summation order
    assert (fused.logits.exp() - plain.logits.exp()).abs().max().item() < 0.02
    for name in ("keys", "values", "keys_rot"):
        n = window.length
        a, b = getattr(window, name)[:, :, :n], getattr(twin, name)[:, :, :n]
        assert torch.equal(a[:, :, :-1], b[:, :, :-1])  # earlier tokens untouched
        assert ((a - b).norm() / b.norm()).item() < 0.02


def test_fused_steps_read_memory_as_the_unfused_ones(int4_lm: LoadedModel) -> None:
    """With a memory, alone and batched: the same entries read in every layer, their weights
    and the outputs equal up to bf16 rounding."""
    from app.memory_llama import forward_batch
    from memory_store import SessionMemory

    model = int4_lm.model
    cfg = model.config
    text = "My locker code is 4417 and my sister lives in Lisbon."
    ids = torch.tensor(int4_lm.tokenizer.encode(text))
    seen = WindowCache(model, 64, fp16=True)
    out = forward(model, ids, seen, None, ReadConfig())
    memory = SessionMemory(cfg.num_hidden_layers, cfg.num_key_value_heads, 64, cfg.hidden_size)
    t = len(ids)
    memory.write(
        seen.keys[:, :, :t].float().numpy(),
        seen.values[:, :, :t].float().numpy(),
        ids.numpy(),
        np.zeros(t, np.int64),
        np.arange(t),
    )
    memory.write_knn(
        out.hidden.float().numpy(),
        np.append(ids[1:], 2),
        ids.numpy(),
        np.zeros(t, np.int64),
        np.arange(t),
    )
    prompt = torch.tensor(int4_lm.tokenizer.encode("What is my locker code?"))
    read = ReadConfig(collect_mass=True)
    windows = []
    for _ in range(6):
        w = WindowCache(model, 64)
        last = forward(model, prompt, w, memory, ReadConfig())
        windows.append(w)
    nxt = int(last.logits[-1].argmax())
    few = torch.tensor(int4_lm.tokenizer.encode(" It is 4"))  # a few tokens: one compiled step
    assert 1 < len(few) <= FUSED_MAX_TOKENS
    fused = forward(model, torch.tensor([nxt]), windows[0], memory, read)
    batched = forward_batch(model, [nxt, nxt], windows[1:3], [memory, memory], [read, read])
    fused_few = forward(model, few, windows[4], memory, read, logits_from=0)
    model.memchat_fused_norms = ()
    try:
        plain = forward(model, torch.tensor([nxt]), windows[3], memory, read)
        plain_few = forward(model, few, windows[5], memory, read, logits_from=0)
    finally:
        model.memchat_fused_norms = None
    assert windows[4].length == windows[5].length == len(prompt) + len(few)
    assert torch.equal(fused_few.logits.argmax(-1), plain_few.logits.argmax(-1))
    assert (fused_few.logits.exp() - plain_few.logits.exp()).abs().max().item() < 0.02
    rel = ((fused_few.hidden - plain_few.hidden).norm() / plain_few.hidden.norm()).item()
    assert rel < 0.02, rel
    for name in ("keys", "values", "keys_rot"):
        a, b = getattr(windows[4], name), getattr(windows[5], name)
        assert ((a - b).norm() / b.norm()).item() < 0.02
    assert plain.memory_mass is not None and plain_few.memory_mass is not None
    assert fused_few.memory_mass is not None
    for a, b in zip(fused_few.memory_mass, plain_few.memory_mass, strict=True):
        for ma, mb in zip(a.mass, b.mass, strict=True):  # every token's reads counted
            assert abs(ma.sum() - mb.sum()) < 0.02 * len(few)
    for got in (fused, *batched):
        assert got.memory_mass is not None and len(got.memory_mass) == cfg.num_hidden_layers
        assert got.logits.argmax() == plain.logits.argmax()
        assert (got.logits.exp() - plain.logits.exp()).abs().max().item() < 0.02
        for a, b in zip(got.memory_mass, plain.memory_mass, strict=True):
            for ia, ib, ma, mb in zip(a.ids, b.ids, a.mass, b.mass, strict=True):
                # mass per entry (an order swap of near-equal scores changes no sum)
                keys = np.union1d(ia, ib)
                ga = np.bincount(np.searchsorted(keys, ia), weights=ma, minlength=len(keys))
                gb = np.bincount(np.searchsorted(keys, ib), weights=mb, minlength=len(keys))
                assert np.abs(ga - gb).max() < 0.02


@pytest.mark.parametrize("weights", ["lm", "int4_lm"], ids=["fp32-torch-steps", "int4-compiled"])
def test_a_float16_window_reloads_to_its_own_bits(weights: str, request: Any) -> None:
    """A float16 window after a prefill, decoding steps (through torch with fp32 weights,
    compiled with int4) and a slide holds the bits of a window rebuilt from its kept keys and
    values (a session reloaded from SQL), in two thirds of the bytes of a float32 one."""
    loaded: LoadedModel = request.getfixturevalue(weights)
    model = loaded.model
    ids = torch.tensor(loaded.tokenizer.encode("The lighthouse keeper climbed the stairs and"))
    window = WindowCache(model, 64, fp16=True)
    out = forward(model, ids, window, None, ReadConfig())
    for _ in range(3):
        out = forward(model, out.logits[-1].argmax().view(1), window, None, ReadConfig())
    window.drop_range(2, 5)
    n = window.length
    assert n == len(ids) + 3 - 3
    fresh = WindowCache(model, 64, fp16=True)
    fresh.append(window.keys[:, :, :n].float(), window.values[:, :, :n].float())
    for name in ("keys", "values", "keys_rot"):
        a, b = getattr(window, name), getattr(fresh, name)
        assert a.dtype == (torch.float32 if name == "keys_rot" else torch.float16)
        assert torch.equal(a[:, :, :n], b[:, :, :n]), name
    full = WindowCache(model, 64)
    size = sum(t.nbytes for t in (window.keys, window.values, window.keys_rot))
    assert 3 * size == 2 * sum(t.nbytes for t in (full.keys, full.values, full.keys_rot))
