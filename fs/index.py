"""The image index: a whole tree's metadata and chunk lists in one content-addressed object.

Usable the moment it is local, without parsing: a small JSON header, then fixed-width little-endian columns
(struct of arrays) and a heap of names, symlink targets and xattrs. The reader casts each column from the
mapped bytes (`memoryview.cast`), so opening a 100k-entry index costs a header parse, and a lookup is a binary
search over one directory's sorted entries.

Inode numbers are assigned at push time: entry `i` of the columns is inode `i + 1`, the root is inode 1 (FUSE's
root inode), so a FUSE inode is an index position.

Per entry: mode, uid, gid, nlink, size, mtime (ns), rdev, a reference (`ref_first`, `ref_count`: a directory's
range of dirents, a regular file's range of chunks, a symlink's target in the heap), its xattrs' range, and its
parent directory. A regular file's chunks cover its data regions in order; what they do not cover is a hole.
"""

from __future__ import annotations

import json
import stat
import sys
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate, chain, compress, count, repeat
from operator import add, ge, gt, lt, or_
from typing import Iterable, Iterator, Sequence

from .errors import BadIndex
from .objects import DIGEST_SIZE

MAGIC = b"CBIDX\x00\x01\x00"
VERSION = 1
# Largest chunk a reader accepts: bounds the memory one read can make the filesystem allocate.
MAX_CHUNK_SIZE = 64 << 20
# Largest index (uncompressed) a host accepts from a store.
MAX_INDEX_SIZE = 1 << 30
MAX_NAME = 255
MAX_SYMLINK = 4095
MAX_ENTRIES = 1 << 28
MAX_HEADER = 1 << 16
# `Index.validate` comes in this many independent parts (`Index.validate_part`).
VALIDATION_PARTS = 2

# Column name -> (table, typecode). Typecodes are fixed here, never read from the file.
COLUMNS: dict[str, tuple[str, str]] = {
    "mode": ("entries", "I"),
    "uid": ("entries", "I"),
    "gid": ("entries", "I"),
    "nlink": ("entries", "I"),
    "size": ("entries", "Q"),
    "mtime_ns": ("entries", "q"),
    "rdev": ("entries", "Q"),
    "ref_first": ("entries", "Q"),
    "ref_count": ("entries", "I"),
    "xattr_first": ("entries", "I"),
    "xattr_count": ("entries", "I"),
    "parent": ("entries", "I"),
    "dirent_name_off": ("dirents", "Q"),
    "dirent_name_len": ("dirents", "I"),
    "dirent_ino": ("dirents", "I"),
    "chunk_digest": ("chunks", "B"),  # DIGEST_SIZE bytes per chunk
    "chunk_offset": ("chunks", "Q"),
    "chunk_length": ("chunks", "I"),
    "xattr_name_off": ("xattrs", "Q"),
    "xattr_name_len": ("xattrs", "I"),
    "xattr_value_off": ("xattrs", "Q"),
    "xattr_value_len": ("xattrs", "I"),
    "heap": ("heap", "B"),
}
_ITEM_SIZE = {"I": 4, "Q": 8, "q": 8, "B": 1}
# Validation reads each entry's file type as one byte, S_IFMT(mode) >> 12: the high half of the mode's second byte.
_KIND_SHIFT = 12
_FILE_TYPES = {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK}
_KIND_OF_BYTE = bytes(byte >> 4 for byte in range(256))
_UNKNOWN_KINDS = bytes(kind for kind in range(16) if kind << _KIND_SHIFT not in _FILE_TYPES)


def _kind_flags(*types: int) -> bytes:
    """A `bytes.translate` table: 1 for the kinds of `types`, else 0."""
    return bytes(int(kind << _KIND_SHIFT in types) for kind in range(256))


_IS_REG, _IS_DIR = _kind_flags(stat.S_IFREG), _kind_flags(stat.S_IFDIR)
_IS_LINK_OR_SPECIAL = _kind_flags(*_FILE_TYPES - {stat.S_IFREG, stat.S_IFDIR})
_LINK = stat.S_IFLNK >> _KIND_SHIFT

if sys.byteorder != "little":  # the columns are cast in place, which needs the file's byte order
    raise ImportError("coldbrew.fs reads its little-endian index in place and needs a little-endian host")


@dataclass(frozen=True, slots=True)
class Chunk:
    digest: bytes
    offset: int  # where the chunk's data starts in the file
    length: int


