"""A Llama forward pass whose attention reads the session's memory in every layer.

This file is the one place where the memory is read:

* token level (inside attention): for each query token and KV-head group, the top-k memory keys by
  inner product of the RoPE-rotated query with the *un-rotated* memory key (memory keys carry no
  position: as if at position 0); their logits ``q.k / sqrt(d) + log(strength)`` join the local
  logits in one softmax, and the output mixes local and memory values;
* output level (kNN-LM): the final hidden state's nearest remembered hidden states vote for the
  token that followed them; ``p = lam * p_mem + (1 - lam) * p_lm``.

The window's keys are kept *before* RoPE (``WindowCache``) so that tokens leaving the window go to
memory exactly as the forward pass that first saw them computed them, and the window can be
re-positioned after a slide by rotating again instead of re-encoding.
A decoding step (one new token, float32) runs its attention, window and memory hits together,
as one compiled call per layer (`decode_attention`, numba).
Shapes leave out the batch dimension: one sequence at a time (`forward_batch` runs one decoding
step of several sequences, their linear layers together).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numba as nb
import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from app.fused import (
    add_rms_norm,
    bf16_bits,
    exp_nonpositive,
    loaded,
    narrow_rows,
    rope_store,
    silu_mul,
    slide_window,
    window_array,
)
from memory_store.kernels import FASTMATH

_LOG_FLOOR = math.log(1e-30)  # floor of the mixed output distribution, in log space
_MAX_LAMBDA = 0.97  # the LM keeps a say even when copying


class MemoryReader(Protocol):
    """What the attention needs from a session memory (``memory_store.SessionMemory`` is one)."""

    def entry_count(self) -> int: ...
    def token_count(self) -> int: ...
    def search(self, layer: int, queries: np.ndarray, k: int, with_keys: bool = True) -> Any: ...
    def knn_search(self, hidden: np.ndarray, k: int) -> Any: ...


@dataclass(frozen=True)
class ReadConfig:
    """How the memory is read in one forward pass."""

    top_k: int = 16  # memory keys per query per KV head, in every layer
    knn_lambda: float = 0.25  # weight of the kNN-LM distribution; 0 turns the output read off
    knn_k: int = 16  # neighbours of the output-level read
    knn_temperature: float = 0.05  # p_mem = softmax(-relative distance / temperature)
    knn_gate: float = 0.35  # relative distance of the nearest neighbour where lam is halved
    knn_gate_width: float = 0.03  # how sharp that gate is
    # Copying (off by default): when the nearest neighbour is this close, the reply is retracing a
    # remembered sentence and lam rises by knn_copy_lambda, so the memory can outvote a confident
    # LM ("Your locker code is 1" -> LM "2", memory "3"). Measured on recall-dev-hard: greedy
    # replies +0.07 to +0.12, but likelihood choice (mc) -0.08 to -0.10 (every remembered
    # value's later tokens become near-certain, so they stop telling the user's value from
    # another person's), and no gain on generated conversations of other wordings.
    knn_copy_lambda: float = 0.0
    knn_copy_gate: float = 0.12  # relative distance of the nearest neighbour where it is halved
    knn_copy_width: float = 0.02
    collect_mass: bool = False  # return the attention mass each memory entry received


@dataclass
class LayerMass:
    """Attention mass the memory entries of one layer received from the query heads of each group
    and the query tokens: ``ids[h]`` and ``mass[h]`` per KV head ``h``. An id may appear more
    than once (its mass is the sum); reads of many queries are summed per distinct id. A few
    queries' reads keep their misses (id -1, mass 0), which every consumer drops."""

    ids: list[np.ndarray]
    mass: list[np.ndarray]


@dataclass
class ForwardOutput:
    """Everything one forward pass produced for its new tokens."""

    logits: torch.Tensor  # (T - logits_from, V) log-probabilities after the output-level read
    hidden: torch.Tensor  # (T, Dm) final hidden state (after the last norm)
    keys: torch.Tensor  # (L, H, T, D) keys before RoPE
    values: torch.Tensor  # (L, H, T, D)
    memory_mass: list[LayerMass] | None = None  # per layer, when ReadConfig.collect_mass
    read_seconds: float = 0.0  # time spent in memory search and gather


