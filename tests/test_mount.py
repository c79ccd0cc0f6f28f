"""The lazy image mount through the real kernel: push a tree, mount it with the FUSE daemon, read it back.

Every mount made here is unmounted at teardown, even when a test fails half-way (the `mounts` fixture).
"""

from __future__ import annotations

import errno
import http.server
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from coldbrew.fs import objects
from coldbrew.fs.daemon import STATE_DIR, _detach, _paths, mount, mount_stats, save_profile, unmount
from coldbrew.fs.erofs import INDEX_METADATA_KEY, UnsupportedTree, image_bytes, redirect_paths, write_image
from coldbrew.fs.mounts import mount_entry, mount_table, mounts_below
from coldbrew.fs.errors import BadReference, FsError
from coldbrew.fs.index import Chunk, Index, IndexBuilder
from coldbrew.fs.profile import (PROFILE_MAGIC, fetch_head, files_read_whole, metadata_image, packed_chunks,
                                 parse_profile, profile_name)
from coldbrew.fs.pushing import push
from coldbrew.fs.rootfs import create_root, remove_root
from coldbrew.fs.store import LocalStore, object_path

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root")

SMALL_CHUNK = 128 << 10


class Mounts:
    """Mounts images for one test and takes every one of them down afterwards."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.store = base / "store"
        self.cache = base / "cache"
        self.points: list[str] = []

    def mount(self, reference: str, *, name: str = "mnt", store: str | None = None, cache: Path | None = None,
              **options) -> Path:
        point = self.base / name
        point.mkdir(exist_ok=True)
        self.points.append(str(point))
        mount(reference, str(point), store=store or str(self.store), cache_dir=str(cache or self.cache), **options)
        return point

    def unmount(self, point: Path) -> None:
        unmount(str(point))

    def cleanup(self) -> list[str]:
        left = []
        for point in self.points:
            entry = mount_entry(point)
            if entry is not None and entry[1] == "fuse.coldbrew":
                left.append(point)
                try:
                    unmount(point)
                except FsError:
                    _detach(point)
            for path in _paths(point):
                if os.path.exists(path):
                    os.unlink(path)
        return left


@pytest.fixture
def mounts(tmp_path: Path):
    helper = Mounts(tmp_path)
    yield helper
    helper.cleanup()
    assert all(mount_entry(point) is None for point in helper.points)


def stats_of(point: Path) -> dict:
    return mount_stats(str(point))


# --- comparing trees ---------------------------------------------------------------------------------------------

def describe(root: Path) -> dict[bytes, tuple]:
    """Everything the mount must reproduce, per relative path; hardlinks as groups of paths."""
    result = {}
    inodes: dict[int, list[bytes]] = {}
    root_b = os.fsencode(root)
    for directory, dirnames, filenames in os.walk(root_b):
        for name in dirnames + filenames + ([b"."] if directory == root_b else []):
            path = os.path.normpath(os.path.join(directory, name))
            rel = os.path.relpath(path, root_b)
            st_ = os.lstat(path)
            kind = stat.S_IFMT(st_.st_mode)
            extra = None
            if kind == stat.S_IFREG:
                with open(path, "rb") as file:
                    extra = objects.digest_of(file.read())
            elif kind == stat.S_IFLNK:
                extra = os.readlink(path)
            xattrs = {} if kind == stat.S_IFLNK else {
                name: os.getxattr(path, name, follow_symlinks=False) for name in os.listxattr(path, follow_symlinks=False)}
            result[rel] = (st_.st_mode, st_.st_uid, st_.st_gid, st_.st_mtime_ns,
                           st_.st_size if kind in (stat.S_IFREG, stat.S_IFLNK) else None,
                           st_.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else None,
                           st_.st_nlink, extra, tuple(sorted(xattrs.items())))
            if kind != stat.S_IFDIR:
                inodes.setdefault(st_.st_ino, []).append(rel)
    result[b"<hardlinks>"] = sorted(sorted(group) for group in inodes.values() if len(group) > 1)
    return result


def assert_same_tree(source: Path, mounted: Path) -> None:
    expected, got = describe(source), describe(mounted)
    assert sorted(got) == sorted(expected)
    for path in expected:
        assert got[path] == expected[path], path


def make_rich_tree(root: Path) -> None:
    root.mkdir()
    (root / "empty").write_bytes(b"")
    (root / "small.txt").write_bytes(b"hello\n")
    (root / "large.bin").write_bytes(os.urandom(3 * SMALL_CHUNK + 12345))
    with open(root / "sparse", "wb") as file:
        file.truncate(5 << 20)
        file.seek(SMALL_CHUNK * 9 + 100)
        file.write(b"island")
        file.seek((5 << 20) - 3)
        file.write(b"end")
    odd = os.fsencode(root)
    for name in (b"sp ace", b"new\nline", b"\xff\xfe latin-1", b"tab\there", "ünïcødé".encode(), b"x" * 255,
                 b"-dash", b"back\\slash"):
        with open(os.path.join(odd, name), "wb") as file:
            file.write(name)
    deep = root
    for level in range(40):
        deep = deep / f"d{level}"
    deep.mkdir(parents=True)
    (deep / "bottom").write_text("deep")
    os.symlink("small.txt", root / "link")
    os.symlink("/etc/does-not-exist", root / "dangling")
    os.symlink("d0/d1", root / "dirlink")
    (root / "links").mkdir()
    os.link(root / "small.txt", root / "links" / "hard1")
    os.link(root / "small.txt", root / "d0" / "hard2")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "loop", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(root / "sock"))
    os.setxattr(root / "small.txt", "user.comment", b"a value\0with nul")
    os.setxattr(root / "small.txt", "trusted.other", b"x" * 1000)
    os.setxattr(root / "links", "user.dir", b"on a directory")
    suid = root / "suid"
    suid.write_bytes(b"#!/bin/sh\n")
    os.chmod(suid, 0o4755)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    os.chown(root / "large.bin", 1234, 5678)
    os.chmod(root / "empty", 0)
    os.utime(root / "small.txt", ns=(1, 1_234_567_891_234_567_891))
    os.utime(root / "links", ns=(1, 86_400_000_000_123))


def test_round_trip_rich_tree(mounts: Mounts, tmp_path: Path) -> None:
    make_rich_tree(tmp_path / "tree")
    result = push(str(tmp_path / "tree"), LocalStore(str(mounts.store)), chunk_size=SMALL_CHUNK)
    point = mounts.mount(result.reference)
    assert_same_tree(tmp_path / "tree", point)
    # Hardlinks share an inode through the mount, and the sparse file reads back its zeros.
    assert os.lstat(point / "small.txt").st_ino == os.lstat(point / "links" / "hard1").st_ino
    assert os.lstat(point / "small.txt").st_nlink == 3
    assert (point / "sparse").read_bytes() == (tmp_path / "tree" / "sparse").read_bytes()
    assert os.statvfs(point).f_files == result.entries
    mounts.unmount(point)
    assert mount_entry(str(point)) is None
    assert not any(os.path.exists(path) for path in _paths(str(point)))


def test_writes_fail_with_erofs(mounts: Mounts, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_text("data")
    point = mounts.mount(push(str(tree), LocalStore(str(mounts.store))).reference)
    attempts = [
        lambda: open(point / "file", "w"),
        lambda: open(point / "file", "a"),
        lambda: open(point / "new", "w"),
        lambda: os.mkdir(point / "dir"),
        lambda: os.unlink(point / "file"),
        lambda: os.rename(point / "file", point / "other"),
        lambda: os.chmod(point / "file", 0o777),
        lambda: os.utime(point / "file"),
        lambda: os.setxattr(point / "file", "user.x", b"1"),
        lambda: os.symlink("x", point / "symlink"),
        lambda: os.truncate(point / "file", 0),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as raised:
            attempt()
        assert raised.value.errno == errno.EROFS
    assert (point / "file").read_text() == "data"


# --- hypothesis: generated trees ---------------------------------------------------------------------------------

_names = st.binary(min_size=1, max_size=40).filter(lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))
_files = st.one_of(
    st.binary(max_size=64).map(lambda data: ("file", data)),
    st.integers(min_value=0, max_value=3 * SMALL_CHUNK + 7).map(lambda size: ("file", os.urandom(size))),
    st.integers(min_value=1, max_value=4 * SMALL_CHUNK).map(lambda size: ("sparse", size)),
    _names.map(lambda target: ("symlink", target)),
    st.just(("fifo", None)),
    st.tuples(st.integers(0, 255), st.integers(0, 255)).map(lambda dev: ("chr", dev)),
)
_trees = st.recursive(
    st.dictionaries(_names, _files, max_size=5),
    lambda children: st.dictionaries(_names, st.one_of(_files, children.map(lambda c: ("dir", c))), max_size=5),
    max_leaves=20,
)


def _write_tree(root: bytes, spec: dict, draw_meta) -> None:
    for name, (kind, value) in spec.items():
        path = os.path.join(root, name)
        if kind == "dir":
            os.mkdir(path)
            _write_tree(path, value, draw_meta)
        elif kind == "file":
            with open(path, "wb") as file:
                file.write(value)
        elif kind == "sparse":
            with open(path, "wb") as file:
                file.truncate(value)
                file.seek(value // 2)
                file.write(b"!")
        elif kind == "symlink":
            os.symlink(value, path)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "chr":
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(*value))
        if kind != "symlink":
            mode, uid, gid, mtime = draw_meta()
            os.chown(path, uid, gid)
            os.chmod(path, mode | (0o700 if kind == "dir" else 0))  # directories stay walkable
            os.utime(path, ns=(0, mtime))


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=_trees, data=st.data())
def test_round_trip_generated_trees(spec: dict, data: st.DataObject, tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("generated")
    helper = Mounts(base)
    tree = base / "tree"
    tree.mkdir()
    metadata = st.tuples(st.integers(0, 0o7777), st.integers(0, 70000), st.integers(0, 70000),
                         st.integers(-(10 ** 18), 10 ** 18))
    _write_tree(os.fsencode(tree), spec, lambda: data.draw(metadata))
    try:
        point = helper.mount(push(str(tree), LocalStore(str(helper.store)), chunk_size=SMALL_CHUNK).reference)
        assert_same_tree(tree, point)
    finally:
        helper.cleanup()


# --- failures of the store and of chunks --------------------------------------------------------------------------

def _pushed_file(mounts: Mounts, tmp_path: Path, size: int = 4 * SMALL_CHUNK) -> tuple[str, bytes, list]:
    tree = tmp_path / "tree"
    tree.mkdir()
    data = os.urandom(size)
    (tree / "file").write_bytes(data)
    store = LocalStore(str(mounts.store))
    reference = push(str(tree), store, chunk_size=SMALL_CHUNK).reference
    index = Index(objects.decode(bytes.fromhex(reference), store.get(bytes.fromhex(reference)), 1 << 30))
    return reference, data, index.chunks(index.lookup(1, b"file"))


def _pread_chunks(path: Path, chunks: list) -> list[bytes | int]:
    """Each chunk's bytes read through the mount, or the errno its read failed with."""
    results: list[bytes | int] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for chunk in chunks:
            try:
                results.append(os.pread(fd, chunk.length, chunk.offset))
            except OSError as error:
                results.append(error.errno)
    finally:
        os.close(fd)
    return results


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_bad_chunk_gives_eio_and_names_it(mounts: Mounts, tmp_path: Path, damage: str) -> None:
    reference, data, chunks = _pushed_file(mounts, tmp_path)
    bad = chunks[2]
    object_file = mounts.store / object_path(bad.digest)
    good_bytes = object_file.read_bytes()
    if damage == "corrupt":  # a well-formed zstd frame of other data under the chunk's name
        object_file.write_bytes(objects.compress(os.urandom(bad.length)))
    else:
        object_file.write_bytes(good_bytes[: len(good_bytes) // 2])
    point = mounts.mount(reference)
    results = _pread_chunks(point / "file", chunks)
    assert results[2] == errno.EIO
    for k in (0, 1, 3):
        assert results[k] == data[chunks[k].offset: chunks[k].offset + chunks[k].length]
    log_text = Path(stats_of(point)["log"]).read_text()
    assert bad.digest.hex() in log_text
    assert stats_of(point)["fetch_errors"] >= 1
    # Nothing bad was remembered: once the store holds the right bytes, the same mount reads them.
    object_file.write_bytes(good_bytes)
    assert (point / "file").read_bytes() == data


def test_local_store_gone_then_back(mounts: Mounts, tmp_path: Path) -> None:
    reference, data, chunks = _pushed_file(mounts, tmp_path)
    point = mounts.mount(reference)
    moved = tmp_path / "store-away"
    os.rename(mounts.store, moved)
    try:
        with pytest.raises(OSError) as raised:
            (point / "file").read_bytes()
        assert raised.value.errno == errno.EIO
    finally:
        os.rename(moved, mounts.store)
    assert (point / "file").read_bytes() == data


class _CountingServer:
    """A static HTTP server over a store directory that counts GETs per path; stops and starts on one port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.gets: dict[str, int] = {}
        self.lock = threading.Lock()
        self.port = 0
        self.server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> None:
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(outer.root), **kwargs)

            def do_GET(self) -> None:
                with outer.lock:
                    outer.gets[self.path] = outer.gets.get(self.path, 0) + 1
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def http_store(mounts: Mounts):
    server = _CountingServer(mounts.store)
    mounts.store.mkdir(exist_ok=True)
    server.start()
    yield server
    server.stop()


def test_http_store_dead_then_back(mounts: Mounts, tmp_path: Path, http_store: _CountingServer) -> None:
    reference, data, chunks = _pushed_file(mounts, tmp_path)
    point = mounts.mount(reference, store=http_store.url)
    http_store.stop()
    started = time.monotonic()
    with pytest.raises(OSError) as raised:
        (point / "file").read_bytes()
    assert raised.value.errno == errno.EIO
    assert time.monotonic() - started < 30  # bounded retries, not a hang
    http_store.start()  # same port
    assert (point / "file").read_bytes() == data


def test_concurrent_readers_fetch_each_chunk_once(mounts: Mounts, tmp_path: Path, http_store: _CountingServer) -> None:
    reference, data, chunks = _pushed_file(mounts, tmp_path, size=16 * SMALL_CHUNK + 999)
    point = mounts.mount(reference, store=http_store.url, cache=tmp_path / "cold-cache")
    http_store.gets.clear()
    barrier = threading.Barrier(32)
    results: list[bytes | None] = [None] * 32

    def reader(k: int) -> None:
        fd = os.open(point / "file", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # small, distinct requests: they race in the daemon
            barrier.wait()
            pieces = {}
            order = list(range(0, len(data), 16384))
            order = order[k % len(order):] + order[: k % len(order)]
            for offset in order:
                pieces[offset] = os.pread(fd, 16384, offset)
            results[k] = b"".join(pieces[offset] for offset in sorted(pieces))
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(result == data for result in results)
    chunk_paths = {"/" + object_path(chunk.digest) for chunk in chunks}
    assert {path: count for path, count in http_store.gets.items() if path in chunk_paths} == \
        {path: 1 for path in chunk_paths}
    stats = stats_of(point)
    assert stats["chunks_fetched"] == len(chunks) and stats["cache_misses"] == len(chunks)


def test_kill_during_reads_then_remount(mounts: Mounts, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for k in range(4):
        (tree / f"file{k}").write_bytes(os.urandom(40 * SMALL_CHUNK))
    reference = push(str(tree), LocalStore(str(mounts.store)), chunk_size=SMALL_CHUNK).reference
    point = mounts.mount(reference)
    pid = stats_of(point)["pid"]
    readers = [subprocess.Popen(["cat", str(point / f"file{k}")], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for k in range(4)]
    deadline = time.monotonic() + 10
    while stats_of(point)["chunks_fetched"] < 20 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    for reader in readers:
        reader.wait(30)
    with pytest.raises(OSError) as raised:
        os.listdir(point)
    assert raised.value.errno == errno.ENOTCONN
    mounts.unmount(point)  # cleans the dead mount
    assert mount_entry(str(point)) is None
    point = mounts.mount(reference)
    assert_same_tree(tree, point)


# --- hostile indexes -----------------------------------------------------------------------------------------------

def _store_raw_index(store: LocalStore, data: bytes) -> str:
    digest, stored = objects.encode(data)
    store.put(digest, stored)
    return digest.hex()


def _hostile_indexes() -> dict[str, bytes]:
    def tree(*children: tuple[bytes, int], extra=None) -> bytes:
        builder = IndexBuilder()
        root = builder.add(mode=stat.S_IFDIR | 0o755)
        for _ in range(3):
            builder.add(mode=stat.S_IFDIR | 0o755, parent=root)
        if extra:
            extra(builder)
        builder.set_children(root, list(children))
        return builder.build()

    def cycle(builder: IndexBuilder) -> None:
        builder.set_children(2, [(b"down", 3)])
        builder.set_children(3, [(b"up", 2)])

    valid = tree((b"a", 2))
    return {
        "slash": tree((b"a/b", 2)),
        "dotdot": tree((b"..", 2)),
        "cycle": tree((b"a", 2), extra=cycle),
        "out-of-range inode": _edited(valid, column=("dirent_ino", 0, 99)),
        "huge entry count": _edited(valid, entries=1 << 28),
        "huge directory": _edited(valid, column=("ref_count", 0, 0xFFFFFFFF)),
        "not an index": os.urandom(4096),
    }


def _edited(data: bytes, *, entries: int | None = None, column: tuple[str, int, int] | None = None) -> bytes:
    """A built index with its header's entry count, or one 32-bit value of a column, replaced."""
    magic = data[:8]
    header_len = int.from_bytes(data[8:12], "little")
    header = json.loads(data[12: 12 + header_len])
    body = bytearray(data[12 + header_len:])
    if entries is not None:
        header["entries"] = entries
    if column is not None:
        name, row, value = column
        offset = header["columns"][name][0] + 4 * row
        body[offset: offset + 4] = value.to_bytes(4, "little")
    text = json.dumps(header).encode()
    text += b" " * (-(12 + len(text)) % 8)
    return magic + len(text).to_bytes(4, "little") + text + bytes(body)


@pytest.mark.parametrize("case", list(_hostile_indexes()))
def test_hostile_index_refused(mounts: Mounts, case: str) -> None:
    reference = _store_raw_index(LocalStore(str(mounts.store)), _hostile_indexes()[case])
    with pytest.raises(FsError) as raised:
        mounts.mount(reference)
    assert str(raised.value).startswith("image index:"), str(raised.value)
    point = str(mounts.base / "mnt")
    assert mount_entry(point) is None
    assert not any(os.path.exists(path) for path in _paths(point))


def test_unknown_reference_refused(mounts: Mounts) -> None:
    mounts.store.mkdir()
    with pytest.raises(BadReference):
        mounts.mount("ab" * 32)
    with pytest.raises(BadReference):
        mounts.mount("not-a-reference")
    assert mount_entry(str(mounts.base / "mnt")) is None


# --- profiles, counters, listings ------------------------------------------------------------------------------

def _recorded_profile(mounts: Mounts, tmp_path: Path) -> tuple[str, Path, list[Chunk]]:
    """An image of six files of three chunks whose saved profile reads files 1 and 4: (reference, tree, the
    profile's chunks in the order read)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for k in range(6):
        (tree / f"file{k}").write_bytes(os.urandom(3 * SMALL_CHUNK))
    reference = push(str(tree), LocalStore(str(mounts.store)), chunk_size=SMALL_CHUNK).reference
    point = mounts.mount(reference, record_profile=True, cache=tmp_path / "cache1")
    (point / "file1").read_bytes()
    (point / "file4").read_bytes()
    assert save_profile(str(point)) == 6
    mounts.unmount(point)
    store = LocalStore(str(mounts.store))
    index = Index(objects.decode(bytes.fromhex(reference), store.get(bytes.fromhex(reference)), 1 << 20))
    return reference, tree, [chunk for _, chunk in parse_profile(fetch_head(store, reference), index)]


def _prefetched(point: Path) -> dict:
    deadline = time.monotonic() + 20
    while not (stats := stats_of(point))["prefetch_done"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return stats


def test_profile_recorded_then_prefetched_in_ranges_of_its_pack(mounts: Mounts, tmp_path: Path,
                                                                 http_store: _CountingServer) -> None:
    reference, tree, profile = _recorded_profile(mounts, tmp_path)
    http_store.gets.clear()
    point = mounts.mount(reference, store=http_store.url, cache=tmp_path / "cache2")  # cold: fetches the pack
    stats = _prefetched(point)
    assert stats["profile_chunks"] == 6 and stats["prefetched_chunks"] + stats["prefetch_cached"] == 6
    assert stats["packed_chunks"] == 6 and stats["chunks_fetched"] == 6
    # One GET of the profile's head and one per range; no chunk of the profile fetched alone.
    assert http_store.gets.get(f"/named/profiles/{reference}") == 1 + stats["pack_ranges"]
    assert stats["pack_ranges"] <= 2
    assert not any(http_store.gets.get("/" + object_path(chunk.digest)) for chunk in profile)
    assert (point / "file1").read_bytes() == (tree / "file1").read_bytes()
    assert stats_of(point)["chunks_fetched"] == 6  # the reads found everything in the cache


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_damaged_pack_costs_only_requests(mounts: Mounts, tmp_path: Path, http_store: _CountingServer,
                                           damage: str) -> None:
    reference, tree, profile = _recorded_profile(mounts, tmp_path)
    path = mounts.store / "named" / "profiles" / reference
    data = bytearray(path.read_bytes())
    packed = packed_chunks(bytes(data))
    if damage == "corrupt":
        data[packed[1].offset + packed[1].stored // 2] ^= 0xFF
        alone = [packed[1].digest]
    else:
        del data[packed[2].offset + 1:]
        alone = [chunk.digest for chunk in packed[2:]]
    path.write_bytes(bytes(data))
    http_store.gets.clear()
    point = mounts.mount(reference, store=http_store.url, cache=tmp_path / "cache2")
    stats = _prefetched(point)
    assert stats["packed_chunks"] == 6 - len(alone) and stats["chunks_fetched"] == 6
    assert {chunk.digest.hex() for chunk in profile if http_store.gets.get("/" + object_path(chunk.digest))} == \
        {digest.hex() for digest in alone}
    for name in ("file1", "file4"):
        assert (point / name).read_bytes() == (tree / name).read_bytes()
    log = Path(stats["log"]).read_text()
    assert (f"chunk {packed[1].digest.hex()}: in the profile's pack" in log if damage == "corrupt"
            else "the range ends" in log)


def test_stats_count_fetches_and_hits(mounts: Mounts, tmp_path: Path) -> None:
    reference, data, chunks = _pushed_file(mounts, tmp_path)
    point = mounts.mount(reference, prefetch=False)
    before = stats_of(point)
    assert before["chunks_fetched"] == before["bytes_fetched"] == before["reads"] == 0
    assert (point / "file").read_bytes() == data
    stats = stats_of(point)
    assert stats["chunks_fetched"] == len(chunks)
    assert stats["bytes_fetched"] == sum((mounts.store / object_path(c.digest)).stat().st_size for c in chunks)
    assert stats["read_bytes"] == len(data) and stats["reads"] >= 1
    mounts.unmount(point)
    point = mounts.mount(reference, prefetch=False)  # a new mount: the kernel's page cache is per mount
    assert (point / "file").read_bytes() == data
    stats = stats_of(point)
    assert stats["chunks_fetched"] == 0 and stats["cache_hits"] >= len(chunks)


def test_readdir_many_entries(mounts: Mounts, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    names = [f"entry-{k:05d}-{'x' * (k % 50)}" for k in range(5000)]
    for name in names:
        (tree / name).touch()
    point = mounts.mount(push(str(tree), LocalStore(str(mounts.store))).reference)
    assert sorted(os.listdir(point)) == sorted(names)
    with os.scandir(point) as listing:
        assert sum(1 for _ in listing) == 5000
    assert os.lstat(point / names[4321]).st_size == 0


def test_mount_errors_are_clear(mounts: Mounts, tmp_path: Path) -> None:
    reference, _, _ = _pushed_file(mounts, tmp_path)
    with pytest.raises(FsError, match="does not exist"):
        mount(reference, str(tmp_path / "missing"), store=str(mounts.store), cache_dir=str(mounts.cache))
    point = mounts.mount(reference)
    with pytest.raises(FsError, match="already a coldbrew mount"):
        mount(reference, str(point), store=str(mounts.store), cache_dir=str(mounts.cache))
    with pytest.raises(FsError, match="not a coldbrew mount"):
        unmount(str(tmp_path))
    state = json.loads(Path(_paths(str(point))[0]).read_text())
    assert state["reference"] == reference and state["mountpoint"] == str(point)
    assert os.path.dirname(_paths(str(point))[0]) == STATE_DIR


# --- container roots: EROFS metadata image, hot layer, FUSE data ----------------------------------------------------

@pytest.fixture
def roots(tmp_path: Path):
    """create_root for one test; every root is removed at teardown, and nothing of it stays mounted."""
    made: list[Path] = []

    def create(reference: str, name: str = "root", *, cache: Path | None = None, **options) -> Path:
        directory = tmp_path / name
        made.append(directory)
        return Path(create_root(reference, str(directory), store=str(tmp_path / "store"),
                                cache_dir=str(cache or tmp_path / "cache"), **options))

    yield create
    for directory in made:
        if directory.exists():
            remove_root(str(directory))
    assert not mounts_below(os.path.realpath(tmp_path))


def filled(image: Path, timeout: float = 20.0) -> dict:
    """The stats of a root's image mount once its daemon has done filling the hot layer and prefetching."""
    deadline = time.monotonic() + timeout
    while True:
        stats = mount_stats(str(image))
        if stats["prefetch_done"] and (stats["hot_layer_complete"] or stats["hot_files_failed"]):
            return stats
        assert time.monotonic() < deadline, f"the hot layer is not filled after {timeout} s: {stats}"
        time.sleep(0.02)


def _lower_layers(rootfs: Path) -> list[str]:
    options = next(entry.options for entry in mount_table() if entry.point == str(rootfs))
    lowerdir = next(option for option in options.split(",") if option.startswith("lowerdir="))
    return lowerdir[len("lowerdir="):].split("::")


def _without_root(description: dict) -> dict:
    # The merged root directory takes its attributes from the container's own (upper) directory.
    return {path: value for path, value in description.items() if path != b"."}


def test_root_metadata_comes_from_an_erofs_image(roots, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_rich_tree(tree)
    os.setxattr(tree / "small.txt", "trusted.overlay.opaque", b"y")  # the image's own: shown, never obeyed
    reference = push(str(tree), LocalStore(str(tmp_path / "store")), chunk_size=SMALL_CHUNK).reference
    rootfs = roots(reference)
    layers = _lower_layers(rootfs)
    assert layers == [str(tmp_path / "root" / "meta"), str(tmp_path / "root" / "image")]
    assert mount_entry(layers[0])[1] == "erofs"
    assert _without_root(describe(rootfs)) == _without_root(describe(tree))
    assert (rootfs / "sparse").read_bytes() == (tree / "sparse").read_bytes()
    # The container writes above it all.
    (rootfs / "small.txt").write_text("changed")
    assert (tmp_path / "root" / "upper" / "small.txt").read_text() == "changed"
    assert (tree / "small.txt").read_text() == "hello\n"


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=_trees, data=st.data())
def test_root_round_trip_generated_trees(spec: dict, data: st.DataObject,
                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("generated-root")
    tree = base / "tree"
    tree.mkdir()
    metadata = st.tuples(st.integers(0, 0o7777), st.integers(0, 70000), st.integers(0, 70000),
                         st.integers(-(10 ** 18), 10 ** 18))
    _write_tree(os.fsencode(tree), spec, lambda: data.draw(metadata))
    reference = push(str(tree), LocalStore(str(base / "store")), chunk_size=SMALL_CHUNK).reference
    rootfs = create_root(reference, str(base / "root"), store=str(base / "store"), cache_dir=str(base / "cache"))
    try:
        assert _lower_layers(Path(rootfs))[0] == str(base / "root" / "meta")
        assert _without_root(describe(Path(rootfs))) == _without_root(describe(tree))
    finally:
        remove_root(str(base / "root"))


def test_root_metadata_never_reaches_fuse(roots, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_rich_tree(tree)
    reference = push(str(tree), LocalStore(str(tmp_path / "store")), chunk_size=SMALL_CHUNK).reference
    rootfs = roots(reference)
    daemon = mount_stats(str(tmp_path / "root" / "image"))["pid"]
    os.kill(daemon, signal.SIGSTOP)  # a request that reached FUSE now would hang
    try:
        walk = subprocess.run(["find", str(rootfs), "-printf", "%p %s %m %U %G %n %l\\0"], capture_output=True,
                              timeout=20)
    finally:
        os.kill(daemon, signal.SIGCONT)
    assert walk.returncode == 0
    assert walk.stdout.count(b"\0") == len(describe(tree)) - 1  # every entry (not the <hardlinks> key)
    assert (rootfs / "large.bin").read_bytes() == (tree / "large.bin").read_bytes()  # data: from FUSE


def test_hot_layer_serves_the_files_a_start_reads_whole(roots, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "lib").mkdir()
    whole = {f"lib/module{k}.py": os.urandom(1000 + k) for k in range(5)}
    whole["lib/big-read-whole"] = os.urandom(3 * SMALL_CHUNK + 5)
    for name, content in whole.items():
        (tree / name).write_bytes(content)
    (tree / "lib/library.so").write_bytes(os.urandom(6 * SMALL_CHUNK))  # read in part: stays lazy
    (tree / "unread").write_bytes(b"never read at start")
    os.link(tree / "lib/module0.py", tree / "module0-link")
    reference = push(str(tree), LocalStore(str(tmp_path / "store")), chunk_size=SMALL_CHUNK).reference

    rootfs = roots(reference, "record", record_profile=True)
    assert len(_lower_layers(rootfs)) == 2  # a recording root has no hot layer
    for name in whole:
        (rootfs / name).read_bytes()
    with open(rootfs / "lib/library.so", "rb") as library:
        library.seek(2 * SMALL_CHUNK)
        library.read(100)
    remove_root(str(tmp_path / "record"))

    cold = tmp_path / "cold-cache"
    rootfs = roots(reference, "hot", cache=cold)
    meta, hot, image = _lower_layers(rootfs)
    assert hot.startswith(str(cold / "hot" / reference))
    # The daemon fills the layer while the root runs; a file it has not written yet is read through FUSE.
    assert (rootfs / "lib/module4.py").read_bytes() == whole["lib/module4.py"]
    stats = filled(tmp_path / "hot" / "image")
    assert stats["hot_layer_complete"] and os.path.exists(hot + ".complete")
    assert stats["hot_files_written"] == len(whole)
    hot_files = sorted(os.path.relpath(os.path.join(d, f), hot) for d, _, files in os.walk(hot) for f in files)
    assert hot_files == sorted(whole)
    for name, content in whole.items():
        assert (Path(hot) / name).read_bytes() == content
    # A file of one chunk is the cache's file of that chunk, linked; a larger one is written.
    module = os.stat(Path(hot) / "lib/module1.py")
    digest = objects.digest_of(whole["lib/module1.py"])
    assert (module.st_ino, module.st_nlink) == (os.stat(cold / "data" / digest.hex()).st_ino, 2)
    assert os.stat(Path(hot) / "lib/big-read-whole").st_nlink == 1
    # The daemon prefetches only what the hot layer does not hold: the chunks of library.so the start read.
    index = Index(objects.decode(bytes.fromhex(reference), (tmp_path / "store" / object_path(
        bytes.fromhex(reference))).read_bytes(), 1 << 20))
    profile = parse_profile(fetch_head(LocalStore(str(tmp_path / "store")), reference), index)
    read_in_part = [chunk for ino, chunk in profile if ino not in files_read_whole(profile, index)]
    assert read_in_part and all(chunk.length == SMALL_CHUNK for chunk in read_in_part)
    assert stats["profile_chunks"] == len(read_in_part)
    for name, content in whole.items():
        assert (rootfs / name).read_bytes() == content
    assert (rootfs / "module0-link").read_bytes() == whole["lib/module0.py"]
    # Only module4.py, read before it was in the layer, reached FUSE.
    assert mount_stats(str(tmp_path / "hot" / "image"))["reads"] == stats["reads"]
    assert (rootfs / "lib/library.so").read_bytes() == (tree / "lib/library.so").read_bytes()
    assert (rootfs / "unread").read_bytes() == b"never read at start"
    assert mount_stats(str(tmp_path / "hot" / "image"))["reads"] > stats["reads"]

    # A second root on the host stacks the same layer, complete: its daemon writes nothing.
    second = roots(reference, "second", cache=cold)
    assert _lower_layers(second)[1] == hot
    assert filled(tmp_path / "second" / "image")["hot_files_written"] == 0
    assert sorted(os.listdir(cold / "hot")) == [os.path.basename(hot), os.path.basename(hot) + ".complete"]


def test_hot_layer_left_incomplete_is_completed(roots, tmp_path: Path) -> None:
    """A daemon killed while it filled a layer leaves whole files and no marker: the next one writes the rest."""
    tree = tmp_path / "tree"
    tree.mkdir()
    files = {f"file{k}": os.urandom(3000 + k) for k in range(4)}
    for name, content in files.items():
        (tree / name).write_bytes(content)
    reference = push(str(tree), LocalStore(str(tmp_path / "store")), chunk_size=SMALL_CHUNK).reference
    recording = roots(reference, "record", record_profile=True)
    for name in files:
        (recording / name).read_bytes()
    remove_root(str(tmp_path / "record"))
    hot = _lower_layers(roots(reference, "first"))[1]
    filled(tmp_path / "first" / "image")
    remove_root(str(tmp_path / "first"))
    os.unlink(hot + ".complete")
    for name in ("file1", "file3"):
        os.unlink(os.path.join(hot, name))
    rootfs = roots(reference, "second")
    assert _lower_layers(rootfs)[1] == hot
    stats = filled(tmp_path / "second" / "image")
    assert (stats["hot_files_written"], stats["hot_layer_complete"]) == (2, True)
    assert sorted(os.listdir(hot)) == sorted(files)
    for name, content in files.items():
        assert (rootfs / name).read_bytes() == content


def test_hot_layer_of_another_boot_is_never_used(roots, tmp_path: Path) -> None:
    """Nothing syncs a hot layer to disk: one written before the host went down may be torn, so it is rebuilt."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_bytes(os.urandom(5000))
    reference = push(str(tree), LocalStore(str(tmp_path / "store")), chunk_size=SMALL_CHUNK).reference
    (roots(reference, "record", record_profile=True) / "file").read_bytes()
    remove_root(str(tmp_path / "record"))
    hot = _lower_layers(roots(reference, "first"))[1]
    filled(tmp_path / "first" / "image")
    remove_root(str(tmp_path / "first"))
    earlier_boot = hot[:-12] + "0" * 12
    os.rename(hot, earlier_boot)
    os.rename(hot + ".complete", earlier_boot + ".complete")
    rootfs = roots(reference, "second")
    assert _lower_layers(rootfs)[1] == hot
    assert not os.path.exists(earlier_boot) and not os.path.exists(earlier_boot + ".complete")
    assert filled(tmp_path / "second" / "image")["hot_files_written"] == 1
    assert (rootfs / "file").read_bytes() == (tree / "file").read_bytes()


def test_hot_layer_eviction_spares_the_layers_daemons_hold(tmp_path: Path) -> None:
    from coldbrew.fs.hotlayer import HotLayer, _evict

    held = HotLayer(str(tmp_path), "a" * 64, b"one profile")
    idle = HotLayer(str(tmp_path), "b" * 64, b"another profile")
    for layer in (held, idle):
        (Path(layer.path) / "file").write_bytes(os.urandom(8192))
        Path(layer.path + ".complete").touch()
    idle.close()
    _evict(held.root, 0, keep=str(tmp_path / "none"))
    assert os.path.exists(held.path + ".complete") and os.listdir(held.path) == ["file"]
    assert not os.path.exists(idle.path) and not os.path.exists(idle.path + ".complete")
    held.close()
    again = HotLayer(str(tmp_path), "b" * 64, b"another profile")  # made again, empty and incomplete
    try:
        assert (again.path, again.complete, os.listdir(again.path)) == (idle.path, False, [])
    finally:
        again.close()


def test_hot_layer_links_a_one_chunk_file_from_the_thread_that_caches_its_chunk(tmp_path: Path) -> None:
    import itertools

    import trio

    from coldbrew.fs.cache import ChunkCache
    from coldbrew.fs.fetch import ChunkFetcher
    from coldbrew.fs.hotlayer import _Linker

    store = LocalStore(str(tmp_path / "store"))
    shared, alone, late = (os.urandom(3000 + k) for k in range(3))
    for data in (shared, alone, late):
        store.put(*objects.encode(data))
    layer, scratch = tmp_path / "layer", tmp_path / "scratch"
    scratch.mkdir()
    [first, copy, single, unstored] = [str(layer / name) for name in ("lib/a", "lib/b", "c", "d")]
    with ChunkCache(str(tmp_path / "cache")) as cache:
        def cache_file(data: bytes) -> os.stat_result:
            return os.stat(tmp_path / "cache" / "data" / objects.digest_of(data).hex())

        linker = _Linker(cache, str(scratch), itertools.count(), {
            1: (objects.digest_of(shared), first), 2: (objects.digest_of(shared), copy),
            3: (objects.digest_of(alone), single), 4: (objects.digest_of(late), unstored)})
        fetcher = ChunkFetcher(store, cache)
        fetcher.on_cached = linker.chunk_cached

        async def fetch(data: bytes) -> bytes:
            return await fetcher.chunk(objects.digest_of(data), len(data))

        # Both files of the chunk are linked before its reader has it: no hop of their own.
        assert trio.run(fetch, shared) == shared
        assert linker.linked == {1, 2}
        assert os.stat(first).st_ino == os.stat(copy).st_ino == cache_file(shared).st_ino
        assert Path(first).read_bytes() == shared
        assert linker.link(1) is False  # there already: counted once
        assert linker.link(4) is None and not os.path.lexists(unstored)  # the cache lacks its chunk

        # A chunk cached before the layer looked for it is linked by link_cached.
        cache.put(objects.digest_of(late), late)
        linker.link_cached()
        assert linker.linked == {1, 2, 4} and Path(unstored).read_bytes() == late

        # A hook that fails costs its work, never the read.
        def broken(digest: bytes) -> None:
            raise OSError(errno.ENOSPC, "no space")

        fetcher.on_cached = broken
        assert trio.run(fetch, alone) == alone
        assert not os.path.lexists(single) and os.listdir(scratch) == []


def test_hot_layer_without_a_chunk_leaves_its_file_to_fuse(roots, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_bytes(os.urandom(5000))
    (tree / "other").write_bytes(os.urandom(5000))
    store = LocalStore(str(tmp_path / "store"))
    reference = push(str(tree), store, chunk_size=SMALL_CHUNK).reference
    rootfs = roots(reference, "record", record_profile=True)
    (rootfs / "file").read_bytes()
    (rootfs / "other").read_bytes()
    remove_root(str(tmp_path / "record"))
    index = Index(objects.decode(bytes.fromhex(reference), store.get(bytes.fromhex(reference)), 1 << 20))
    chunk = index.chunks(index.lookup(1, b"file"))[0]
    cache = tmp_path / "cold-cache"  # the recording's cache holds the chunk: this one must fetch it
    (cache / "hot").mkdir(parents=True)
    abandoned = cache / "hot" / f".building-{2 ** 22 + 1}-{reference}-x"  # a daemon killed half-way
    (abandoned / "file").parent.mkdir(parents=True)
    # A chunk corrupt in the store and in the profile's pack: the root starts, its file is left out of the layer,
    # and reading it fails.
    good = (tmp_path / "store" / object_path(chunk.digest)).read_bytes()
    (tmp_path / "store" / object_path(chunk.digest)).write_bytes(good[:-3] + b"bad")
    profile_path = tmp_path / "store" / "named" / "profiles" / reference
    profile = bytearray(profile_path.read_bytes())
    packed, = [packed for packed in packed_chunks(bytes(profile)) if packed.digest == chunk.digest]
    profile[packed.offset + packed.stored - 1] ^= 0xFF
    profile_path.write_bytes(bytes(profile))
    broken = roots(reference, "broken", cache=cache)
    hot = _lower_layers(broken)[1]
    stats = filled(tmp_path / "broken" / "image")
    assert (stats["hot_files_written"], stats["hot_files_failed"], stats["hot_layer_complete"]) == (1, 1, False)
    assert not abandoned.exists() and not os.path.exists(hot + ".complete")
    assert os.listdir(hot) == ["other"]
    with pytest.raises(OSError) as error:
        (broken / "file").read_bytes()
    assert error.value.errno == errno.EIO
    assert chunk.digest.hex() in Path(stats["log"]).read_text()
    assert (broken / "other").read_bytes() == (tree / "other").read_bytes()
    (tmp_path / "store" / object_path(chunk.digest)).write_bytes(good)  # the pack's copy stays corrupt
    rootfs = roots(reference, "fixed", cache=cache)
    assert _lower_layers(rootfs)[1] == hot
    assert filled(tmp_path / "fixed" / "image")["hot_layer_complete"]
    assert sorted(os.listdir(hot)) == ["file", "other"]
    assert (rootfs / "file").read_bytes() == (tree / "file").read_bytes()


def test_tree_erofs_cannot_express_is_served_from_fuse(roots, tmp_path: Path) -> None:
    builder = IndexBuilder()
    root = builder.add(mode=stat.S_IFDIR | 0o755)
    odd = builder.add(mode=stat.S_IFREG | 0o644, xattrs=[(b"system.unknown", b"1")])
    builder.set_children(root, [(b"odd", odd)])
    with pytest.raises(UnsupportedTree, match="system.unknown"):
        write_image(Index(builder.build()), str(tmp_path / "image.erofs"), {})
    reference = _store_raw_index(LocalStore(str(tmp_path / "store")), builder.build())
    rootfs = roots(reference)
    assert _lower_layers(rootfs) == [str(tmp_path / "root" / "image")]
    assert (rootfs / "odd").read_bytes() == b""


def test_damaged_erofs_image_is_made_again(roots, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_rich_tree(tree)
    reference = push(str(tree), LocalStore(str(tmp_path / "store")), chunk_size=SMALL_CHUNK).reference
    image = tmp_path / "cache" / "erofs" / reference
    image.parent.mkdir(parents=True)
    image.write_bytes(b"\0" * 8192)  # what a crash before writeback can leave
    rootfs = roots(reference, "first")
    assert _lower_layers(rootfs) == [str(tmp_path / "first" / "image")]  # served from FUSE, still whole
    assert _without_root(describe(rootfs)) == _without_root(describe(tree))
    assert not image.exists()
    rootfs = roots(reference, "second")
    assert _lower_layers(rootfs)[0] == str(tmp_path / "second" / "meta")
    assert image.stat().st_size > 8192


def _pushed_with_image(tmp_path: Path) -> tuple[Path, LocalStore, str, Index, bytes, bytes]:
    """A rich tree pushed to `tmp_path/store`: (tree, store, reference, index, the digest of the metadata image
    stored beside the index, that image)."""
    tree = tmp_path / "tree"
    make_rich_tree(tree)
    store = LocalStore(str(tmp_path / "store"))
    reference = push(str(tree), store, chunk_size=SMALL_CHUNK).reference
    index = Index(objects.decode(bytes.fromhex(reference), store.get(bytes.fromhex(reference)), 1 << 24))
    stored = bytes.fromhex(index.metadata[INDEX_METADATA_KEY]["image"])
    expected = objects.decode(stored, store.get(stored), 1 << 24)
    return tree, store, reference, index, stored, expected


def test_erofs_image_is_pushed_beside_the_index(roots, tmp_path: Path) -> None:
    tree, store, reference, index, stored, expected = _pushed_with_image(tmp_path)
    assert expected == image_bytes(index, redirect_paths(index))  # what a host would write itself
    roots(reference, "fetched")
    assert (tmp_path / "cache" / "erofs" / reference).read_bytes() == expected
    # Without the stored image (or with a damaged one) a host writes its own.
    (tmp_path / "store" / object_path(stored)).write_bytes(b"damaged")
    rootfs = roots(reference, "written", cache=tmp_path / "other-cache")
    assert (tmp_path / "other-cache" / "erofs" / reference).read_bytes() == expected
    assert _without_root(describe(rootfs)) == _without_root(describe(tree))


def _naming_image(profile: bytes, digest: bytes) -> bytes:
    """The profile file with its head naming another metadata image (the pack's offsets follow the head)."""
    start = len(PROFILE_MAGIC) + 4
    end = start + int.from_bytes(profile[len(PROFILE_MAGIC):start], "little")
    head = objects.compress(digest + objects.decompress(profile[start:end], 1 << 20)[objects.DIGEST_SIZE:])
    return PROFILE_MAGIC + len(head).to_bytes(4, "little") + head + profile[end:]


def test_erofs_image_the_profile_names_is_kept_only_if_the_index_names_it(roots, tmp_path: Path) -> None:
    tree, store, reference, _, stored, expected = _pushed_with_image(tmp_path)
    rootfs = roots(reference, "record", record_profile=True)
    for path in rootfs.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.read_bytes()
    remove_root(str(tmp_path / "record"))
    profile = store.get_named(profile_name(reference))
    assert metadata_image(fetch_head(store, reference)) == stored  # fetched while the index downloads
    # A profile naming another object of the store (the index itself: it decodes) must not make it the image.
    store.put_named(profile_name(reference), _naming_image(profile, bytes.fromhex(reference)))
    rootfs = roots(reference, "misnamed", cache=tmp_path / "misnamed-cache")
    assert (tmp_path / "misnamed-cache" / "erofs" / reference).read_bytes() == expected
    assert _lower_layers(rootfs)[0] == str(tmp_path / "misnamed" / "meta")
    assert _without_root(describe(rootfs)) == _without_root(describe(tree))
