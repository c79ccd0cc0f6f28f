"""What runs after fork: the container's init, and the process of `exec`, up to the final execve.

The runtime forks a child ("stage 1") that enters or creates the namespaces. A new pid namespace only applies to
children, so stage 1 forks once more and the grandchild ("stage 2") is the container's pid 1; stage 1 reports its pid
and exits. Without a user namespace the runtime skips that second fork (a fork of a Python process, with its
copy-on-write faults, is a tenth of a start): it creates the pid namespace for its own next child, and the child it
forks is pid 1 from the start (see `create_pid_namespace_first`).
Parent and child talk over a SOCK_SEQPACKET socketpair, one small JSON message each way per step:

    child  -> parent        parent -> child
    ----------------        ----------------
                            {"go"}                   the parent put the child in its cgroup (sent at once,
                                                     while the child sets up namespaces; awaited before fork)
    {"usermap"}             {"ok"}                   new user namespace: the parent writes uid_map/gid_map
    {"pid": N}                                       stage 2's pid as the host sees it (only if there is one)
    {"hooks"}               {"ok"}                   prestart + createRuntime hooks (if any), run by the parent
    {"ready"}                                        created: init now blocks opening exec.fifo until `start`
    {"error": "..."}                                 any failure, then the child exits

No threads, no heavy imports here: the child of a large process must stay small and quick to exec.
"""

from __future__ import annotations

import fcntl
import gc
import os
import resource
import struct

import _socket  # the C core: the `socket` wrapper module costs ~3 ms of every start to import

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

from . import cjson, exec_shim, libc, rootfs
from .capabilities import Capabilities, permitted_now
from .cgroups import join_self
from .errors import RuntimeFailure, SyscallError, describe_os_error
from .spec import NAMESPACE_PROC_NAMES, Process, Spec

_MSG_MAX = 65536
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: the name, then the union whose first member is ifr_flags


class InitPlan:
    """Everything the child needs, prepared by the parent before fork (so the child computes nothing heavy)."""

    __slots__ = ("spec", "process", "state", "cgroup_paths", "state_dirfd", "console_fd", "seccomp_program",
                 "seccomp_flags", "shim_fd", "no_pivot", "preserve_fds", "join_pid", "stdio", "extra_fds",
                 "in_new_pid_ns", "cgroup_join_files")

    def __init__(self, spec: Spec, process: Process, state: dict, *, cgroup_paths: dict[str, str] | None = None,
                 state_dirfd: int | None = None, console_fd: int | None = None,
                 seccomp_program: bytes | None = None, seccomp_flags: int = 0, shim_fd: int | None = None,
                 no_pivot: bool = False, preserve_fds: int = 0, join_pid: int | None = None,
                 stdio: tuple[int, int, int] | None = None, extra_fds: tuple[int, ...] = (),
                 cgroup_join_files: tuple[str, ...] = ()) -> None:
        self.spec = spec
        self.process = process
        self.state = state  # OCI state for hooks run by the child
        self.cgroup_paths = cgroup_paths or {}
        self.state_dirfd = state_dirfd  # create only: the state directory, for exec.fifo
        self.console_fd = console_fd  # a connected console socket, when process.terminal
        self.seccomp_program = seccomp_program
        self.seccomp_flags = seccomp_flags
        self.shim_fd = shim_fd
        self.no_pivot = no_pivot
        self.preserve_fds = preserve_fds
        self.join_pid = join_pid  # exec only: the container's init, whose namespaces we enter
        self.stdio = stdio  # the process's stdin, stdout, stderr; None: inherit ours
        self.extra_fds = extra_fds  # placed at 3 + preserve_fds, 3 + preserve_fds + 1, ... in the process
        self.in_new_pid_ns = False  # create only: the parent forked us into the container's pid namespace
        # where we move ourselves into the container's cgroup (Cgroup.self_join_files); empty: the parent moves us
        self.cgroup_join_files = cgroup_join_files


def send(sock: _socket.socket, message: dict) -> None:
    sock.send(cjson.dumps(message).encode())


def recv(sock: _socket.socket) -> dict | None:
    data = sock.recv(_MSG_MAX)
    return cjson.loads(data) if data else None


