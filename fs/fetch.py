"""Chunk fetching for a mount: the local cache first, else the store, once per chunk however many readers wait.
A start-up profile's chunks come in a few large requests instead (`fetch_packed`): ranges of the profile's pack.

Runs on trio. Everything that blocks (the cache's files and lmdb, the store's I/O, zstd and blake3, which release
the GIL) runs on worker threads; store fetches are bounded by a capacity limiter, and background fetches
(read-ahead, profile prefetch) take at most a fraction of it so that a reader always finds a free slot.

Errors never reach a reader as bytes: a chunk that is missing, corrupt or truncated, or a store that cannot be
reached, is logged with the chunk's digest and answered with EIO; nothing is remembered, so the next read tries
again and works once the store is back.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections import OrderedDict
from typing import Callable

import pyfuse3
import trio

from . import objects
from .cache import ChunkCache
from .errors import FsError
from .profile import PackedChunk
from .store import ByteStream, ChunkStore, read_up_to

log = logging.getLogger("coldbrew.fs")

# Digests known to be in the cache, remembered so read-ahead does not ask the cache again; bounded memory.
_KNOWN_CACHED_LIMIT = 1 << 20
# Chunks loaded ahead of a sequential reader wait in memory, up to this many bytes: a warm sequential read is
# then served from memory while the next chunks' files are read from disk in parallel.
AHEAD_BYTES = 64 << 20
# A pack is read in ranges of about this many bytes, PACK_STREAMS at a time, in order. On the benchmark's shaped
# link, 10.6 MB came in 288 ms as 166 chunk GETs on 16 connections, 205-244 ms as one GET, 128-156 ms as two.
PACK_STREAMS = 2
PACK_RANGE_BYTES = 4 << 20
PACK_MIN_RANGE_BYTES = 256 << 10  # less is not worth a request of its own
# Chunks a range does not want (cached already) are read and dropped when fewer bytes than this lie between
# wanted ones; a longer gap ends the range.
PACK_GAP_BYTES = 1 << 20


class _Flight:
    """One fetch of one chunk that any number of readers wait for."""

    __slots__ = ("done", "data", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class ChunkFetcher:
    """Raw, verified chunk data for a mount. Call from the trio thread only."""

    def __init__(self, store: ChunkStore, cache: ChunkCache, *, concurrency: int = 16,
                 background_concurrency: int | None = None) -> None:
        self._store = store
        self._cache = cache
        self._limiter = trio.CapacityLimiter(concurrency)
        self._background = trio.CapacityLimiter(background_concurrency or max(1, concurrency // 2))
        self._flights: dict[bytes, _Flight] = {}
        self._known_cached: set[bytes] = set()
        self._ahead: OrderedDict[bytes, bytes] = OrderedDict()
        self._ahead_bytes = 0
        self._loading: set[bytes] = set()
        self._nursery: trio.Nursery | None = None
        self.bytes_fetched = 0  # stored (compressed) bytes read from the store
        self.chunk_bytes_fetched = 0  # raw bytes those chunks hold
        self.chunks_fetched = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.fetch_errors = 0
        self.background_fetched = 0
        self.ahead_hits = 0  # reads served from chunks loaded ahead (those loads count as cache hits or fetches)
        self.packed_chunks = 0  # chunks fetched in ranges of a profile's pack (counted in chunks_fetched too)
        self.pack_ranges = 0
        # Called with the digest of each chunk fetched and cached, on the worker thread that cached it, before the
        # chunk's readers wake: work that needs the chunk's cache file costs no thread hop of its own.
        self.on_cached: Callable[[bytes], None] | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Where background work (read-ahead) runs; without one, read-ahead is skipped."""
        self._nursery = nursery

    def stats(self) -> dict[str, int]:
        return {"bytes_fetched": self.bytes_fetched, "chunk_bytes_fetched": self.chunk_bytes_fetched,
                "chunks_fetched": self.chunks_fetched, "cache_hits": self.cache_hits,
                "cache_misses": self.cache_misses, "fetch_errors": self.fetch_errors, "ahead_hits": self.ahead_hits,
                "packed_chunks": self.packed_chunks, "pack_ranges": self.pack_ranges,
                "fetches_in_flight": len(self._flights)}

    async def read(self, digest: bytes, length: int, offset: int, size: int) -> bytes | memoryview:
        """`size` bytes at `offset` of a chunk of `length` bytes."""
        ahead = self._ahead.get(digest)
        if ahead is not None:
            self.ahead_hits += 1
            self._ahead.move_to_end(digest)
            return ahead if offset == 0 and size == length else memoryview(ahead)[offset: offset + size]
        # The whole chunk, kept in memory: the kernel reads a chunk in several requests (page faults of a mapped
        # library come in read-ahead windows, in any order), and the later ones then cost no worker-thread hop.
        data = await self.chunk(digest, length)
        self._keep(digest, data)
        return memoryview(data)[offset: offset + size]

    async def chunk(self, digest: bytes, length: int, *, background: bool = False) -> bytes:
        """The whole chunk. Raises pyfuse3.FUSEError(EIO) when it cannot be had intact."""
        flight = self._flights.get(digest)
        if flight is None:
            flight = self._flights[digest] = _Flight()
            await self._fly(digest, length, flight, background)
        else:
            await flight.done.wait()
        if flight.error is not None:
            raise pyfuse3.FUSEError(errno.EIO) from flight.error
        assert flight.data is not None
        return flight.data

    async def until_cached(self, digest: bytes, length: int) -> None:
        """Wait until a chunk is in the cache (unless the cache is too full to keep it: callers check): for its
        fetch in flight, else for a fetch of its own unless it is cached. Raises pyfuse3.FUSEError(EIO) as `chunk`
        does."""
        if digest in self._flights or not await self.is_cached(digest):
            await self.chunk(digest, length)

    async def _fly(self, digest: bytes, length: int, flight: _Flight, background: bool) -> None:
        """Load the chunk of a flight, then end the flight (its waiters see the data or the error)."""
        try:
            data = await self._load(digest, length, background)
        except Exception as error:  # already logged when the store failed; anything else is logged here
            if not isinstance(error, (FsError, OSError)):
                log.error("chunk %s: %r", digest.hex(), error)
            self._land(digest, flight, error=error)
        except BaseException as error:  # cancelled: the waiters must still wake
            self._land(digest, flight, error=error)
            raise
        else:
            self._land(digest, flight, data)

    def _land(self, digest: bytes, flight: _Flight, data: bytes | None = None,
              error: BaseException | None = None) -> None:
        del self._flights[digest]
        flight.data, flight.error = data, error
        flight.done.set()

    async def fetch_packed(self, chunks: list[PackedChunk],
                           read_range: Callable[[int, int], ByteStream | None]) -> None:
        """Fetch those of `chunks` that are neither cached nor in flight from the file they are packed in, in
        ranges (`read_range(start, end)`, PACK_STREAMS at a time, in order): each chunk is verified and cached as it
        arrives, and its readers wake then. A chunk that no range delivered (the stream broke, its bytes were
        corrupt) is fetched alone."""
        cached = await trio.to_thread.run_sync(self._cached_among, [chunk.digest for chunk in chunks])
        wanted: dict[bytes, PackedChunk] = {}
        for chunk in chunks:
            if chunk.digest not in cached and chunk.digest not in self._flights and chunk.digest not in wanted:
                wanted[chunk.digest] = chunk
        flights = {digest: self._flights.setdefault(digest, _Flight()) for digest in wanted}
        pending = iter(_ranges(list(wanted.values())))
        # Each chunk lands on this loop without its stream waiting for the loop (a busy loop would stall it); the
        # landings run in order, before the stream's thread is seen to have returned.
        land = functools.partial(trio.lowlevel.current_trio_token().run_sync_soon, self._land_packed, flights)

        async def read_ranges() -> None:
            for piece in pending:  # shared: each range goes to one stream
                self.pack_ranges += 1
                await trio.to_thread.run_sync(self._receive, piece, read_range, land, limiter=self._limiter)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(PACK_STREAMS):
                    nursery.start_soon(read_ranges)
            async with trio.open_nursery() as nursery:
                for digest, flight in list(flights.items()):
                    del flights[digest]
                    nursery.start_soon(self._fly, digest, wanted[digest].length, flight, True)
        finally:
            for digest, flight in flights.items():  # cancelled before they were had: their waiters must wake
                self._land(digest, flight, error=FsError("the fetch of the profile's pack was cancelled"))

    def _receive(self, piece: list[PackedChunk], read_range: Callable[[int, int], ByteStream | None],
                 land: Callable[..., None]) -> None:
        """Read one range of a pack: verify, cache and land each chunk of `piece` (a worker thread)."""
        start, end = piece[0].offset, piece[-1].offset + piece[-1].stored
        try:
            stream = read_range(start, end)
            if stream is None:
                raise FsError("the store has no such profile any more")
        except (FsError, OSError) as error:
            log.warning("profile's pack [%d, %d): %s; its chunks are fetched alone", start, end, error)
            return
        try:
            position = start
            for chunk in piece:
                _read_exactly(stream, chunk.offset - position)  # chunks this range does not want
                stored = _read_exactly(stream, chunk.stored)
                position = chunk.offset + chunk.stored
                try:
                    raw = _verified(chunk.digest, stored, chunk.length)
                except FsError as error:
                    log.error("chunk %s: in the profile's pack: %s; fetched alone", chunk.digest.hex(), error)
                    continue
                cached = self._put(chunk.digest, raw)
                land(chunk.digest, raw, len(stored), cached)
        except (FsError, OSError) as error:
            log.warning("profile's pack [%d, %d): %s; the rest of its chunks are fetched alone", start, end, error)
        finally:
            stream.close()

    def _land_packed(self, flights: dict[bytes, _Flight], digest: bytes, raw: bytes, stored: int,
                     cached: bool) -> None:
        self._count_fetched(len(raw), stored, background=True)
        self.packed_chunks += 1
        if cached:
            self._remember_cached(digest)
        self._land(digest, flights.pop(digest), raw)

    def _cached_among(self, digests: list[bytes]) -> set[bytes]:
        return {digest for digest in digests if digest in self._known_cached or digest in self._cache}

    async def is_cached(self, digest: bytes) -> bool:
        if digest in self._known_cached:
            return True
        present = await trio.to_thread.run_sync(self._cache.__contains__, digest)
        if present:
            self._remember_cached(digest)
        return present

    def read_ahead(self, chunks: list[tuple[bytes, int]]) -> None:
        """Load (digest, length) chunks that a sequential reader will want next into memory, in the background:
        from the cache, or fetched from the store (which caches them too)."""
        if self._nursery is None:
            return
        for digest, length in chunks:
            if digest not in self._ahead and digest not in self._loading:
                self._loading.add(digest)
                self._nursery.start_soon(self._read_ahead_one, digest, length)

    async def _read_ahead_one(self, digest: bytes, length: int) -> None:
        try:
            data = await self.chunk(digest, length, background=True)
        except pyfuse3.FUSEError:
            return  # logged by the fetch; the reader that needs it will try again
        finally:
            self._loading.discard(digest)
        self._keep(digest, data)

    def _keep(self, digest: bytes, data: bytes) -> None:
        """Hold a chunk in the in-memory buffer (least recently used out first, AHEAD_BYTES in all)."""
        if digest in self._ahead:
            self._ahead.move_to_end(digest)
            return
        self._ahead[digest] = data
        self._ahead_bytes += len(data)
        while self._ahead_bytes > AHEAD_BYTES:
            self._forget_ahead(next(iter(self._ahead)))

    def _forget_ahead(self, digest: bytes) -> None:
        data = self._ahead.pop(digest, None)
        if data is not None:
            self._ahead_bytes -= len(data)

    def _remember_cached(self, digest: bytes) -> None:
        if len(self._known_cached) >= _KNOWN_CACHED_LIMIT:
            self._known_cached.clear()
        self._known_cached.add(digest)

    async def _load(self, digest: bytes, length: int, background: bool) -> bytes:
        # One worker-thread hop for all of it: under load a hop costs more than the cache read it waits for (a
        # first start's 166 chunks took 1.4x as long with a hop for each of the cache read, fetch and put).
        try:
            if background:
                async with self._background:
                    stored, raw, cached = await trio.to_thread.run_sync(self._get_or_fetch, digest, length,
                                                                        limiter=self._limiter)
            else:
                stored, raw, cached = await trio.to_thread.run_sync(self._get_or_fetch, digest, length,
                                                                    limiter=self._limiter)
        except (FsError, OSError):
            self.cache_misses += 1
            self.fetch_errors += 1
            raise
        if cached:
            self._remember_cached(digest)
        if not stored:
            self.cache_hits += 1
            return raw
        self._count_fetched(len(raw), stored, background)
        return raw

    def _count_fetched(self, length: int, stored: int, background: bool) -> None:
        self.cache_misses += 1
        self.bytes_fetched += stored
        self.chunk_bytes_fetched += length
        self.chunks_fetched += 1
        if background:
            self.background_fetched += 1

    def _get_or_fetch(self, digest: bytes, length: int) -> tuple[int, bytes, bool]:
        """(stored size, raw data, whether the cache holds it) of a chunk, the size 0 when it came from the cache;
        else it came from the store, verified, and is put into the cache before its flight ends (a later reader
        finds it there, never fetches it twice). Runs on a worker thread."""
        cached = self._cache.get(digest)
        if cached is not None and len(cached) == length:
            return 0, cached, True
        try:
            stored = self._store.get(digest)
            raw = _verified(digest, stored, length)
        except (FsError, OSError) as error:
            log.error("chunk %s: fetch from %s failed: %s", digest.hex(), self._store.describe(), error)
            raise
        return len(stored), raw, self._put(digest, raw)

    def _put(self, digest: bytes, raw: bytes) -> bool:
        """Cache a verified chunk, then call `on_cached`; whether the cache holds it now."""
        try:
            self._cache.put(digest, raw)
        except (FsError, OSError) as error:  # a full or broken cache costs speed, not the read
            log.warning("chunk %s: not cached: %s", digest.hex(), error)
            return False
        hook = self.on_cached
        if hook is not None:
            try:
                hook(digest)
            except Exception:  # the hook's work is an optimisation: the chunk is had all the same
                log.exception("chunk %s: after caching it", digest.hex())
        return True


def _verified(digest: bytes, stored: bytes, length: int) -> bytes:
    raw = objects.decode(digest, stored, length)
    if len(raw) != length:
        raise FsError(f"holds {len(raw)} bytes, the index says {length}")
    return raw


def _ranges(chunks: list[PackedChunk]) -> list[list[PackedChunk]]:
    """`chunks` (in pack order) grouped into ranges to read: about PACK_RANGE_BYTES each, or less so that every
    stream has one; a range ends where a gap of PACK_GAP_BYTES or more follows."""
    total = sum(chunk.stored for chunk in chunks)
    target = min(PACK_RANGE_BYTES, max(PACK_MIN_RANGE_BYTES, total // PACK_STREAMS))
    ranges: list[list[PackedChunk]] = []
    size = end = 0
    for chunk in chunks:
        if ranges and size < target and chunk.offset - end < PACK_GAP_BYTES:
            ranges[-1].append(chunk)
        else:
            ranges.append([chunk])
            size = 0
        size += chunk.stored
        end = chunk.offset + chunk.stored
    return ranges


def _read_exactly(stream: ByteStream, size: int) -> bytes:
    data = read_up_to(stream, size)
    if len(data) < size:
        raise FsError(f"the range ends {size - len(data)} bytes early")
    return data
