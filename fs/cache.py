"""The local chunk cache in front of a store: raw chunk files plus an lmdb index, LRU-evicted under a size limit.

Layout of a cache directory (shared by every mount on the host, each in its own process):

    data/<hex>        raw (uncompressed, verified) chunk data, so a warm read is one pread; one flat directory
                      (ext4, xfs and btrfs index large ones), because making fan-out subdirectories cost a first
                      start on a new cache 20 ms of CPU for 187 chunks, ten times the files' own creation
    indexes/<hex>     image index files, uncompressed so a mount can mmap them (not LRU-evicted)
    index/            lmdb: chunk -> (size, last use), an LRU order, totals, validated-index markers
    owners/           one flock-held file per open cache; a file whose lock is free belonged to a killed process
    open.lock         serialises opening (crash recovery) across processes

Crash safety (kill -9 at any moment): chunk data is written into an unnamed O_TMPFILE inode and only linked under
its name once complete, so a torn file never has a name and no temporary files can be left behind. Every link and
unlink in `data/` happens inside an lmdb write transaction (lmdb serialises writers across processes), so a
record and its file agree except after a kill between the link and the commit (a file without a record) or between
an eviction's unlink and its commit (a record without a file). The next opener sees the dead owner's free lock and
reconciles records with files; a record whose file is missing or of the wrong size is also dropped when a reader
meets it. An owner left by a previous boot (a host crash: lmdb runs without fsync, file data may be unwritten)
makes the next opener start from an empty cache.

get()/read() do not re-hash: names are only given to complete files, the size is checked against the record on
every read, and hashing would more than double the cost of a warm 1 MiB read (measured: pread 78 us, blake3
104-170 us on this machine).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import shutil
import struct
import threading
import time
from typing import TYPE_CHECKING, Callable

import lmdb

from . import objects
from .errors import BadReference, ChunkMissing, CorruptChunk, FsError, StoreUnavailable
from .index import MAX_INDEX_SIZE, Index
from .objects import DIGEST_SIZE, digest_of

if TYPE_CHECKING:
    from .store import ChunkStore

DEFAULT_CACHE_DIR = "/var/cache/coldbrew"
DEFAULT_CACHE_SIZE = 20 << 30

# Chunks are charged in whole filesystem blocks: the limit is about disk space, and small files waste the rest.
BLOCK = 4096
# Virtual address space only; the data file grows as used. An entry costs about 200 bytes in lmdb, so this bounds
# entries at MAP_SIZE // 512 with room to spare (and the byte limit bounds them at limit // BLOCK).
MAP_SIZE = 4 << 30
MAX_ENTRIES = MAP_SIZE // 512
MAX_READERS = 1024
# Last-use updates are kept in memory and written in one transaction every FLUSH_USES uses or FLUSH_SECONDS.
FLUSH_USES = 1024
FLUSH_SECONDS = 1.0

_RECORD = struct.Struct("<QQ")  # chunk size in bytes, last use (ns since the epoch)
_COUNTER = struct.Struct("<Q")
_STAMP = struct.Struct(">Q")  # big-endian, so the LRU table sorts oldest first
_BYTES = b"bytes"
_EVICTIONS = b"evictions"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"
_DATA = "data"
_OLD_DATA = "chunks"  # chunks/ab/<hex>: the layout before data/

# lmdb must not open one environment twice in a process (its locks are per process): instances share one.
_envs: dict[str, _Env] = {}
_envs_lock = threading.Lock()


def _charge(size: int) -> int:
    return max(BLOCK, -(-size // BLOCK) * BLOCK)


def _chunk_name(digest: bytes) -> str:
    return digest.hex()


def _lru_key(stamp: int, digest: bytes) -> bytes:
    return _STAMP.pack(stamp) + digest


def _check_digest(digest: bytes) -> None:
    if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
        raise ValueError(f"digest: expected {DIGEST_SIZE} bytes, got {digest!r:.80}")


def _parse(value: bytes | None) -> tuple[int, int] | None:
    """(size, last use) of a record, or None when it is missing or not a record (damaged)."""
    if value is None or len(value) != _RECORD.size:
        return None
    return _RECORD.unpack(value)


def boot_id() -> bytes:
    """This boot's id: what the page cache holds now can be lost with it (a host crash), nothing else can."""
    with open(_BOOT_ID, "rb") as file:
        return file.read().strip()


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _link_tmpfile(fd: int, dir_fd: int, name: str) -> None:
    """Give an O_TMPFILE inode a name. A src_dir_fd makes CPython use linkat(AT_SYMLINK_FOLLOW)."""
    os.link(f"/proc/self/fd/{fd}", name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=True)


