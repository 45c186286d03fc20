"""Compiled kernels of the memory: the exact read for a few queries, and the merge step of a
write (numba).

A decoding step reads every layer's slots with a handful of queries (the query heads of each KV
group). Done with numpy, that read is some fifty small array operations per layer, and their
per-call cost, not the scan, was most of the read: 9 ms per decoded token at a 10k-token memory,
of which the matmuls were under 2 ms. `search_heads` does the scan, the top-k and the gathers of
one layer in one call. Larger searches (history imports: hundreds of queries) stay with BLAS.

A write merged its keys into their entries in numpy rounds (one per repeat of a row), a few per
slot and ninety slots per turn: that per-call cost was half of a turn's memory write.
`merge_rows` applies the merges in one ordered loop; `scaled_argmax` picks each incoming key's
most similar entry from the BLAS similarities; `first_roots` and `sum_by_id` are the write's and
the end of turn's remaining loops.

float16 <-> float32 conversions are integer operations on the bits (numba has no float16), exact
and portable: LLVM's own half conversions crash where the CPU lacks F16C (test:
NUMBA_CPU_NAME=generic). Widening, the read's hot loop, uses F16C's instruction where numba
targets this machine's CPU and it has one (`HAS_F16C`).
"""

from __future__ import annotations

import math
from typing import Any

import numba as nb
import numpy as np
from llvmlite import ir  # type: ignore[import-untyped]
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# Reassociation lets LLVM vectorize the dot products; no 'ninf'/'nnan': -inf marks empty places.
# (app's compiled code uses the same flags.)
FASTMATH = {"reassoc", "contract"}


def _to_width(builder, word, width):  # type: ignore[no-untyped-def]  # LLVM IR builder values
    """Integer IR value `word` truncated or zero-extended to `width` bits."""
    if word.type.width > width:
        return builder.trunc(word, ir.IntType(width))
    if word.type.width < width:
        return builder.zext(word, ir.IntType(width))
    return word


def _bits_to_float(typingctx, bits):  # type: ignore[no-untyped-def]  # numba typing hook
    """`_as_f32(bits)`: the float32 whose bits are the low 32 of integer `bits`."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(_to_width(builder, args[0], 32), ir.FloatType())

    return types.float32(bits), codegen


def _float_to_bits(typingctx, x):  # type: ignore[no-untyped-def]  # numba typing hook
    """`_as_u32(x)`: the bits of float32 `x` (int64, 0 <= bits < 2**32)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return types.int64(types.float32), codegen


# Called from compiled code only (typed Any: mypy would read the typing hooks' signatures). Bit
# casts only: LLVM's own half<->float conversions are one instruction with F16C, but without it
# (older CPUs, NUMBA_CPU_NAME=generic) they become library calls the JIT cannot link (a crash).
_as_f32: Any = intrinsic(_bits_to_float)
_as_u32: Any = intrinsic(_float_to_bits)
# public names for other compiled code (app.fused: bfloat16 bits)
float_from_bits: Any = _as_f32
bits_of_float: Any = _as_u32


def _half_to_float(typingctx, bits):  # type: ignore[no-untyped-def]  # numba typing hook
    """`_f16c_widen(bits)`: the float32 of the float16 whose bits are the low 16 of `bits`, by
    LLVM's fpext (one vcvtph2ps instruction where the CPU has F16C)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        half = builder.bitcast(_to_width(builder, args[0], 16), ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(bits), codegen


_f16c_widen: Any = intrinsic(_half_to_float)


def _float_to_half(typingctx, x):  # type: ignore[no-untyped-def]  # numba typing hook
    """`_f16c_narrow(x)`: the bits (uint16) of float32 `x` rounded to float16, to nearest even,
    by LLVM's fptrunc (one vcvtps2ph instruction where the CPU has F16C)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


_f16c_narrow: Any = intrinsic(_float_to_half)


def _targets_f16c() -> bool:
    """Whether numba compiles for this machine's CPU and it has F16C (no NUMBA_CPU_NAME or
    NUMBA_CPU_FEATURES chosen: code for another target must stay portable)."""
    from llvmlite import binding as llvm
    from numba.core import config

    if getattr(config, "CPU_NAME", None) or getattr(config, "CPU_FEATURES", None):
        return False
    return bool(llvm.get_host_cpu_features().get("f16c", False))


@nb.njit(cache=True, nogil=True, inline="always")
def _f16_bits_to_f32_f16c(h):  # type: ignore[no-untyped-def]  # numba compiles it
    """`_f16_bits_to_f32_portable` in one instruction (F16C); the same bits."""
    return _f16c_widen(h)


@nb.njit(cache=True, nogil=True, inline="always")
def _f16_bits_to_f32_portable(h):  # type: ignore[no-untyped-def]  # numba compiles it
    """float32 of the float16 of bits `h` (uint16), exactly: normal, subnormal, zero, inf, NaN.
    No float arithmetic on subnormals (a flush-to-zero mode would change them)."""
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    # all three forms computed, one selected: no branches, so the gather loops vectorize
    normal = (e + 112) << 23
    special = 0x7F800000  # inf, NaN
    tiny = _as_u32(np.float32(m) * np.float32(2.0**-24))  # zero, subnormal: a normal float32
    wide = (
        (normal | (m << 13)) if e != 0 and e != 31 else (special | (m << 13) if e == 31 else tiny)
    )
    return _as_f32(sign | wide)


