"""Checkpoint and restore of coldbrew containers with CRIU, as runc does it (libcontainer's criu_linux.go).

Dump: CRIU freezes the container's cgroup and writes its process tree, namespaces and mounts to the image directory.
What is not the container's own is declared external, and coldbrew's record in the snapshot says how to provide it
again: bind mounts from the bundle, the container's cgroup directories bound on /sys/fs/cgroup (cgroup v1), masked
files (binds of /dev/null), and the init's descriptors that lead outside (stdio: pipes, host files).

Restore: the container's state directory and cgroup are made as `create` makes them (Runtime.adopt); CRIU runs in
that cgroup (so the restored tasks land there, with CRIU's cgroup roots rewritten to it) and in a mount namespace of
its own, where the bundle's root is bind-mounted for it (CRIU needs the root to be a mount point): nothing is mounted
on the host, so nothing is left behind whatever happens. The init comes back as our child (rst_sibling) in new
namespaces, and is then an ordinary coldbrew container: state, exec, kill and delete work on it.

GPU memory (coldbrew.snapshot.cuda): the container's processes that hold an NVIDIA GPU are locked and checkpointed by
the CUDA driver before CRIU freezes the container (their GPU memory moves into their host memory, which CRIU dumps),
and restored and unlocked after CRIU has brought them back; a failed dump, --leave-running and --pre-dump give them
their GPU state back at once. The record says whether GPU state is inside, and the driver and GPUs it came from: a
restore under another driver or onto another GPU model is refused before anything is made. CRIU runs with no plugins
(an empty libdir): its cuda_plugin would otherwise lock and restore the same processes a second time.
"""

from __future__ import annotations

import os
import platform
import shutil
import stat
import tempfile
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ..runtime.container import Container, Runtime
    from ..runtime.spec import Spec

from ..runtime import libc
from ..runtime.errors import InvalidState, RuntimeFailure
from . import criu as criu_mod, cuda, filepages, image, rpc
from .errors import CriuError, CudaError, SnapshotError

DUMP_LOG, PRE_DUMP_LOG, RESTORE_LOG = "dump.log", "pre-dump.log", "restore.log"
_LOG_LEVEL = 4  # CRIU's most detailed: the log is what explains a failure
_MASK_NULL = "/dev/null"  # the external-mount key of masked files, as runc names it


def _criu(setting: str | criu_mod.Criu | None) -> criu_mod.Criu:
    return setting if isinstance(setting, criu_mod.Criu) else criu_mod.find(setting)


def _cgroup_mode(mode: str | None) -> int | None:
    if not mode:
        return None
    if mode not in rpc.CGROUP_MODES:
        raise RuntimeFailure(f"--manage-cgroups-mode {mode!r}: give one of {', '.join(rpc.CGROUP_MODES)}")
    return rpc.CGROUP_MODES[mode]


def _criu_config(scratch: str, work_dir: str | None = None) -> str:
    """A CRIU configuration file in `scratch`: no plugins (libdir: an empty directory), and `work_dir` if given."""
    plugins = os.path.join(scratch, "no-plugins")
    os.mkdir(plugins, 0o700)
    path = os.path.join(scratch, "criu.conf")
    with open(path, "w") as f:
        f.write(f'libdir "{plugins}"\n')
        if work_dir:
            f.write(f'work-dir "{work_dir}"\n')
    return path


def _timed(timings: dict[str, float] | None, step: str, started: float) -> None:
    if timings is not None:
        timings[step] = time.perf_counter() - started


def _open_dir(path: str, what: str, *, create: bool) -> int:
    if create:
        os.makedirs(path, 0o700, exist_ok=True)
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotError(f"{what} {path} does not exist") from None
    except NotADirectoryError:
        raise SnapshotError(f"{what} {path} is not a directory") from None


# ---- checkpoint ----------------------------------------------------------------------------------------------------

