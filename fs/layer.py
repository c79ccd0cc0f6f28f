"""A new image from a parent image and an overlayfs upper directory: only the changes are read and stored.

A container root (`create_root`) is overlayfs over the lazy mount of an image; what a process changed lies in the
upper directory: new and modified files (copied up whole), directories with changed metadata, whiteouts (0/0
character devices, or files carrying `trusted.overlay.whiteout`) for deletions, and `trusted.overlay.opaque=y` on
a directory that replaced the lower one. `push_layer` merges those changes into the parent's index: unchanged
files keep the parent's chunk lists (nothing of them is read or hashed), changed files are chunked and stored as
`push` stores them. Pushing the merged root instead re-reads every file of the image through the mount.

Entries get their inode numbers in the order `push` gives them (breadth first, each directory's children sorted),
and metadata is taken as `push` takes it, so the reference equals that of pushing the merged tree.
Renamed lower directories (`redirect_dir`) and metadata-only copy-up (`metacopy`) are not handled: `LayerError`
says so, and the caller pushes the merged tree instead (both are off on kernels unless enabled).
"""

from __future__ import annotations

import json
import os
import stat
from typing import Callable

from . import objects
from .errors import FsError
from .index import MAX_INDEX_SIZE, Chunk, Index, IndexBuilder
from .pushing import DEFAULT_CHUNK_SIZE, PushResult, Uploader, checked_tree, read_xattrs, store_files, store_index
from .store import ChunkStore

_OVERLAY_XATTR = b"trusted.overlay."
_OPAQUE = "trusted.overlay.opaque"
_WHITEOUT = "trusted.overlay.whiteout"
_UNSUPPORTED = (b"trusted.overlay.redirect", b"trusted.overlay.metacopy")


class LayerError(FsError):
    """The upper directory holds something this merge does not handle (a redirect, a metacopy file)."""


def is_whiteout(path: bytes, st: os.stat_result) -> bool:
    """Whether an upper-directory entry marks a deletion."""
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return True
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        try:
            os.getxattr(path, _WHITEOUT, follow_symlinks=False)
            return True
        except OSError:
            return False
    return False


