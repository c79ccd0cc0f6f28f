"""A container's state directory under the runtime root: state.json, exec.fifo, a lock.

state.json is written atomically (temp file + rename); its presence means creation finished. exec.fifo's presence
means "created, not yet started" (runc's convention). The init's start time from /proc guards against a reused pid.
"""

from __future__ import annotations

import fcntl
import os
import time

from . import cjson
from .errors import ContainerNotFound, RuntimeFailure

STATE_FILE = "state.json"
FIFO = "exec.fifo"
_PF_EXITING = 0x4


def validate_id(container_id: str) -> None:
    if (not container_id or container_id in (".", "..")
            or not all(c.isalnum() or c in "_+-." for c in container_id)):
        raise RuntimeFailure(f"invalid container id {container_id!r}: use letters, digits, '_', '+', '-', '.'")


def now_rfc3339() -> str:
    # time, not datetime: one import less on every start
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat from field 3 (state) on, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2:].split()


def processes_named(name: bytes) -> list[tuple[int, list[bytes]]]:
    """(pid, /proc/PID/stat from field 3 on) of every process whose name (comm) is `name`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            end = data.rindex(b")")
            if data[data.index(b"(") + 1:end] == name:
                found.append((int(entry), data[end + 2:].split()))
    return found


def process_start_time(pid: int, *, zombies: bool = False) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None if the process is gone (or a zombie, unless
    `zombies`: a zombie's start time tells whether it is still the process a pid was given to, before reaping it)."""
    fields = _stat_fields(pid)
    if fields is None or (fields[0] in (b"Z", b"X") and not zombies):
        return None
    return int(fields[19])


def process_exiting(pid: int, start_time: int | None) -> bool:
    """True if the process that started at `start_time` is gone or exiting (PF_EXITING), False if it still runs."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in (b"Z", b"X") or int(fields[19]) != start_time:
        return True
    return bool(int(fields[6]) & _PF_EXITING)


class StateDir:
    def __init__(self, root: str, container_id: str) -> None:
        validate_id(container_id)
        self.root = root
        self.id = container_id
        self.path = os.path.join(root, container_id)

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def make(self) -> None:
        """Create the directory; FileExistsError if a container of this id exists."""
        os.makedirs(self.root, mode=0o711, exist_ok=True)
        os.mkdir(self.path, 0o711)

    def load(self) -> dict:
        try:
            with open(os.path.join(self.path, STATE_FILE), "rb") as f:
                return cjson.loads(f.read())
        except FileNotFoundError:
            raise ContainerNotFound(self.id) from None
        except ValueError as e:
            raise RuntimeFailure(f"container {self.id}: corrupt state file: {e}") from None

    def save(self, state: dict) -> None:
        tmp = os.path.join(self.path, f".{STATE_FILE}.tmp")
        with open(tmp, "w") as f:
            f.write(cjson.dumps(state))
        os.rename(tmp, os.path.join(self.path, STATE_FILE))

    @property
    def fifo(self) -> str:
        return os.path.join(self.path, FIFO)

    def locked(self) -> "_DirectoryLock":
        """Serialise operations on one container across processes (a context manager)."""
        return _DirectoryLock(self)

    def remove(self) -> None:
        for name in os.listdir(self.path):
            os.unlink(os.path.join(self.path, name))
        os.rmdir(self.path)


class _DirectoryLock:
    """flock on the state directory for the duration of a `with` block (a class: contextlib costs an import)."""

    __slots__ = ("_dir", "_fd")

    def __init__(self, state_dir: StateDir) -> None:
        self._dir = state_dir
        self._fd = -1

    def __enter__(self) -> None:
        try:
            self._fd = os.open(self._dir.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ContainerNotFound(self._dir.id) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self._fd)
            raise

    def __exit__(self, *exc_info: object) -> None:
        os.close(self._fd)


def list_ids(root: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n, STATE_FILE)))
    except FileNotFoundError:
        return []
