"""Container cgroups on cgroup v1, v2 and hybrid hosts (the design follows runc's libcontainer/cgroups/fs and fs2).

`open_cgroup` resolves where a container's cgroup lives and creates nothing; `Cgroup.create` makes it and applies
the `linux.resources` limits before any task joins. A hybrid host (v1 controllers plus an empty cgroup2 mount) is
driven through v1 for every controller, as runc does. The v1 and v2 back ends are imported only when used.

Everything here runs on every container start: each value is written with one open/write/close, nothing written
is read back, and no subprocess is run.
"""

from __future__ import annotations

import abc
import errno
import os
import posixpath
import time

from ..errors import RuntimeFailure, SpecError, SyscallError, Unsupported
from .resources import Resources

__all__ = ["Cgroup", "Resources", "V1Cgroup", "V2Cgroup", "from_paths", "layout", "open_cgroup"]

# The v1 controllers in the order runc applies them: cpuset first (tasks cannot join an empty cpuset), freezer
# late. "systemd" is the name=systemd hierarchy, which carries no limits but is joined so that tools in the
# container find their own cgroup there.
V1_SUBSYSTEMS = ("cpuset", "devices", "memory", "cpu", "cpuacct", "pids", "blkio", "hugetlb", "net_cls",
                 "net_prio", "perf_event", "freezer", "rdma", "misc", "systemd")

DEFAULT_PARENT = "/coldbrew"

_mount_table: tuple[dict[str, tuple[str, str]], tuple[str, str] | None] | None = None


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    if "\\" not in field:
        return field
    import re

    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> tuple[dict[str, tuple[str, str]], tuple[str, str] | None]:
    """({v1 subsystem: (mount point, root)}, (cgroup2 mount point, root) or None), read once per process."""
    global _mount_table
    if _mount_table is None:
        v1: dict[str, tuple[str, str]] = {}
        v2: tuple[str, str] | None = None
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-", 6)
                fstype = fields[sep + 1]
                if fstype not in ("cgroup", "cgroup2"):
                    continue
                where = (_unescape(fields[4]), _unescape(fields[3]))
                if fstype == "cgroup2":
                    # On a hybrid host the unified mount sits below /sys/fs/cgroup; a pure v2 host mounts it there.
                    if v2 is None or where[0] == "/sys/fs/cgroup":
                        v2 = where
                    continue
                for opt in fields[sep + 3].split(","):
                    name = "systemd" if opt == "name=systemd" else opt
                    if name in V1_SUBSYSTEMS:
                        v1.setdefault(name, where)
        _mount_table = (v1, v2)
    return _mount_table


