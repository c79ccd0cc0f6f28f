"""The start-up working set as plain local files, so that a start reads it natively instead of through FUSE.

A container root (`coldbrew.fs.rootfs`) stacks its read-only layers as overlayfs `META::HOT::IMAGE`: the EROFS
metadata image (every entry; a regular file redirects to its own path for its data), then two data-only layers
searched in order, this hot layer and the lazy FUSE mount. A file the start-up profile reads whole is written
here once per host, and from then on its opens and reads never reach the FUSE daemon; a file it reads in part
(a large library) stays lazy.

A hot layer is built from verified chunks only (the cache's, or the store's checked against their hash on
arrival, and kept in the cache), in a temporary directory renamed into place when whole: a killed builder leaves a
temporary directory, removed by the next build, never a partial layer. A file that is one chunk is a hard link
to the cache's file of that chunk (no copy); others are written. It is named by the image, the profile's hash (a
new recording makes a new layer) and the boot it was written in: nothing is synced to disk on a start's path
(a syncfs cost 30-90 ms and grows with the layer), because only a host crash loses written data, and a layer of
another boot is never used but removed. The hot layers of a cache take at most a quarter of its size limit
together; the least recently used ones that no mount stacks go first.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from . import objects
from .cache import ChunkCache, boot_id
from .erofs import redirect_paths
from .errors import CorruptChunk
from .index import Chunk, Index
from .mounts import mount_table
from .profile import files_read_whole, hot_chunks, parse_profile
from .store import ChunkStore

HOT_DIRECTORY = "hot"
FETCH_WORKERS = 16
_TEMPORARY = ".building-"


def hot_layer(index: Index, reference: str, profile_data: bytes, store: ChunkStore,
              cache: ChunkCache) -> str | None:
    """The hot layer's directory for this image and profile, built now if the host has none; None if empty.

    A file's data is written at the path its metadata entry redirects to (`coldbrew.fs.erofs.redirect_paths`);
    one that no path reaches is left to the lazy mount.
    Raises FsError (a chunk that cannot be fetched or is corrupt).
    """
    final = _layer_path(cache, reference, profile_data)
    root = os.path.dirname(final)
    if os.path.isdir(final):
        os.utime(final)  # its last use, for eviction
        return final
    whole = files_read_whole(parse_profile(profile_data, index), index)
    if not whole:
        return None
    os.makedirs(root, exist_ok=True)
    _remove_abandoned(root)
    _cache_chunks({chunk.digest: chunk.length for chunks in whole.values() for chunk in chunks}, store, cache)
    redirects = redirect_paths(index, whole)
    building = os.path.join(root, f"{_TEMPORARY}{os.getpid()}-{os.path.basename(final)}")
    shutil.rmtree(building, ignore_errors=True)
    try:
        for ino, path in redirects.items():
            _write_file(os.path.join(building, os.fsdecode(path.lstrip(b"/"))), whole[ino], index.file_size(ino),
                        cache)
        try:
            os.rename(building, final)
        except OSError:  # another process built it first: theirs is as good
            shutil.rmtree(building)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    _evict(root, cache.limit_bytes // 4, keep=final)
    return final


def fetch_listed_chunks(reference: str, profile_data: bytes, store: ChunkStore, cache: ChunkCache) -> None:
    """Fetch the chunks that a profile lists for its hot layer into the cache (verified, as always), unless the
    host has that layer: this needs no index, so a first start fetches them while it fetches the index.
    Raises FsError."""
    if not os.path.isdir(_layer_path(cache, reference, profile_data)):
        _cache_chunks(hot_chunks(profile_data), store, cache)


def _layer_path(cache: ChunkCache, reference: str, profile_data: bytes) -> str:
    name = f"{reference}-{objects.digest_of(profile_data).hex()[:16]}{_boot_suffix()}"
    return os.path.join(cache.directory, HOT_DIRECTORY, name)


@functools.cache
def _boot_suffix() -> str:
    return "-" + boot_id().decode().replace("-", "")[:12]


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
    if len(chunks) == 1 and chunks[0].offset == 0 and chunks[0].length == size and cache.link(chunks[0].digest, path):
        return
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


def _remove_abandoned(root: str) -> None:
    """Temporary directories of builders that are gone (killed mid-build), and layers of another boot."""
    for name in os.listdir(root):
        if name.startswith(_TEMPORARY):
            pid = name[len(_TEMPORARY):].split("-", 1)[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        elif not name.endswith(_boot_suffix()):
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
