"""The in-process API: a scheduler creates, starts, waits for, execs into, kills and deletes containers here.

The CLI is a thin layer over this module; nothing here spawns a `coldbrew` process.
"""

from __future__ import annotations

import os
import select
import _signal as signals  # the C core: `signal` builds its enums with `enum`, ~5 ms of every start
import time

import _socket  # the C core: the `socket` wrapper module costs ~3 ms of every start to import

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Sequence

from . import cjson, exec_shim, init, libc, state as statedir
from .errors import ContainerExists, ContainerNotFound, InvalidState, NotRunning, RuntimeFailure, SpecError
from .spec import Process, Spec, load_bundle, parse

OCI_VERSION = "1.2.0"
DEFAULT_ROOT = "/run/coldbrew"
CREATED, RUNNING, PAUSED, STOPPED, CREATING = "created", "running", "paused", "stopped", "creating"


def parse_signal(value: str | int) -> int:
    """A signal by number or by name, with or without SIG: 9, "9", "KILL", "SIGKILL"."""
    if isinstance(value, int) or str(value).isdigit():
        number = int(value)
        if not 0 < number < signals.NSIG:
            raise RuntimeFailure(f"invalid signal {value}")
        return number
    name = str(value).upper()
    name = name if name.startswith("SIG") else "SIG" + name
    number = getattr(signals, name, None) if _is_signal_name(name) else None
    if not isinstance(number, int):
        raise RuntimeFailure(f"unknown signal {value!r}")
    return number


def _signal_name(number: int) -> str:
    """SIGKILL for 9: the first name in alphabetical order where there are aliases (SIGABRT, not SIGIOT), as
    signal.Signals names them; "signal N" for a number without a name."""
    names = [name for name in dir(signals) if _is_signal_name(name) and getattr(signals, name) == number]
    return min(names) if names else f"signal {number}"