# --- writing ---------------------------------------------------------------------------------------------------

class IndexBuilder:
    """Collects entries in inode order, then serialises them. Push fills it; tests and imports can too.

    Entries are added with `add`, which returns the inode number; a directory's children are given once with
    `set_children` (names are sorted here, so lookups can bisect).
    """

    def __init__(self) -> None:
        self._entries: list[list[int]] = []
        self._children: dict[int, list[tuple[bytes, int]]] = {}
        self._chunks: dict[int, list[Chunk]] = {}
        self._symlinks: dict[int, bytes] = {}
        self._xattrs: dict[int, list[tuple[bytes, bytes]]] = {}
        self.metadata: dict = {}

    def add(self, *, mode: int, uid: int = 0, gid: int = 0, size: int = 0, mtime_ns: int = 0, rdev: int = 0,
            parent: int = 1, chunks: list[Chunk] | None = None, symlink: bytes | None = None,
            xattrs: list[tuple[bytes, bytes]] | None = None) -> int:
        ino = len(self._entries) + 1
        # [mode, uid, gid, nlink, size, mtime_ns, rdev, parent]; nlink is counted from the dirents at build.
        self._entries.append([mode, uid, gid, 0, size, mtime_ns, rdev, parent])
        if chunks:
            self._chunks[ino] = chunks
        if symlink is not None:
            self._symlinks[ino] = symlink
            self._entries[-1][4] = len(symlink)
        if xattrs:
            self._xattrs[ino] = sorted(xattrs)
        return ino

    def set_children(self, ino: int, children: list[tuple[bytes, int]]) -> None:
        self._children[ino] = sorted(children)

    def set_chunks(self, ino: int, chunks: list[Chunk]) -> None:
        self._chunks[ino] = chunks

    @property
    def entry_count(self) -> int:
        return len(self._entries)

    def build(self) -> bytes:
        from array import array

        n = len(self._entries)
        if n == 0 or not stat.S_ISDIR(self._entries[0][0]):
            raise BadIndex("entries[1]", "the root must be a directory")
        cols = {name: array(code if code != "B" else "B") for name, (_, code) in COLUMNS.items()}
        heap = bytearray()
        names: dict[bytes, int] = {}

        def heap_add(data: bytes) -> int:
            # Names repeat a lot across a tree (__init__.py, METADATA): store each once.
            offset = names.get(data)
            if offset is None:
                offset = names[data] = len(heap)
                heap.extend(data)
            return offset

        nlink = [0] * (n + 1)
        nlink[1] = 2  # the root: "." and its own ".."
        for ino in range(1, n + 1):
            mode, uid, gid, _, size, mtime_ns, rdev, parent = self._entries[ino - 1]
            kind = stat.S_IFMT(mode)
            if kind == stat.S_IFDIR:
                children = self._children.get(ino, [])
                ref_first, ref_count = len(cols["dirent_ino"]), len(children)
                for name, child in children:
                    if not 1 <= child <= n:
                        raise BadIndex(f"entries[{ino}]", f"child {name!r} names inode {child}, not an entry")
                    cols["dirent_name_off"].append(heap_add(name))
                    cols["dirent_name_len"].append(len(name))
                    cols["dirent_ino"].append(child)
                    nlink[child] += 1
                    if stat.S_ISDIR(self._entries[child - 1][0]):
                        nlink[child] += 1  # its own "."
                        nlink[ino] += 1  # the child's ".."
            elif kind == stat.S_IFREG:
                chunks = self._chunks.get(ino, [])
                ref_first, ref_count = len(cols["chunk_offset"]), len(chunks)
                for chunk in chunks:
                    cols["chunk_digest"].frombytes(chunk.digest)
                    cols["chunk_offset"].append(chunk.offset)
                    cols["chunk_length"].append(chunk.length)
            elif kind == stat.S_IFLNK:
                target = self._symlinks[ino]
                ref_first, ref_count = len(heap), len(target)
                heap.extend(target)
            else:
                ref_first = ref_count = 0
            xattrs = self._xattrs.get(ino, [])
            cols["xattr_first"].append(len(cols["xattr_name_off"]))
            cols["xattr_count"].append(len(xattrs))
            for name, value in xattrs:
                cols["xattr_name_off"].append(heap_add(name))
                cols["xattr_name_len"].append(len(name))
                cols["xattr_value_off"].append(len(heap))
                cols["xattr_value_len"].append(len(value))
                heap.extend(value)
            for column, value in (("mode", mode), ("uid", uid), ("gid", gid), ("size", size),
                                  ("mtime_ns", mtime_ns), ("rdev", rdev), ("ref_first", ref_first),
                                  ("ref_count", ref_count), ("parent", parent)):
                cols[column].append(value)
        cols["nlink"].extend(nlink[1:])
        cols["heap"].frombytes(bytes(heap))

        layout: dict[str, list[int]] = {}
        body = bytearray()
        for name in COLUMNS:
            data = cols[name].tobytes()
            body.extend(b"\0" * (-len(body) % 8))  # aligned columns cast without copies
            layout[name] = [len(body), len(data)]
            body.extend(data)
        header = json.dumps({"version": VERSION, "entries": n, "columns": layout, "metadata": self.metadata},
                            separators=(",", ":"), sort_keys=True).encode()
        prefix_len = len(MAGIC) + 4 + len(header)
        padding = -prefix_len % 8
        return MAGIC + (len(header) + padding).to_bytes(4, "little") + header + b" " * padding + bytes(body)


