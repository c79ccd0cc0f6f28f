"""Which chunking? Dedupe between two versions of an image, and the bytes a cold start must fetch, per strategy.

For each strategy the same two trees are cut into chunks (nothing is stored; only blake3 names are computed):
- `new MB`: data of the second version whose chunks the first version does not have (what a push uploads);
- `chunks`: chunk count of the second version (objects in the store, requests for a full fetch);
- for a start-up working set (the pages a command read, found with mincore after dropping the page cache):
  `fetch MB` / `fetch chunks`: what a lazy mount fetches to serve it, given that a read fetches whole chunks.

    python -m coldbrew.bench chunking BEFORE AFTER [--tree T --command "python3 -c 'import numpy'"]
"""

from __future__ import annotations

import mmap
import os
import stat
from typing import Callable, Iterator

from coldbrew.fs import objects

MiB = 1 << 20

Cutter = Callable[[bytes], Iterator[tuple[int, int]]]


def _fixed(size: int) -> Cutter:
    def cut(data: bytes) -> Iterator[tuple[int, int]]:
        for offset in range(0, len(data), size):
            yield offset, min(size, len(data) - offset)
    return cut


def _content_defined(average: int) -> Cutter:
    from fastcdc import fastcdc

    def cut(data: bytes) -> Iterator[tuple[int, int]]:
        if len(data) <= average // 4:
            yield 0, len(data)
            return
        for chunk in fastcdc(data, average // 4, average, average * 4):
            yield chunk.offset, chunk.length
    return cut


STRATEGIES: dict[str, Cutter] = {
    "whole file (<=64M)": _fixed(64 * MiB),
    "fixed 4 MiB": _fixed(4 * MiB),
    "fixed 1 MiB": _fixed(MiB),
    "fixed 256 KiB": _fixed(256 << 10),
    "fixed 64 KiB": _fixed(64 << 10),
    "CDC avg 1 MiB": _content_defined(MiB),
    "CDC avg 64 KiB": _content_defined(64 << 10),
}


def _files(tree: str) -> Iterator[str]:
    for directory, _, names in os.walk(tree):
        for name in names:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_size:
                yield path


def _chunks(tree: str, cut: Cutter) -> dict[str, list[tuple[int, int, bytes]]]:
    result = {}
    for path in _files(tree):
        with open(path, "rb") as file:
            data = file.read()
        result[os.path.relpath(path, tree)] = [(o, n, objects.digest_of(data[o: o + n])) for o, n in cut(data)]
    return result


def resident_pages(tree: str) -> dict[str, list[bool]]:
    """For each regular file of `tree` with pages in the page cache, which of its pages are (mincore)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    page = mmap.PAGESIZE
    result = {}
    for path in _files(tree):
        size = os.path.getsize(path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {path}")
            vector = (ctypes.c_ubyte * ((size + page - 1) // page))()
            try:
                if libc.mincore(address, size, vector) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore {path}")
            finally:
                libc.munmap(address, size)
        finally:
            os.close(fd)
        if any(vector):
            result[os.path.relpath(path, tree)] = [bool(v & 1) for v in vector]
    return result


def working_set(tree: str, command: str) -> dict[str, list[bool]]:
    """The pages of `tree` that `command` (run chrooted into it) reads from a cold page cache."""
    from .trees import drop_caches, run_in_tree

    drop_caches()
    run_in_tree(tree, ["/bin/sh", "-c", command])
    return resident_pages(tree)


def measure(before: str, after: str, pages: dict[str, list[bool]] | None) -> list[dict]:
    rows = []
    for name, cut in STRATEGIES.items():
        known = {digest for chunks in _chunks(before, cut).values() for _, _, digest in chunks}
        second = _chunks(after, cut)
        unique: dict[bytes, int] = {}
        for chunks in second.values():
            for _, length, digest in chunks:
                unique[digest] = length
        row = {"strategy": name, "chunks": len(unique),
               "new MB": sum(length for digest, length in unique.items() if digest not in known) / 1e6,
               "total MB": sum(unique.values()) / 1e6}
        if pages is not None:
            fetched: dict[bytes, int] = {}
            for path, resident in pages.items():
                for offset, length, digest in second.get(path, ()):
                    first, last = offset // mmap.PAGESIZE, (offset + length - 1) // mmap.PAGESIZE
                    if any(resident[first: last + 1]):
                        fetched[digest] = length
            row["fetch MB"] = sum(fetched.values()) / 1e6
            row["fetch chunks"] = len(fetched)
            row["working set MB"] = sum(map(sum, pages.values())) * mmap.PAGESIZE / 1e6
        rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    columns = list(rows[0])
    cells = [[f"{row.get(c):,.1f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
             for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths)))]
    lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
              for line in cells]
    return "\n".join(lines) + "\n"
