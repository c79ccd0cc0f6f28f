"""Finding CRIU and talking to it over its RPC (`criu swrk`).

Where CRIU comes from, first match wins: the path given (the CLI's global `--criu`), the COLDBREW_CRIU environment
variable, the private build scripts/setup-criu makes where the distribution's is too old
(/opt/coldbrew/criu/bin/criu, or $COLDBREW_CRIU_PREFIX/bin/criu), then `criu` on PATH. It must be CRIU >= 4.0:
3.x fails on kernel 6.x at start (vDSO bounds).

Why RPC rather than the `criu dump`/`criu restore` command lines (runc makes the same choice): only the RPC hands
back a restored terminal's pty master (orphan-pts-master, for `restore --console-socket`), restores the container's
init as our own child (rst_sibling, so its exit status is ours to read), takes descriptors to give the restored
tasks (inherit_fd) without shell-quoting them, and stops at each step of the dump and restore (notify) so the
caller can act there: join the restored tasks to their cgroup, later lock a CUDA context or announce a warm point.
"""

from __future__ import annotations

import array
import os
import subprocess

import _socket  # the C core: the `socket` wrapper module costs ~3 ms to import

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

from . import rpc
from .errors import CriuError, CriuNotFound

MIN_VERSION = (4, 0)
DEFAULT_PREFIX = "/opt/coldbrew/criu"
_RESPONSE_MAX = 10 * 4096  # runc's buffer; responses are a few hundred bytes
_LOG_CONTEXT = 5  # lines quoted before each error line of a log
_LOG_MAX_LINES = 30
# Printed on every run as root in a container or VM whose hard limit is below CRIU's wish; harmless
_LOG_NOISE = ("Can't setup RLIMIT_NOFILE",)
# Log lines whose cause is known, and what to do about it
_HINTS = (
    ("sockets: Can't get 1:16 opt", "this CRIU predates kernel 6.16's SO_PASSCRED change and cannot dump IP "
     "sockets here: use CRIU >= 4.2 (scripts/setup-criu provides one)"),
)

# path -> version, and path -> features: each costs a run of criu
_VERSIONS: dict[str, tuple[int, int, int]] = {}
_FEATURES: dict[str, dict[str, bool]] = {}


