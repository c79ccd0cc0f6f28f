"""The file pages a snapshot records at dump and reads ahead at restore (coldbrew.snapshot.filepages), on real
mappings, the real page cache and real files (ext4 or whatever holds the test's temporary directory)."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from coldbrew.runtime.features import default_spec
from coldbrew.runtime.spec import parse
from coldbrew.snapshot import filepages

PAGE = mmap.PAGESIZE
# A fault maps the folio it hits (the page cache's are up to 2 MiB: 512 pages, aligned) and the cached pages of the
# fault-around window (64 KiB) beside it: pages of other 2 MiB blocks of the file stay unmapped.
PAGES = 4096
TOUCHED = (40, 3000)
UNTOUCHED = (700, 1500, 2000, 3600)  # each in a 2 MiB block of its own
_libc = ctypes.CDLL(None, use_errno=True)


def resident(path: Path) -> set[int]:
    """The pages of the file in the page cache: mincore(2) of a mapping of it, which reads nothing (a read that
    must not wait, RWF_NOWAIT, would start the very readahead it looks for)."""
    fd = os.open(path, os.O_RDWR)
    try:
        mapping = mmap.mmap(fd, PAGES * PAGE, flags=mmap.MAP_SHARED)  # writable: ctypes wants a writable buffer
    finally:
        os.close(fd)
    try:
        vector = ctypes.create_string_buffer(PAGES)
        anchor = ctypes.c_char.from_buffer(mapping)
        try:
            if _libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(PAGES * PAGE), vector):
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del anchor
        return {page for page, flags in enumerate(vector.raw) if flags & 1}
    finally:
        mapping.close()


def evicted(path: Path) -> Path:
    """`path` with none of its pages cached; skips where the filesystem keeps them (tmpfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if resident(path):
        pytest.skip(f"{path.parent} keeps file pages in memory (tmpfs?): nothing to read ahead there")
    return path


def data_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(PAGES * PAGE))
    return path


