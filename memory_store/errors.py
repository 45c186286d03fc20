"""Typed errors of memory_store; everything raised on purpose derives from `MemoryStoreError`."""


class MemoryStoreError(Exception):
    """Base class of the errors raised by memory_store."""


class SessionNotFound(MemoryStoreError, KeyError):
    """No chat session row with the given id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "session not found"


class CorruptMemory(MemoryStoreError):
    """Stored memory cannot be decoded (blob size mismatch, inconsistent rows): fail loudly."""


class ShapeError(MemoryStoreError, ValueError):
    """An array has the wrong shape or dtype kind, or stored dimensions differ from those asked."""


class StaleMemory(MemoryStoreError):
    """The in-memory object does not continue the database's last save (a save was rolled back, or
    another writer saved in between): reload it with `load_memory` before saving again."""


class InvalidExport(MemoryStoreError):
    """A session export document that `import_session` refuses (wrong format or version, checksum
    mismatch, unknown or missing tables or columns, wrong types, undecodable or mis-sized blobs,
    duplicate keys, rows that do not load as a memory); nothing was imported.

    `table`, `row` (index in the document's list) and `column` locate the fault where there is one.
    """

    def __init__(
        self,
        message: str,
        *,
        table: str | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        super().__init__(message)
        self.table, self.row, self.column = table, row, column