class Criu:
    """One CRIU binary, checked to be new enough."""

    def __init__(self, path: str, version: tuple[int, int, int]) -> None:
        self.path = path
        self.version = version

    def __repr__(self) -> str:
        return f"Criu({self.path!r}, version={'.'.join(map(str, self.version))})"

    @property
    def version_string(self) -> str:
        return ".".join(map(str, self.version))

    def features(self) -> dict[str, bool]:
        """What this CRIU and kernel support: mem_track (incremental dumps), lazy_pages, pidfd_store."""
        if self.path not in _FEATURES:
            response = self.call({"type": rpc.FEATURE_CHECK,
                                  "features": {"mem_track": True, "lazy_pages": True, "pidfd_store": True}})
            _FEATURES[self.path] = {k: bool(v) for k, v in response.get("features", {}).items()}
        return _FEATURES[self.path]

    def call(self, request: dict, *, stdio: tuple[int, int, int] | None = None, log: tuple[int, str] | None = None,
             on_start: Callable[[int], None] | None = None,
             on_notify: Callable[[str, int, list[int]], None] | None = None,
             preexec: Callable[[], None] | None = None) -> dict[str, Any]:
        """Run one request through `criu swrk`; its final response, or CriuError with the log's tail.

        Descriptors the request names (images_dir_fd, work_dir_fd) are ours: CRIU opens them through our
        /proc/PID/fd. `stdio` become its 0, 1, 2 (by default ours; inherit_fd names these); `log` is (directory fd,
        file name) of the log the request asks for, quoted in errors; `on_start(pid)` runs before the request is
        sent and may still complete it; `on_notify(script, pid, fds)` at each notification (fds: the pty master of
        "orphan-pts-master"); `preexec` in CRIU's process before it execs.
        """
        kind = rpc.REQUEST_NAMES.get(request["type"], str(request["type"]))
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        try:
            stdin, stdout, stderr = stdio if stdio is not None else (None, None, None)
            try:
                process = subprocess.Popen([self.path, "swrk", str(theirs.fileno())],
                                           pass_fds=(theirs.fileno(),), stdin=stdin, stdout=stdout,
                                           stderr=stderr, preexec_fn=preexec)
            except OSError as e:
                raise CriuNotFound(f"cannot run {self.path}: {e.strerror}") from None
            theirs.close()
            identity = _stat(process.pid)
            try:
                if on_start is not None:
                    on_start(process.pid)
                ours.send(rpc.encode(rpc.REQUEST, request))
                while True:
                    response, fds = _receive(ours)
                    # CRIU's own process name, now that it runs (at start it was still its wrapper's, if any)
                    named = _stat(process.pid)
                    if identity is not None and named is not None and named[1] == identity[1]:
                        identity = named
                    if response is None:
                        raise CriuError(f"criu {kind} exited without an answer", _log_tail(log))
                    if not response.get("success"):
                        for fd in fds:
                            os.close(fd)
                        raise CriuError(_failure(kind, response), _log_tail(log))
                    if response.get("type") != rpc.NOTIFY:
                        return response
                    notify = response.get("notify", {})
                    try:
                        if on_notify is not None:
                            on_notify(notify.get("script", ""), notify.get("pid", 0), fds)
                    finally:
                        for fd in fds:
                            os.close(fd)
                    ours.send(rpc.encode(rpc.REQUEST, {"type": rpc.NOTIFY, "notify_success": True}))
            finally:
                ours.close()  # a CRIU still waiting for us reads EOF and gives up
                process.wait()
                if identity is not None:
                    _reap_strays(*identity)
        finally:
            ours.close()
            theirs.close()


