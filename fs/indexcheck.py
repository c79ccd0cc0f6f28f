"""`Index.validate`: refuse a malformed or hostile index before anything is served from it.

A large image's index is validated on the path of its first start, so every rule is one numpy expression over a
whole column (the index's columns are read in place); a row is looked at alone only to name what is wrong with it.
Columns hold 64-bit values an attacker chooses: an offset is compared with its bound before it is added to
anything, so no sum wraps around, and no column indexes another before its values are known to be in bounds.
"""

from __future__ import annotations

import stat

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .errors import BadIndex
from .index import MAX_CHUNK_SIZE, MAX_NAME, MAX_SYMLINK, Index

_KIND_SHIFT = 12  # S_IFMT(mode) >> 12: a file type as a number below 16
_REG, _DIR, _LNK = stat.S_IFREG >> _KIND_SHIFT, stat.S_IFDIR >> _KIND_SHIFT, stat.S_IFLNK >> _KIND_SHIFT
_KNOWN_KIND = np.zeros(16, bool)
_KNOWN_KIND[[t >> _KIND_SHIFT for t in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                                         stat.S_IFIFO, stat.S_IFSOCK)]] = True
# Names are compared 8 bytes at a time, as big-endian words; a word's bytes past the name's end count as zero, which
# sorts as bytes comparison does because a valid name holds no NUL.
_WORD = 8
_WORD_MASKS = np.array([((1 << 8 * kept) - 1) << 8 * (_WORD - kept) for kept in range(_WORD + 1)], np.uint64)


def validate(index: Index) -> None:
    """Every reference in bounds, names safe and sorted, the directories a tree (raises BadIndex)."""
    heap = np.frombuffer(index.column("heap"), np.uint8)
    mode = np.frombuffer(index.column("mode"), np.uint32)
    kinds = ((mode >> _KIND_SHIFT) & 15).astype(np.uint8)
    if kinds[0] != _DIR:
        raise BadIndex("entries[1]", "the root is not a directory")
    i = _first(~_KNOWN_KIND[kinds])
    if i is not None:
        raise BadIndex(f"entries[{i + 1}]", f"mode {int(mode[i]):o} is no file type")
    ref_first = np.frombuffer(index.column("ref_first"), np.uint64)
    ref_count = np.frombuffer(index.column("ref_count"), np.uint32)
    _check_entries(index, kinds, ref_first, ref_count, heap)
    files = np.flatnonzero(kinds == _REG)
    _check_chunks(index, files, _tiling(files, ref_first, ref_count, index.chunk_count, "chunks"))
    _check_xattrs(index, heap.size)
    dirs = np.flatnonzero(kinds == _DIR)
    _check_tree(index, kinds, dirs, _tiling(dirs, ref_first, ref_count, index.dirent_count, "dirents"), heap)


def _check_entries(index: Index, kinds: np.ndarray, ref_first: np.ndarray, ref_count: np.ndarray,
                   heap: np.ndarray) -> None:
    """Symlink targets and special files' references, xattr ranges, parents."""
    link = kinds == _LNK
    special = ~(link | (kinds == _REG) | (kinds == _DIR))
    refers = special & ((ref_first != 0) | (ref_count != 0))
    target_outside = link & ((ref_count == 0) | (ref_count > MAX_SYMLINK) | ~_fits(ref_first, ref_count, heap.size))
    i = _first(refers | target_outside)
    if i is not None:
        if refers[i]:
            raise BadIndex(f"entries[{i + 1}]", "a special file refers to data")
        raise BadIndex(f"entries[{i + 1}]", f"symlink target [{ref_first[i]}, +{ref_count[i]}] out of bounds")
    links = np.flatnonzero(link)
    targets = ref_first[links].astype(np.int64), ref_count[links].astype(np.int64)  # now known to be small
    i = _first(_holds_any(np.flatnonzero(heap == 0), *targets))
    if i is not None:
        raise BadIndex(f"entries[{links[i] + 1}]", "symlink target holds a NUL byte")
    xattr_first = np.frombuffer(index.column("xattr_first"), np.uint32)
    xattr_count = np.frombuffer(index.column("xattr_count"), np.uint32)
    i = _first(xattr_first.astype(np.uint64) + xattr_count > index.xattr_count)
    if i is not None:
        raise BadIndex(f"entries[{i + 1}]", f"xattrs [{xattr_first[i]}, +{xattr_count[i]}] out of bounds")
    _entry_numbers(index, "parent", "entries", 1, "parent")