def _is_signal_name(name: str) -> bool:
    return name.startswith("SIG") and not name.startswith("SIG_") and name.isupper()


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class Runtime:
    """Containers under one state root (runc's --root). Make one per process and keep it."""

    def __init__(self, root: str = DEFAULT_ROOT, *, subreaper: bool = True) -> None:
        self.root = root
        if subreaper:
            # The container's init is our grandchild: as a subreaper we inherit it, so wait() gets its exit status.
            libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 1)

    def get(self, container_id: str) -> "Container":
        sd = statedir.StateDir(self.root, container_id)
        return Container(sd, sd.load())

    def list(self) -> list["Container"]:
        result = []
        for cid in statedir.list_ids(self.root):
            try:
                result.append(self.get(cid))
            except ContainerNotFound:
                pass  # deleted meanwhile
        return result

    def create(self, container_id: str, bundle: str, *, console_socket: str | None = None,
               pid_file: str | None = None, no_pivot: bool = False, preserve_fds: int = 0,
               stdio: tuple[int, int, int] | None = None, extra_fds: Sequence[int] = ()) -> "Container":
        """Create the container: its init waits in the new namespaces, rootfs ready, until :meth:`Container.start`.

        `stdio` gives the process's stdin, stdout and stderr descriptors; by default it inherits this process's.
        `preserve_fds` passes this process's descriptors 3 .. 3 + preserve_fds - 1 on at the same numbers;
        `extra_fds[i]` (this process's number) becomes the process's descriptor 3 + preserve_fds + i, without
        touching this process's descriptor table.
        """
        if extra_fds:
            extra_fds = _checked_extra_fds(extra_fds)
        sd, bundle, spec = self._new_container(container_id, bundle)
        if spec.process is None:
            raise SpecError("process", "is required to create a container")
        if spec.process.terminal and not console_socket:
            raise RuntimeFailure("process.terminal is true: a --console-socket is needed to hand over the terminal")
        if console_socket and not spec.process.terminal:
            raise RuntimeFailure("--console-socket was given but process.terminal is false")
        _refuse_host_mount_namespace(spec)
        from .cgroups import open_cgroup

        cgroup = open_cgroup(spec.cgroups_path, container_id)
        resources = _with_default_devices(spec)
        seccomp = _compiled_seccomp(spec)
        oci_state, record = _claim(sd, bundle, spec, cgroup, CREATING, no_pivot)
        made_cgroup = False
        pids: list[int] = []
        join_files = _self_join_files(spec, cgroup)

        def join_new_cgroup(child: int) -> None:
            # after fork: made while the child sets up its namespaces
            nonlocal made_cgroup
            cgroup.create(resources)
            made_cgroup = True
            if not join_files:
                cgroup.add_process(child)

        try:
            os.mkfifo(sd.fifo)
            os.chmod(sd.fifo, 0o622)  # writable by the init even when it is another uid (a user namespace)
            dirfd = os.open(sd.path, libc.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                plan = init.InitPlan(spec=spec, process=spec.process, state=oci_state, cgroup_paths=cgroup.paths,
                                     state_dirfd=dirfd, seccomp_program=seccomp,
                                     seccomp_flags=spec.seccomp.flags if spec.seccomp else 0,
                                     shim_fd=exec_shim.shim_fd(), no_pivot=no_pivot, preserve_fds=preserve_fds,
                                     stdio=stdio, extra_fds=tuple(extra_fds), cgroup_join_files=join_files)
                if console_socket:
                    from . import console

                    plan.console_fd = console.connect(console_socket)
                pid = _spawn(plan, join_new_cgroup, pids,
                             on_message=lambda sock, msg: _create_step(sock, msg, spec, oci_state, pids))
            finally:
                os.close(dirfd)
                if plan.console_fd is not None:
                    os.close(plan.console_fd)
            record["pid"] = pid
            record["pid_start"] = statedir.process_start_time(pid)
            if spec.process.oom_score_adj is not None:
                with open(f"/proc/{pid}/oom_score_adj", "w") as f:
                    f.write(str(spec.process.oom_score_adj))
            record["status"] = CREATED
            sd.save(record)
            if pid_file:
                _write_pid_file(pid_file, pid)
        except BaseException:
            for pid in pids:
                _kill_and_reap(pid)
            if made_cgroup:
                cgroup.kill_all(signals.SIGKILL)
                cgroup.destroy()
            sd.remove()
            raise
        return Container(sd, record)

    def adopt(self, container_id: str, bundle: str, bring_up: Callable[[Spec, Any], int], *,
              pid_file: str | None = None) -> "Container":
        """A running container whose processes `bring_up(spec, cgroup)` provides instead of a fresh init; it returns
        the init's pid. coldbrew.snapshot restores containers with CRIU this way.

        The state directory, the cgroup (made with the spec's limits before bring_up runs) and the record are
        create's; when anything fails they are undone and whatever bring_up left in the cgroup is killed.
        """
        sd, bundle, spec = self._new_container(container_id, bundle)
        from .cgroups import open_cgroup

        cgroup = open_cgroup(spec.cgroups_path, container_id)
        resources = _with_default_devices(spec)
        _, record = _claim(sd, bundle, spec, cgroup, RUNNING, no_pivot=False)
        made_cgroup = False
        pid = None
        try:
            cgroup.create(resources)
            made_cgroup = True
            pid = bring_up(spec, cgroup)
            record["pid"] = pid
            record["pid_start"] = statedir.process_start_time(pid)
            sd.save(record)
            if pid_file:
                _write_pid_file(pid_file, pid)
        except BaseException:
            if made_cgroup:
                cgroup.kill_all(signals.SIGKILL)
                if pid is not None:
                    _kill_and_reap(pid)
                _wait_empty(cgroup)
                cgroup.destroy()
            sd.remove()
            raise
        return Container(sd, record)

    def _new_container(self, container_id: str, bundle: str) -> tuple[statedir.StateDir, str, Spec]:
        """The state directory of a container not there yet (ContainerExists otherwise; nothing is made here), the
        bundle's absolute path and its validated spec."""
        sd = statedir.StateDir(self.root, container_id)
        if sd.exists():
            raise ContainerExists(container_id)
        bundle = os.path.abspath(bundle)
        return sd, bundle, load_bundle(bundle)

    def run(self, container_id: str, bundle: str, **create_options: Any) -> int:
        """create + start + wait + delete, as `runc run`; returns the exit status."""
        container = self.create(container_id, bundle, **create_options)
        try:
            container.start()
            return container.wait(keep=False)
        finally:
            container.delete(force=True)


def _claim(sd: statedir.StateDir, bundle: str, spec: Spec, cgroup: Any, status: str,
           no_pivot: bool) -> tuple[dict, dict]:
    """Make the state directory (ContainerExists if another process made it first); returns the OCI state and the
    record state.json will hold: the OCI state, and what kill, delete and exec need later."""
    try:
        sd.make()
    except FileExistsError:
        raise ContainerExists(sd.id) from None
    oci_state = {"ociVersion": OCI_VERSION, "id": sd.id, "status": status, "pid": 0, "bundle": bundle,
                 "annotations": spec.annotations}
    return oci_state, {**oci_state, "rootfs": spec.root_path, "created": statedir.now_rfc3339(), "owner": "",
            "config": spec.raw, "cgroup": cgroup.paths, "no_pivot": no_pivot, "network": [], "exit_status": None}


def _refuse_host_mount_namespace(spec: Spec) -> None:
    """Joining our own (or the host's) mount namespace by path would make the container's mounts and pivot_root
    change the root of every process in it."""
    ns = spec.namespace("mount")
    if ns is None or ns.path is None:
        return
    target = os.stat(ns.path)
    for own in ("/proc/self/ns/mnt", "/proc/1/ns/mnt"):
        try:
            st = os.stat(own)
        except OSError:
            continue  # no access to pid 1's: our own is the one that matters most
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            raise SpecError(f"linux.namespaces[{spec.namespaces.index(ns)}].path",
                            f"{ns.path} is the runtime's or the host's mount namespace: the container would "
                            "mount over the host and pivot its root")


_SECCOMP_CACHE: dict[str, bytes] = {}
_SECCOMP_CACHE_SIZE = 16


def _compiled_seccomp(spec: Spec) -> bytes | None:
    """The spec's seccomp filter as BPF. Compiling a Docker-style profile takes ~8 ms of libseccomp, and a
    scheduler starts many containers with the same profile: keep the last few programs, keyed by the profile."""
    if spec.seccomp is None:
        return None
    key = cjson.dumps(spec.raw["linux"]["seccomp"], sort_keys=True)
    program = _SECCOMP_CACHE.pop(key, None)
    if program is None:
        program = spec.seccomp.compile()
        if len(_SECCOMP_CACHE) >= _SECCOMP_CACHE_SIZE:
            del _SECCOMP_CACHE[next(iter(_SECCOMP_CACHE))]  # the least recently used
    _SECCOMP_CACHE[key] = program
    return program


def _with_default_devices(spec: Spec) -> Any:
    """The spec's device rules, then the devices every container gets (runc's AllowedDevices).

    As runc does, the spec's own device nodes get no implicit rule: a config that creates one allows it itself.
    """
    from .cgroups.resources import DeviceRule

    resources = spec.resources
    if resources.devices is None:
        return resources
    defaults = (
        DeviceRule(True, "c", None, None, "m"), DeviceRule(True, "b", None, None, "m"),
        DeviceRule(True, "c", 1, 3, "rwm"), DeviceRule(True, "c", 1, 5, "rwm"), DeviceRule(True, "c", 1, 7, "rwm"),
        DeviceRule(True, "c", 1, 8, "rwm"), DeviceRule(True, "c", 1, 9, "rwm"), DeviceRule(True, "c", 5, 0, "rwm"),
        DeviceRule(True, "c", 5, 1, "rwm"), DeviceRule(True, "c", 5, 2, "rwm"), DeviceRule(True, "c", 136, None, "rwm"),
        DeviceRule(True, "c", 10, 200, "rwm"),
    )
    return resources.replace(devices=resources.devices + defaults)


def _checked_extra_fds(extra_fds: Sequence[int]) -> tuple[int, ...]:
    """`extra_fds` as a tuple, each an open descriptor of this process (RuntimeFailure naming the first that is not)."""
    import fcntl

    for fd in extra_fds:
        if type(fd) is not int or fd < 0:
            raise RuntimeFailure(f"extra_fds: {fd!r} is not a descriptor number")
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            raise RuntimeFailure(f"extra_fds: descriptor {fd} is not open") from None
    return tuple(extra_fds)


def _self_join_files(spec: Spec, cgroup: Any) -> tuple[str, ...]:
    """Where a new container's child moves itself into its cgroup, skipping the kernel's global migration lock (see
    Cgroup.self_join_files): it still sees the host's cgroup mounts, as the host's root, unless it entered a user,
    mount or cgroup namespace before it joins."""
    if spec.namespace("user") is not None or any(ns.path and ns.type in ("mount", "cgroup")
                                                 for ns in spec.namespaces):
        return ()
    return cgroup.self_join_files()


def _no_join(child: int) -> None:
    """An exec's child moves itself into the container's cgroup (before it enters the namespaces)."""


def _spawn(plan: init.InitPlan, join_cgroup: Callable[[int], None], pids: list[int], on_message: Any) -> int:
    """Fork the child, call `join_cgroup(pid)` before it goes on (the cgroup made, the child moved there unless it
    moves itself: plan.cgroup_join_files), drive the init protocol; returns the pid of the final process."""
    parent_sock, child_sock = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    child = None
    try:
        if plan.join_pid is None and init.create_pid_namespace_first(plan.spec):
            plan.in_new_pid_ns = True
            child = _fork_into_new_pid_namespace()
        else:
            child = os.fork()
        if child == 0:
            parent_sock.close()
            init.child_main(plan, child_sock)
        pids.append(child)
        child_sock.close()
        join_cgroup(child)
        try:
            init.send(parent_sock, {"go": True})
        except OSError:
            pass  # the child already failed: its error message is still queued for the loop below
        target = child  # unless stage 1 forks a stage 2 and says its pid
        while True:
            try:
                message = init.recv(parent_sock)
            except ConnectionResetError:  # it died with our last message unread (the OOM killer, for one)
                message = None
            if message is None:
                raise RuntimeFailure("the container's init exited before it was ready" + _death_cause(pids))
            if "error" in message:
                raise RuntimeFailure(message["error"])
            if "pid" in message:
                target = message["pid"]
                if target != child:
                    pids.insert(0, target)
                    os.waitpid(child, 0)  # stage 1 exits once it has forked stage 2
                    pids.remove(child)
            elif message.get("ready"):
                return target
            else:
                on_message(parent_sock, message)
    except BaseException:
        if child:
            _kill_strays(child, pids)
        raise
    finally:
        parent_sock.close()
        child_sock.close()


def _fork_into_new_pid_namespace() -> int:
    """os.fork(), the child being pid 1 of a new pid namespace: unshare(CLONE_NEWPID) applies to the calling
    thread's next child only, and setns back to our own namespace undoes it for the children after."""
    own = os.open("/proc/thread-self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc.unshare(libc.CLONE_NEWPID)
        try:
            child = os.fork()
        except BaseException:
            libc.setns(own, libc.CLONE_NEWPID)
            raise
        if child:
            libc.setns(own, libc.CLONE_NEWPID)
        return child
    finally:
        os.close(own)


def _kill_strays(stage1: int, pids: list[int]) -> None:
    """Kill and reap whatever the failed child `stage1` forked, known to us or not (see init.stray_name).

    Stage 2 is our orphan once stage 1 dies (we are the subreaper): killed before it said stage 2's pid (the OOM
    killer, for one), stage 1 would leave a zombie of ours nobody knows of. A reaped pid leaves `pids`.
    """
    name = init.stray_name(stage1).encode()
    deadline = time.monotonic() + 1.0
    while True:
        alive = False
        for pid, fields in statedir.processes_named(name):
            try:
                if fields[0] != b"Z":
                    os.kill(pid, signals.SIGKILL)
                    alive = True
                elif os.waitpid(pid, os.WNOHANG)[0] and pid in pids:
                    pids.remove(pid)
            except (ProcessLookupError, ChildProcessError):
                pass  # gone, or a zombie that is not ours: its parent or the host's init reaps it
        if not alive or time.monotonic() >= deadline:
            return
        time.sleep(0.002)


def _death_cause(pids: list[int]) -> str:
    """How the runtime's child died, for the error message, when it is ours to reap (a signal: usually a memory
    limit too small for the init). A pid reaped here leaves `pids`."""
    deadline = time.monotonic() + 0.5  # the socket closes a moment before the exit status is there
    for pid in list(pids):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
            while not done and time.monotonic() < deadline:
                time.sleep(0.002)
                done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if not done:
            continue
        pids.remove(pid)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            hint = ", out of memory?" if sig == signals.SIGKILL else ""
            return f" (killed by {_signal_name(sig)}{hint})"
        return f" (exit status {os.waitstatus_to_exitcode(status)})"
    return ""


def _create_step(sock: _socket.socket, message: dict, spec: Spec, oci_state: dict, pids: list[int]) -> None:
    if message.get("usermap"):
        pid = pids[-1]
        _write_id_map(f"/proc/{pid}/uid_map", spec.uid_mappings)
        _write_id_map(f"/proc/{pid}/gid_map", spec.gid_mappings)
    elif message.get("hooks"):
        hooks = spec.hooks["prestart"] + spec.hooks["createRuntime"]
        if hooks:
            from .hooks import run_hooks

            run_hooks(hooks, {**oci_state, "pid": pids[0]}, "createRuntime")
    else:
        raise RuntimeFailure(f"unexpected message from the container's init: {message}")
    init.send(sock, {"ok": True})


def _write_id_map(path: str, mappings: tuple) -> None:
    with open(path, "w") as f:
        f.write("".join(f"{m.container_id} {m.host_id} {m.size}\n" for m in mappings))


def _write_pid_file(path: str, pid: int) -> None:
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.rename(tmp, path)


def _kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signals.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


# The processes this process exec'd into each container, keyed by the container's init (pid, start time). They are
# our children (we are their subreaper): see Container._reap_execs.
_EXECS: dict[tuple[int, int | None], list[tuple[int, int | None]]] = {}


class ExecProcess:
    """A process started by :meth:`Container.exec`."""

    __slots__ = ("pid",)

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __repr__(self) -> str:
        return f"ExecProcess(pid={self.pid})"

    def wait(self) -> int:
        return _wait_pid(self.pid)


def _wait_pid(pid: int) -> int | None:
    """The exit status of `pid` if it is our child (or we are its subreaper); otherwise wait for it and say None."""
    try:
        _, status = os.waitpid(pid, 0)
        return _exit_code(status)
    except ChildProcessError:
        pass
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)
    return None


class Container:
    def __init__(self, sd: statedir.StateDir, record: dict) -> None:
        self._dir = sd
        self._record = record

    @property
    def id(self) -> str:
        return self._dir.id

    @property
    def pid(self) -> int:
        return self._record["pid"]

    @property
    def bundle(self) -> str:
        return self._record["bundle"]

    @property
    def exit_status(self) -> int | None:
        return self._record.get("exit_status")

    @property
    def cgroup_paths(self) -> dict[str, str]:
        """The container's cgroup directory in each hierarchy ("unified" is cgroup v2's)."""
        return dict(self._record["cgroup"])

    def locked(self) -> Any:
        """A context manager that keeps other coldbrew processes from changing the container meanwhile."""
        return self._dir.locked()

    def _alive(self) -> bool:
        start = statedir.process_start_time(self.pid)
        return start is not None and start == self._record.get("pid_start")

    def _cgroup(self) -> Any:
        from .cgroups import from_paths

        return from_paths(self._record["cgroup"])

    @property
    def status(self) -> str:
        if not self._alive():
            return STOPPED
        if os.path.exists(self._dir.fifo):
            return CREATED
        if self._cgroup().frozen():
            return PAUSED
        return RUNNING

    def state(self) -> dict:
        """The OCI state: what `coldbrew state` prints."""
        status = self.status
        r = self._record
        return {"ociVersion": OCI_VERSION, "id": self.id, "pid": self.pid if status != STOPPED else 0,
                "status": status, "bundle": r["bundle"], "rootfs": r["rootfs"], "created": r["created"],
                "owner": r.get("owner", ""), "annotations": r.get("annotations") or {}}

    def spec(self) -> Spec:
        return parse(self._record["config"], self.bundle)

    def start(self) -> None:
        """Let the created container's init exec its program (runc's exec fifo handshake)."""
        with self._dir.locked():
            status = self.status
            if status != CREATED:
                raise InvalidState(f"cannot start container {self.id}: it is {status}, not created")
            fd = os.open(self._dir.fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                while True:
                    ready, _, _ = select.select([fd], [], [], 0.1)
                    if ready:
                        data = os.read(fd, 1)
                        if data == b"0":
                            break
                    if not self._alive():
                        raise RuntimeFailure(f"container {self.id}: its init exited before start")
            finally:
                os.close(fd)
            os.unlink(self._dir.fifo)
        hooks = self.spec_hooks("poststart")
        if hooks:
            from .hooks import run_hooks

            run_hooks(hooks, self.state(), "poststart")

    def wait(self, *, keep: bool = True) -> int | None:
        """Block until the container's init exits; its exit status, kept in the state for `delete` (unless not
        `keep`: the caller deletes the container next and has the status already)."""
        if self._reap_execs():
            try:
                fd = os.pidfd_open(self.pid)
            except ProcessLookupError:
                fd = None
            if fd is not None:
                try:  # poll while exec'd processes of ours may hold the init's exit (see _reap_execs)
                    while not select.select([fd], [], [], 0.05)[0] and self._reap_execs():
                        pass
                finally:
                    os.close(fd)
        code = _wait_pid(self.pid)
        if code is not None:
            self._record["exit_status"] = code
            if keep and self._dir.exists():
                self._dir.save(self._record)
        return code

    def _reap_execs(self, *, dead: bool = False) -> bool:
        """Reap the processes we exec'd into the container once its init is exiting; True while some are left.

        They are our children (we are their subreaper), and a pid namespace's init does not finish exiting until
        every process of its namespace is reaped: whoever waits for the init must reap them, or the two would wait
        for each other for ever. While the init runs they are left to ExecProcess.wait(). `dead`: the container is
        gone, reap them all (they were killed with it).
        """
        key = (self.pid, self._record.get("pid_start"))
        if key not in _EXECS:
            return False
        reap = dead or statedir.process_exiting(*key)
        deadline = time.monotonic() + (1.0 if dead else 0.0)  # killed with the container: give them a moment
        left = []
        for pid, start in _EXECS.pop(key, ()):
            while start is not None and statedir.process_start_time(pid, zombies=True) == start:  # not reaped yet
                if not reap:
                    left.append((pid, start))
                    break
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break  # not ours to reap
                if time.monotonic() >= deadline:
                    left.append((pid, start))
                    break
                time.sleep(0.002)
        if left:
            _EXECS[key] = left
        return bool(left)

    def _reap_init(self) -> bool:
        """Reap the init if it is our child and has exited (it may be a zombie of ours though the state says
        stopped); True once it is gone."""
        start = self._record.get("pid_start")
        if statedir.process_start_time(self.pid, zombies=True) != start:
            return True  # reaped already (the pid may have been reused since: leave that process alone)
        try:
            done, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return statedir.process_exiting(self.pid, start)  # not ours: "exiting" is as far as we can see it
        if done:
            self._record["exit_status"] = _exit_code(status)
        return bool(done)

    def _wait_dying(self, timeout: float = 10.0) -> None:
        """After SIGKILL: reap the init if it is ours, else wait until it is gone or at least exiting.

        A pid namespace's init stays in exit until every process of the namespace is reaped, including `exec`'d
        ones whose parent is outside it (a shim, or us): we reap ours meanwhile; waiting for more than "exiting"
        of an init that is not ours could wait forever.
        """
        deadline = time.monotonic() + timeout
        while not self._reap_init() and time.monotonic() < deadline:
            self._reap_execs()
            time.sleep(0.002)

    async def wait_async(self) -> int | None:
        """:meth:`wait` for trio or asyncio: the pidfd becomes readable when the init exits."""
        fd = os.pidfd_open(self.pid)
        try:
            try:
                import sniffio

                library = sniffio.current_async_library()
            except ImportError:
                library = "asyncio"
            if library == "trio":
                import trio

                sleep, wait_readable = trio.sleep, trio.lowlevel.wait_readable
            else:
                import asyncio

                sleep, wait_readable = asyncio.sleep, _asyncio_readable
            while self._reap_execs():  # exec'd processes of ours may hold the init's exit: poll (see wait)
                if select.select([fd], [], [], 0)[0]:
                    break
                await sleep(0.05)
            else:
                await wait_readable(fd)
        finally:
            os.close(fd)
        return self.wait()

    def kill(self, signal: int | str = signals.SIGTERM, *, all_processes: bool = False) -> None:
        sig = parse_signal(signal)
        if not self._alive():
            raise NotRunning(self.id)
        if all_processes:
            self._cgroup().kill_all(sig)
            return
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            raise NotRunning(self.id) from None

    def exec(self, process: Process, *, console_socket: str | None = None, pid_file: str | None = None,
             preserve_fds: int = 0, stdio: tuple[int, int, int] | None = None) -> ExecProcess:
        """Start another process in the running container's namespaces and cgroup."""
        status = self.status
        if status not in (RUNNING, CREATED):
            raise InvalidState(f"cannot exec in container {self.id}: it is {status}")
        if process.terminal and not console_socket:
            raise RuntimeFailure("process.terminal is true: a --console-socket is needed to hand over the terminal")
        spec = self.spec()
        seccomp = _compiled_seccomp(spec)
        cgroup = self._cgroup()
        plan = init.InitPlan(spec=spec, process=process, state=self.state(), cgroup_paths=self._record["cgroup"],
                             seccomp_program=seccomp, seccomp_flags=spec.seccomp.flags if spec.seccomp else 0,
                             shim_fd=exec_shim.shim_fd(), preserve_fds=preserve_fds, join_pid=self.pid,
                             stdio=stdio, cgroup_join_files=cgroup.self_join_files())
        if console_socket:
            from . import console

            plan.console_fd = console.connect(console_socket)
        pids: list[int] = []
        try:
            pid = _spawn(plan, _no_join if plan.cgroup_join_files else cgroup.add_process, pids,
                         on_message=_unexpected)
        except BaseException:
            for p in pids:
                _kill_and_reap(p)
            raise
        finally:
            if plan.console_fd is not None:
                os.close(plan.console_fd)
        _EXECS.setdefault((self.pid, self._record.get("pid_start")), []).append(
            (pid, statedir.process_start_time(pid, zombies=True)))
        if pid_file:
            _write_pid_file(pid_file, pid)
        return ExecProcess(pid)

    def pause(self) -> None:
        with self._dir.locked():
            if self.status != RUNNING:
                raise InvalidState(f"cannot pause container {self.id}: it is {self.status}")
            self._cgroup().freeze()

    def resume(self) -> None:
        with self._dir.locked():
            if self.status != PAUSED:
                raise InvalidState(f"cannot resume container {self.id}: it is {self.status}, not paused")
            self._cgroup().thaw()

    def update(self, resources: dict) -> None:
        from .cgroups import Resources

        if not self._alive():
            raise NotRunning(self.id)
        self._cgroup().update(Resources.from_spec(resources, "resources"))

    def stats(self) -> dict:
        if not self._alive():
            raise NotRunning(self.id)
        return self._cgroup().stats()

    def processes(self) -> list[int]:
        return sorted(self._cgroup().pids())

    def attach_network(self, **options: Any) -> dict:
        """Attach the container's network namespace to a bridge (see coldbrew.runtime.network.attach)."""
        from . import network

        if not self._alive():
            raise NotRunning(self.id)
        with self._dir.locked():
            attachment = network.attach(f"/proc/{self.pid}/ns/net", **options)
            self._record["network"].append(attachment.to_dict())
            self._dir.save(self._record)
        return attachment.to_dict()

    def delete(self, *, force: bool = False) -> int | None:
        """Remove the container and everything made for it; returns the init's exit status when it is known."""
        with self._dir.locked():
            status = self.status
            if status in (RUNNING, PAUSED) and not force:
                raise InvalidState(f"cannot delete container {self.id} that is not stopped: {status}")
            cgroup = self._cgroup()
            if status != STOPPED:
                cgroup.kill_all(signals.SIGKILL)
                try:
                    os.kill(self.pid, signals.SIGKILL)
                except ProcessLookupError:
                    pass
            self._wait_dying()  # also a stopped init may still be a zombie of ours
            _wait_empty(cgroup)
            self._reap_execs(dead=True)
            hooks = self.spec_hooks("poststop")
            failure = None
            if hooks:
                from .hooks import run_hooks

                try:
                    run_hooks(hooks, {**self.state(), "status": STOPPED}, "poststop")
                except RuntimeFailure as e:
                    failure = e  # cleanup goes on; the failure is reported after it
            if self._record.get("network"):
                from . import network

                for item in self._record["network"]:
                    network.detach(network.Attachment.from_dict(item))
            cgroup.destroy()
            self._dir.remove()
        if failure:
            raise failure
        return self._record.get("exit_status")

    def spec_hooks(self, stage: str) -> tuple:
        if not (self._record["config"].get("hooks") or {}).get(stage):
            return ()
        try:
            return self.spec().hooks[stage]
        except SpecError:
            return ()  # the bundle is gone: hooks whose spec no longer validates cannot run


async def _asyncio_readable(fd: int) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, done.set_result, None)
    try:
        await done
    finally:
        loop.remove_reader(fd)


def _wait_empty(cgroup: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while cgroup.pids() and time.monotonic() < deadline:
        cgroup.kill_all(signals.SIGKILL)
        time.sleep(0.005)


def _unexpected(sock: _socket.socket, message: dict) -> None:
    raise RuntimeFailure(f"unexpected message from the exec'd process: {message}")

