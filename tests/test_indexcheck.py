"""Index validation against its rules read entry by entry: column-wide numpy checks must refuse exactly the indexes
that a plain reading of the rules refuses, whatever values (huge, wrapped, off by one) an attacker puts in a column."""

from __future__ import annotations

import stat

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coldbrew.fs.errors import BadIndex
from coldbrew.fs.index import COLUMNS, MAX_CHUNK_SIZE, MAX_NAME, MAX_SYMLINK, Chunk, Index, IndexBuilder

FILE_TYPES = {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK}
LIMITS = {"I": (1 << 32) - 1, "Q": (1 << 64) - 1, "q": (1 << 63) - 1, "B": 255}


def follows_the_rules(index: Index) -> bool:
    """Whether the index is valid, rule by rule and entry by entry."""
    column = {name: index.column(name).tolist() for name in COLUMNS}
    heap = bytes(column["heap"])
    chunks_taken = dirents_taken = 0
    named = {1}
    for i in range(index.entries):
        kind, first, count = stat.S_IFMT(column["mode"][i]), column["ref_first"][i], column["ref_count"][i]
        if kind not in FILE_TYPES or (i == 0 and kind != stat.S_IFDIR):
            return False
        if not (1 <= column["parent"][i] <= index.entries
                and column["xattr_first"][i] + column["xattr_count"][i] <= index.xattr_count):
            return False
        if kind == stat.S_IFREG:
            if first != chunks_taken or first + count > index.chunk_count:
                return False
            chunks_taken += count
            end = 0
            for c in range(first, first + count):
                offset, length = column["chunk_offset"][c], column["chunk_length"][c]
                if not 1 <= length <= MAX_CHUNK_SIZE or offset < end or offset + length > column["size"][i]:
                    return False
                end = offset + length
        elif kind == stat.S_IFDIR:
            if first != dirents_taken or first + count > index.dirent_count:
                return False
            dirents_taken += count
            previous = None
            for d in range(first, first + count):
                offset, length = column["dirent_name_off"][d], column["dirent_name_len"][d]
                name = heap[offset: offset + length]
                if not 1 <= length <= MAX_NAME or offset + length > len(heap):
                    return False
                if b"/" in name or b"\0" in name or name in (b".", b".."):
                    return False
                if previous is not None and name <= previous:
                    return False
                previous = name
                child = column["dirent_ino"][d]
                if not 1 <= child <= index.entries:
                    return False
                if stat.S_ISDIR(column["mode"][child - 1]):
                    if child in named or column["parent"][child - 1] != i + 1:
                        return False
                    named.add(child)
        elif kind == stat.S_IFLNK:
            if not 0 < count <= MAX_SYMLINK or first + count > len(heap) or b"\0" in heap[first: first + count]:
                return False
        elif first or count:
            return False
    if chunks_taken != index.chunk_count or dirents_taken != index.dirent_count:
        return False
    for x in range(index.xattr_count):
        for offset, length in ((column["xattr_name_off"][x], column["xattr_name_len"][x]),
                               (column["xattr_value_off"][x], column["xattr_value_len"][x])):
            if offset + length > len(heap):
                return False
        if not 1 <= column["xattr_name_len"][x] <= MAX_NAME:
            return False
    return True


names = st.binary(min_size=1, max_size=20).filter(lambda name: name not in (b".", b".."))
# Long targets without "/" or NUL: a name's length patched past MAX_NAME then still reads as a name.
targets = st.binary(min_size=1, max_size=300).map(lambda target: target.replace(b"\0", b"x").replace(b"/", b"y"))


@st.composite
def indexes(draw) -> bytearray:
    """A valid index of a few directories, files of several chunks, symlinks, special files and xattrs."""
    builder = IndexBuilder()
    dirs = [builder.add(mode=stat.S_IFDIR | 0o755)]
    children: dict[int, dict[bytes, int]] = {dirs[0]: {}}
    for _ in range(draw(st.integers(0, 12))):
        parent = draw(st.sampled_from(dirs))
        name = draw(names.filter(lambda n: b"/" not in n and b"\0" not in n and n not in children[parent]))
        kind = draw(st.sampled_from(["dir", "file", "link", "fifo"]))
        xattrs = draw(st.lists(st.tuples(st.binary(min_size=1, max_size=8), st.binary(max_size=8)), max_size=2,
                               unique_by=lambda pair: pair[0]))
        if kind == "dir":
            ino = builder.add(mode=stat.S_IFDIR | 0o755, parent=parent, xattrs=xattrs)
            dirs.append(ino)
            children[ino] = {}
        elif kind == "file":
            lengths = draw(st.lists(st.integers(1, 50), max_size=3))
            starts = [sum(lengths[:k]) for k in range(len(lengths))]
            ino = builder.add(mode=stat.S_IFREG | 0o644, parent=parent, size=sum(lengths), xattrs=xattrs,
                              chunks=[Chunk(bytes([k]) * 32, start, length)
                                      for k, (start, length) in enumerate(zip(starts, lengths))])
        elif kind == "link":
            ino = builder.add(mode=stat.S_IFLNK | 0o777, parent=parent,
                              symlink=draw(targets))
        else:
            ino = builder.add(mode=stat.S_IFIFO | 0o644, parent=parent, xattrs=xattrs)
        children[parent][name] = ino
    for ino, named in children.items():
        builder.set_children(ino, list(named.items()))
    return bytearray(builder.build())


@st.composite
def patches(draw, index: Index) -> list[tuple[str, int, int]]:
    """A few (column, row, value) changes: values near the column's own, near its bounds, or anything."""
    changes = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from([name for name in COLUMNS if len(index.column(name))]))
        column = index.column(name)
        row = draw(st.integers(0, len(column) - 1))
        limit = LIMITS[column.format]
        value = draw(st.one_of(
            st.integers(max(0, column[row] - 2), min(limit, column[row] + 2)),
            st.sampled_from([0, 1, limit, limit - 1, 1 << 31, 1 << 32, 1 << 63, MAX_NAME + 1, MAX_SYMLINK + 1,
                             index.entries, len(index.column("heap"))]),
            st.integers(0, limit)).filter(lambda v: v <= limit))
        changes.append((name, row, value))
    return changes


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(indexes(), st.data())
def test_validation_refuses_exactly_what_the_rules_refuse(data: bytearray, draw) -> None:
    index = Index(memoryview(data))
    index.validate()  # as built
    assert follows_the_rules(index)
    for name, row, value in draw.draw(patches(index)):
        index.column(name)[row] = value
    try:
        index.validate()
        refused = None
    except BadIndex as error:
        refused = error
    assert (refused is None) == follows_the_rules(index), refused
