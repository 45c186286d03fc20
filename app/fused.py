"""Compiled pieces of a decoding step, between its matmuls (numba).

Decoding one token runs some sixty small torch operations per layer besides the four matmuls
(norms, RoPE, window writes, the gated activation, dtype conversions, views); at batch 1 their
per-call cost, not their arithmetic, was a fifth of a step once the weights were 4-bit. Here they
are four calls per layer. Activations cross to the packed matmuls as bfloat16, which is what the
int4/int8 kernels compute in anyway (`app.weights`); bf16 values travel as their uint16 bits
(numba has no bfloat16): widening is a shift, narrowing rounds to nearest even as torch does.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from numba import types
from numba.extending import overload

from memory_store.kernels import (
    FASTMATH,
    bits_of_float,
    f16_bits_to_f32,
    f32_to_f16_bits,
    float_from_bits,
)


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """The uint16 bits of a contiguous bfloat16 tensor, as a numpy view (no copy)."""
    return t.view(torch.uint16).numpy()


def window_array(t: torch.Tensor) -> np.ndarray:
    """A window buffer as the compiled code takes it, a numpy view (no copy): float32 as it is,
    float16 as its uint16 bits (numba has no float16)."""
    a = t.numpy()
    return a.view(np.uint16) if a.dtype == np.float16 else a


def stored(x, buf):  # type: ignore[no-untyped-def]  # compiled code only (`overload` below)
    """float32 ``x`` as an element of window buffer ``buf`` holds it: itself in a float32
    buffer, its float16 bits (rounded to nearest even) in a float16 one (uint16)."""
    raise NotImplementedError("called from compiled code only")


def loaded(x):  # type: ignore[no-untyped-def]  # compiled code only (`overload` below)
    """An element ``x`` of a window buffer as float32 (float16 bits widened, exactly)."""
    raise NotImplementedError("called from compiled code only")


@overload(stored, inline="always")
def _stored(x, buf):  # type: ignore[no-untyped-def]  # numba typing: one version per dtype
    if buf.dtype == types.uint16:
        return lambda x, buf: f32_to_f16_bits(np.float32(x))
    return lambda x, buf: np.float32(x)


@overload(loaded, inline="always")
def _loaded(x):  # type: ignore[no-untyped-def]  # numba typing: one version per dtype
    if x == types.uint16:
        return lambda x: f16_bits_to_f32(x)
    return lambda x: np.float32(x)


@nb.njit(cache=True, nogil=True, inline="always")
def _widen(bits):  # type: ignore[no-untyped-def]  # numba compiles it
    """bfloat16 bits -> float32."""
    return float_from_bits(np.int64(bits) << 16)


@nb.njit(cache=True, nogil=True, inline="always")
def _narrow(x):  # type: ignore[no-untyped-def]  # numba compiles it
    """float32 -> bfloat16 bits, rounded to nearest even as torch rounds (no NaNs arrive here)."""
    u = bits_of_float(np.float32(x))
    return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


@nb.njit(cache=True, fastmath=FASTMATH, nogil=True, inline="always")
def exp_nonpositive(x):  # type: ignore[no-untyped-def]  # numba compiles it
    """exp(x) in float32 for x <= 0 (a softmax's logits minus their maximum), within 2 ulp of
    the exact value; 0 below -87 (and for -inf). Arithmetic and a bit cast only, so a loop of it
    vectorizes: numba's own exp is a call per element, a sixth of a decoding step's attention
    over a 1024-token window."""
    t = max(x, np.float32(-87.0)) * np.float32(1.4426950408889634)  # x / ln 2
    n = np.floor(t + np.float32(0.5))
    # r = x - n ln 2, with ln 2 in two parts so the product is exact
    r = max(x, np.float32(-87.0)) - n * np.float32(0.693145751953125)
    r = r - n * np.float32(1.428606765330187e-06)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    e = p * float_from_bits(np.int64(n + 127) << 23)  # times 2**n
    return e if x >= np.float32(-87.0) else np.float32(0.0)


@nb.njit(cache=True, fastmath=FASTMATH, nogil=True)
def add_rms_norm(h, delta, weight, eps, out):  # type: ignore[no-untyped-def]  # numba compiles it
    """``h += delta`` (bf16 bits [B, Dm]; none when it has no rows), then ``out`` <- bf16 bits of
    ``weight * h / sqrt(mean(h^2) + eps)`` per row (h float32 [B, Dm], weight float32 [Dm])."""
    B, Dm = h.shape
    add = delta.shape[0] > 0
    for b in range(B):
        if add:
            for i in range(Dm):
                h[b, i] += _widen(delta[b, i])
        ss = np.float32(0.0)
        for i in range(Dm):
            ss += h[b, i] * h[b, i]
        r = np.float32(1.0) / np.sqrt(ss / np.float32(Dm) + np.float32(eps))
        for i in range(Dm):
            out[b, i] = _narrow(weight[i] * (h[b, i] * r))


@nb.njit(cache=True, nogil=True)
def narrow_rows(x, out):  # type: ignore[no-untyped-def]  # numba compiles it
    """``out`` <- bf16 bits of ``x`` (float32 [B, N]), rounded as torch rounds: the attention
    output's conversion for the output projection (`torch.Tensor.to` took ~30 us a call there,
    a thirtieth of a decoding step)."""
    B, N = x.shape
    for b in range(B):
        for i in range(N):
            out[b, i] = _narrow(x[b, i])


@nb.njit(cache=True, fastmath=FASTMATH, nogil=True)
def silu_mul(gate_up, out):  # type: ignore[no-untyped-def]  # numba compiles it
    """``out`` <- bf16 bits of ``silu(gate) * up``, gate and up the halves of each row of
    ``gate_up`` (bf16 bits [B, 2I])."""
    B, I2 = gate_up.shape
    n = I2 // 2
    for b in range(B):
        for i in range(n):
            g = _widen(gate_up[b, i])
            out[b, i] = _narrow(g / (np.float32(1.0) + np.exp(-g)) * _widen(gate_up[b, n + i]))


# no fastmath: products rounded apart, as transformers' RoPE, so the rotated keys are its bits
@nb.njit(cache=True, nogil=True)
def rope_store(qkv, cos, sin, n_q, keys, keys_rot, values, past, q_rot):  # type: ignore[no-untyped-def]  # numba compiles it
    """One token's projections ``qkv`` (bf16 bits [(Hq + 2H) * D]: queries, keys, values) with
    RoPE ``cos``/``sin`` [D] of its position: the key before and after RoPE and the value go to
    row ``past`` of the window buffers ([H, capacity, D], each float32 or float16 bits:
    `stored`; the key is rotated as it is kept, so a float16 window's rotated key is its kept
    key's), the rotated queries to ``q_rot`` (float32 [Hq, D]). RoPE as transformers:
    ``x * cos + rotate_half(x) * sin``."""
    H, _, D = keys.shape
    half = D // 2
    x = np.empty(D, dtype=np.float32)
    for head in range(n_q + 2 * H):
        base = head * D
        for d in range(D):
            x[d] = _widen(qkv[base + d])
        if head >= n_q + H:  # a value
            for d in range(D):
                values[head - n_q - H, past, d] = stored(x[d], values)
            continue
        if head >= n_q:  # a key: kept, then rotated as kept
            for d in range(D):
                keys[head - n_q, past, d] = stored(x[d], keys)
                x[d] = loaded(keys[head - n_q, past, d])
        for d in range(D):
            other = -x[d + half] if d < half else x[d - half]
            r = x[d] * cos[d] + other * sin[d]
            if head < n_q:
                q_rot[head, d] = r
            else:
                keys_rot[head - n_q, past, d] = stored(r, keys_rot)


# no fastmath, as `rope_store`: the re-rotated keys are the bits of a fresh rotation
@nb.njit(cache=True, nogil=True)
def slide_window(keys, keys_rot, values, start, end, length, cos, sin):  # type: ignore[no-untyped-def]  # numba compiles it
    """Remove rows ``start..end-1`` of the window buffers ([L, H, capacity, D], each float32 or
    float16 bits): rows ``end..length-1`` move to ``start``, their keys rotated again (in
    float32) from the raw keys with ``cos``/``sin``
    [length - end, D] of the new positions. One pass per row, instead of a copy, a move and four
    RoPE operations over the whole window."""
    L, H, _, D = keys.shape
    half = D // 2
    for layer in range(L):
        for head in range(H):
            for t in range(length - end):
                src = end + t
                dst = start + t
                for d in range(D):  # dst < src: a row is read before it is overwritten
                    keys[layer, head, dst, d] = keys[layer, head, src, d]
                    values[layer, head, dst, d] = values[layer, head, src, d]
                for d in range(D):
                    x = loaded(keys[layer, head, dst, d])
                    other = (
                        -loaded(keys[layer, head, dst, d + half])
                        if d < half
                        else loaded(keys[layer, head, dst, d - half])
                    )
                    keys_rot[layer, head, dst, d] = stored(
                        x * cos[t, d] + other * sin[t, d], keys_rot
                    )


def compile_fused() -> None:
    """Compile the kernels or load them from numba's disk cache (seconds otherwise, in the first
    decoding step)."""
    bits = np.zeros((1, 2), np.uint16)
    add_rms_norm(np.zeros((1, 2), np.float32), bits, np.ones(2, np.float32), 1e-5, bits.copy())
    add_rms_norm(np.zeros((1, 2), np.float32), bits[:0], np.ones(2, np.float32), 1e-5, bits.copy())
    silu_mul(bits, np.zeros((1, 1), np.uint16))
    narrow_rows(np.zeros((1, 2), np.float32), bits)
    for dtype in (np.float32, np.uint16):  # float32 and float16 windows' keys and values
        buf = np.zeros((1, 1, 2), dtype)
        rope_store(
            np.zeros(6, np.uint16), np.ones(2, np.float32), np.zeros(2, np.float32), 1,
            buf, np.zeros((1, 1, 2), np.float32), buf.copy(), 0, np.zeros((1, 2), np.float32),
        )  # fmt: skip
        win = np.zeros((1, 1, 3, 2), dtype)
        slide_window(
            win,
            np.zeros((1, 1, 3, 2), np.float32),
            win.copy(),
            0,
            1,
            3,
            np.ones((2, 2), np.float32),
            np.zeros((2, 2), np.float32),
        )