def layout() -> str:
    """"v1", "v2" or "hybrid" (v1 controllers next to a cgroup2 mount), from /proc/self/mountinfo."""
    v1, v2 = mounts()
    controllers = set(v1) - {"systemd"}
    if not controllers:
        if v2 is None:
            raise Unsupported("no cgroup file system is mounted on this host")
        return "v2"
    return "hybrid" if v2 is not None else "v1"


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup per v1 subsystem, and under "unified" its v2 cgroup."""
    own: dict[str, str] = {}
    with open("/proc/self/cgroup", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            if hid == "0" and not controllers:
                own["unified"] = path
            for name in controllers.split(","):
                own["systemd" if name == "name=systemd" else name] = path
    return own


def _clean(path: str) -> str:
    """Normalise a cgroupsPath so that a relative one cannot climb out of its parent (runc's CleanPath)."""
    if posixpath.isabs(path):
        return posixpath.normpath(path)
    return posixpath.relpath(posixpath.normpath("/" + path), "/")


def _resolve(inner: str, mount: tuple[str, str], own: dict[str, str] | None, key: str) -> str:
    mountpoint, root = mount
    if posixpath.isabs(inner):
        return posixpath.normpath(mountpoint + inner)
    assert own is not None
    mine = own.get(key, "/")
    # /proc/self/cgroup names cgroups from the hierarchy's root; the mount may show only a subtree of it.
    if root != "/" and (mine == root or mine.startswith(root + "/")):
        mine = mine[len(root):] or "/"
    return posixpath.normpath(posixpath.join(mountpoint + mine, inner))


def open_cgroup(cgroups_path: str | None, container_id: str) -> Cgroup:
    """The container's cgroup (not created yet) from `linux.cgroupsPath` and the container id.

    None or "" -> /coldbrew/<id>; an absolute path is taken from each hierarchy's root; a relative path from this
    process's own cgroup. The systemd driver's "slice:prefix:name" form is refused.
    """
    if not container_id or "/" in container_id or container_id in (".", "..") or "\0" in container_id:
        raise RuntimeFailure(f"invalid container id {container_id!r} for a cgroup name")
    if not cgroups_path:
        inner = f"{DEFAULT_PARENT}/{container_id}"
    elif "\0" in cgroups_path:
        raise SpecError("linux.cgroupsPath", "must not contain a NUL byte")
    elif not cgroups_path.startswith("/") and cgroups_path.count(":") == 2:
        raise Unsupported(f"linux.cgroupsPath {cgroups_path!r} is in the systemd driver's \"slice:prefix:name\" "
                          "form; coldbrew drives cgroup files directly: give a path such as /mygroup/" +
                          container_id)
    else:
        inner = _clean(cgroups_path)
        if inner in ("/", "."):
            raise SpecError("linux.cgroupsPath", f"{cgroups_path!r} names the parent cgroup itself, not a child")
    v1, v2 = mounts()
    own = None if inner.startswith("/") else _own_cgroups()
    if layout() == "v2":
        from .v2 import V2Cgroup

        assert v2 is not None
        return V2Cgroup(_resolve(inner, v2, own, "unified"), root=v2[0])
    from .v1 import V1Cgroup

    if "devices" not in v1:
        # Without the devices controller a container could open any device node it can reach: refuse.
        raise Unsupported("the v1 devices cgroup controller is not mounted; refusing to run without device control")
    return V1Cgroup({name: _resolve(inner, v1[name], own, name) for name in V1_SUBSYSTEMS if name in v1})


def from_paths(paths: dict[str, str]) -> Cgroup:
    """Reopen a cgroup from the `paths` a Cgroup reported (kept in the container's state)."""
    if (not isinstance(paths, dict) or not paths
            or not all(isinstance(k, str) and isinstance(v, str) and v.startswith("/") for k, v in paths.items())):
        raise RuntimeFailure(f"corrupt cgroup paths in the container state: {paths!r}")
    if set(paths) == {"unified"}:
        from .v2 import V2Cgroup

        return V2Cgroup(paths["unified"])
    from .v1 import V1Cgroup

    return V1Cgroup(paths)


def __getattr__(name: str) -> object:
    # V1Cgroup and V2Cgroup are exported without importing both back ends on every start.
    if name == "V1Cgroup":
        from .v1 import V1Cgroup

        return V1Cgroup
    if name == "V2Cgroup":
        from .v2 import V2Cgroup

        return V2Cgroup
    raise AttributeError(name)


class Cgroup(abc.ABC):
    """One container's cgroup, in every hierarchy it lives in."""

    paths: dict[str, str]

    @abc.abstractmethod
    def create(self, resources: Resources | None) -> None:
        """Make the directories and apply `resources` before any task joins; on failure undo and re-raise."""

    @abc.abstractmethod
    def add_process(self, pid: int) -> None:
        """Move the process into the cgroup (every hierarchy of it)."""

    def self_join_files(self) -> tuple[str, ...]:
        """The files into which a single-threaded process writes "0" to move itself into the cgroup without the
        kernel's global migration lock; empty where the kernel offers no such move (add_process is the way)."""
        return ()

    @abc.abstractmethod
    def update(self, resources: Resources) -> None:
        """`runc update`: change the limits that `resources` sets and leave the others as they are."""

    @abc.abstractmethod
    def freeze(self) -> None:
        """Return once the kernel reports the cgroup frozen; RuntimeFailure (and thawed again) if it never does."""

    @abc.abstractmethod
    def thaw(self) -> None:
        """Return once the kernel reports the cgroup thawed."""

    @abc.abstractmethod
    def frozen(self) -> bool:
        """Whether the kernel reports the cgroup frozen (a paused container)."""

    @abc.abstractmethod
    def pids(self) -> list[int]:
        """Every process in the cgroup and its descendants."""

    @abc.abstractmethod
    def stats(self) -> dict:
        """The `data` object of `runc events --stats`, as far as the host provides it."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """Remove the cgroup and any cgroups below it; no error if it is already gone."""

    @abc.abstractmethod
    def can_freeze(self) -> bool:
        """Whether this host can freeze the cgroup (a freezer hierarchy on v1, cgroup.freeze on v2)."""

    def kill_all(self, signal: int) -> None:
        """Signal every process, frozen first so that none can fork a child that escapes (runc's way)."""
        frozen = False
        if self.can_freeze():
            try:
                self.freeze()
                frozen = True
            except RuntimeFailure:
                pass  # still signal what is there: a stuck freeze (or a cgroup already gone) must not stop a kill
        try:
            for pid in self.pids():
                try:
                    os.kill(pid, signal)
                except ProcessLookupError:
                    pass
        finally:
            if frozen:
                self.thaw()


# --- file helpers shared by the back ends ---------------------------------------------------------------------

def oserror(e: OSError, call: str) -> SyscallError:
    """The OSError as a SyscallError naming the call and its file (the CLI prints RuntimeFailures as is)."""
    return SyscallError(e.errno or errno.EIO, call)


def join_self(files: tuple[str, ...]) -> None:
    """Move the calling thread into the cgroup whose `self_join_files()` these are: in a process that has no other
    thread (a child just forked), the whole process."""
    for path in files:
        write_file(path, "0")


def write_file(path: str, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise oserror(e, f"open {path}") from None
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise oserror(e, f"write {value!r} to {path}") from None
    finally:
        os.close(fd)


def write_lines(path: str, values: list[str]) -> None:
    """Several writes through one open file: the kernel takes one rule per write (devices.allow, io.max...)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise oserror(e, f"open {path}") from None
    try:
        for value in values:
            try:
                os.write(fd, value.encode())
            except OSError as e:
                raise oserror(e, f"write {value!r} to {path}") from None
    finally:
        os.close(fd)


def read_file(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise oserror(e, f"open {path}") from None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError as e:
        raise oserror(e, f"read {path}") from None
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def read_optional(path: str) -> str | None:
    """The file's content, or None where the host does not have it."""
    try:
        return read_file(path)
    except SyscallError as e:
        if e.errno in (errno.ENOENT, errno.ENODEV, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise


def read_keyed(path: str) -> dict[str, int]:
    """A flat keyed file ("key value" lines: memory.stat, cpu.stat) as a dict; {} where it is missing."""
    text = read_optional(path)
    result: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            result[key] = int(value)
    return result


def pids_below(path: str) -> list[int]:
    """The pids in cgroup.procs of `path` and every cgroup below it."""
    result: list[int] = []
    text = read_optional(os.path.join(path, "cgroup.procs"))
    if text is None:
        return result
    result.extend(int(p) for p in text.split())
    try:
        with os.scandir(path) as entries:
            subdirs = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return result
    for sub in subdirs:
        result.extend(pids_below(sub))
    return result


def make_dirs(path: str, made: list[str]) -> None:
    """mkdir -p, appending each directory this call made to `made`, parents first (one mkdir when they exist)."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        return
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if parent == path:
            raise
        make_dirs(parent, made)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            return
        except OSError as e:
            raise oserror(e, f"mkdir {path}") from None
    except OSError as e:
        raise oserror(e, f"mkdir {path}") from None
    made.append(path)


def remove_made(made: list[str]) -> None:
    """Undo make_dirs after a failed create: children first; a parent another container now uses stays."""
    for path in reversed(made):
        try:
            remove_tree(path, timeout=0.2)
        except OSError:
            pass  # best effort: the original error is the one to report


def remove_tree(path: str, timeout: float = 2.0) -> None:
    """rmdir a cgroup and the cgroups below it, retrying while EBUSY says exiting tasks are still leaving."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise oserror(e, f"rmdir {path}") from None
            failure = e
        try:
            with os.scandir(path) as entries:
                subdirs = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return
        for sub in subdirs:
            remove_tree(sub, max(deadline - time.monotonic(), 0.0))
        if not subdirs:
            if time.monotonic() >= deadline:
                raise oserror(failure, f"rmdir {path} (processes still in it?)")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
