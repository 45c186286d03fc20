"""Tunable parameters of one session's memory (`MemoryParams`), kept as JSON in the session row."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MemoryParams:
    """Read, write, decay and index settings of a session memory.

    Strength of an entry at turn ``t`` is ``s0 * decay ** (t - refreshed_turn)``; it is computed
    from the entry's age, so advancing the clock rewrites nothing.
    """

    top_k: int = 16  # neighbours per query per (layer, KV head)
    merge_threshold: float = 0.98  # cosine of keys above which a new entry merges into an old one
    merge_weight: float = 0.5  # w in m <- m + w (h - m)
    decay: float = 0.95  # gamma per turn: s = s0 * gamma ** (turn - refreshed_turn)
    floor: float = 0.02  # evict entries whose current strength is below this
    capacity: int = (
        65536  # max entries per (layer, KV head) and for the kNN store; weakest evicted first
    )
    reinforce: float = 0.0  # s0 <- min(1, s_now + reinforce * attention_mass), refreshed <- turn
    exact_max: int = 20000  # exact IndexFlatIP / IndexFlatL2 up to this many entries
    approx_index: str = "ivf"  # above exact_max: "ivf" (IndexIVFFlat) or "hnsw" (IndexHNSWFlat)
    knn_k: int = 16  # neighbours of the output-level (kNN-LM) read
    ivf_nprobe: int = 32  # IVF lists scanned per query (of about sqrt(entries) lists)
    # HNSW settings, used only above exact_max; efSearch is raised to k when k is larger.
    hnsw_m: int = 32  # graph degree: recall vs RAM (about 2 * m * 4 bytes per entry)
    hnsw_ef_construction: int = 64  # build-time beam width
    hnsw_ef_search: int = 128  # query-time beam width

    def __post_init__(self) -> None:
        checks = {
            "top_k": self.top_k >= 1,
            "merge_threshold": -1.0 <= self.merge_threshold,  # > 1 disables merging
            "merge_weight": 0.0 <= self.merge_weight <= 1.0,
            "decay": 0.0 < self.decay <= 1.0,
            "floor": 0.0 <= self.floor < 1.0,
            "capacity": self.capacity >= 1,
            "reinforce": self.reinforce >= 0.0,
            "exact_max": self.exact_max >= 1,
            "approx_index": self.approx_index in ("ivf", "hnsw"),
            "ivf_nprobe": self.ivf_nprobe >= 1,
            "knn_k": self.knn_k >= 1,
            "hnsw_m": self.hnsw_m >= 2,
            "hnsw_ef_construction": self.hnsw_ef_construction >= 1,
            "hnsw_ef_search": self.hnsw_ef_search >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid MemoryParams: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field, for the session row's JSON column."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MemoryParams:
        """Inverse of `to_dict`; missing fields take defaults, unknown fields raise ValueError."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MemoryParams fields: {unknown}")
        return cls(**data)
