"""The container's root filesystem: the spec's mounts, devices, pivot_root, masked and read-only paths.

Runs in the container's init, in its new mount namespace, before exec. Every mount destination is resolved inside
the rootfs with openat2(RESOLVE_IN_ROOT) and mounted onto the resulting O_PATH descriptor (`/proc/self/fd/N`),
never onto a path string: a symlink in the image cannot redirect a mount onto the host (CVE-2019-19921), and a
directory swapped for a symlink after the check changes nothing (CVE-2021-30465). proc and sysfs refuse any symlink
on their way (CVE-2019-16884).
"""

from __future__ import annotations

import errno
import os
import stat

from . import libc
from .errors import RuntimeFailure, SyscallError
from .spec import Device, Mount, Spec

_PROC_SUPER_MAGIC = 0x9FA0
_LOCKED_FLAGS = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC
# statvfs f_flag bits that mean the same as the MS_* flags of the same value
_ST_TO_MS = libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC | libc.MS_NOATIME | libc.MS_NODIRATIME

DEFAULT_DEVICES = (
    Device("/dev/null", "c", 1, 3, 0o666, 0, 0),
    Device("/dev/zero", "c", 1, 5, 0o666, 0, 0),
    Device("/dev/full", "c", 1, 7, 0o666, 0, 0),
    Device("/dev/random", "c", 1, 8, 0o666, 0, 0),
    Device("/dev/urandom", "c", 1, 9, 0o666, 0, 0),
    Device("/dev/tty", "c", 5, 0, 0o666, 0, 0),
)
_DEV_SYMLINKS = (("/proc/self/fd", "/dev/fd"), ("/proc/self/fd/0", "/dev/stdin"),
                 ("/proc/self/fd/1", "/dev/stdout"), ("/proc/self/fd/2", "/dev/stderr"))


class RootfsError(RuntimeFailure):
    pass


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def open_in_root(rootfd: int, path: str, *, create: str | None = None, no_symlinks: bool = False,
                 _hops: int = 0) -> int:
    """An O_PATH descriptor for `path` resolved inside the root behind `rootfd`, creating it if asked.

    `create` is "dir" or "file": missing components are made as directories, the last one as `create` says; a
    dangling symlink on the way is followed and its target made, inside the root (as runc's MkdirAll does).
    Symlinks are followed but can never leave the root; with `no_symlinks` any symlink on the way is refused.
    """
    resolve = libc.RESOLVE_IN_ROOT | libc.RESOLVE_NO_MAGICLINKS
    if no_symlinks:
        resolve |= libc.RESOLVE_NO_SYMLINKS
    rel = path.strip("/") or "."
    flags = libc.O_PATH | os.O_CLOEXEC
    try:
        return libc.openat2(rootfd, rel, flags, resolve)
    except SyscallError as e:
        if e.errno == errno.ELOOP and no_symlinks:
            raise RootfsError(f"{path} is or passes through a symlink, which is refused here") from None
        if e.errno != errno.ENOENT or create is None:
            raise RootfsError(f"cannot open {path} inside the container's root: {e.strerror}") from None
    parts = rel.split("/")
    parent = os.dup(rootfd)
    try:
        for i, part in enumerate(parts):
            sub = "/".join(parts[: i + 1])
            try:
                child = libc.openat2(rootfd, sub, flags, resolve)
            except SyscallError as e:
                if e.errno == errno.ELOOP and no_symlinks:
                    raise RootfsError(f"{path} passes through a symlink, which is refused here") from None
                if e.errno != errno.ENOENT:
                    raise RootfsError(f"cannot open {path} inside the container's root: {e.strerror}") from None
                target = _dangling_symlink(parent, part)
                if target is not None:
                    if _hops >= 40:
                        raise RootfsError(f"{path}: too many levels of symlinks") from None
                    # make what the symlink names, resolved inside the root, then go on from there
                    base = "/" + "/".join(parts[:i])
                    rest = "/".join(parts[i + 1:])
                    redirected = os.path.normpath(os.path.join(base, target) + ("/" + rest if rest else ""))
                    return open_in_root(rootfd, redirected, create=create, _hops=_hops + 1)
                _make(parent, part, "file" if i == len(parts) - 1 and create == "file" else "dir", path)
                try:
                    child = libc.openat2(rootfd, sub, flags, resolve)
                except SyscallError as e:
                    raise RootfsError(f"cannot open {path} inside the container's root: {e.strerror}") from None
            os.close(parent)
            parent = child
        result, parent = parent, -1
        return result
    finally:
        if parent != -1:
            os.close(parent)


def _dangling_symlink(parentfd: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=parentfd)
    except OSError:
        return None