def is_opaque(path: bytes) -> bool:
    try:
        return os.getxattr(path, _OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _upper_xattrs(path: bytes) -> list[tuple[bytes, bytes]]:
    """The entry's own xattrs: overlayfs's bookkeeping (trusted.overlay.*) is not part of the image."""
    found = read_xattrs(path)
    for name, _ in found:
        if name.startswith(_UNSUPPORTED):
            raise LayerError(f"{os.fsdecode(path)} carries {name.decode()}: renamed directories and metadata-only "
                             "copy-up are not merged; push the merged tree instead")
    return [(name, value) for name, value in found if not name.startswith(_OVERLAY_XATTR)]


def push_layer(parent: Index, upper: str, store: ChunkStore, *, metadata: dict | None = None,
               chunk_size: int | None = None, level: int = objects.COMPRESSION_LEVEL, threads: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> PushResult:
    """Store the image that is `parent` with the changes in overlayfs upper directory `upper`; returns its reference.

    `metadata` replaces the parent's index metadata (the chunk size is kept: new files are cut like the old ones).
    `progress(done_bytes, total_bytes)` counts the changed files' data only.
    """
    chunk_size = chunk_size or int(parent.metadata.get("chunk_size") or DEFAULT_CHUNK_SIZE)
    upper_root, root_stat = checked_tree(upper, chunk_size)
    builder = IndexBuilder()
    builder.metadata = dict(metadata if metadata is not None else parent.metadata, chunk_size=chunk_size)
    uploader = Uploader(store, level)
    parent_chunks: dict[int, list[Chunk]] = {}  # new inode -> the parent's chunk list, reused as is
    upper_files: list[tuple[int, bytes, int, bool]] = []  # (new inode, path, size, maybe sparse): to store
    parent_links: dict[int, int] = {}  # parent inode of a hardlinked file -> its new inode
    upper_links: dict[tuple[int, int], int] = {}

    def add_parent(ino: int, parent_ino: int) -> int:
        attrs = parent.attributes(ino)
        kind = stat.S_IFMT(attrs.mode)
        new = builder.add(mode=attrs.mode, uid=attrs.uid, gid=attrs.gid,
                          size=attrs.size if kind == stat.S_IFREG else 0, mtime_ns=attrs.mtime_ns, rdev=attrs.rdev,
                          parent=parent_ino,
                          symlink=parent.symlink_target(ino) if kind == stat.S_IFLNK else None,
                          xattrs=sorted(parent.xattrs(ino).items()))
        if kind == stat.S_IFREG and attrs.size:
            parent_chunks[new] = parent.chunks(ino)
        return new

    def add_upper(path: bytes, st: os.stat_result, parent_ino: int) -> int:
        kind = stat.S_IFMT(st.st_mode)
        new = builder.add(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                          size=st.st_size if kind == stat.S_IFREG else 0, mtime_ns=st.st_mtime_ns,
                          rdev=st.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0, parent=parent_ino,
                          symlink=os.readlink(path) if kind == stat.S_IFLNK else None, xattrs=_upper_xattrs(path))
        if kind == stat.S_IFREG and st.st_size:
            upper_files.append((new, path, st.st_size, st.st_blocks * 512 < st.st_size))
        return new

    # A directory to list: (new inode, its parent-image inode or None, its upper path or None, opaque).
    root_ino = add_upper(upper_root, root_stat, 1)
    pending: list[tuple[int, int | None, bytes | None]] = [(root_ino, None if is_opaque(upper_root) else 1,
                                                             upper_root)]
    while pending:
        next_level = []
        for directory_ino, lower_ino, upper_dir in pending:
            merged: dict[bytes, tuple[str, object]] = {}
            if lower_ino is not None:
                for _, name, child in parent.children(lower_ino):
                    merged[name] = ("parent", child)
            if upper_dir is not None:
                with os.scandir(upper_dir) as listing:
                    for entry in listing:
                        st = entry.stat(follow_symlinks=False)
                        if is_whiteout(entry.path, st):
                            merged.pop(entry.name, None)
                        else:
                            merged[entry.name] = ("upper", (entry.path, st))
            children = []
            for name in sorted(merged):
                origin, item = merged[name]
                if origin == "parent":
                    child = item
                    mode = parent.mode(child)
                    if not stat.S_ISDIR(mode) and child in parent_links:
                        children.append((name, parent_links[child]))
                        continue
                    ino = add_parent(child, directory_ino)
                    if stat.S_ISDIR(mode):
                        next_level.append((ino, child, None))
                    else:
                        parent_links[child] = ino
                else:
                    path, st = item
                    key = (st.st_dev, st.st_ino)
                    if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in upper_links:
                        children.append((name, upper_links[key]))
                        continue
                    ino = add_upper(path, st, directory_ino)
                    if stat.S_ISDIR(st.st_mode):
                        # Merged with the parent's directory of that name unless opaque (or there is none).
                        below = None
                        if lower_ino is not None and not is_opaque(path):
                            lower_child = parent.lookup(lower_ino, name)
                            if lower_child is not None and stat.S_ISDIR(parent.mode(lower_child)):
                                below = lower_child
                        next_level.append((ino, below, path))
                    elif st.st_nlink > 1:
                        upper_links[key] = ino
                children.append((name, ino))
            builder.set_children(directory_ino, children)
        pending = next_level

    file_chunks = list(parent_chunks.values())
    for ino, chunks in parent_chunks.items():
        builder.set_chunks(ino, chunks)
    for ino, chunks in store_files(upper_files, uploader, chunk_size=chunk_size, threads=threads, progress=progress):
        builder.set_chunks(ino, chunks)
        file_chunks.append(chunks)

    all_chunks = [chunk for chunks in file_chunks for chunk in chunks]
    digest = store_index(builder, store, level, uploader)
    return PushResult(reference=digest.hex(), entries=builder.entry_count,
                      file_bytes=sum(chunk.length for chunk in all_chunks), chunks=len(all_chunks),
                      unique_chunks=len({chunk.digest for chunk in all_chunks}),
                      uploaded_chunks=uploader.uploaded_chunks, uploaded_bytes=uploader.uploaded_bytes)


def push_metadata(parent_reference: str, store: ChunkStore, update: dict, *,
                  level: int = objects.COMPRESSION_LEVEL) -> PushResult:
    """Store the parent image with its index metadata updated by `update` and the same tree: the index header
    rewritten, its columns kept.

    The result is the index `push_layer` makes from an upper directory with no changes (the chunk size is kept),
    without walking the tree: a step that changes only the image config costs one index write.
    """
    from .index import MAGIC

    digest = objects.parse_reference(parent_reference)
    raw = objects.decode(digest, store.get(digest), MAX_INDEX_SIZE)
    parent = Index(raw)  # checks the header and the columns' bounds
    try:
        header_end = len(MAGIC) + 4 + int.from_bytes(raw[len(MAGIC): len(MAGIC) + 4], "little")
        header = json.loads(raw[len(MAGIC) + 4: header_end])
        header["metadata"] = {**parent.metadata, **update,
                              "chunk_size": int(parent.metadata.get("chunk_size") or DEFAULT_CHUNK_SIZE)}
        text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        padding = -(len(MAGIC) + 4 + len(text)) % 8
        index = MAGIC + (len(text) + padding).to_bytes(4, "little") + text + b" " * padding + raw[header_end:]
        chunks = list(parent.all_chunks())
        entries = parent.entries
    finally:
        parent.release()
    new_digest, stored = objects.encode(index, level)
    uploaded = 0
    if not store.has(new_digest):
        store.put(new_digest, stored)
        uploaded = len(stored)
    return PushResult(reference=new_digest.hex(), entries=entries, file_bytes=sum(chunk.length for chunk in chunks),
                      chunks=len(chunks), unique_chunks=len({chunk.digest for chunk in chunks}), uploaded_chunks=0,
                      uploaded_bytes=uploaded)
