"""The start-up working set as plain local files, so that a start reads it natively instead of through FUSE.

A container root (`coldbrew.fs.rootfs`) stacks its read-only layers as overlayfs `META::HOT::IMAGE`: the EROFS
metadata image (every entry; a regular file redirects to its own path for its data), then two data-only layers
searched in order, this hot layer and the lazy FUSE mount. A file the start-up profile reads whole is written
here once per host, and from then on its opens and reads never reach the FUSE daemon; a file it reads in part
(a large library) stays lazy.

A hot layer is built from verified chunks only (the cache's, or the store's checked against their hash on
arrival, and kept in the cache), in a temporary directory renamed into place when whole: a crash leaves a
temporary directory, removed by the next build, never a partial layer. It is named by the image and the
profile's hash (a new recording makes a new layer). The hot layers of a cache take at most a quarter of its
size limit together; the least recently used ones that no mount stacks go first.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from . import objects
from .cache import ChunkCache
from .erofs import redirect_paths
from .errors import CorruptChunk
from .index import Chunk, Index
from .mounts import mount_table
from .profile import parse_profile
from .store import ChunkStore

HOT_DIRECTORY = "hot"
FETCH_WORKERS = 16
_TEMPORARY = ".building-"


def hot_layer(index: Index, reference: str, profile_data: bytes, store: ChunkStore,
              cache: ChunkCache) -> str | None:
    """The hot layer's directory for this image and profile, built now if the host has none; None if empty.

    A file's data is written at the path its metadata entry redirects to (`coldbrew.fs.erofs.redirect_paths`).
    Raises FsError (a chunk that cannot be fetched or is corrupt).
    """
    root = os.path.join(cache.directory, HOT_DIRECTORY)
    final = os.path.join(root, f"{reference}-{objects.digest_of(profile_data).hex()[:16]}")
    if os.path.isdir(final):
        os.utime(final)  # its last use, for eviction
        return final
    whole = _files_read_whole(parse_profile(profile_data, index), index)
    if not whole:
        return None
    os.makedirs(root, exist_ok=True)
    _remove_abandoned(root)
    _cache_chunks({chunk.digest: chunk.length for chunks in whole.values() for chunk in chunks}, store, cache)
    redirects = redirect_paths(index)
    building = os.path.join(root, f"{_TEMPORARY}{os.getpid()}-{os.path.basename(final)}")
    shutil.rmtree(building, ignore_errors=True)
    try:
        for ino, chunks in whole.items():
            _write_file(os.path.join(building, os.fsdecode(redirects[ino].lstrip(b"/"))), chunks,
                        index.file_size(ino), cache)
        _syncfs(building)
        try:
            os.rename(building, final)
        except OSError:  # another process built it first: theirs is as good
            shutil.rmtree(building)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    _evict(root, cache.limit_bytes // 4, keep=final)
    return final


def _files_read_whole(profile: list[tuple[int, Chunk]], index: Index) -> dict[int, list[Chunk]]:
    """inode -> chunks of the files (in first-read order) of which the profile reads every chunk."""
    read: dict[int, set[int]] = {}
    for ino, chunk in profile:
        read.setdefault(ino, set()).add(chunk.offset)
    files = {ino: index.chunks(ino) for ino in read}
    return {ino: chunks for ino, chunks in files.items() if len(read[ino]) == len(chunks)}


def _cache_chunks(chunks: dict[bytes, int], store: ChunkStore, cache: ChunkCache) -> None:
    """Fetch the chunks the cache lacks, FETCH_WORKERS at a time, each verified before it is cached."""
    missing = [digest for digest in chunks if digest not in cache]

    def fetch(digest: bytes) -> None:
        data = objects.decode(digest, store.get(digest), chunks[digest])
        if len(data) != chunks[digest]:
            raise CorruptChunk(digest, f"holds {len(data)} bytes, the index says {chunks[digest]}")
        cache.put(digest, data)

    with ThreadPoolExecutor(FETCH_WORKERS) as pool:
        pending: set[Future] = set()
        for digest in missing:
            if len(pending) >= 2 * FETCH_WORKERS:  # bounded: decoded chunks do not pile up in memory
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
            pending.add(pool.submit(fetch, digest))
        for future in pending:
            future.result()


def _write_file(path: str, chunks: list[Chunk], size: int, cache: ChunkCache) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    try:
        for chunk in chunks:
            data = cache.get(chunk.digest)
            if data is None or len(data) != chunk.length:
                raise CorruptChunk(chunk.digest, "left the cache while the hot layer was built")
            view = memoryview(data)
            while view:
                view = view[os.pwrite(fd, view, chunk.offset + len(data) - len(view)):]
        os.ftruncate(fd, size)  # holes stay holes
    finally:
        os.close(fd)


def _syncfs(path: str) -> None:
    """Make the layer durable before it gets its name (one syncfs, not an fsync per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        ctypes.CDLL(None, use_errno=True).syncfs(fd)
    finally:
        os.close(fd)


def _remove_abandoned(root: str) -> None:
    """Temporary directories of builders that are gone (killed mid-build)."""
    for name in os.listdir(root):
        if name.startswith(_TEMPORARY):
            pid = name[len(_TEMPORARY):].split("-", 1)[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _tree_size(path: str) -> int:
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(directory, name)).st_blocks * 512
    return total


def _evict(root: str, limit: int, *, keep: str) -> None:
    """Remove the least recently used hot layers until they fit `limit`; never `keep` nor one a mount stacks."""
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
        if path != keep and path not in stacked:
            shutil.rmtree(path, ignore_errors=True)
            total -= size
