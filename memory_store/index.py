"""`VectorIndex`: a FAISS index that mirrors the rows of a table of vectors.

Labels returned by `search` are table rows (``-1`` = no neighbour). The index picks its kind from
the table size: exact ``IndexFlatIP`` / ``IndexFlatL2`` up to ``exact_max`` rows, above it the
approximate kind ``approx``: ``IndexIVFFlat`` ("ivf") or ``IndexHNSWFlat`` ("hnsw"). With ``fp16``
the exact kind keeps the vectors as float16 (``IndexScalarQuantizer`` QT_fp16), for tables whose
vectors are float16 anyway: still exact, half the RAM, and a search reads half the bytes (3-4x
faster than ``IndexFlatL2`` for one query).

- Flat: appends go straight in, in-place updates overwrite the stored vectors, removals drop the
  index and it is rebuilt lazily from the table at the next search (a memcpy-sized cost).
- IVF: k-means lists trained on the table (a sample of it) when it crosses exact_max, and again
  each time it has grown or shrunk 4x since; a search scans the ``nprobe`` lists whose centroids
  are nearest. Removed rows leave their lists (``remove_ids``); updated rows are removed and
  re-added under a new label.
- HNSW: the graph cannot delete or move a vector, so removed and updated rows become tombstones
  (skipped with an ``IDSelectorBitmap``) and updated rows are re-added under a new label; the graph
  is rebuilt once tombstones pass a quarter of it, or the table shrinks back to ``exact_max``.

The flat path is exact and deterministic: a table rebuilt from the same rows answers bit-for-bit
the same. IVF and HNSW answers are approximate (recall < 1). On attention keys (inner product,
strongly anisotropic) HNSW found about 20% of the exact top-16 and IVF with 32 probes 95%.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import faiss
import numpy as np

Metric = Literal["ip", "l2"]
Approx = Literal["ivf", "hnsw"]
_FAISS_METRIC = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
# Searches of fewer queries than this run on the calling thread. Several FAISS searches open an
# OpenMP region for any number of queries (IndexScalarQuantizer even for one), and a region's
# threads wait for each other: on a machine whose cores are busy (torch's own thread pool, other
# processes) a one-query search then takes milliseconds instead of microseconds.
_SERIAL_QUERIES = 20
# IVF: lists per sqrt(rows) at training, k-means iterations and training points per list (a
# sample keeps training of 90 slots crossing the threshold together to about a second)
_IVF_LISTS_PER_SQRT = 1.0
_IVF_NITER = 10
_IVF_POINTS_PER_LIST = 48
_IVF_RETRAIN = 4  # retrain once the table has grown or shrunk this many times since training


def ivf_lists(n: int) -> int:
    """Number of IVF lists for a table of `n` rows: about sqrt(n), at least 8."""
    return max(8, int(_IVF_LISTS_PER_SQRT * np.sqrt(n)))


def as_f32(x: np.ndarray, dim: int) -> np.ndarray:
    """`x` as a C-contiguous float32 matrix [n, dim] (what FAISS needs)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    assert x.ndim == 2 and x.shape[1] == dim, (x.shape, dim)
    return x