_go_received = False  # in the child: the parent's {"go"} may arrive while another answer is awaited


def _await(sock: _socket.socket, key: str) -> None:
    """Block until the parent sends {key: true}. {"go"} comes as soon as the parent has put us in our cgroup, which
    it does while we set up namespaces: it may come before (or after) the answer we wait for."""
    global _go_received
    if key == "go" and _go_received:
        return
    while True:
        message = recv(sock)
        if message == {"go": True}:
            _go_received = True
            if key == "go":
                return
        elif message == {key: True}:
            return
        else:
            os._exit(1)  # the parent is gone or confused: it reports the failure itself


def child_main(plan: InitPlan, sock: _socket.socket) -> NoReturn:
    """Entry point in the forked child. Never returns: it execs the container's program or exits."""
    code = 1
    gc.disable()  # a collection walks every object the parent had: copy-on-write faults for nothing, we exec soon
    try:
        libc.prctl(libc.PR_SET_DUMPABLE, 0)  # the container may not open /proc/<us>/exe or ptrace us
        if not plan.in_new_pid_ns:
            with open("/proc/self/comm", "w") as f:  # inherited by stage 2: the parent finds it by this name
                f.write(stray_name(os.getpid()))
        # the caller's numbers: copied above every target before stdio is placed over 0-2
        extra = _lift_extra_fds(plan) if plan.extra_fds else None
        if plan.stdio is not None:
            # through descriptors >= 3 first: one given for a stream may itself be 0-2 (stdio=(5, 0, 0))
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in plan.stdio]
            for target, fd in enumerate(high):
                os.dup2(fd, target)
                os.close(fd)
        if extra:
            sock = _place_extra_fds(plan, sock, extra)
        if plan.join_pid is None:
            _stage1_create(plan, sock)
        else:
            _stage1_exec(plan, sock)
    except BaseException as e:  # report, never raise into the parent's copy of the stack
        code = 127 if isinstance(e, _ExecFailed) else 1
        try:
            send(sock, {"error": _describe(e)})
        except OSError:  # past "ready" nobody listens: the container's stderr is the only witness
            os.write(2, f"coldbrew: {_describe(e)}\n".encode(errors="replace"))
    os._exit(code)


def _lift_extra_fds(plan: InitPlan) -> list[int]:
    """Copies of plan.extra_fds above their targets (3 + preserve_fds + i): a given descriptor may sit on a target."""
    top = 3 + plan.preserve_fds + len(plan.extra_fds)
    return [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for fd in plan.extra_fds]


def _place_extra_fds(plan: InitPlan, sock: _socket.socket, lifted: list[int]) -> _socket.socket:
    """Put the `lifted` copies of plan.extra_fds at 3 + preserve_fds + i (inheritable); returns `sock`, moved if it
    was in the way.

    Our own descriptors (the socket, the state directory, the shim, the console socket: opened by the parent before
    fork) may sit on a target too: they move above the targets first, so no dup2 clobbers what is still needed.
    """
    first = 3 + plan.preserve_fds
    top = first + len(lifted)

    def moved(fd: int | None) -> int | None:
        if fd is None or not first <= fd < top:
            return fd
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top)  # the old number is taken over by a dup2 below

    plan.state_dirfd, plan.shim_fd, plan.console_fd = (moved(plan.state_dirfd), moved(plan.shim_fd),
                                                       moved(plan.console_fd))
    if first <= sock.fileno() < top:
        replacement = _socket.socket(fileno=fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, top))
        sock.detach()  # its number is taken over by a dup2 below
        sock = replacement
    for target, fd in enumerate(lifted, first):
        os.dup2(fd, target)
        os.close(fd)
    return sock


def stray_name(stage1: int) -> str:
    """The process name of the runtime's child `stage1` and of what it forks, until the final exec: if stage 1 dies
    before it reports stage 2's pid, the runtime still finds stage 2 (its orphan to reap) by this name."""
    return f"cbinit:{stage1}"


def _describe(e: BaseException) -> str:
    if isinstance(e, (RuntimeFailure, _ExecFailed)):
        return str(e)
    if isinstance(e, OSError):
        return describe_os_error(e)
    return f"{type(e).__name__}: {e}"