def _check_chunks(index: Index, files: np.ndarray, counts: np.ndarray) -> None:
    """Each file's chunks (consecutive, see `_tiling`) inside it and each starting at or after the end of the one
    before it in the file."""
    offsets = np.frombuffer(index.column("chunk_offset"), np.uint64)
    lengths = np.frombuffer(index.column("chunk_length"), np.uint32)
    c = _first(_outside(lengths, 1, MAX_CHUNK_SIZE))
    if c is not None:
        raise BadIndex(f"chunks[{c}]", f"length {lengths[c]} out of bounds")
    owner_sizes = np.repeat(np.frombuffer(index.column("size"), np.uint64)[files], counts)
    wrong = ~_fits(offsets, lengths, owner_sizes)
    if not wrong.any():
        starts_early = offsets[1:] < (offsets + lengths)[:-1]
        starts_early &= ~_first_rows(counts, offsets.size)[1:]  # a file's first chunk follows no other
        wrong = np.concatenate(([False], starts_early))
    c = _first(wrong)
    if c is not None:
        raise BadIndex(f"chunks[{c}]", f"[{offsets[c]}, +{lengths[c]}] overlaps or lies outside its file of "
                                       f"{owner_sizes[c]} bytes")


def _check_xattrs(index: Index, heap_size: int) -> None:
    name_lengths = np.frombuffer(index.column("xattr_name_len"), np.uint32)
    outside = ~_fits(np.frombuffer(index.column("xattr_name_off"), np.uint64), name_lengths, heap_size)
    outside |= ~_fits(np.frombuffer(index.column("xattr_value_off"), np.uint64),
                      np.frombuffer(index.column("xattr_value_len"), np.uint32), heap_size)
    bad_name = _outside(name_lengths, 1, MAX_NAME)
    x = _first(outside | bad_name)
    if x is not None:
        raise BadIndex(f"xattrs[{x}]", "out of the heap" if outside[x] else "name length out of bounds")


def _check_tree(index: Index, kinds: np.ndarray, dirs: np.ndarray, counts: np.ndarray, heap: np.ndarray) -> None:
    """Dirent names safe and sorted within each directory, inodes in bounds, each directory below the root
    named at most once, by its parent (no cycles, no directory hardlinks)."""
    offsets = np.frombuffer(index.column("dirent_name_off"), np.uint64)
    lengths = np.frombuffer(index.column("dirent_name_len"), np.uint32)
    d = _first(_outside(lengths, 1, MAX_NAME) | ~_fits(offsets, lengths, heap.size))
    if d is not None:
        raise BadIndex(f"dirents[{d}]", "name out of bounds")
    offsets, lengths = offsets.astype(np.int64), lengths.astype(np.int64)  # now known to be small
    dots = heap[offsets] == ord(".")
    dots &= (lengths == 1) | ((lengths == 2) & (heap[np.minimum(offsets + 1, heap.size - 1)] == ord(".")))
    d = _first(dots | _holds_any(np.flatnonzero((heap == ord("/")) | (heap == 0)), offsets, lengths))
    if d is not None:
        raise BadIndex(f"dirents[{d}]", f"name {_name(heap, offsets, lengths, d)!r} is not a file name")
    d = _first_unsorted(heap, offsets, lengths, ~_first_rows(counts, offsets.size)[1:])
    if d is not None:
        raise BadIndex(f"dirents[{d}]", f"name {_name(heap, offsets, lengths, d)!r} is out of order or repeated")
    inodes = _entry_numbers(index, "dirent_ino", "dirents", 0, "inode")
    subdirs = np.flatnonzero(kinds[inodes - 1] == _DIR)
    children = inodes[subdirs].astype(np.int64)
    parent = np.frombuffer(index.column("parent"), np.uint32)
    named_before = np.ones(children.size, bool)
    named_before[np.unique(children, return_index=True)[1]] = False  # each directory's first naming
    i = _first(named_before | (children == 1) | (parent[children - 1] != np.repeat(dirs + 1, counts)[subdirs]))
    if i is not None:
        raise BadIndex(f"dirents[{subdirs[i]}]", f"directory {children[i]} is linked twice or from the wrong parent")