def _make(parentfd: int, name: str, kind: str, path: str) -> None:
    try:
        if kind == "file":
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                             dir_fd=parentfd))
        else:
            os.mkdir(name, 0o755, dir_fd=parentfd)
    except FileExistsError:
        pass
    except OSError as e:
        raise RootfsError(f"cannot create {path} inside the container's root: {e.strerror}") from None


# Mounts that must wait until the init is inside its pid and cgroup namespaces (procfs shows the mounter's pid
# namespace; a fresh cgroup2 mount, the mounter's cgroup namespace), with everything mounted below them.
_LATE_TYPES = ("proc", "cgroup")


def _late(spec: Spec) -> list[bool]:
    """For each of the spec's mounts, whether it is mounted late (by mount_late) rather than by prepare."""
    roots = [m.destination.rstrip("/") + "/" for m in spec.mounts if m.type in _LATE_TYPES]
    return [any((m.destination.rstrip("/") + "/").startswith(root) for root in roots) for m in spec.mounts]


def prepare(spec: Spec, *, in_user_ns: bool) -> int:
    """Propagation, the rootfs bind, the spec's mounts but the late ones, devices, /dev links.

    Runs as soon as the mount namespace exists, before the init joins its cgroup (the runtime writes the cgroup
    files meanwhile). Returns an O_PATH descriptor of the new root.
    """
    libc.mount(None, "/", None, spec.rootfs_propagation or (libc.MS_SLAVE | libc.MS_REC))
    if spec.rootfs_propagation & libc.MS_SHARED:
        _make_parent_mount_private(spec.root_path)
    # pivot_root needs the new root to be a mount point
    libc.mount(spec.root_path, spec.root_path, None, libc.MS_BIND | libc.MS_REC)
    rootfd = os.open(spec.root_path, libc.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for mount, late in zip(spec.mounts, _late(spec)):
            if not late:
                _mount_one(rootfd, mount)
        dev_is_mounted = any(m.destination == "/dev" for m in spec.mounts)
        for device in (*DEFAULT_DEVICES, *spec.devices):
            _create_device(rootfd, device, bind=in_user_ns)
        if dev_is_mounted:
            for target, link in _DEV_SYMLINKS:
                _symlink(rootfd, target, link)
            if os.path.exists("/proc/kcore"):
                _symlink(rootfd, "/proc/kcore", "/dev/core")
            if any(m.destination == "/dev/pts" for m in spec.mounts):
                _symlink(rootfd, "pts/ptmx", "/dev/ptmx", replace=True)
    except BaseException:
        os.close(rootfd)
        raise
    return rootfd


def mount_late(spec: Spec, rootfd: int, *, cgroup_paths: dict[str, str], new_cgroupns: bool) -> None:
    """The mounts prepare left: proc and cgroup mounts and what lies below them, in the spec's order."""
    for mount, late in zip(spec.mounts, _late(spec)):
        if not late:
            continue
        if mount.type == "cgroup":
            _mount_cgroups(rootfd, mount, cgroup_paths, new_cgroupns)
        else:
            _mount_one(rootfd, mount)


def _make_parent_mount_private(root: str) -> None:
    """pivot_root refuses a new root whose parent mount is shared: make that parent private (as runc does)."""
    best = ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mountpoint, optional = fields[4], fields[6:fields.index("-")]
            if (root == mountpoint or root.startswith(mountpoint.rstrip("/") + "/")) and len(mountpoint) > len(best):
                best, shared = mountpoint, any(o.startswith("shared:") for o in optional)
    if best and shared:
        libc.mount(None, best, None, libc.MS_PRIVATE)


def _mount_one(rootfd: int, mount: Mount) -> None:
    if mount.type in ("proc", "sysfs"):
        fd = open_in_root(rootfd, mount.destination, create="dir", no_symlinks=True)
    elif mount.is_bind:
        try:
            source_is_dir = stat.S_ISDIR(os.stat(mount.source).st_mode)
        except OSError as e:
            raise RootfsError(f"bind mount source {mount.source}: {e.strerror}") from None
        fd = open_in_root(rootfd, mount.destination, create="dir" if source_is_dir else "file")
    else:
        fd = open_in_root(rootfd, mount.destination, create="dir")
    try:
        target = fd_path(fd)
        if mount.is_bind:
            libc.mount(mount.source, target, None, libc.MS_BIND | (mount.flags & libc.MS_REC))
            if mount.flags & ~(libc.MS_BIND | libc.MS_REC | libc.MS_REMOUNT):
                with _reopened(rootfd, mount.destination) as mounted:
                    _remount(mounted, mount.flags, mount.clear_flags)
        else:
            try:
                libc.mount(mount.source or mount.type, target, mount.type, mount.flags & ~libc.MS_REMOUNT,
                           mount.data or None)
            except SyscallError as e:
                if mount.type != "sysfs" or e.errno != errno.EPERM:
                    raise RootfsError(f"mounting {mount.type} on {mount.destination}: {e.strerror}") from None
                # sysfs cannot be mounted without a network namespace of our own: bind the host's, read-only
                libc.mount("/sys", target, None, libc.MS_BIND | libc.MS_REC)
                with _reopened(rootfd, mount.destination) as mounted:
                    _remount(mounted, mount.flags | libc.MS_RDONLY, mount.clear_flags)
        if mount.propagation:
            with _reopened(rootfd, mount.destination) as mounted:
                for propagation in mount.propagation:
                    libc.mount(None, mounted, None, propagation)
    except SyscallError as e:
        raise RootfsError(f"mounting {mount.source or mount.type} on {mount.destination}: {e.strerror}") from None
    finally:
        os.close(fd)


class _reopened:
    """`with _reopened(rootfd, destination) as path`: the path of what is mounted at `destination` now (a descriptor
    opened before the mount still names the directory underneath it, so remounts and propagation changes need a
    fresh one). A class: contextlib costs an import on every start."""

    __slots__ = ("_fd",)

    def __init__(self, rootfd: int, destination: str) -> None:
        self._fd = open_in_root(rootfd, destination)

    def __enter__(self) -> str:
        return fd_path(self._fd)

    def __exit__(self, *exc_info: object) -> None:
        os.close(self._fd)


def _remount(target: str, flags: int, clear_flags: int = 0) -> None:
    """Remount a bind mount with new flags, keeping the flags the kernel locks in a user namespace."""
    current = os.statvfs(target).f_flag & _ST_TO_MS
    keep = current & _LOCKED_FLAGS & ~clear_flags
    wanted = (flags | keep) & ~(libc.MS_BIND | libc.MS_REC | libc.MS_REMOUNT)
    try:
        libc.mount(None, target, None, libc.MS_BIND | libc.MS_REMOUNT | wanted)
    except SyscallError as e:
        if e.errno != errno.EPERM:
            raise
        libc.mount(None, target, None, libc.MS_BIND | libc.MS_REMOUNT | wanted | (current & _LOCKED_FLAGS))


def _mount_cgroups(rootfd: int, mount: Mount, cgroup_paths: dict[str, str], new_cgroupns: bool) -> None:
    """The `cgroup` mount type: the container's own cgroups, whatever the host's layout.

    On cgroup v2 with a cgroup namespace of its own, the container gets a fresh cgroup2 mount (rooted at its cgroup by
    the namespace); otherwise it gets bind mounts of its own cgroup directories, never the host's whole tree.
    """
    fd = open_in_root(rootfd, mount.destination, create="dir")
    try:
        target = fd_path(fd)
        flags = mount.flags & ~(libc.MS_RDONLY | libc.MS_REMOUNT)
        unified_only = set(cgroup_paths) == {"unified"}
        if unified_only:
            if new_cgroupns:
                libc.mount("cgroup2", target, "cgroup2", mount.flags & ~libc.MS_REMOUNT)
            else:
                libc.mount(cgroup_paths["unified"], target, None, libc.MS_BIND | libc.MS_REC)
                with _reopened(rootfd, mount.destination) as mounted:
                    _remount(mounted, mount.flags, mount.clear_flags)
            return
        # v1: a tmpfs with one directory per hierarchy, each a bind of the container's own cgroup there; then the
        # spec's flags (ro, nosuid, ...) on the whole tree in one mount_setattr instead of a remount per hierarchy
        libc.mount("tmpfs", target, "tmpfs", flags, "mode=755")
        for name in sorted(cgroup_paths):
            if name == "unified":
                continue
            subfd = open_in_root(rootfd, os.path.join(mount.destination, name), create="dir")
            try:
                libc.mount(cgroup_paths[name], fd_path(subfd), None, libc.MS_BIND | libc.MS_REC)
            finally:
                os.close(subfd)
        attrs = mount.flags & (libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)
        if attrs:  # MS_RDONLY..MS_NOEXEC have the values of MOUNT_ATTR_RDONLY..MOUNT_ATTR_NOEXEC
            treefd = open_in_root(rootfd, mount.destination)
            try:
                libc.mount_setattr(treefd, attrs)
            finally:
                os.close(treefd)
    except SyscallError as e:
        raise RootfsError(f"mounting cgroups on {mount.destination}: {e.strerror}") from None
    finally:
        os.close(fd)


def _create_device(rootfd: int, device: Device, *, bind: bool) -> None:
    """mknod the device inside the root, or, where mknod is not allowed (a user namespace), bind the host's node."""
    parent_rel, name = os.path.split(device.path)
    parent = open_in_root(rootfd, parent_rel, create="dir")
    try:
        if bind:
            fd = open_in_root(rootfd, device.path, create="file")
            try:
                libc.mount(device.path, fd_path(fd), None, libc.MS_BIND)
            finally:
                os.close(fd)
            return
        kind = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}[device.type]
        dirfd = os.open(fd_path(parent), os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                os.unlink(name, dir_fd=dirfd)
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                raise RootfsError(f"device {device.path}: a directory stands there") from None
            os.mknod(name, kind | device.file_mode, os.makedev(device.major, device.minor), dir_fd=dirfd)
            os.chown(name, device.uid, device.gid, dir_fd=dirfd, follow_symlinks=False)
            os.chmod(name, device.file_mode, dir_fd=dirfd)  # mknod's mode went through the umask
        finally:
            os.close(dirfd)
    except OSError as e:
        if isinstance(e, RootfsError):
            raise
        raise RootfsError(f"creating device {device.path}: {e.strerror}") from None
    finally:
        os.close(parent)


def _symlink(rootfd: int, target: str, link: str, *, replace: bool = False) -> None:
    parent_rel, name = os.path.split(link)
    parent = open_in_root(rootfd, parent_rel, create="dir")
    dirfd = os.open(fd_path(parent), os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        if replace:
            try:
                os.unlink(name, dir_fd=dirfd)
            except FileNotFoundError:
                pass
        try:
            os.symlink(target, name, dir_fd=dirfd)
        except FileExistsError:
            pass
    finally:
        os.close(dirfd)
        os.close(parent)


def pivot(rootfd: int, *, no_pivot: bool) -> None:
    """Make the prepared root the process's `/` and drop every view of the host's tree."""
    if no_pivot:
        os.fchdir(rootfd)
        libc.mount(".", "/", None, libc.MS_MOVE)
        os.chroot(".")
        os.chdir("/")
        return
    oldroot = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        # pivot_root(".", ".") stacks the old root on top of the new one; then detach it (runc's way: no temp dir)
        os.fchdir(rootfd)
        libc.pivot_root(".", ".")
        os.fchdir(oldroot)
        libc.mount(None, ".", None, libc.MS_SLAVE | libc.MS_REC)
        libc.umount2(".", libc.MNT_DETACH)
        os.chdir("/")
    finally:
        os.close(oldroot)


def finalize(spec: Spec) -> None:
    """After pivot_root, inside the container: sysctls, masked and read-only paths, a read-only root."""
    if spec.sysctl or spec.readonly_paths or spec.masked_paths:
        _check_proc()
    for key, value in spec.sysctl.items():
        _check_namespaced(spec, key)
        try:
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)
        except OSError as e:
            raise RootfsError(f"linux.sysctl.{key}: {e.strerror}") from None
    for path in spec.readonly_paths:
        _readonly(path)
    for path in spec.masked_paths:
        _mask(path)
    if spec.root_readonly:
        _remount("/", libc.MS_RDONLY)


# The sysctls a namespace of the container's owns (runc's validator); writing any other would change the host's.
_IPC_SYSCTLS = frozenset({"kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
                          "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced"})


def _check_namespaced(spec: Spec, key: str) -> None:
    name = key.replace("/", ".")
    if name in _IPC_SYSCTLS or name.startswith("fs.mqueue."):
        needed = "ipc"
    elif name.startswith("net."):
        needed = "network"
    elif name in ("kernel.hostname", "kernel.domainname"):
        needed = "uts"
    else:
        raise RootfsError(f"linux.sysctl.{key}: not a namespaced sysctl: setting it would change the host's")
    if spec.namespace(needed) is None:
        raise RootfsError(f"linux.sysctl.{key}: needs a {needed} namespace of the container's own, or it would "
                          "change the host's")


def _check_proc() -> None:
    """Refuse to write through a /proc that is not procfs (CVE-2019-16884: a fake /proc in the image)."""
    buf = libc.string_buffer(120)  # struct statfs
    if libc.libc.statfs(b"/proc", buf) != 0 or int.from_bytes(buf.raw[:8], "little") != _PROC_SUPER_MAGIC:
        raise RootfsError("/proc inside the container is not procfs: refusing to write through it")


def _readonly(path: str) -> None:
    try:
        libc.mount(path, path, None, libc.MS_BIND | libc.MS_REC)
    except SyscallError as e:
        if e.errno == errno.ENOENT:
            return
        raise RootfsError(f"read-only path {path}: {e.strerror}") from None
    _remount(path, libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)


def _mask(path: str) -> None:
    try:
        is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return
    try:
        if is_dir:
            libc.mount("tmpfs", path, "tmpfs", libc.MS_RDONLY, None)
        else:
            libc.mount("/dev/null", path, None, libc.MS_BIND)
    except SyscallError as e:
        raise RootfsError(f"masked path {path}: {e.strerror}") from None
