"""The process that serves an image mount, and the library calls that start, query and stop it.

`mount` starts `python -m coldbrew.fs.daemon` in its own session (it forks once more, so it is nobody's child)
and waits on a pipe until the image is mounted and the kernel's INIT is answered, or until it reports why not.
The FUSE server is never the caller's thread: a FUSE server that touches its own mount deadlocks.

The daemon fetches and validates the index itself, so a first start's fetches all happen in one process, each
chunk once: the chunks of the image's start-up profile come in a few large requests (ranges of the profile's pack)
while it validates the index, and for a container root it also brings the root's other layers onto the host (the
EROFS metadata image, fetched while the index is validated, and the hot layer, which it fills while the root
already runs). The index is validated as soon as it is here, on a thread (`coldbrew.fs.cache.IndexValidation`).

Per mount, under /run/coldbrew/fs/ (named by a hash of the mount point): `KEY.json` (pid, mount point, image),
`KEY.sock` (a control socket: `stats`, `save-profile`) and `KEY.log` (the daemon's log: fetch errors name the
chunk). SIGTERM (what `unmount` sends) saves a recorded profile, unmounts and removes all three. When the daemon
is gone (kill -9), `unmount` detaches the dead mount itself.
"""

from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import json
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from .cache import DEFAULT_CACHE_DIR, DEFAULT_CACHE_SIZE
from .errors import FsError
from .mounts import canonical, link_target, mount_entry, umount

if TYPE_CHECKING:
    import mmap

    import trio

    from .hotlayer import HotLayer
    from .imagefs import ImageFs
    from .index import Chunk, Index

STATE_DIR = "/run/coldbrew/fs"
# A host's mount server (`coldbrew fs serve`): when it listens here, mounts are forked from it.
MOUNT_SERVER_SOCKET = os.environ.get("COLDBREW_MOUNT_SERVER", os.path.join(STATE_DIR, "mount-server.sock"))
FS_TYPE = "fuse.coldbrew"
# The kernel's read-ahead for the mount (its bdi's read_ahead_kb); FUSE's default of 128 KiB makes 128 KiB
# requests and halves sequential throughput. Measured in tests/test_mount.py's throughput check.
READ_AHEAD_KB = 4096
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0

log = logging.getLogger("coldbrew.fs")


# --- the caller's side -----------------------------------------------------------------------------------------

def _paths(mountpoint: str) -> tuple[str, str, str]:
    key = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:20]
    base = os.path.join(STATE_DIR, key)
    return base + ".json", base + ".sock", base + ".log"


def _read_state(path: str) -> dict | None:
    try:
        with open(path) as file:
            return json.load(file)
    except (FileNotFoundError, ValueError):
        return None


def _start_time(pid: int | str) -> int:
    """A process's start time in clock ticks since boot: with the pid, it names one process (pids are reused).

    Raises ProcessLookupError for a zombie: it serves nothing any more.
    """
    with open(f"/proc/{pid}/stat", "rb") as file:
        fields = file.read().rpartition(b")")[2].split()
    if fields[0] == b"Z":
        raise ProcessLookupError(pid)
    return int(fields[19])


def _daemon_alive(state: dict) -> bool:
    """Whether the state's pid is still our daemon (not a recycled pid, not a zombie)."""
    try:
        return _start_time(state["pid"]) == state["start_time"]
    except (FileNotFoundError, ProcessLookupError, KeyError, ValueError):
        return False