def snapshot(container: Container, image_path: str, *, work_path: str | None = None,
             parent_path: str | None = None, leave_running: bool = False, pre_dump: bool = False,
             tcp_established: bool = False, ext_unix_sk: bool = False, shell_job: bool = False,
             file_locks: bool = False, manage_cgroups_mode: str | None = None,
             criu: str | criu_mod.Criu | None = None, gpu_lock_timeout_ms: int = cuda.DEFAULT_LOCK_TIMEOUT_MS,
             timings: dict[str, float] | None = None) -> image.Snapshot:
    """Checkpoint a running (or paused) container into `image_path`, which must be empty or new.

    Without `leave_running` the container's processes end with the dump and the container is deleted (runc's
    checkpoint does the same); a failed dump leaves it running. `pre_dump` writes memory only and leaves it
    running: a later dump with `parent_path` (a pre-dump's directory, relative to `image_path` or absolute) writes
    only what changed since, where the kernel tracks dirty memory (CONFIG_MEM_SOFT_DIRTY; CRIU's mem_track feature).
    Where it does not, CRIU cannot pre-dump at all: the pre-dump is then a full dump taken without stopping the
    container, and the final dump is complete in itself, with no link to it: the steps work, they save nothing.

    Processes holding an NVIDIA GPU have their GPU memory checkpointed into the images too (see the module's
    docstring); `gpu_lock_timeout_ms` bounds the wait for their submitted GPU work. `timings`, if given, receives the
    seconds of each step: cuda_checkpoint, criu_dump or criu_pre_dump, cuda_restore.
    """
    tool = _criu(criu)
    cgroup_mode = _cgroup_mode(manage_cgroups_mode)
    image_path = os.path.abspath(image_path)
    with container.locked():
        status = container.status
        if status not in ("running", "paused"):
            raise InvalidState(f"cannot checkpoint container {container.id}: it is {status}, not running")
        processes = container.processes()
        gpu_pids = cuda.cuda_pids(processes)
        if gpu_pids and status == "paused":
            raise InvalidState(f"cannot checkpoint container {container.id}: it is paused, and the CUDA driver "
                               f"checkpoints the GPU memory of its processes {gpu_pids} from inside them: resume it")
        gpu = _gpu_entry(gpu_pids, len(processes))  # loads the driver: CudaUnavailable before anything changes
        spec = container.spec()
        if os.path.isdir(image_path) and os.listdir(image_path):
            raise SnapshotError(f"image path {image_path} is not empty: give a new or empty directory")
        track_mem = tool.features().get("mem_track", False)
        incremental_pre_dump = pre_dump and track_mem
        parent = None
        if parent_path:
            parent_dir = os.path.normpath(os.path.join(image_path, parent_path))
            parent = os.path.relpath(parent_dir, image_path)  # CRIU's link: relative, so the pair can move
            if not os.path.isdir(parent_dir):
                raise SnapshotError(f"parent path {parent_path} is not a directory (it is taken relative to the "
                                    f"image path {image_path})")
            # refuse a corrupt or unsuitable parent now, not at restore
            if image.Snapshot.open(parent_dir).kind != image.PRE_DUMP:
                raise SnapshotError(f"parent path {parent_path} is not a pre-dump: checkpoint with --pre-dump first")
            if not track_mem:
                parent = None  # CRIU would look for memory tracking data the pre-dump could not record
        images = _open_dir(image_path, "image path", create=True)
        work = _open_dir(os.path.abspath(work_path), "work path", create=True) if work_path else None
        held: dict[str, int] = {}
        scratch = None
        gpu_checkpointed = False
        try:
            scratch = tempfile.mkdtemp(prefix=f"coldbrew-dump-{container.id}-")
            if gpu_pids:
                started = time.perf_counter()
                cuda.checkpoint_gpu(gpu_pids, gpu_lock_timeout_ms)
                gpu_checkpointed = True
                _timed(timings, "cuda_checkpoint", started)
            opts: dict[str, Any] = {
                "images_dir_fd": images, "log_level": _LOG_LEVEL, "pid": container.pid,
                "log_file": PRE_DUMP_LOG if pre_dump else DUMP_LOG,
                "leave_running": leave_running or pre_dump, "tcp_established": tcp_established,
                "ext_unix_sk": ext_unix_sk, "shell_job": shell_job, "file_locks": file_locks,
                "manage_cgroups": True, "manage_cgroups_mode": cgroup_mode, "orphan_pts_master": True,
                "root": spec.root_path, "parent_img": parent, "track_mem": (track_mem and (pre_dump or parent)) or None,
                "freeze_cgroup": _freezer(container.cgroup_paths), "config_file": _criu_config(scratch),
            }
            if not tcp_established and _private_loopback_only(spec, container.pid):
                opts["network_lock"] = rpc.NETWORK_LOCK_SKIP
            if work is not None:
                opts["work_dir_fd"] = work
            record: dict[str, Any] = {
                "kind": image.PRE_DUMP if pre_dump else image.DUMP, "incremental": bool(opts["track_mem"]),
                "container": {"id": container.id, "bundle": container.bundle, "rootfs": spec.root_path,
                              "config": spec.raw},
                "criu": tool.version_string, "kernel": platform.release(), "machine": platform.machine(),
                "mounts": [], "descriptors": {}, "gpu": gpu,
            }
            if not incremental_pre_dump:  # a real pre-dump writes memory only: no mounts or files to declare
                mounts = _external_mounts(spec, container.cgroup_paths, container.pid)
                descriptors, external_files = _external_descriptors(container)
                opts["ext_mnt"] = [{"key": m["key"], "val": _MASK_NULL if m["kind"] == "null" else m["key"]}
                                   for m in mounts]
                opts["external"] = external_files
                record["mounts"], record["descriptors"] = mounts, descriptors
                if not opts["leave_running"]:
                    held = _hold_regular_files(container.pid, descriptors)
            if not pre_dump:
                filepages.record(image_path, processes)  # before CRIU: without --leave-running they end with it
            request = {"type": rpc.PRE_DUMP if incremental_pre_dump else rpc.DUMP, "opts": opts}
            # CRIU opens the image and work directories through our /proc/PID/fd: they stay open here meanwhile
            started = time.perf_counter()
            tool.call(request, log=(work if work is not None else images, opts["log_file"]))
            _timed(timings, "criu_pre_dump" if pre_dump else "criu_dump", started)
            for fd, handle in held.items():
                # CRIU restores a regular file only onto one of the size it had: the tasks ended with the dump
                record["descriptors"][fd]["size"] = os.fstat(handle).st_size
        except BaseException as error:
            if gpu_checkpointed:  # CRIU let the container go on: its CUDA processes get their GPU state back
                _give_gpu_back(gpu_pids, error)
            raise
        finally:
            os.close(images)
            if work is not None:
                os.close(work)
            for handle in held.values():
                os.close(handle)
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        image.write_record(image_path, record)
        if gpu_checkpointed and (leave_running or pre_dump):
            started = time.perf_counter()
            try:
                cuda.restore_gpu(gpu_pids)
            except CudaError as e:
                left = (f"the snapshot {image_path} is complete, but the container's CUDA processes {gpu_pids} stay "
                        "checkpointed")
                raise CudaError(e.function, e.code, e.name, e.pid, f"{e.hint}; {left}" if e.hint else left) from e
            _timed(timings, "cuda_restore", started)
    if not (leave_running or pre_dump):
        container.delete(force=True)  # its processes ended with the dump; what is left is the bookkeeping
    return image.Snapshot.open(image_path, verify=False)


