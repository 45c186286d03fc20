"""A column of float16 vectors kept a second time in blocks of `BLOCK` rows stored
dimension-major, the layout the compiled scans read (`kernels._score_blocks`: one block's scores
for one query are the lanes of one vector, no horizontal sums): `BlockedRows` holds the float16
bits themselves (the slots' keys), `BlockedCodes` int8 codes of them (the kNN store's hidden
states).

`BlockedCodes`: codes are x / step rounded to the nearest integer, one step per dimension
(hidden states have a few dimensions far larger than the rest, which a step per row would spread
over all), fitted to 1.25 times the largest magnitude seen; a new row beyond it grows that
dimension's step. A scan of the codes gives every row's score to within a bound
(`kernels._slack`), and the scan rescores exactly from the float16 column the few rows that bound
cannot rule out (`kernels.nearest_l2`): half the bytes streamed per read, the same result. For
the slots' keys this was slower (4.3 against 3.9 ms per decoded token at 10k tokens: rescoring a
few dozen scattered 128-byte rows per query cost more than the halved scan saved); for hidden
states (1152-byte rows, one query per token) it is a small part.

The owner keeps a copy in step: `sync` after rows were appended, loaded or compacted (from the
first changed row on), `BlockedRows.patch` after rows changed in place; `release` while the
owner's reads are approximate (FAISS), after which `sync` from row 0 makes the copy again. Rows
past the live ones are zero, and a buffer given back is zeroed first: what was removed leaves no
copy.
"""

from __future__ import annotations

import numpy as np

from .kernels import (
    BLOCK,
    block_rows,
    block_tail,
    blocks_for,
    column_abs_max,
    quantize_dims,
    quantize_tail,
)

# Steps span this many times the largest magnitude quantized so far: a new row with a larger
# value makes its dimension's step grow and that dimension quantized again for every row; the
# scan's bound loosens by as much.
_HEADROOM = 1.25


class _Blocks:
    """A buffer of blocks [capacity, dim, BLOCK] of `dtype` holding rows 0..n-1 of a column."""

    dtype: type = np.uint16

    def __init__(self, dim: int):
        self.dim = dim
        self._buf: np.ndarray = np.zeros((0, dim, BLOCK), dtype=self.dtype)
        self._hi = 0  # rows of `_buf` that may be non-zero (the live rows and none after)
        self.n = 0  # live rows

    def view(self) -> np.ndarray:
        """The live rows' blocks [ceil(n / BLOCK), dim, BLOCK], the last block's rows past n
        zero (a view: valid until the next `sync`)."""
        return self._buf[: blocks_for(self.n)]

    def _fit(self, n: int, start: int) -> int:
        """Room for `n` rows of which those from `start` on are to be written: grow 1.25x, or
        give memory back past 4x; returns the first row to write (a new buffer has only the
        whole blocks before `start`)."""
        need, cap = blocks_for(n), len(self._buf)
        if need > cap or cap > 4 * max(need, 4):
            new: np.ndarray = np.zeros(
                (max(need, need + need // 4 + 4), self.dim, BLOCK), self.dtype
            )
            whole = min(start // BLOCK, need)  # blocks that hold no changed row
            new[:whole] = self._buf[:whole]
            self._buf[:] = 0  # what was removed leaves no copy in freed memory either
            self._buf, self._hi, start = new, whole * BLOCK, whole * BLOCK
        return start

    def release(self) -> None:
        """Drop the copy (zeroed first: what it held leaves no copy in freed memory); the next
        `sync` from row 0 makes it again."""
        if len(self._buf):
            self._buf[:] = 0
            self._buf = np.zeros((0, self.dim, BLOCK), dtype=self.dtype)
        self._hi = self.n = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the buffer (spare blocks included)."""
        return int(self._buf.nbytes)


class BlockedRows(_Blocks):
    """The float16 bits of a column [n, dim] as uint16 [blocks, dim, BLOCK], row r at
    [r // BLOCK, :, r % BLOCK]."""

    def sync(self, bits: np.ndarray, start: int) -> None:
        """The column is now `bits` (uint16 [n, dim]) and its rows from `start` on changed (an
        append, a load or a compaction); rows past n that held data are zeroed."""
        start = self._fit(len(bits), start)
        block_tail(bits, start, self._hi, self._buf)
        self._hi = self.n = len(bits)

    def patch(self, bits: np.ndarray, rows: np.ndarray) -> None:
        """Rows `rows` of the column (uint16 [n, dim], same n) changed in place."""
        if len(rows):
            block_rows(bits, rows, self._buf)


class BlockedCodes(_Blocks):
    """The int8 codes of a float16 column [n, dim] as [blocks, dim, BLOCK], row r at
    [r // BLOCK, :, r % BLOCK], and their step per dimension."""

    dtype = np.int8

    def __init__(self, dim: int):
        super().__init__(dim)
        # float32 [dim]: step per dimension and its inverse (updated in place)
        self.scale = np.ones(dim, dtype=np.float32)
        self._inv = np.ones(dim, dtype=np.float32)
        self.requantized = 0  # times new rows outgrew the steps of some dimensions

    def sync(self, bits: np.ndarray, start: int) -> None:
        """The column is now `bits` (uint16 float16 bits [n, dim]) and its rows from `start` on
        changed (an append, a load or a compaction); rows past n that held data are zeroed."""
        start = self._fit(len(bits), start)
        if self.n == 0:  # nothing quantized yet: steps fitted to the rows there are now
            self._fit_steps(bits)
        row = np.empty(self.dim, dtype=np.float32)
        if not quantize_tail(bits, start, self._hi, self._inv, self._buf, row):
            # new rows outgrew the steps of some dimensions (steps never shrink: removals leave
            # them valid): those grow, and only those dimensions of the older rows change
            top = np.empty(self.dim, dtype=np.float32)
            column_abs_max(bits[start:], top)
            grown = np.flatnonzero(top * self._inv > 127)
            self.scale[grown] = top[grown] * np.float32(_HEADROOM / 127)
            self._inv[grown] = np.float32(1) / self.scale[grown]
            quantize_dims(bits[:start], grown, self._inv, self._buf)
            done = quantize_tail(bits, start, self._hi, self._inv, self._buf, row)
            assert done, "steps fitted to the rows hold them"
            self.requantized += 1
        self._hi = self.n = len(bits)

    def _fit_steps(self, bits: np.ndarray) -> None:
        """Steps from the column's largest finite magnitudes with room to grow (1 for an
        all-zero dimension)."""
        top = np.empty(self.dim, dtype=np.float32)
        column_abs_max(bits, top)
        self.scale[:] = np.where(top > 0, top * np.float32(_HEADROOM / 127), np.float32(1))
        self._inv[:] = np.float32(1) / self.scale

    @property
    def nbytes(self) -> int:
        """Bytes of the codes (spare blocks included) and steps."""
        return int(self._buf.nbytes + self.scale.nbytes + self._inv.nbytes)
