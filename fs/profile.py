"""Start-up profiles: the chunks a run read, in first-access order, saved beside the image in its store.

A recording mount notes each (inode, chunk position) it serves; a later cold mount prefetches them in that order,
and a container root turns the files they cover whole into a local hot layer (`coldbrew.fs.hotlayer`).

A profile is `PROFILE_MAGIC` and one zstd frame: the number of pairs (u32), the (inode, position) pairs (u32
each), then the hot layer's chunks as the recorder saw them (32-byte digest, u32 length each), so that a host
can fetch them while it fetches the image's index. A profile is a mutable file, not content-addressed: that list
only decides what is fetched early (every chunk is still verified against its digest); what a hot layer holds
comes from the index. Version 1 profiles (pairs alone) are still read.
"""

from __future__ import annotations

import stat
import struct
from array import array

from . import objects
from .errors import FsError
from .index import MAX_CHUNK_SIZE, Chunk, Index

PROFILE_MAGIC = b"CBPROF\x00\x02"
_PROFILE_MAGIC_V1 = b"CBPROF\x00\x01"
# What a profile may decompress to when no index bounds it (pairs and listed chunks of over a million chunks).
MAX_PROFILE_SIZE = 1 << 26
_COUNT = struct.Struct("<I")
_LISTED_CHUNK = struct.Struct(f"<{objects.DIGEST_SIZE}sI")


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

    def serialize(self, index: Index) -> bytes:
        profile = _resolve(self._order, index)
        whole = files_read_whole(profile, index)
        listed = b"".join(_LISTED_CHUNK.pack(chunk.digest, chunk.length) for ino, chunk in profile if ino in whole)
        return PROFILE_MAGIC + objects.compress(_COUNT.pack(len(self)) + self._order.tobytes() + listed)


def parse_profile(data: bytes, index: Index) -> list[tuple[int, Chunk]]:
    """(inode, chunk) pairs of a saved profile, in order; entries that do not fit this image are dropped."""
    # Each chunk reference of the image at most once, in the pairs and in the list.
    pairs, _ = _sections(data, _COUNT.size + (8 + _LISTED_CHUNK.size) * index.chunk_count)
    order = array("I")
    order.frombytes(pairs)
    return _resolve(order, index)


def hot_chunks(data: bytes) -> dict[bytes, int]:
    """digest -> length of the chunks the recorder listed for the hot layer (none in a version 1 profile); a
    length no chunk can have is dropped, so a bad profile cannot make a fetch decompress more than a chunk."""
    _, listed = _sections(data, MAX_PROFILE_SIZE)
    return {digest: length for digest, length in _LISTED_CHUNK.iter_unpack(listed) if 0 < length <= MAX_CHUNK_SIZE}


def files_read_whole(profile: list[tuple[int, Chunk]], index: Index) -> dict[int, list[Chunk]]:
    """inode -> chunks of the files (in first-read order) of which the profile reads every chunk: a hot layer's."""
    read: dict[int, set[int]] = {}
    for ino, chunk in profile:
        read.setdefault(ino, set()).add(chunk.offset)
    files = {ino: index.chunks(ino) for ino in read}
    return {ino: chunks for ino, chunks in files.items() if len(read[ino]) == len(chunks)}


def _sections(data: bytes, limit: int) -> tuple[bytes, bytes]:
    """(the pairs, the listed chunks) of a profile, each cut to whole records; raises FsError."""
    version_1 = data.startswith(_PROFILE_MAGIC_V1)
    if not (version_1 or data.startswith(PROFILE_MAGIC)):
        raise FsError("start-up profile: not a coldbrew profile")
    try:
        raw = objects.decompress(data[len(PROFILE_MAGIC):], limit)
    except ValueError as error:
        raise FsError(f"start-up profile: {error}") from None
    if version_1:
        return raw[: len(raw) - len(raw) % 8], b""
    if len(raw) < _COUNT.size:
        raise FsError("start-up profile: truncated")
    end = _COUNT.size + 8 * _COUNT.unpack_from(raw)[0]
    if end > len(raw):
        raise FsError("start-up profile: holds fewer pairs than it says")
    listed = raw[end:]
    return raw[_COUNT.size: end], listed[: len(listed) - len(listed) % _LISTED_CHUNK.size]


def _resolve(order: array, index: Index) -> list[tuple[int, Chunk]]:
    files: dict[int, list[Chunk]] = {}
    result = []
    for k in range(0, len(order), 2):
        ino, position = order[k], order[k + 1]
        if not (1 <= ino <= index.entries and stat.S_ISREG(index.mode(ino))):
            continue
        chunks = files.get(ino)
        if chunks is None:
            chunks = files[ino] = index.chunks(ino)
        if position < len(chunks):
            result.append((ino, chunks[position]))
    return result