def _gpu_entry(gpu_pids: list[int], count: int) -> dict[str, Any]:
    """The record's "gpu" entry (see image.Snapshot.gpu) for a container of `count` processes, `gpu_pids` of them
    holding a GPU."""
    if not gpu_pids:
        return {"inside": False, "note": f"no GPU state: none of the container's {count} processes has an NVIDIA "
                                         "device (/dev/nvidia*) open or mapped"}
    return {"inside": True, "note": f"GPU memory of {len(gpu_pids)} CUDA process(es), checkpointed by the CUDA "
                                    "driver into their host memory",
            "processes": [cuda.ns_pid(pid) for pid in gpu_pids], **cuda.gpu_record(gpu_pids)}


def _give_gpu_back(gpu_pids: list[int], error: BaseException) -> None:
    """After a failed dump: restore and unlock the container's CUDA processes, so it keeps running on its GPUs."""
    try:
        cuda.restore_gpu(gpu_pids)
    except CudaError as e:
        raise SnapshotError(f"{error}\nand giving the container's CUDA processes {gpu_pids} their GPU state back "
                            f"failed: {e}") from error


def _freezer(cgroup_paths: dict[str, str]) -> str | None:
    """The cgroup CRIU freezes the container with (a v1 freezer, or the v2 cgroup); None: it stops each task."""
    return cgroup_paths.get("freezer") or cgroup_paths.get("unified")


