"""An image's whole tree as an EROFS metadata image: the kernel answers lookups, stat and readdir, not FUSE.

The lazy mount serves metadata from Python, one request per lookup, getattr, opendir and readdir: a warm start
of a Python program (thousands of stats and opens) spends most of its time in those round trips. Like
composefs, `write_image` turns the index into an EROFS filesystem that holds every entry's metadata and no file
data: a regular file with data is an overlayfs "metacopy" entry (`trusted.overlay.metacopy`) that redirects
(`trusted.overlay.redirect`) to its own path in a data-only lower layer, the FUSE mount. overlayfs then opens
the FUSE file only when the data is read; everything else never leaves the kernel.

Layout (4 KiB blocks; little-endian; see the kernel's fs/erofs/erofs_fs.h): the superblock at byte 1024 of block
0; from block 1 the inodes, each a 64-byte extended inode followed by its inline xattrs and then either its
chunk map (a regular file: one hole chunk covering the file, so its size is right and nothing is stored) or the
tail of its data (a directory's entries or a symlink's target, when it fits in the block); after the inodes, the
data blocks of directories and symlinks too large to be inline. An inode's number (nid) is its byte offset / 32.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
from typing import TYPE_CHECKING, Iterable

from .errors import FsError
from .index import Index

if TYPE_CHECKING:
    from .store import ChunkStore

log = logging.getLogger("coldbrew.fs")

BLOCK_BITS = 12
BLOCK = 1 << BLOCK_BITS
MAGIC = 0xE0F5E1E2
_SUPERBLOCK_OFFSET = 1024
_FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
_SUPERBLOCK = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23x")
_INODE = struct.Struct("<HHHHQIIIIqII16x")  # erofs_inode_extended
_INODE_SIZE = _INODE.size
_DIRENT = struct.Struct("<QHBB")
_XATTR_HEADER = struct.Struct("<IB7x")
_XATTR_ENTRY = struct.Struct("<BBH")
_FLAT_PLAIN, _FLAT_INLINE, _CHUNK_BASED = 0, 2, 4
_NULL_ADDR = b"\xff\xff\xff\xff"
_MAX_CHUNK_BITS = BLOCK_BITS + 31  # the chunk format keeps chunk size / block size as a 5-bit shift
_FILE_TYPES = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4, stat.S_IFIFO: 5,
               stat.S_IFSOCK: 6, stat.S_IFLNK: 7}
# xattr name -> (EROFS name index, the rest of the name); the whole name for the two ACLs.
_XATTR_PREFIXES = ((b"user.", 1), (b"trusted.", 4), (b"security.", 6))
_XATTR_WHOLE = {b"system.posix_acl_access": 2, b"system.posix_acl_default": 3}
_OVERLAY_PREFIX = b"trusted.overlay."
# The index header's entry naming the stored image's digest (`push` writes it).
INDEX_METADATA_KEY = "erofs"
# A chunk cache's directory of metadata images, each named by its image's reference.
CACHE_DIRECTORY = "erofs"
METACOPY = b"trusted.overlay.metacopy"
REDIRECT = b"trusted.overlay.redirect"


class UnsupportedTree(FsError):
    """The tree holds something an EROFS image cannot say (an xattr outside user/trusted/security/ACLs)."""


def _align(value: int, unit: int) -> int:
    return (value + unit - 1) // unit * unit


def _xattr_entry(name: bytes, value: bytes) -> bytes:
    if name in _XATTR_WHOLE:
        index, suffix = _XATTR_WHOLE[name], b""
    else:
        for prefix, index in _XATTR_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                suffix = name[len(prefix):]
                break
        else:
            raise UnsupportedTree(f"xattr {name!r} has no EROFS name prefix")
    if len(suffix) > 255 or len(value) > 0xFFFF:
        raise UnsupportedTree(f"xattr {name!r} is too long for EROFS")
    entry = _XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
    return entry + bytes(-len(entry) % 4)


_METACOPY_ENTRY = _xattr_entry(METACOPY, b"")


def _encode_xattrs(xattrs: dict[bytes, bytes], redirect: bytes | None) -> bytes:
    """The inline xattr area: header, then entries; `redirect` adds the metacopy and redirect entries."""
    if not xattrs and redirect is None:
        return b""
    body = [_XATTR_HEADER.pack(0, 0)]
    body.extend(_xattr_entry(name, value) for name, value in xattrs.items())
    if redirect is not None:
        body.append(_METACOPY_ENTRY)
        body.append(_xattr_entry(REDIRECT, redirect))
    return b"".join(body)


def _dir_blocks(names: list[bytes]) -> list[list[bytes]]:
    """Sorted names split into directory blocks: each holds its dirents, then their names."""
    blocks: list[list[bytes]] = [[]]
    used = 0
    for name in names:
        need = _DIRENT.size + len(name)
        if used + need > BLOCK:
            blocks.append([])
            used = 0
        blocks[-1].append(name)
        used += need
    return blocks


def _dir_size(blocks: list[list[bytes]]) -> int:
    last = sum(_DIRENT.size + len(name) for name in blocks[-1])
    return (len(blocks) - 1) * BLOCK + last


def _new_encode_dev(rdev: int) -> int:
    major, minor = os.major(rdev), os.minor(rdev)
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


class _Node:
    __slots__ = ("ino", "mode", "xattrs", "layout", "data", "names", "tail", "full_blocks", "offset", "blkaddr")

    def __init__(self, ino: int, mode: int) -> None:
        self.ino = ino
        self.mode = mode
        self.xattrs = b""
        self.layout = _FLAT_PLAIN
        self.data = b""  # a symlink's target
        self.names: list[list[bytes]] = []  # a directory's blocks of names
        self.tail = 0  # bytes of data kept inline after the inode
        self.full_blocks = 0  # data blocks after the inodes
        self.offset = 0
        self.blkaddr = 0

    def data_size(self) -> int:
        return _dir_size(self.names) if self.names else len(self.data)

    def record_size(self) -> int:
        return _INODE_SIZE + len(self.xattrs) + (4 if self.layout == _CHUNK_BASED else self.tail)


def redirect_paths(index: Index, files: Iterable[int] | None = None) -> dict[int, bytes]:
    """Each regular file's path in the data layers: its first name in a walk of the tree (hard links share it).

    `files`: only these regular files' paths (a hot layer's). A file named once is found from its directory up,
    without walking the whole tree (75 ms on a large image, on the path of a first start); a file that no walk
    from the root reaches has none.
    """
    if files is None:
        return _first_names(index)
    paths: dict[int, bytes] = {}
    linked = []
    names_by_directory: dict[int, dict[int, bytes]] = {}
    directory_paths = {1: b""}
    for ino in files:
        if index.attributes(ino).nlink > 1:
            linked.append(ino)
            continue
        path = _path_up(index, ino, names_by_directory, directory_paths)
        if path is not None:
            paths[ino] = path
    if linked:
        first_names = _first_names(index)
        paths.update((ino, first_names[ino]) for ino in linked if ino in first_names)
    return paths


def _first_names(index: Index) -> dict[int, bytes]:
    paths: dict[int, bytes] = {}
    for relative, ino in index.walk():
        if ino not in paths and stat.S_ISREG(index.mode(ino)):
            paths[ino] = b"/" + relative
    return paths


def _path_up(index: Index, ino: int, names_by_directory: dict[int, dict[int, bytes]],
             directory_paths: dict[int, bytes]) -> bytes | None:
    """`ino`'s path through its parent directories; None if one does not name it or they never reach the root."""
    steps: list[tuple[int, bytes]] = []
    while ino not in directory_paths:
        parent = index.parent(ino)
        names = names_by_directory.get(parent)
        if names is None:
            names = names_by_directory[parent] = {}
            if stat.S_ISDIR(index.mode(parent)):
                for _, name, child in index.children(parent):
                    names.setdefault(child, name)
        name = names.get(ino)
        if name is None or len(steps) > index.entries:  # the bound: directories in a cycle off the root
            return None
        steps.append((ino, name))
        ino = parent
    path = directory_paths[ino]
    for ino, name in reversed(steps):
        path += b"/" + name
        if stat.S_ISDIR(index.mode(ino)):
            directory_paths[ino] = path
    return path


