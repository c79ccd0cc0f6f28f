"""Start-up profiles: the chunks a run read, in first-access order, saved beside the image in its store together
with the chunks themselves, packed.

A recording mount notes each (inode, chunk position) it serves. A later cold mount fetches the pack in a few large
requests instead of one per chunk, prefetches what the run will read, and a container root turns the files the
profile reads whole into a local hot layer (`coldbrew.fs.hotlayer`).

A profile file is `PROFILE_MAGIC`, the length of its head (u32) and the head, one zstd frame: the digest of the
image's stored EROFS metadata image (`coldbrew.fs.erofs`; zeros when it has none), so that a host fetches it while
the index downloads, the number of pairs (u32), the (inode, position) pairs (u32 each), the number of packed chunks
(u32) and the pack's table, a (32-byte digest, u32 length, u32 stored size, u8 flags) record per distinct chunk in
first-access order, flag `HOT` on the chunks of files read whole. The pack follows: each chunk's stored bytes (one
zstd frame, as in the store), back to back in table order. A host reads the head alone first (one small range), then
the pack in ranges.

A profile is a mutable file, not content-addressed: it only decides what is fetched early and how. Every packed
chunk is verified against its digest before use, what a hot layer holds comes from the index, and a metadata image
is used only if the index names the same.
"""

from __future__ import annotations

import stat
import struct
from array import array
from dataclasses import dataclass
from typing import Callable

from . import objects
from .errors import FsError
from .index import MAX_CHUNK_SIZE, Chunk, Index
from .store import ChunkStore, read_up_to

PROFILE_MAGIC = b"CBPROF\x00\x04"
# What a head may decompress to when no index bounds it (pairs and table of over a million chunks).
MAX_PROFILE_SIZE = 1 << 26
# The first read of a profile file, made while the index downloads: small, since what it reads past the head is
# read again with the pack. A longer head (a torch start's) costs one more read.
HEAD_READ = 32 << 10
HOT = 1
# The most a stored chunk can be: zstd's bound for the largest chunk, with room to spare.
MAX_STORED_SIZE = MAX_CHUNK_SIZE + (MAX_CHUNK_SIZE >> 7) + (1 << 16)
_COUNT = struct.Struct("<I")
_TABLE_ENTRY = struct.Struct(f"<{objects.DIGEST_SIZE}sIIB")
_PREFIX = len(PROFILE_MAGIC) + _COUNT.size
_NO_IMAGE = bytes(objects.DIGEST_SIZE)


@dataclass(frozen=True, slots=True)
class PackedChunk:
    """A chunk in a profile's pack: its `stored` bytes lie at `offset` of the profile file."""

    digest: bytes
    length: int
    offset: int
    stored: int
    hot: bool


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

    def serialize(self, index: Index, stored_chunk: Callable[[Chunk], bytes | None],
                  metadata_image: bytes | None = None) -> bytes:
        """The profile file; `stored_chunk` gives a chunk's stored bytes, or None to leave it out of the pack;
        `metadata_image`: the digest of the image's stored metadata image."""
        profile = _resolve(self._order, index)
        whole = files_read_whole(profile, index)
        hot: dict[bytes, bool] = {}
        chunks: list[Chunk] = []
        for ino, chunk in profile:
            if chunk.digest not in hot:
                chunks.append(chunk)
            hot[chunk.digest] = hot.get(chunk.digest, False) or ino in whole
        table, pack = [], []
        for chunk in chunks:
            stored = stored_chunk(chunk)
            if stored is not None:
                table.append(_TABLE_ENTRY.pack(chunk.digest, chunk.length, len(stored), HOT if hot[chunk.digest] else 0))
                pack.append(stored)
        head = objects.compress(b"".join([metadata_image or _NO_IMAGE, _COUNT.pack(len(self)), self._order.tobytes(),
                                          _COUNT.pack(len(table)), *table]))
        return b"".join([PROFILE_MAGIC, _COUNT.pack(len(head)), head, *pack])


