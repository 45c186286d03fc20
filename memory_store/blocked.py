"""`BlockedRows`: a float16 column kept a second time in blocks of `BLOCK` rows stored
dimension-major, the layout the compiled scans read (`kernels._score_blocks`: one block's scores
for one query are the lanes of one vector, no horizontal sums).

The owner keeps it in step: `sync` after rows were appended, loaded or compacted (from the first
changed row on), `patch` after rows changed in place. Rows past the live ones are zero, and a
buffer given back is zeroed first: what was removed leaves no copy.
"""

from __future__ import annotations

import numpy as np

from .kernels import BLOCK, block_rows, block_tail, blocks_for


class BlockedRows:
    """The float16 bits of a column [n, dim] as uint16 [blocks, dim, BLOCK], row r at
    [r // BLOCK, :, r % BLOCK]."""

    def __init__(self, dim: int):
        self.dim = dim
        self._buf = np.zeros((0, dim, BLOCK), dtype=np.uint16)
        self._hi = 0  # rows of `_buf` that may be non-zero (the live rows and none after)
        self.n = 0  # live rows

    def view(self) -> np.ndarray:
        """The live rows' blocks: uint16 [ceil(n / BLOCK), dim, BLOCK], the last block's rows
        past n zero (a view: valid until the next `sync`)."""
        return self._buf[: blocks_for(self.n)]

    def sync(self, bits: np.ndarray, start: int) -> None:
        """The column is now `bits` (uint16 [n, dim]) and its rows from `start` on changed (an
        append, a load or a compaction); rows past n that held data are zeroed."""
        n, need = len(bits), blocks_for(len(bits))
        cap = len(self._buf)
        if need > cap or cap > 4 * max(need, 4):  # grow 1.25x, or give memory back
            new = np.zeros((max(need, need + need // 4 + 4), self.dim, BLOCK), np.uint16)
            whole = min(start // BLOCK, need)  # blocks that hold no changed row
            new[:whole] = self._buf[:whole]
            self._buf[:] = 0  # what was removed leaves no copy in freed memory either
            self._buf, self._hi, start = new, whole * BLOCK, whole * BLOCK
        block_tail(bits, start, self._hi, self._buf)
        self._hi = self.n = n

    def patch(self, bits: np.ndarray, rows: np.ndarray) -> None:
        """Rows `rows` of the column (uint16 [n, dim], same n) changed in place."""
        if len(rows):
            block_rows(bits, rows, self._buf)

    @property
    def nbytes(self) -> int:
        """Bytes of the buffer (spare blocks included)."""
        return int(self._buf.nbytes)