class WindowCache:
    """The working window's keys (before and after RoPE) and values, in preallocated buffers.

    Tokens sit at positions ``0 .. length-1``; ``append`` writes new tokens after them and
    ``drop_range`` removes tokens and re-rotates the later ones to their new positions.

    With ``fp16`` keys and values are float16, the format sessions keep window states in SQL:
    a reloaded window is then identical to the live one, the buffers take a third less RAM, and
    a decoding step streams a quarter fewer bytes (the rotated keys and values are read whole for
    every token, 47 MB at 1024 tokens in float32: more than the int4 model's weights). Rotated
    keys stay float32, the rotation of the kept key: rounded to float16 too, they cost 2 of the
    60 cases of the hard recall benchmark. Without ``fp16`` every buffer has the model's dtype
    (exact: the reference tests compare them with transformers).
    """

    def __init__(self, model: LlamaForCausalLM, capacity: int, fp16: bool = False) -> None:
        cfg = model.config
        self.fp16 = fp16
        self.model = model
        self.n_layers = int(cfg.num_hidden_layers)
        self.n_kv = int(cfg.num_key_value_heads or cfg.num_attention_heads)
        self.head_dim = int(
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        )
        self.capacity = capacity
        self.length = 0
        shape = (self.n_layers, self.n_kv, capacity, self.head_dim)
        dtype = torch.float16 if fp16 else model.dtype
        self.keys = torch.zeros(shape, dtype=dtype)  # before RoPE
        # at positions 0..length-1
        self.keys_rot = torch.zeros(shape, dtype=torch.float32 if fp16 else model.dtype)
        self.values = torch.zeros(shape, dtype=dtype)
        self._arrays: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """numpy views (no copy) of the buffers keys, keys_rot, values (L, H, cap, D) as the
        compiled code takes them (`window_array`: float16 as uint16 bits), made once per set of
        buffers (a copied cache has its own)."""
        ptr = self.keys.data_ptr()
        if self._arrays is None or self._arrays[0] != ptr:
            self._arrays = (
                ptr,
                window_array(self.keys),
                window_array(self.keys_rot),
                window_array(self.values),
            )
        return self._arrays[1], self._arrays[2], self._arrays[3]

    def rotate(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """RoPE-rotate ``keys`` (L, H, T, D) as if they sat at positions start..start+T-1."""
        out = torch.empty_like(keys)
        self.rotate_into(out, keys, start)
        return out

    def rotate_into(self, out: torch.Tensor, keys: torch.Tensor, start: int) -> None:
        """``out`` <- `rotate` (keys, start); ``out`` must not overlap ``keys``."""
        cos, sin = rope_tables(self.model, start, keys.shape[2], keys.dtype)
        rope_into(out, keys, cos, sin)

    def append(
        self, keys: torch.Tensor, values: torch.Tensor, keys_rot: torch.Tensor | None = None
    ) -> None:
        """Add tokens (L, H, T, D) after the current ones; ``keys_rot`` if already rotated (a
        float16 window rotates its kept, rounded keys itself)."""
        t = keys.shape[2]
        if self.length + t > self.capacity:
            raise ValueError(f"window cache full: {self.length} + {t} > {self.capacity}")
        end = self.length + t
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        if self.fp16:
            self._rotate_kept(self.length, end)
        else:
            self.keys_rot[:, :, self.length : end] = (
                keys_rot if keys_rot is not None else self.rotate(keys, self.length)
            )
        self.length = end

    def _rotate_kept(self, start: int, end: int) -> None:
        """keys_rot <- the rotation of the kept keys of rows start..end-1."""
        self.rotate_into(self.keys_rot[:, :, start:end], self.keys[:, :, start:end].float(), start)

    def commit_written(self, t: int, kept_rotated: bool = False) -> None:
        """Count the ``t`` tokens a forward pass wrote after the current ones (keys, rotated
        keys and values already in place) as part of the window. ``kept_rotated``: the rotated
        keys are already those of the kept keys (`rope_store` writes them so); else a float16
        window rotates its kept keys again (a pass through torch rotated them before rounding)."""
        end = self.length + t
        if end > self.capacity:
            raise ValueError(f"window cache full: {self.length} + {t} > {self.capacity}")
        if self.fp16 and not kept_rotated:
            self._rotate_kept(self.length, end)
        self.length = end

    def drop_range(self, start: int, end: int) -> None:
        """Remove tokens ``start..end-1`` and re-position the tokens after them."""
        n = end - start
        if n <= 0:
            return
        rest = self.length - end
        new_length = self.length - n
        # every later token moves n positions back: rotated again from its raw key
        if rest:
            cos, sin = rope_tables(self.model, start, rest, self.keys_rot.dtype)
            if self.keys_rot.dtype == torch.float32:  # one compiled pass over the rows
                keys, keys_rot, values = self.arrays()
                slide_window(
                    keys, keys_rot, values, start, end, self.length, cos.numpy(), sin.numpy()
                )
            else:  # layer by layer: each layer's part stays in cache through move and rotation
                for layer in range(self.n_layers):
                    for buf in (self.keys[layer], self.values[layer]):
                        buf[:, start:new_length] = buf[:, end : self.length].clone()
                    rope_into(
                        self.keys_rot[layer, :, start:new_length],
                        self.keys[layer, :, start:new_length],
                        cos,
                        sin,
                    )
        self.length = new_length

    def clear(self) -> None:
        """Forget every token (buffers are kept)."""
        self.length = 0


def rope_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """``out`` <- RoPE of ``x`` (..., T, D) with ``cos``/``sin`` (T, D): transformers'
    ``x * cos + rotate_half(x) * sin``, the same float operations (so the same bits), written
    half by half into ``out`` instead of through four full-size temporaries."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos[:, :half], out=o1)
    o1.sub_(x2 * sin[:, :half])  # x1 cos + (-x2) sin: negation is exact
    torch.mul(x2, cos[:, half:], out=o2)
    o2.add_(x1 * sin[:, half:])


def rope_tables(
    model: LlamaForCausalLM, start: int, length: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, D) for positions start..start+length-1, from the model's own rotary module
    (so RoPE scaling variants of Llama-family models are honoured). A rotary module whose tables
    do not depend on the longest position asked for (all but the dynamic kinds) is asked once
    for a range of positions, kept on the model: a decoding step needs one row per layer call."""
    rotary = model.model.rotary_emb
    end = start + length
    if dtype == torch.float32 and getattr(rotary, "rope_type", "") in _STATIC_ROPE:
        cached = getattr(model, "memchat_rope", None)
        if cached is None or cached[0].shape[0] < end:
            n = max(end, 2 * (cached[0].shape[0] if cached is not None else 1024))
            cos, sin = rotary(torch.zeros(1), torch.arange(n).unsqueeze(0))
            cached = (cos[0], sin[0])
            model.memchat_rope = cached  # type: ignore[assignment]  # a plain attribute
        return cached[0][start:end], cached[1][start:end]
    positions = torch.arange(start, end).unsqueeze(0)  # (1, T)
    probe = torch.zeros(1, dtype=dtype)
    cos, sin = rotary(probe, positions)
    return cos[0], sin[0]


# RoPE kinds whose cos/sin for a position do not depend on the other positions asked for
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    past: int,
    memory: MemoryReader | None,
    layer: int,
    top_k: int,
) -> tuple[torch.Tensor, np.ndarray | None, np.ndarray | None, float]:
    """Attention of the new tokens over the window (causal) and, if given, the memory.

    q: (Hq, T, D) rotated queries at positions past..past+T-1; k, v: (H, >=S, D) rotated window
    keys and values, of which the first S = past + T rows are the window's (the window's whole
    buffers may be passed: a decoding step reads them in place). Returns the output (T, Hq * D),
    the memory ids (H, g*T, k) and the memory weights (H, g*T, k) they received (None without
    memory), and seconds spent searching.
    """
    if memory is not None and memory.entry_count() == 0:
        memory = None
    return _attend(q, k, v, scaling, past, memory, layer, top_k)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    past: int,
    memory: MemoryReader | None,
    layer: int,
    top_k: int,
    want_mass: bool = True,
) -> tuple[torch.Tensor, np.ndarray | None, np.ndarray | None, float]:
    """`attend` with `memory` None or known to hold entries (`forward` checks once, not per
    layer: counting a memory's entries visits each of its slots); the memory weights are
    returned only `want_mass`."""
    hq, t, d = q.shape
    h = k.shape[0]
    s = past + t
    g = hq // h  # query heads per KV head
    if (
        t == 1
        and q.dtype == torch.float32
        and k.dtype in (torch.float32, torch.float16)
        and k.is_contiguous()
        and v.is_contiguous()
    ):
        return _attend_step(q, k, v, scaling, past, memory, layer, top_k)
    k, v = k[:, :s].to(q.dtype), v[:, :s].to(q.dtype)  # a float16 window's buffers widened
    if memory is None and t > 1:
        # a fused kernel: no (Hq, T, S) score tensor (1.9x faster for 256 queries over 8k keys)
        allowed = torch.ones(t, s, dtype=torch.bool).tril(past)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0),
            k.unsqueeze(0),
            v.unsqueeze(0),
            attn_mask=allowed,
            scale=scaling,
            enable_gqa=True,
        )[0]
        return out.transpose(0, 1).reshape(t, hq * d), None, None, 0.0
    qg = q.view(h, g, t, d)  # (H, g, T, D)
    # batched matmuls over the KV heads (einsum adds a permute and a copy per call)
    local = torch.matmul(qg.reshape(h, g * t, d), k.transpose(1, 2)).view(h, g, t, s)
    local.mul_(scaling)
    if t > 1:  # one new token sees the whole window: nothing to mask
        # a key after its query is masked; only the new tokens' own block has such keys (a fill
        # over the whole (T, S) scores was 5 ms of a turn's first pass)
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        local[..., past:].masked_fill_(causal, float("-inf"))

    if memory is None:
        weights = torch.softmax(local, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights.view(h, g * t, s), v).view(h, g, t, d)
        return out.reshape(hq, t, d).transpose(0, 1).reshape(t, hq * d), None, None, 0.0

    t0 = time.perf_counter()
    queries = qg.reshape(h, g * t, d).float().numpy()  # (H, g*T, D)
    found = memory.search(layer, queries, top_k, with_keys=False)  # ids, scores, strength, values
    kk = found.ids.shape[-1]
    # logits q.key / sqrt(d) + log strength (-inf where no entry), on the numpy side: a few
    # numpy operations on arrays this small cost less than their torch equivalents
    mem_logits = torch.from_numpy(found.scores * np.float32(scaling) + found.log_strength)
    mem_values = torch.from_numpy(found.values).view(h, g, t, kk, d)
    read_s = time.perf_counter() - t0

    fp32 = q.dtype == torch.float32  # conversions only for other model dtypes
    mem_logits = mem_logits.view(h, g, t, kk) if fp32 else mem_logits.view(h, g, t, kk).to(q.dtype)
    weights = torch.softmax(torch.cat([local, mem_logits], dim=-1), dim=-1, dtype=torch.float32)
    w_local, w_mem = weights[..., :s], weights[..., s:]
    if not fp32:
        w_local, w_mem, mem_values = w_local.to(q.dtype), w_mem.to(q.dtype), mem_values.to(q.dtype)
    # the memory term as a broadcast product: a batched matmul of this size would open a thread
    # pool region per layer, which costs more than the product itself when decoding
    out = torch.matmul(w_local.reshape(h, g * t, s), v).view(h, g, t, d)
    out += (w_mem.unsqueeze(-1) * mem_values).sum(-2)
    out = out.reshape(hq, t, d).transpose(0, 1).reshape(t, hq * d)
    mass = w_mem.reshape(h, g * t, kk).float().numpy() if want_mass else None
    return out, found.ids, mass, read_s


