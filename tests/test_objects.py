"""Content-addressed objects read from a stream: whatever the pieces the bytes arrive in, the object or an error."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coldbrew.fs import objects
from coldbrew.fs.errors import CorruptChunk


class _Pieces:
    """A stream that hands over its bytes in the given piece sizes (as a network does), then what is left."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self._data = io.BytesIO(data)
        self._sizes = iter(sizes)

    def read(self, size: int) -> bytes:
        return self._data.read(min(size, next(self._sizes, size)))

    def close(self) -> None:
        pass


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=1 << 16) | st.builds(lambda byte, count: byte * count, st.binary(min_size=1, max_size=4),
                                                   st.integers(0, 1 << 18)),
       sizes=st.lists(st.integers(1, 1 << 14), max_size=40), cut=st.integers(0, 1 << 20), flip=st.integers(0, 1 << 20))
def test_a_streamed_object_decodes_to_its_bytes_or_is_refused(raw: bytes, sizes: list[int], cut: int,
                                                             flip: int) -> None:
    digest, stored = objects.encode(raw)
    assert objects.decode_stream(digest, _Pieces(stored, sizes), len(raw)) == raw
    damaged = bytearray(stored[: cut % (len(stored) + 1)])
    if damaged:
        damaged[flip % len(damaged)] ^= 0x55
    try:
        decoded = objects.decode_stream(digest, _Pieces(bytes(damaged), sizes), 1 << 20)
    except CorruptChunk as error:
        assert digest.hex() in str(error)
    else:
        assert decoded == raw  # a damaged frame may still carry the right bytes; never other ones


def test_a_frame_claiming_more_than_allowed_is_refused_before_it_is_read() -> None:
    digest, stored = objects.encode(b"x" * 1000)
    stream = _Pieces(stored, [])
    with pytest.raises(CorruptChunk, match="claims 1000 bytes, at most 999"):
        objects.decode_stream(digest, stream, 999)
    assert stream._data.tell() < 20  # its header only


def test_a_frame_without_its_size_is_read_whole() -> None:
    import zstandard

    raw = b"no size stated" * 100
    stored = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    assert objects.decode_stream(objects.digest_of(raw), _Pieces(stored, [3, 5]), len(raw)) == raw
    with pytest.raises(CorruptChunk, match="does not decompress"):  # bounded all the same
        objects.decode_stream(objects.digest_of(raw), _Pieces(stored, []), len(raw) - 1)
