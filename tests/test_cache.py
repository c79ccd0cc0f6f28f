"""The local chunk cache: real files and lmdb, several processes, kill -9, damaged records and files."""

from __future__ import annotations

import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from coldbrew.fs import objects
from coldbrew.fs.cache import BLOCK, ChunkCache, open_index, validate_index
from coldbrew.fs.errors import BadIndex, CorruptChunk
from coldbrew.fs.index import Index, IndexBuilder
from coldbrew.fs.objects import digest_of
from coldbrew.fs.store import LocalStore

# A child process that puts (and reads back) random chunks until it is killed or has put `count` of them.
WORKER = r"""
import os, random, sys
from coldbrew.fs.cache import ChunkCache
from coldbrew.fs.objects import digest_of
directory, limit, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
cache = ChunkCache(directory, limit)
print("ready", flush=True)
done = []
for _ in range(count):
    data = rng.randbytes(rng.choice([0, 1, 100, 4095, 4096, 5000, 20000, 70000]))
    digest = digest_of(data)
    cache.put(digest, data)
    done.append(digest)
    probe = rng.choice(done)
    got = cache.get(probe)
    if got is not None and digest_of(got) != probe:
        sys.exit(f"served wrong bytes for {probe.hex()}")
if count == 0:
    import time
    time.sleep(60)  # hold the cache open until killed
cache.close()
"""