def _open_tmpfile(dir_fd: int) -> int:
    try:
        return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as error:
        raise FsError(f"cache: cannot create an unnamed file (O_TMPFILE) in the cache directory: {error}; "
                      "put the cache on ext4, xfs, btrfs or tmpfs") from None


class _Env:
    """One process's lmdb environment for a cache directory and its tables."""

    def __init__(self, path: str) -> None:
        # sync=False: a commit costs ~5 us instead of ~340 us (fsync). A killed process loses nothing (its writes
        # are in the page cache); a host crash may lose or damage the index, which is why a previous boot's owner
        # makes the next opener start afresh.
        self.env = lmdb.open(path, map_size=MAP_SIZE, subdir=True, max_dbs=4, max_readers=MAX_READERS,
                             sync=False, metasync=False, meminit=False)
        # Reader slots of killed processes would otherwise pin old pages forever.
        self.env.reader_check()
        self.records = self.env.open_db(b"chunks")
        self.lru = self.env.open_db(b"lru")
        self.meta = self.env.open_db(b"meta")
        self.indexes = self.env.open_db(b"indexes")
        self.pid = os.getpid()
        self.users = 0


def _acquire_env(path: str) -> _Env:
    with _envs_lock:
        shared = _envs.get(path)
        if shared is None or shared.pid != os.getpid():
            shared = _envs[path] = _Env(path)
        shared.users += 1
        return shared


def _release_env(path: str, shared: _Env) -> None:
    with _envs_lock:
        shared.users -= 1
        if shared.users == 0:
            shared.env.close()
            if _envs.get(path) is shared:
                del _envs[path]