def _attend_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    past: int,
    memory: MemoryReader | None,
    layer: int,
    top_k: int,
) -> tuple[torch.Tensor, np.ndarray | None, np.ndarray | None, float]:
    """`_attend` of one new token (a decoding step) in float32: `attend_step` on numpy views."""
    hq, _, d = q.shape
    out = torch.empty(1, hq * d)
    ids, mass, read_s = attend_step(
        np.ascontiguousarray(q.reshape(hq, d).numpy()),
        window_array(k),
        window_array(v),
        scaling,
        past,
        memory,
        layer,
        top_k,
        out.numpy(),
    )
    return out, ids, mass, read_s


def attend_step(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    scaling: float,
    past: int,
    memory: MemoryReader | None,
    layer: int,
    top_k: int,
    out: np.ndarray,
) -> tuple[np.ndarray | None, np.ndarray | None, float]:
    """One new token's attention, q (Hq, D) over the window's buffers k, v (H, >=S, D) (float32
    or float16 bits, C-contiguous) and the memory: the memory search, then the local and memory
    logits, their softmax and both weighted sums in one compiled call (`decode_attention`),
    written to ``out`` (1, Hq * D). Returns the memory ids and weights (H, g, k) (None without
    memory) and the search's seconds. The dozen torch and numpy operations it replaces cost 3-8x
    its time per layer (their per-call overhead, not arithmetic): 115 vs 14 us with a memory and
    a short window, 260 vs 116 us at a 1020-token window."""
    hq, d = q.shape
    h = k.shape[0]
    g = hq // h
    ids, read_s = None, 0.0
    # no memory: zero hits per query
    scores = log_s = np.empty((h, g, 0), dtype=np.float32)
    values = np.empty((h, g, 0, d), dtype=np.float32)
    if memory is not None:
        t0 = time.perf_counter()
        # (H, g, D): a KV head's query heads are its queries
        found = memory.search(layer, q.reshape(h, g, d), top_k, with_keys=False)
        read_s = time.perf_counter() - t0
        ids = found.ids
        scores = np.ascontiguousarray(found.scores, dtype=np.float32)
        log_s = np.ascontiguousarray(found.log_strength, dtype=np.float32)
        values = np.ascontiguousarray(found.values, dtype=np.float32)
    mass = np.empty(scores.shape, dtype=np.float32)
    decode_attention(q, k, v, past, np.float32(scaling), scores, log_s, values, out, mass)
    return ids, (mass if ids is not None else None), read_s


