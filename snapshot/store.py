"""Snapshots kept in coldbrew.fs's content-addressed chunk store, and a bounded local cache of them.

A snapshot is CRIU's image directory (see coldbrew.snapshot.image). `save` pushes it into a ChunkStore as an
index (coldbrew.fs's index format, one flat directory) whose chunks are blake3-named, zstd-compressed objects,
each stored once however many snapshots hold it, and writes a small named record beside the objects:

    snapshots/<blake3 of the key>   JSON: the key, the index reference, the validation fields, sizes, and a digest
                                    of all of it (an edited or damaged record is refused)

Chunking follows memory, not file offsets. The pages of a dump (`pages-N.img`) are the contents of the present
runs of memory in address order, so their places in the file shift with everything before them (a bigger heap, one
more library), and one run may hold several allocations (the kernel merges adjacent anonymous mappings). So a piece
of a pages file starts where each run of contiguous memory starts (read from CRIU's `pagemap-*.img`), and within a
run at pages chosen by their content: a page whose fingerprint (two of its 64-bit words, mixed) falls under 1/128
of the range, at least 64 KiB and at most 1 MiB after the last cut. The same tensor or interpreter heap gives the
same chunks in two snapshots whatever precedes it: a shifted region falls back into step at its first such page.
Memory only dedupes where it lies at the same offset within its pages (an mmap'd allocation, a tensor); the same
bytes at another offset on the heap do not. Other files, and a pages file whose pagemap cannot be read, are cut
every MiB.

`load` refuses a snapshot whose recorded validation fields do not match the ones given (SnapshotMismatch names the
field, the recorded value and the one found here) and one whose record, index or chunks are damaged or missing
(SnapshotCorrupt). It then returns a local directory CRIU can restore from:

- Fetched, not mounted lazily: CRIU reads every page of a (non-lazy) restore at once, so a lazy mount would fetch
  all of it anyway, through FUSE (500-900 MB/s here, docs/environment.md) instead of local files. Every chunk is
  decoded and hashed against its name (coldbrew.fs.objects.decode) before it is written.
- Into a bounded local cache (`SnapshotCache`): whole snapshot directories named by their index reference, least
  recently used out first beyond a size limit, never one in use. A warm restore reads the directory in place, with
  no copy. Like coldbrew.fs's chunk cache, entries are trusted once named: only a complete, verified directory is
  ever renamed into place, and the cache is root's alone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import shutil
import stat
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterator

    from ..fs.store import ChunkStore

from . import image, rpc
from .errors import SnapshotError

RECORD_KIND = "snapshots"
RECORD_FORMAT = 1
CHUNK_SIZE = 1 << 20
PAGE_SIZE = 4096
MAX_INDEX_SIZE = 64 << 20  # a snapshot's index lists a few dozen files
MAX_RECORD_SIZE = 1 << 20
DEFAULT_CACHE_DIR = "/var/cache/coldbrew/snapshots"
DEFAULT_CACHE_SIZE = 20 << 30
# What is not pushed: CRIU's logs and statistics (the record of the image lists what the snapshot is)
_NOT_PUSHED = (".log",)
_NOT_PUSHED_NAMES = frozenset({"stats-dump", "stats-restore"})

# CRIU's image files: two magics (the common one, then the file's), then entries of a 32-bit length and a protobuf
_MAGIC_SIZE = 8
_ENTRY_LENGTH = struct.Struct("<I")
PAGEMAP_HEAD = {"pages_id": (1, "int")}
PAGEMAP_ENTRY = {"vaddr": (1, "int"), "compat_nr_pages": (2, "int"), "in_parent": (3, "bool"), "flags": (4, "int"),
                 "nr_pages": (5, "int")}
# PE_LAZY (2) marks pages a lazy restore may serve on demand: they are in the pages file all the same
_PE_PARENT, _PE_PRESENT = 1, 4


class SnapshotNotFound(SnapshotError):
    """The store holds no snapshot under this key."""


class SnapshotMismatch(SnapshotError):
    """The snapshot was made where something that must match on restore was different."""

    def __init__(self, key: str, field: str, recorded: Any, found: Any, detail: str | None = None) -> None:
        self.key, self.field, self.recorded, self.found = key, field, recorded, found
        super().__init__(f"snapshot {key!r} does not fit here: {field} differs: "
                         + (detail or f"it was made with {recorded!r}, here it is {found!r}"))


class SnapshotCorrupt(SnapshotError):
    """The snapshot's record, index or data in the store is damaged or incomplete: it is never restored."""


