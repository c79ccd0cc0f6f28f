"""The warm point: run a container until its program says it is warmed up, snapshot it there, and start the next
runs from that snapshot (`coldbrew run --snapshot KEY`, or `run` here).

The program's side of the protocol is coldbrew/snapshot/warmpoint.py (a helper to copy into an image, and the
language-neutral description). The runtime's side:

Cold run (`start`, then `WarmContainer.snapshot`):
  1. Two pipes: READY, whose write end the program gets as descriptor 3, and REPLY, whose read end it gets as
     descriptor 4; COLDBREW_WARM_FD=3 and COLDBREW_WARM_REPLY_FD=4 in its environment say so. (They are added to a
     copy of the bundle's config.json, written for the run; the bundle itself is not touched.)
  2. The program writes "ready\\n" to READY and reads a line from REPLY. On "ready" the runtime pauses (freezes) the
     container, relays what its stdout and stderr pipes still hold, takes its unread stdin aside, and writes
     "restored\\n" into REPLY. CRIU dumps the frozen container, leaving it running: the program is blocked reading
     REPLY, and the line waiting there is dumped with the pipe. The runtime takes that line back out, writes
     "snapshotted\\n" instead, puts the stdin back and resumes the container: the program carries on at once while
     the dump is pushed into the store (coldbrew.snapshot.store), and the run ends when both are done.
Restored run (`restore`): CRIU brings the program back where it waited, with "restored\\n" waiting in its REPLY
pipe; it reads that and carries on. Nothing is written to it after the restore, so any restore of the snapshot
(`coldbrew restore` too) wakes the program with "restored".

Why two pipes and not one socket: CRIU dumps a unix socket only from the container's own network namespace, and the
runtime's end of a socketpair belongs to the host's (CRIU: "Unix socket N not found"). Pipes belong to no namespace,
and CRIU dumps (and restores) the bytes buffered in them.

Why the container's stdio are relayed pipes, whatever the caller's are: CRIU puts a descriptor that led outside the
container back only onto one of the same kind, and a regular file only onto one of the same size ("bad size"),
while a run's stdout is a terminal, a file or a pipe at the caller's whim. The relay also empties those pipes
before the dump, so output written before the warm point is never replayed by a restored copy.

What must match for a restore (`host_fields`; compared by coldbrew.snapshot.store.compare_fields):
  image     the root filesystem. A root that is a coldbrew.fs mount, or the overlay `coldbrew fs rootfs` makes over
            one: "coldbrew.fs:<image reference>", its content by construction. Any other directory:
            "path:<real path> on <fs type> <mount source> (<major:minor>), inode <n>": its place, not its content
            (hashing a 1 GB tree at every start would cost more than the restore saves); a tree changed in place
            needs a new key, or a coldbrew.fs image.
  spec      blake3 of config.json as canonical JSON, without what may differ per run and does not shape the
            restored process: root.path (the image field stands for it), the sources of bind mounts (the restore
            binds this run's source at the same place, as engines give per-container files such as /etc/hosts),
            annotations (engines' per-run labels), hooks (the runtime runs them, around the process),
            linux.cgroupsPath (it names the container) and process.consoleSize.
  criu, kernel, arch     CRIU's version, the kernel release, the machine.
  cpu_flags the flags of /proc/cpuinfo: restored where the CPU has every one of them (code chosen for them at
            start-up is then safe to run; more flags are fine).
  gpu       "none", or the NVIDIA models and driver version (/proc/driver/nvidia).

A snapshot that is missing starts the run cold and makes it. One that does not fit (SnapshotMismatch), is damaged
(SnapshotCorrupt: also a loud warning, the store deserves a look) or fails to restore is refused with the reason,
and the run starts cold and replaces it at the warm point: what a user wants from a cache.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import select
import shutil
import stat
import tempfile
import termios
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

    from ..fs.mounts import MountInfo
    from ..fs.store import ChunkStore
    from ..runtime.container import Container, Runtime

from ..runtime.errors import RuntimeFailure
from . import criu as criu_mod
from .errors import CriuError, SnapshotError
from .store import LoadedSnapshot, SnapshotCache, SnapshotCorrupt, SnapshotNotFound, StoredSnapshot, discard_unstored, \
    load, save

WARM_FD, REPLY_FD = 3, 4
WARM_ENV, REPLY_ENV = "COLDBREW_WARM_FD", "COLDBREW_WARM_REPLY_FD"
READY, RESTORED, SNAPSHOTTED, FAILED = b"ready\n", b"restored\n", b"snapshotted\n", b"failed\n"
CACHE_ENV, CACHE_SIZE_ENV = "COLDBREW_SNAPSHOT_CACHE", "COLDBREW_SNAPSHOT_CACHE_SIZE"
_READY_MAX = 64  # a "ready" line longer than this is not the protocol
_DRAIN_AFTER_EXIT = 1.0  # seconds to collect output after the init exits (other processes may still hold stdout)
_BLOCK = 65536

# Not part of a snapshot's identity: differs per run or container, and does not shape the restored process
_PER_RUN_TOP = ("annotations", "hooks")
_PER_RUN_NESTED = (("root", "path"), ("linux", "cgroupsPath"), ("process", "consoleSize"))


# ---- what must match -------------------------------------------------------------------------------------------

def spec_digest(raw: dict) -> str:
    """blake3 of the spec as canonical JSON, without what may differ per run (see the module's docstring)."""
    from ..fs.objects import digest_of

    spec = json.loads(json.dumps(raw))  # a deep copy
    for name in _PER_RUN_TOP:
        spec.pop(name, None)
    for section, name in _PER_RUN_NESTED:
        if isinstance(spec.get(section), dict):
            spec[section].pop(name, None)
    for mount in spec.get("mounts") or ():
        if isinstance(mount, dict) and ("bind" in (mount.get("options") or ()) or "rbind" in (mount.get("options")
                                                                                              or ())
                                        or mount.get("type") == "bind"):
            mount.pop("source", None)
    return digest_of(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hex()


def _mount_of(path: str, table: list[MountInfo]) -> MountInfo:
    """The topmost mount that `path` (a real path) lies in."""
    best = None
    for entry in table:
        if path == entry.point or path.startswith(entry.point.rstrip("/") + "/"):
            if best is None or len(entry.point) >= len(best.point):
                best = entry
    assert best is not None  # "/" is always mounted
    return best


def _coldbrew_reference(mountpoint: str) -> str | None:
    from ..fs.errors import FsError

    try:
        from ..fs.daemon import mount_stats

        return mount_stats(mountpoint).get("reference")
    except (FsError, OSError, ValueError):
        return None  # its daemon is gone: the root is then identified by its place


def image_identity(root_path: str) -> str:
    """The `image` field of a root filesystem (see the module's docstring)."""
    root = os.path.realpath(root_path)
    from ..fs.mounts import mount_table, unescape

    table = mount_table()
    mount = _mount_of(root, table)
    if mount.point == root:
        candidate = None
        layers: list[str] = []
        if mount.fstype == "fuse.coldbrew":
            candidate = root
        elif mount.fstype == "overlay":
            lowers = [o.partition("=")[2] for o in mount.options.split(",") if o.startswith("lowerdir=")]
            # `coldbrew fs rootfs`: the image alone, or META::[HOT::]IMAGE (see coldbrew.fs.rootfs)
            if len(lowers) == 1:
                layers = [unescape(layer) for layer in lowers[0].split("::")]
            if 1 <= len(layers) <= 3 and not any(":" in layer for layer in layers):
                below = _mount_of(layers[-1], table)
                if below.point == layers[-1] and below.fstype == "fuse.coldbrew":
                    candidate = layers[-1]
        reference = _coldbrew_reference(candidate) if candidate else None
        if reference and _derived_layers(layers[:-1], reference, table):
            return f"coldbrew.fs:{reference}"
    return (f"path:{root} on {mount.fstype} {mount.source} ({mount.device}), "
            f"inode {os.stat(root).st_ino}")


def _derived_layers(layers: list[str], reference: str, table: list[MountInfo]) -> bool:
    """Whether the layers above a root's image are the ones made from that image (its EROFS image, hot layer)."""
    if not layers:
        return True
    meta = _mount_of(layers[0], table)
    if meta.point != layers[0] or meta.fstype != "erofs" or os.path.basename(meta.source) != reference:
        return False
    return all(os.path.basename(hot).startswith(f"{reference}-") for hot in layers[1:])


def cpu_flags() -> list[str]:
    """The first processor's flags in /proc/cpuinfo, sorted (x86 "flags", arm64 "Features")."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name.strip() in ("flags", "Features"):
                return sorted(set(value.split()))
    return []


def gpu_identity(proc: str = "/proc/driver/nvidia") -> str:
    """"none", or "<models>; driver <version>" from the NVIDIA driver's /proc files."""
    try:
        with open(os.path.join(proc, "version")) as f:
            version_line = f.readline()
    except OSError:
        return "none"
    words = version_line.split()
    driver = next((w for w in words if w[:1].isdigit() and "." in w), version_line.strip())
    models = []
    gpus = os.path.join(proc, "gpus")
    for name in sorted(os.listdir(gpus)) if os.path.isdir(gpus) else ():
        try:
            with open(os.path.join(gpus, name, "information")) as f:
                models += [line.partition(":")[2].strip() for line in f if line.startswith("Model:")]
        except OSError:
            continue
    return f"{', '.join(models) or 'no GPU listed'}; driver {driver}"


def host_fields(bundle: str, criu: criu_mod.Criu) -> dict[str, Any]:
    """What a snapshot of the container of `bundle` records, and what a restore here must match."""
    from ..runtime.spec import load_bundle

    spec = load_bundle(os.path.abspath(bundle))
    return {"image": image_identity(spec.root_path), "spec": spec_digest(spec.raw), "criu": criu.version_string,
            "kernel": platform.release(), "arch": platform.machine(), "cpu_flags": cpu_flags(),
            "gpu": gpu_identity()}


# ---- descriptors --------------------------------------------------------------------------------------------

def _pending(fd: int) -> int:
    """Bytes waiting in the pipe `fd` reads from."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), "little")


def _write_all(fd: int, data: bytes) -> bool:
    """Write all of `data` (waiting where `fd` is non-blocking); False when `fd` no longer takes any."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])
        except OSError:  # closed, or nobody reads it any more: the rest of this output has nowhere to go
            return False
    return True


class _Relay:
    """The container's stdin, stdout and stderr as pipes, copied from and to the caller's descriptors."""

    def __init__(self, stdio: tuple[int, int, int] | None) -> None:
        self.source, self.stdout, self.stderr = stdio if stdio is not None else (0, 1, 2)
        made: list[int] = []
        try:
            in_read, self.in_write = os.pipe2(os.O_CLOEXEC)
            made += [in_read, self.in_write]
            # Our own handle on the program's stdin: to take unread input aside around a dump (FIONREAD + read:
            # never O_NONBLOCK, which the program's end would share)
            self.in_keep = fcntl.fcntl(in_read, fcntl.F_DUPFD_CLOEXEC, 10)
            made.append(self.in_keep)
            self.out_read, out_write = os.pipe2(os.O_CLOEXEC)
            made += [self.out_read, out_write]
            self.err_read, err_write = os.pipe2(os.O_CLOEXEC)
            made += [self.err_read, err_write]
        except BaseException:
            for fd in made:
                os.close(fd)
            raise
        for fd in (self.in_write, self.out_read, self.err_read):
            os.set_blocking(fd, False)
        self.child: tuple[int, int, int] | None = (in_read, out_write, err_write)
        # CRIU's names of the three pipes, as a dump lists the descriptors that lead to them
        self.keys = tuple(f"pipe:[{os.fstat(fd).st_ino}]" for fd in (self.in_keep, self.out_read, self.err_read))
        self.outputs = {self.out_read: self.stdout, self.err_read: self.stderr}  # open ones
        self.input: bytes = b""  # read from the caller, not yet taken by the pipe
        try:
            os.fstat(self.source)
            self.source_open = True
        except OSError:
            self.source_open = False
            self._close_input()

    def close_child(self) -> None:
        """Close the container's ends here (it has its own copies)."""
        if self.child is not None:
            for fd in self.child:
                os.close(fd)
            self.child = None

    def _close_input(self) -> None:
        if self.in_write >= 0:
            os.close(self.in_write)
            self.in_write = -1

    def _forward(self, fd: int) -> bool:
        """Relay what `fd` holds; False at its end."""
        try:
            data = os.read(fd, _BLOCK)
        except BlockingIOError:
            return True
        if not data:
            os.close(fd)
            del self.outputs[fd]
            return False
        _write_all(self.outputs[fd], data)
        return True

    def pump(self, watch: list[int], timeout: float | None) -> set[int]:
        """One round of relaying (waiting up to `timeout`); returns those of `watch` that are readable."""
        reads = [*self.outputs, *watch]
        if self.source_open and not self.input:
            reads.append(self.source)
        writes = [self.in_write] if self.input and self.in_write >= 0 else []
        readable, writable, _ = select.select(reads, writes, [], timeout)
        for fd in readable:
            if fd in self.outputs:
                self._forward(fd)
        if self.source in readable and self.source_open:
            try:
                data = os.read(self.source, _BLOCK)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                self.source_open = False
            elif data:
                self.input += data
        if writable:
            try:
                self.input = self.input[os.write(self.in_write, self.input):]
            except BlockingIOError:
                pass
            except BrokenPipeError:  # the program closed its stdin: what it did not read is dropped
                self.input = b""
                self.source_open = False
        if not self.source_open and not self.input:
            self._close_input()
        return {fd for fd in readable if fd in watch}

    def drain_output(self) -> None:
        """Relay everything the stdout and stderr pipes hold now (the container is frozen: nothing more comes)."""
        for fd in list(self.outputs):
            while fd in self.outputs and _pending(fd) and self._forward(fd):
                pass

    def take_input(self) -> bytes:
        """The program's unread stdin, taken out of its pipe (while it is frozen); `give_back` returns it."""
        waiting = _pending(self.in_keep)
        return os.read(self.in_keep, waiting) if waiting else b""

    def give_back(self, data: bytes) -> None:
        """Put `take_input`'s bytes back into the (frozen) program's stdin pipe, where they fit: they came from it.

        The pipe's write end may be closed already (the caller's stdin ended): a new one is opened through /proc.
        """
        if not data:
            return
        fd = self.in_write if self.in_write >= 0 else os.open(f"/proc/self/fd/{self.in_keep}",
                                                              os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if os.write(fd, data) != len(data):
                raise SnapshotError("the container's unread stdin could not be put back after its snapshot")
        finally:
            if fd != self.in_write:
                os.close(fd)

    def close(self) -> None:
        self.close_child()
        self._close_input()
        for fd in (*self.outputs, self.in_keep):
            os.close(fd)
        self.outputs = {}
        self.in_keep = -1


class _WarmPipes:
    """READY (the program writes its line) and REPLY (the runtime answers), see the module's docstring."""

    def __init__(self) -> None:
        self.ready_read, ready_write = os.pipe2(os.O_CLOEXEC)
        try:
            reply_read, self.reply_write = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            os.close(self.ready_read)
            os.close(ready_write)
            raise
        # Our copy of the program's REPLY end: to take the dumped line back out (the program is frozen then)
        self.reply_keep = fcntl.fcntl(reply_read, fcntl.F_DUPFD_CLOEXEC, 10)
        os.set_blocking(self.ready_read, False)
        self.child: tuple[int, int] | None = (ready_write, reply_read)
        self.line = b""

    def close_child(self) -> None:
        if self.child is not None:
            for fd in self.child:
                os.close(fd)
            self.child = None

    def read_ready(self) -> bool | None:
        """Take what READY holds: True once the line is complete, False at its end without one, None for more."""
        try:
            data = os.read(self.ready_read, _READY_MAX)
        except BlockingIOError:
            return None
        if not data:
            return False
        self.line += data
        if b"\n" in self.line:
            if self.line != READY:
                raise SnapshotError(f"the program wrote {self.line[:_READY_MAX]!r} to its warm-point descriptor "
                                    f"{WARM_FD}, not {READY!r}")
            return True
        return False if len(self.line) >= _READY_MAX else None

    def close(self) -> None:
        self.close_child()
        for fd in (self.ready_read, self.reply_write, self.reply_keep):
            if fd >= 0:
                os.close(fd)
        self.ready_read = self.reply_write = self.reply_keep = -1


class _RunBundle:
    """The bundle as this run gives it to the runtime: config.json with the warm-point variables added and the
    root made absolute, in a directory of its own (removed with the run)."""

    def __init__(self, bundle: str, container_id: str) -> None:
        bundle = os.path.abspath(bundle)
        config = os.path.join(bundle, "config.json")
        try:
            with open(config, "rb") as f:
                raw = json.load(f)
        except OSError as e:
            raise SnapshotError(f"cannot read {config}: {e.strerror}") from None
        except ValueError as e:
            raise SnapshotError(f"{config} is not valid JSON: {e}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("process"), dict) \
                or not isinstance(raw.get("root"), dict) or not isinstance(raw["root"].get("path"), str):
            raise SnapshotError(f"{config}: root.path and process are required")
        raw["root"]["path"] = os.path.normpath(os.path.join(bundle, raw["root"]["path"]))
        theirs = [e for e in raw["process"].get("env") or [] if isinstance(e, str)
                  and e.partition("=")[0] not in (WARM_ENV, REPLY_ENV)]
        raw["process"]["env"] = theirs + [f"{WARM_ENV}={WARM_FD}", f"{REPLY_ENV}={REPLY_FD}"]
        parent = "/run" if os.access("/run", os.W_OK) else None
        self.path = tempfile.mkdtemp(prefix=f"coldbrew-warm-{container_id[:40]}-", dir=parent)
        with open(os.path.join(self.path, "config.json"), "w") as f:
            json.dump(raw, f)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# ---- containers at a warm point --------------------------------------------------------------------------------

class WarmContainer:
    """A container run with a warm point (`start`) or restored from one (`restore`), its stdio relayed.

    Call `wait` (or `wait_warm`, then `snapshot`, then `wait`) to relay its stdio while it runs, and `close` at the
    end: it deletes the container and removes what the run made.
    """

    def __init__(self, container: Container, relay: _Relay, warm: _WarmPipes | None, bundle: _RunBundle) -> None:
        self.container = container
        self._relay = relay
        self._warm = warm
        self._bundle = bundle
        self._exited = False
        self._pidfd = os.pidfd_open(container.pid)
        self.dump_seconds: float | None = None  # how long the program was frozen for its snapshot (pause to resume)
        self.save_seconds: float | None = None  # how long storing the snapshot took (while the program ran)

    @property
    def pid(self) -> int:
        return self.container.pid

    def _pump(self, watch: list[int], timeout: float | None) -> set[int]:
        ready = self._relay.pump([self._pidfd, *watch], timeout)
        if self._pidfd in ready:
            self._exited = True
        return ready - {self._pidfd}

    def wait_warm(self, timeout: float | None = None) -> bool:
        """Relay until the program reaches its warm point (True), exits or closes its warm-point descriptor
        without reaching it (False); TimeoutError after `timeout` seconds."""
        if self._warm is None or self._warm.ready_read < 0:
            raise SnapshotError("this container has no warm point to wait for (it was restored, or is past it)")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._exited:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"container {self.container.id} did not reach its warm point in {timeout} s")
            if self._pump([self._warm.ready_read], left):
                done = self._warm.read_ready()
                if done is not None:
                    return done
        return False

    def snapshot(self, store: ChunkStore, key: str, fields: dict[str, Any], cache: SnapshotCache, *,
                 criu: criu_mod.Criu | None = None) -> Future[StoredSnapshot]:
        """Snapshot the container at its warm point (after `wait_warm` returned True) and let the program carry on.

        Returns once the program runs again; the future is done when the snapshot is in `store` under `key` (and
        in `cache`). The program's answer is "snapshotted", or "failed" when the dump failed (the CriuError is
        raised then, after the program was answered and resumed).
        """
        from .checkpoint import snapshot as dump

        warm = self._warm
        if warm is None or warm.line != READY:
            raise SnapshotError("the program has not reached its warm point")
        tool = criu or criu_mod.find()
        started = time.monotonic()
        self.container.pause()
        image_dir = None
        try:
            image_dir = cache.new_directory(f"dump-{self.container.id[:40]}-")
            self._relay.drain_output()
            unread = self._relay.take_input()
            _write_all(warm.reply_write, RESTORED)
            answer = FAILED
            try:
                dump(self.container, image_dir, leave_running=True, criu=tool)
                answer = SNAPSHOTTED
            finally:
                waiting = os.read(warm.reply_keep, _pending(warm.reply_keep)) if _pending(warm.reply_keep) else b""
                if waiting != RESTORED:  # the program was frozen: nothing but us could have read it
                    raise SnapshotError(f"the warm-point reply pipe held {waiting!r} after the dump, not "
                                        f"{RESTORED!r}: the snapshot is not used")
                _write_all(warm.reply_write, answer)
                self._relay.give_back(unread)
        except BaseException:
            if image_dir is not None:
                shutil.rmtree(image_dir, ignore_errors=True)
            raise
        finally:
            warm.close()
            if self.container.status == "paused":
                self.container.resume()
            self.dump_seconds = time.monotonic() - started
        result: Future[StoredSnapshot] = Future()
        threading.Thread(target=self._save, args=(result, store, key, image_dir, fields, cache),
                         name=f"coldbrew-snapshot-save-{key[:20]}", daemon=True).start()
        return result

    def _save(self, result: Future, store: ChunkStore, key: str, image_dir: str, fields: dict[str, Any],
              cache: SnapshotCache) -> None:
        """Runs on its own thread while the program carries on."""
        try:
            started = time.monotonic()
            _stdio_by_identity(image_dir, self._relay.keys)
            stored = save(store, key, image_dir, fields)
            self.save_seconds = time.monotonic() - started
            discard_unstored(image_dir)
            cache.adopt(image_dir, stored.reference)
            result.set_result(stored)
        except BaseException as e:  # handed to whoever waits on the future
            shutil.rmtree(image_dir, ignore_errors=True)
            result.set_exception(e)

    def wait(self) -> int:
        """Relay until the program exits; its exit status (128 + N for a signal N)."""
        if self._warm is not None and self._warm.ready_read >= 0:
            self._warm.close()  # a warm point reached now is not waited for: the program reads the pipe's end
        while not self._exited:
            self._pump([], None)
        deadline = time.monotonic() + _DRAIN_AFTER_EXIT
        while self._relay.outputs and time.monotonic() < deadline:
            self._relay.pump([], max(0.0, deadline - time.monotonic()))
        code = self.container.wait(keep=False)
        return 0 if code is None else code

    def close(self) -> None:
        """Delete the container (killing what still runs) and remove the run's pipes and files."""
        try:
            self.container.delete(force=True)
        finally:
            os.close(self._pidfd)
            self._relay.close()
            if self._warm is not None:
                self._warm.close()
            self._bundle.remove()


def _stdio_by_identity(image_dir: str, keys: tuple[str, str, str]) -> None:
    """Make the snapshot's record name the relay's pipes as the container's stdin, stdout and stderr.

    The record lists the init's descriptors by number as they were at the dump, and a restore gives descriptors
    0-2 the new run's stdio by those entries. But a program may hold its stdio elsewhere at that moment: a shell
    running `read answer <&4` has moved its stdin to descriptor 10 and has the REPLY pipe at 0, and the REPLY pipe
    (with its "restored" line) would then be replaced by the new run's stdin. The relay's pipes are the stdio
    whatever numbers they have; one the program no longer holds is left out (nothing to give).
    """
    from . import image

    record = dict(image.Snapshot.open(image_dir, verify=False).record)
    descriptors = {n: entry for n, entry in record["descriptors"].items() if int(n) > 2}
    held = {entry["key"] for entry in record["descriptors"].values()}
    for number, key in enumerate(keys):
        if key in held:
            descriptors[str(number)] = {"key": key, "type": stat.S_IFIFO}
    record["descriptors"] = descriptors
    image.write_record(image_dir, record, files=record["files"])  # only the descriptors change: no re-hashing


def start(runtime: Runtime, container_id: str, bundle: str, *, stdio: tuple[int, int, int] | None = None,
          pid_file: str | None = None, no_pivot: bool = False) -> WarmContainer:
    """Create and start the container of `bundle` with a warm point (descriptors 3 and 4, see the docstring)."""
    run_bundle = _RunBundle(bundle, container_id)
    relay = warm = None
    try:
        relay = _Relay(stdio)
        warm = _WarmPipes()
        assert warm.child is not None and relay.child is not None
        container = runtime.create(container_id, run_bundle.path, stdio=relay.child, pid_file=pid_file,
                                   no_pivot=no_pivot, extra_fds=warm.child)  # at WARM_FD and REPLY_FD
        relay.close_child()
        warm.close_child()
        try:
            container.start()
            return WarmContainer(container, relay, warm, run_bundle)
        except BaseException:
            container.delete(force=True)
            raise
    except BaseException:
        for part in (relay, warm):
            if part is not None:
                part.close()
        run_bundle.remove()
        raise


def restore(runtime: Runtime, snapshot: LoadedSnapshot, container_id: str, bundle: str, *,
            stdio: tuple[int, int, int] | None = None, pid_file: str | None = None,
            criu: criu_mod.Criu | None = None) -> WarmContainer:
    """Restore `snapshot` (from coldbrew.snapshot.store.load) as `container_id` from `bundle`: the program wakes up
    at its warm point and reads "restored"."""
    from .checkpoint import restore as criu_restore

    run_bundle = _RunBundle(bundle, container_id)
    relay = None
    try:
        relay = _Relay(stdio)
        assert relay.child is not None
        container = criu_restore(runtime, snapshot.snapshot, container_id, run_bundle.path, stdio=relay.child,
                                 pid_file=pid_file, criu=criu)
        relay.close_child()
        return WarmContainer(container, relay, None, run_bundle)
    except BaseException:
        if relay is not None:
            relay.close()
        run_bundle.remove()
        raise


# ---- the whole run -----------------------------------------------------------------------------------------------

@dataclass
class WarmRun:
    """How `run` went."""

    exit_code: int
    outcome: str  # "restored", "snapshotted", "no-warm-point" (exited without one), "snapshot-failed"
    refused: str | None = None  # why a stored snapshot was not used; None when there was none or it was used
    snapshot: StoredSnapshot | None = None  # the one restored, or the one made
    timings: dict[str, float] = field(default_factory=dict)  # seconds: fields, load, restore, dump, save


def default_cache() -> SnapshotCache:
    """The local snapshot cache: $COLDBREW_SNAPSHOT_CACHE (default /var/cache/coldbrew/snapshots), at most
    $COLDBREW_SNAPSHOT_CACHE_SIZE bytes (default 20 GiB)."""
    from .store import DEFAULT_CACHE_DIR, DEFAULT_CACHE_SIZE

    size = os.environ.get(CACHE_SIZE_ENV, str(DEFAULT_CACHE_SIZE))
    if not size.isdigit():
        raise SnapshotError(f"{CACHE_SIZE_ENV}={size!r}: give a number of bytes")
    return SnapshotCache(os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR), int(size))


def run(runtime: Runtime, container_id: str, bundle: str, key: str, *, store: str | ChunkStore,
        stdio: tuple[int, int, int] | None = None, cache: SnapshotCache | None = None,
        criu: str | criu_mod.Criu | None = None, pid_file: str | None = None, no_pivot: bool = False,
        log: Callable[[str], None] | None = None, on_start: Callable[[Container], None] | None = None) -> WarmRun:
    """`coldbrew run --snapshot KEY`: restore the snapshot of `key` when a valid one exists; otherwise start cold,
    snapshot at the warm point into `store` (replacing a refused one), and let the program carry on. Returns once
    the container exited (and a snapshot made is stored); the container is deleted.

    `log` gets the messages a user should see (a refused snapshot, a failed dump); `on_start` the container once it
    runs (the CLI forwards signals to it).
    """
    from ..fs.store import open_store

    say = log or (lambda _message: None)
    timings: dict[str, float] = {}
    tool = criu if isinstance(criu, criu_mod.Criu) else criu_mod.find(criu)
    chunks = open_store(store) if isinstance(store, str) else store
    cache = cache or default_cache()
    started = time.monotonic()
    fields = host_fields(bundle, tool)
    timings["fields"] = time.monotonic() - started
    refused = None
    loaded: LoadedSnapshot | None = None
    started = time.monotonic()
    try:
        loaded = load(chunks, key, fields, cache)
    except SnapshotNotFound:
        pass
    except SnapshotCorrupt as e:
        refused = str(e)
        say(f"WARNING: {e}: starting cold; the snapshot will be replaced (check the store {chunks.describe()})")
    except SnapshotError as e:  # a mismatch, or a store that cannot be read
        refused = str(e)
        say(f"{e}: starting cold; the snapshot will be replaced at the warm point")
    timings["load"] = time.monotonic() - started
    if loaded is not None:
        started = time.monotonic()
        try:
            with loaded:
                warm = restore(runtime, loaded, container_id, bundle, stdio=stdio, pid_file=pid_file, criu=tool)
        except (SnapshotError, CriuError) as e:
            refused = f"snapshot {key!r} could not be restored: {e}"
            say(f"{refused}; starting cold; the snapshot will be replaced at the warm point")
        else:
            timings["restore"] = time.monotonic() - started
            try:
                if on_start is not None:
                    on_start(warm.container)
                return WarmRun(warm.wait(), "restored", None, loaded.stored, timings)
            finally:
                warm.close()
    warm = start(runtime, container_id, bundle, stdio=stdio, pid_file=pid_file, no_pivot=no_pivot)
    try:
        if on_start is not None:
            on_start(warm.container)
        outcome, made, pending = "no-warm-point", None, None
        try:
            reached = warm.wait_warm()
        except SnapshotError as e:  # not the protocol: no snapshot, but the program runs on
            reached = False
            say(f"no snapshot {key!r}: {e}")
        if reached:
            try:
                pending = warm.snapshot(chunks, key, fields, cache, criu=tool)
            except (RuntimeFailure, OSError) as e:
                outcome = "snapshot-failed"
                say(f"the snapshot {key!r} was not taken: {e}")
        code = warm.wait()
        if pending is not None:
            try:
                made = pending.result()
                outcome = "snapshotted"
            except (RuntimeFailure, OSError) as e:
                outcome = "snapshot-failed"
                say(f"the snapshot {key!r} was taken but could not be stored: {e}")
        for name in ("dump", "save"):
            if getattr(warm, f"{name}_seconds") is not None:
                timings[name] = getattr(warm, f"{name}_seconds")
        return WarmRun(code, outcome, refused, made, timings)
    finally:
        warm.close()