@nb.njit(cache=True, fastmath=FASTMATH, nogil=True)
def decode_attention(  # type: ignore[no-untyped-def]  # numba compiles it; arrays throughout
    q,  # float32 [Hq, D]: the new token's rotated queries
    keys,  # float32 or float16 bits [H, >=S, D]: rotated window keys, the new token's at `past`
    values,  # as keys [H, >=S, D]
    past,  # int: window tokens before the new one (S = past + 1)
    scaling,  # float: 1 / sqrt(D)
    mem_scores,  # float32 [H, g, k]: q . memory key of the hits (g = Hq / H query heads)
    mem_log_strength,  # float32 [H, g, k]: -inf where no hit
    mem_values,  # float32 [H, g, k, D]
    out,  # float32 [1, Hq * D]: the attention output, heads side by side
    mass,  # float32 [H, g, k]: the weight each memory hit received
):
    """One token's attention over the window and its memory hits: logits ``q.k * scaling`` for
    the window and ``score * scaling + log strength`` for the hits, one softmax over both, and
    the weighted sum of window and memory values. k may be 0 (no memory)."""
    Hq, D = q.shape
    H = keys.shape[0]
    G = Hq // H
    K = mem_scores.shape[2]
    S = past + 1
    w = np.empty((G, S + K), dtype=np.float32)
    acc = np.empty((G, D), dtype=np.float32)
    qs = np.empty((G, D), dtype=np.float32)
    for h in range(H):
        for g in range(G):
            for d in range(D):
                qs[g, d] = q[h * G + g, d]
        # window logits: each key row is loaded once for the group's query heads
        if G == 3:  # one pass per row (this model's groups): each element widened once
            for s in range(S):
                d0 = d1 = d2 = np.float32(0.0)
                for d in range(D):
                    x = loaded(keys[h, s, d])
                    d0 += qs[0, d] * x
                    d1 += qs[1, d] * x
                    d2 += qs[2, d] * x
                w[0, s] = d0 * scaling
                w[1, s] = d1 * scaling
                w[2, s] = d2 * scaling
        else:
            for s in range(S):
                for g in range(G):
                    dot = np.float32(0.0)
                    for d in range(D):
                        dot += qs[g, d] * loaded(keys[h, s, d])
                    w[g, s] = dot * scaling
        for g in range(G):
            for j in range(K):
                w[g, S + j] = mem_scores[h, g, j] * scaling + mem_log_strength[h, g, j]
            top = np.float32(-np.inf)
            for i in range(S + K):
                top = max(top, w[g, i])
            total = np.float32(0.0)
            for i in range(S + K):
                e = exp_nonpositive(w[g, i] - top)
                w[g, i] = e
                total += e
            inv = np.float32(1.0) / total
            for i in range(S + K):
                w[g, i] *= inv
            for d in range(D):
                acc[g, d] = 0.0
        if G == 3:
            for s in range(S):
                w0, w1, w2 = w[0, s], w[1, s], w[2, s]
                for d in range(D):
                    x = loaded(values[h, s, d])
                    acc[0, d] += w0 * x
                    acc[1, d] += w1 * x
                    acc[2, d] += w2 * x
        else:
            for s in range(S):
                for g in range(G):
                    ws = w[g, s]
                    for d in range(D):
                        acc[g, d] += ws * loaded(values[h, s, d])
        for g in range(G):
            for j in range(K):
                wj = w[g, S + j]
                mass[h, g, j] = wj
                for d in range(D):
                    acc[g, d] += wj * mem_values[h, g, j, d]
            base = (h * G + g) * D
            for d in range(D):
                out[0, base + d] = acc[g, d]


def compile_attention() -> None:
    """Compile `decode_attention` for float32 and float16 windows (float32 rotated keys, values
    of either) and `mix_knn`, or load them from numba's disk cache (seconds otherwise, in the
    first decoding step)."""
    f = np.zeros
    mix_knn(
        f((1, 1), np.float32), f(1, np.float32), f((1, 1), np.int64), f((1, 1), np.float32),
        f((1, 1), np.float32), 0.05, 0.25, 0.35, 0.03, 0.0, 0.12, 0.02, f((1, 1), np.float32),
    )  # fmt: skip
    for dtype in (np.float32, np.uint16):  # the values of a float32 or a float16 window
        decode_attention(
            f((1, 1), np.float32), f((1, 1, 1), np.float32), f((1, 1, 1), dtype), 0,
            np.float32(1.0), f((1, 1, 0), np.float32), f((1, 1, 0), np.float32),
            f((1, 1, 0, 1), np.float32), f((1, 1), np.float32), f((1, 1, 0), np.float32),
        )  # fmt: skip