# The value gathers of a read widen k * queries * D float16s per layer (9216 for this model):
# portably ~0.7 ms per decoded token, with F16C a few microseconds. numba's disk cache keys
# compiled code by CPU name and features, so a cache never crosses to a CPU without F16C.
HAS_F16C = _targets_f16c()
_f16_bits_to_f32: Any = _f16_bits_to_f32_f16c if HAS_F16C else _f16_bits_to_f32_portable


@nb.njit(cache=True, nogil=True, inline="always")
def _f32_to_f16_bits_f16c(x):  # type: ignore[no-untyped-def]  # numba compiles it
    """`_f32_to_f16_bits_portable` in one instruction (F16C); the same bits but for NaN
    payloads (both keep a NaN a NaN)."""
    return _f16c_narrow(np.float32(x))


@nb.njit(cache=True, nogil=True, inline="always")
def _f32_to_f16_bits_portable(x):  # type: ignore[no-untyped-def]  # numba compiles it
    """Bits (uint16) of float32 `x` rounded to float16, to nearest even: numpy's
    npy_floatbits_to_halfbits (overflow to inf, subnormals, NaN kept a NaN)."""
    f = _as_u32(np.float32(x))
    sign = (f & 0x80000000) >> 16
    f_exp = f & 0x7F800000
    if f_exp >= 0x47800000:  # overflow, inf or NaN
        f_sig = f & 0x007FFFFF
        if f_exp == 0x7F800000 and f_sig != 0:
            h = 0x7C00 + (f_sig >> 13)
            return np.uint16(sign + (h + 1 if h == 0x7C00 else h))
        return np.uint16(sign + 0x7C00)
    if f_exp <= 0x38000000:  # a float16 subnormal or zero
        if f_exp < 0x33000000:
            return np.uint16(sign)
        shift = 113 - (f_exp >> 23)
        f_sig = (0x00800000 + (f & 0x007FFFFF)) >> shift
        if (f_sig & 0x3FFF) != 0x1000 or (f & 0x7FF) != 0:  # round half to even
            f_sig += 0x1000
        return np.uint16(sign + (f_sig >> 13))
    h_exp = (f_exp - 0x38000000) >> 13
    f_sig = f & 0x007FFFFF
    if (f_sig & 0x3FFF) != 0x1000:  # round half to even
        f_sig += 0x1000
    return np.uint16(sign + (f_sig >> 13) + h_exp)


# Narrowing is a float16 window's hot loop (its slide rotates every row again): portably a
# branchy ~2 ns a value, with F16C vectorized.
_f32_to_f16_bits: Any = _f32_to_f16_bits_f16c if HAS_F16C else _f32_to_f16_bits_portable
# public names for other compiled code (app.fused: float16 window buffers)
f16_bits_to_f32: Any = _f16_bits_to_f32
f32_to_f16_bits: Any = _f32_to_f16_bits


# --- blocked keys: the read's scan -------------------------------------------------------------

# A slot's keys are also kept in blocks of BLOCK rows stored dimension-major ([blocks, D, BLOCK]):
# one block's scores for one query are then BLOCK lanes of one vector, summed over D with one FMA
# per dimension and no horizontal sum. Row by row, each (row, query) ends in a horizontal sum of a
# 64-wide dot product; that was half of the scan's time (1.8 -> 0.8 ms per decoded token over 90
# slots of 1450 keys, 3 queries each). numba does not vectorize the blocked loop by itself (its
# accumulators may alias the keys), hence the loop written in LLVM IR. The scan also keeps each
# block's largest score, which lets the top-k skip most blocks (`_top_rows_blocked`).
BLOCK = 16