class VectorIndex:
    """FAISS index over the rows of a table whose vectors `source()` returns as float32 [n, dim]."""

    def __init__(
        self,
        dim: int,
        metric: Metric,
        exact_max: int,
        source: Callable[[], np.ndarray],
        hnsw_m: int = 32,
        ef_construction: int = 64,
        ef_search: int = 128,
        fp16: bool = False,
        approx: Approx = "ivf",
        nprobe: int = 32,
    ):
        self.dim = dim
        self.fp16 = fp16
        self.metric = metric
        self.exact_max = exact_max
        self.source = source
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        if approx not in ("ivf", "hnsw"):
            raise ValueError(f"unknown approximate index {approx!r}")
        self.approx: Approx = approx
        self.nprobe = nprobe
        self.n = 0  # rows of the table
        # faiss' stubs lack the subclasses' methods, hence Any; None = rebuild before searching
        self._index: Any = None
        self._approx = False  # the index is approximate (HNSW or IVF): rows are mapped to labels
        self._trained_n = 0  # IVF: rows the lists were trained on
        self._quantizer: Any = None  # IVF: the centroids' flat index (kept alive here)
        # HNSW/IVF: label -> table row (-1 = tombstone or removed), table row -> label, bitmap of
        # live labels (HNSW)
        self._row_of_label = np.zeros(0, dtype=np.int64)
        self._label_of_row = np.zeros(0, dtype=np.int64)
        self._live_bits: np.ndarray | None = None

    @property
    def kind(self) -> str:
        """'flat', 'ivf' or 'hnsw': the kind the next search uses."""
        return self.approx if self.n > self.exact_max else "flat"

    @property
    def built(self) -> bool:
        """Whether a FAISS index exists (and `update` must keep it in step with the table)."""
        return self._index is not None

    @property
    def _ivf(self) -> bool:
        return self._approx and self.approx == "ivf"  # the built index is IVF

    def append(self, x: np.ndarray) -> None:
        """Rows n..n+m-1 of the table were appended with vectors `x` [m, dim]."""
        x = as_f32(x, self.dim)
        m = len(x)
        self.n += m
        if self._index is None or m == 0:
            return
        if not self._approx and self.n > self.exact_max:
            self._index = None  # crossing exact_max: rebuild as HNSW/IVF from the whole table
        elif not self._approx:
            self._index.add(x)
        elif self._ivf and self.n > _IVF_RETRAIN * self._trained_n:
            self._index = None  # lists trained on a quarter of the rows: train again
        else:
            first = len(self._row_of_label)
            self._add(x, first)
            self._row_of_label = np.concatenate(
                [self._row_of_label, np.arange(self.n - m, self.n, dtype=np.int64)]
            )
            self._label_of_row = np.concatenate(
                [self._label_of_row, np.arange(first, first + m, dtype=np.int64)]
            )
            self._live_bits = None

    def update(self, rows: np.ndarray, x: np.ndarray) -> None:
        """Vectors of existing table `rows` [m] changed to `x` [m, dim] (rows unique)."""
        x = as_f32(x, self.dim)
        rows = np.asarray(rows, dtype=np.int64)
        assert len(rows) == len(x)
        if self._index is None or len(rows) == 0:
            return
        if not self._approx:
            ntotal = self._index.ntotal
            if self.fp16:  # QT_fp16 codes are the vectors' float16 bytes, row after row
                codes = faiss.rev_swig_ptr(self._index.codes.data(), ntotal * 2 * self.dim)
                codes.view(np.float16).reshape(ntotal, self.dim)[rows] = x
                return
            xb = faiss.rev_swig_ptr(self._index.get_xb(), ntotal * self.dim).reshape(
                ntotal, self.dim
            )
            xb[rows] = x
            return
        self._drop_labels(self._label_of_row[rows])
        self._row_of_label[self._label_of_row[rows]] = -1
        first = len(self._row_of_label)
        self._add(x, first)
        self._row_of_label = np.concatenate([self._row_of_label, rows])
        self._label_of_row[rows] = np.arange(first, first + len(rows), dtype=np.int64)
        self._live_bits = None
        self._maybe_rebuild()

    def remove(self, keep: np.ndarray) -> None:
        """The table kept only the rows where `keep` [n] is True (order preserved)."""
        assert keep.shape == (self.n,)
        self.n = int(keep.sum())
        if self._index is None:
            return
        if not self._approx:
            self._index = None
            return
        new_row = np.cumsum(keep) - 1
        self._drop_labels(self._label_of_row[~keep])
        self._row_of_label[self._label_of_row[~keep]] = -1
        live = self._row_of_label >= 0
        self._row_of_label[live] = new_row[self._row_of_label[live]]
        self._label_of_row = self._label_of_row[keep]
        self._live_bits = None
        self._maybe_rebuild()

    def resync(self, n: int) -> None:
        """The table now has `n` rows of unknown history: rebuild from `source()` when searched."""
        self.n = n
        self._index = None

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows for each query `q` [Q, dim]: (distances float32 [Q, k], rows int64 [Q, k]).

        Distances are inner products (metric 'ip', descending) or squared L2 (ascending); where the
        row is -1 the distance is undefined (FAISS fills +-FLT_MAX).
        """
        q = as_f32(q, self.dim)
        if self.n == 0 or k == 0 or len(q) == 0:
            fill = np.float32(
                -np.finfo(np.float32).max if self.metric == "ip" else np.finfo(np.float32).max
            )
            return np.full((len(q), k), fill, dtype=np.float32), np.full(
                (len(q), k), -1, dtype=np.int64
            )
        index = self._ensure()
        threads = faiss.omp_get_max_threads()
        serial = len(q) < _SERIAL_QUERIES and threads > 1
        if serial:
            faiss.omp_set_num_threads(1)  # the calling thread's setting only (OpenMP ICV)
        try:
            if not self._approx:
                dist, rows = index.search(q, k)
                return dist, rows
            if self._ivf:  # removed rows are out of the lists: no selector needed
                dist, labels = index.search(q, k)
            else:
                params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # not in stubs
                params.efSearch = max(self.ef_search, k)
                bits = self._bitmap()
                if bits is not None:
                    params.sel = faiss.IDSelectorBitmap(index.ntotal, faiss.swig_ptr(bits))
                dist, labels = index.search(q, k, params=params)
        finally:
            if serial:
                faiss.omp_set_num_threads(threads)
        rows = np.where(labels >= 0, self._row_of_label[np.maximum(labels, 0)], -1)
        return dist, rows

    def nbytes(self) -> int:
        """Approximate RAM of the FAISS structures (vectors, plus graph links for HNSW)."""
        if self._index is None:
            return 0
        if self._ivf:  # vector, id, and the centroids
            per_vector = (2 if self.fp16 else 4) * self.dim + 8
            extra = int(self._quantizer.ntotal) * 4 * self.dim if self._quantizer else 0
            return (
                int(self._index.ntotal) * per_vector
                + extra
                + self._row_of_label.nbytes
                + self._label_of_row.nbytes
            )
        if self._approx:
            per_vector = 4 * self.dim + 2 * self.hnsw_m * 4 + 16
        else:
            per_vector = (2 if self.fp16 else 4) * self.dim
        return (
            int(self._index.ntotal) * per_vector
            + self._row_of_label.nbytes
            + self._label_of_row.nbytes
        )

    # --- internals -------------------------------------------------------------------------------

    def _ensure(self) -> Any:
        if self._index is None:
            self._build()
        assert self._index is not None
        return self._index

    def _build(self) -> None:
        x = as_f32(self.source(), self.dim)
        assert len(x) == self.n, (len(x), self.n)
        self._approx = self.n > self.exact_max
        self._quantizer = None
        if self._approx and self.approx == "ivf":
            nlist = ivf_lists(self.n)
            self._quantizer = faiss.IndexFlat(self.dim, _FAISS_METRIC[self.metric])
            metric = _FAISS_METRIC[self.metric]
            if self.fp16:  # lists hold float16 codes, as the flat kind does
                ivf: Any = faiss.IndexIVFScalarQuantizer(
                    self._quantizer, self.dim, nlist, faiss.ScalarQuantizer.QT_fp16, metric
                )
                ivf.by_residual = False  # the vectors' own float16 bits, not their residuals
            else:
                ivf = faiss.IndexIVFFlat(self._quantizer, self.dim, nlist, metric)
            ivf.cp.niter = _IVF_NITER
            ivf.cp.max_points_per_centroid = _IVF_POINTS_PER_LIST
            ivf.cp.min_points_per_centroid = 1  # no warning for small tables
            ivf.train(x)
            ivf.nprobe = min(self.nprobe, nlist)
            ivf.add_with_ids(x, np.arange(self.n, dtype=np.int64))
            self._trained_n = self.n
            self._row_of_label = np.arange(self.n, dtype=np.int64)
            self._label_of_row = np.arange(self.n, dtype=np.int64)
            self._index = ivf
            self._live_bits = None
            return
        if self._approx:
            index: Any = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, _FAISS_METRIC[self.metric])
            index.hnsw.efConstruction = self.ef_construction
            self._row_of_label = np.arange(self.n, dtype=np.int64)
            self._label_of_row = np.arange(self.n, dtype=np.int64)
        elif self.fp16:
            index = faiss.IndexScalarQuantizer(
                self.dim,
                faiss.ScalarQuantizer.QT_fp16,
                _FAISS_METRIC[self.metric],
            )
            self._row_of_label = np.zeros(0, dtype=np.int64)
            self._label_of_row = np.zeros(0, dtype=np.int64)
        else:
            index = (
                faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
            )
            self._row_of_label = np.zeros(0, dtype=np.int64)
            self._label_of_row = np.zeros(0, dtype=np.int64)
        index.add(x)
        self._index = index
        self._live_bits = None

    def _add(self, x: np.ndarray, first: int) -> None:
        """Add vectors `x` to the approximate index under labels first, first + 1, ..."""
        if self._ivf:
            self._index.add_with_ids(x, np.arange(first, first + len(x), dtype=np.int64))
        else:  # HNSW labels are its insertion order
            assert first == self._index.ntotal
            self._index.add(x)

    def _drop_labels(self, labels: np.ndarray) -> None:
        """IVF: take `labels` out of their lists (HNSW keeps them as tombstones)."""
        if self._ivf and len(labels):
            labels = np.ascontiguousarray(labels, dtype=np.int64)
            self._index.remove_ids(faiss.IDSelectorBatch(len(labels), faiss.swig_ptr(labels)))

    def _maybe_rebuild(self) -> None:
        assert self._index is not None
        if self.n <= self.exact_max:
            self._index = None
        elif self._ivf:
            # far fewer rows than the lists were trained for, or labels (one per add) piling up
            if self.n * _IVF_RETRAIN < self._trained_n or len(self._row_of_label) > (
                _IVF_RETRAIN * max(self.n, self._trained_n)
            ):
                self._index = None
        elif (self._index.ntotal - self.n) * 4 > self._index.ntotal:  # HNSW tombstones
            self._index = None

    def _bitmap(self) -> np.ndarray | None:
        """Packed bitmap of live labels (None when there is no tombstone)."""
        assert self._index is not None
        if self._index.ntotal == self.n:
            return None
        if self._live_bits is None:
            self._live_bits = np.packbits(self._row_of_label >= 0, bitorder="little")
        return self._live_bits
