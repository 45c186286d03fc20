"""`SessionMemory`: one conversation's memory of the model's own keys and values.

One *slot* per (layer, KV head) holds entries (pre-RoPE key, value, token/message ids, strength) and
serves the attention read (top-k by inner product): up to ``exact_max`` entries by an exact scan of
the slot's keys (a decoding step's few queries: the compiled scan of the blocked copy, all heads
of a layer in one call; more queries: matmuls of the key column), above it by the slot's
approximate FAISS index (IVF by default, see `VectorIndex`). Beside the slots, a kNN-LM store
holds one entry per remembered token (final hidden state -> next token) for the output read,
exact as well up to ``exact_max`` tokens (`kernels.nearest_l2`: a scan of int8 codes of the
hidden states, the rows it cannot rule out rescored).

Entries live in parallel numpy columns (`ColumnTable`) in insertion order = ascending entry id, so
a search label is a row and ``searchsorted`` maps ids to rows. Entry ids are ``write base + token
index`` (one session-wide counter), so the entries a token left in different slots share its id,
and ids are never reused. Vectors are kept as float16 (keys, values, kNN hidden states; widened to
float32 for FAISS, BLAS and the merge arithmetic), so what SQL stores as fp16 reloads bit-exact.

Strength is ``s0 * decay ** (turn - refreshed)``: advancing the clock (`set_turn`) rewrites
nothing. Each entry carries dirty flags (``put``: payload changed or new; ``state``:
s0/refreshed/attention changed) and a storage ``ref``; `memory_store.persistence` uses them to
write only what changed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .blocked import BlockedCodes, BlockedRows
from .columns import ColumnTable, Schema
from .errors import ShapeError
from .index import VectorIndex
from .kernels import (
    first_roots,
    merge_rows,
    nearest_l2,
    scaled_argmax,
    search_heads,
    squared_norms,
    sum_by_id,
    widen_f16,
)
from .params import MemoryParams

_TINY = np.float32(1e-12)  # norm guard for the cosine of an all-zero key
_MERGE_BLOCK = 256  # queries per block of the exact cosine scan (bounds its temporary to 256 x N)
# Exact read: score buffer of at most this many floats per query block (16 MiB), and matmuls of
# at most _GEMM_MNK multiply-adds (rows x queries x D): OpenBLAS runs those on the calling thread,
# so a decode step's read never wakes a second BLAS thread pool beside torch's.
_SCORE_BLOCK = 1 << 22
_GEMM_MNK = 1 << 18
# Exact reads of at most this many queries per head (decoding steps: the query heads of a KV group;
# a turn's first pass: its tokens x the group's query heads) run as one compiled call per layer
# (`kernels.search_heads`, scoring the blocked keys); larger ones as BLAS matmuls. Measured at
# 1.45k entries per slot, 30 layers: the kernel 2.3 vs 8.8 ms with 3 queries, 51 vs 57 ms with 96
# (BLAS needs the keys widened first), and still faster at 600; but its score buffer is queries x
# entries, so history imports (hundreds of queries) stay with BLAS.
_KERNEL_MAX_QUERIES = 96
# Queries per call of the kNN read's exact scan (its distance buffer is queries x entries).
_KNN_QUERY_BLOCK = 48
_NO_KEYS = np.zeros((0, 0, 0, 0), dtype=np.float32)


# --- results -------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """Top-k memory entries per KV head and query; shapes [H, Q, k] (and [H, Q, k, D])."""

    ids: np.ndarray  # int64, stable entry id within the slot, -1 = no neighbour
    scores: np.ndarray  # float32, raw inner product q . key (0 where id == -1)
    log_strength: np.ndarray  # float32, log of the current strength (-inf where id == -1)
    values: np.ndarray  # float32 [H, Q, k, D] (0 where id == -1)
    # float32 [H, Q, k, D] (0 where id == -1); None when searched with with_keys=False
    keys: np.ndarray | None = None


@dataclass
class KnnResult:
    """Output-level (kNN-LM) neighbours; shapes [Q, k]."""

    next_token_ids: np.ndarray  # int64, -1 = no neighbour
    distances: np.ndarray  # float32, squared L2 (+inf where missing)
    log_strength: np.ndarray  # float32 (-inf where missing)
    ids: np.ndarray  # int64, kNN entry id (-1 where missing)


@dataclass
class EntryReads:
    """Reads of one slot summed per entry (`SessionMemory.tally_reads`), ids ascending."""

    ids: np.ndarray  # int64 [n]
    mass: np.ndarray  # float64 [n]: attention received, summed
    message_ids: np.ndarray  # int64 [n]
    token_ids: np.ndarray  # int64 [n]
    positions: np.ndarray  # int32 [n]


@dataclass
class WriteStats:
    """Totals over all (layer, head) slots of one `write`."""

    added: int = 0
    merged: int = 0


@dataclass
class MessageMemoryStats:
    """What memory holds of one message (strengths at the current turn)."""

    message_id: int
    entries: int  # slot entries over all (layer, head)
    tokens: int  # kNN entries = remembered tokens
    mean_strength: float
    min_strength: float
    turn_written: int  # earliest turn an entry of the message was written
    attention: float  # attention mass its entries received


@dataclass
class StorageState:
    """What the database holds of this memory; kept and used by `memory_store.persistence` only."""

    seq: int = 0  # saves the database holds (ChatSession.memory_seq); the next save is seq + 1
    snapshot_seq: int = -1  # save that wrote the latest state snapshot, -1 none
    log_bytes: int = 0  # bytes of state-log rows since that snapshot
    log_rows: int = 0
    chunk_n: dict[int, int] = field(default_factory=dict)  # chunk ref -> records it holds
    chunk_live: dict[int, int] = field(default_factory=dict)  # chunk ref -> records still current


# --- strength ------------------------------------------------------------------------------------


def strength(s0: np.ndarray, refreshed: np.ndarray, turn: int, decay: float) -> np.ndarray:
    """Current strength s0 * decay ** (turn - refreshed), float64."""
    return s0.astype(np.float64) * np.power(float(decay), (turn - refreshed).astype(np.float64))


def log_strength(s0: np.ndarray, refreshed: np.ndarray, turn: int, decay: float) -> np.ndarray:
    """log of the current strength, float32 (in log space: no underflow for old entries)."""
    with np.errstate(divide="ignore"):
        out = np.log(s0, dtype=np.float64)
    age = np.subtract(turn, refreshed, dtype=np.float64)
    age *= math.log(float(decay))
    out += age
    return out.astype(np.float32)


def key_norms(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|key| float32 [...], key / |key| [..., D]) along the last axis (zero keys stay zero)."""
    norms = np.linalg.norm(keys, axis=-1).astype(np.float32)
    return norms, keys / np.maximum(norms, _TINY)[..., None]