def _stat(pid: int) -> tuple[bytes, int] | None:
    """(name, start time) of a process, from /proc/PID/stat; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    end = data.rindex(b")")
    fields = data[end + 2:].split()
    return data[data.index(b"(") + 1:end], int(fields[19])


def _reap_strays(name: bytes, started: int, timeout: float = 2.0) -> None:
    """Reap what CRIU's helpers leave to us. A process CRIU forks (for a failed restore: a task it made and killed
    before giving it its own name) can outlive CRIU by a moment, and we inherit it (a restored init is ours by
    rst_sibling; the rest through the subreaper the runtime makes us). Such a process still carries CRIU's name and
    started after it: nothing else of ours looks like that. One still running after `timeout` is killed."""
    import signal
    import time

    from coldbrew.runtime.state import processes_named

    me = os.getpid()
    deadline = time.monotonic() + timeout
    while True:
        strays = [(pid, fields[0]) for pid, fields in processes_named(name)
                  if int(fields[1]) == me and int(fields[19]) >= started]
        if not strays:
            return
        for pid, state in strays:
            try:
                if state != b"Z" and time.monotonic() >= deadline:
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, os.WNOHANG)
            except (ChildProcessError, ProcessLookupError):
                pass
        time.sleep(0.005)


def _receive(sock: _socket.socket) -> tuple[dict | None, list[int]]:
    """One response and the descriptors that came with it (the pty master of orphan-pts-master)."""
    fds = array.array("i")
    data, ancillary, _, _ = sock.recvmsg(_RESPONSE_MAX, _socket.CMSG_SPACE(16 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    try:
        return rpc.decode(rpc.RESPONSE, data), list(fds)
    except rpc.DecodeError as e:
        for fd in fds:
            os.close(fd)
        raise CriuError(f"unreadable answer from criu: {e}") from None


def _failure(kind: str, response: dict) -> str:
    message = f"criu {kind} failed"
    reason = response.get("cr_errmsg", "").strip()
    if reason and not any(noise in reason for noise in _LOG_NOISE):  # CRIU's first error line, often the noise
        message += f": {reason}"
    if response.get("cr_errno"):
        message += f" ({os.strerror(response['cr_errno'])})"
    return message


def _log_tail(log: tuple[int, str] | None) -> str:
    """The error lines of a CRIU log with a few lines before each (runc quotes its logs this way), else its end."""
    if log is None:
        return ""
    dirfd, name = log
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return ""
    with open(fd, "rb") as f:
        lines = [line.rstrip("\n") for line in f.read().decode(errors="replace").splitlines()]
    lines = [line for line in lines if not any(noise in line for noise in _LOG_NOISE)]
    wanted: set[int] = set()
    for i, line in enumerate(lines):
        if "Error" in line:
            wanted.update(range(max(0, i - _LOG_CONTEXT), i + 1))
    picked = [lines[i] for i in sorted(wanted)] if wanted else lines
    hints = [f"hint: {hint}" for pattern, hint in _HINTS if any(pattern in line for line in lines)]
    return "\n".join(picked[-_LOG_MAX_LINES:] + hints)


def version_of(path: str) -> tuple[int, int, int]:
    """CRIU's version from `criu --version` ("Version: 4.1.1")."""
    if path not in _VERSIONS:
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        except OSError as e:
            raise CriuNotFound(f"cannot run {path}: {e.strerror}") from None
        except subprocess.TimeoutExpired:
            raise CriuNotFound(f"{path} --version did not answer in 30 s") from None
        for line in out.stdout.splitlines():
            if line.startswith("Version:"):
                parts = (line.split(":", 1)[1].strip().split("-")[0].split(".") + ["0", "0"])[:3]
                if all(p.isdigit() for p in parts):
                    _VERSIONS[path] = (int(parts[0]), int(parts[1]), int(parts[2]))
                    break
        else:
            detail = (out.stderr or out.stdout).strip().splitlines()
            raise CriuNotFound(f"{path} --version exited {out.returncode} without a version"
                               + (f": {detail[-1]}" if detail else ""))
    return _VERSIONS[path]


def _candidates(setting: str | None) -> list[tuple[str, str]]:
    """(path, where it came from) in the order they are tried."""
    if setting:
        return [(setting, "--criu")]
    if os.environ.get("COLDBREW_CRIU"):
        return [(os.environ["COLDBREW_CRIU"], "COLDBREW_CRIU")]
    found = []
    prefix = os.environ.get("COLDBREW_CRIU_PREFIX", DEFAULT_PREFIX)
    wrapper = os.path.join(prefix, "bin", "criu")
    if os.access(wrapper, os.X_OK):
        found.append((wrapper, "scripts/setup-criu's build"))
    for directory in os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        path = os.path.join(directory or ".", "criu")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            found.append((path, "PATH"))
            break
    return found


def find(setting: str | None = None) -> Criu:
    """The CRIU to use (see the module's docstring); CriuNotFound says why there is none."""
    candidates = _candidates(setting)
    if not candidates:
        raise CriuNotFound("CRIU is not installed: checkpoint and restore need CRIU >= 4.0 (run scripts/setup-criu, "
                           "or give its path with --criu or COLDBREW_CRIU)")
    problems = []
    for path, origin in candidates:
        try:
            version = version_of(path)
        except CriuNotFound as e:
            problems.append(str(e))
            continue
        if version[:2] >= MIN_VERSION:
            return Criu(path, version)
        problems.append(f"criu {'.'.join(map(str, version))} at {path} (from {origin}) is too old")
    raise CriuNotFound("; ".join(problems) + f": checkpoint and restore need CRIU >= {MIN_VERSION[0]}.{MIN_VERSION[1]} "
                       "(run scripts/setup-criu, or give its path with --criu or COLDBREW_CRIU)")