def _block_scorer(nq: int, codes: bool = False, chains: int = 1):  # type: ignore[no-untyped-def]
    """Intrinsic `score(blocked, b, q, g0, dots, maxima)`: for j < nq, dots[g0 + j, b * BLOCK :
    (b + 1) * BLOCK] <- the scores of block `b` of `blocked` (uint16 float16 bits [blocks, D,
    BLOCK]) for query q[g0 + j] (float32 [Q, D], rows contiguous), and maxima[g0 + j, b] <- their
    largest; sums over d in order, one fused multiply-add each. Only where the CPU has F16C (the
    vector half -> float conversion).

    With `codes`, `blocked` holds int8 codes instead, and each step is a multiply and an add
    (fused where the target allows: no FMA library call on CPUs without it), for any CPU.

    With `chains` > 1 each query's sum is split over that many accumulators (dimension d into
    d % chains, the rest of D into the first), added up at the end: one query's FMAs otherwise
    wait on each other (4 cycles each), a long dependent chain for wide rows."""

    def typer(typingctx, blocked, b, q, g0, dots, maxima):  # type: ignore[no-untyped-def]
        if any(a.layout != "C" for a in (blocked, q, dots, maxima)):
            return None  # the code below steps through memory as C order: no typing otherwise

        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            i64, f32 = ir.IntType(64), ir.FloatType()
            vf = ir.VectorType(f32, BLOCK)
            vh = ir.VectorType(ir.HalfType(), BLOCK)
            vi = ir.VectorType(ir.IntType(8 if codes else 16), BLOCK)
            byte_ptr = ir.IntType(8).as_pointer()
            kb = context.make_array(sig.args[0])(context, builder, args[0])
            qa = context.make_array(sig.args[2])(context, builder, args[2])
            da = context.make_array(sig.args[4])(context, builder, args[4])
            ma = context.make_array(sig.args[5])(context, builder, args[5])
            dim = builder.extract_value(qa.shape, 1)
            lanes = ir.Constant(i64, BLOCK)
            base = builder.gep(kb.data, [builder.mul(builder.mul(args[1], dim), lanes)])
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vf, [vf, vf, vf]), "llvm.fma.v16f32"
            )
            vmax = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(f32, [vf]), "llvm.vector.reduce.fmax.v16f32"
            )
            rows = [builder.add(args[3], ir.Constant(i64, j)) for j in range(nq)]

            def row_ptr(arr, row, offset, typ):  # type: ignore[no-untyped-def]
                """Pointer to arr[row, offset] (offset in elements of 4 bytes) as `typ`."""
                stride = builder.extract_value(arr.strides, 0)
                at = builder.add(builder.mul(row, stride), builder.mul(offset, ir.Constant(i64, 4)))
                return builder.bitcast(
                    builder.gep(builder.bitcast(arr.data, byte_ptr), [at]), typ.as_pointer()
                )

            q_ptrs = [row_ptr(qa, r, ir.Constant(i64, 0), f32) for r in rows]
            accs = []  # accs[query][chain]
            for _ in range(nq):  # allocas of the entry block: LLVM keeps them in registers
                chain = []
                for _ in range(chains):
                    acc = cgutils.alloca_once(builder, vf)
                    builder.store(ir.Constant(vf, None), acc)
                    chain.append(acc)
                accs.append(chain)
            zeros = ir.Constant(ir.VectorType(ir.IntType(32), BLOCK), [0] * BLOCK)

            def step(d, c):  # type: ignore[no-untyped-def]
                """Dimension `d` of the block into chain `c` of every query."""
                ptr = builder.gep(base, [builder.mul(d, lanes)])
                bits = builder.load(builder.bitcast(ptr, vi.as_pointer()), align=1 if codes else 2)
                x = (
                    builder.sitofp(bits, vf)
                    if codes
                    else builder.fpext(builder.bitcast(bits, vh), vf)
                )
                for q_ptr, chain in zip(q_ptrs, accs, strict=True):
                    acc = chain[c]
                    qd = builder.insert_element(
                        ir.Constant(vf, ir.Undefined),
                        builder.load(builder.gep(q_ptr, [d])),
                        ir.Constant(ir.IntType(32), 0),
                    )
                    splat = builder.shuffle_vector(qd, ir.Constant(vf, ir.Undefined), zeros)
                    if codes:
                        prod = builder.fmul(x, splat)
                        total = builder.fadd(prod, builder.load(acc))
                        for op in (prod, total):
                            op.flags.append("contract")
                        builder.store(total, acc)
                    else:
                        builder.store(builder.call(fma, [x, splat, builder.load(acc)]), acc)

            width = ir.Constant(i64, chains)
            whole = builder.udiv(dim, width)
            with cgutils.for_range(builder, whole) as loop:
                for c in range(chains):
                    step(builder.add(builder.mul(loop.index, width), ir.Constant(i64, c)), c)
            rest = builder.sub(dim, builder.mul(whole, width))
            with cgutils.for_range(builder, rest) as loop:
                step(builder.add(builder.mul(whole, width), loop.index), 0)
            sums = []
            for chain in accs:
                parts = [builder.load(acc) for acc in chain]
                while len(parts) > 1:  # pairwise
                    parts = [
                        builder.fadd(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i]
                        for i in range(0, len(parts), 2)
                    ]
                sums.append(parts[0])
            first = builder.mul(args[1], lanes)
            for r, scores in zip(rows, sums, strict=True):
                builder.store(scores, row_ptr(da, r, first, vf), align=4)
                builder.store(builder.call(vmax, [scores]), row_ptr(ma, r, args[1], f32))
            return context.get_dummy_value()

        return types.void(blocked, b, q, g0, dots, maxima), codegen

    return intrinsic(typer)


@nb.njit(cache=True, nogil=True, inline="always")
def _score_block_portable(blocked, b, q, g0, nq, dots, maxima):  # type: ignore[no-untyped-def]
    """`_block_scorer` without F16C: the same sums, in order in one accumulator (no fused
    multiply-add)."""
    D = q.shape[1]
    o = b * BLOCK
    for j in range(nq):
        g = g0 + j
        for i in range(BLOCK):
            dots[g, o + i] = 0.0
        for d in range(D):
            qd = q[g, d]
            for i in range(BLOCK):
                dots[g, o + i] = np.float32(
                    dots[g, o + i] + qd * _f16_bits_to_f32_portable(blocked[b, d, i])
                )
        m = dots[g, o]
        for i in range(1, BLOCK):
            m = max(m, dots[g, o + i])
        maxima[g, b] = m


