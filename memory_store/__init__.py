"""memchat's external memory as a library: numpy + FAISS + SQLAlchemy, no model code.

See docs/memory_store_api.md for the contract with `app/`.
"""

from .errors import (
    CorruptMemory,
    InvalidExport,
    MemoryStoreError,
    SessionNotFound,
    ShapeError,
    StaleMemory,
)
from .params import MemoryParams
from .store import (
    EntryReads,
    KnnResult,
    MessageMemoryStats,
    SearchResult,
    SessionMemory,
    WriteStats,
)
from .transfer import export_session, import_session

__all__ = [
    "CorruptMemory",
    "EntryReads",
    "InvalidExport",
    "KnnResult",
    "MemoryParams",
    "MemoryStoreError",
    "MessageMemoryStats",
    "SearchResult",
    "SessionMemory",
    "SessionNotFound",
    "ShapeError",
    "StaleMemory",
    "WriteStats",
    "export_session",
    "import_session",
]