def head_logprobs(model: LlamaForCausalLM, hidden: torch.Tensor, pick: bool) -> torch.Tensor:
    """Log-probabilities (T, V) float32 of the final hidden states; with ``pick`` from the
    head's `pick_logits` where it has one (exact top candidates, the rest approximate)."""
    head = model.lm_head
    pick_logits = getattr(head, "pick_logits", None) if pick else None
    logits = pick_logits(hidden) if pick_logits is not None else head(hidden)
    return torch.log_softmax(logits.float(), dim=-1)


def knn_mix(
    logprobs: torch.Tensor, hidden: torch.Tensor, memory: MemoryReader | None, cfg: ReadConfig
) -> torch.Tensor:
    """Output-level read: mix the kNN-LM distribution of the remembered tokens into ``logprobs``
    (T, V). Neighbours vote for the token that followed them with
    ``softmax(-d / temperature + log strength)``, ``d`` the squared distance relative to the
    query's squared norm (so one temperature fits any model width). The mixing weight is ``lam``
    gated by how close the nearest neighbour is: far neighbours (``d`` above ``knn_gate``) leave
    the LM alone, which keeps the memory from pulling unrelated remembered tokens into a reply.
    A second, narrower gate adds ``knn_copy_lambda`` when the nearest neighbour is nearly the
    same state (``d`` below ``knn_copy_gate``): the reply is then retracing a remembered sentence,
    and the memory, not the LM's prior, says which token comes next (capped at 0.97).

    ``p = (1 - lam) p_lm + lam p_mem`` is floored at 1e-30 before the log. ``p_mem`` is zero but
    on the (at most k) voted tokens, so the rest of the vocabulary is a shift in log space,
    ``log p_lm + log(1 - lam)``, and only the voted tokens are mixed in probability space: one
    pass over the vocabulary, all of it in one compiled call (`mix_knn`)."""
    if memory is None or cfg.knn_lambda <= 0 or memory.token_count() == 0:
        return logprobs
    query = np.ascontiguousarray(hidden.float().numpy())
    found = memory.knn_search(query, cfg.knn_k)
    lp = logprobs.float().numpy()  # a view when float32 (the head's output is not used again)
    out = np.empty(lp.shape, dtype=np.float32)
    mix_knn(
        np.ascontiguousarray(lp),
        np.einsum("td,td->t", query, query),
        np.ascontiguousarray(found.next_token_ids, dtype=np.int64),
        np.ascontiguousarray(found.distances, dtype=np.float32),
        np.ascontiguousarray(found.log_strength, dtype=np.float32),
        cfg.knn_temperature,
        cfg.knn_lambda,
        cfg.knn_gate,
        cfg.knn_gate_width,
        cfg.knn_copy_lambda,
        cfg.knn_copy_gate,
        cfg.knn_copy_width,
        out,
    )
    return torch.from_numpy(out).to(logprobs.dtype)


@nb.njit(cache=True, fastmath=FASTMATH, nogil=True)
def mix_knn(  # type: ignore[no-untyped-def]  # numba compiles it; arrays throughout
    lp,  # float32 [T, V]: the LM's log-probabilities
    norm2,  # float32 [T]: the queries' squared norms
    ids,  # int64 [T, k]: the neighbours' next tokens, -1 missing
    dist,  # float32 [T, k]: squared distances (+inf missing)
    log_s,  # float32 [T, k]: log strengths (-inf missing)
    temperature,
    lam0,  # knn_lambda
    gate,
    gate_width,
    copy_lambda,
    copy_gate,
    copy_width,
    out,  # float32 [T, V]
):
    """`knn_mix` on arrays, one row at a time: the votes' softmax, the gates and the mixture
    (the vocabulary once: a shift and the floor; then the voted tokens). In torch it was some
    twenty operations on (T, k) tensors and two passes over the vocabulary, 0.55 ms per decoded
    token of per-call costs."""
    T, V = lp.shape
    k = ids.shape[1]
    p_vote = np.empty(k, dtype=np.float64)
    tok = np.empty(k, dtype=np.int64)
    floor = np.float32(_LOG_FLOOR)
    for t in range(T):
        n2 = max(np.float64(norm2[t]), 1e-6)
        nearest = np.inf
        top = -np.inf
        for j in range(k):
            if ids[t, j] >= 0:
                rel = np.float64(dist[t, j]) / n2
                nearest = min(nearest, rel)
                p_vote[j] = -rel / temperature + np.float64(log_s[t, j])
                top = max(top, p_vote[j])
            else:
                p_vote[j] = -np.inf
        total = 0.0
        for j in range(k):  # softmax; no neighbour (or none with a finite vote): no votes
            p_vote[j] = math.exp(p_vote[j] - top) if top > -np.inf else 0.0
            total += p_vote[j]
        for j in range(k):
            p_vote[j] = p_vote[j] / total if total > 0 else 0.0
        lam = lam0 / (1.0 + math.exp(-(gate - nearest) / gate_width))
        if copy_lambda > 0:
            copy = 1.0 / (1.0 + math.exp(-(copy_gate - nearest) / copy_width))
            lam = min(lam + copy_lambda * copy, _MAX_LAMBDA)
        shift = np.float32(math.log1p(-lam))
        for v in range(V):
            out[t, v] = max(lp[t, v] + shift, floor)
        # missing neighbours point at the nearest one's token (token 0 when none), with no vote
        for j in range(k):
            tok[j] = max(ids[t, j] if ids[t, j] >= 0 else ids[t, 0], 0)
        for j in range(k):
            p_mem = 0.0
            for i in range(k):  # the votes for this token (repeated tokens get equal values)
                if tok[i] == tok[j]:
                    p_mem += p_vote[i]
            mixed = (1.0 - lam) * math.exp(np.float64(lp[t, tok[j]])) + lam * p_mem
            out[t, tok[j]] = max(np.float32(math.log(mixed)) if mixed > 0 else floor, floor)