def fetch_head(store: ChunkStore, reference: str) -> bytes | None:
    """The head of an image's profile (its first bytes, up to the pack: what `parse_profile` and `packed_chunks`
    read), or None when the store has none. Raises FsError."""
    name = profile_name(reference)
    head = _read(store, name, 0, HEAD_READ)
    if head is None:
        return None
    end = _head_end(head)
    if end > len(head):
        head += _read(store, name, len(head), end) or b""
    if len(head) < end:
        raise FsError("start-up profile: truncated")
    return head[:end]


def parse_profile(head: bytes, index: Index) -> list[tuple[int, Chunk]]:
    """(inode, chunk) pairs of a saved profile, in order; entries that do not fit this image are dropped."""
    # Each chunk reference of the image at most once in the pairs, and each chunk at most once in the table.
    _, pairs, _ = _sections(head, objects.DIGEST_SIZE + 2 * _COUNT.size + (8 + _TABLE_ENTRY.size) * index.chunk_count)
    order = array("I")
    order.frombytes(pairs)
    return _resolve(order, index)


def packed_chunks(head: bytes) -> list[PackedChunk]:
    """The chunks of the profile's pack, in order. A record no chunk can have (a length or size out of bounds) is
    left out, so a bad profile cannot make a fetch decompress more than a chunk."""
    _, _, table = _sections(head, MAX_PROFILE_SIZE)
    chunks = []
    offset = _head_end(head)
    for digest, length, stored, flags in _TABLE_ENTRY.iter_unpack(table):
        if 0 < length <= MAX_CHUNK_SIZE and 0 < stored <= MAX_STORED_SIZE:
            chunks.append(PackedChunk(digest, length, offset, stored, bool(flags & HOT)))
        offset += stored
    return chunks


def metadata_image(head: bytes) -> bytes | None:
    """The digest of the metadata image that the profile names, or None; the index must name the same (raises
    FsError)."""
    digest, _, _ = _sections(head, MAX_PROFILE_SIZE)
    return None if digest == _NO_IMAGE else digest


def files_read_whole(profile: list[tuple[int, Chunk]], index: Index) -> dict[int, list[Chunk]]:
    """inode -> chunks of the files (in first-read order) of which the profile reads every chunk: a hot layer's."""
    read: dict[int, set[int]] = {}
    for ino, chunk in profile:
        read.setdefault(ino, set()).add(chunk.offset)
    files = {ino: index.chunks(ino) for ino in read}
    return {ino: chunks for ino, chunks in files.items() if len(read[ino]) == len(chunks)}


def _read(store: ChunkStore, name: str, start: int, end: int) -> bytes | None:
    stream = store.read_named(name, start, end)
    if stream is None:
        return None
    try:
        return read_up_to(stream, end - start)
    finally:
        stream.close()


def _head_end(data: bytes) -> int:
    """Where a profile's head ends (and its pack begins), from its first bytes; raises FsError."""
    if len(data) < _PREFIX or not data.startswith(PROFILE_MAGIC):
        raise FsError("start-up profile: not a coldbrew profile of this version (record it again)")
    length = _COUNT.unpack_from(data, len(PROFILE_MAGIC))[0]
    if length > MAX_PROFILE_SIZE:
        raise FsError(f"start-up profile: its head of {length} bytes is too large")
    return _PREFIX + length


def _sections(data: bytes, limit: int) -> tuple[bytes, bytes, bytes]:
    """(the metadata image's digest, the pairs, the pack's table) of a profile (its head, or the whole file), each cut
    to whole records; raises FsError."""
    try:
        raw = objects.decompress(data[_PREFIX: _head_end(data)], limit)
    except ValueError as error:
        raise FsError(f"start-up profile: {error}") from None
    pairs_start = objects.DIGEST_SIZE + _COUNT.size
    if len(raw) < pairs_start:
        raise FsError("start-up profile: truncated")
    end = pairs_start + 8 * _COUNT.unpack_from(raw, objects.DIGEST_SIZE)[0]
    if end + _COUNT.size > len(raw):
        raise FsError("start-up profile: holds fewer pairs than it says")
    table = raw[end + _COUNT.size:]
    return raw[:objects.DIGEST_SIZE], raw[pairs_start: end], table[: len(table) - len(table) % _TABLE_ENTRY.size]


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
