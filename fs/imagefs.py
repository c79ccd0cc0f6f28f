"""The read-only FUSE filesystem of one image (pyfuse3 on trio).

Metadata comes from the index alone (an mmap of the cached index object), never from the store: lookups,
attributes, directory listings, symlinks and xattrs cost no I/O. Images are immutable, so the kernel may keep
entries, attributes and file pages as long as it likes (long timeouts, `keep_cache`).

File data comes from the `ChunkFetcher`: a read fetches the chunks it touches concurrently, zero-fills holes,
and starts background fetches of the chunks that follow when a file is read sequentially. A mount can record
its start-up working set (the chunks read, in first-access order) as a profile; `Prefetcher` replays one.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat

import pyfuse3
import trio

from .fetch import ChunkFetcher
from .index import Chunk, Index
from .profile import ProfileRecorder

log = logging.getLogger("coldbrew.fs")

# Images never change: let the kernel keep entries and attributes for a day before asking again.
TIMEOUT = 86400.0
# Read-ahead within a file: once reads are sequential, keep this many bytes of following chunks on their way.
READ_AHEAD_BYTES = 8 << 20


class _OpenFile:
    """What reads of one inode need: its chunk list (with offsets for bisect) and the sequential-read state."""

    __slots__ = ("chunks", "starts", "size", "opens", "next_offset", "streak_start", "ahead_until")

    def __init__(self, chunks: list[Chunk], size: int) -> None:
        self.chunks = chunks
        self.starts = [chunk.offset for chunk in chunks]
        self.size = size
        self.opens = 0
        self.next_offset = -1  # where the last read ended
        self.streak_start = 0  # where the current run of sequential reads began
        self.ahead_until = 0  # chunk position up to which read-ahead has been started


class ImageFs(pyfuse3.Operations):
    """pyfuse3 operations over an index and a fetcher. Inode numbers are the index's."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, index: Index, fetcher: ChunkFetcher, *, recorder: ProfileRecorder | None = None) -> None:
        super().__init__()
        self.index = index
        self.fetcher = fetcher
        self.recorder = recorder
        self.initialized = trio.Event()
        self.reads = 0
        self.read_bytes = 0
        self.lookups: dict[int, int] = {}  # inode -> the kernel's lookup count: the inodes it knows
        self._files: dict[int, _OpenFile] = {}
        self._total_blocks: int | None = None  # for statfs; summed on first use, not at mount

    def init(self) -> None:
        # Called while the kernel's INIT is answered; tasks waiting for this run once the answer is sent.
        self.initialized.set()

    # --- metadata, from the index alone ---

    def _entry(self, ino: int) -> pyfuse3.EntryAttributes:
        a = self.index.attributes(ino)
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = ino
        entry.generation = 0
        entry.entry_timeout = TIMEOUT
        entry.attr_timeout = TIMEOUT
        entry.st_mode = a.mode
        entry.st_nlink = a.nlink
        entry.st_uid = a.uid
        entry.st_gid = a.gid
        entry.st_rdev = a.rdev
        entry.st_size = a.size
        entry.st_blksize = 1 << 20
        entry.st_blocks = a.blocks
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = a.mtime_ns
        return entry

    def _check(self, ino: int) -> None:
        if not 1 <= ino <= self.index.entries:
            raise pyfuse3.FUSEError(errno.ENOENT)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check(parent_inode)
        if name == b".":
            ino = parent_inode
        elif name == b"..":
            ino = self.index.parent(parent_inode)
        else:
            found = self.index.lookup(parent_inode, name)
            if found is None:
                if not stat.S_ISDIR(self.index.mode(parent_inode)):
                    raise pyfuse3.FUSEError(errno.ENOTDIR)
                # Inode 0 with a timeout: the kernel caches the miss (the image never changes). Python's import
                # system probes many names that do not exist; each would otherwise come here every time.
                missing = pyfuse3.EntryAttributes()
                missing.st_ino = 0
                missing.entry_timeout = TIMEOUT
                return missing
            ino = found
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        return self._entry(ino)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            left = self.lookups.get(ino, 0) - count
            if left > 0:
                self.lookups[ino] = left
            else:
                self.lookups.pop(ino, None)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check(inode)
        return self._entry(inode)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        self._check(inode)
        if not stat.S_ISLNK(self.index.mode(inode)):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self.index.symlink_target(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._check(inode)
        if not stat.S_ISDIR(self.index.mode(inode)):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # The position in the sorted directory is the offset: stable, since the image never changes.
        for position, name, child in self.index.children(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self._entry(child), position + 1):
                break
            self.lookups[child] = self.lookups.get(child, 0) + 1  # readdirplus counts as a lookup

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # overlayfs refuses a lower layer without statfs; a read-only image has no free space.
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        if self._total_blocks is None:
            self._total_blocks = self.index.data_bytes() // 4096 + 1
        data.f_blocks = self._total_blocks
        data.f_bfree = data.f_bavail = 0
        data.f_files = self.index.entries
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._check(inode)
        return list(self.index.xattrs(inode))

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._check(inode)
        value = self.index.xattrs(inode).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    # --- file data ---

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self._check(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if not stat.S_ISREG(self.index.mode(inode)):
            raise pyfuse3.FUSEError(errno.EINVAL)
        state = self._files.get(inode)
        if state is None:
            state = self._files[inode] = _OpenFile(self.index.chunks(inode), self.index.file_size(inode))
        state.opens += 1
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def release(self, fh: int) -> None:
        state = self._files.get(fh)
        if state is not None:
            state.opens -= 1
            if state.opens <= 0:
                del self._files[fh]

    async def read(self, fh: int, off: int, size: int) -> bytes:
        state = self._files[fh]
        end = min(off + size, state.size)
        if off >= end:
            return b""
        self.reads += 1
        self.read_bytes += end - off
        chunks = state.chunks
        # The chunks that overlap [off, end): the last one starting at or before off, and those after it.
        first = max(bisect.bisect_right(state.starts, off) - 1, 0)
        pieces: list[tuple[int, int, Chunk | None, int]] = []  # (file offset, length, chunk, offset in chunk)
        position = off
        last = first
        for c in range(first, len(chunks)):
            chunk = chunks[c]
            if chunk.offset >= end:
                break
            chunk_end = chunk.offset + chunk.length
            if chunk_end <= position:
                continue
            if chunk.offset > position:
                pieces.append((position, chunk.offset - position, None, 0))  # a hole
                position = chunk.offset
            piece_end = min(chunk_end, end)
            pieces.append((position, piece_end - position, chunk, position - chunk.offset))
            if self.recorder is not None:
                self.recorder.note(fh, c)
            position = piece_end
            last = c
        if position < end:
            pieces.append((position, end - position, None, 0))
        self._read_ahead(state, off, end, last)
        try:
            if len(pieces) == 1:
                return await self._piece(pieces[0])
            results: list[bytes] = [b""] * len(pieces)

            async def one(k: int) -> None:
                results[k] = await self._piece(pieces[k])

            async with trio.open_nursery() as nursery:
                for k in range(len(pieces)):
                    nursery.start_soon(one, k)
            return b"".join(results)
        except pyfuse3.FUSEError:
            raise
        except Exception:  # an unexpected error must not end the filesystem's main loop
            log.exception("read of inode %d at %d failed", fh, off)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def _piece(self, piece: tuple[int, int, Chunk | None, int]) -> bytes:
        _, length, chunk, offset = piece
        if chunk is None:
            return bytes(length)
        return await self.fetcher.read(chunk.digest, chunk.length, offset, length)

    def _read_ahead(self, state: _OpenFile, off: int, end: int, last: int) -> None:
        # Only a sequential streak reads ahead, and as far as the streak is long (up to READ_AHEAD_BYTES), so
        # scattered reads (an mmap'd library) fetch no more than they touch.
        continues = off == state.next_offset and off > 0
        state.next_offset = end
        if not continues:
            state.streak_start = off
            return
        window = min(READ_AHEAD_BYTES, end - state.streak_start)
        if last + 1 >= len(state.chunks):
            return
        wanted = []
        c = max(last + 1, state.ahead_until)
        while c < len(state.chunks) and state.chunks[c].offset < end + window:
            wanted.append((state.chunks[c].digest, state.chunks[c].length))
            c += 1
        state.ahead_until = c
        self.fetcher.read_ahead(wanted)


class Prefetcher:
    """Replays a start-up profile on a cold mount: fetches its chunks in order into the cache, in the background.

    A few workers walk the profile; the fetcher gives background fetches a bounded share of the store, so reads
    that the container makes meanwhile are never queued behind the whole profile.
    """

    def __init__(self, fs: ImageFs, profile: list[tuple[int, Chunk]], *, workers: int = 8,
                 notify: bool = True) -> None:
        self._fs = fs
        self._profile = profile
        self._workers = workers
        self._notify = notify
        self._next = 0
        self.prefetched_chunks = 0  # fetched from the store by the prefetcher
        self.prefetch_cached = 0  # already in the cache
        self.notified_bytes = 0  # pushed into the kernel's page cache
        self.done = False

    def stats(self) -> dict[str, int | bool]:
        return {"profile_chunks": len(self._profile), "prefetched_chunks": self.prefetched_chunks,
                "prefetch_cached": self.prefetch_cached, "prefetch_done": self.done,
                "notified_bytes": self.notified_bytes}

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self._workers):
                nursery.start_soon(self._worker)
        self.done = True

    async def _worker(self) -> None:
        fetcher = self._fs.fetcher
        while self._next < len(self._profile):
            ino, chunk = self._profile[self._next]
            self._next += 1
            if await fetcher.is_cached(chunk.digest):
                self.prefetch_cached += 1
                data = None
            else:
                try:
                    data = await fetcher.chunk(chunk.digest, chunk.length, background=True)
                except pyfuse3.FUSEError:
                    continue  # logged; a reader that needs it will try again
                self.prefetched_chunks += 1
            if self._notify and ino in self._fs.lookups:
                await self._push(ino, chunk, data)

    async def _push(self, ino: int, chunk: Chunk, data: bytes | None) -> None:
        """Put a chunk into the kernel's page cache for an inode the kernel knows: its reads never reach us."""
        if data is None:
            try:
                data = await self._fs.fetcher.chunk(chunk.digest, chunk.length, background=True)
            except pyfuse3.FUSEError:
                return
        try:
            # From a worker thread: the kernel may hold the page locked for a read that this loop must answer first.
            await trio.to_thread.run_sync(pyfuse3.notify_store, ino, chunk.offset, data)
        except OSError:
            return  # the kernel forgot the inode meanwhile: nothing lost, reads fetch it
        self.notified_bytes += len(data)
