"""Content-addressed objects: named by the blake3 hash of their raw bytes, stored zstd-compressed.

The name is the hash of the *uncompressed* data, so dedupe never depends on compression settings, and every
object read back is decompressed (bounded by the size the reader expects) and hashed before anyone uses it.
"""

from __future__ import annotations

import threading

import blake3
import zstandard

from .errors import BadReference, CorruptChunk

DIGEST_SIZE = 32
COMPRESSION_LEVEL = 3
# Above this size blake3 hashes on several threads; below it the thread start costs more than it saves.
_PARALLEL_HASH_MIN = 1 << 20


def digest_of(data: bytes | memoryview) -> bytes:
    """The blake3 hash that names `data`."""
    if len(data) >= _PARALLEL_HASH_MIN:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()
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


def decompress(data: bytes, max_size: int) -> bytes:
    """The bytes of one zstd frame; ValueError when it is not one or would exceed `max_size` (a frame that states
    its size is refused before anything is allocated: zstandard would allocate what it states)."""
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as error:
        raise ValueError(f"not a zstd frame ({error})") from None
    if params.content_size != zstandard.CONTENTSIZE_UNKNOWN and params.content_size > max_size:
        raise ValueError(f"claims {params.content_size} bytes, at most {max_size} expected")
    try:
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=max_size)
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


def parse_reference(text: str) -> bytes:
    """An image reference (64 hex digits, optionally prefixed `blake3:`) as a digest."""
    hex_digits = text.removeprefix("blake3:")
    if len(hex_digits) != 2 * DIGEST_SIZE:
        raise BadReference(f"image reference {text!r}: expected 64 hex digits of a blake3 hash")
    try:
        return bytes.fromhex(hex_digits)
    except ValueError:
        raise BadReference(f"image reference {text!r}: not hexadecimal") from None
