"""The pages of files a snapshot's processes had mapped, read ahead while CRIU restores them.

CRIU dumps a process's private memory, not the file pages it maps (its programs and libraries): a restore maps the
files again, and their pages come back only as the restored program touches them. With a cold page cache each first
touch is a major fault that reads around it (the device's read_ahead_kb: 8 MB on this project's VM), one after the
other, after CRIU has read all of the dump. A restored PyTorch program read 175 MB of its libraries that way in its
first forward pass, for the ~90 MB it had mapped.

So at dump, `record` notes which pages of each mapped file the processes had in their page tables
(/proc/PID/pagemap: present and file-backed) in FILE_PAGES, beside CRIU's images; at restore, `read_ahead` asks the
kernel for exactly those (POSIX_FADV_WILLNEED, which queues the reads and returns) on a thread of its own while CRIU
sets the processes up, so the program's first touches find them cached. Paths are as the processes saw them; they
are found again through the restoring bundle's root and bind mounts, never outside them.

A hint only: a file that is gone or not regular, or a record that cannot be read, is skipped; a restore never fails
for it.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..runtime.spec import Spec

FILE_PAGES = "coldbrew-file-pages.json"
FORMAT = 1
_PAGE = os.sysconf("SC_PAGE_SIZE")
# pagemap's top byte per page: bit 63 present, bit 61 a file page (not an anonymous copy, which CRIU dumps)
_WANTED = bytes(1 if byte & 0xA0 == 0xA0 else 0 for byte in range(256))
_RUN = re.compile(rb"\x01+")
_DELETED = " (deleted)"
_MAX_RANGES = 1 << 16  # per snapshot, more than any real program maps
_PAGEMAP_CHUNK = 1 << 17  # pages per read of /proc/PID/pagemap (1 MiB of entries)


def mapped_file_pages(pids: list[int]) -> dict[str, list[list[int]]]:
    """{path: [[first page, page count], ...]} of the file pages the processes `pids` have mapped, ranges merged
    and in order; processes that are gone meanwhile are left out."""
    found: dict[str, list[tuple[int, int]]] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
                for line in maps:
                    fields = line.rstrip("\n").split(None, 5)
                    if len(fields) < 6 or fields[4] == "0" or not fields[5].startswith("/") \
                            or fields[5].endswith(_DELETED):
                        continue  # anonymous, [heap] and the like, or a file that no longer has a name
                    start, end = (int(address, 16) // _PAGE for address in fields[0].split("-"))
                    first_page = int(fields[2], 16) // _PAGE
                    ranges = found.setdefault(fields[5], [])
                    for chunk in range(start, end, _PAGEMAP_CHUNK):  # a mapping of a huge file: bounded reads
                        entries = os.pread(pagemap.fileno(), min(_PAGEMAP_CHUNK, end - chunk) * 8, chunk * 8)
                        flags = entries[7::8].translate(_WANTED)  # one byte per page: 1 where it is wanted
                        offset = first_page + chunk - start
                        ranges += [(offset + run.start(), run.end() - run.start()) for run in _RUN.finditer(flags)]
        except OSError:  # gone meanwhile: what it mapped ended with it
            continue
    return {path: _merged(ranges) for path, ranges in found.items() if ranges}


def _merged(ranges: list[tuple[int, int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for first, count in sorted(ranges):
        if merged and first <= merged[-1][0] + merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], first + count - merged[-1][0])
        else:
            merged.append([first, count])
    return merged


def record(image_dir: str, pids: list[int]) -> None:
    """Write FILE_PAGES of the processes `pids` into `image_dir`."""
    files, kept = {}, 0
    for path, ranges in mapped_file_pages(pids).items():
        files[path] = ranges[:_MAX_RANGES - kept]  # a restore reads no record with more
        kept += len(files[path])
        if kept == _MAX_RANGES:
            break
    document = {"format": FORMAT, "page_size": _PAGE, "files": files}
    with open(os.path.join(image_dir, FILE_PAGES), "x") as f:
        json.dump(document, f, separators=(",", ":"))


def _parse(data: bytes) -> list[tuple[str, list[tuple[int, int]]]] | None:
    """The record's (path, [(byte offset, byte length), ...]) in order, or None unless it is well-formed and was
    made with this host's page size."""
    try:
        document = json.loads(data)
    except ValueError:
        return None
    if not isinstance(document, dict) or document.get("format") != FORMAT or document.get("page_size") != _PAGE \
            or not isinstance(document.get("files"), dict):
        return None
    parsed = []
    total = 0
    for path, ranges in document["files"].items():
        if not path.startswith("/") or "\0" in path or ".." in path.split("/") or not isinstance(ranges, list):
            return None
        byte_ranges = []
        for entry in ranges:
            if not (isinstance(entry, list) and len(entry) == 2 and all(type(n) is int and n >= 0 for n in entry)
                    and entry[1] > 0):
                return None
            byte_ranges.append((entry[0] * _PAGE, entry[1] * _PAGE))
        total += len(byte_ranges)
        if total > _MAX_RANGES:
            return None
        parsed.append((path, byte_ranges))
    return parsed


