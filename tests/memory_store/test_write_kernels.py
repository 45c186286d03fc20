"""The write's compiled kernels against the numpy they replace: same bits, same choices."""

from __future__ import annotations

import numpy as np
import pytest

from memory_store.kernels import merge_rows, scaled_argmax


def _merge_numpy(
    K: np.ndarray, V: np.ndarray, rows: np.ndarray, keys: np.ndarray, values: np.ndarray, w: float
) -> None:
    """The numpy definition: merges one at a time, in order, in float32, rounded to float16."""
    w32 = np.float32(w)
    for i, r in enumerate(rows):
        K[r] = (K[r] + w32 * (keys[i] - K[r])).astype(np.float16).astype(np.float32)
        v = V[r].astype(np.float32)
        V[r] = (v + w32 * (values[i].astype(np.float32) - v)).astype(np.float16)


def test_merge_rows_matches_numpy_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    n, m, D = 50, 400, 64
    # wide magnitudes: float16 subnormals, normals near the top of its range, exact halves
    scale = np.float32(10.0) ** rng.integers(-7, 4, size=(n, D))
    K = (rng.standard_normal((n, D)) * scale).astype(np.float16).astype(np.float32)
    V = (rng.standard_normal((n, D)) * scale).astype(np.float16)
    keys = (rng.standard_normal((m, D)) * 3).astype(np.float16).astype(np.float32)
    values = (rng.standard_normal((m, D)) * 3).astype(np.float16)
    rows = rng.integers(0, n, size=m)  # many repeats: their order matters
    for w in (0.5, 0.3, 0.01):
        K1, V1, K2, V2 = K.astype(np.float16), V.copy(), K.copy(), V.copy()
        merge_rows(
            K1.view(np.uint16),
            V1.view(np.uint16),
            rows,
            keys,
            values.view(np.uint16),
            np.float32(w),
        )
        _merge_numpy(K2, V2, rows, keys, values, w)
        # the stored float16 keys are the float32 definition's values, bit for bit
        np.testing.assert_array_equal(K1.astype(np.float32).view(np.uint32), K2.view(np.uint32))
        np.testing.assert_array_equal(V1.view(np.uint16), V2.view(np.uint16))
        assert not np.array_equal(K1.astype(np.float32), K)  # something was merged


def test_merge_rows_order_of_repeats() -> None:
    K = np.zeros((1, 2), np.float16)
    V = np.zeros((1, 2), np.float16)
    keys = np.array([[1.0, 1.0], [3.0, 3.0]], np.float32)
    merge_rows(
        K.view(np.uint16),
        V.view(np.uint16),
        np.array([0, 0]),
        keys,
        keys.astype(np.float16).view(np.uint16),
        np.float32(0.5),
    )
    np.testing.assert_array_equal(K[0].astype(np.float32), [1.75, 1.75])  # 0 -> .5 -> 1.75
    np.testing.assert_array_equal(V[0].astype(np.float32), [1.75, 1.75])


def test_scaled_argmax_matches_numpy() -> None:
    rng = np.random.default_rng(4)
    sims = rng.standard_normal((300, 37)).astype(np.float32)
    sims[[10, 200], 5] = 9.0  # a tie: the first row wins, as np.argmax
    scale = rng.uniform(0.5, 2.0, 300).astype(np.float32)
    scale[[10, 200]] = 1.0
    best = np.empty(37, np.int64)
    top = np.empty(37, np.float32)
    scaled_argmax(sims, scale, best, top)
    want = sims * scale[:, None]
    np.testing.assert_array_equal(best, want.argmax(axis=0))
    np.testing.assert_array_equal(top, want.max(axis=0))
    assert best[5] == 10


@pytest.mark.parametrize("name", ["_f32_to_f16_bits", "_f32_to_f16_bits_portable"])
def test_float16_rounding_matches_numpy_over_the_float32_range(name: str) -> None:
    """Every exponent, random mantissas, and the exact halfway cases (ties to even): the
    narrowing the kernels use (F16C's where the CPU has it) and the portable one."""
    import numba

    from memory_store import kernels

    to_f16 = getattr(kernels, name)

    @numba.njit
    def narrow(x: np.ndarray, out: np.ndarray) -> None:
        for i in range(x.shape[0]):
            out[i] = to_f16(x[i])

    rng = np.random.default_rng(5)
    bits = rng.integers(0, 1 << 32, size=400_000, dtype=np.uint64).astype(np.uint32)
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    halves = halves[np.isfinite(halves)].astype(np.float32)
    # midpoints between neighbouring halves (ties) and the values next to them
    mid = ((halves[:-1].astype(np.float64) + halves[1:].astype(np.float64)) / 2).astype(np.float32)
    x = np.concatenate(
        [
            bits.view(np.float32),
            halves,
            mid,
            np.nextafter(mid, np.float32(np.inf)),
            np.nextafter(mid, np.float32(-np.inf)),
            np.array([np.inf, -np.inf, 65504, 65520, 65519.99, 1e-8, -1e-8], np.float32),
        ]
    )
    x = x[~np.isnan(x)]
    out = np.empty(len(x), np.uint16)
    narrow(x, out)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(out, want)
    nans = np.array([np.nan, -np.nan], np.float32)
    out = np.empty(2, np.uint16)
    narrow(nans, out)
    assert np.isnan(out.view(np.float16)).all()


def test_widen_f16_is_numpys_conversion_for_every_float16() -> None:
    """The keys' widening for BLAS (`KeySlot.keys_f32`): every one of the 65536 bit patterns,
    NaNs staying NaNs."""
    from memory_store.kernels import widen_f16

    bits = np.arange(65536, dtype=np.uint16).reshape(-1, 64)
    out = np.full(bits.shape, 7.0, np.float32)
    widen_f16(bits, out)
    want = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out[~nan].view(np.uint32), want[~nan].view(np.uint32))
