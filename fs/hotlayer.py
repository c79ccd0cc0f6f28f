"""The start-up working set as plain local files, so that a start reads it natively instead of through FUSE.

A container root (`coldbrew.fs.rootfs`) stacks its read-only layers as overlayfs `META::HOT::IMAGE`: the EROFS
metadata image (every entry; a regular file redirects to its own path for its data), then two data-only layers
searched in order, this hot layer and the lazy FUSE mount. A file the start-up profile reads whole is written
here once per host, and from then on its opens and reads never reach the FUSE daemon; a file it reads in part
(a large library) stays lazy.

The daemon of the root's image mount fills the layer while the root already runs: a start never waits for it.
It fetches the layer's chunks from the profile's pack as soon as the image's index is on the host (while the index
is validated), then writes the files in the order the profile first read them (`fill`). Each file is
written under a temporary name and renamed into place once whole, so overlayfs finds a file whole or not at all;
one it does not find yet is read through FUSE, from the same fetches (the daemon fetches a chunk once, whoever
asks). A marker beside the layer (`NAME.complete`) says that every file is in it; a layer without one (its
daemon was killed, or a chunk could not be had) is completed by the next daemon that stacks it.

Only verified chunks go in (fetched through the mount's fetcher, kept in the cache). A file that is one chunk is a
hard link to the cache's file of that chunk (no copy), made by the thread that caches the chunk; others are
written. A layer is named by the image, the
profile's hash (a new recording makes a new layer) and the boot it was written in: nothing is synced to disk on a
start's path (a syncfs cost 30-90 ms and grows with the layer), because only a host crash loses written data, and
a layer of another boot is never used but removed. Every daemon that stacks a layer holds a shared lock on it for
its life. The hot layers of a cache take at most a quarter of its size limit together; the least recently used
ones that no daemon holds and no mount stacks go first.
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import logging
import os
import shutil
import stat
import threading
from typing import Awaitable, Callable, Iterable, Iterator, TypeVar

import pyfuse3
import trio

from . import objects
from .cache import ChunkCache, boot_id
from .erofs import redirect_paths
from .fetch import ChunkFetcher
from .index import Chunk, Index
from .mounts import mount_table

log = logging.getLogger("coldbrew.fs")

HOT_DIRECTORY = "hot"
# Files written at once (the fetcher bounds the store's share of them).
FILL_WORKERS = 8
_TEMPORARY = ".building-"
_COMPLETE = ".complete"
_Item = TypeVar("_Item")


class HotLayer:
    """The hot layer of an image's start-up profile on this host (`path`, made empty if missing), held against
    eviction until `close`. Blocking: make it on a worker thread."""

    def __init__(self, cache_directory: str, reference: str, profile_data: bytes) -> None:
        self.root = os.path.join(cache_directory, HOT_DIRECTORY)
        self.name = f"{reference}-{objects.digest_of(profile_data).hex()[:16]}{_boot_suffix()}"
        self.path = os.path.join(self.root, self.name)
        self._files_written = 0  # by `_write_file`; the linked ones are counted by `_linker`
        self._linker: _Linker | None = None
        self.files_failed = 0
        os.makedirs(self.root, exist_ok=True)
        _remove_abandoned(self.root)
        self._fd = _hold(self.path)
        self.complete = os.path.exists(self.path + _COMPLETE)
        if self.complete:
            os.utime(self.path)  # its last use, for eviction

    def close(self) -> None:
        os.close(self._fd)

    @property
    def files_written(self) -> int:
        return self._files_written + (len(self._linker.linked) if self._linker is not None else 0)

    def stats(self) -> dict[str, object]:
        return {"hot_layer": self.path, "hot_layer_complete": self.complete, "hot_files_written": self.files_written,
                "hot_files_failed": self.files_failed}

    async def fill(self, index: Index, whole: dict[int, list[Chunk]], fetcher: ChunkFetcher,
                   cache: ChunkCache) -> None:
        """Write the files the profile reads whole (`profile.files_read_whole`) that the layer lacks, in first-read
        order; then mark the layer complete (when every file is in) and evict old layers. Run it on the mount's
        trio loop."""
        if self.complete:
            return
        scratch = os.path.join(self.root, f"{_TEMPORARY}{os.getpid()}-{self.name}")
        try:
            redirects = await trio.to_thread.run_sync(redirect_paths, index, whole)
            await trio.to_thread.run_sync(functools.partial(os.makedirs, scratch, exist_ok=True))
            names = itertools.count()
            destinations = {ino: os.path.join(self.path, os.fsdecode(path.lstrip(b"/")))
                            for ino, path in redirects.items()}
            self._linker = linker = _Linker(cache, scratch, names, {
                ino: (whole[ino][0].digest, destination) for ino, destination in destinations.items()
                if _is_one_chunk(whole[ino], index.file_size(ino))})

            async def write(ino: int) -> None:
                destination = destinations.get(ino)
                if destination is None:
                    return  # no path reaches it: left to the lazy mount
                chunks = whole[ino]
                try:
                    if ino in linker.files:
                        await fetcher.until_cached(chunks[0].digest, chunks[0].length)
                        if ino in linker.linked or await trio.to_thread.run_sync(linker.link, ino) is not None:
                            return  # linked to the cache's file (by now, or by a daemon before this one)
                        # else: a cache too full to keep it; written below
                    temporary = os.path.join(scratch, str(next(names)))
                    if not await _write_file(temporary, destination, chunks, index.file_size(ino), fetcher):
                        return  # a daemon before this one wrote it
                except (pyfuse3.FUSEError, OSError) as error:  # a chunk not had is logged by the fetcher too
                    self.files_failed += 1
                    log.warning("hot layer %s: %s is left to the lazy mount: %r", self.name, destination, error)
                    return
                self._files_written += 1

            fetcher.on_cached = linker.chunk_cached
            try:
                await trio.to_thread.run_sync(linker.link_cached)
                await _each(whole, FILL_WORKERS, write)
            finally:
                fetcher.on_cached = None
            if not self.files_failed:
                await trio.to_thread.run_sync(_mark_complete, self.path)
                self.complete = True
            await trio.to_thread.run_sync(functools.partial(_evict, self.root, cache.limit_bytes // 4, keep=self.path))
        except Exception:  # an optimisation: it must never take the mount down
            log.exception("filling hot layer %s", self.path)
        finally:
            await trio.to_thread.run_sync(functools.partial(shutil.rmtree, scratch, ignore_errors=True))


class _Linker:
    """Places the hot layer's one-chunk files as hard links to the cache's files of their chunks: those cached
    already at once (`link_cached`), the others from the worker thread that caches their chunk (`chunk_cached`, the
    fetcher's hook), so that a first start's ~150 small files cost no thread hop each. Thread-safe."""

    def __init__(self, cache: ChunkCache, scratch: str, names: Iterator[int],
                 files: dict[int, tuple[bytes, str]]) -> None:
        self.files = files  # inode -> (its chunk, its path in the layer)
        self.linked: set[int] = set()  # placed by this daemon
        self._cache = cache
        self._scratch = scratch
        self._names = names  # temporary names in `scratch`, shared with the layer's writes
        self._by_chunk: dict[bytes, list[int]] = {}
        for ino, (digest, _) in files.items():
            self._by_chunk.setdefault(digest, []).append(ino)
        self._lock = threading.Lock()

    def chunk_cached(self, digest: bytes) -> None:
        for ino in self._by_chunk.get(digest, ()):
            self.link(ino)

    def link_cached(self) -> None:
        for digest, inodes in self._by_chunk.items():
            if digest in self._cache:
                for ino in inodes:
                    self.link(ino)

    def link(self, ino: int) -> bool | None:
        """True when linked now, False when it is there already, None when the cache lacks the chunk."""
        digest, destination = self.files[ino]
        temporary = os.path.join(self._scratch, str(next(self._names)))
        placed = _link_into_place(self._cache, digest, temporary, destination)
        if placed:
            with self._lock:  # two threads may both have linked it (the same file): it counts once
                placed = ino not in self.linked
                self.linked.add(ino)
        return placed


async def _each(items: Iterable[_Item], workers: int, work: Callable[[_Item], Awaitable[None]]) -> None:
    """`work` on every item, in order, `workers` at a time."""
    pending = iter(items)

    async def worker() -> None:
        for item in pending:  # shared: each item goes to one worker
            await work(item)

    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker)


def _is_one_chunk(chunks: list[Chunk], size: int) -> bool:
    return len(chunks) == 1 and chunks[0].offset == 0 and chunks[0].length == size


async def _write_file(temporary: str, destination: str, chunks: list[Chunk], size: int,
                      fetcher: ChunkFetcher) -> bool:
    """Put the file at `destination`, written at `temporary` first; False when it is there already."""
    if await trio.to_thread.run_sync(os.path.lexists, destination):
        return False
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    try:
        try:
            for chunk in chunks:
                data = await fetcher.chunk(chunk.digest, chunk.length)
                await trio.to_thread.run_sync(_write_at, fd, data, chunk.offset)
            os.ftruncate(fd, size)  # holes stay holes
        finally:
            os.close(fd)
    except BaseException:
        os.unlink(temporary)
        raise
    await trio.to_thread.run_sync(_place, temporary, destination)
    return True


def _link_into_place(cache: ChunkCache, digest: bytes, temporary: str, destination: str) -> bool | None:
    """Put a one-chunk file at `destination` as a hard link to the cache's file of its chunk: True when placed,
    False when it is there already, None when the cache lacks the chunk."""
    if os.path.lexists(destination):
        return False
    if not cache.link(digest, temporary):
        return None
    _place(temporary, destination)
    return True


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        view = view[os.pwrite(fd, view, offset + len(data) - len(view)):]


def _place(temporary: str, destination: str) -> None:
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    os.rename(temporary, destination)


def _mark_complete(path: str) -> None:
    os.close(os.open(path + _COMPLETE, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o444))


@functools.cache
def _boot_suffix() -> str:
    return "-" + boot_id().decode().replace("-", "")[:12]


def _hold(path: str) -> int:
    """The layer's directory (made if missing), open with a shared lock: no eviction removes it while held."""
    while True:
        os.makedirs(path, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits for an eviction of it to finish
        if os.fstat(fd).st_nlink:
            return fd
        os.close(fd)  # evicted meanwhile: made again


def _remove_abandoned(root: str) -> None:
    """Temporary directories of daemons that are gone (killed mid-fill), and layers of another boot."""
    for name in os.listdir(root):
        if name.startswith(_TEMPORARY):
            pid = name[len(_TEMPORARY):].split("-", 1)[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        elif not name.removesuffix(_COMPLETE).endswith(_boot_suffix()):
            _remove_layer(os.path.join(root, name.removesuffix(_COMPLETE)))


def _remove_layer(path: str) -> None:
    """The marker first: a layer half removed is never taken for complete."""
    try:
        os.unlink(path + _COMPLETE)
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def _tree_size(path: str) -> int:
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(directory, name)).st_blocks * 512
    return total


def _evict(root: str, limit: int, *, keep: str) -> None:
    """Remove the least recently used hot layers until they fit `limit`; never `keep`, nor one that a daemon
    holds or a mount stacks."""
    stacked = " ".join(entry.options for entry in mount_table() if entry.fstype == "overlay")
    layers = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if not name.startswith(_TEMPORARY) and stat.S_ISDIR(os.lstat(path).st_mode):
            layers.append((os.stat(path).st_mtime, path, _tree_size(path)))
    total = sum(size for _, _, size in layers)
    for _, path, size in sorted(layers):
        if total <= limit:
            break
        if path != keep and path not in stacked and _remove_unheld(path):
            total -= size


def _remove_unheld(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a daemon stacks it
        _remove_layer(path)  # under the lock: a daemon that comes for it waits, then makes it again
        return True
    finally:
        os.close(fd)