def _byte_budget() -> int:
    """What one restore may read ahead: a quarter of the host's memory, so that a hint never pushes it into
    reclaim."""
    return os.sysconf("SC_PHYS_PAGES") * _PAGE // 4


class _Resolver:
    """Opens a path as the restored processes will see it: inside the bundle's root, or the source of the bind mount
    that covers it; a path under any other mount (tmpfs, proc) is not on disk here."""

    def __init__(self, spec: Spec) -> None:
        covering = [(m.destination.rstrip("/") or "/", m.source if m.is_bind else None) for m in spec.mounts]
        # the last mount at a place wins, and the deepest place covers a path
        self._mounts = sorted(reversed(covering), key=lambda mount: -len(mount[0]))
        self._root = spec.root_path
        self._bases: dict[str, int] = {}

    def open(self, path: str) -> int | None:
        """A read-only descriptor of the regular file at `path`, or None."""
        from ..runtime import libc
        from ..runtime.errors import RuntimeFailure
        from ..runtime.rootfs import open_in_root

        base, inner = self._root, path
        for destination, source in self._mounts:
            if path == destination or path.startswith(destination + "/"):
                if source is None:
                    return None
                base, inner = source, path[len(destination):]
                break
        try:
            if base not in self._bases:
                self._bases[base] = os.open(base, libc.O_PATH | os.O_CLOEXEC)
            # O_PATH first: opening a device node for reading can do things; a regular file is opened again
            handle = open_in_root(self._bases[base], inner) if inner.strip("/") else os.dup(
                self._bases[base])  # a file bound on its own
        except (OSError, RuntimeFailure):
            return None
        try:
            if not stat.S_ISREG(os.fstat(handle).st_mode):
                return None
            return os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        finally:
            os.close(handle)

    def close(self) -> None:
        for fd in self._bases.values():
            os.close(fd)


def _read_ahead(image_dir: str, spec: Spec) -> None:
    try:
        with open(os.path.join(image_dir, FILE_PAGES), "rb") as f:
            files = _parse(f.read())
    except OSError:  # none: a snapshot made before coldbrew recorded them
        return
    if not files:
        return
    budget = _byte_budget()
    resolver = _Resolver(spec)
    try:
        for path, byte_ranges in files:
            fd = resolver.open(path)
            if fd is None:
                continue
            try:
                for offset, length in byte_ranges:
                    if budget < length:
                        return
                    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
                    budget -= length
            except OSError:
                pass
            finally:
                os.close(fd)
    finally:
        resolver.close()


def read_ahead(image_dir: str, spec: Spec) -> threading.Thread:
    """Start reading ahead the file pages recorded in `image_dir` for a restore with `spec`; join the thread
    returned once the restore is done (the reads it queued go on in the kernel)."""
    thread = threading.Thread(target=_read_ahead, args=(image_dir, spec), name="coldbrew-read-ahead", daemon=True)
    thread.start()
    return thread