@torch.inference_mode()
def forward(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    window: WindowCache,
    memory: MemoryReader | None,
    cfg: ReadConfig,
    commit: bool = True,
    logits_from: int | None = 0,
    pick: bool = False,
) -> ForwardOutput:
    """Run ``input_ids`` (T,) after the window's tokens, reading ``memory`` in every layer.

    With ``commit`` the new tokens' keys and values are appended to the window; without it the
    window is left as it was (used to score candidate replies). Log-probabilities are computed
    for the new tokens from index ``logits_from`` on (None: none, as when importing history; the
    LM head is a fifth of this model's compute). With ``pick`` they only serve to choose the
    next token: a head that can (`app.weights.RescoredHead`) computes exactly only its top
    candidates.
    """
    cfg_m = model.config
    inner = model.model
    t = input_ids.shape[0]
    past = window.length
    hq = cfg_m.num_attention_heads
    d = window.head_dim
    scaling = d**-0.5
    cos, sin = rope_tables(model, past, t, model.dtype)

    h = inner.embed_tokens(input_ids)  # (T, Dm)
    reader = memory if memory is not None and memory.entry_count() > 0 else None
    keys, values, masses = [], [], []
    read_s = 0.0
    end = past + t
    # New keys/values go straight into the window's buffers when they fit, so attention reads a
    # view instead of concatenating the whole window in every layer.
    in_place = end <= window.capacity
    fused = t <= FUSED_MAX_TOKENS and in_place and fused_norms(model) is not None
    if fused:  # a decoding step: the layers' small operations compiled (`_decode_layers`)
        # a few tokens as rows of one step, each after the ones before it in the same window
        rows = range(t)
        h, step_s, step_mass = _decode_layers(
            model, h, [window] * t, [past + i for i in rows], [reader] * t, [cfg] * t
        )
        read_s = sum(step_s)
        # per layer, the rows' (ids, weights) [H, g, k] side by side as [H, t * g, k]
        masses = [
            tuple(np.concatenate([step_mass[i][layer][j] for i in rows], axis=1) for j in (0, 1))
            for layer in range(len(step_mass[0]))
        ]
    for layer_idx, layer in enumerate([] if fused else inner.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q, k, v = _project_qkv(attn, x, hq, window.n_kv, d)  # (Hq|H, T, D); k before RoPE
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)
        if in_place:  # written after the window's tokens; counted only by `commit_written`
            window.keys[layer_idx, :, past:end] = k
            window.values[layer_idx, :, past:end] = v
            window.keys_rot[layer_idx, :, past:end] = k_rot
            k_all = window.keys_rot[layer_idx]  # (H, capacity, D): the first `end` rows
            v_all = window.values[layer_idx]
        else:
            keys.append(k)
            values.append(v)
            k_all = torch.cat([window.keys_rot[layer_idx, :, :past].to(k_rot.dtype), k_rot], dim=1)
            v_all = torch.cat([window.values[layer_idx, :, :past].to(v.dtype), v], dim=1)
        attn_out, ids, w_mem, secs = _attend(
            q_rot, k_all, v_all, scaling, past, reader, layer_idx, cfg.top_k, cfg.collect_mass
        )
        read_s += secs
        if cfg.collect_mass and ids is not None and w_mem is not None:
            masses.append((ids, w_mem))
        h = h + attn.o_proj(attn_out)
        h = h + _mlp(layer.mlp, layer.post_attention_layernorm(h))

    hidden = inner.norm(h)  # (T, Dm)
    logprobs = torch.empty(0, cfg_m.vocab_size)
    if logits_from is not None:
        tail = hidden[logits_from:]
        logprobs = head_logprobs(model, tail, pick)
        t0 = time.perf_counter()
        logprobs = knn_mix(logprobs, tail, memory, cfg)
        read_s += time.perf_counter() - t0

    if in_place:
        keys_t = window.keys[:, :, past:end].clone()  # (L, H, T, D)
        values_t = window.values[:, :, past:end].clone()
        if commit:
            window.commit_written(t, kept_rotated=fused)
        else:  # leave nothing past the window's tokens (forgetting promises no stray copies)
            for buf in (window.keys, window.values, window.keys_rot):
                buf[:, :, past:end] = 0
    else:
        keys_t, values_t = torch.stack(keys), torch.stack(values)
        if commit:
            window.append(keys_t, values_t)
    out = ForwardOutput(
        logits=logprobs, hidden=hidden, keys=keys_t, values=values_t, read_seconds=read_s
    )
    if cfg.collect_mass:
        out.memory_mass = [_sum_mass(ids, w) for ids, w in masses]
    return out