def _block_loop(score_3: Any, score_1: Any) -> Any:
    """A compiled `each(blocked, q, dots, maxima)`: every block of `blocked` scored for every
    query of `q` by the intrinsics `score_3` (three queries, which share each block's loads and
    conversions) and `score_1` (the rest)."""

    @nb.njit(cache=True, nogil=True, inline="always")
    def each(blocked, q, dots, maxima):  # type: ignore[no-untyped-def]
        Q = q.shape[0]
        for b in range(blocked.shape[0]):
            g = 0
            while g + 3 <= Q:
                score_3(blocked, b, q, g, dots, maxima)
                g += 3
            while g < Q:
                score_1(blocked, b, q, g, dots, maxima)
                g += 1

    return each


if HAS_F16C:
    _score_block_1: Any = _block_scorer(1, chains=4)
    _score_block_3: Any = _block_scorer(3, chains=2)
    _score_each_block: Any = _block_loop(_score_block_3, _score_block_1)

else:

    @nb.njit(cache=True, nogil=True, inline="always")
    def _score_each_block(blocked, q, dots, maxima):  # type: ignore[no-untyped-def]
        for b in range(blocked.shape[0]):
            _score_block_portable(blocked, b, q, 0, q.shape[0], dots, maxima)


@nb.njit(cache=True, nogil=True, inline="always")
def _last_block_maxima(n, dots, maxima):  # type: ignore[no-untyped-def]
    """maxima[g] of the last block over its `n` real rows only: the padding's zero scores may
    exceed theirs."""
    last = n // BLOCK
    if n % BLOCK:
        for g in range(dots.shape[0]):
            m = dots[g, last * BLOCK]
            for r in range(last * BLOCK + 1, n):
                m = max(m, dots[g, r])
            maxima[g, last] = m


@nb.njit(cache=True, nogil=True, inline="always")
def _score_blocks(blocked, n, q, dots, maxima):  # type: ignore[no-untyped-def]
    """dots[g, :blocks * BLOCK] <- the scores of the `n` keys in `blocked` (padding: zero
    keys) for every query of `q` [Q, D], and maxima[g, b] <- the largest score of block b's keys
    (the padding left out)."""
    _score_each_block(blocked, q, dots, maxima)
    _last_block_maxima(n, dots, maxima)


# one query (the kNN read: 576-wide rows) in four chains, three in two
_score_each_code_block: Any = _block_loop(
    _block_scorer(3, codes=True, chains=2), _block_scorer(1, codes=True, chains=4)
)


@nb.njit(cache=True, nogil=True, inline="always")
def _score_code_blocks(codes, n, q, dots, maxima):  # type: ignore[no-untyped-def]
    """`_score_blocks` of int8 codes [blocks, D, BLOCK] (`quantize_tail`) for queries `q` [Q, D]
    already multiplied by the codes' scales: approximate scores (`_rescored_top_rows`)."""
    _score_each_code_block(codes, q, dots, maxima)
    _last_block_maxima(n, dots, maxima)


@nb.njit(cache=True, fastmath=FASTMATH, nogil=True, inline="always")
def _exact_score(rows, r, q, g, norms2):  # type: ignore[no-untyped-def]
    """q[g] . rows[r] (float16 bits [n, D]) in float32, less half norms2[r] where `norms2` is
    given: one row's exact score (a vectorized dot product: its order of sums is LLVM's, the
    same on every call)."""
    acc = np.float32(0.0)
    for d in range(rows.shape[1]):
        acc += q[g, d] * _f16_bits_to_f32(rows[r, d])
    if norms2.shape[0]:
        acc = acc - np.float32(0.5) * norms2[r]
    return acc


@nb.njit(cache=True, fastmath=FASTMATH, nogil=True, inline="always")
def _slack(q, scale, norms2, n):  # type: ignore[no-untyped-def]
    """A bound on |approximate - exact score| for query q [D] of any of n rows quantized with
    `scale` [D]: each code is off by at most half a step, sum |q_d| scale_d / 2, plus the
    float32 rounding of both sums (at most 127 scale_d |q_d| per term, D + 1 roundings each)
    and of subtracting half a squared norm (norms2 [n] or empty)."""
    D = q.shape[0]
    a = 0.0
    for d in range(D):
        a += abs(np.float64(q[d])) * np.float64(scale[d])
    top = 0.0
    for r in range(min(n, norms2.shape[0])):
        top = max(top, np.float64(norms2[r]))
    return a * (0.5 + 256.0 * (D + 2) * 2.0**-24) + top * 2.0**-22


