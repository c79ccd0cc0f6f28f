"""Errors raised by the image filesystem; each message is meant for the operator and names what is wrong."""

from __future__ import annotations


class FsError(Exception):
    """Base class: any error `coldbrew.fs` reports instead of a traceback."""


class BadIndex(FsError):
    """An image index is malformed or hostile; `where` names the table and position."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        self.message = message
        super().__init__(f"image index: {where}: {message}" if where else f"image index: {message}")


class ChunkMissing(FsError):
    """The store has no object under this hash."""

    def __init__(self, digest: bytes, store: str) -> None:
        self.digest = digest
        super().__init__(f"chunk {digest.hex()} is not in {store}")


class CorruptChunk(FsError):
    """An object's bytes do not decompress or do not hash to its name: it is never used."""

    def __init__(self, digest: bytes, reason: str) -> None:
        self.digest = digest
        super().__init__(f"chunk {digest.hex()} is corrupt: {reason}")


class StoreUnavailable(FsError):
    """The store could not be reached (after the retries the store allows)."""


class BadReference(FsError):
    """An image reference that is not a 64-digit blake3 hex digest, or names no image in the store."""