def mount(reference: str, mountpoint: str, *, store: str, cache_dir: str = DEFAULT_CACHE_DIR,
          cache_size: int = DEFAULT_CACHE_SIZE, record_profile: bool = False, prefetch: bool = True,
          foreground: bool = False, read_ahead_kb: int = READ_AHEAD_KB, keep_mounted: float | None = None,
          hot_layer: bool = False, metadata_image: bool = False) -> str | None:
    """Mount image `reference` from `store` read-only at `mountpoint`.

    Returns once the mount serves requests (a daemon keeps serving it in the background), or, with `foreground`,
    serves it in this process until it is unmounted. Raises FsError with the reason when it cannot mount.
    `keep_mounted`: the mount is the image layer of a shared stack (`coldbrew.fs.imagestack`, the mount point's
    parent directory), which the daemon takes down once no root has stacked on it for that many seconds.
    `metadata_image`: the daemon also saves the EROFS metadata image that the store keeps beside the index into the
    cache (`coldbrew.fs.erofs.cached_image_path`) before it is ready, fetched while the index downloads when the
    start-up profile names it, else while the index is validated.
    `hot_layer`: a root stacks the hot layer of the image's start-up profile over this mount. The daemon makes it
    (empty) before it is ready and fills it while the root runs (`coldbrew.fs.hotlayer`); prefetch leaves its
    files out. Returns the hot layer's directory, or None when the store has no profile for the image.
    """
    from .objects import parse_reference

    parse_reference(reference)
    mountpoint = canonical(mountpoint)
    entry = mount_entry(mountpoint)
    if entry is not None and entry[1] == FS_TYPE:
        raise FsError(f"{mountpoint} is already a coldbrew mount")
    try:
        if not stat.S_ISDIR(os.stat(mountpoint).st_mode):
            raise FsError(f"mount point {mountpoint} is not a directory")
    except FileNotFoundError:
        raise FsError(f"mount point {mountpoint} does not exist") from None
    if not store.startswith(("http://", "https://")):
        store = os.path.abspath(store)  # the daemon may run elsewhere (a mount server) with another cwd
    arguments = [reference, mountpoint, "--store", store, "--cache-dir", cache_dir, "--cache-size", str(cache_size),
                 "--read-ahead-kb", str(read_ahead_kb)]
    if record_profile:
        arguments.append("--record-profile")
    if not prefetch:
        arguments.append("--no-prefetch")
    if keep_mounted is not None:
        arguments += ["--keep-mounted", str(keep_mounted)]
    if hot_layer:
        arguments.append("--hot-layer")
    if metadata_image:
        arguments.append("--metadata-image")
    if foreground:
        code = main(arguments)
        if code:
            raise FsError(f"serving {mountpoint} failed; see the log above")
        return None
    os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
    log_path = _paths(mountpoint)[2]
    read_end, write_end = os.pipe()
    try:
        if not _ask_mount_server(arguments, log_path, write_end):
            with open(log_path, "ab") as log_file:
                starter = subprocess.Popen(
                    [sys.executable, "-m", "coldbrew.fs.daemon", *arguments, "--ready-fd", str(write_end),
                     "--detach"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file, pass_fds=(write_end,),
                    start_new_session=True)
            starter.wait()  # it forks the daemon and exits at once
        os.close(write_end)
        write_end = -1
        message = _read_until_eof(read_end, READY_TIMEOUT)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    kind, _, text = message.decode(errors="replace").partition("\n")
    if kind == "ready":
        return text or None  # the hot layer's directory
    if not message:
        raise FsError(f"the filesystem daemon for {mountpoint} exited before it was ready; see {log_path}")
    os.unlink(log_path)
    raise _rebuild(kind, text)


def _ask_mount_server(arguments: list[str], log_path: str, ready_fd: int) -> bool:
    """Have a running mount server (`serve_mounts`) fork the daemon; False when there is none."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        try:
            connection.connect(MOUNT_SERVER_SOCKET)
            socket.send_fds(connection, [json.dumps({"arguments": arguments, "log": log_path}).encode()],
                            [ready_fd])
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


def _rebuild(kind: str, text: str) -> FsError:
    """The daemon's error as the same FsError subclass (BadIndex, BadReference, ...) with its message."""
    from . import errors

    cls = getattr(errors, kind, FsError)
    if not (isinstance(cls, type) and issubclass(cls, FsError)):
        cls = FsError
    error = cls.__new__(cls)
    Exception.__init__(error, text)
    return error


def _read_until_eof(fd: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise FsError(f"the filesystem daemon was not ready after {timeout:.0f} s")
        part = os.read(fd, 65536)
        if not part:
            return data.strip()
        data += part


def _request(mountpoint: str, command: str, timeout: float = 10.0) -> dict:
    # A container root's `image` may be a link to its image's shared stack (coldbrew.fs.imagestack).
    mountpoint = canonical(link_target(mountpoint) or mountpoint)
    state_path, socket_path, _ = _paths(mountpoint)
    state = _read_state(state_path)
    if state is None or not _daemon_alive(state):
        raise FsError(f"no coldbrew filesystem daemon serves {mountpoint}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        try:
            connection.connect(socket_path)
            connection.sendall(command.encode() + b"\n")
            data = b""
            while part := connection.recv(65536):
                data += part
        except OSError as error:
            raise FsError(f"the filesystem daemon of {mountpoint} did not answer: {error}") from None
    return json.loads(data)


def serving(mountpoint: str) -> bool:
    """Whether a live daemon serves the mount at `mountpoint`."""
    state = _read_state(_paths(canonical(mountpoint))[0])
    return state is not None and _daemon_alive(state)


def mount_stats(mountpoint: str) -> dict:
    """Counters of a mount: bytes_fetched, chunks_fetched, cache_hits, cache_misses, reads, prefetched_chunks, ..."""
    return _request(mountpoint, "stats")


def save_profile(mountpoint: str) -> int:
    """Save a recording mount's start-up profile now (also done at unmount); returns how many chunks it holds."""
    answer = _request(mountpoint, "save-profile")
    if "error" in answer:
        raise FsError(answer["error"])
    return answer["profile_chunks"]


def unmount(mountpoint: str) -> None:
    """Stop the daemon (it saves a recorded profile), unmount, remove the state; also cleans up a dead daemon."""
    mountpoint = canonical(mountpoint)
    state_path, socket_path, log_path = _paths(mountpoint)
    state = _read_state(state_path)
    entry = mount_entry(mountpoint)
    if state is None and (entry is None or entry[1] != FS_TYPE):
        raise FsError(f"{mountpoint} is not a coldbrew mount")
    if state is not None and _daemon_alive(state):
        _stop(state["pid"])
    entry = mount_entry(mountpoint)
    if entry is not None and entry[1] == FS_TYPE:
        _detach(mountpoint)
    for path in (state_path, socket_path, log_path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _stop(pid: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        if not select.select([pidfd], [], [], STOP_TIMEOUT)[0]:
            log.warning("filesystem daemon %d did not stop in %.0f s; killing it", pid, STOP_TIMEOUT)
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], STOP_TIMEOUT)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def _detach(mountpoint: str) -> None:
    error = umount(mountpoint, detach=True)
    if error not in (0, errno.EINVAL):  # EINVAL: not mounted (any more)
        raise FsError(f"cannot unmount {mountpoint}: {os.strerror(error)}")


# --- the daemon's side -----------------------------------------------------------------------------------------

class _Report:
    """The readiness pipe to `mount`: one message, then closed."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def send(self, message: str) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, message.encode())
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """The daemon's arguments; the mount server builds the parser before it forks daemons."""
    parser = argparse.ArgumentParser(prog="python -m coldbrew.fs.daemon")
    parser.add_argument("reference")
    parser.add_argument("mountpoint")
    parser.add_argument("--store", required=True)
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    parser.add_argument("--cache-size", type=int, default=DEFAULT_CACHE_SIZE)
    parser.add_argument("--read-ahead-kb", type=int, default=READ_AHEAD_KB)
    parser.add_argument("--record-profile", action="store_true")
    parser.add_argument("--no-prefetch", action="store_true")
    parser.add_argument("--keep-mounted", type=float)
    parser.add_argument("--hot-layer", action="store_true")
    parser.add_argument("--metadata-image", action="store_true")
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--detach", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.detach and os.fork():
        os._exit(0)  # the daemon is the grandchild: reparented, nobody has to reap it
    report = _Report(args.ready_fd)
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                            format=f"%(asctime)s coldbrew.fs[{os.getpid()}] %(levelname)s %(message)s")
    try:
        server = _Server(args, report)
    except FsError as error:
        log.error("%s", error)
        report.send(f"{type(error).__name__}\n{error}")
        return 1
    except Exception as error:
        log.exception("mounting %s failed", args.mountpoint)
        report.send(f"FsError\nmounting {args.mountpoint} failed: {error}")
        return 1
    return server.run()


def serve_mounts(socket_path: str = MOUNT_SERVER_SOCKET) -> int:
    """Serve mount requests until SIGTERM or SIGINT: each mount's daemon is forked from this process.

    A daemon started from scratch spends most of its start importing trio, pyfuse3, lmdb and numpy (a quarter to
    half a second with a cold page cache, more than the rest of a container's start); forked from here it starts with
    them loaded. No thread and no event loop runs here, so forking is safe; children are reaped by the kernel.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS would start a thread pool; nothing here uses it
    import lmdb._envid  # noqa: F401  (loaded before forking is the point; lmdb loads this on first open)
    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    from . import cache, erofs, fetch, hotlayer, httpstore, imagefs, indexcheck, profile, store  # noqa: F401

    _parser()

    os.makedirs(os.path.dirname(socket_path), mode=0o700, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(socket_path)
        raise FsError(f"a mount server already listens on {socket_path}")
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    finally:
        probe.close()
    try:
        os.unlink(socket_path)  # a stale socket of a server that died
    except FileNotFoundError:
        pass
    listener.bind(socket_path)
    listener.listen(64)

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the daemons
    try:
        while True:
            connection, _ = listener.accept()
            with connection:
                fds: list[int] = []
                try:
                    message, fds, _, _ = socket.recv_fds(connection, 1 << 16, 1)
                    request = json.loads(message)
                    arguments, log_path = list(map(str, request["arguments"])), str(request["log"])
                    if len(fds) != 1:
                        raise ValueError(f"{len(fds)} file descriptors instead of the readiness pipe")
                except (OSError, ValueError, KeyError, TypeError) as error:
                    log.warning("a bad mount request: %s", error)
                    for fd in fds:
                        os.close(fd)
                    continue
                if os.fork() == 0:
                    listener.close()
                    _become_daemon(arguments, log_path, fds[0])
                os.close(fds[0])
    except KeyboardInterrupt:
        return 0
    finally:
        listener.close()
        try:
            os.unlink(socket_path)
        except FileNotFoundError:
            pass


def _become_daemon(arguments: list[str], log_path: str, ready_fd: int) -> None:
    """In a child of the mount server: a session of its own, stdio to the mount's log, then serve the mount."""
    code = 1
    try:
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(log_fd, 2)
        os.close(null)
        os.close(log_fd)
        code = main([*arguments, "--ready-fd", str(ready_fd)])
    finally:
        os._exit(code)


class _Server:
    def __init__(self, args: argparse.Namespace, report: _Report) -> None:
        from .cache import ChunkCache
        from .fetch import ChunkFetcher
        from .profile import ProfileRecorder
        from .store import open_store

        self.args = args
        self.report = report
        self.mountpoint = args.mountpoint
        self.reference = args.reference.removeprefix("blake3:")
        self.state_path, self.socket_path, self.log_path = _paths(self.mountpoint)
        self.started = time.monotonic()
        self.store = open_store(args.store)
        self.cache = ChunkCache(args.cache_dir, args.cache_size)
        self.fetcher = ChunkFetcher(self.store, self.cache)
        self.recorder = ProfileRecorder() if args.record_profile else None
        self.index: Index | None = None
        self._mapped: mmap.mmap | None = None
        self.fs: ImageFs | None = None
        self.mounted = False
        self.profile_data: bytes | None = None
        self.profile_image: bytes | None = None  # the metadata image the profile names
        self.profile_fetched: trio.Event | None = None
        self.hot_layer: HotLayer | None = None
        self.prefetcher = None
        self.stack_lock: int | None = None  # held while this daemon takes its stack down
        os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self.listener.bind(self.socket_path)
        self.listener.listen(16)

    def run(self) -> int:
        import pyfuse3
        import trio

        # Worker threads (fetches, decompression, cache writes) run mostly without the GIL and need it back for
        # moments: the default 5 ms interval lets the loop's Python hold them up that long each time.
        sys.setswitchinterval(0.0005)

        code = 0
        failure: FsError | None = None
        try:
            failure = trio.run(self._serve)
            if failure is not None:
                code = 1
        except BaseException:
            log.exception("the filesystem of %s failed", self.mountpoint)
            self.report.send(f"FsError\nserving {self.mountpoint} failed; see {self.log_path}")
            code = 1
        finally:
            try:
                self._save_profile()
            except FsError:
                code = 1  # logged; the mount still goes away
            if self.mounted:
                pyfuse3.close(unmount=True)
            self.listener.close()
            if self.index is not None:
                self.index.release()
                if self._mapped is not None:
                    self._mapped.close()
            if self.hot_layer is not None:
                self.hot_layer.close()
            self.cache.close()
            for path in (self.state_path, self.socket_path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            if self.args.keep_mounted is not None:
                self._remove_stack()  # last: its lock file going says that all of the stack is gone
            if failure is not None:  # once nothing of the mount is left
                self.report.send(f"{type(failure).__name__}\n{failure}")
        return code

    async def _serve(self) -> FsError | None:
        """Mount and serve until unmounted; the reason when it could not mount."""
        import trio

        async with trio.open_nursery() as nursery:
            self.fetcher.attach(nursery)
            try:
                await self._mount(nursery)
            except FsError as error:
                log.error("%s", error)
                nursery.cancel_scope.cancel()
                return error
            nursery.start_soon(self._fuse_main, nursery.cancel_scope)
            await self.fs.initialized.wait()
            self._raise_read_ahead()
            with open(self.state_path + ".tmp", "w") as file:
                json.dump({"pid": os.getpid(), "start_time": _start_time("self"), "mountpoint": self.mountpoint,
                           "reference": self.reference, "store": self.store.describe(), "socket": self.socket_path,
                           "log": self.log_path}, file)
            os.rename(self.state_path + ".tmp", self.state_path)
            nursery.start_soon(self._signals)
            nursery.start_soon(self._control)
            layer_to_fill = self.hot_layer is not None and not self.hot_layer.complete
            if self.profile_data and (layer_to_fill or not self.args.no_prefetch):
                nursery.start_soon(self._follow_profile)
            if self.args.keep_mounted is not None:
                nursery.start_soon(self._release_stack_when_unused)
            log.info("mounted %s at %s (index %d entries, %.3f s)", self.reference, self.mountpoint,
                     self.index.entries, self.mount_seconds)
            self.report.send("ready" if self.hot_layer is None else f"ready\n{self.hot_layer.path}")
        return None

    async def _mount(self, nursery: trio.Nursery) -> None:
        """Fetch and validate the index and mount it; with --hot-layer and --metadata-image, also bring the root's
        other layers here. A first start waits for the longest step, not their sum: the index has the link to
        itself, shared only with the metadata image that the profile names; its validation starts as soon as it is
        here, and the profile's pack is fetched while it runs."""
        import pyfuse3
        import trio

        from .cache import open_index
        from .erofs import cached_image_path
        from .imagefs import ImageFs

        if self.args.hot_layer or not self.args.no_prefetch:
            self.profile_fetched = trio.Event()
            nursery.start_soon(self._fetch_profile)
        index_opened, metadata_fetched = trio.Event(), trio.Event()
        metadata_image = cached_image_path(self.cache.directory, self.reference)
        if self.args.metadata_image and not os.path.exists(metadata_image):
            nursery.start_soon(self._fetch_metadata_image, metadata_image, index_opened, metadata_fetched)
        else:
            metadata_fetched.set()
        self.index, self._mapped, validation = await trio.to_thread.run_sync(
            functools.partial(open_index, self.reference, self.store, self.cache, validate=True))
        index_opened.set()
        try:
            await self._bring_layers(nursery)
            if validation is not None:
                await trio.to_thread.run_sync(validation.wait)
        finally:
            if validation is not None:
                validation.close()
        await metadata_fetched.wait()
        self.index_seconds = time.monotonic() - self.started
        self.fs = ImageFs(self.index, self.fetcher, recorder=self.recorder)
        options = {"fsname=coldbrew", "subtype=coldbrew", "ro", "default_permissions", "noatime"}
        if os.geteuid() == 0:
            # Container roots: other users read it, and its setuid programs and device nodes must work.
            options |= {"allow_other", "suid", "dev"}
        try:
            pyfuse3.init(self.fs, self.mountpoint, options)
        except RuntimeError as error:
            raise FsError(f"cannot mount {self.mountpoint}: {error} (see the log)") from None
        self.mounted = True
        self.mount_seconds = time.monotonic() - self.started

    async def _bring_layers(self, nursery: trio.Nursery) -> None:
        """Once the index is here: the hot layer (made empty) and the fetch of the profile's pack (it needs only the
        profile's head)."""
        import trio

        from .hotlayer import HotLayer

        if self.profile_fetched is not None:
            await self.profile_fetched.wait()
        if self.args.hot_layer and self.profile_data:
            self.hot_layer = await trio.to_thread.run_sync(HotLayer, self.cache.directory, self.reference,
                                                           self.profile_data)
        if self.profile_data:
            nursery.start_soon(self._fetch_pack)

    async def _fetch_metadata_image(self, path: str, index_opened: trio.Event, done: trio.Event) -> None:
        """The stored metadata image into the cache, if it is good (else the root's maker writes one). The one that
        the profile names is fetched while the index downloads, and kept if the index names it too."""
        import trio

        from .erofs import fetch_image, save_image, stored_image

        try:
            image = None
            if self.profile_fetched is not None:
                await self.profile_fetched.wait()
                if self.profile_image is not None:
                    image = await trio.to_thread.run_sync(fetch_image, self.store, self.profile_image)
            await index_opened.wait()
            wanted = await trio.to_thread.run_sync(stored_image, self.index)
            if wanted is None:
                return
            if wanted != self.profile_image:
                image = await trio.to_thread.run_sync(fetch_image, self.store, wanted)
            if image is not None:
                await trio.to_thread.run_sync(save_image, image, path)
        except (FsError, OSError) as error:
            log.warning("cannot save the metadata image of %s: %s", self.reference, error)
        finally:
            done.set()

    async def _fetch_profile(self) -> None:
        import trio

        from .profile import fetch_head, metadata_image

        try:
            head = await trio.to_thread.run_sync(fetch_head, self.store, self.reference)
            if head is not None:
                self.profile_image = metadata_image(head)  # which also checks the head
            self.profile_data = head
        except (FsError, OSError) as error:  # a profile is an optimisation: the mount goes on without one
            log.warning("start-up profile of %s not used: %s", self.reference, error)
        finally:
            self.profile_fetched.set()

    async def _fetch_pack(self) -> None:
        """The profile's chunks that this start needs, from its pack: a hot layer's (unless it is complete) and,
        with prefetch, the rest. They need no index: this runs while the index is validated."""
        from .profile import packed_chunks, profile_name

        prefetch = not self.args.no_prefetch
        hot = prefetch if self.hot_layer is None else not self.hot_layer.complete
        try:
            chunks = [chunk for chunk in packed_chunks(self.profile_data) if (hot if chunk.hot else prefetch)]
            await self.fetcher.fetch_packed(chunks, functools.partial(self.store.read_named,
                                                                      profile_name(self.reference)))
        except Exception:  # an optimisation: it must never take the mount down
            log.exception("fetching the pack of the start-up profile of %s", self.reference)

    async def _fuse_main(self, scope) -> None:
        import pyfuse3

        await pyfuse3.main()
        scope.cancel()  # unmounted: stop the control socket, signals, prefetch

    def _raise_read_ahead(self) -> None:
        # After INIT: the kernel lowers the bdi's read-ahead to what INIT negotiated when it processes the answer.
        entry = mount_entry(self.mountpoint)
        if entry is None or not self.args.read_ahead_kb:
            return
        try:
            with open(f"/sys/class/bdi/{entry[0]}/read_ahead_kb", "w") as file:
                file.write(str(self.args.read_ahead_kb))
        except OSError as error:
            log.warning("cannot raise read_ahead_kb of %s: %s", self.mountpoint, error)

    async def _signals(self) -> None:
        import pyfuse3
        import trio

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                log.info("stopping: unmounting %s", self.mountpoint)
                pyfuse3.terminate()
                return

    async def _release_stack_when_unused(self) -> None:
        import pyfuse3

        from .imagestack import release_when_unused

        self.stack_lock = await release_when_unused(os.path.dirname(self.mountpoint), self.args.keep_mounted,
                                                    pyfuse3.terminate)

    def _remove_stack(self) -> None:
        """After this daemon's mount is gone, the rest of its stack, unless a root maker holds the lock (it will)."""
        from .imagestack import remove, take_down, try_lock

        stack = os.path.dirname(self.mountpoint)
        lock = self.stack_lock if self.stack_lock is not None else try_lock(stack)
        if lock is None:
            return
        try:
            take_down(stack, stop_daemon=False)
            remove(stack)
            if os.path.exists(self.log_path):  # nobody is left to unmount this mount and remove its log
                os.unlink(self.log_path)
        except (FsError, OSError) as error:
            log.error("cannot remove the stack %s: %s", stack, error)
        finally:
            os.close(lock)

    async def _control(self) -> None:
        import trio

        listener = trio.socket.from_stdlib_socket(self.listener)
        async with trio.open_nursery() as nursery:
            while True:
                connection, _ = await listener.accept()
                nursery.start_soon(self._answer, connection)

    async def _answer(self, connection) -> None:
        import trio

        stream = trio.SocketStream(connection)
        try:
            async with stream:
                with trio.move_on_after(10):
                    request = b""
                    while not request.endswith(b"\n") and len(request) < 256:
                        part = await stream.receive_some(256)
                        if not part:
                            break
                        request += part
                    command = request.strip().decode(errors="replace")
                    if command == "stats":
                        answer = await self._stats()
                    elif command == "save-profile":
                        answer = await trio.to_thread.run_sync(self._save_profile_answer)
                    else:
                        answer = {"error": f"unknown command {command!r}"}
                    await stream.send_all(json.dumps(answer).encode())
        except (OSError, trio.BrokenResourceError):
            pass  # the client went away
        except Exception:  # a broken answer must not take the filesystem down
            log.exception("control request failed")

    async def _stats(self) -> dict:
        import trio

        stats = {"reference": self.reference, "mountpoint": self.mountpoint, "pid": os.getpid(),
                 "log": self.log_path, "entries": self.index.entries, "mount_seconds": self.mount_seconds,
                 "index_seconds": self.index_seconds, "reads": self.fs.reads, "read_bytes": self.fs.read_bytes,
                 "read_ahead_kb": self.args.read_ahead_kb}
        stats.update(self.fetcher.stats())
        stats["read_ahead_chunks"] = self.fetcher.background_fetched
        stats.update({"profile_chunks": 0, "prefetched_chunks": 0, "prefetch_cached": 0, "prefetch_done": False,
                      "notified_bytes": 0})
        if self.prefetcher is not None:
            stats.update(self.prefetcher.stats())
            # The prefetcher's fetches are background fetches too; read-ahead counts only the rest.
            stats["read_ahead_chunks"] -= self.prefetcher.prefetched_chunks
        if self.recorder is not None:
            stats["recorded_chunks"] = len(self.recorder)
        if self.hot_layer is not None:
            stats.update(self.hot_layer.stats())
        stats["cache"] = await trio.to_thread.run_sync(self.cache.stats)
        return stats

    def _save_profile_answer(self) -> dict:
        if self.recorder is None:
            return {"error": f"{self.mountpoint} does not record a profile (mount it with record_profile)"}
        try:
            return {"profile_chunks": self._save_profile()}
        except FsError as error:
            return {"error": str(error)}

    def _save_profile(self) -> int:
        if self.recorder is None or not len(self.recorder) or self.index is None:
            return 0
        count = len(self.recorder)
        from .erofs import stored_image
        from .profile import profile_name

        try:
            data = self.recorder.serialize(self.index, self._stored_chunk, stored_image(self.index))
            self.store.put_named(profile_name(self.reference), data)
        except Exception as error:  # any store failure: reported, never fatal to the unmount
            log.error("cannot save the start-up profile of %s: %s", self.reference, error)
            raise FsError(f"cannot save the start-up profile: {error}") from None
        log.info("saved a start-up profile of %d chunks for %s", count, self.reference)
        return count

    def _stored_chunk(self, chunk: Chunk) -> bytes | None:
        """A chunk's stored bytes for the profile's pack: compressed from the cache, else from the store."""
        from . import objects

        raw = self.cache.get(chunk.digest)
        if raw is not None and len(raw) == chunk.length:
            return objects.compress(raw)
        try:
            stored = self.store.get(chunk.digest)
            objects.decode(chunk.digest, stored, chunk.length)
        except (FsError, OSError) as error:
            log.warning("chunk %s is left out of the profile's pack: %s", chunk.digest.hex(), error)
            return None
        return stored

    async def _follow_profile(self) -> None:
        """Read the profile against the index once: the hot layer is filled with the files it reads whole, and the
        rest (all of it without a hot layer) is prefetched, side by side."""
        import trio

        from .imagefs import Prefetcher
        from .profile import files_read_whole, parse_profile

        try:
            profile = await trio.to_thread.run_sync(parse_profile, self.profile_data, self.index)
            whole = {}
            if self.hot_layer is not None:
                whole = await trio.to_thread.run_sync(files_read_whole, profile, self.index)
        except Exception as error:  # an optimisation: whatever fails, the mount goes on serving
            log.warning("start-up profile of %s not used: %s", self.reference, error)
            return
        async with trio.open_nursery() as nursery:
            if self.hot_layer is not None:
                nursery.start_soon(self.hot_layer.fill, self.index, whole, self.fetcher, self.cache)
            if not self.args.no_prefetch:
                rest = [(ino, chunk) for ino, chunk in profile if ino not in whole]  # the hot layer's are written
                self.prefetcher = Prefetcher(self.fs, rest)
                log.info("prefetching a start-up profile of %d chunks", len(rest))
                await self.prefetcher.run()
                log.info("prefetch done: %d fetched, %d already cached", self.prefetcher.prefetched_chunks,
                         self.prefetcher.prefetch_cached)


if __name__ == "__main__":
    sys.exit(main())