def _first(mask: np.ndarray) -> int | None:
    """The position of the first true value of `mask`, or None."""
    return int(mask.argmax()) if mask.any() else None


def _entry_numbers(index: Index, column: str, table: str, first_row: int, what: str) -> np.ndarray:
    """Column `column` of `table`, whose values are entry numbers; a value outside 1..entries is refused, naming
    its row (`table`'s rows are numbered from `first_row`)."""
    numbers = np.frombuffer(index.column(column), np.uint32)
    row = _first(_outside(numbers, 1, index.entries))
    if row is not None:
        raise BadIndex(f"{table}[{row + first_row}]", f"{what} {numbers[row]} out of bounds")
    return numbers


def _outside(values: np.ndarray, low: int, high: int) -> np.ndarray:
    """Whether each value lies outside [low, high]."""
    return (values < low) | (values > high)


def _fits(offsets: np.ndarray, lengths: np.ndarray, bound: np.ndarray | int) -> np.ndarray:
    """offset + length <= bound, row by row, for unsigned 64-bit offsets: the sum is never formed."""
    return (offsets <= bound) & (lengths.astype(np.uint64) <= bound - np.minimum(offsets, bound))


def _holds_any(positions: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Whether each in-bounds range [offset, offset + length) holds one of the sorted `positions`."""
    if not positions.size:
        return np.zeros(offsets.size, bool)
    following = np.searchsorted(positions, offsets)  # the first position at or after each offset
    nearest = positions[np.minimum(following, positions.size - 1)]
    return (following < positions.size) & (nearest < offsets + lengths)


def _first_rows(counts: np.ndarray, rows: int) -> np.ndarray:
    """For a table of `rows` tiled by `counts`: whether each row is the first of its owner's."""
    first = np.zeros(rows, bool)
    starts = np.cumsum(counts[:-1])
    first[starts[starts < rows]] = True
    if rows:
        first[0] = True
    return first


def _first_unsorted(heap: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, compared: np.ndarray) -> int | None:
    """The first name that does not sort strictly after the one before it, of those `compared` says to (one flag
    per name but the first). Compares one word of every undecided pair at a time: most pairs differ in their first."""
    words = sliding_window_view(np.concatenate((heap, np.zeros(_WORD, np.uint8))), _WORD)

    def word(names: np.ndarray, at: int) -> np.ndarray:
        left = np.clip(lengths[names] - at, 0, _WORD)
        rows = words[np.minimum(offsets[names] + at, heap.size)]
        return rows.view(">u8")[:, 0] & _WORD_MASKS[left]

    undecided = np.flatnonzero(compared)  # the pairs (p, p + 1) still equal so far
    worst = []
    for at in range(0, MAX_NAME, _WORD):
        if not undecided.size:
            break
        before, after = word(undecided, at), word(undecided + 1, at)
        worst.append(undecided[before > after])
        undecided = undecided[before == after]
    worst.append(undecided)  # equal throughout: repeated names
    unsorted = np.concatenate(worst)
    return int(unsorted.min()) + 1 if unsorted.size else None


def _name(heap: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, row: int) -> bytes:
    return heap[offsets[row]: offsets[row] + lengths[row]].tobytes()


def _tiling(rows: np.ndarray, ref_first: np.ndarray, ref_count: np.ndarray, total: int, table: str) -> np.ndarray:
    """The rows' counts of `table`, checked to follow one another in row (inode) order and fill it, as
    `IndexBuilder` lays them out: each row of the table belongs to exactly one entry."""
    firsts, counts = ref_first[rows], ref_count[rows].astype(np.uint64)
    starts = np.zeros(rows.size + 1, np.uint64)
    np.cumsum(counts, out=starts[1:])
    if np.array_equal(firsts, starts[:-1]) and starts[-1] == total:
        return counts.astype(np.int64)
    for row, first, length, start in zip(rows.tolist(), firsts.tolist(), counts.tolist(), starts.tolist()):
        if first + length > total:
            raise BadIndex(f"entries[{row + 1}]", f"{table} [{first}, +{length}] out of bounds")
        if first != start:
            raise BadIndex(f"entries[{row + 1}]", f"{table} [{first}, +{length}] do not follow the previous entry's")
    raise BadIndex(table, f"{total - int(starts[-1])} of them belong to no entry")
