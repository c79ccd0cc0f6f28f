"""A snapshot on disk: CRIU's image files plus coldbrew's record of them (coldbrew-snapshot.json).

The record says what was dumped (container, spec, external mounts and descriptors, CRIU and kernel versions, whether
GPU memory is inside and from which GPUs and NVIDIA driver) and lists every image file with its size and BLAKE3
digest, so a truncated, altered or missing file is refused before CRIU reads it. CRIU's logs and statistics (which
restore appends to) are not part of the listing. A pre-dump's record has kind "pre-dump"; a dump built on one names
it as its parent (CRIU's `parent` link) and both are checked.
"""

from __future__ import annotations

import json
import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from .errors import SnapshotError

RECORD = "coldbrew-snapshot.json"
FORMAT = 1
DUMP, PRE_DUMP = "dump", "pre-dump"
PARENT_LINK = "parent"  # CRIU's name for the link to the previous images
_UNLISTED_SUFFIXES = (".log",)
_UNLISTED = frozenset({RECORD, PARENT_LINK, "stats-dump", "stats-restore"})
_MAX_PARENTS = 64


def _listed(name: str) -> bool:
    return name not in _UNLISTED and not name.endswith(_UNLISTED_SUFFIXES) and not name.startswith(".")


def digest(dirfd: int, name: str) -> tuple[int, str]:
    """(size, BLAKE3 hex digest) of the file `name` in the directory `dirfd`."""
    import blake3

    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dirfd)
    with open(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if size >= 1 << 24 else 1)
        if size:
            hasher.update_mmap(f"/proc/self/fd/{f.fileno()}")
    return size, hasher.hexdigest()