class _ExecFailed(Exception):
    pass


# ---- create ----------------------------------------------------------------------------------------------------

def _stage1_create(plan: InitPlan, sock: _socket.socket) -> None:
    spec = plan.spec
    for ns in spec.namespaces:  # join by path first: the user namespace before the rest
        if ns.path and ns.type == "user":
            _setns_path(ns.path, ns.flag)
    for ns in spec.namespaces:
        if ns.path and ns.type != "user":
            _setns_path(ns.path, ns.flag)
    user_ns = spec.namespace("user")
    new_user = user_ns is not None and user_ns.path is None
    if new_user:
        libc.unshare(libc.CLONE_NEWUSER)
        send(sock, {"usermap": True})
        _await(sock, "ok")
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    flags = 0
    for ns in spec.namespaces:
        if ns.path is None and ns.type != "user":
            flags |= ns.flag
    if plan.in_new_pid_ns:
        flags &= ~libc.CLONE_NEWPID
    if flags & ~libc.CLONE_NEWCGROUP:
        libc.unshare(flags & ~libc.CLONE_NEWCGROUP)
    # Most of the rootfs while the parent puts us in our cgroup (its first cgroup.procs write can take ms)
    rootfd = rootfs.prepare(spec, in_user_ns=new_user or bool(user_ns))
    # The cgroup namespace is rooted at our cgroup, and stage 2 inherits it at fork: both wait for "go"
    _await(sock, "go")
    join_self(plan.cgroup_join_files)
    if flags & libc.CLONE_NEWCGROUP:
        libc.unshare(libc.CLONE_NEWCGROUP)
    if flags & libc.CLONE_NEWPID:
        _fork_stage2(sock)
    _stage2_create(plan, sock, rootfd)


def _stage2_create(plan: InitPlan, sock: _socket.socket, rootfd: int) -> None:
    spec, process = plan.spec, plan.process
    os.setsid()
    if spec.hooks["createContainer"] or spec.hooks["startContainer"]:
        from . import hooks  # noqa: F401  (imported now: after pivot_root our own files are out of sight)
    rootfs.mount_late(spec, rootfd, cgroup_paths=plan.cgroup_paths,
                      new_cgroupns=any(ns.type == "cgroup" and ns.path is None for ns in spec.namespaces))
    if spec.hooks["prestart"] or spec.hooks["createRuntime"]:
        send(sock, {"hooks": True})  # they run in the runtime's namespaces, so the parent runs them
        _await(sock, "ok")
    if spec.hooks["createContainer"]:
        from .hooks import run_hooks

        run_hooks(spec.hooks["createContainer"], {**plan.state, "pid": os.getpid()}, "createContainer")
    rootfs.pivot(rootfd, no_pivot=plan.no_pivot)
    os.close(rootfd)
    if any(ns.type == "network" and ns.path is None for ns in spec.namespaces):
        bring_up_loopback()
    rootfs.finalize(spec)
    if spec.hostname is not None:
        _socket.sethostname(spec.hostname)
    if spec.domainname is not None:
        libc.setdomainname(spec.domainname)
    if process.terminal:
        _setup_terminal(plan, spec_console=True)
    if spec.personality is not None:
        libc.libc.personality(spec.personality)
    path = _prepare_process(plan, sock)
    send(sock, {"ready": True})
    sock.close()

    # Created. Block until `start` opens the fifo's other end.
    fifo = os.open("exec.fifo", os.O_WRONLY | os.O_CLOEXEC, dir_fd=plan.state_dirfd)
    os.close(plan.state_dirfd)
    os.write(fifo, b"0")
    os.close(fifo)
    if spec.hooks["startContainer"]:
        from .hooks import run_hooks

        run_hooks(spec.hooks["startContainer"], {**plan.state, "pid": os.getpid(), "status": "created"},
                  "startContainer")
    _exec(plan, path)


