"""Push a directory tree into a chunk store: its index and every chunk of file data, each stored once.

File data is cut into fixed-size chunks at file offsets (1 MiB by default; a smaller file is one chunk), named by
blake3, compressed with zstd. Why fixed-size: images change by adding and replacing whole files (packages), so
identical files dedupe whole whatever the chunking, and fixed offsets let a read find its chunk by division and
fetch exactly what it touches; `python -m coldbrew.bench chunking` measures this against content-defined chunking.

Holes in sparse files are found with SEEK_DATA/SEEK_HOLE and are not stored. Hashing and compression release the
GIL, so files are pushed on a pool of threads.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from . import erofs, objects
from .errors import FsError
from .index import Chunk, Index, IndexBuilder, MAX_CHUNK_SIZE
from .store import ChunkStore

DEFAULT_CHUNK_SIZE = 1 << 20


@dataclass
class PushResult:
    reference: str  # hex digest of the index: the image reference
    entries: int
    file_bytes: int  # data bytes in the tree (holes excluded)
    chunks: int  # chunk references in the index
    unique_chunks: int  # distinct chunks in this image
    uploaded_chunks: int  # chunks the store did not have before
    uploaded_bytes: int  # stored (compressed) bytes written, index included


class Uploader:
    """Stores each distinct chunk once per push, skipping what the store already holds."""

    def __init__(self, store: ChunkStore, level: int) -> None:
        self._store = store
        self._level = level
        self._lock = threading.Lock()
        self._seen: set[bytes] = set()
        self.uploaded_chunks = 0
        self.uploaded_bytes = 0

    def chunk(self, data: bytes | memoryview) -> bytes:
        digest = objects.digest_of(data)
        with self._lock:
            if digest in self._seen:
                return digest
            self._seen.add(digest)
        if not self._store.has(digest):
            stored = objects.compress(data, self._level)
            self._store.put(digest, stored)
            with self._lock:
                self.uploaded_chunks += 1
                self.uploaded_bytes += len(stored)
        return digest

    @property
    def unique_chunks(self) -> int:
        return len(self._seen)


def _data_regions(fd: int, size: int) -> list[tuple[int, int]]:
    """[(start, end)] of a file's data; the gaps are holes."""
    regions = []
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # no data after position: the rest is a hole
                break
            if error.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # filesystem without hole support
                return [(0, size)]
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        regions.append((start, end))
        position = end
    return regions


def _push_file(path: bytes, size: int, sparse: bool, chunk_size: int, uploader: Uploader,
               progress: Callable[[int], None] | None) -> list[Chunk]:
    chunks = []
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for start, end in _data_regions(fd, size) if sparse else ((0, size),):
            offset = start
            while offset < end:
                length = min(chunk_size, end - offset)
                data = os.pread(fd, length, offset)
                if len(data) != length:
                    raise FsError(f"{os.fsdecode(path)} changed while it was pushed (short read at {offset})")
                chunks.append(Chunk(uploader.chunk(data), offset, length))
                offset += length
                if progress:
                    progress(length)
    finally:
        os.close(fd)
    return chunks


def _push_files(batch: list[tuple[int, bytes, int, bool]], chunk_size: int, uploader: Uploader,
                progress: Callable[[int], None] | None) -> list[tuple[int, list[Chunk]]]:
    return [(ino, _push_file(path, size, sparse, chunk_size, uploader, progress)) for ino, path, size, sparse in batch]


def store_files(files: list[tuple[int, bytes, int, bool]], uploader: Uploader, *, chunk_size: int,
                threads: int | None, progress: Callable[[int, int], None] | None) -> list[tuple[int, list[Chunk]]]:
    """Store the data of `files` ((inode, path, size, maybe sparse)) from a thread pool; each inode's chunks.

    `progress(done_bytes, total_bytes)` is called from the workers.
    """
    total = sum(file[2] for file in files)
    done = 0
    done_lock = threading.Lock()

    def advance(length: int) -> None:
        nonlocal done
        with done_lock:
            done += length
            current = done
        progress(current, total)

    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 2) as pool:
        # Small files go in batches: a task per 4 KiB header file costs more in the pool than its own work.
        batches: list[list] = [[]]
        batch_bytes = 0
        for file in files:
            if batch_bytes >= 4 * chunk_size or len(batches[-1]) >= 256:
                batches.append([])
                batch_bytes = 0
            batches[-1].append(file)
            batch_bytes += file[2]
        futures = [pool.submit(_push_files, batch, chunk_size, uploader, advance if progress else None)
                   for batch in batches if batch]
        return [result for future in futures for result in future.result()]