@dataclass
class StoredSnapshot:
    """A snapshot in a store, as its record describes it (sizes in bytes)."""

    key: str
    reference: str  # the index's hex digest
    fields: dict[str, Any]
    files: int
    dump_bytes: int  # the image files' total size
    chunks: int  # chunk references in the index
    unique_chunks: int  # distinct chunks of this snapshot
    uploaded_chunks: int  # chunks the store did not hold before this save (0 when loaded)
    uploaded_bytes: int  # compressed bytes written by this save, index included (0 when loaded)
    created: str


def record_name(key: str) -> str:
    """The store's name of the record of `key`: any string is a key; the name is its digest."""
    from ..fs.objects import digest_of

    return f"{RECORD_KIND}/{digest_of(key.encode()).hex()}"


# ---- fields ---------------------------------------------------------------------------------------------------

def compare_fields(key: str, recorded: dict[str, Any], here: dict[str, Any]) -> None:
    """Raise SnapshotMismatch for the first field (in the recorded order) that does not allow a restore here.

    Every field must be equal, except `cpu_flags`: a CPU with more features runs the snapshot's code (the program
    chose its code paths on the snapshot's CPU); one that lacks a feature the snapshot's CPU had may not.
    """
    for name in (*recorded, *(n for n in here if n not in recorded)):
        if name not in recorded or name not in here:
            raise SnapshotMismatch(key, name, recorded.get(name, "(not recorded)"), here.get(name, "(unknown here)"))
        expected, found = recorded[name], here[name]
        if name == "cpu_flags" and isinstance(expected, list) and isinstance(found, list):
            missing = sorted(set(expected) - set(found))
            if missing:
                raise SnapshotMismatch(key, name, expected, found,
                                       f"the snapshot's CPU had {', '.join(missing)}, which this CPU lacks")
        elif expected != found:
            raise SnapshotMismatch(key, name, expected, found)


# ---- chunking -------------------------------------------------------------------------------------------------

def _entries(data: bytes, what: str) -> Iterator[bytes]:
    position = _MAGIC_SIZE
    while position < len(data):
        if position + _ENTRY_LENGTH.size > len(data):
            raise ValueError(f"{what}: truncated entry length")
        (length,) = _ENTRY_LENGTH.unpack_from(data, position)
        position += _ENTRY_LENGTH.size
        if position + length > len(data):
            raise ValueError(f"{what}: truncated entry")
        yield data[position:position + length]
        position += length


def page_runs(image_dir: str) -> dict[str, list[int]]:
    """{pages file name: the byte lengths of its runs in file order}, from the dump's pagemap files.

    A run is contiguous memory whose pages are in the pages file (present, not in a parent dump): CRIU splits it
    into several pagemap entries at places that depend on addresses (which ASLR moves), so entries that continue
    one another in memory are one run here. A pagemap that cannot be read is left out: its pages file is then cut
    at fixed offsets.
    """
    runs: dict[str, list[int]] = {}
    for name in sorted(os.listdir(image_dir)):
        if not (name.startswith("pagemap-") and name.endswith(".img")):
            continue
        try:
            with open(os.path.join(image_dir, name), "rb") as f:
                entries = _entries(f.read(), name)
                head = rpc.decode(PAGEMAP_HEAD, next(entries))
                lengths: list[int] = []
                end = None  # where the last run ends in memory
                for raw in entries:
                    entry = rpc.decode(PAGEMAP_ENTRY, raw)
                    flags = entry.get("flags", _PE_PARENT if entry.get("in_parent") else _PE_PRESENT)
                    pages = entry.get("nr_pages", entry.get("compat_nr_pages", 0))
                    if not (flags & _PE_PRESENT and not flags & _PE_PARENT and pages > 0):
                        end = None
                        continue
                    if entry.get("vaddr") == end and lengths:
                        lengths[-1] += pages * PAGE_SIZE  # CRIU splits where it pleases: one run of memory
                    else:
                        lengths.append(pages * PAGE_SIZE)
                    end = entry.get("vaddr", 0) + pages * PAGE_SIZE
        except (OSError, ValueError, StopIteration, rpc.DecodeError):
            continue
        if "pages_id" in head:
            runs.setdefault(f"pages-{head['pages_id']}.img", []).extend(lengths)
    return runs


