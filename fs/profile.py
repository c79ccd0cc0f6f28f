"""Start-up profiles: the chunks a run read, in first-access order, saved beside the image in its store.

A recording mount notes each (inode, chunk position) it serves; a later cold mount prefetches them in that order,
and a container root turns the files they cover into a local hot layer (`coldbrew.fs.hotlayer`).
"""

from __future__ import annotations

import stat
from array import array

from . import objects
from .errors import FsError
from .index import Chunk, Index

PROFILE_MAGIC = b"CBPROF\x00\x01"


def profile_name(reference: str) -> str:
    """The store's name for an image's profile (a mutable named file: a new recording replaces it)."""
    return f"profiles/{reference}"


class ProfileRecorder:
    """The chunks a run reads, in first-access order, as (inode, chunk position) pairs of this image."""

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self._order = array("I")

    def note(self, ino: int, position: int) -> None:
        key = (ino << 32) | position
        if key not in self._seen:
            self._seen.add(key)
            self._order.extend((ino, position))

    def __len__(self) -> int:
        return len(self._order) // 2

    def serialize(self) -> bytes:
        return PROFILE_MAGIC + objects.compress(self._order.tobytes())


def parse_profile(data: bytes, index: Index) -> list[tuple[int, Chunk]]:
    """(inode, chunk) pairs of a saved profile, in order; entries that do not fit this image are dropped."""
    if not data.startswith(PROFILE_MAGIC):
        raise FsError("start-up profile: not a coldbrew profile")
    import zstandard

    # A profile names each chunk reference of the image at most once: bound what it may decompress to.
    limit = 8 * index.chunk_count
    try:
        raw = zstandard.ZstdDecompressor().decompress(data[len(PROFILE_MAGIC):], max_output_size=limit)
    except zstandard.ZstdError as error:
        raise FsError(f"start-up profile: does not decompress ({error})") from None
    pairs = array("I")
    pairs.frombytes(raw[: len(raw) - len(raw) % 8])
    files: dict[int, list[Chunk]] = {}
    result = []
    for k in range(0, len(pairs), 2):
        ino, position = pairs[k], pairs[k + 1]
        if not (1 <= ino <= index.entries and stat.S_ISREG(index.mode(ino))):
            continue
        chunks = files.get(ino)
        if chunks is None:
            chunks = files[ino] = index.chunks(ino)
        if position < len(chunks):
            result.append((ino, chunks[position]))
    return result