def bring_up_loopback() -> None:
    """Set `lo` up in the calling thread's network namespace (the kernel then gives it 127.0.0.1 and ::1)."""
    try:
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    except OSError as err:
        raise SyscallError(err.errno, "socket(AF_INET, SOCK_DGRAM) to configure lo") from err
    try:
        req = bytearray(_IFREQ.pack(b"lo", 0))
        fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, req)
        flags = _IFREQ.unpack(req)[1]
        if not flags & _IFF_UP:
            fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))
    except OSError as err:
        raise SyscallError(err.errno, "ioctl(SIOCSIFFLAGS, lo, IFF_UP)") from err
    finally:
        sock.close()


# ---- exec ------------------------------------------------------------------------------------------------------

def _stage1_exec(plan: InitPlan, sock: _socket.socket) -> None:
    """Enter the namespaces of the running container's init, then fork into its pid namespace."""
    join_self(plan.cgroup_join_files)  # while the host's cgroup mounts are in sight and we are the host's root
    fds = []
    try:
        for ns in plan.spec.namespaces:
            name = NAMESPACE_PROC_NAMES[ns.type]
            target = f"/proc/{plan.join_pid}/ns/{name}"
            if os.stat(target).st_ino != os.stat(f"/proc/self/ns/{name}").st_ino:
                fds.append((ns.type, os.open(target, os.O_RDONLY | os.O_CLOEXEC)))
        fds.sort(key=lambda item: item[0] != "user")  # the user namespace first: it owns the others
        for ns_type, fd in fds:
            libc.setns(fd, 0)
    finally:
        for _, fd in fds:
            os.close(fd)
    _await(sock, "go")  # in the container's cgroup before anything runs or forks
    if plan.spec.namespace("pid"):
        _fork_stage2(sock)
    os.setsid()
    if plan.process.terminal:
        _setup_terminal(plan, spec_console=False)
    path = _prepare_process(plan, sock)
    send(sock, {"ready": True})
    sock.close()
    _exec(plan, path)


# ---- both ------------------------------------------------------------------------------------------------------

def create_pid_namespace_first(spec: Spec) -> bool:
    """Whether the runtime should make the container's new pid namespace itself, for the one child it forks next,
    instead of stage 1 forking stage 2 inside it: only without a user namespace, which must own the pid namespace
    and be made (or joined) before it."""
    pid_ns, user_ns = spec.namespace("pid"), spec.namespace("user")
    return pid_ns is not None and pid_ns.path is None and user_ns is None


def _fork_stage2(sock: _socket.socket) -> None:
    """Fork into the new pid namespace: stage 1 reports stage 2's pid and exits; stage 2 returns.

    Both write to the same socket, and the parent takes the first {"ready"} as the end: stage 2 must not say
    anything before the pid is sent, so it waits for stage 1 to close the pipe.
    """
    sent_r, sent_w = os.pipe()
    try:
        pid = os.fork()
    except OSError as e:
        raise RuntimeFailure(f"fork of the container's init: {e.strerror} (a pids limit too low?)") from None
    if pid:
        send(sock, {"pid": pid})
        os.close(sent_w)  # stage 2 may speak now, without waiting for our exit
        os._exit(0)
    os.close(sent_w)
    os.read(sent_r, 1)
    os.close(sent_r)