def charge(size: int) -> int:
    return max(BLOCK, -(-size // BLOCK) * BLOCK)


def chunk(size: int, seed: int) -> tuple[bytes, bytes]:
    data = random.Random(seed).randbytes(size)
    return digest_of(data), data


def chunk_file(directory: Path, digest: bytes) -> Path:
    return directory / "data" / digest.hex()


def worker(directory: Path, limit: int, seed: int, count: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(directory), str(limit), str(seed), str(count)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_consistent(directory: Path, limit: int) -> int:
    """Open the cache (recovering what a killed process left) and check every file is served, verified, counted."""
    with ChunkCache(str(directory), limit) as cache:
        files = list((directory / "data").iterdir())
        for path in files:
            digest = bytes.fromhex(path.name)
            data = cache.get(digest)
            assert data is not None, f"{path} has no record"
            assert digest_of(data) == digest, f"{path} served bytes that do not hash to its name"
        stats = cache.stats()
        assert stats["entries"] == len(files)
        assert stats["bytes"] == sum(charge(path.stat().st_size) for path in files) <= limit
        assert len(os.listdir(directory / "owners")) == 1  # ours: the dead ones were claimed
    assert not [path for path in directory.rglob("*") if "tmp" in path.name]
    return len(files)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_round_trip(directory: Path) -> None:
    digest, data = chunk(300_000, 1)
    with ChunkCache(str(directory), 1 << 20) as cache:
        assert cache.get(digest) is None and digest not in cache
        cache.put(digest, data)
        cache.put(digest, data)  # idempotent
        assert digest in cache
        assert cache.get(digest) == data
        assert cache.read(digest, 1000, 5000) == data[1000:6000]
        assert cache.read(digest, 299_990, 100) == data[299_990:]
        assert cache.read(digest, 400_000, 10) == b""
        assert chunk_file(directory, digest).read_bytes() == data  # stored raw, for plain preads
        empty_digest, empty = chunk(0, 2)
        cache.put(empty_digest, memoryview(bytearray(empty)))
        assert cache.get(empty_digest) == b""
        stats = cache.stats()
        assert stats == {"entries": 2, "bytes": charge(300_000) + BLOCK, "limit_bytes": 1 << 20, "hits": 5,
                         "misses": 1, "evictions": 0}
    with ChunkCache(str(directory), 1 << 20) as cache:  # persists across opens
        assert cache.get(digest) == data


def test_bad_input(directory: Path) -> None:
    with pytest.raises(ValueError, match="limit"):
        ChunkCache(str(directory), 100)
    with ChunkCache(str(directory), 2 * BLOCK) as cache:
        with pytest.raises(ValueError, match="digest"):
            cache.get(b"short")
        with pytest.raises(ValueError, match="digest"):
            cache.put("00" * 32, b"x")  # type: ignore[arg-type]
        digest, data = chunk(BLOCK, 3)
        cache.put(digest, data)
        with pytest.raises(ValueError, match="negative"):
            cache.read(digest, -1, 10)
        # Larger than the whole limit: refused, and nothing else is evicted for it.
        big_digest, big = chunk(2 * BLOCK + 1, 4)
        cache.put(big_digest, big)
        assert big_digest not in cache and cache.get(digest) == data
        assert not chunk_file(directory, big_digest).exists()


def test_lru_order(directory: Path) -> None:
    pieces = [chunk(BLOCK, seed) for seed in range(6)]
    with ChunkCache(str(directory), 4 * BLOCK) as cache:
        for digest, data in pieces[:4]:
            cache.put(digest, data)
        assert cache.get(pieces[0][0]) is not None  # 1 is now the least recently used
        assert cache.read(pieces[1][0], 0, 1) is not None  # a read is a use too: 2 is the oldest
        cache.put(pieces[4][0], pieces[4][1])
        assert [digest in cache for digest, _ in pieces[:5]] == [True, True, False, True, True]
        cache.put(pieces[3][0], pieces[3][1])  # putting what is there counts as a use
        cache.put(pieces[5][0], pieces[5][1])
        assert [digest in cache for digest, _ in pieces] == [False, True, False, True, True, True]
        assert cache.stats()["evictions"] == 2
    # Uses not yet flushed when the cache closed are written at close and survive a reopen.
    with ChunkCache(str(directory), 4 * BLOCK) as cache:
        cache.get(pieces[1][0])
    with ChunkCache(str(directory), 4 * BLOCK) as cache:
        cache.put(pieces[0][0], pieces[0][1])
        assert pieces[1][0] in cache and pieces[4][0] not in cache


def test_smaller_limit_on_open_evicts(directory: Path) -> None:
    pieces = [chunk(BLOCK, seed) for seed in range(8)]
    with ChunkCache(str(directory), 8 * BLOCK) as cache:
        for digest, data in pieces:
            cache.put(digest, data)
    with ChunkCache(str(directory), 3 * BLOCK) as cache:
        assert [digest in cache for digest, _ in pieces] == [False] * 5 + [True] * 3
        assert cache.stats()["bytes"] == 3 * BLOCK
    assert len(os.listdir(directory / "data")) == 3


class CacheModel(RuleBasedStateMachine):
    """Exact LRU semantics against a model, through puts, gets, reads and reopenings."""

    LIMIT = 10 * BLOCK
    PIECES = [chunk(size, seed) for seed, size in enumerate([0, 1, 4095, 4096, 4097, 9000, 12288, 20000, 30000,
                                                               41000, 45000, 5, 3000, 8192, 16385, 100])]

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="cache-model-")
        self.cache = ChunkCache(self.directory, self.LIMIT)
        self.model: OrderedDict[bytes, int] = OrderedDict()

    def teardown(self) -> None:
        self.cache.close()
        shutil.rmtree(self.directory)

    @rule(index=st.integers(0, len(PIECES) - 1))
    def put(self, index: int) -> None:
        digest, data = self.PIECES[index]
        self.cache.put(digest, data)
        if charge(len(data)) > self.LIMIT:
            return
        if digest not in self.model:
            while sum(self.model.values()) + charge(len(data)) > self.LIMIT:
                self.model.popitem(last=False)
        self.model[digest] = charge(len(data))
        self.model.move_to_end(digest)

    @rule(index=st.integers(0, len(PIECES) - 1))
    def get(self, index: int) -> None:
        digest, data = self.PIECES[index]
        got = self.cache.get(digest)
        assert got == (data if digest in self.model else None)
        if digest in self.model:
            self.model.move_to_end(digest)

    @rule(index=st.integers(0, len(PIECES) - 1), offset=st.integers(0, 50000), length=st.integers(0, 50000))
    def read(self, index: int, offset: int, length: int) -> None:
        digest, data = self.PIECES[index]
        got = self.cache.read(digest, offset, length)
        assert got == (data[offset:offset + length] if digest in self.model else None)
        if digest in self.model:
            self.model.move_to_end(digest)

    @rule()
    def reopen(self) -> None:
        self.cache.close()
        self.cache = ChunkCache(self.directory, self.LIMIT)

    @invariant()
    def agrees(self) -> None:
        stats = self.cache.stats()
        assert stats["bytes"] == sum(self.model.values()) <= self.LIMIT
        assert stats["entries"] == len(self.model)
        assert [digest in self.cache for digest, _ in self.PIECES] == [digest in self.model
                                                                       for digest, _ in self.PIECES]


TestCacheModel = CacheModel.TestCase
TestCacheModel.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])