# --- reading ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Attributes:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    mtime_ns: int
    rdev: int
    blocks: int  # 512-byte blocks holding data: sparse files report what their chunks cover


class Index:
    """A read-only view of a serialised index (bytes, or an mmap of the cached index file).

    Construct with `Index(data)`, which checks the header and the column bounds; call `validate()` once on an index
    that came from anywhere untrusted before serving it (a mount does, unless the cache remembers it valid).
    """

    def __init__(self, data: bytes | memoryview) -> None:
        self._view = memoryview(data)
        self.size = len(self._view)
        if bytes(self._view[: len(MAGIC)]) != MAGIC:
            raise BadIndex("", "not a coldbrew index (bad magic or unsupported version)")
        header_len = int.from_bytes(self._view[len(MAGIC): len(MAGIC) + 4], "little")
        if header_len > MAX_HEADER or len(MAGIC) + 4 + header_len > self.size:
            raise BadIndex("header", f"length {header_len} is out of bounds")
        body_start = len(MAGIC) + 4 + header_len
        self._body_start = body_start
        try:
            header = json.loads(bytes(self._view[len(MAGIC) + 4: body_start]))
        except (ValueError, UnicodeDecodeError) as error:
            raise BadIndex("header", f"not JSON ({error})") from None
        if not isinstance(header, dict) or header.get("version") != VERSION:
            raise BadIndex("header.version", f"unsupported version {header.get('version') if isinstance(header, dict) else header!r}")
        self.metadata = header.get("metadata") if isinstance(header.get("metadata"), dict) else {}
        entries = header.get("entries")
        if not isinstance(entries, int) or isinstance(entries, bool) or not 1 <= entries <= MAX_ENTRIES:
            raise BadIndex("header.entries", f"{entries!r} is not a count between 1 and {MAX_ENTRIES}")
        self.entries = entries
        layout = header.get("columns")
        if not isinstance(layout, dict):
            raise BadIndex("header.columns", "missing")
        counts: dict[str, int] = {}
        body = self._view[body_start:]
        for name, (table, code) in COLUMNS.items():
            place = layout.get(name)
            if (not isinstance(place, list) or len(place) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in place)):
                raise BadIndex(f"header.columns.{name}", f"{place!r} is not [offset, length]")
            offset, length = place
            if offset + length > len(body) or offset % 8:
                raise BadIndex(f"header.columns.{name}", f"[{offset}, {length}] is out of bounds or unaligned")
            width = _ITEM_SIZE[code] * (DIGEST_SIZE if name == "chunk_digest" else 1)
            if length % width:
                raise BadIndex(f"header.columns.{name}", f"length {length} is not a multiple of {width}")
            count = length // width
            if table in counts and counts[table] != count and table != "heap":
                raise BadIndex(f"header.columns.{name}", f"has {count} rows, its table {table} has {counts[table]}")
            counts.setdefault(table, count)
            setattr(self, "_" + name, body[offset: offset + length].cast(code))
        if counts["entries"] != entries:
            raise BadIndex("header.entries", f"says {entries}, the columns hold {counts['entries']}")
        self.dirent_count = counts["dirents"]
        self.chunk_count = counts["chunks"]
        self.xattr_count = counts["xattrs"]
        self._heap_bytes = self._heap

    def release(self) -> None:
        """Drop every view of the underlying buffer (an mmap cannot close while views exist)."""
        for name in COLUMNS:
            getattr(self, "_" + name).release()
        self._view.release()

    # -- queries; `ino` is 1-based and must be valid (the mount only hands out inodes it got from here) --

    def attributes(self, ino: int) -> Attributes:
        i = ino - 1
        mode = self._mode[i]
        size = self._size[i]
        if stat.S_ISREG(mode):
            first, count = self._ref_first[i], self._ref_count[i]
            covered = sum(self._chunk_length[first: first + count])
        else:
            covered = size
        return Attributes(ino, mode, self._uid[i], self._gid[i], self._nlink[i], size, self._mtime_ns[i],
                          self._rdev[i], (covered + 511) // 512)

    def mode(self, ino: int) -> int:
        return self._mode[ino - 1]

    def file_size(self, ino: int) -> int:
        return self._size[ino - 1]

    def parent(self, ino: int) -> int:
        return self._parent[ino - 1]

    def _name(self, dirent: int) -> bytes:
        offset = self._dirent_name_off[dirent]
        return bytes(self._heap_bytes[offset: offset + self._dirent_name_len[dirent]])

    def lookup(self, parent: int, name: bytes) -> int | None:
        """The inode of `name` in directory `parent`, or None."""
        i = parent - 1
        if not stat.S_ISDIR(self._mode[i]):
            return None
        low = self._ref_first[i]
        high = low + self._ref_count[i]
        while low < high:
            middle = (low + high) // 2
            found = self._name(middle)
            if found < name:
                low = middle + 1
            elif found > name:
                high = middle
            else:
                return self._dirent_ino[middle]
        return None

    def children(self, ino: int, start: int = 0) -> Iterator[tuple[int, bytes, int]]:
        """(position, name, inode) of a directory's entries from position `start`, in name order."""
        i = ino - 1
        first = self._ref_first[i]
        for position in range(start, self._ref_count[i]):
            yield position, self._name(first + position), self._dirent_ino[first + position]

    def child_count(self, ino: int) -> int:
        return self._ref_count[ino - 1]

    def body_digest(self) -> bytes:
        """blake3 of everything after the header: the tree itself, whatever metadata the header carries."""
        from .objects import digest_of

        return digest_of(self._view[self._body_start:])

    def has_data(self, ino: int) -> bool:
        """Whether a regular file has any chunk (a file of holes alone has none)."""
        return self._ref_count[ino - 1] > 0

    def chunks(self, ino: int) -> list[Chunk]:
        i = ino - 1
        first = self._ref_first[i]
        digests = self._chunk_digest
        return [Chunk(bytes(digests[c * DIGEST_SIZE: (c + 1) * DIGEST_SIZE]), self._chunk_offset[c],
                      self._chunk_length[c])
                for c in range(first, first + self._ref_count[i])]

    def symlink_target(self, ino: int) -> bytes:
        i = ino - 1
        offset = self._ref_first[i]
        return bytes(self._heap_bytes[offset: offset + self._ref_count[i]])

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        i = ino - 1
        first = self._xattr_first[i]
        heap = self._heap_bytes
        result = {}
        for x in range(first, first + self._xattr_count[i]):
            name_off, value_off = self._xattr_name_off[x], self._xattr_value_off[x]
            result[bytes(heap[name_off: name_off + self._xattr_name_len[x]])] = \
                bytes(heap[value_off: value_off + self._xattr_value_len[x]])
        return result

    def data_bytes(self) -> int:
        """Bytes of file data the chunks hold, duplicates included (what `du` of the tree would count)."""
        return sum(self._chunk_length)

    def all_chunks(self) -> Iterator[Chunk]:
        """Every chunk reference of every file, in inode order (duplicates included)."""
        digests = self._chunk_digest
        for c in range(self.chunk_count):
            yield Chunk(bytes(digests[c * DIGEST_SIZE: (c + 1) * DIGEST_SIZE]), self._chunk_offset[c],
                        self._chunk_length[c])

    def walk(self) -> Iterator[tuple[bytes, int]]:
        """(path relative to the root, inode) of every entry, the root (b"") first, parents before children."""
        pending = [(b"", 1)]
        while pending:
            path, ino = pending.pop()
            yield path, ino
            if stat.S_ISDIR(self._mode[ino - 1]):
                prefix = path + b"/" if path else b""
                pending.extend((prefix + name, child) for _, name, child in reversed(list(self.children(ino))))

    # -- validation ----------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Refuse a malformed or hostile index: every reference in bounds, names safe, the directories a tree.

        Checks run column-wide in C (`map`, `compress`, `min`/`max` over lists of the columns, `bytes.translate`
        over the entries' file types, one byte each), entry by entry only to name what is wrong: validating a large
        image's index is on the path of its first start. They come in `VALIDATION_PARTS` parts that share nothing,
        so that a mount can run them at once (`validate_part`).
        """
        for part in range(VALIDATION_PARTS):
            self.validate_part(part)

    def validate_part(self, part: int) -> None:
        """Part 0 of `validate`: the entries' references, their chunks and xattrs; part 1: the directory tree."""
        heap = self._heap_bytes.tobytes()
        kinds = bytes(self._mode.cast("B")[1::4]).translate(_KIND_OF_BYTE)  # S_IFMT(mode) >> 12 of each entry
        if kinds[0] != stat.S_IFDIR >> _KIND_SHIFT:
            raise BadIndex("entries[1]", "the root is not a directory")
        if kinds.translate(None, _UNKNOWN_KINDS) != kinds:
            i = _first_true(map(_UNKNOWN_KINDS.__contains__, kinds))
            raise BadIndex(f"entries[{i + 1}]", f"mode {self._mode[i]:o} is no file type")
        ref_first, ref_count = self._ref_first.tolist(), self._ref_count.tolist()
        if part == 0:
            self._validate_entries(kinds, ref_first, ref_count, heap)
            files = _rows_of_kind(kinds, _IS_REG)
            self._validate_chunks(files, _tiling(files, ref_first, ref_count, self.chunk_count, "chunks"))
            self._validate_xattrs(len(heap))
        else:
            dirs = _rows_of_kind(kinds, _IS_DIR)
            dirent_counts = _tiling(dirs, ref_first, ref_count, self.dirent_count, "dirents")
            self._validate_tree(kinds, dirs, dirent_counts, heap)

    def _validate_entries(self, kinds: bytes, ref_first: list[int], ref_count: list[int], heap: bytes) -> None:
        """Symlink targets and special files' references, xattr ranges, parents."""
        for i in _rows_of_kind(kinds, _IS_LINK_OR_SPECIAL):
            first, count = ref_first[i], ref_count[i]
            if kinds[i] == _LINK:
                if not 0 < count <= MAX_SYMLINK or first + count > len(heap):
                    raise BadIndex(f"entries[{i + 1}]", f"symlink target [{first}, +{count}] out of bounds")
                if b"\0" in heap[first: first + count]:
                    raise BadIndex(f"entries[{i + 1}]", "symlink target holds a NUL byte")
            elif first or count:
                raise BadIndex(f"entries[{i + 1}]", "a special file refers to data")
        i = _first_outside(list(map(add, self._xattr_first, self._xattr_count)), 0, self.xattr_count)
        if i is not None:
            raise BadIndex(f"entries[{i + 1}]",
                           f"xattrs [{self._xattr_first[i]}, +{self._xattr_count[i]}] out of bounds")
        i = _first_outside(self._parent, 1, self.entries)
        if i is not None:
            raise BadIndex(f"entries[{i + 1}]", f"parent {self._parent[i]} out of bounds")

    def _validate_chunks(self, files: list[int], counts: list[int]) -> None:
        """Each file's chunks (consecutive, see `_tiling`) inside it and, in a file of several, each starting at or
        after the end of the one before it."""
        offsets, lengths = self._chunk_offset.tolist(), self._chunk_length.tolist()
        c = _first_outside(lengths, 1, MAX_CHUNK_SIZE)
        if c is not None:
            raise BadIndex(f"chunks[{c}]", f"length {lengths[c]} out of bounds")
        ends = list(map(add, offsets, lengths))
        sizes = self._size.tolist()
        owner_sizes = chain.from_iterable(map(repeat, map(sizes.__getitem__, files), counts))
        c = _first_true(map(gt, ends, owner_sizes))
        if c is None:  # most files are one chunk: the few of several are read chunk by chunk
            for f in compress(count(), map(gt, counts, repeat(1))):
                first = self._ref_first[files[f]]
                end = first + counts[f]
                starts_early = map(lt, offsets[first + 1: end], ends[first: end - 1])
                c = next(compress(range(first + 1, end), starts_early), None)
                if c is not None:
                    break
            else:
                return
        size = sizes[files[bisect_right(list(accumulate(counts)), c)]]
        raise BadIndex(f"chunks[{c}]", f"[{offsets[c]}, +{lengths[c]}] overlaps or lies outside its file of "
                                       f"{size} bytes")

    def _validate_xattrs(self, heap_size: int) -> None:
        for x in range(self.xattr_count):
            for offset, length in ((self._xattr_name_off[x], self._xattr_name_len[x]),
                                   (self._xattr_value_off[x], self._xattr_value_len[x])):
                if offset + length > heap_size:
                    raise BadIndex(f"xattrs[{x}]", "out of the heap")
            if not 0 < self._xattr_name_len[x] <= MAX_NAME:
                raise BadIndex(f"xattrs[{x}]", "name length out of bounds")

    def _validate_tree(self, kinds: bytes, dirs: list[int], counts: list[int], heap: bytes) -> None:
        """Dirent names safe and sorted within each directory, inodes in bounds, each directory below the root
        named exactly once, by its parent (no cycles, no directory hardlinks)."""
        lengths, inodes = self._dirent_name_len.tolist(), self._dirent_ino.tolist()
        name_ends = list(map(add, self._dirent_name_off, lengths))
        d = _first_outside(lengths, 1, MAX_NAME)
        if d is None:
            d = _first_outside(name_ends, 0, len(heap))
        if d is not None:
            raise BadIndex(f"dirents[{d}]", "name out of bounds")
        names = list(map(heap.__getitem__, map(slice, self._dirent_name_off, name_ends)))
        joined = b"".join(names)
        if b"/" in joined or b"\0" in joined or b"." in names or b".." in names:
            d = _first_true(b"/" in name or b"\0" in name or name in (b".", b"..") for name in names)
            raise BadIndex(f"dirents[{d}]", f"name {names[d]!r} is not a file name")
        out_of_order = [False, *map(ge, names[:-1], names[1:])]
        for first in accumulate(counts[:-1], initial=0):
            if first < len(out_of_order):
                out_of_order[first] = False  # a directory's first name follows no other
        d = _first_true(out_of_order)
        if d is not None:
            raise BadIndex(f"dirents[{d}]", f"name {names[d]!r} is out of order or repeated")
        d = _first_outside(inodes, 1, self.entries)
        if d is not None:
            raise BadIndex(f"dirents[{d}]", f"inode {inodes[d]} out of bounds")
        owners = list(chain.from_iterable(map(repeat, map(add, dirs, repeat(1)), counts)))
        named = {1}
        is_dir_by_ino = (b"\0" + kinds).translate(_IS_DIR)
        for d in compress(range(len(inodes)), map(is_dir_by_ino.__getitem__, inodes)):
            child = inodes[d]
            if child in named or self._parent[child - 1] != owners[d]:
                raise BadIndex(f"dirents[{d}]", f"directory {child} is linked twice or from the wrong parent")
            named.add(child)


def _first_true(flags: Iterable[object]) -> int | None:
    """The position of the first true flag, or None."""
    return next(compress(count(), flags), None)


def _first_outside(column: Sequence[int], low: int, high: int) -> int | None:
    """The position of the first value of `column` outside [low, high], or None."""
    if not column or (min(column) >= low and max(column) <= high):
        return None
    return _first_true(map(or_, map(lt, column, repeat(low)), map(gt, column, repeat(high))))


def _rows_of_kind(kinds: bytes, flags: bytes) -> list[int]:
    """The rows whose kind `flags` (a `_kind_flags` table) marks."""
    return list(compress(range(len(kinds)), kinds.translate(flags)))


def _tiling(rows: list[int], ref_first: list[int], ref_count: list[int], total: int, table: str) -> list[int]:
    """The rows' counts of `table`, checked to follow one another in row (inode) order and fill it, as
    `IndexBuilder` lays them out: each row of the table belongs to exactly one entry."""
    firsts = list(map(ref_first.__getitem__, rows))
    counts = list(map(ref_count.__getitem__, rows))
    starts = list(accumulate(counts, initial=0))
    if firsts == starts[:-1] and starts[-1] == total:
        return counts
    for row, first, length, start in zip(rows, firsts, counts, starts):
        if first + length > total:
            raise BadIndex(f"entries[{row + 1}]", f"{table} [{first}, +{length}] out of bounds")
        if first != start:
            raise BadIndex(f"entries[{row + 1}]", f"{table} [{first}, +{length}] do not follow the previous entry's")
    raise BadIndex(table, f"{total - starts[-1]} of them belong to no entry")