@torch.inference_mode()
def forward_batch(
    model: LlamaForCausalLM,
    tokens: list[int],
    windows: list[WindowCache],
    memories: list[MemoryReader | None],
    cfgs: list[ReadConfig],
    pick: bool = False,
) -> list[ForwardOutput]:
    """One decoding step of several sequences at once: token ``tokens[b]`` after the window
    ``windows[b]``, reading ``memories[b]`` with ``cfgs[b]``; each window gains its token
    (``pick`` as for `forward`).

    The linear layers run on all sequences together (the weights are read once per step: 4 rows
    cost 1.25x one row's time with int8 weights on this CPU, 1.6x with int4); attention, the
    memory read and the output-level read stay per sequence. Outputs equal `forward` of each
    sequence alone up to float rounding. Every window must have room for one more token.
    """
    cfg_m = model.config
    inner = model.model
    n = len(tokens)
    hq = cfg_m.num_attention_heads
    h_kv = windows[0].n_kv
    d = windows[0].head_dim
    scaling = d**-0.5
    for w in windows:
        if w.length + 1 > w.capacity:
            raise ValueError(f"window cache full: {w.length} + 1 > {w.capacity}")
    pasts = [w.length for w in windows]
    tables = [rope_tables(model, p, 1, model.dtype) for p in pasts]
    cos = torch.cat([c for c, _ in tables])  # (B, D): one position per sequence
    sin = torch.cat([s for _, s in tables])
    readers = [m if m is not None and m.entry_count() > 0 else None for m in memories]
    h = inner.embed_tokens(torch.tensor(tokens, dtype=torch.long))  # (B, Dm)
    read_s = [0.0] * n
    masses: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n)]
    fused = fused_norms(model) is not None
    if fused:
        h, read_s, masses = _decode_layers(model, h, windows, pasts, readers, cfgs)
    for layer_idx, layer in enumerate([] if fused else inner.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q, k, v = _project_qkv(attn, x, hq, h_kv, d)  # (Hq|H, B, D): the batch as "tokens"
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (B, Hq|H, D)
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)  # over the heads
        outs = []
        for b, w in enumerate(windows):
            p = pasts[b]
            w.keys[layer_idx, :, p] = k[b]
            w.values[layer_idx, :, p] = v[b]
            w.keys_rot[layer_idx, :, p] = k_rot[b]
            out_b, ids, w_mem, secs = _attend(
                q_rot[b].unsqueeze(1),
                w.keys_rot[layer_idx],
                w.values[layer_idx],
                scaling,
                p,
                readers[b],
                layer_idx,
                cfgs[b].top_k,
                cfgs[b].collect_mass,
            )
            outs.append(out_b)
            read_s[b] += secs
            if cfgs[b].collect_mass and ids is not None and w_mem is not None:
                masses[b].append((ids, w_mem))
        h = h + attn.o_proj(torch.cat(outs))
        h = h + _mlp(layer.mlp, layer.post_attention_layernorm(h))

    hidden = inner.norm(h)  # (B, Dm)
    logprobs = head_logprobs(model, hidden, pick)
    results = []
    for b, w in enumerate(windows):
        t0 = time.perf_counter()
        lp = knn_mix(logprobs[b : b + 1], hidden[b : b + 1], memories[b], cfgs[b])
        read_s[b] += time.perf_counter() - t0
        p = pasts[b]
        out = ForwardOutput(
            logits=lp,
            hidden=hidden[b : b + 1],
            keys=w.keys[:, :, p : p + 1].clone(),
            values=w.values[:, :, p : p + 1].clone(),
            read_seconds=read_s[b],
        )
        if cfgs[b].collect_mass:
            out.memory_mass = [_sum_mass(ids, wm) for ids, wm in masses[b]]
        results.append(out)
    for w in windows:  # only once every output exists: a failure leaves every window as it was
        w.commit_written(1, kept_rotated=fused)
    return results


def fused_norms(model: LlamaForCausalLM) -> tuple[list[np.ndarray], list[np.ndarray], float] | None:
    """The layers' input and post-attention norm weights (numpy views) and epsilon, when a
    decoding step can run `_decode_layers`: float32 activations, matmuls packed to take bf16
    (`app.weights` bf16/int8/int4) and a SiLU-gated MLP; else None."""
    cached = getattr(model, "memchat_fused_norms", None)
    if cached is not None:
        return cached or None
    cfg = model.config
    ok = (
        getattr(model, "memchat_weights", None) in ("bf16", "int8", "int4")
        and model.model.embed_tokens.weight.dtype == torch.float32
        and getattr(cfg, "hidden_act", "") == "silu"
        and all(hasattr(layer.mlp, "gate_up_proj") for layer in model.model.layers)
    )
    found: Any = ()
    if ok:
        layers = model.model.layers
        found = (
            [layer.input_layernorm.weight.detach().numpy() for layer in layers],
            [layer.post_attention_layernorm.weight.detach().numpy() for layer in layers],
            float(layers[0].input_layernorm.variance_epsilon),
        )
    model.memchat_fused_norms = found  # a plain attribute, not a module
    return found or None


def _step_matmuls(
    model: LlamaForCausalLM,
) -> list[tuple[Callable[[torch.Tensor], torch.Tensor], ...]]:
    """Per layer, the decoding step's four packed matmuls (qkv, o, gate_up, down) as bare kernel
    calls (`PackedLinear.bf16_matmul`), made once per model."""
    cached = getattr(model, "memchat_step_matmuls", None)
    if cached is None:
        cached = [
            (
                layer.self_attn.qkv_proj.bf16_matmul(),
                layer.self_attn.o_proj.bf16_matmul(),
                layer.mlp.gate_up_proj.bf16_matmul(),
                layer.mlp.down_proj.bf16_matmul(),
            )
            for layer in model.model.layers
        ]
        model.memchat_step_matmuls = cached  # type: ignore[assignment]  # a plain attribute
    return cached