def _setns_path(path: str, flag: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc.setns(fd, flag)
    finally:
        os.close(fd)


def _setup_terminal(plan: InitPlan, *, spec_console: bool) -> None:
    """A pty from the container's own devpts: the slave becomes our stdio, the master goes to the console socket."""
    # In sys.modules already (our files may be out of sight after pivot_root): the parent imported it before fork
    # to connect the console socket, which a terminal requires. Not imported on every start: it pulls in `array`,
    # and with it `collections`.
    from . import console

    master, slave_path = console.open_pty(plan.process.console_size)
    slave = os.open(slave_path, os.O_RDWR | os.O_NOCTTY)
    if spec_console:
        console.bind_console(slave_path)
    console.make_controlling(slave)
    for std in (0, 1, 2):
        os.dup2(slave, std)
    if slave > 2:
        os.close(slave)
    console.send_fd(plan.console_fd, master)
    os.close(master)
    os.close(plan.console_fd)


def _prepare_process(plan: InitPlan, sock: _socket.socket) -> str:
    """rlimits, user, capabilities, umask, cwd; returns the program's path as the container resolves it."""
    process = plan.process
    for limit in process.rlimits:
        try:
            resource.setrlimit(limit.resource, (_rlim(limit.soft), _rlim(limit.hard)))
        except (OSError, ValueError) as e:
            raise RuntimeFailure(f"setting {limit.name} to {limit.soft}/{limit.hard}: {e}") from None
    try:
        os.makedirs(process.cwd, 0o755, exist_ok=True)  # as runc does; a read-only root reports at chdir below
    except OSError:
        pass
    process.capabilities.drop_bounding()
    user = process.user
    os.setgroups(list(user.additional_gids))
    os.setresgid(user.gid, user.gid, user.gid)
    libc.prctl(libc.PR_SET_KEEPCAPS, 1)
    os.setresuid(user.uid, user.uid, user.uid)
    libc.prctl(libc.PR_SET_KEEPCAPS, 0)
    if plan.seccomp_program is not None and not process.no_new_privileges:
        # Loading a filter without no_new_privs needs CAP_SYS_ADMIN, which a uid change just cleared from the
        # effective set: keep every permitted capability effective until the filter is in (see _exec).
        held = permitted_now()
        Capabilities(permitted=held, effective=held).apply()
    else:
        process.capabilities.apply()
    os.umask(0o022 if user.umask is None else user.umask)
    # Close the runtime's descriptors before chdir, so a cwd of /proc/self/fd/N cannot reach a host directory
    # (CVE-2024-21626); then check that the cwd really is inside the container.
    _close_host_fds(plan, sock)
    try:
        os.chdir(process.cwd)
    except OSError as e:
        raise RuntimeFailure(f"process.cwd {process.cwd!r}: {e.strerror}") from None
    try:
        os.getcwd()
    except FileNotFoundError:
        raise RuntimeFailure(f"process.cwd {process.cwd!r} is outside the container's root") from None
    return _resolve_program(process)


def _rlim(value: int) -> int:
    """rlim_t is unsigned 64-bit but Python's setrlimit takes a signed C long long: pass values from 2**63 up
    (RLIM_INFINITY is 2**64-1, the spec's "unlimited") as the negative number with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _close_host_fds(plan: InitPlan, sock: _socket.socket) -> None:
    keep = {plan.shim_fd, plan.state_dirfd, sock.fileno()}
    first = 3 + plan.preserve_fds + len(plan.extra_fds)
    for name in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
        fd = int(name)
        if fd >= first and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    # anything opened later (by a hook, by us) must not survive exec either
    libc.close_range(first, 0xFFFFFFFF, 4)  # CLOSE_RANGE_CLOEXEC


def _resolve_program(process: Process) -> str:
    program = process.args[0]
    if "/" in program:
        candidates = [program]
    else:
        env = dict(e.split("=", 1) for e in process.env)
        search = env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        candidates = [os.path.join(d or ".", program) for d in search.split(":")]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    if "/" in program:
        # runc's words: podman turns "no such file or directory" into exit status 127, "permission denied" into 126
        reason = "permission denied" if os.path.exists(program) else "no such file or directory"
        raise RuntimeFailure(f"exec: {program!r}: {reason}")
    raise RuntimeFailure(f"exec: {program!r}: executable file not found in $PATH")


def _exec(plan: InitPlan, path: str) -> NoReturn:
    """The last steps, in runc's order: no_new_privs, the seccomp filter, the spec's capabilities, execve.

    The filter is loaded as late as possible, so it only has to allow capset, prctl and execve of what follows.
    """
    process = plan.process
    if process.no_new_privileges:
        libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    if plan.seccomp_program is not None:
        # loaded with the spec's filter by the spec's parser, so found in sys.modules after pivot_root
        from .seccomp import load_filter

        load_filter(plan.seccomp_program, plan.seccomp_flags)
        if not process.no_new_privileges:
            process.capabilities.apply()
    try:
        exec_shim.execve(path, list(process.args), list(process.env), plan.shim_fd)
    except OSError as e:
        raise _ExecFailed(f"exec {path}: {e.strerror}") from None
    raise AssertionError("unreachable")