def test_two_processes_share_the_limit(directory: Path) -> None:
    limit = 64 * BLOCK
    ChunkCache(str(directory), limit).close()
    children = [worker(directory, limit, seed, 300) for seed in (1, 2)]
    peak = 0
    with ChunkCache(str(directory), limit) as cache:
        while any(child.poll() is None for child in children):
            peak = max(peak, cache.stats()["bytes"])
            assert peak <= limit
            time.sleep(0.002)
        assert cache.stats()["evictions"] > 0
    for child in children:
        assert child.wait() == 0, child.stderr.read()
    assert peak > limit // 2  # the poll saw the cache in use
    assert check_consistent(directory, limit) > 0


def test_kill_9_during_heavy_puts(directory: Path) -> None:
    limit = 48 * BLOCK
    rng = random.Random(7)
    for round_ in range(14):
        child = worker(directory, limit, round_, 100_000)
        if round_ % 2:
            assert child.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0, 0.15))
        else:  # sometimes while it opens (and recovers from the previous kill)
            time.sleep(rng.uniform(0.02, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert "wrong bytes" not in child.stderr.read()
        child.stdout.close()
        child.stderr.close()
        if round_ % 3 == 2:
            check_consistent(directory, limit)
    assert check_consistent(directory, limit) > 0


def test_recovery_after_a_killed_owner(directory: Path) -> None:
    (kept, kept_data), (gone, gone_data), (torn, torn_data), (orphan, orphan_data) = (
        chunk(10_000, seed) for seed in range(4))
    with ChunkCache(str(directory), 1 << 20) as cache:
        for digest, data in ((kept, kept_data), (gone, gone_data), (torn, torn_data)):
            cache.put(digest, data)
    # What a kill leaves: a file linked but never recorded, a record whose file was unlinked, and (not from a kill,
    # but handled the same) a file of the wrong size.
    chunk_file(directory, orphan).write_bytes(orphan_data)
    chunk_file(directory, gone).unlink()
    os.truncate(chunk_file(directory, torn), 5000)
    child = worker(directory, 1 << 20, 0, 0)
    assert child.stdout.readline() == "ready\n"
    child.kill()
    child.communicate()
    assert len(os.listdir(directory / "owners")) == 1
    with ChunkCache(str(directory), 1 << 20) as cache:
        assert not chunk_file(directory, orphan).exists()
        assert not chunk_file(directory, torn).exists()
        assert cache.stats()["entries"] == 1 and cache.stats()["bytes"] == charge(10_000)
        assert cache.get(kept) == kept_data
        assert cache.get(gone) is None and cache.get(torn) is None and cache.get(orphan) is None
        assert os.listdir(directory / "owners") != []
    assert os.listdir(directory / "owners") == []


def test_cache_of_the_layout_before_data_is_emptied(directory: Path) -> None:
    """A cache kept its chunks in chunks/ab/<hex> before data/<hex>: its files are removed, not left forever."""
    digest, data = chunk(10_000, 1)
    with ChunkCache(str(directory), 1 << 20) as cache:
        cache.put(digest, data)
        cache.put_index(*chunk(100, 2))
    old = directory / "chunks" / digest.hex()[:2] / digest.hex()
    old.parent.mkdir(parents=True)
    os.rename(chunk_file(directory, digest), old)
    with ChunkCache(str(directory), 1 << 20) as cache:
        assert not (directory / "chunks").exists() and os.listdir(directory / "indexes") == []
        assert cache.stats()["entries"] == 0 and cache.get(digest) is None
        cache.put(digest, data)
        assert cache.get(digest) == data and os.listdir(directory / "data") == [digest.hex()]


def test_owner_from_an_earlier_boot_empties_the_cache(directory: Path) -> None:
    digest, data = chunk(10_000, 1)
    with ChunkCache(str(directory), 1 << 20) as cache:
        cache.put(digest, data)
    (directory / "owners" / "1-stale").write_bytes(b"00000000-0000-0000-0000-000000000000")
    with ChunkCache(str(directory), 1 << 20) as cache:
        assert cache.stats()["entries"] == 0 and cache.get(digest) is None
        assert not chunk_file(directory, digest).exists()
        cache.put(digest, data)
        assert cache.get(digest) == data


def test_damaged_record_is_dropped(directory: Path) -> None:
    pieces = [chunk(20_000, seed) for seed in range(3)]
    with ChunkCache(str(directory), 1 << 20) as cache:
        for digest, data in pieces:
            cache.put(digest, data)
        # Reach into the index as a damaged disk or a buggy writer might: not a record, and a wrong size.
        with cache._env.begin(write=True, db=cache._shared.records) as txn:
            txn.put(pieces[0][0], b"xx")
            txn.put(pieces[1][0], txn.get(pieces[1][0])[:0] + (19_999).to_bytes(8, "little") + bytes(8))
        assert cache.get(pieces[0][0]) is None
        assert cache.read(pieces[1][0], 0, 10) is None
        assert pieces[0][0] not in cache and pieces[1][0] not in cache
        assert not chunk_file(directory, pieces[1][0]).exists()
        assert cache.get(pieces[2][0]) == pieces[2][1]
        cache.put(pieces[0][0], pieces[0][1])
        assert cache.get(pieces[0][0]) == pieces[0][1]


@pytest.mark.parametrize("damage", ["truncate", "extend", "unlink"])
def test_damaged_file_is_dropped(directory: Path, damage: str) -> None:
    digest, data = chunk(50_000, 1)
    with ChunkCache(str(directory), 1 << 20) as cache:
        cache.put(digest, data)
        path = chunk_file(directory, digest)
        if damage == "truncate":
            os.truncate(path, 49_999)
        elif damage == "extend":
            with open(path, "ab") as file:
                file.write(b"!")
        else:
            path.unlink()
        for attempt in (lambda: cache.get(digest), lambda: cache.read(digest, 0, 10)):
            assert attempt() is None
            cache.put(digest, data)
            assert cache.get(digest) == data
            (os.truncate(path, 10) if damage != "unlink" else path.unlink())
        assert cache.get(digest) is None
        assert cache.stats()["entries"] == 0 and cache.stats()["bytes"] == 0


def test_threads(directory: Path) -> None:
    pieces = [chunk(size, seed) for seed, size in enumerate(random.Random(3).choices(range(1, 40_000), k=64))]
    limit = 80 * BLOCK
    errors: list[str] = []
    with ChunkCache(str(directory), limit) as cache:
        def work(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(300):
                digest, data = rng.choice(pieces)
                action = rng.random()
                if action < 0.4:
                    cache.put(digest, data)
                elif action < 0.7:
                    got = cache.get(digest)
                    if got not in (None, data):
                        errors.append(f"get {digest.hex()}")
                else:
                    offset = rng.randrange(len(data))
                    got = cache.read(digest, offset, 5000)
                    if got not in (None, data[offset:offset + 5000]):
                        errors.append(f"read {digest.hex()}")
                if cache.stats()["bytes"] > limit:
                    errors.append("over the limit")
        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        stats = cache.stats()
        assert stats["hits"] > 0 and stats["misses"] > 0 and stats["evictions"] > 0
    check_consistent(directory, limit)


def test_two_objects_in_one_process(directory: Path) -> None:
    digest, data = chunk(1000, 1)
    first = ChunkCache(str(directory), 1 << 20)
    second = ChunkCache(str(directory), 1 << 20)
    first.put(digest, data)
    assert second.get(digest) == data
    first.close()
    assert second.get(digest) == data and second.stats()["hits"] == 2
    second.close()


def test_indexes(directory: Path) -> None:
    data = random.Random(1).randbytes(70_000)
    digest = digest_of(data)
    with ChunkCache(str(directory), 1 << 20) as cache:
        with pytest.raises(CorruptChunk):
            cache.put_index(digest, data[:-1])
        assert not os.path.exists(cache.index_path(digest))
        cache.put_index(digest, data)
        cache.put_index(digest, data)
        assert Path(cache.index_path(digest)).read_bytes() == data
        assert not cache.is_index_validated(digest)
        cache.mark_index_validated(digest)
        assert cache.is_index_validated(digest)
        assert cache.stats()["entries"] == 0  # indexes are not chunks: no LRU, no limit
    with ChunkCache(str(directory), 1 << 20) as cache:
        assert cache.is_index_validated(digest)
        os.truncate(cache.index_path(digest), 100)
        assert not cache.is_index_validated(digest)
        cache.put_index(digest, data)  # a torn copy is replaced
        assert Path(cache.index_path(digest)).read_bytes() == data and cache.is_index_validated(digest)


def _two_level_index(child_name: bytes) -> bytes:
    builder = IndexBuilder()
    root = builder.add(mode=stat.S_IFDIR | 0o755)
    sub = builder.add(mode=stat.S_IFDIR | 0o755, parent=root)
    builder.set_children(root, [(child_name, sub)])
    return builder.build()


def test_an_index_is_validated_on_a_thread_as_soon_as_it_is_fetched(directory: Path, tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path / "store"))
    good, bad = (objects.encode(_two_level_index(name)) for name in (b"sub", b".."))
    for digest, stored in (good, bad):
        store.put(digest, stored)
    with ChunkCache(str(directory), 1 << 20) as cache:
        index, mapped, validation = open_index(good[0].hex(), store, cache, validate=True)
        assert validation is not None and mapped is None and index.child_count(1) == 1  # read from the fetched bytes
        assert not cache.is_index_validated(good[0])
        validation.wait()
        assert cache.is_index_validated(good[0])
        with open(cache.index_path(good[0]), "rb") as kept:  # put in the cache while it was validated
            assert kept.read() == _two_level_index(b"sub")
        index.release()
        index, mapped, validation = open_index(good[0].hex(), store, cache, validate=True)
        assert validation is None and mapped is not None  # remembered valid, read from the cache's file
        index.release()
        mapped.close()

        index, mapped, validation = open_index(bad[0].hex(), store, cache, validate=True)
        with pytest.raises(BadIndex, match="not a file name"):
            validation.wait()
        assert not cache.is_index_validated(bad[0])
        # Kept, but not remembered valid: validated again when opened again.
        index, mapped, validation = open_index(bad[0].hex(), store, cache, validate=True)
        assert validation is not None and mapped is not None
        validation.close()
        with pytest.raises(BadIndex, match="not a file name"):
            validation.wait()
        assert not cache.is_index_validated(bad[0])
        index.release()
        mapped.close()
        with pytest.raises(BadIndex, match="not a file name"):
            validate_index(bad[0].hex(), Index(_two_level_index(b"..")), cache)  # in this process