def read_xattrs(path: bytes) -> list[tuple[bytes, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as error:
        if error.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise
    return [(name.encode(), os.getxattr(path, name, follow_symlinks=False)) for name in sorted(names)]


def checked_tree(tree: str, chunk_size: int) -> tuple[bytes, os.stat_result]:
    """The root of a tree to push (absolute, as bytes) and its lstat; FsError for a chunk size out of bounds or a root
    that is not a directory."""
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise FsError(f"chunk size {chunk_size} out of bounds (1 to {MAX_CHUNK_SIZE})")
    root = os.fsencode(os.path.abspath(tree))
    root_stat = os.lstat(root)
    if not stat.S_ISDIR(root_stat.st_mode):
        raise FsError(f"{tree} is not a directory")
    return root, root_stat


def push(tree: str, store: ChunkStore, *, chunk_size: int = DEFAULT_CHUNK_SIZE, level: int = objects.COMPRESSION_LEVEL,
         threads: int | None = None, progress: Callable[[int, int], None] | None = None,
         metadata: dict | None = None) -> PushResult:
    """Push the tree at `tree` (its root directory's own metadata included) and return its reference.

    `progress(done_bytes, total_bytes)` is called as file data is stored, from worker threads.
    """
    root, root_stat = checked_tree(tree, chunk_size)
    builder = IndexBuilder()
    builder.metadata = dict(metadata or {}, chunk_size=chunk_size)
    uploader = Uploader(store, level)

    # Walk first (inode numbers in breadth-first order, each directory's children contiguous), then store data.
    files: list[tuple[int, bytes, int, bool]] = []  # (inode, path, size, maybe sparse)
    hardlinks: dict[tuple[int, int], int] = {}

    def add(path: bytes, st: os.stat_result, parent: int) -> int:
        kind = stat.S_IFMT(st.st_mode)
        symlink = os.readlink(path) if kind == stat.S_IFLNK else None
        size = st.st_size if kind == stat.S_IFREG else 0
        return builder.add(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, size=size, mtime_ns=st.st_mtime_ns,
                           rdev=st.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0, parent=parent,
                           symlink=symlink, xattrs=read_xattrs(path))

    root_ino = add(root, root_stat, 1)
    pending = [(root, root_ino)]
    while pending:
        next_level = []
        for directory, directory_ino in pending:
            children = []
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                key = (st.st_dev, st.st_ino)
                if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in hardlinks:
                    children.append((entry.name, hardlinks[key]))
                    continue
                ino = add(entry.path, st, directory_ino)
                if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                    hardlinks[key] = ino
                children.append((entry.name, ino))
                if stat.S_ISDIR(st.st_mode):
                    next_level.append((entry.path, ino))
                elif stat.S_ISREG(st.st_mode) and st.st_size:
                    # Only a file with fewer blocks than its size can have holes worth looking for.
                    files.append((ino, entry.path, st.st_size, st.st_blocks * 512 < st.st_size))
            builder.set_children(directory_ino, children)
        pending = next_level

    file_bytes = 0
    chunk_refs = 0
    for ino, chunks in store_files(files, uploader, chunk_size=chunk_size, threads=threads, progress=progress):
        builder.set_chunks(ino, chunks)
        chunk_refs += len(chunks)
        file_bytes += sum(chunk.length for chunk in chunks)

    digest = store_index(builder, store, level, uploader)
    return PushResult(reference=digest.hex(), entries=builder.entry_count, file_bytes=file_bytes,
                      chunks=chunk_refs, unique_chunks=uploader.unique_chunks,
                      uploaded_chunks=uploader.uploaded_chunks, uploaded_bytes=uploader.uploaded_bytes)


def store_index(builder: IndexBuilder, store: ChunkStore, level: int, uploader: Uploader) -> bytes:
    """Store the index `builder` holds, with the tree's EROFS metadata image beside it; the index's digest.

    A host's first container root fetches the image (verified against the digest the header names) instead of
    writing it. The image shows the tree, not the header: the header names the tree it shows by its digest, as an
    index made from this one (an image layer) may carry the header over unchanged.
    """
    index = builder.build()
    tree = Index(index)
    try:
        image = erofs.image_bytes(tree, erofs.redirect_paths(tree))
    except erofs.UnsupportedTree:
        pass  # served from FUSE alone
    else:
        builder.metadata[erofs.INDEX_METADATA_KEY] = {"image": _store_object(store, image, level, uploader).hex(),
                                                      "tree": tree.body_digest().hex()}
        index = builder.build()
    return _store_object(store, index, level, uploader)


def _store_object(store: ChunkStore, data: bytes | bytearray, level: int, uploader: Uploader) -> bytes:
    """Store a whole object (an index, a metadata image) unless the store has it; its digest."""
    digest, stored = objects.encode(data, level)
    if not store.has(digest):
        store.put(digest, stored)
        uploader.uploaded_bytes += len(stored)
    return digest