def write_image(index: Index, path: str, redirects: dict[int, bytes]) -> int:
    """Write the EROFS metadata image of `index` to `path` (atomically); returns its size in bytes.

    `redirects` is `redirect_paths(index)`. Raises UnsupportedTree when an entry cannot be expressed (the caller
    then serves the tree from FUSE alone).
    """
    image = image_bytes(index, redirects)
    save_image(image, path)
    return len(image)


def save_image(image: bytes | bytearray, path: str) -> None:
    """Write an image file under its final name only once it is whole."""
    temporary = f"{path}.{os.getpid()}.tmp"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(temporary, "wb") as file:
            file.write(image)
        os.rename(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def cached_image_path(cache_directory: str, reference: str) -> str:
    return os.path.join(cache_directory, CACHE_DIRECTORY, reference)


def stored_image(index: Index) -> bytes | None:
    """The digest of the metadata image pushed beside the index; None when there is none, or it shows another tree.
    It reads the index's header and hashes its body, so it may run while the index is validated."""
    from . import objects

    named = index.metadata.get(INDEX_METADATA_KEY)
    if not isinstance(named, dict) or named.get("tree") != index.body_digest().hex():
        return None
    try:
        return objects.parse_reference(str(named.get("image")))
    except FsError as error:
        log.warning("the index names no usable EROFS image: %s", error)
        return None


def fetch_image(store: ChunkStore, digest: bytes) -> bytes | None:
    """The stored metadata image `digest`, verified against it; None when the store has none or a corrupt one (the
    caller writes one instead)."""
    from . import objects
    from .index import MAX_INDEX_SIZE

    try:
        return objects.decode(digest, store.get(digest), MAX_INDEX_SIZE)
    except FsError as error:
        log.warning("the stored EROFS image %s is not used: %s", digest.hex(), error)
        return None


def image_bytes(index: Index, redirects: dict[int, bytes]) -> bytearray:
    """The EROFS metadata image of `index` (see `write_image`)."""
    parents: dict[int, int] = {1: 1}
    nodes: list[_Node] = []
    cursor = BLOCK
    for ino in range(1, index.entries + 1):
        mode = index.mode(ino)
        xattrs = index.xattrs(ino)
        if any(name.startswith(_OVERLAY_PREFIX) for name in xattrs):
            # The image's own overlay xattrs, escaped, so overlayfs shows them and does not act on them.
            xattrs = {(_OVERLAY_PREFIX + b"overlay." + name[len(_OVERLAY_PREFIX):]
                       if name.startswith(_OVERLAY_PREFIX) else name): value for name, value in xattrs.items()}
        node = _Node(ino, mode)
        redirect = None
        if stat.S_ISREG(mode) and index.file_size(ino):
            node.layout = _CHUNK_BASED
            if index.has_data(ino):
                redirect = redirects[ino]
        elif stat.S_ISDIR(mode):
            names = [b".", b".."]
            for _, name, child in index.children(ino):
                names.append(name)
                if stat.S_ISDIR(index.mode(child)):
                    parents[child] = ino
            node.names = _dir_blocks(sorted(names))
        elif stat.S_ISLNK(mode):
            node.data = index.symlink_target(ino)
        node.xattrs = _encode_xattrs(xattrs, redirect)
        size = node.data_size()
        if size:
            node.tail = size % BLOCK
            node.full_blocks = size // BLOCK
            if node.tail and _INODE_SIZE + len(node.xattrs) + node.tail <= BLOCK:
                node.layout = _FLAT_INLINE
                tail_start = cursor + _INODE_SIZE + len(node.xattrs)
                if tail_start // BLOCK != (tail_start + node.tail - 1) // BLOCK:
                    cursor = _align(cursor, BLOCK)  # inline data must not cross a block boundary
            elif node.tail:
                node.full_blocks += 1
                node.tail = 0
        node.offset = cursor
        cursor = _align(cursor + node.record_size(), 32)
        nodes.append(node)
    if nodes[0].offset // 32 > 0xFFFF:
        raise UnsupportedTree("the root inode lies beyond EROFS's 16-bit root nid")
    blkaddr = _align(cursor, BLOCK) // BLOCK
    for node in nodes:
        if node.full_blocks:
            node.blkaddr = blkaddr
            blkaddr += node.full_blocks
    image = bytearray(blkaddr * BLOCK)
    nid = {node.ino: node.offset // 32 for node in nodes}
    for node in nodes:
        _write_node(image, index, node, nid, parents)
    image[_SUPERBLOCK_OFFSET: _SUPERBLOCK_OFFSET + _SUPERBLOCK.size] = _SUPERBLOCK.pack(
        MAGIC, 0, 0, BLOCK_BITS, 0, nid[1], index.entries, 0, 0, blkaddr, 0, 0, bytes(16), b"coldbrew".ljust(16, b"\0"),
        _FEATURE_INCOMPAT_CHUNKED_FILE, 0, 0, 0, 0, 0, 0, 0, 0)
    return image


def _write_node(image: bytearray, index: Index, node: _Node, nid: dict[int, int], parents: dict[int, int]) -> None:
    attributes = index.attributes(node.ino)
    mode = node.mode
    if node.layout == _CHUNK_BASED:
        chunk_bits = max(BLOCK_BITS, (attributes.size - 1).bit_length())
        if chunk_bits > _MAX_CHUNK_BITS:
            raise UnsupportedTree(f"inode {node.ino}: {attributes.size} bytes is too large for one EROFS chunk")
        i_u = chunk_bits - BLOCK_BITS
        data = b""
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        i_u = _new_encode_dev(attributes.rdev)
        data = b""
    else:
        i_u = node.blkaddr
        if node.names:
            data = _dir_data(node, index, nid, parents)
        else:
            data = node.data
    size = attributes.size if stat.S_ISREG(mode) else len(data)
    xattr_count = (len(node.xattrs) - _XATTR_HEADER.size) // 4 + 1 if node.xattrs else 0
    seconds, nanoseconds = divmod(attributes.mtime_ns, 1_000_000_000)
    position = node.offset
    record = _INODE.pack((node.layout << 1) | 1, xattr_count, mode & 0xFFFF, 0, size, i_u, node.ino,
                         attributes.uid, attributes.gid, seconds, nanoseconds, attributes.nlink)
    record += node.xattrs
    if node.layout == _CHUNK_BASED:
        record += _NULL_ADDR
    elif node.layout == _FLAT_INLINE:
        record += data[node.full_blocks * BLOCK:]
    image[position: position + len(record)] = record
    if node.full_blocks:
        blocks = data[: node.full_blocks * BLOCK]
        start = node.blkaddr * BLOCK
        image[start: start + len(blocks)] = blocks


def _dir_data(node: _Node, index: Index, nid: dict[int, int], parents: dict[int, int]) -> bytes:
    children = {name: child for _, name, child in index.children(node.ino)}
    children[b"."] = node.ino
    children[b".."] = parents[node.ino]
    data = bytearray()
    for number, names in enumerate(node.names):
        dirents = bytearray()
        name_offset = _DIRENT.size * len(names)
        for name in names:
            child = children[name]
            dirents += _DIRENT.pack(nid[child], name_offset, _FILE_TYPES[stat.S_IFMT(index.mode(child))], 0)
            name_offset += len(name)
        block = dirents + b"".join(names)
        if number < len(node.names) - 1:
            block += bytes(BLOCK - len(block))
        data += block
    return bytes(data)
