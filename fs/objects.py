"""Content-addressed objects: named by the blake3 hash of their raw bytes, stored zstd-compressed.

The name is the hash of the *uncompressed* data, so dedupe never depends on compression settings, and every
object read back is decompressed (bounded by the size the reader expects) and hashed before anyone uses it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import blake3
import zstandard

from .errors import BadReference, CorruptChunk

if TYPE_CHECKING:
    from .store import ByteStream

DIGEST_SIZE = 32
COMPRESSION_LEVEL = 3
# ZSTD_FRAMEHEADERSIZE_MAX: the bytes of a frame that state its size.
_FRAME_HEADER_MAX = 18


def digest_of(data: bytes | memoryview) -> bytes:
    """The blake3 hash that names `data`."""
    # On this thread alone: objects are hashed on several threads already (push, fetch), and blake3's own threads
    # would contend with them for the same CPUs (a cold start's 60 MB of 1 MiB chunks: 15% more CPU, and worse
    # while its threads spin on a busy host).
    return blake3.blake3(data).digest()


_per_thread = threading.local()


def compress(data: bytes | memoryview, level: int = COMPRESSION_LEVEL) -> bytes:
    # A compressor per thread and level: making one allocates its context (as much work as a small file's data).
    compressors = _per_thread.__dict__.setdefault("compressors", {})
    compressor = compressors.get(level)
    if compressor is None:
        # write_content_size lets a reader see the frame's claimed size before it allocates anything.
        compressor = compressors[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return compressor.compress(data)


def encode(data: bytes | memoryview, level: int = COMPRESSION_LEVEL) -> tuple[bytes, bytes]:
    """(digest, stored bytes) of raw data."""
    return digest_of(data), compress(data, level)


def _stated_size(frame_start: bytes, max_size: int) -> int | None:
    """The size a zstd frame states in its header (None: it states none); ValueError when `frame_start` is no
    frame's start or the size exceeds `max_size` (zstandard would allocate what a frame states)."""
    try:
        size = zstandard.get_frame_parameters(frame_start).content_size
    except zstandard.ZstdError as error:
        raise ValueError(f"not a zstd frame ({error})") from None
    if size == zstandard.CONTENTSIZE_UNKNOWN:
        return None
    if size > max_size:
        raise ValueError(f"claims {size} bytes, at most {max_size} expected")
    return size


def decompress(data: bytes, max_size: int) -> bytes:
    """The bytes of one zstd frame; ValueError when it is not one or would exceed `max_size` (a frame that states
    its size is refused before anything is allocated)."""
    _stated_size(data, max_size)
    decompressor = _per_thread.__dict__.get("decompressor")
    if decompressor is None:  # one per thread, as compressors: making one costs 10 times a small chunk's decoding
        decompressor = _per_thread.decompressor = zstandard.ZstdDecompressor()
    try:
        return decompressor.decompress(data, max_output_size=max_size)
    except zstandard.ZstdError as error:
        raise ValueError(f"does not decompress ({error})") from None


def decode(digest: bytes, stored: bytes, max_size: int) -> bytes:
    """The raw bytes of a stored object, checked against its name. Raises CorruptChunk, never returns wrong bytes."""
    try:
        raw = decompress(stored, max_size)
    except ValueError as error:
        raise CorruptChunk(digest, str(error)) from None
    if digest_of(raw) != digest:
        raise CorruptChunk(digest, f"its data hashes to {digest_of(raw).hex()}")
    return raw


def decode_stream(digest: bytes, stream: ByteStream, max_size: int) -> bytes | bytearray:
    """`decode` of an object read from a stream (`ChunkStore.stream`): decompressed into place and hashed as its
    bytes arrive, so that little is left to do after the last one. Raises CorruptChunk, never returns wrong bytes;
    the stream's own errors (StoreUnavailable) go through."""
    head = b""
    while len(head) < _FRAME_HEADER_MAX and (part := stream.read(_FRAME_HEADER_MAX - len(head))):
        head += part
    try:
        size = _stated_size(head, max_size)
    except ValueError as error:
        raise CorruptChunk(digest, str(error)) from None
    if size is None:  # a frame that does not state its size: read it whole
        parts = [head]
        while part := stream.read(1 << 20):
            parts.append(part)
        return decode(digest, b"".join(parts), max_size)
    raw = bytearray(size)
    view = memoryview(raw)
    hasher = blake3.blake3()
    filled = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(_Prefixed(head, stream), closefd=False) as reader:
            while filled < size and (count := reader.readinto(view[filled:])):
                hasher.update(view[filled: filled + count])
                filled += count
    except zstandard.ZstdError as error:
        raise CorruptChunk(digest, f"does not decompress ({error})") from None
    if filled < size:
        raise CorruptChunk(digest, f"ends after {filled} of the {size} bytes it claims")
    if hasher.digest() != digest:
        raise CorruptChunk(digest, f"its data hashes to {hasher.hexdigest()}")
    return raw


class _Prefixed:
    """A stream whose first bytes were read already (`head`), as a source for zstandard's stream reader."""

    def __init__(self, head: bytes, stream: ByteStream) -> None:
        self._head = head
        self._stream = stream

    def read(self, size: int) -> bytes:
        if self._head:
            part, self._head = self._head[:size], self._head[size:]
            return part
        return self._stream.read(size)


def parse_reference(text: str) -> bytes:
    """An image reference (64 hex digits, optionally prefixed `blake3:`) as a digest."""
    hex_digits = text.removeprefix("blake3:")
    if len(hex_digits) != 2 * DIGEST_SIZE:
        raise BadReference(f"image reference {text!r}: expected 64 hex digits of a blake3 hash")
    try:
        return bytes.fromhex(hex_digits)
    except ValueError:
        raise BadReference(f"image reference {text!r}: not hexadecimal") from None