def wait_cached(path: Path, pages: tuple[int, ...], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout  # a hang guard: the reads were queued, not waited for
    while not set(pages) <= resident(path):
        assert time.monotonic() < deadline, f"pages {pages} of {path} never came into the page cache"
        time.sleep(0.01)


def test_mapped_file_pages_are_the_file_pages_in_the_page_tables(tmp_path):
    path = data_file(tmp_path / "data.bin")
    fd = os.open(path, os.O_RDWR)
    mapping = mmap.mmap(fd, PAGES * PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        for page in TOUCHED:
            mapping[page * PAGE]  # a read fault: the file's page, and the cached ones around it
        mapping[1000 * PAGE] = 1  # a write fault: a private copy, which CRIU dumps with the memory
        recorded = filepages.mapped_file_pages([os.getpid()])
        assert filepages.mapped_file_pages([os.getpid(), os.getpid()]) == recorded  # ranges merged
    finally:
        mapping.close()
        os.close(fd)

    ranges = recorded[str(path)]
    pages = {first + i for first, count in ranges for i in range(count)}
    assert set(TOUCHED) <= pages and 1000 not in pages and not pages & set(UNTOUCHED)
    assert ranges == sorted(ranges) and all(count > 0 for _, count in ranges)
    assert all(a[0] + a[1] < b[0] for a, b in zip(ranges, ranges[1:]))  # merged: no two touch
    # this interpreter's own program is mapped too; a pid that is gone adds nothing
    assert any(os.path.samefile(p, "/proc/self/exe") for p in recorded if os.path.exists(p))
    assert filepages.mapped_file_pages([2 ** 22 + 1]) == {}


def test_a_mapping_larger_than_one_pagemap_read_is_read_whole(tmp_path):
    pages = filepages._PAGEMAP_CHUNK + 1024
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(pages * PAGE)  # holes: read faults map pages of zeros, nothing is written
    fd = os.open(path, os.O_RDONLY)
    mapping = mmap.mmap(fd, pages * PAGE, prot=mmap.PROT_READ)
    try:
        touched = (10, filepages._PAGEMAP_CHUNK + 500)
        for page in touched:
            mapping[page * PAGE]
        recorded = filepages.mapped_file_pages([os.getpid()])[str(path)]
    finally:
        mapping.close()
        os.close(fd)
    found = {first + i for first, count in recorded for i in range(count)}
    assert set(touched) <= found and filepages._PAGEMAP_CHUNK // 2 not in found


def test_a_record_keeps_no_more_ranges_than_a_restore_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(filepages, "_MAX_RANGES", 3)
    monkeypatch.setattr(filepages, "mapped_file_pages",
                        lambda pids: {"/a": [[0, 1], [5, 1]], "/b": [[1, 1], [9, 1]], "/c": [[2, 2]]})
    filepages.record(str(tmp_path), [1])
    data = (tmp_path / filepages.FILE_PAGES).read_bytes()
    assert json.loads(data)["files"] == {"/a": [[0, 1], [5, 1]], "/b": [[1, 1]]}
    assert filepages._parse(data) == [("/a", [(0, PAGE), (5 * PAGE, PAGE)]), ("/b", [(PAGE, PAGE)])]


def _spec(tmp_path: Path, mounts: list[dict]):
    config = default_spec()
    config["root"] = {"path": str(tmp_path / "root"), "readonly": True}
    config["mounts"] += mounts
    return parse(config, str(tmp_path))


def _record(image_dir: Path, files: dict[str, list[list[int]]]) -> None:
    image_dir.mkdir(exist_ok=True)
    document = {"format": filepages.FORMAT, "page_size": PAGE, "files": files}
    (image_dir / filepages.FILE_PAGES).write_text(json.dumps(document))


def test_read_ahead_finds_the_files_through_the_bundles_root_and_bind_mounts_only(tmp_path):
    in_root = data_file(tmp_path / "root" / "lib" / "in-root.so")
    bound = data_file(tmp_path / "elsewhere" / "bound.so")
    bound_file = data_file(tmp_path / "single" / "file.so")
    under_tmpfs = data_file(tmp_path / "root" / "tmp" / "hidden.so")  # covered by a tmpfs in the container
    outside = data_file(tmp_path / "host" / "secret.so")
    (tmp_path / "root" / "escape").symlink_to(tmp_path / "host")  # inside the root it leads nowhere
    spec = _spec(tmp_path, [
        {"destination": "/opt/bound", "type": "bind", "source": str(bound.parent), "options": ["rbind", "ro"]},
        {"destination": "/opt/one.so", "type": "bind", "source": str(bound_file), "options": ["bind", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
    ])
    wanted = [[3, 2], [3000, 1]]
    _record(tmp_path / "images", {"/lib/in-root.so": wanted, "/opt/bound/bound.so": wanted, "/opt/one.so": wanted,
                                  "/tmp/hidden.so": wanted, "/escape/secret.so": wanted, "/lib/missing.so": wanted,
                                  "/proc/self/exe": wanted})
    for path in (in_root, bound, bound_file, under_tmpfs, outside):
        evicted(path)

    filepages.read_ahead(str(tmp_path / "images"), spec).join()

    for path in (in_root, bound, bound_file):
        wait_cached(path, (3, 4, 3000))
        assert not resident(path) & set(UNTOUCHED)  # the pages recorded, not the file
    assert not resident(under_tmpfs) and not resident(outside)


def test_read_ahead_of_a_snapshot_without_a_record_or_with_a_damaged_one_does_nothing(tmp_path):
    in_root = evicted(data_file(tmp_path / "root" / "lib" / "in-root.so"))
    spec = _spec(tmp_path, [])
    (tmp_path / "images").mkdir()
    filepages.read_ahead(str(tmp_path / "images"), spec).join()  # a snapshot from before records were made
    for document in ({"format": 2, "page_size": PAGE, "files": {"/lib/in-root.so": [[3, 1]]}},
                     {"format": 1, "page_size": PAGE * 4, "files": {"/lib/in-root.so": [[3, 1]]}},
                     {"format": 1, "page_size": PAGE, "files": {"/lib/in-root.so": [[3, -1]]}},
                     {"format": 1, "page_size": PAGE, "files": {"/lib/../lib/in-root.so": [[3, 1]]}}):
        (tmp_path / "images" / filepages.FILE_PAGES).write_text(json.dumps(document))
        filepages.read_ahead(str(tmp_path / "images"), spec).join()
    time.sleep(0.1)  # what would have been queued has had time to come in
    assert not resident(in_root)


_json = st.recursive(st.none() | st.booleans() | st.integers(-2, 2 ** 40) | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                  max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=64), _json.map(lambda value: json.dumps(value).encode()),
                 st.dictionaries(st.text(max_size=16), st.lists(st.lists(st.integers(-1, 2 ** 40), max_size=3),
                                                                max_size=3), max_size=3).map(
                     lambda files: json.dumps({"format": 1, "page_size": PAGE, "files": files}).encode())))
def test_any_record_parses_or_is_refused_without_raising(data):
    parsed = filepages._parse(data)
    if parsed is not None:
        for path, byte_ranges in parsed:
            assert path.startswith("/") and ".." not in path.split("/")
            assert all(offset >= 0 and length > 0 and offset % PAGE == 0 for offset, length in byte_ranges)