class ChunkCache:
    """Verified raw chunks on local disk, shared by the processes on a host; thread-safe.

    `put` trusts its caller to have verified the data against the digest (the fetch path decodes with
    `objects.decode`, which does). A chunk charged more than the whole limit is not cached (`put` ignores it).
    Hits and misses in `stats` count this object's lookups; entries, bytes and evictions are the whole cache's.
    """

    def __init__(self, directory: str, limit_bytes: int = DEFAULT_CACHE_SIZE) -> None:
        if limit_bytes < BLOCK:
            raise ValueError(f"cache size limit: {limit_bytes} bytes is less than one block ({BLOCK})")
        self.directory = os.path.abspath(directory)
        self.limit_bytes = limit_bytes
        self._max_entries = min(MAX_ENTRIES, limit_bytes // BLOCK)
        self._lock = threading.Lock()
        self._pending: dict[bytes, int] = {}
        self._last_flush = time.monotonic()
        self._stamp = 0
        self._hits = 0
        self._misses = 0
        self._closed = False
        self._data_fd: int | None = None
        self._owners_fd: int | None = None
        self._owner_fd: int | None = None
        self._shared: _Env | None = None
        self._env_path = os.path.join(self.directory, "index")
        os.makedirs(os.path.join(self.directory, "owners"), mode=0o700, exist_ok=True)
        lock_fd = os.open(os.path.join(self.directory, "open.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            live, dead, previous_boot = self._claim_dead_owners()
            if not live and (previous_boot or os.path.isdir(os.path.join(self.directory, _OLD_DATA))):
                self._wipe()
            try:
                self._shared = _acquire_env(self._env_path)
            except lmdb.Error as error:
                if live:
                    raise FsError(f"cache {self.directory}: its lmdb index cannot be opened ({error}) "
                                  "while other processes use it") from None
                self._wipe()
                self._shared = _acquire_env(self._env_path)
            self._env = self._shared.env
            for sub in (_DATA, "indexes"):
                os.makedirs(os.path.join(self.directory, sub), mode=0o700, exist_ok=True)
            self._data_fd = os.open(os.path.join(self.directory, _DATA), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._register_owner()
            if dead:
                self._recover()
            self._shrink_to_limit()
        except BaseException:
            self._release_handles()
            raise
        finally:
            os.close(lock_fd)

    # ---- reading -----------------------------------------------------------------------------------------------

    def get(self, digest: bytes) -> bytes | None:
        """The whole raw chunk, or None. Counts as a use."""
        value, record = self._lookup(digest)
        if record is None:
            return self._miss(digest, value)
        size = record[0]
        try:
            fd = os.open(_chunk_name(digest), os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._data_fd)
        except FileNotFoundError:
            return self._miss(digest, value)
        try:
            # One byte more than recorded: a short read or a long one both mean the file is not what was put.
            data = os.pread(fd, size + 1, 0)
        finally:
            os.close(fd)
        if len(data) != size:
            return self._miss(digest, value)
        self._used(digest, hit=True)
        return data

    def read(self, digest: bytes, offset: int, length: int) -> bytes | None:
        """`length` bytes of a cached chunk from `offset` (fewer at its end), or None. Counts as a use."""
        if offset < 0 or length < 0:
            raise ValueError(f"read of chunk {digest.hex()}: negative offset {offset} or length {length}")
        value, record = self._lookup(digest)
        if record is None:
            return self._miss(digest, value)
        try:
            fd = os.open(_chunk_name(digest), os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._data_fd)
        except FileNotFoundError:
            return self._miss(digest, value)
        try:
            if os.fstat(fd).st_size != record[0]:
                return self._miss(digest, value)
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        self._used(digest, hit=True)
        return data

    def link(self, digest: bytes, path: str) -> bool:
        """Give a cached chunk's file a second name, `path` (a hard link: no copy); False when it is not cached.
        The file is the cache's own: never write to it. Counts as a use."""
        value, record = self._lookup(digest)
        if record is not None:
            try:
                os.link(_chunk_name(digest), path, src_dir_fd=self._data_fd)
            except FileNotFoundError:
                pass
            else:
                if os.stat(path).st_size == record[0]:
                    self._used(digest, hit=True)
                    return True
                os.unlink(path)
        self._miss(digest, value)
        return False

    def __contains__(self, digest: bytes) -> bool:
        return self._lookup(digest)[1] is not None

    def _lookup(self, digest: bytes) -> tuple[bytes | None, tuple[int, int] | None]:
        _check_digest(digest)
        with self._env.begin(db=self._shared.records) as txn:
            value = txn.get(digest)
        return value, _parse(value)

    def _miss(self, digest: bytes, value: bytes | None) -> None:
        """Count a miss; a record that was there but unusable (damaged, or its file missing or torn) is dropped."""
        with self._lock:
            self._misses += 1
        if value is not None:
            self._drop(digest, value)
        return None

    def _drop(self, digest: bytes, value: bytes) -> None:
        with self._env.begin(write=True) as txn:
            # Another thread or process may have dropped (and even re-put) it meanwhile: only drop what we saw.
            if txn.get(digest, db=self._shared.records) == value:
                self._remove(txn, digest, value)

    def _remove(self, txn: lmdb.Transaction, digest: bytes, value: bytes) -> None:
        shared = self._shared
        txn.delete(digest, db=shared.records)
        record = _parse(value)
        if record is not None:
            txn.delete(_lru_key(record[1], digest), db=shared.lru)
            _add_counter(txn, shared.meta, _BYTES, -_charge(record[0]))
        try:
            os.unlink(_chunk_name(digest), dir_fd=self._data_fd)
        except FileNotFoundError:
            pass

    # ---- last use ----------------------------------------------------------------------------------------------

    def _used(self, digest: bytes, hit: bool) -> None:
        now = time.monotonic()
        with self._lock:
            if hit:
                self._hits += 1
            # Strictly increasing within a process, so uses in one process are ordered even on a coarse clock.
            self._stamp = max(time.time_ns(), self._stamp + 1)
            self._pending[digest] = self._stamp
            due = len(self._pending) >= FLUSH_USES or now - self._last_flush >= FLUSH_SECONDS
        if due:
            self.flush()

    def _take_pending(self) -> dict[bytes, int]:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._last_flush = time.monotonic()
        return pending

    def flush(self) -> None:
        """Write the remembered last uses to the shared index (done by itself every second of use, on put, close)."""
        pending = self._take_pending()
        if pending:
            with self._env.begin(write=True) as txn:
                self._apply_uses(txn, pending)

    def _apply_uses(self, txn: lmdb.Transaction, uses: dict[bytes, int]) -> None:
        shared = self._shared
        for digest, stamp in uses.items():
            record = _parse(txn.get(digest, db=shared.records))
            # A later use may have been written already (another thread's flush, another process).
            if record is None or record[1] >= stamp:
                continue
            txn.delete(_lru_key(record[1], digest), db=shared.lru)
            txn.put(_lru_key(stamp, digest), b"", db=shared.lru)
            txn.put(digest, _RECORD.pack(record[0], stamp), db=shared.records)

    # ---- writing -----------------------------------------------------------------------------------------------

    def put(self, digest: bytes, data: bytes | bytearray | memoryview) -> None:
        """Cache a chunk whose raw bytes the caller has verified against `digest`; evicts the least recently used."""
        _check_digest(digest)
        size = memoryview(data).nbytes
        charged = _charge(size)
        if charged > self.limit_bytes:
            return
        if self._lookup(digest)[1] is not None:
            self._used(digest, hit=False)
            return
        shared = self._shared
        name = _chunk_name(digest)
        fd = _open_tmpfile(self._data_fd)
        linked = False
        try:
            _write_all(fd, data)
            uses = self._take_pending()
            with self._lock:
                self._stamp = max(time.time_ns(), self._stamp + 1)
                stamp = self._stamp
            try:
                with self._env.begin(write=True) as txn:
                    self._apply_uses(txn, uses)
                    if _parse(txn.get(digest, db=shared.records)) is not None:
                        return  # another thread or process put it first
                    self._make_room(txn, charged)
                    self._link_chunk(fd, name)
                    linked = True
                    txn.put(digest, _RECORD.pack(size, stamp), db=shared.records)
                    txn.put(_lru_key(stamp, digest), b"", db=shared.lru)
                    _add_counter(txn, shared.meta, _BYTES, charged)
            except BaseException:
                # Not committed: a name without a record would only waste space until the next recovery.
                if linked:
                    os.unlink(name, dir_fd=self._data_fd)
                raise
        finally:
            os.close(fd)

    def _link_chunk(self, fd: int, name: str) -> None:
        try:
            _link_tmpfile(fd, self._data_fd, name)
        except FileExistsError:
            # A file without a record (left by a killed process): nobody serves it, and the caller holds the
            # write transaction, so nobody links or unlinks it meanwhile.
            os.unlink(name, dir_fd=self._data_fd)
            _link_tmpfile(fd, self._data_fd, name)

    def _make_room(self, txn: lmdb.Transaction, charged: int) -> None:
        """Evict least recently used chunks until `charged` more bytes (and one more entry) fit."""
        shared = self._shared
        total = _counter(txn, shared.meta, _BYTES)
        entries = txn.stat(shared.records)["entries"]
        evicted = 0
        cursor = txn.cursor(db=shared.lru)
        while total + charged > self.limit_bytes or entries + (charged > 0) > self._max_entries:
            if not cursor.first():
                # Only damaged records are left (their sizes are unknown): count what can be counted.
                total = self._recount(txn)
                break
            key = cursor.key()
            cursor.delete()
            digest = key[8:]
            value = txn.get(digest, db=shared.records)
            record = _parse(value)
            if record is None or _lru_key(record[1], digest) != key:
                continue  # a stale LRU entry of a dropped record
            txn.delete(digest, db=shared.records)
            try:
                os.unlink(_chunk_name(digest), dir_fd=self._data_fd)
            except FileNotFoundError:
                pass
            total -= _charge(record[0])
            entries -= 1
            evicted += 1
        txn.put(_BYTES, _COUNTER.pack(max(total, 0)), db=shared.meta)
        if evicted:
            _add_counter(txn, shared.meta, _EVICTIONS, evicted)

    def _recount(self, txn: lmdb.Transaction) -> int:
        return sum(_charge(record[0]) for record in map(_parse, txn.cursor(db=self._shared.records).iternext(
            keys=False, values=True)) if record is not None)

    def _shrink_to_limit(self) -> None:
        """An opener with a smaller limit than the cache holds evicts down to it."""
        shared = self._shared
        with self._env.begin(db=shared.meta) as txn:
            over = _counter(txn, shared.meta, _BYTES) > self.limit_bytes or \
                txn.stat(shared.records)["entries"] > self._max_entries
        if over:
            with self._env.begin(write=True) as txn:
                self._make_room(txn, 0)

    # ---- image indexes -----------------------------------------------------------------------------------------

    def index_path(self, digest: bytes) -> str:
        """Where an image index is kept (uncompressed, for mmap); it exists once `put_index` stored it."""
        _check_digest(digest)
        return os.path.join(self.directory, "indexes", digest.hex())

    def put_index(self, digest: bytes, data: bytes | bytearray | memoryview) -> None:
        """Keep an image index; checked against its digest (it is trusted later on the strength of its name)."""
        actual = digest_of(data)
        if actual != digest:
            raise CorruptChunk(digest, f"index data hashes to {actual.hex()}")
        directory = os.path.dirname(self.index_path(digest))
        name = digest.hex()
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = _open_tmpfile(dir_fd)
            try:
                _write_all(fd, data)
                try:
                    _link_tmpfile(fd, dir_fd, name)
                except FileExistsError:
                    if os.stat(name, dir_fd=dir_fd).st_size == memoryview(data).nbytes:
                        return  # complete (files are only named once whole) and content-addressed
                    os.unlink(name, dir_fd=dir_fd)
                    _link_tmpfile(fd, dir_fd, name)
            finally:
                os.close(fd)
        finally:
            os.close(dir_fd)

    def is_index_validated(self, digest: bytes) -> bool:
        """Whether `mark_index_validated` was called for the index file that is there now (same size)."""
        with self._env.begin(db=self._shared.indexes) as txn:
            value = txn.get(digest)
        if value is None or len(value) != _COUNTER.size:
            return False
        try:
            return os.stat(self.index_path(digest)).st_size == _COUNTER.unpack(value)[0]
        except FileNotFoundError:
            return False

    def mark_index_validated(self, digest: bytes) -> None:
        """Remember, for every mount on this host, that the stored index passed validation."""
        size = os.stat(self.index_path(digest)).st_size
        with self._env.begin(write=True, db=self._shared.indexes) as txn:
            txn.put(digest, _COUNTER.pack(size))

    # ---- state ------------------------------------------------------------------------------------------------

    def stats(self) -> dict:
        shared = self._shared
        with self._env.begin(db=shared.meta) as txn:
            entries = txn.stat(shared.records)["entries"]
            used = _counter(txn, shared.meta, _BYTES)
            evictions = _counter(txn, shared.meta, _EVICTIONS)
        with self._lock:
            hits, misses = self._hits, self._misses
        return {"entries": entries, "bytes": used, "limit_bytes": self.limit_bytes, "hits": hits,
                "misses": misses, "evictions": evictions}

    def close(self) -> None:
        """Write pending last uses and let go of the directory. Not to be called while other threads use it."""
        if self._closed:
            return
        self.flush()
        self._release_handles()

    def __enter__(self) -> ChunkCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _release_handles(self) -> None:
        self._closed = True
        if self._owner_fd is not None:
            # Unlink, then empty it while still locked: a concurrent opener that got hold of it sees a clean exit.
            try:
                os.unlink(self._owner_name, dir_fd=self._owners_fd)
            except FileNotFoundError:
                pass
            os.ftruncate(self._owner_fd, 0)
            os.close(self._owner_fd)
        for fd in (self._owners_fd, self._data_fd):
            if fd is not None:
                os.close(fd)
        if self._shared is not None:
            _release_env(self._env_path, self._shared)
        self._owner_fd = self._owners_fd = self._data_fd = self._shared = None

    # ---- opening: owners, recovery --------------------------------------------------------------------------

    def _register_owner(self) -> None:
        """A file in owners/ that this object holds locked while it is open; the kernel unlocks it at any death."""
        self._owners_fd = os.open(os.path.join(self.directory, "owners"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fd = _open_tmpfile(self._owners_fd)
        try:
            # Locked before it has a name, so no opener can mistake it for a dead owner's.
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, boot_id())
            self._owner_name = f"{os.getpid()}-{os.urandom(6).hex()}"
            _link_tmpfile(fd, self._owners_fd, self._owner_name)
        except BaseException:
            os.close(fd)
            raise
        self._owner_fd = fd

    def _claim_dead_owners(self) -> tuple[bool, bool, bool]:
        """(another live owner, a killed owner, a killed owner from an earlier boot); removes the dead ones."""
        owners = os.path.join(self.directory, "owners")
        boot = boot_id()
        live = dead = previous_boot = False
        for name in os.listdir(owners):
            path = os.path.join(owners, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    live = True
                    continue
                written = os.pread(fd, 64, 0)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                if written:  # empty: it closed cleanly, and we only saw it on its way out
                    dead = True
                    previous_boot |= written != boot
            finally:
                os.close(fd)
        return live, dead, previous_boot

    def _wipe(self) -> None:
        """Start from an empty cache. Only with no live owner: nobody else uses these files through the index."""
        for sub in ("index", _DATA, _OLD_DATA, "indexes"):
            shutil.rmtree(os.path.join(self.directory, sub), ignore_errors=True)

    def _recover(self) -> None:
        """After a killed owner: drop records whose file is missing or of another size, and files without a record.

        Runs in a write transaction, so no other process is between a link and its commit meanwhile.
        """
        shared = self._shared
        with self._env.begin(write=True) as txn:
            total = 0
            bad = []
            for digest, value in txn.cursor(db=shared.records):
                record = _parse(value)
                if record is not None and len(digest) == DIGEST_SIZE and self._file_size(digest) == record[0]:
                    total += _charge(record[0])
                else:
                    bad.append((digest, value))
            for digest, value in bad:
                txn.delete(digest, db=shared.records)
                if len(digest) == DIGEST_SIZE:
                    try:
                        os.unlink(_chunk_name(digest), dir_fd=self._data_fd)
                    except FileNotFoundError:
                        pass
            stale = []
            for key in txn.cursor(db=shared.lru).iternext(keys=True, values=False):
                record = _parse(txn.get(key[8:], db=shared.records))
                if record is None or _lru_key(record[1], key[8:]) != key:
                    stale.append(key)
            for key in stale:
                txn.delete(key, db=shared.lru)
            for entry in os.scandir(os.path.join(self.directory, _DATA)):
                if not _is_recorded(txn, shared.records, entry.name):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
            txn.put(_BYTES, _COUNTER.pack(total), db=shared.meta)

    def _file_size(self, digest: bytes) -> int | None:
        try:
            return os.stat(_chunk_name(digest), dir_fd=self._data_fd).st_size
        except FileNotFoundError:
            return None


def _is_recorded(txn: lmdb.Transaction, records: object, name: str) -> bool:
    try:
        digest = bytes.fromhex(name)
    except ValueError:
        return False
    return len(digest) == DIGEST_SIZE and txn.get(digest, db=records) is not None


def _counter(txn: lmdb.Transaction, db: object, key: bytes) -> int:
    value = txn.get(key, db=db)
    return _COUNTER.unpack(value)[0] if value is not None and len(value) == _COUNTER.size else 0


def _add_counter(txn: lmdb.Transaction, db: object, key: bytes, delta: int) -> None:
    txn.put(key, _COUNTER.pack(max(0, _counter(txn, db, key) + delta)), db=db)


def fetch_index(reference: str, store: ChunkStore) -> bytes | bytearray:
    """An image's index from the store, checked against the reference; not yet validated (raises FsError)."""
    digest = objects.parse_reference(reference)
    try:
        stream = store.stream(digest)
    except ChunkMissing:
        raise BadReference(f"image {reference} is not in the store {store.describe()}") from None
    try:
        # Decompressed while it arrives: an image's index is megabytes, and everything waits for it.
        return objects.decode_stream(digest, stream, MAX_INDEX_SIZE)
    except StoreUnavailable:  # broken midway: once more, whole, with the store's retries
        return objects.decode(digest, store.get(digest), MAX_INDEX_SIZE)
    finally:
        stream.close()


def open_index(reference: str, store: ChunkStore, cache: ChunkCache, *,
               validate: bool = False) -> tuple[Index, mmap.mmap | None, IndexValidation | None]:
    """(index, the mapping of the cache's file it reads, validation): the image's index, from the cache or else
    the store (then kept in the cache), checked against the reference, its header read; not yet validated: use its
    metadata alone until then (raises FsError).

    With `validate`, its validation too, unless the cache remembers it valid. An index fetched now is then read
    from its fetched bytes (no mapping): its validation starts as soon as they are on the host and keeps them in
    the cache meanwhile, so that the caller goes on at once. Wait on it before serving the index.
    """
    digest = objects.parse_reference(reference)
    path = cache.index_path(digest)
    if not os.path.exists(path):
        data = fetch_index(reference, store)
        if validate:
            index = Index(data)
            return index, None, IndexValidation(digest, index, cache, keep=data)
        cache.put_index(digest, data)
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ)
    try:
        index = Index(mapped)
    except BaseException:
        _close_mapping(mapped)
        raise
    validation = None
    if validate and not cache.is_index_validated(digest):
        validation = IndexValidation(digest, index, cache)  # closes what it started if it fails
    return index, mapped, validation


class IndexValidation:
    """`Index.validate` of an image's index on a thread, so that the caller goes on with its fetches meanwhile; an
    index just fetched is put in the cache at the same time, by another thread. `wait` for the answer; `close` waits
    for both without one."""

    def __init__(self, digest: bytes, index: Index, cache: ChunkCache, *,
                 keep: bytes | bytearray | None = None) -> None:
        """`keep`: the index's bytes, fetched and checked against `digest`, to put in the cache."""
        self._digest = digest
        self._cache = cache
        work = [("validate-index", index.validate)]
        if keep is not None:
            work.append(("keep-index", lambda: cache.put_index(digest, keep)))
        self._errors: list[BaseException | None] = [None] * len(work)  # what each raised: `wait` raises it
        self._threads = [threading.Thread(target=self._run, args=(slot, step), name=name)
                         for slot, (name, step) in enumerate(work)]
        for thread in self._threads:
            thread.start()

    def wait(self) -> None:
        """Block until it is validated and kept; raise BadIndex or the cache's error, else remember it valid."""
        self.close()
        for error in self._errors:
            if error is not None:
                raise error
        self._cache.mark_index_validated(self._digest)

    def close(self) -> None:
        """Wait for both threads (a caller that stops before `wait` must not leave them running)."""
        for thread in self._threads:
            thread.join()

    def _run(self, slot: int, step: Callable[[], None]) -> None:
        try:
            step()
        except BaseException as error:
            # Without its frames: they hold views of the index's buffer, and a mapping cannot close while they live.
            self._errors[slot] = error.with_traceback(None)


def validate_index(reference: str, index: Index, cache: ChunkCache) -> None:
    """Validate an image's index in this process unless the cache remembers it valid (raises BadIndex)."""
    digest = objects.parse_reference(reference)
    if not cache.is_index_validated(digest):
        index.validate()
        cache.mark_index_validated(digest)


def load_index(reference: str, store: ChunkStore, cache: ChunkCache) -> tuple[Index, mmap.mmap]:
    """The image's index, from the cache or else the store, validated once per cache (raises FsError)."""
    index, mapped, _ = open_index(reference, store, cache)
    try:
        validate_index(reference, index, cache)
    except BaseException:
        index.release()
        _close_mapping(mapped)
        raise
    return index, mapped


def _close_mapping(mapped: mmap.mmap) -> None:
    try:
        mapped.close()
    except BufferError:
        pass  # a half-built Index still holds views (its traceback): the mapping goes with them