@nb.njit(cache=True, fastmath=FASTMATH, nogil=True, inline="always")
def _rescored_top_rows(  # type: ignore[no-untyped-def]  # numba compiles it
    approx, maxima, n, k, slack, rows, norms2, q, g, top, best, blocks_top, blocks_best
):
    """top/best [k] <- the k best of the n rows by exact score (`_exact_score`), by score
    descending then row ascending (ties keep the lower row, as a full scan's top-k); top -1
    and best -inf past n. `approx` [n] (block maxima `maxima`) are the rows' approximate
    scores, each within `slack` of the exact one.

    k blocks have a row whose approximate score reaches T, the k-th best block maximum, so the
    k-th best exact score is at least T - slack, and a row whose approximate score is below
    T - 2 slack is not among the k best; once k rows are scored exactly, nor is one below the
    k-th best exact score less `slack`. Only the rest (a few dozen of ~1450 rows) are scored
    exactly."""
    blocks = (n + BLOCK - 1) // BLOCK
    threshold = -np.inf
    if blocks > k:
        _top_rows(maxima, blocks, k, blocks_top, blocks_best)
        threshold = blocks_best[k - 1] - np.float32(2.0 * slack)
        threshold -= abs(threshold) * np.float32(2.0**-20)
    for j in range(k):
        top[j] = -1
        best[j] = -np.inf
    filled = 0
    margin = np.float32(slack) * np.float32(1.0 + 2.0**-20)
    for b in range(blocks):
        if maxima[b] < threshold:
            continue
        for r in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            if approx[r] >= threshold:
                filled = _insert(_exact_score(rows, r, q, g, norms2), r, k, filled, top, best)
                if filled == k:  # the k-th best exact score so far bounds the rest
                    bound = best[k - 1] - margin
                    bound -= abs(bound) * np.float32(2.0**-20)
                    threshold = max(threshold, bound)