_MIN_PAGES, _MAX_PAGES = 16, CHUNK_SIZE // PAGE_SIZE  # 64 KiB, 1 MiB
_MIX = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads a page's words over 64 bits
_CUT_BELOW = 1 << 57  # a mixed fingerprint under this (1 in 128 pages) marks a cut
_WORDS_PER_PAGE = PAGE_SIZE // 8


def page_cuts(data: bytes | memoryview) -> list[bool]:
    """For each page of `data` (a multiple of PAGE_SIZE): whether its content marks a place to cut. A zero
    fingerprint (a page of zeros, mostly) never does, so that zero regions give whole, equal chunks."""
    words = memoryview(data).cast("Q")
    firsts = words[::_WORDS_PER_PAGE].tolist()  # each page's first word, and the one in its middle
    middles = words[_WORDS_PER_PAGE // 2::_WORDS_PER_PAGE].tolist()
    return [0 < ((a ^ (b >> 1)) * _MIX) & 0xFFFFFFFFFFFFFFFF < _CUT_BELOW for a, b in zip(firsts, middles)]


def cut(size: int, runs: list[int] | None, cuts: list[bool] | None = None) -> list[tuple[int, int]]:
    """(offset, length) pieces of a file of `size` bytes. With `runs` (byte lengths that add up to `size`, whole
    pages) and `cuts` (per page, from `page_cuts`): a piece starts at every run and, within one, at a marked page at
    least _MIN_PAGES after the last start, and at the latest _MAX_PAGES after it. Otherwise fixed CHUNK_SIZE pieces."""
    if runs is None or cuts is None or sum(runs) != size or len(cuts) * PAGE_SIZE != size \
            or any(run % PAGE_SIZE for run in runs):
        return [(offset, min(CHUNK_SIZE, size - offset)) for offset in range(0, size, CHUNK_SIZE)]
    pieces = []
    page = 0
    for run in runs:
        end = page + run // PAGE_SIZE
        start = page
        for page in range(page + 1, end):
            since = page - start
            if since >= _MAX_PAGES or (since >= _MIN_PAGES and cuts[page]):
                pieces.append((start * PAGE_SIZE, since * PAGE_SIZE))
                start = page
        if end > start:
            pieces.append((start * PAGE_SIZE, (end - start) * PAGE_SIZE))
        page = end
    return pieces


# ---- the local cache ------------------------------------------------------------------------------------------

class SnapshotCache:
    """Snapshot directories under `directory`, named by index reference; at most `limit_bytes` in all.

    `directory/tmp/` holds dumps and fetches in progress (on the same filesystem, so that a finished one is
    renamed into place). An entry in use is held with a shared flock on its directory; eviction skips those.
    """

    def __init__(self, directory: str = DEFAULT_CACHE_DIR, limit_bytes: int = DEFAULT_CACHE_SIZE) -> None:
        if limit_bytes <= 0:
            raise SnapshotError(f"snapshot cache size limit {limit_bytes}: give a positive number of bytes")
        self.directory = os.path.abspath(directory)
        self.limit_bytes = limit_bytes
        self.scratch = os.path.join(self.directory, "tmp")
        os.makedirs(self.scratch, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)

    def new_directory(self, prefix: str) -> str:
        """An empty directory for a dump or a fetch, to be `adopt`ed or removed."""
        return tempfile.mkdtemp(prefix=prefix, dir=self.scratch)

    def path(self, reference: str) -> str:
        return os.path.join(self.directory, reference)

    def open(self, reference: str) -> int | None:
        """A shared hold on the entry (a directory descriptor; close it to let go), or None when absent."""
        try:
            fd = os.open(self.path(reference), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        if not os.path.exists(self.path(reference)):  # evicted between the open and the lock
            os.close(fd)
            return None
        os.utime(self.path(reference))  # its last use, for the LRU order
        return fd

    def adopt(self, directory: str, reference: str) -> None:
        """Make a complete directory from `new_directory` the entry `reference` (if another process made the same
        entry meanwhile, that one stays), then evict beyond the limit."""
        try:
            os.rename(directory, self.path(reference))
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(directory, ignore_errors=True)
        self.evict()

    def entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, reference) of every entry, least recently used first."""
        found = []
        with os.scandir(self.directory) as listing:
            for entry in listing:
                if entry.name == "tmp" or not entry.is_dir(follow_symlinks=False):
                    continue
                try:
                    size = sum(f.stat(follow_symlinks=False).st_size for f in os.scandir(entry.path))
                    found.append((entry.stat(follow_symlinks=False).st_mtime, size, entry.name))
                except FileNotFoundError:
                    continue  # evicted meanwhile
        return sorted(found)

    def evict(self) -> None:
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for _, size, reference in entries:
            if total <= self.limit_bytes:
                return
            try:
                fd = os.open(self.path(reference), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a restore reads it now
                doomed = tempfile.mkdtemp(prefix="evicted-", dir=self.scratch)
                os.rename(self.path(reference), os.path.join(doomed, reference))
            finally:
                os.close(fd)
            shutil.rmtree(doomed, ignore_errors=True)
            total -= size


# ---- saving ---------------------------------------------------------------------------------------------------

def _pushed(name: str) -> bool:
    return not name.endswith(_NOT_PUSHED) and name not in _NOT_PUSHED_NAMES and not name.startswith(".")


def discard_unstored(image_dir: str) -> None:
    """Remove from a saved dump what `save` does not store (logs, statistics): the directory then holds exactly
    what a fetch of the snapshot writes, and can become the cache's entry."""
    for name in os.listdir(image_dir):
        if not _pushed(name):
            os.unlink(os.path.join(image_dir, name))


def save(store: ChunkStore, key: str, image_dir: str, fields: dict[str, Any], *,
         threads: int | None = None) -> StoredSnapshot:
    """Push the snapshot in `image_dir` (a complete dump: its coldbrew record is there) and record it as `key`,
    replacing what the key named before. Returns what was stored; `image_dir` is left as it was."""
    from ..fs import objects
    from ..fs.index import Chunk, IndexBuilder
    from ..fs.pushing import Uploader

    image.Snapshot.open(image_dir, verify=False)  # refuses a directory that is not a finished dump
    runs = page_runs(image_dir)
    names = sorted(n for n in os.listdir(image_dir) if _pushed(n))
    builder = IndexBuilder()
    builder.metadata = {"kind": "coldbrew-snapshot", "chunking": "pagemap runs, then 1 MiB"}
    root = os.stat(image_dir)
    root_ino = builder.add(mode=root.st_mode, mtime_ns=root.st_mtime_ns)
    uploader = Uploader(store, objects.COMPRESSION_LEVEL)
    files: list[tuple[int, str, list[tuple[int, int]]]] = []
    children = []
    dump_bytes = 0
    for name in names:
        st = os.stat(os.path.join(image_dir, name), follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(f"snapshot {image_dir}: {name} is not a regular file (a pre-dump's parent link?): "
                                "only complete dumps are stored")
        ino = builder.add(mode=st.st_mode, size=st.st_size, mtime_ns=st.st_mtime_ns, parent=root_ino)
        children.append((name.encode(), ino))
        cuts = None
        if name in runs and st.st_size and st.st_size % PAGE_SIZE == 0:
            with open(os.path.join(image_dir, name), "rb") as f, \
                    mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
                cuts = page_cuts(mapped)
        files.append((ino, name, cut(st.st_size, runs.get(name), cuts)))
        dump_bytes += st.st_size
    builder.set_children(root_ino, children)

    def push_file(ino: int, name: str, pieces: list[tuple[int, int]]) -> tuple[int, list[Chunk]]:
        chunks = []
        with open(os.path.join(image_dir, name), "rb") as f:
            for offset, length in pieces:
                data = os.pread(f.fileno(), length, offset)
                if len(data) != length:
                    raise SnapshotError(f"snapshot {image_dir}: {name} changed while it was stored")
                chunks.append(Chunk(uploader.chunk(data), offset, length))
        return ino, chunks

    # Big files first, in pieces of work that keep every thread busy (hashing and zstd release the GIL)
    work = sorted(files, key=lambda item: -len(item[2]))
    chunk_count = 0
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 2) as pool:
        for ino, chunks in pool.map(lambda item: push_file(*item), work):
            builder.set_chunks(ino, chunks)
            chunk_count += len(chunks)
    index = builder.build()
    digest, stored = objects.encode(index)
    if not store.has(digest):
        store.put(digest, stored)
        uploader.uploaded_bytes += len(stored)
    result = StoredSnapshot(key=key, reference=digest.hex(), fields=dict(fields), files=len(names),
                            dump_bytes=dump_bytes, chunks=chunk_count, unique_chunks=uploader.unique_chunks,
                            uploaded_chunks=uploader.uploaded_chunks, uploaded_bytes=uploader.uploaded_bytes,
                            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    store.put_named(record_name(key), _encode_record(result))
    return result


_RECORD_KEYS = ("format", "key", "reference", "fields", "files", "dump_bytes", "chunks", "unique_chunks", "created")


def _record_body(snapshot: StoredSnapshot) -> dict[str, Any]:
    return {"format": RECORD_FORMAT, "key": snapshot.key, "reference": snapshot.reference, "fields": snapshot.fields,
            "files": snapshot.files, "dump_bytes": snapshot.dump_bytes, "chunks": snapshot.chunks,
            "unique_chunks": snapshot.unique_chunks, "created": snapshot.created}


def _record_digest(body: dict[str, Any]) -> str:
    from ..fs.objects import digest_of

    return digest_of(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hex()


def _encode_record(snapshot: StoredSnapshot) -> bytes:
    body = _record_body(snapshot)
    return json.dumps({**body, "digest": _record_digest(body)}, indent=1, sort_keys=True).encode() + b"\n"


# ---- loading --------------------------------------------------------------------------------------------------

def read_record(store: ChunkStore, key: str) -> StoredSnapshot:
    """The record of `key`, checked for integrity (not yet against this host: see `compare_fields`)."""
    from ..fs.errors import FsError

    name = record_name(key)
    where = f"snapshot {key!r} in {store.describe()}"
    try:
        data = store.get_named(name)
    except FsError as e:
        raise SnapshotError(f"{where}: the store cannot be read: {e}") from None
    if data is None:
        raise SnapshotNotFound(f"no snapshot {key!r} in {store.describe()}")
    if len(data) > MAX_RECORD_SIZE:
        raise SnapshotCorrupt(f"{where}: its record {name} is {len(data)} bytes, too big to be one")
    try:
        record = json.loads(data)
    except ValueError as e:
        raise SnapshotCorrupt(f"{where}: its record {name} is not JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        raise SnapshotCorrupt(f"{where}: its record {name} has format {found!r}; this coldbrew reads format "
                              f"{RECORD_FORMAT}")
    body = {k: record.get(k) for k in _RECORD_KEYS}
    if record.get("digest") != _record_digest(body) or set(record) != {*_RECORD_KEYS, "digest"}:
        raise SnapshotCorrupt(f"{where}: its record {name} does not match its own digest: it was edited or damaged")
    if body["key"] != key:
        raise SnapshotCorrupt(f"{where}: its record {name} is the record of another key, {body['key']!r}")
    reference = body["reference"]
    if (not isinstance(reference, str) or len(reference) != 64
            or any(c not in "0123456789abcdef" for c in reference) or not isinstance(body["fields"], dict)):
        raise SnapshotCorrupt(f"{where}: its record {name} has a malformed reference or fields")
    return StoredSnapshot(key=key, reference=reference, fields=body["fields"], files=body["files"],
                          dump_bytes=body["dump_bytes"], chunks=body["chunks"], unique_chunks=body["unique_chunks"],
                          uploaded_chunks=0, uploaded_bytes=0, created=body["created"])


class LoadedSnapshot:
    """A validated snapshot in the local cache, held (not evicted) until `close`."""

    def __init__(self, stored: StoredSnapshot, snapshot: image.Snapshot, hold: int, fetched: bool) -> None:
        self.stored = stored
        self.snapshot = snapshot
        self.fetched = fetched  # True: its chunks came from the store now; False: the cache had it
        self._hold: int | None = hold

    @property
    def path(self) -> str:
        return self.snapshot.path

    def close(self) -> None:
        if self._hold is not None:
            os.close(self._hold)
            self._hold = None

    def __enter__(self) -> LoadedSnapshot:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def load(store: ChunkStore, key: str, fields: dict[str, Any], cache: SnapshotCache, *,
         threads: int | None = None) -> LoadedSnapshot:
    """The snapshot of `key` as a local directory, if it was made where `fields` (this host's) allow a restore.

    Raises SnapshotNotFound, SnapshotMismatch (naming the field), SnapshotCorrupt (naming what is damaged), or
    SnapshotError when the store cannot be read.
    """
    stored = read_record(store, key)
    compare_fields(key, stored.fields, fields)
    hold = cache.open(stored.reference)
    fetched = hold is None
    if hold is None:
        directory = cache.new_directory(f"fetch-{stored.reference[:12]}-")
        try:
            _fetch(store, key, stored.reference, directory, threads)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        cache.adopt(directory, stored.reference)
        hold = cache.open(stored.reference)
        if hold is None:
            raise SnapshotError(f"snapshot {key!r}: the local cache {cache.directory} evicted it at once: its "
                                f"limit of {cache.limit_bytes} bytes is smaller than the snapshot")
    try:
        snapshot = image.Snapshot.open(cache.path(stored.reference), verify=False)
    except BaseException:
        os.close(hold)
        raise
    return LoadedSnapshot(stored, snapshot, hold, fetched)


def _fetch(store: ChunkStore, key: str, reference: str, directory: str, threads: int | None) -> None:
    """Write the snapshot's files into `directory`, every chunk verified against its name."""
    from ..fs import objects
    from ..fs.errors import BadIndex, ChunkMissing, CorruptChunk, FsError
    from ..fs.index import Index

    where = f"snapshot {key!r} in {store.describe()}"
    digest = bytes.fromhex(reference)
    try:
        index = Index(objects.decode(digest, store.get(digest), MAX_INDEX_SIZE))
        index.validate()
    except ChunkMissing:
        raise SnapshotCorrupt(f"{where}: its index {reference} is missing from the store") from None
    except (CorruptChunk, BadIndex) as e:
        raise SnapshotCorrupt(f"{where}: its index is damaged: {e}") from None
    except FsError as e:
        raise SnapshotError(f"{where}: the store cannot be read: {e}") from None
    work = []
    opened: list[int] = []

    def fetch(item: tuple[int, str, Any]) -> None:
        fd, name, chunk = item
        try:
            data = objects.decode(chunk.digest, store.get(chunk.digest), chunk.length)
        except ChunkMissing:
            raise SnapshotCorrupt(f"{where}: chunk {chunk.digest.hex()} of {name} is missing from the store") from None
        except CorruptChunk as e:
            raise SnapshotCorrupt(f"{where}: {name}: {e}") from None
        except FsError as e:
            raise SnapshotError(f"{where}: the store cannot be read: {e}") from None
        if len(data) != chunk.length:
            raise SnapshotCorrupt(f"{where}: chunk {chunk.digest.hex()} of {name} holds {len(data)} bytes, its "
                                  f"index says {chunk.length}")
        os.pwrite(fd, data, chunk.offset)

    try:
        for _, raw_name, ino in index.children(1):
            name = os.fsdecode(raw_name)
            attributes = index.attributes(ino)
            if not stat.S_ISREG(attributes.mode):
                raise SnapshotCorrupt(f"{where}: its index lists {name!r}, which is not a regular file")
            fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         stat.S_IMODE(attributes.mode) & 0o644)
            opened.append(fd)
            os.ftruncate(fd, attributes.size)
            work += [(fd, name, chunk) for chunk in index.chunks(ino)]
        # The largest chunks first, so that the pool's last tasks are short
        with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 2) as pool:
            for _ in pool.map(fetch, sorted(work, key=lambda item: -item[2].length)):
                pass
    finally:
        for fd in opened:
            os.close(fd)
        index.release()
