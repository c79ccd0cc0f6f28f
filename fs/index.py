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
from dataclasses import dataclass
from typing import Iterator

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
        """Refuse a malformed or hostile index: every reference in bounds, names safe, the directories a tree
        (raises BadIndex). Checks run column-wide, with numpy (`coldbrew.fs.indexcheck`, imported here: only an
        index that no cache remembers valid needs it)."""
        from .indexcheck import validate

        validate(self)

    def column(self, name: str) -> memoryview:
        """One of `COLUMNS`, cast in place to its typecode."""
        return getattr(self, "_" + name)