def write_record(path: str, record: dict, *, files: dict[str, dict] | None = None) -> None:
    """List the image files of `path` into `record` and write it there (atomically: it marks the snapshot done).

    `files`: the listing of a record of `path` just written or verified, when only other fields change: its
    digests are kept rather than recomputed (each file's presence and size are still checked).
    """
    dirfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        names = [name for name in sorted(os.listdir(dirfd))
                 if _listed(name) and stat.S_ISREG(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)]
        if files is None:
            listing = {}
            for name in names:
                size, hexdigest = digest(dirfd, name)
                listing[name] = {"size": size, "blake3": hexdigest}
        else:
            _check_listing(path, dirfd, names, files)
            listing = {name: {"size": files[name]["size"], "blake3": files[name]["blake3"]} for name in names}
        try:
            parent = os.readlink(PARENT_LINK, dir_fd=dirfd)
        except OSError:  # no link: not built on a pre-dump
            parent = None
        record = {**record, "format": FORMAT, "parent": parent, "files": listing}
        tmp = f".{RECORD}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
        with open(fd, "w") as f:
            f.write(json.dumps(record, indent=1))
        os.rename(tmp, RECORD, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    finally:
        os.close(dirfd)


def _check_listing(path: str, dirfd: int, names: list[str], files: dict[str, dict]) -> None:
    """The given listing `files` names exactly the image files `names` of `path`, with their sizes."""
    if sorted(files) != names:
        missing, unlisted = sorted(set(files) - set(names)), sorted(set(names) - set(files))
        raise SnapshotError(f"snapshot {path}: the file listing given does not match its files (missing: "
                            f"{', '.join(missing) or 'none'}; not listed: {', '.join(unlisted) or 'none'})")
    for name in names:
        size = os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_size
        if size != files[name].get("size"):
            raise SnapshotError(f"snapshot {path}: {name} has {size} bytes, the listing given says "
                                f"{files[name].get('size')}")


class Snapshot:
    """A checked snapshot: open it with :meth:`open`."""

    def __init__(self, path: str, record: dict, parent: Snapshot | None) -> None:
        self.path = path
        self.record = record
        self.parent = parent

    def __repr__(self) -> str:
        return f"Snapshot({self.path!r}, kind={self.kind!r}, container={self.container_id!r})"

    @property
    def kind(self) -> str:
        return self.record["kind"]

    @property
    def container_id(self) -> str:
        return self.record["container"]["id"]

    @property
    def bundle(self) -> str:
        return self.record["container"]["bundle"]

    @property
    def config(self) -> dict:
        return self.record["container"]["config"]

    @property
    def criu_version(self) -> str:
        return self.record["criu"]

    @property
    def gpu(self) -> dict:
        """{"inside": whether CUDA state is in the images, "note": what was found; where inside: "processes" (their
        pids in the container's pid namespace), "driver", "cuda_version", "devices" [{uuid, model, minor, bus}]}."""
        return self.record.get("gpu") or {"inside": False, "note": "no GPU state: made before snapshots recorded it"}

    @property
    def size(self) -> int:
        """Bytes of image files, this snapshot's only (not its parent's)."""
        return sum(entry["size"] for entry in self.record["files"].values())

    @classmethod
    def open(cls, path: str, *, verify: bool = True, _depth: int = 0) -> Snapshot:
        """Read the record at `path` and, with `verify`, check every listed file (and the parent's) against it."""
        path = os.path.abspath(path)
        try:
            dirfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SnapshotError(f"snapshot {path} does not exist") from None
        except NotADirectoryError:
            raise SnapshotError(f"snapshot {path} is not a directory") from None
        try:
            record = _read_record(path, dirfd)
            if verify:
                _verify(path, dirfd, record)
            parent = None
            if record.get("parent"):
                if _depth >= _MAX_PARENTS:
                    raise SnapshotError(f"snapshot {path}: more than {_MAX_PARENTS} parents (a loop?)")
                link = os.path.join(path, PARENT_LINK)
                try:
                    target = os.readlink(link)
                except OSError:
                    raise SnapshotError(f"snapshot {path}: its parent link is missing "
                                        f"(it was made on {record['parent']})") from None
                if target != record["parent"]:
                    raise SnapshotError(f"snapshot {path}: its parent link points to {target}, "
                                        f"not to {record['parent']} as recorded")
                parent = cls.open(os.path.join(path, target), verify=verify, _depth=_depth + 1)
        finally:
            os.close(dirfd)
        return cls(path, record, parent)


def _read_record(path: str, dirfd: int) -> dict:
    try:
        fd = os.open(RECORD, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dirfd)
    except FileNotFoundError:
        raise SnapshotError(f"{path} is not a coldbrew snapshot (no {RECORD}: not made by coldbrew, or its "
                            "checkpoint did not finish)") from None
    with open(fd, "rb") as f:
        try:
            record: Any = json.load(f)
        except ValueError as e:
            raise SnapshotError(f"snapshot {path}: {RECORD} is corrupt: {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        raise SnapshotError(f"snapshot {path}: {RECORD} has format {found!r}; this coldbrew reads format {FORMAT}")
    files = record.get("files")
    if (not isinstance(files, dict) or record.get("kind") not in (DUMP, PRE_DUMP)
            or not isinstance(record.get("container"), dict)
            or not all(isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("blake3"), str)
                       and _listed(k) and "/" not in k for k, v in files.items())):
        raise SnapshotError(f"snapshot {path}: {RECORD} is corrupt (its kind, container or file list is malformed)")
    if "gpu" in record and not _gpu_well_formed(record["gpu"]):
        raise SnapshotError(f"snapshot {path}: {RECORD} is corrupt (its gpu entry is malformed)")
    return record


def _gpu_well_formed(gpu: Any) -> bool:
    if not isinstance(gpu, dict) or not isinstance(gpu.get("inside"), bool):
        return False
    if not gpu["inside"]:
        return True
    processes, devices = gpu.get("processes"), gpu.get("devices")
    return (isinstance(processes, list) and bool(processes) and all(type(p) is int and p > 0 for p in processes)
            and isinstance(devices, list)
            and all(isinstance(d, dict) and isinstance(d.get("uuid"), str) and isinstance(d.get("model"), str)
                    and type(d.get("minor")) is int for d in devices)
            and (gpu.get("driver") is None or isinstance(gpu["driver"], str))
            and (gpu.get("cuda_version") is None or type(gpu["cuda_version"]) is int))


def _verify(path: str, dirfd: int, record: dict) -> None:
    for name, expected in record["files"].items():
        try:
            size, hexdigest = digest(dirfd, name)
        except FileNotFoundError:
            raise SnapshotError(f"snapshot {path} is corrupt: {name} is missing") from None
        except OSError as e:
            raise SnapshotError(f"snapshot {path} is corrupt: {name}: {e.strerror}") from None
        if size != expected["size"]:
            raise SnapshotError(f"snapshot {path} is corrupt: {name} has {size} bytes, {expected['size']} were "
                                "written")
        if hexdigest != expected["blake3"]:
            raise SnapshotError(f"snapshot {path} is corrupt: {name} does not have the content that was written "
                                "(BLAKE3 digest differs)")