def blocks_for(n: int) -> int:
    """Blocks holding `n` rows."""
    return -(-n // BLOCK)


@nb.njit(cache=True, nogil=True)
def block_rows(keys, rows, blocked):  # type: ignore[no-untyped-def]  # numba compiles it
    """blocked[r // BLOCK, :, r % BLOCK] <- keys[r] for each of `rows` (float16 bits)."""
    D = keys.shape[1]
    for r in rows:
        b, i = r // BLOCK, r % BLOCK
        for d in range(D):
            blocked[b, d, i] = keys[r, d]


@nb.njit(cache=True, nogil=True)
def block_tail(keys, start, hi, blocked):  # type: ignore[no-untyped-def]  # numba compiles it
    """Rows start.. of `keys` [n, D] into `blocked`, and zeros in its rows n..hi - 1."""
    n, D = keys.shape
    for r in range(start, n):
        b, i = r // BLOCK, r % BLOCK
        for d in range(D):
            blocked[b, d, i] = keys[r, d]
    for r in range(max(n, start), min(hi, blocked.shape[0] * BLOCK)):
        b, i = r // BLOCK, r % BLOCK
        for d in range(D):
            blocked[b, d, i] = 0


@nb.njit(cache=True, nogil=True, inline="always")
def _insert(s, r, k, filled, rows, best):  # type: ignore[no-untyped-def]
    """Offer score `s` of row `r` to the sorted top (rows/best, `filled` of k places); returns
    the places filled after. A later row never passes an equal score: ties keep row order."""
    if filled == k and not s > best[k - 1]:
        return filled
    j = filled if filled < k else k - 1
    while j > 0 and best[j - 1] < s:
        best[j] = best[j - 1]
        rows[j] = rows[j - 1]
        j -= 1
    best[j] = s
    rows[j] = r
    return filled + 1 if filled < k else k


@nb.njit(cache=True, nogil=True, inline="always")
def _top_rows(scores, n, k, rows, best):  # type: ignore[no-untyped-def]
    """rows/best [k] <- the k largest of `scores[:n]`, by score descending then row ascending;
    rows -1 and best -inf past n.

    One pass, each score inserted into the sorted k so far: most are refused by one comparison
    with the k-th (about k ln(n/k) insertions in all), and nothing is allocated."""
    for j in range(k):
        rows[j] = -1
        best[j] = -np.inf
    filled = 0
    for r in range(n):
        filled = _insert(scores[r], r, k, filled, rows, best)


@nb.njit(cache=True, nogil=True, inline="always")
def _top_rows_blocked(scores, maxima, n, k, rows, best):  # type: ignore[no-untyped-def]
    """`_top_rows` (the same rows, in the same order) reading only the blocks whose largest
    score (`maxima`, one per BLOCK rows) reaches the k-th largest of those maxima, T: k blocks
    hold a score >= T each, so the k-th best score is >= T, and every row of a block whose
    maximum is below T scores below it. Of ~90 blocks about k are read, not ~1450 rows: the
    one-pass top-k was 60% of the read's kernel time."""
    blocks = (n + BLOCK - 1) // BLOCK
    threshold = -np.inf
    if blocks > k:
        _top_rows(maxima, blocks, k, rows, best)
        threshold = best[k - 1]
    for j in range(k):
        rows[j] = -1
        best[j] = -np.inf
    filled = 0
    for b in range(blocks):
        if maxima[b] < threshold:
            continue
        for r in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            if scores[r] >= threshold:  # below T: never among the k best, even while filling
                filled = _insert(scores[r], r, k, filled, rows, best)


@nb.njit(cache=True, fastmath=FASTMATH, nogil=True)
def search_heads(  # type: ignore[no-untyped-def]  # numba compiles it; arrays throughout
    blocked,  # tuple of H uint16 [ceil(n_h / BLOCK), D, BLOCK]: each head's keys, float16
    # bits, blocked (`block_tail`; row r at [r // BLOCK, :, r % BLOCK])
    ids,  # tuple of H int64 [n_h]
    s0,  # tuple of H float32 [n_h]
    refreshed,  # tuple of H int32 [n_h]
    values,  # tuple of H uint16 [n_h, D]: float16 bits
    q,  # float32 [H, Q, D]
    turn,  # int
    log_decay,  # float
    out_ids,  # int64 [H, Q, k]
    out_scores,  # float32 [H, Q, k]
    out_log_strength,  # float32 [H, Q, k]
    out_values,  # float32 [H, Q, k, D]
    out_keys,  # float32 [H, Q, k, D], or [0, 0, 0, 0] for none
):
    """Exact top-k by inner product of each head's keys for its queries, and the hits' ids,
    scores, log strengths, values and keys, by score descending. Places past a
    head's entries get id -1, score 0, log strength -inf and zero vectors."""
    H, Q, D = q.shape
    k = out_ids.shape[2]
    want_keys = out_keys.shape[0] > 0
    best = np.empty(k, dtype=np.float32)
    rows = np.empty(k, dtype=np.int64)
    blocks = 0
    for h in range(H):
        blocks = max(blocks, blocked[h].shape[0])
    dots = np.empty((Q, blocks * BLOCK), dtype=np.float32)
    maxima = np.empty((Q, blocks), dtype=np.float32)
    for h in range(H):
        # a tuple indexed by a runtime value is a switch: once per head, not per hit
        kb, idh, s0h, refh, vh = blocked[h], ids[h], s0[h], refreshed[h], values[h]
        n = idh.shape[0]
        # the scores first, over whole blocks (the last one's padding is never selected), then
        # the selection
        _score_blocks(kb, n, q[h], dots, maxima)
        for g in range(Q):
            _top_rows_blocked(dots[g], maxima[g], n, k, rows, best)
            for j in range(k):
                r = rows[j]
                if r < 0:
                    out_ids[h, g, j] = -1
                    out_scores[h, g, j] = 0.0
                    out_log_strength[h, g, j] = -np.inf
                    for d in range(D):  # element loops: slice assignments cost 10x here
                        out_values[h, g, j, d] = 0.0
                    if want_keys:
                        for d in range(D):
                            out_keys[h, g, j, d] = 0.0
                    continue
                out_ids[h, g, j] = idh[r]
                out_scores[h, g, j] = best[j]
                # as `store.log_strength`: in float64, then float32
                ls = -np.inf
                if s0h[r] > 0:
                    ls = math.log(np.float64(s0h[r]))
                ls += np.float64(turn - refh[r]) * log_decay
                out_log_strength[h, g, j] = np.float32(ls)
                for d in range(D):
                    out_values[h, g, j, d] = _f16_bits_to_f32(vh[r, d])
                if want_keys:
                    b, i = r // BLOCK, r % BLOCK
                    for d in range(D):
                        out_keys[h, g, j, d] = _f16_bits_to_f32(kb[b, d, i])


@nb.njit(cache=True, fastmath=FASTMATH, nogil=True)
def nearest_l2(  # type: ignore[no-untyped-def]  # numba compiles it; arrays throughout
    codes,  # int8 [ceil(n / BLOCK), D, BLOCK]: the rows quantized, blocked (`quantize_tail`)
    scale,  # float32 [D]: the codes' step per dimension
    bits,  # uint16 [n, D]: the rows' float16 bits
    norms2,  # float32 [n]: the rows' squared norms
    q,  # float32 [Q, D], C-contiguous
    out_rows,  # int64 [Q, k]
    out_dist,  # float32 [Q, k]
):
    """Exact k nearest rows by squared L2 distance for each query, nearest first (ties by row):
    |q - x|^2 = |q|^2 + |x|^2 - 2 q.x, the top-k taken on q.x - |x|^2 / 2, scanned on the int8
    codes and rescored exactly from the float16 rows (`_rescored_top_rows`). Places past the n
    rows get row -1 and distance +inf. Distances are clamped at 0 (the expansion can round a
    near-duplicate's below it)."""
    Q, D = q.shape
    n = norms2.shape[0]
    k = out_rows.shape[1]
    blocks = (n + BLOCK - 1) // BLOCK
    dots = np.empty((Q, blocks * BLOCK), dtype=np.float32)
    maxima = np.empty((Q, blocks), dtype=np.float32)
    best = np.empty(k, dtype=np.float32)
    rows = np.empty(k, dtype=np.int64)
    btop = np.empty(k, dtype=np.int64)
    bbest = np.empty(k, dtype=np.float32)
    scaled = np.empty((Q, D), dtype=np.float32)
    for g in range(Q):
        for d in range(D):
            scaled[g, d] = q[g, d] * scale[d]
    _score_code_blocks(codes, n, scaled, dots, maxima)
    for g in range(Q):
        s = dots[g]
        for b in range(blocks):
            m = -np.inf
            for r in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
                v = s[r] - np.float32(0.5) * norms2[r]
                s[r] = v
                m = max(m, v)
            maxima[g, b] = m
        slack = _slack(q[g], scale, norms2, n)
        _rescored_top_rows(s, maxima[g], n, k, slack, bits, norms2, q, g, rows, best, btop, bbest)
        qn = np.float32(0.0)
        for d in range(D):
            qn += q[g, d] * q[g, d]
        for j in range(k):
            out_rows[g, j] = rows[j]
            out_dist[g, j] = max(np.float32(0.0), qn - 2 * best[j]) if rows[j] >= 0 else np.inf


@nb.njit(cache=True, nogil=True, inline="always")
def _scaled(x, inv):  # type: ignore[no-untyped-def]  # numba compiles it
    """x * inv, 0 for an x that is not finite (only a corrupted import could hold one; reads of
    its row are then not exact)."""
    return x * inv if abs(x) < np.inf else np.float32(0.0)


@nb.njit(cache=True, nogil=True, inline="always")
def _rounded(c):  # type: ignore[no-untyped-def]  # numba compiles it
    """c moved half a unit away from zero: its truncating conversion to an integer rounds to
    nearest (halves away from zero), and vectorizes."""
    return c + np.float32(0.5) if c >= 0 else c - np.float32(0.5)


@nb.njit(cache=True, nogil=True)
def quantize_tail(bits, start, hi, inv, codes, row):  # type: ignore[no-untyped-def]  # compiled
    """codes[r // BLOCK, :, r % BLOCK] <- round(x_r * inv) of the float16 rows bits[r] (uint16
    [n, D]) for r >= start (a value that is not finite gets code 0: only a corrupted import could
    hold one, and reads of its row are then not exact), and zeros in rows n..hi - 1. Returns
    False, rows partly written, when a code would leave [-127, 127] (the steps must grow:
    `column_abs_max`). `row` is float32 [D] scratch: each row's codes are computed as one
    vector loop, then scattered into the blocks."""
    n, D = bits.shape
    limit = np.float32(127.25)
    for r in range(start, n):
        bad = False
        for d in range(D):  # a flag, not a maximum: the loop vectorizes
            c = _scaled(_f16_bits_to_f32(bits[r, d]), inv[d])
            bad |= abs(c) > limit
            row[d] = _rounded(c)
        if bad:
            return False
        b, i = r // BLOCK, r % BLOCK
        for d in range(D):
            codes[b, d, i] = np.int8(np.int32(row[d]))
    for r in range(max(n, start), min(hi, codes.shape[0] * BLOCK)):
        b, i = r // BLOCK, r % BLOCK
        for d in range(D):
            codes[b, d, i] = 0
    return True


@nb.njit(cache=True, nogil=True)
def quantize_dims(bits, dims, inv, codes):  # type: ignore[no-untyped-def]  # numba compiles it
    """`quantize_tail`'s codes of dimensions `dims` only, for every row of `bits` (uint16
    [n, D]): after their steps grew (the steps never shrink, so these codes stay in range)."""
    for r in range(bits.shape[0]):
        b, i = r // BLOCK, r % BLOCK
        for d in dims:
            codes[b, d, i] = np.int8(
                np.int32(_rounded(_scaled(_f16_bits_to_f32(bits[r, d]), inv[d])))
            )


@nb.njit(cache=True, nogil=True)
def column_abs_max(bits, out):  # type: ignore[no-untyped-def]  # numba compiles it
    """out[d] <- the largest finite |x| of column d of the float16 rows bits (uint16 [n, D])."""
    n, D = bits.shape
    for d in range(D):
        out[d] = 0.0
    for r in range(n):
        for d in range(D):
            x = abs(_f16_bits_to_f32(bits[r, d]))
            if x > out[d] and np.isfinite(x):
                out[d] = x


@nb.njit(cache=True, fastmath=FASTMATH, nogil=True)
def squared_norms(bits, start, out):  # type: ignore[no-untyped-def]  # numba compiles it
    """out[r] <- the squared norm (float32) of float16 row bits[r] (uint16 [n, D]) for
    r >= start."""
    n, D = bits.shape
    for r in range(start, n):
        acc = np.float32(0.0)
        for d in range(D):
            x = _f16_bits_to_f32(bits[r, d])
            acc += x * x
        out[r] = acc


@nb.njit(cache=True, nogil=True)
def widen_f16(bits, out):  # type: ignore[no-untyped-def]  # numba compiles it
    """out [n, D] float32 <- the float16 values of `bits` [n, D] (uint16), exactly. numpy's own
    conversion takes ~1.5 ns per value; this loop vectorizes (F16C): a slot's keys for the
    write's BLAS merge test, 90 slots per turn."""
    n, D = bits.shape
    for r in range(n):
        for d in range(D):
            out[r, d] = _f16_bits_to_f32(bits[r, d])


# No fastmath below: the merge must round exactly as numpy's float32 expression does.
@nb.njit(cache=True, nogil=True)
def merge_rows(keys, values, rows, new_keys, new_values, w):  # type: ignore[no-untyped-def]
    """For i in order: keys[rows[i]] <- f16(k + w (new_keys[i] - k)) (float16 bits, uint16 [n, D];
    new_keys float32 [m, D]) and values[rows[i]] likewise (float16 bits, uint16 [n, D];
    new_values [m, D] too). Repeated rows apply one after another, in the order given."""
    D = keys.shape[1]
    w = np.float32(w)  # float32 arithmetic throughout, as numpy's
    for i in range(rows.shape[0]):
        r = rows[i]
        for d in range(D):
            k = _f16_bits_to_f32(keys[r, d])
            keys[r, d] = _f32_to_f16_bits(k + w * (new_keys[i, d] - k))
            v = _f16_bits_to_f32(values[r, d])
            x = _f16_bits_to_f32(new_values[i, d])
            values[r, d] = _f32_to_f16_bits(v + w * (x - v))


@nb.njit(cache=True, nogil=True)
def scaled_argmax(sims, scale, best, top):  # type: ignore[no-untyped-def]
    """For each column b of `sims` [N, B] (N > 0): best[b] <- the row of the largest
    sims[n, b] * scale[n] (the first on ties, as numpy's argmax), top[b] <- that product."""
    N, B = sims.shape
    for b in range(B):
        best[b] = 0
        top[b] = sims[0, b] * scale[0]
    for n in range(1, N):
        s = scale[n]
        for b in range(B):
            v = sims[n, b] * s
            if v > top[b]:
                top[b] = v
                best[b] = n


@nb.njit(cache=True, nogil=True)
def first_roots(cos, first, threshold, starts, root):  # type: ignore[no-untyped-def]
    """Rows first..first+B-1 of a write's keys, given their cosines `cos` [B, >= first+B] to the
    write's keys: key i starts an entry unless an earlier key has cosine >= threshold
    (starts[i] <- False); otherwise root[i] <- the first earlier starting key that has.
    `starts` and `root` [T] hold the earlier rows' results (keys are taken in order)."""
    for b in range(cos.shape[0]):
        i = first + b
        for j in range(i):
            if cos[b, j] >= threshold:
                if starts[i]:
                    starts[i] = False
                if starts[j]:
                    root[i] = j
                    break
        # a key joins an earlier key that itself joined another: it starts nothing, roots nowhere


@nb.njit(cache=True, nogil=True)
def sum_by_id(id_col, ids, mass, total, hit):  # type: ignore[no-untyped-def]
    """For each of `ids` [m] found in the ascending `id_col` [n] (binary search; -1 and absent
    ids skipped): total[row] += mass[i] in float64, in order, and hit[row] <- True."""
    n = id_col.shape[0]
    for i in range(ids.shape[0]):
        x = ids[i]
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) >> 1
            if id_col[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        if lo < n and id_col[lo] == x:
            total[lo] += np.float64(mass[i])
            hit[lo] = True


def compile_kernels(n_heads: int) -> None:
    """Compile the kernels (`search_heads` for memories of `n_heads` KV heads, the write's) or
    load them from numba's disk cache: otherwise a session's first read or write waits (seconds)."""
    empty = (
        tuple(np.zeros((0, 1, BLOCK), np.uint16) for _ in range(n_heads)),
        tuple(np.zeros(0, np.int64) for _ in range(n_heads)),
        tuple(np.zeros(0, np.float32) for _ in range(n_heads)),
        tuple(np.zeros(0, np.int32) for _ in range(n_heads)),
        tuple(np.zeros((0, 1), np.uint16) for _ in range(n_heads)),
    )
    out = (
        np.zeros((n_heads, 1, 1), np.int64),
        np.zeros((n_heads, 1, 1), np.float32),
        np.zeros((n_heads, 1, 1), np.float32),
        np.zeros((n_heads, 1, 1, 1), np.float32),
        np.zeros((0, 0, 0, 0), np.float32),
    )
    search_heads(*empty, np.zeros((n_heads, 1, 1), np.float32), 0, 0.0, *out)
    bits = np.zeros((0, 1), np.uint16)
    widen_f16(bits, np.zeros((0, 1), np.float32))
    block_rows(bits, np.zeros(0, np.int64), np.zeros((0, 1, BLOCK), np.uint16))
    block_tail(bits, 0, 0, np.zeros((0, 1, BLOCK), np.uint16))
    squared_norms(bits, 0, np.zeros(0, np.float32))
    codes, one = np.zeros((0, 1, BLOCK), np.int8), np.ones(1, np.float32)
    quantize_tail(bits, 0, 0, one, codes, one)
    column_abs_max(bits, np.zeros(1, np.float32))
    quantize_dims(bits, np.zeros(0, np.int64), one, codes)
    nearest_l2(
        codes, one, bits, np.zeros(0, np.float32), np.zeros((1, 1), np.float32),
        np.zeros((1, 1), np.int64), np.zeros((1, 1), np.float32),
    )  # fmt: skip
    merge_rows(
        bits, bits, np.zeros(0, np.int64), np.zeros((0, 1), np.float32), bits, np.float32(0.5)
    )
    for mass in (np.zeros(0, np.float32), np.zeros(0, np.float64)):
        sum_by_id(
            np.zeros(0, np.int64), np.zeros(0, np.int64), mass, np.zeros(0), np.zeros(0, bool)
        )
    first_roots(
        np.zeros((0, 0), np.float32),
        0,
        np.float32(0.5),
        np.ones(0, np.bool_),
        np.zeros(0, np.int64),
    )
    scaled_argmax(
        np.zeros((1, 1), np.float32),
        np.ones(1, np.float32),
        np.zeros(1, np.int64),
        np.zeros(1, np.float32),
    )