def round_f16(x: np.ndarray) -> np.ndarray:
    """float32 copy of `x` rounded to float16 precision (what SQL stores: reloads are bit-exact)."""
    return np.asarray(x).astype(np.float16).astype(np.float32)


# --- input checks --------------------------------------------------------------------------------


def _check(name: str, x: npt.ArrayLike, shape: tuple[int | None, ...], kind: str) -> np.ndarray:
    """`x` as an array of `shape` (None = any size) with dtype kind in `kind`, else ShapeError."""
    x = np.asarray(x)
    if x.ndim != len(shape) or any(
        s is not None and s != d for s, d in zip(shape, x.shape, strict=True)
    ):
        raise ShapeError(f"{name}: expected shape {shape}, got {x.shape}")
    if x.dtype.kind not in kind and x.size:  # an empty list comes in as float64
        raise ShapeError(f"{name}: expected dtype kind {kind!r}, got {x.dtype}")
    return x


def _gemm_rows(queries: int, dim: int) -> int:
    """Key rows per matmul with `queries` queries of `dim`: at most _GEMM_MNK multiply-adds,
    at least 256 rows."""
    return max(256, _GEMM_MNK // (queries * dim))


def batch_roots(unit: np.ndarray, threshold: float) -> np.ndarray:
    """Within one write of unit keys [T, D]: for each key, the first earlier key that starts an
    entry (has no earlier key as similar itself) with cosine >= threshold, else -1."""
    T = len(unit)
    starts = np.ones(T, dtype=bool)
    root = np.full(T, -1, dtype=np.int64)
    for i in range(0, T, _MERGE_BLOCK):  # blocks of rows bound the cosines to 256 x T
        j = min(T, i + _MERGE_BLOCK)
        first_roots(unit[i:j] @ unit.T, i, np.float32(threshold), starts, root)
    return root


def topk_layout(n: int, k: int) -> tuple[int, int]:
    """How `topk_rows` takes the top k of rows of n scores: (groups, width), the rows padded to
    `width` columns (a multiple of `groups`); groups = 0 for short rows (plain partition)."""
    if n < 8 * k:
        return 0, n
    groups = max(2 * k, 1 << round(math.log2(math.sqrt(n * k))))  # ~ k x members per group
    return groups, -(-n // groups) * groups


def _topk_offsets(R: int, N: int, k: int, groups: int) -> tuple[np.ndarray, ...]:
    """Index arithmetic of `topk_rows` for one shape: flat offsets of the rows of s, of the
    members of each row's groups (R, N/G, 1), of the rows of the candidates and of the top k."""
    c = N // groups * k if groups else N  # candidates per row
    first = np.arange(0, R * N, N)[:, None]
    members = first[:, :, None] + np.arange(0, N, groups)[None, :, None] if groups else first
    out = (first, members, np.arange(0, R * c, c)[:, None], np.arange(0, R * k, k)[:, None])
    for x in out:
        x.flags.writeable = False
    return out


# decoding asks for a few small shapes over and over (R = query heads x new tokens)
_topk_offsets_cached = functools.lru_cache(maxsize=64)(_topk_offsets)


def topk_rows(s: np.ndarray, k: int, groups: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(columns int64, values) of the k largest entries of each row of `s` [R, N], 1 <= k <= N,
    by value descending (ties in a deterministic but unspecified order).

    With `groups` G (dividing N, G >= k), the columns form G strided groups; every entry above
    the k-th largest group maximum lies in one of the k groups of largest maximum, and those
    groups' maxima are k entries at least as large, so the top k are found among the k * N / G
    members of those groups: one max-reduction and two small partitions instead of a partition
    of the whole row.
    """
    R, N = s.shape
    s = np.ascontiguousarray(s)
    offsets = _topk_offsets_cached if R <= 64 else _topk_offsets
    first, members, cand_first, k_first = offsets(R, N, k, groups)
    at: np.ndarray | None = None  # flat offsets into s of the candidates, (R, c)
    cand = s
    if groups:
        gmax = s.reshape(R, N // groups, groups).max(axis=1)  # (R, G)
        top_g = np.argpartition(gmax, groups - k, axis=1)[:, groups - k :]  # (R, k)
        at = (members + top_g[:, None, :]).reshape(R, -1)
        cand = s.take(at)
    c = cand.shape[1]
    if c > k:
        part = np.argpartition(cand, c - k, axis=1)[:, c - k :]
        part += cand_first  # flat offsets into cand
    else:
        part = np.arange(R * c).reshape(R, c)
    vals = cand.take(part)
    order = np.argsort(vals, axis=1)[:, ::-1] + k_first  # descending
    part, vals = part.take(order), vals.take(order)
    return (part if at is None else at.take(part)) - first, vals


# --- one table of entries + its index ------------------------------------------------------------


def _widened(col: np.ndarray) -> np.ndarray:
    """A float16 column [n, D] as a new float32 array (`kernels.widen_f16`: numpy's conversion
    takes ~1.5 ns per value, 150 us for a slot of 1440 keys, 9 ms for 10k hidden states)."""
    out = np.empty(col.shape, dtype=np.float32)
    widen_f16(col.view(np.uint16), out)
    return out


def _common_schema() -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    return {
        "id": (np.dtype(np.int64), ()),
        "message_id": (np.dtype(np.int64), ()),
        "token_id": (np.dtype(np.int64), ()),
        "position": (np.dtype(np.int32), ()),
        "turn_written": (np.dtype(np.int32), ()),
        "s0": (np.dtype(np.float32), ()),
        "refreshed": (np.dtype(np.int32), ()),
        "attention": (np.dtype(np.float32), ()),
        # storage chunk holding the entry's current payload, -1 = not stored yet
        "ref": (np.dtype(np.int64), ()),
        "put": (np.dtype(np.bool_), ()),  # payload new or changed since the last save
        "state": (np.dtype(np.bool_), ()),  # s0/refreshed/attention changed since the last save
    }


class EntryStore:
    """Entries of one slot (or of the kNN store) with their FAISS index and dirty tracking; the
    float16 column `blocked_column` is also kept `blocked` (as float16 bits or int8 codes, see
    `memory_store.blocked`) for the compiled exact scans, in step with every change of the
    column while the store is at most exact_max entries (above, FAISS serves its reads)."""

    blocked_column = ""

    def __init__(self, schema: Schema, index: VectorIndex, blocked: BlockedRows | BlockedCodes):
        self.table = ColumnTable(schema)
        self.index = index
        # (ids, refs) of stored entries removed since the last save
        self.dropped: list[tuple[np.ndarray, np.ndarray]] = []
        self.blocked = blocked

    def _rows_changed(self, start: int) -> None:
        """The rows from `start` on were appended or loaded (or moved by a compaction). Above
        exact_max the FAISS index serves the reads and no blocked copy is kept (its RAM given
        back); back at or below it, the copy is made again from row 0."""
        if self.index.kind != "flat":
            self.blocked.release()
            return
        bits = self.col(self.blocked_column).view(np.uint16)
        self.blocked.sync(bits, min(start, self.blocked.n))

    def _rows_removed(self, keep: np.ndarray, first: int) -> None:
        """The table kept the rows where `keep` (over the old rows) is True; `first` is the
        first removed row."""
        self._rows_changed(first)

    def __len__(self) -> int:
        return self.table.n

    def col(self, name: str) -> np.ndarray:
        """Writable view of column `name` over the live entries."""
        return self.table.col(name)

    def rows_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, present) of entry `ids`; rows are 0 where absent."""
        idcol = self.col("id")
        rows = np.minimum(np.searchsorted(idcol, ids), max(len(idcol) - 1, 0))
        present = (idcol[rows] == ids) if len(idcol) else np.zeros(len(ids), dtype=bool)
        return np.where(present, rows, 0), present

    def mass_by_row(self, ids: np.ndarray, mass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`mass` [n] summed per entry of `ids` [n]: (rows ascending, float64 sums) of the entries
        present (repeats summed in order; -1 and unknown ids dropped). One compiled pass
        (`kernels.sum_by_id`), no sort: a turn's reads repeat each entry many times."""
        if len(ids) != len(mass):  # the compiled pass reads both without bounds checks
            raise ShapeError(f"ids and mass differ in length ({len(ids)} != {len(mass)})")
        if len(self) == 0 or len(ids) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        total = np.zeros(len(self), dtype=np.float64)
        hit = np.zeros(len(self), dtype=bool)
        sum_by_id(
            self.col("id"),
            np.ascontiguousarray(ids, dtype=np.int64),
            np.ascontiguousarray(
                mass, dtype=mass.dtype if mass.dtype == np.float32 else np.float64
            ),
            total,
            hit,
        )
        rows = np.flatnonzero(hit)
        return rows, total[rows]

    def load_rows(self, rows: dict[str, np.ndarray]) -> None:
        """Append stored entries (clean, sorted by id, after any present); index built lazily."""
        n0 = len(self)
        self.table.append(rows)
        self.index.resync(len(self))
        self._rows_changed(n0)

    def remove(self, mask: np.ndarray) -> int:
        """Drop the entries where `mask` is True; remember the stored ones for the next save."""
        m = int(mask.sum())
        if m == 0:
            return 0
        first = int(np.argmax(mask))
        ref = self.col("ref")[mask]
        stored = ref >= 0
        if stored.any():
            self.dropped.append((self.col("id")[mask][stored].copy(), ref[stored].copy()))
        keep = ~mask
        self.table.keep(keep)
        self.index.remove(keep)
        self._rows_removed(keep, first)
        return m

    def evict(self, turn: int, params: MemoryParams) -> int:
        """Remove entries below the floor, then the weakest (oldest first on ties) over capacity."""
        if len(self) == 0:
            return 0
        s = strength(self.col("s0"), self.col("refreshed"), turn, params.decay)
        drop = s < params.floor
        excess = int((~drop).sum()) - params.capacity
        if excess > 0:
            alive = np.flatnonzero(~drop)
            order = np.lexsort((self.col("id")[alive], s[alive]))  # weakest first, then oldest
            drop[alive[order[:excess]]] = True
        return self.remove(drop)

    def forget_message(self, message_id: int) -> int:
        """Remove every entry of `message_id`."""
        return self.remove(self.col("message_id") == message_id)

    def forget_all(self) -> int:
        """Remove every entry."""
        return self.remove(np.ones(len(self), dtype=bool))

    def nbytes(self) -> int:
        """RAM of the columns (with spare capacity), the blocked copy and the index."""
        return self.table.nbytes() + self.blocked.nbytes + self.index.nbytes()


class KeySlot(EntryStore):
    """One (layer, KV head): pre-RoPE keys and values, both float16 (the read's scan streams every
    key once per decoded token: half the bytes of float32; the widened values are the same)."""

    blocked_column = "key"  # the read's scan (`kernels.search_heads`)
    blocked: BlockedRows

    def __init__(self, head_dim: int, params: MemoryParams):
        schema = _common_schema()
        schema.update(
            key=(np.dtype(np.float16), (head_dim,)),
            value=(np.dtype(np.float16), (head_dim,)),
            knorm=(np.dtype(np.float32), ()),  # |key|, cached for the merge test
        )
        index = VectorIndex(
            head_dim,
            "ip",
            params.exact_max,
            self.keys_f32,
            params.hnsw_m,
            params.hnsw_ef_construction,
            params.hnsw_ef_search,
            approx=params.approx_index,  # type: ignore[arg-type]  # checked by MemoryParams
            nprobe=params.ivf_nprobe,
        )
        super().__init__(schema, index, BlockedRows(head_dim))
        self.head_dim = head_dim
        self.params = params

    def _rows_patched(self, rows: np.ndarray) -> None:
        """Keys of `rows` changed in place (merges): the blocked copy follows, where kept."""
        if self.blocked.n == len(self):
            self.blocked.patch(self.col("key").view(np.uint16), rows)

    def blocked_keys(self) -> np.ndarray:
        """The key column's float16 bits in blocks: uint16 [ceil(n / BLOCK), D, BLOCK], row r at
        [r // BLOCK, :, r % BLOCK], the last block's rows past n zero (a view, kept in step)."""
        return self.blocked.view()

    def keys_f32(self) -> np.ndarray:
        """The key column widened to float32 [n, D] (a new array, for BLAS and FAISS)."""
        return _widened(self.col("key"))

    def search_into(self, q: np.ndarray, k: int, turn: int, out: SearchResult, h: int) -> None:
        """Top-k entries for queries `q` [Q, D], written into row `h` of the [H, ...] arrays of
        `out` (which arrive zeroed, ids -1 and log_strength -inf: only hits are filled)."""
        if len(self) == 0:
            return
        dist, rows = self.index.search(q, k)
        hit = rows >= 0
        if hit.all():  # the common case: no masking
            out.ids[h] = self.col("id")[rows]
            out.scores[h] = dist
            out.log_strength[h] = log_strength(
                self.col("s0")[rows], self.col("refreshed")[rows], turn, self.params.decay
            )
            out.values[h] = self.col("value")[rows]
            if out.keys is not None:
                out.keys[h] = self.col("key")[rows]
            return
        r = rows[hit]
        out.ids[h][hit] = self.col("id")[r]
        out.scores[h][hit] = dist[hit]
        ls = log_strength(self.col("s0")[r], self.col("refreshed")[r], turn, self.params.decay)
        out.log_strength[h][hit] = ls
        out.values[h][hit] = self.col("value")[r]
        if out.keys is not None:
            out.keys[h][hit] = self.col("key")[r]

    def nearest_cosine(self, unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For unit queries [T, D]: (row of the existing key of highest cosine, that cosine).

        Exact scan while the slot is flat; above exact_max the candidates are the IP index's top
        max(32, top_k) for the unit query (approximate, as the index itself).
        """
        inv = 1.0 / np.maximum(self.col("knorm"), _TINY)
        if self.index.kind == "flat":
            keys = self.keys_f32()  # widened once for BLAS
            best = np.empty(len(unit), dtype=np.int64)
            cos = np.empty(len(unit), dtype=np.float32)
            for i in range(0, len(unit), _MERGE_BLOCK):
                # keys @ (D, B) C-contiguous: BLAS is 2-3x faster than unit @ keys.T here
                sims = keys @ np.ascontiguousarray(unit[i : i + _MERGE_BLOCK].T)  # (N, B)
                scaled_argmax(sims, inv, best[i : i + _MERGE_BLOCK], cos[i : i + _MERGE_BLOCK])
            return best, cos
        _, rows = self.index.search(unit, max(32, self.params.top_k))
        r = np.maximum(rows, 0)
        sims = np.einsum("tcd,td->tc", self.col("key")[r].astype(np.float32), unit) * inv[r]
        sims[rows < 0] = -np.inf
        pick = sims.argmax(axis=1)
        return r[np.arange(len(r)), pick], sims[np.arange(len(r)), pick].astype(np.float32)

    def write(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        meta: dict[str, np.ndarray],
        turn: int,
        norms: np.ndarray,
        unit: np.ndarray,
    ) -> tuple[int, int]:
        """Add or merge T incoming entries; keys float32 [T, D] fp16-rounded, values float16 [T, D],
        with their `norms` [T] and `unit` [T, D] (`key_norms`, which `SessionMemory.write` runs
        for all slots at once).

        An incoming key merges into the existing entry of highest cosine when that cosine reaches
        merge_threshold. Among the keys of one write that match nothing, a key merges into the first
        earlier one that starts a new entry itself and is as similar. Several merges into one entry
        apply in token order. Returns (added, merged).
        """
        p, n0, T = self.params, len(self), len(keys)
        target = np.full(T, -1, dtype=np.int64)  # existing row each token merges into
        if n0 and p.merge_threshold <= 1.0:
            best, cos = self.nearest_cosine(unit)
            target = np.where(cos >= p.merge_threshold, best, -1)
        root = np.full(T, -1, dtype=np.int64)  # earlier token of this write each token merges into
        free = np.flatnonzero(target < 0)
        if len(free) > 1 and p.merge_threshold <= 1.0:
            first = batch_roots(unit[free], p.merge_threshold)
            root[free[first >= 0]] = free[first[first >= 0]]
        new = (target < 0) & (root < 0)

        row_of = np.full(T, -1, dtype=np.int64)
        row_of[new] = n0 + np.arange(int(new.sum()))
        m = int(new.sum())
        self.table.append(
            {
                "id": meta["id"][new],
                "message_id": meta["message_id"][new],
                "token_id": meta["token_id"][new],
                "position": meta["position"][new],
                "turn_written": np.full(m, turn, np.int32),
                "s0": np.ones(m, np.float32),
                "refreshed": np.full(m, turn, np.int32),
                "attention": np.zeros(m, np.float32),
                "ref": np.full(m, -1, np.int64),
                "put": np.ones(m, bool),
                "state": np.zeros(m, bool),
                "key": keys[new],
                "value": values[new],
                "knorm": norms[new],
            }
        )
        merging = np.flatnonzero(~new)
        rows = np.where(target[merging] >= 0, target[merging], row_of[np.maximum(root[merging], 0)])
        self._merge(rows, keys[merging], values[merging], turn)
        self.index.append(self.col("key")[n0:])  # first: the index's size decides its kind
        self._rows_changed(n0)
        self._rows_patched(rows[rows < n0])  # merged in place (repeats: the same final key)
        if self.index.built:  # an approximate index holds its own copy of the merged keys
            old = np.unique(rows[rows < n0])
            self.index.update(old, self.col("key")[old])
        return m, len(merging)

    def _merge(self, rows: np.ndarray, keys: np.ndarray, values: np.ndarray, turn: int) -> None:
        """m <- m + w (h - m) for key and value (float32, rounded to float16), repeated rows in
        token order (`kernels.merge_rows`)."""
        if len(rows) == 0:
            return
        K, V = self.col("key"), self.col("value")
        merge_rows(
            K.view(np.uint16),
            V.view(np.uint16),
            np.ascontiguousarray(rows, dtype=np.int64),
            np.ascontiguousarray(keys, dtype=np.float32),
            np.ascontiguousarray(values, dtype=np.float16).view(np.uint16),
            np.float32(self.params.merge_weight),
        )
        # rows may repeat: each copy gets the same (final) value, cheaper than np.unique
        self.col("knorm")[rows] = np.linalg.norm(K[rows].astype(np.float32), axis=1)
        self.col("s0")[rows] = 1.0
        self.col("refreshed")[rows] = turn
        self.col("put")[rows] = True

    def reinforce(self, ids: np.ndarray, mass: np.ndarray, turn: int) -> int:
        """Add attention `mass` to entries `ids` (-1 and unknown ids skipped); refresh strength if
        params.reinforce > 0. Returns the number of entries touched."""
        rows, total = self.mass_by_row(ids, mass)
        return self.reinforce_rows(rows, total, turn)

    def reinforce_rows(self, rows: np.ndarray, total: np.ndarray, turn: int) -> int:
        """`reinforce` of distinct `rows` with their summed `total` mass (from `mass_by_row`)."""
        if len(rows) == 0:
            return 0
        att = self.col("attention")
        att[rows] = (att[rows] + total).astype(np.float32)
        if self.params.reinforce > 0:
            s0, ref = self.col("s0"), self.col("refreshed")
            now = strength(s0[rows], ref[rows], turn, self.params.decay)
            s0[rows] = np.minimum(1.0, now + self.params.reinforce * total).astype(np.float32)
            ref[rows] = turn
        self.col("state")[rows] = True
        return len(rows)


class KnnStore(EntryStore):
    """kNN-LM entries: final hidden state [Dm] (float16) -> next token id. Up to exact_max
    entries the read is an exact compiled scan of the hidden states' blocked int8 codes with an
    exact rescoring (`kernels.nearest_l2`, each row's squared norm kept beside them), above it
    the L2 FAISS index (IVF by default)."""

    blocked_column = "hidden"
    blocked: BlockedCodes

    def __init__(self, hidden_dim: int, params: MemoryParams):
        schema = _common_schema()
        schema.update(
            hidden=(np.dtype(np.float16), (hidden_dim,)), next_token_id=(np.dtype(np.int64), ())
        )
        index = VectorIndex(
            hidden_dim,
            "l2",
            params.exact_max,
            self._hidden_f32,
            params.hnsw_m,
            params.hnsw_ef_construction,
            params.hnsw_ef_search,
            fp16=True,  # the hidden states are float16: exact, and the read scans half the bytes
            approx=params.approx_index,  # type: ignore[arg-type]
            nprobe=params.ivf_nprobe,
        )
        super().__init__(schema, index, BlockedCodes(hidden_dim))
        self.params = params
        self._norms2 = np.zeros(0, dtype=np.float32)  # |hidden|^2 per row

    def _rows_changed(self, start: int) -> None:
        """`EntryStore._rows_changed`, and the new rows' squared norms."""
        super()._rows_changed(start)
        bits = self.col("hidden").view(np.uint16)
        norms2 = np.empty(len(bits), dtype=np.float32)
        norms2[:start] = self._norms2[:start]
        squared_norms(bits, start, norms2)
        self._norms2 = norms2

    def _rows_removed(self, keep: np.ndarray, first: int) -> None:
        """`EntryStore._rows_removed`; the norms compacted, not computed again (evictions take
        the oldest rows: most rows move each turn)."""
        super()._rows_changed(first)
        self._norms2 = self._norms2[keep]

    def nbytes(self) -> int:
        """`EntryStore.nbytes` and the squared norms."""
        return super().nbytes() + self._norms2.nbytes

    def _hidden_f32(self) -> np.ndarray:
        """The hidden states widened to float32 (FAISS builds its index from them after a
        removal)."""
        return _widened(self.col("hidden"))

    def write(
        self, hidden: np.ndarray, next_token_ids: np.ndarray, meta: dict[str, np.ndarray], turn: int
    ) -> int:
        """Append one entry per token (no merge); hidden float16 [T, Dm]."""
        T = len(hidden)
        self.table.append(
            {
                "id": meta["id"],
                "message_id": meta["message_id"],
                "token_id": meta["token_id"],
                "position": meta["position"],
                "turn_written": np.full(T, turn, np.int32),
                "s0": np.ones(T, np.float32),
                "refreshed": np.full(T, turn, np.int32),
                "attention": np.zeros(T, np.float32),
                "ref": np.full(T, -1, np.int64),
                "put": np.ones(T, bool),
                "state": np.zeros(T, bool),
                "hidden": hidden,
                "next_token_id": next_token_ids,
            }
        )
        self.index.append(hidden)
        self._rows_changed(len(self) - T)
        return T

    def _nearest(self, h: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances float32 [Q, k], rows int64 [Q, k]) of the k nearest rows, -1 past
        the table; exact (`kernels.nearest_l2`) up to exact_max rows, else the FAISS index."""
        if self.index.kind != "flat" or len(self) == 0 or k == 0:
            return self.index.search(h, k)
        Q = len(h)
        rows = np.empty((Q, k), dtype=np.int64)
        dist = np.empty((Q, k), dtype=np.float32)
        codes, scale = self.blocked.view(), self.blocked.scale
        bits = self.col("hidden").view(np.uint16)
        for a in range(0, Q, _KNN_QUERY_BLOCK):
            b = min(Q, a + _KNN_QUERY_BLOCK)
            nearest_l2(codes, scale, bits, self._norms2, h[a:b], rows[a:b], dist[a:b])
        return dist, rows

    def search(self, h: np.ndarray, k: int, turn: int) -> KnnResult:
        """Top-k entries by squared L2 distance for hidden states `h` [Q, Dm] (float32,
        C-contiguous)."""
        dist, rows = self._nearest(h, k)
        miss = rows < 0
        r = np.where(miss, 0, rows)
        if len(self) == 0:
            return KnnResult(
                rows.copy(),
                np.full(rows.shape, np.inf, np.float32),
                np.full(rows.shape, -np.inf, np.float32),
                rows,
            )
        ls = log_strength(self.col("s0")[r], self.col("refreshed")[r], turn, self.params.decay)
        ls[miss] = -np.inf
        return KnnResult(
            next_token_ids=np.where(miss, -1, self.col("next_token_id")[r]),
            distances=np.where(miss, np.float32(np.inf), dist).astype(np.float32),
            log_strength=ls,
            ids=np.where(miss, -1, self.col("id")[r]),
        )


# --- the session memory --------------------------------------------------------------------------


class SessionMemory:
    """Memory of one chat session: L x H key slots plus the kNN-LM token store.

    Args:
        n_layers, n_kv_heads, head_dim: L, H, D of the model's attention.
        hidden_dim: Dm, size of the final hidden state (kNN-LM keys).
        params: MemoryParams (defaults if None).
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        hidden_dim: int,
        params: MemoryParams | None = None,
    ):
        if min(n_layers, n_kv_heads, head_dim, hidden_dim) < 1:
            raise ShapeError(
                f"dimensions must be positive: {(n_layers, n_kv_heads, head_dim, hidden_dim)}"
            )
        self.n_layers, self.n_kv_heads, self.head_dim, self.hidden_dim = (
            n_layers,
            n_kv_heads,
            head_dim,
            hidden_dim,
        )
        self.params = params or MemoryParams()
        self.turn = 0
        self.next_id = 0  # next slot entry id (ids are never reused)
        self.next_knn_id = 0
        self.slots = [
            [KeySlot(head_dim, self.params) for _ in range(n_kv_heads)] for _ in range(n_layers)
        ]
        self.knn = KnnStore(hidden_dim, self.params)
        self.storage = StorageState()
        # layer -> (versions of its slots' tables, their column views or None): see
        # `_kernel_columns_of`
        self._tables = [[s.table for s in layer] for layer in self.slots]
        self._kernel_columns: dict[
            int, tuple[list[int], tuple[tuple[np.ndarray, ...], ...] | None]
        ] = {}

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(L, H, D, Dm)."""
        return self.n_layers, self.n_kv_heads, self.head_dim, self.hidden_dim

    def stores(self) -> list[EntryStore]:
        """Every slot (layer-major) then the kNN store."""
        return [s for layer in self.slots for s in layer] + [self.knn]

    def slot(self, layer: int, head: int) -> KeySlot:
        """The slot of (layer, head); IndexError outside the model's dimensions."""
        if not (0 <= layer < self.n_layers and 0 <= head < self.n_kv_heads):
            raise IndexError(
                f"no slot ({layer}, {head}) in a memory of {self.n_layers} x {self.n_kv_heads}"
            )
        return self.slots[layer][head]

    # --- clock ---

    def set_turn(self, turn: int) -> None:
        """Advance the clock; strengths are computed for this turn (nothing is rewritten)."""
        if turn < self.turn:
            raise ValueError(f"turn cannot go back ({turn} < {self.turn})")
        self.turn = int(turn)

    # --- read ---

    def search(
        self, layer: int, queries: npt.ArrayLike, k: int | None = None, with_keys: bool = True
    ) -> SearchResult:
        """Top-k memory entries of every KV head of `layer` for queries float32 [H, Q, D].

        Slots of up to ``exact_max`` entries are searched exactly, all heads together (see
        `_search_exact`); larger ones by their approximate FAISS index (IVF or HNSW). Returns
        ids/scores/log_strength [H, Q, k] and values [H, Q, k, D], and keys [H, Q, k, D] unless
        `with_keys` is False
        (then ``keys`` is None; the attention read does not use them).
        """
        k = self.params.top_k if k is None else int(k)
        q = queries
        # a decoding step's queries pass as they are: this method runs 30 times a token, each
        # time with cold caches (the weights streamed in between), where every statement counts
        if not (
            type(q) is np.ndarray
            and q.dtype == np.float32
            and q.ndim == 3
            and q.shape[0] == self.n_kv_heads
            and q.shape[2] == self.head_dim
            and q.flags.c_contiguous
        ):
            q = _check("queries", queries, (self.n_kv_heads, None, self.head_dim), "f")
            q = np.ascontiguousarray(q, dtype=np.float32)
        H, Q, D = q.shape
        self.slot(layer, 0)  # IndexError outside the model
        if 0 < k and 0 < Q <= _KERNEL_MAX_QUERIES:
            cols = self._kernel_columns_of(layer)
            if cols is not None:
                return self._search_kernel(cols, q, k, with_keys)
        slots = self.slots[layer]
        exact = [h for h, s in enumerate(slots) if len(s) and s.index.kind == "flat"]
        found = self._search_exact(slots, exact, q, k, with_keys) if k and Q and exact else None
        if found is not None and len(exact) == H and found.ids.shape[2] == k:
            return found  # the common case: every head exact and holding k entries or more
        out = SearchResult(
            ids=np.full((H, Q, k), -1, dtype=np.int64),
            scores=np.zeros((H, Q, k), dtype=np.float32),
            log_strength=np.full((H, Q, k), -np.inf, dtype=np.float32),
            values=np.zeros((H, Q, k, D), dtype=np.float32),
            keys=np.zeros((H, Q, k, D), dtype=np.float32) if with_keys else None,
        )
        if k == 0 or Q == 0:
            return out
        for h, slot in enumerate(slots):
            if len(slot) and h not in exact:
                slot.search_into(q[h], k, self.turn, out, h)
        if found is not None:
            kk = found.ids.shape[2]
            out.ids[exact, :, :kk] = found.ids
            out.scores[exact, :, :kk] = found.scores
            out.log_strength[exact, :, :kk] = found.log_strength
            out.values[exact, :, :kk] = found.values
            if out.keys is not None and found.keys is not None:
                out.keys[exact, :, :kk] = found.keys
        return out

    def _kernel_columns_of(self, layer: int) -> tuple[tuple[np.ndarray, ...], ...] | None:
        """The column views `search_heads` reads for the slots of `layer` (blocked keys, ids, s0,
        refreshed, values), or None while one of them is approximate (above exact_max); kept
        while no slot of the layer changed (building them is a tenth of a small memory's read)."""
        tables = self._tables[layer]
        cached = self._kernel_columns.get(layer)
        versions = [t.version for t in tables]  # a slot's size, hence its kind, changes them
        if cached is not None and cached[0] == versions:
            return cached[1]
        slots = self.slots[layer]
        cols: tuple[tuple[np.ndarray, ...], ...] | None = None
        if all(s.index.kind == "flat" for s in slots):
            cols = (
                tuple(s.blocked_keys() for s in slots),
                tuple(s.col("id") for s in slots),
                tuple(s.col("s0") for s in slots),
                tuple(s.col("refreshed") for s in slots),
                tuple(s.col("value").view(np.uint16) for s in slots),
            )
        self._kernel_columns[layer] = (versions, cols)
        return cols

    def _search_kernel(
        self, cols: tuple[tuple[np.ndarray, ...], ...], q: np.ndarray, k: int, with_keys: bool
    ) -> SearchResult:
        """Exact top-k of every slot of a layer (all flat; `cols` from `_kernel_columns_of`) for a
        few queries `q` [H, Q, D], in one compiled call (`kernels.search_heads`); places past a
        slot's entries are misses."""
        H, Q, D = q.shape
        ids = np.empty((H, Q, k), dtype=np.int64)
        scores = np.empty((H, Q, k), dtype=np.float32)
        log_s = np.empty((H, Q, k), dtype=np.float32)
        values = np.empty((H, Q, k, D), dtype=np.float32)
        keys = np.empty((H, Q, k, D), dtype=np.float32) if with_keys else _NO_KEYS
        blocked, id_cols, s0_cols, refreshed_cols, value_cols = cols
        search_heads(
            blocked,
            id_cols,
            s0_cols,
            refreshed_cols,
            value_cols,
            q,
            self.turn,
            math.log(self.params.decay),
            ids,
            scores,
            log_s,
            values,
            keys,
        )
        return SearchResult(
            ids=ids,
            scores=scores,
            log_strength=log_s,
            values=values,
            keys=keys if with_keys else None,
        )

    def _search_exact(
        self, slots: list[KeySlot], heads: list[int], q: np.ndarray, k: int, with_keys: bool
    ) -> SearchResult:
        """Exact top-k of the non-empty slots `heads` (at most exact_max entries each) for queries
        `q` [H, Q, D]: a SearchResult over those heads [len(heads), Q, kk], kk = min(k, size of the
        largest of those slots).

        Per head and block of queries, the scores are a matmul of the slot's own key column (no
        copy of the keys is kept); the rows of every head, padded with -inf to the largest slot,
        go through one `topk_rows`; the hits' columns are then gathered per head. Results equal
        a brute force, ties aside (the order of equal scores is unspecified).
        """
        E, Q, D = len(heads), q.shape[1], q.shape[2]
        sizes = [len(slots[h]) for h in heads]
        kk = min(k, max(sizes))  # beyond the largest slot's size, ids stay -1
        groups, width = topk_layout(max(sizes), kk)
        step = max(1, _SCORE_BLOCK // (E * width))  # queries per block
        ids = np.empty((E, Q, kk), dtype=np.int64)
        scores = np.empty((E, Q, kk), dtype=np.float32)
        s0 = np.empty((E, Q, kk), dtype=np.float32)
        refreshed = np.empty((E, Q, kk), dtype=np.int32)
        values = np.empty((E, Q, kk, D), dtype=np.float16)
        keys = np.empty((E, Q, kk, D), dtype=np.float32) if with_keys else None
        miss: np.ndarray | None = None  # where a slot has fewer than kk entries
        widened = [slots[h].keys_f32() for h in heads]  # once, for every block of queries
        for a in range(0, Q, step):
            b = min(Q, a + step)
            qb = b - a
            # queries as C-contiguous (D, qb) per head: BLAS is twice as fast as with a
            # transposed view; scores land key-major in `buf`, each matmul into a contiguous block
            qt = np.ascontiguousarray(q[:, a:b].transpose(0, 2, 1))
            buf = np.empty((E, width, qb), dtype=np.float32)
            chunk = _gemm_rows(qb, D)
            for i, h in enumerate(heads):
                kcol, size = widened[i], sizes[i]
                for r0 in range(0, size, chunk):
                    r1 = min(size, r0 + chunk)
                    np.matmul(kcol[r0:r1], qt[h], out=buf[i, r0:r1])
                if size < width:
                    buf[i, size:] = -np.inf
            cols, top = topk_rows(buf.transpose(0, 2, 1).reshape(E * qb, width), kk, groups)
            rows = cols.reshape(E, qb, kk)
            scores[:, a:b] = top.reshape(E, qb, kk)
            if min(sizes) < kk:
                short = rows >= np.array(sizes)[:, None, None]  # -inf padding was picked
                if short.any():
                    if miss is None:
                        miss = np.zeros((E, Q, kk), dtype=bool)
                    miss[:, a:b] = short
                    rows = np.where(short, 0, rows)
            for i, h in enumerate(heads):
                slot, r = slots[h], rows[i]
                slot.col("id").take(r, out=ids[i, a:b], mode="clip")
                slot.col("s0").take(r, out=s0[i, a:b], mode="clip")
                slot.col("refreshed").take(r, out=refreshed[i, a:b], mode="clip")
                slot.col("value").take(r, axis=0, out=values[i, a:b], mode="clip")
                if keys is not None:
                    keys[i, a:b] = slot.col("key").take(r, axis=0, mode="clip")
        found = SearchResult(
            ids=ids,
            scores=scores,
            log_strength=log_strength(s0, refreshed, self.turn, self.params.decay),
            values=values.astype(np.float32),
            keys=keys,
        )
        if miss is not None:
            found.ids[miss], found.scores[miss], found.log_strength[miss] = -1, 0.0, -np.inf
            found.values[miss] = 0.0
            if found.keys is not None:
                found.keys[miss] = 0.0
        return found

    def knn_search(self, hidden: npt.ArrayLike, k: int | None = None) -> KnnResult:
        """kNN-LM read: top-k remembered tokens by squared L2 distance of hidden [Q, Dm]."""
        k = self.params.knn_k if k is None else int(k)
        h = _check("hidden", hidden, (None, self.hidden_dim), "f")
        return self.knn.search(np.ascontiguousarray(h, dtype=np.float32), k, self.turn)

    # --- write ---

    def write(
        self,
        keys: npt.ArrayLike,
        values: npt.ArrayLike,
        token_ids: npt.ArrayLike,
        message_ids: npt.ArrayLike,
        positions: npt.ArrayLike,
    ) -> WriteStats:
        """Write the tokens that left the window: pre-RoPE keys and values [L, H, T, D].

        Vectors are rounded to float16 precision; see `KeySlot.write` for the merge rule. Entries
        are written at `self.turn` with strength 1.
        """
        L, H, D = self.n_layers, self.n_kv_heads, self.head_dim
        keys = _check("keys", keys, (L, H, None, D), "f")
        T = keys.shape[2]
        values = _check("values", values, (L, H, T, D), "f")
        meta = self._meta(token_ids, message_ids, positions, T, self.next_id)
        if T == 0:
            return WriteStats()
        self.next_id += T
        k32, v16 = round_f16(keys), values.astype(np.float16)
        norms, unit = key_norms(k32)  # for all slots at once: per slot, the calls cost more
        stats = WriteStats()
        for layer in range(L):
            for head in range(H):
                added, merged = self.slots[layer][head].write(
                    k32[layer, head],
                    v16[layer, head],
                    meta,
                    self.turn,
                    norms[layer, head],
                    unit[layer, head],
                )
                stats.added += added
                stats.merged += merged
        return stats

    def write_knn(
        self,
        hidden: npt.ArrayLike,
        next_token_ids: npt.ArrayLike,
        token_ids: npt.ArrayLike,
        message_ids: npt.ArrayLike,
        positions: npt.ArrayLike,
    ) -> int:
        """Add one kNN-LM entry per token: hidden state [T, Dm] -> next token id [T]. Returns T."""
        h = _check("hidden", hidden, (None, self.hidden_dim), "f")
        T = len(h)
        nxt = _check("next_token_ids", next_token_ids, (T,), "iu").astype(np.int64)
        meta = self._meta(token_ids, message_ids, positions, T, self.next_knn_id)
        self.next_knn_id += T
        return self.knn.write(h.astype(np.float16), nxt, meta, self.turn)

    def _meta(
        self,
        token_ids: npt.ArrayLike,
        message_ids: npt.ArrayLike,
        positions: npt.ArrayLike,
        T: int,
        base: int,
    ) -> dict[str, np.ndarray]:
        return {
            "id": base + np.arange(T, dtype=np.int64),
            "token_id": _check("token_ids", token_ids, (T,), "iu").astype(np.int64),
            "message_id": _check("message_ids", message_ids, (T,), "iu").astype(np.int64),
            "position": _check("positions", positions, (T,), "iu").astype(np.int32),
        }

    # --- strength and removal ---

    def reinforce(self, layer: int, head: int, ids: npt.ArrayLike, mass: npt.ArrayLike) -> int:
        """Record attention `mass` [n] received by entries `ids` [n] of (layer, head).

        Adds to `attention`; if params.reinforce > 0 also s0 <- min(1, s_now + reinforce * mass) and
        refreshed <- turn. Repeated ids add up; -1 and ids no longer present are skipped.
        Returns the number of distinct entries touched.
        """
        ids = _check("ids", ids, (None,), "iu").astype(np.int64)
        mass = _check("mass", mass, (len(ids),), "f")
        return self.slot(layer, head).reinforce(ids, mass, self.turn)

    def evict(self) -> int:
        """Drop entries below the floor and over capacity (weakest first), in all slots and kNN."""
        return sum(s.evict(self.turn, self.params) for s in self.stores())

    def forget_message(self, message_id: int) -> int:
        """Remove every entry of `message_id` (all slots and kNN), leaving no copy of it (see
        `_scrub`); returns how many."""
        return self._forget(lambda store: store.forget_message(int(message_id)))

    def forget_all(self) -> int:
        """Remove every entry, leaving no copy (see `_scrub`); returns how many."""
        return self._forget(lambda store: store.forget_all())

    def _forget(self, drop: Callable[[EntryStore], int]) -> int:
        """`drop` from every store, then `_scrub`; returns the entries removed."""
        sizes = [len(s) for s in self.stores()]
        removed = sum(drop(s) for s in self.stores())
        self._scrub(sizes)
        return removed

    def _scrub(self, sizes: list[int]) -> None:
        """After forgetting, no copy of what was forgotten stays: compaction leaves removed rows
        in the spare buffer rows past the live ones (zeroed), FAISS graphs keep removed vectors
        as tombstones (indexes that shrank are rebuilt from the live rows when next searched),
        and storage chunks hold forgotten payloads next to live ones (those live entries are
        marked to be written again, so the next save deletes the chunks). ``sizes``: each
        store's length before."""
        stores = self.stores()
        dirty: list[int] = []  # chunk refs that hold payloads of forgotten entries
        for store, before in zip(stores, sizes, strict=True):
            for _ids, refs in store.dropped:
                dirty.extend(refs.tolist())
            store.table.zero_spare()
            if len(store) < before:
                store.index.resync(len(store))
        if dirty:
            refs = np.unique(np.asarray(dirty, dtype=np.int64))
            for store in stores:
                store.col("put")[np.isin(store.col("ref"), refs)] = True

    # --- introspection ---

    def entry_count(self) -> int:
        """Entries over all (layer, head) slots (the kNN store not counted)."""
        return sum(len(s) for layer in self.slots for s in layer)

    def slot_size(self, layer: int, head: int) -> int:
        """Entries of one (layer, head) slot."""
        return len(self.slot(layer, head))

    def token_count(self) -> int:
        """kNN entries = remembered tokens."""
        return len(self.knn)

    def nbytes(self) -> int:
        """Approximate RAM of the stored arrays and the FAISS indexes."""
        return sum(s.nbytes() for s in self.stores())

    def mass_by_entry(
        self, layer: int, head: int, ids: npt.ArrayLike, mass: npt.ArrayLike
    ) -> tuple[np.ndarray, np.ndarray]:
        """Attention `mass` summed per entry of slot (layer, head): (ids ascending, float64 sums)
        of the live entries among `ids` (repeats summed; -1 and evicted ids dropped)."""
        found = self.tally_reads(layer, head, ids, mass)
        return found.ids, found.mass

    def tally_reads(
        self,
        layer: int,
        head: int,
        ids: npt.ArrayLike,
        mass: npt.ArrayLike,
        reinforce: bool = False,
    ) -> EntryReads:
        """Reads of slot (layer, head), `ids` [n] with the attention `mass` [n] they got, summed
        per live entry (as `mass_by_entry`) with where each entry came from; with `reinforce` the
        entries are also reinforced (as `reinforce`). One id lookup serves all three."""
        slot = self.slot(layer, head)
        flat_ids = np.asarray(ids, dtype=np.int64).ravel()
        rows, total = slot.mass_by_row(
            flat_ids, _check("mass", np.asarray(mass).ravel(), (len(flat_ids),), "f")
        )
        if reinforce:
            slot.reinforce_rows(rows, total, self.turn)
        return EntryReads(
            ids=slot.col("id")[rows],
            mass=total,
            message_ids=slot.col("message_id")[rows],
            token_ids=slot.col("token_id")[rows],
            positions=slot.col("position")[rows],
        )

    def entry_info(
        self, layer: int, head: int, ids: npt.ArrayLike
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(message_ids int64, token_ids int64, positions int32) of entries `ids` (any shape);
        -1 where an id is absent."""
        slot = self.slot(layer, head)
        ids = np.asarray(ids, dtype=np.int64)
        rows, present = slot.rows_of(ids.ravel())
        if len(slot) == 0:
            missing = np.full(ids.shape, -1, dtype=np.int64)
            return missing, missing.copy(), missing.astype(np.int32)
        out = []
        for name in ("message_id", "token_id", "position"):
            col = slot.col(name)
            out.append(np.where(present, col[rows], -1).astype(col.dtype).reshape(ids.shape))
        return out[0], out[1], out[2]

    def message_stats(self) -> dict[int, MessageMemoryStats]:
        """Per message id: entries, tokens, mean/min strength, earliest turn_written, attention.

        Strength statistics are over the message's slot entries (its kNN entries if it has none).
        """
        slots = [s for layer in self.slots for s in layer]
        cat = {
            name: np.concatenate([s.col(name) for s in slots])
            for name in ("message_id", "s0", "refreshed", "turn_written", "attention")
        }
        s_all = strength(cat["s0"], cat["refreshed"], self.turn, self.params.decay)
        knn_s = strength(
            self.knn.col("s0"), self.knn.col("refreshed"), self.turn, self.params.decay
        )
        mids = np.unique(np.concatenate([cat["message_id"], self.knn.col("message_id")]))
        out: dict[int, MessageMemoryStats] = {}
        slot_groups = _groups(cat["message_id"], mids)
        knn_groups = _groups(self.knn.col("message_id"), mids)
        for i, mid in enumerate(mids.tolist()):
            sel, ksel = slot_groups[i], knn_groups[i]
            s = s_all[sel] if len(sel) else knn_s[ksel]
            tw = cat["turn_written"][sel] if len(sel) else self.knn.col("turn_written")[ksel]
            out[mid] = MessageMemoryStats(
                message_id=mid,
                entries=len(sel),
                tokens=len(ksel),
                mean_strength=float(s.mean()),
                min_strength=float(s.min()),
                turn_written=int(tw.min()),
                attention=float(cat["attention"][sel].sum()),
            )
        return out


def _groups(keys: np.ndarray, uniq: np.ndarray) -> list[np.ndarray]:
    """Row indices of `keys` equal to each value of the sorted `uniq`."""
    order = np.argsort(keys, kind="stable")
    bounds = (
        np.searchsorted(keys[order], uniq, side="left"),
        np.searchsorted(keys[order], uniq, side="right"),
    )
    return [order[a:b] for a, b in zip(*bounds, strict=True)]