def _private_loopback_only(spec: Spec, pid: int) -> bool:
    """Whether the container has a network namespace of its own (not one joined by path) with no interface but
    loopback; `pid`: its init.

    CRIU locks a network namespace it dumps with iptables rules, set and removed again by running iptables-restore
    several times at the dump and at every restore of it (about 100 ms of each here). The lock keeps packets off
    sockets while they are half dumped or half restored. Where only loopback exists, the namespace is the
    container's alone and no established TCP connection is dumped, only the container's own processes could send
    such packets, and they are frozen.
    """
    network = spec.namespace("network")
    if network is None or network.path is not None:
        return False
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            interfaces = {line.split(":", 1)[0].strip() for line in f.read().splitlines()[2:]}
    except OSError:
        return False
    return interfaces == {"lo"}


def _external_mounts(spec: Spec, cgroup_paths: dict[str, str], pid: int) -> list[dict]:
    """The container's mounts of things outside it, as runc declares them: {key, kind, and what restore needs}."""
    mounts = []
    new_cgroupns = any(ns.type == "cgroup" and ns.path is None for ns in spec.namespaces)
    for m in spec.mounts:
        if m.type == "cgroup":
            # rootfs._mount_cgroups: v2 gets a fresh cgroup2 mount in a cgroup namespace (CRIU dumps that itself),
            # else a bind of the container's cgroup; v1 a tmpfs with a bind per hierarchy
            if set(cgroup_paths) == {"unified"}:
                if not new_cgroupns:
                    mounts.append({"key": m.destination, "kind": "cgroup", "hierarchy": "unified"})
            else:
                mounts += [{"key": os.path.join(m.destination, name), "kind": "cgroup", "hierarchy": name}
                           for name in sorted(cgroup_paths) if name != "unified"]
        elif m.is_bind:
            mounts.append({"key": m.destination, "kind": "bind", "source": m.source})
    for path in spec.masked_paths:
        try:
            if not os.path.isdir(f"/proc/{pid}/root{path}"):  # a file masked by a bind of /dev/null
                if os.path.exists(f"/proc/{pid}/root{path}"):
                    mounts.append({"key": path, "kind": "null"})
        except OSError:
            continue
    if spec.namespace("user") is not None:  # there rootfs binds the host's device nodes instead of mknod
        from ..runtime.rootfs import DEFAULT_DEVICES

        mounts += [{"key": d.path, "kind": "device"} for d in (*DEFAULT_DEVICES, *spec.devices)]
    return mounts


def _mount_ids(pid: int) -> set[int]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return {int(line.split(None, 1)[0]) for line in f}


def _fd_key(pid: int, fd: int, inside: set[int]) -> tuple[str | None, bool, int]:
    """(CRIU's key for the descriptor if it leads outside the container, whether it must be declared external,
    its file type bits)."""
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            info = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None, False, 0  # closed meanwhile
    kind = stat.S_IFMT(st.st_mode)
    if target.startswith("pipe:"):
        return target, False, kind  # CRIU matches a pipe to a descriptor given at restore by this name by itself
    if not target.startswith("/"):
        return None, False, kind  # sockets, anon inodes: CRIU dumps them or says why it cannot
    mnt_id = int(info.get("mnt_id", "-1").strip())
    if mnt_id in inside:
        return None, False, kind
    return f"file[{mnt_id:x}:{st.st_ino:x}]", True, kind