def _decode_layers(
    model: LlamaForCausalLM,
    h: torch.Tensor,
    windows: list[WindowCache],
    pasts: list[int],
    readers: list[MemoryReader | None],
    cfgs: list[ReadConfig],
) -> tuple[torch.Tensor, list[float], list[list[tuple[np.ndarray, np.ndarray]]]]:
    """The decoder layers for one new token per sequence (``h`` (B, Dm) its embeddings, window
    ``b`` holding ``pasts[b]`` tokens with room for one more), with the small operations between
    the matmuls compiled (`app.fused`): norms, RoPE with the window writes, the gated activation;
    the matmuls are bare kernel calls and the attention works on numpy views, since at one token
    per layer the per-call costs of torch modules and tensor views were a sixth of a step.
    Returns the last residual stream (B, Dm) before the final norm, and per sequence the seconds
    spent reading memory and the (ids, weights) each layer's memory read gave."""
    norms = fused_norms(model)
    assert norms is not None
    norm_in, norm_post, eps = norms
    matmuls = _step_matmuls(model)
    n = h.shape[0]
    hq = model.config.num_attention_heads
    d = windows[0].head_dim
    scaling = d**-0.5
    hs = h.float().contiguous()
    hn = hs.numpy()
    x = torch.empty(n, hs.shape[1], dtype=torch.bfloat16)
    xb = bf16_bits(x)
    act: torch.Tensor | None = None
    q_rot = np.empty((n, hq, d), dtype=np.float32)
    attn_np = np.empty((n, hq * d), dtype=np.float32)
    attn_b = torch.empty(n, hq * d, dtype=torch.bfloat16)  # its bf16 copy, the projection's input
    attn_bits = bf16_bits(attn_b)
    tables = []
    for p in pasts:
        cos, sin = rope_tables(model, p, 1, torch.float32)
        tables.append((cos[0].numpy(), sin[0].numpy()))
    arrays = [w.arrays() for w in windows]
    delta = np.empty((0, hs.shape[1]), dtype=np.uint16)  # no residual to add before layer 0
    read_s = [0.0] * n
    masses: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n)]
    for layer_idx, (qkv_mm, o_mm, gate_up_mm, down_mm) in enumerate(matmuls):
        add_rms_norm(hn, delta, norm_in[layer_idx], eps, xb)
        qkv = bf16_bits(qkv_mm(x))
        for b in range(n):
            keys, keys_rot, values = (a[layer_idx] for a in arrays[b])
            cos_b, sin_b = tables[b]
            rope_store(qkv[b], cos_b, sin_b, hq, keys, keys_rot, values, pasts[b], q_rot[b])
            ids, w_mem, secs = attend_step(
                q_rot[b],
                keys_rot,
                values,
                scaling,
                pasts[b],
                readers[b],
                layer_idx,
                cfgs[b].top_k,
                attn_np[b : b + 1],
            )
            read_s[b] += secs
            if cfgs[b].collect_mass and ids is not None and w_mem is not None:
                masses[b].append((ids, w_mem))
        narrow_rows(attn_np, attn_bits)
        add_rms_norm(hn, bf16_bits(o_mm(attn_b)), norm_post[layer_idx], eps, xb)
        gate_up = bf16_bits(gate_up_mm(x))
        if act is None:
            act = torch.empty(n, gate_up.shape[1] // 2, dtype=torch.bfloat16)
            act_bits = bf16_bits(act)
        silu_mul(gate_up, act_bits)
        delta = bf16_bits(down_mm(act))
    hs += torch.from_numpy(delta).view(torch.int16).view(torch.bfloat16).float()
    return hs, read_s, masses


def _project_qkv(
    attn: Any, x: torch.Tensor, hq: int, h: int, d: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries (Hq, T, D), keys before RoPE and values (H, T, D) of ``x`` (T, Dm); one matmul
    when the model's weights are packed (`app.weights.pack_weights` fuses q/k/v)."""
    t = x.shape[0]
    fused = getattr(attn, "qkv_proj", None)
    if fused is None:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    else:
        q, k, v = fused(x).split((hq * d, h * d, h * d), dim=-1)
    return (
        q.reshape(t, hq, d).transpose(0, 1),
        k.reshape(t, h, d).transpose(0, 1),
        v.reshape(t, h, d).transpose(0, 1),
    )


def _mlp(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    """The layer's gated MLP; gate and up in one matmul when packed."""
    fused = getattr(mlp, "gate_up_proj", None)
    if fused is None:
        return mlp(x)
    gate, up = fused(x).chunk(2, dim=-1)
    return mlp.down_proj(mlp.act_fn(gate) * up)


# Inputs of up to this many tokens (a decoding step; a reply's closing tokens) run through the
# compiled step, token after token in each layer: a torch pass has a fixed cost of ~20 ms in
# small operations, while the step's per-token part (attention, the memory read) is small.
FUSED_MAX_TOKENS = 4
_MASS_SUM_MIN = 1024  # weights per head from which `_sum_mass` sums per distinct id


def _sum_mass(ids: np.ndarray, weights: np.ndarray) -> LayerMass:
    """The weights (H, Q, k) memory ids received, per KV head; summed per distinct id, without
    the misses (id -1), when there are many (a prefill). A decoding step's few are kept as they
    are, misses included (weight 0), as views: their consumers sum repeats and drop unknown ids
    anyway, and a sort, or even a filter, per head and layer per decoded token was a few % of a
    turn."""
    if ids.shape[1] * ids.shape[2] < _MASS_SUM_MIN:
        flat_ids = ids.reshape(ids.shape[0], -1)
        flat_w = weights.reshape(ids.shape[0], -1).astype(np.float32, copy=False)
        return LayerMass(ids=list(flat_ids), mass=list(flat_w))
    out_ids, out_mass = [], []
    for head in range(ids.shape[0]):
        flat_ids = ids[head].ravel()
        keep = flat_ids >= 0
        uniq, inverse = np.unique(flat_ids[keep], return_inverse=True)
        out_ids.append(uniq.astype(np.int64))
        out_mass.append(
            np.bincount(inverse, weights=weights[head].ravel()[keep], minlength=len(uniq)).astype(
                np.float32
            )
        )
    return LayerMass(ids=out_ids, mass=out_mass)


def reference_logits(model: LlamaForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (T, V) of the unpatched transformers model (the oracle in tests)."""
    with torch.inference_mode():
        logits = model(input_ids.unsqueeze(0)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)