def _hold_regular_files(pid: int, descriptors: dict[str, dict]) -> dict[str, int]:
    """{fd: an O_PATH descriptor of the same file} for the init's external descriptors that are regular files."""
    held = {}
    for fd, entry in descriptors.items():
        if entry["type"] == stat.S_IFREG:
            try:
                held[fd] = os.open(f"/proc/{pid}/fd/{fd}", libc.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # closed meanwhile: CRIU will not see it either
    return held


def _external_descriptors(container: Container) -> tuple[dict[str, dict], list[str]]:
    """({init's fd number: {key, type}} for its descriptors leading outside, the external files to declare).

    Only the runtime gives the container descriptors from outside (its stdio, preserved fds) and its processes
    inherit them: every process is looked at, so that a child holding one does not fail the dump.
    """
    inside = _mount_ids(container.pid)
    descriptors: dict[str, dict] = {}
    external: set[str] = set()
    for pid in container.processes():
        try:
            fds = sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        for fd in fds:
            key, declare, kind = _fd_key(pid, fd, inside)
            if key is None:
                continue
            if declare:
                external.add(key)
            if pid == container.pid:
                descriptors[str(fd)] = {"key": key, "type": kind}
    return descriptors, sorted(external)


# ---- restore -------------------------------------------------------------------------------------------------------

def restore(runtime: Runtime, snapshot: image.Snapshot | str, container_id: str, bundle: str | None = None, *,
            work_path: str | None = None, stdio: tuple[int, int, int] | None = None,
            console_socket: str | None = None, pid_file: str | None = None, tcp_established: bool = False,
            ext_unix_sk: bool = False, shell_job: bool = False, file_locks: bool = False,
            manage_cgroups_mode: str | None = None, criu: str | criu_mod.Criu | None = None,
            timings: dict[str, float] | None = None) -> Container:
    """Bring a checkpointed container back as `container_id`, running, from the bundle it was made from or `bundle`.

    The snapshot is checked first (every image file against the digests written with it): a corrupt one is refused.
    `stdio` (by default this process's 0, 1, 2) stands in for the init's descriptors that led outside the container
    when it was dumped. A restore can be repeated from one snapshot under other container ids.

    GPU state in the snapshot goes back onto this host's GPUs once CRIU has restored the processes; this host must run
    the same NVIDIA driver and have the same GPU model, which is checked first. `timings`, if given, receives the
    seconds of each step: criu_restore, cuda_restore.
    """
    snap = snapshot if isinstance(snapshot, image.Snapshot) else image.Snapshot.open(snapshot)
    if snap.kind != image.DUMP:
        raise SnapshotError(f"snapshot {snap.path} is a pre-dump (memory only): restore from the checkpoint made "
                            "after it with --parent-path")
    gpu = snap.gpu
    gpu_plan = cuda.plan_restore(gpu) if gpu["inside"] else None  # refused here, before anything is made
    tool = _criu(criu)
    cgroup_mode = _cgroup_mode(manage_cgroups_mode)
    bundle = bundle or snap.bundle
    stdio = stdio if stdio is not None else (0, 1, 2)

    def bring_up(spec: Spec, cgroup: Any) -> int:
        if spec.process is not None and spec.process.terminal and not console_socket:
            raise RuntimeFailure("process.terminal is true: a --console-socket is needed to hand over the terminal")
        ext_mnt = _restore_mounts(snap, spec, cgroup.paths)
        inherit = _inherit_fds(snap, stdio)
        scratch = tempfile.mkdtemp(prefix=f"coldbrew-restore-{container_id}-")
        reading_ahead = filepages.read_ahead(snap.path, spec)
        try:
            root = os.path.join(scratch, "root")
            os.mkdir(root, 0o755)
            work_dir = os.path.abspath(work_path) if work_path else scratch
            options = {"tcp_established": tcp_established, "ext_unix_sk": ext_unix_sk, "shell_job": shell_job,
                       "file_locks": file_locks, "manage_cgroups_mode": cgroup_mode}
            started = time.perf_counter()
            pid = _run_restore(tool, snap, spec, cgroup, scratch, work_dir, root, ext_mnt, inherit, stdio,
                               console_socket, options)
            _timed(timings, "criu_restore", started)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            reading_ahead.join()
        if gpu_plan is not None:
            driver, gpu_pairs = gpu_plan
            started = time.perf_counter()
            try:
                cuda.restore_gpu(_host_pids(cgroup.pids(), gpu["processes"]), gpu_pairs, driver=driver)
            except BaseException:
                _reap(pid)  # adopt kills the rest of the container; its init is our child to collect
                raise
            _timed(timings, "cuda_restore", started)
        return pid

    return runtime.adopt(container_id, bundle, bring_up, pid_file=pid_file)


def _host_pids(pids: list[int], wanted: list[int]) -> list[int]:
    """The host pids, among `pids`, of the processes numbered `wanted` in the container's pid namespace."""
    found = {}
    for pid in pids:
        try:
            found[cuda.ns_pid(pid)] = pid
        except OSError:
            continue  # ended meanwhile
    missing = [number for number in wanted if number not in found]
    if missing:
        raise SnapshotError(f"the restored container lacks the CUDA processes {missing} (pids in its namespace) "
                            "whose GPU state the snapshot holds")
    return [found[number] for number in wanted]


def _restore_mounts(snap: image.Snapshot, spec: Spec, cgroup_paths: dict[str, str]) -> list[dict]:
    """CRIU's external-mount map for restore: each key the dump declared, to what provides it here."""
    binds = {m.destination: m.source for m in spec.mounts if m.is_bind}
    result = []
    for mount in snap.record["mounts"]:
        key, kind = mount["key"], mount["kind"]
        if kind == "bind":
            if key not in binds:
                raise SnapshotError(f"snapshot {snap.path} has a bind mount at {key}; the bundle's config.json has "
                                    "no bind mount there")
            value = binds[key]
        elif kind == "cgroup":
            hierarchy = mount["hierarchy"]
            if hierarchy not in cgroup_paths:
                raise SnapshotError(f"snapshot {snap.path} was made with the {hierarchy} cgroup hierarchy, which "
                                    "this host's container cgroup does not have")
            value = cgroup_paths[hierarchy]
        elif kind == "null":
            key = value = _MASK_NULL  # all masked files share runc's one key
        elif kind == "device":
            value = key
        else:
            raise SnapshotError(f"snapshot {snap.path}: unknown external mount kind {kind!r}")
        entry = {"key": key, "val": value}
        if entry not in result:
            result.append(entry)
    return result


_STDIO_NAMES = ("stdin", "stdout", "stderr")
_TYPE_NAMES = {stat.S_IFREG: "a regular file", stat.S_IFCHR: "a character device", stat.S_IFIFO: "a pipe",
               stat.S_IFSOCK: "a socket", stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}


def _inherit_fds(snap: image.Snapshot, stdio: tuple[int, int, int]) -> list[dict]:
    """The init's stdio that led outside, each given the descriptor of `stdio` with its number.

    CRIU puts a file back only onto a file of the same type (and a regular file of the same size): say so here
    rather than with CRIU's log.
    """
    inherit = []
    seen = set()
    for fd, entry in sorted(snap.record["descriptors"].items(), key=lambda item: int(item[0])):
        number = int(fd)
        if number > 2 or entry["key"] in seen:
            continue
        seen.add(entry["key"])
        if not entry["key"].startswith("pipe:"):
            st = os.fstat(stdio[number])
            given = stat.S_IFMT(st.st_mode)
            name = _STDIO_NAMES[number]
            if given != entry["type"]:
                raise SnapshotError(
                    f"the container's {name} was {_TYPE_NAMES.get(entry['type'], 'a file')} outside it when it was "
                    f"checkpointed; the one given for the restore is {_TYPE_NAMES.get(given, 'another kind of file')}"
                    ": CRIU puts it back only onto the same kind (give containers pipes as stdio to be free here)")
            if "size" in entry and st.st_size != entry["size"]:
                raise SnapshotError(
                    f"the container's {name} was a regular file of {entry['size']} bytes outside it when it was "
                    f"checkpointed; the one given for the restore has {st.st_size}: CRIU puts it back only onto a "
                    "file of the same size (give containers pipes as stdio to be free here)")
        inherit.append({"key": entry["key"], "fd": number})
    return inherit


def _cgroup_roots(pid: int) -> list[dict]:
    """CRIU's cgroup roots: where `pid` (CRIU, moved into the container's cgroup) is, per hierarchy (runc's way)."""
    roots = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            roots.append({"ctrl": controllers, "path": path})
    return roots


def _private_root(source: str, target: str, readonly: bool) -> Any:
    """For CRIU's process before it execs: a mount namespace of its own, the container's root bound at `target`.

    CRIU needs the restored root to be a mount point; bound in CRIU's own namespace it disappears with CRIU. The
    bind carries the root's read-only flag, which CRIU keeps for the restored root mount.
    """
    def preexec() -> None:
        libc.unshare(libc.CLONE_NEWNS)
        libc.mount(None, "/", None, libc.MS_REC | libc.MS_SLAVE)
        libc.mount(source, target, None, libc.MS_BIND | libc.MS_REC)
        if readonly:
            libc.mount(None, target, None, libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY)

    return preexec


def _run_restore(tool: criu_mod.Criu, snap: image.Snapshot, spec: Spec, cgroup: Any, scratch: str, work_dir: str,
                 root: str, ext_mnt: list[dict], inherit: list[dict], stdio: tuple[int, int, int],
                 console_socket: str | None, options: dict) -> int:
    work = _open_dir(work_dir, "work path", create=True)  # here only to read CRIU's log
    try:
        images = _open_dir(snap.path, "snapshot", create=False)
    except BaseException:
        os.close(work)
        raise
    # The work directory goes to CRIU by path, in a configuration file: over RPC it takes a descriptor, which CRIU
    # opens through our /proc/PID/fd, in our mount namespace, where it cannot mount its cgroup yard.
    config = _criu_config(scratch, work_dir)
    opts: dict[str, Any] = {
        "images_dir_fd": images, "config_file": config, "log_level": _LOG_LEVEL, "log_file": RESTORE_LOG,
        "root": root, "rst_sibling": True, "evasive_devices": True, "manage_cgroups": True,
        "notify_scripts": True, "orphan_pts_master": True, "ext_mnt": ext_mnt, "inherit_fd": inherit, **options,
    }
    request = {"type": rpc.RESTORE, "opts": opts}
    restored: list[int] = []  # the root task, once a notification names it: ours to reap if CRIU fails after

    def on_start(pid: int) -> None:
        cgroup.add_process(pid)  # CRIU's tasks are born in the container's cgroup
        opts["cg_root"] = _cgroup_roots(pid)

    def on_notify(script: str, pid: int, fds: list[int]) -> None:
        if pid and not restored:
            restored.append(pid)
        if script == "orphan-pts-master" and fds and console_socket:
            from ..runtime import console

            sock = console.connect(console_socket)
            try:
                console.send_fd(sock, fds[0])
            finally:
                os.close(sock)

    try:
        response = tool.call(request, stdio=stdio, log=(work, RESTORE_LOG), on_start=on_start,
                             on_notify=on_notify, preexec=_private_root(spec.root_path, root, spec.root_readonly))
    except CriuError:
        for pid in restored:
            _reap(pid)
        raise
    finally:
        os.close(images)
        os.close(work)
    pid = response.get("restore", {}).get("pid")
    if not pid:
        raise CriuError(f"criu restore of {snap.path} answered without the restored init's pid")
    return pid


def _reap(pid: int) -> None:
    """Collect a restored init CRIU killed after a failure (it is our child: rst_sibling)."""
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
