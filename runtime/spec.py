"""config.json into typed, validated objects.

Every malformed or unsupported field raises :class:`SpecError` naming its JSON path, before anything is created.
Unknown properties are ignored, as the runtime-spec requires; known properties this runtime cannot honour are refused.
Sections owned by one kernel concern (resources, seccomp, capabilities) are parsed by that concern's module.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from . import cjson, libc
from .errors import SpecError
from .jsonfields import abs_path, array, boolean, env_entries, integer, obj, string, strings
from .records import record

NAMESPACE_FLAGS = {
    "mount": libc.CLONE_NEWNS,
    "pid": libc.CLONE_NEWPID,
    "network": libc.CLONE_NEWNET,
    "ipc": libc.CLONE_NEWIPC,
    "uts": libc.CLONE_NEWUTS,
    "user": libc.CLONE_NEWUSER,
    "cgroup": libc.CLONE_NEWCGROUP,
    "time": libc.CLONE_NEWTIME,
}
# The files under /proc/PID/ns/ that name each namespace type.
NAMESPACE_PROC_NAMES = {"mount": "mnt", "pid": "pid", "network": "net", "ipc": "ipc", "uts": "uts",
                        "user": "user", "cgroup": "cgroup", "time": "time"}

# mount(8) options that are flags: name -> (clear, set)
MOUNT_FLAGS = {
    "ro": (0, libc.MS_RDONLY), "rw": (libc.MS_RDONLY, 0),
    "nosuid": (0, libc.MS_NOSUID), "suid": (libc.MS_NOSUID, 0),
    "nodev": (0, libc.MS_NODEV), "dev": (libc.MS_NODEV, 0),
    "noexec": (0, libc.MS_NOEXEC), "exec": (libc.MS_NOEXEC, 0),
    "sync": (0, libc.MS_SYNCHRONOUS), "async": (libc.MS_SYNCHRONOUS, 0),
    "dirsync": (0, libc.MS_DIRSYNC),
    "remount": (0, libc.MS_REMOUNT),
    "mand": (0, libc.MS_MANDLOCK), "nomand": (libc.MS_MANDLOCK, 0),
    "noatime": (0, libc.MS_NOATIME), "atime": (libc.MS_NOATIME, 0),
    "nodiratime": (0, libc.MS_NODIRATIME), "diratime": (libc.MS_NODIRATIME, 0),
    "bind": (0, libc.MS_BIND), "rbind": (0, libc.MS_BIND | libc.MS_REC),
    "relatime": (0, libc.MS_RELATIME), "norelatime": (libc.MS_RELATIME, 0),
    "strictatime": (0, libc.MS_STRICTATIME), "nostrictatime": (libc.MS_STRICTATIME, 0),
    "nosymfollow": (0, libc.MS_NOSYMFOLLOW), "symfollow": (libc.MS_NOSYMFOLLOW, 0),
    "silent": (0, libc.MS_SILENT), "loud": (libc.MS_SILENT, 0),
    "lazytime": (0, libc.MS_LAZYTIME), "nolazytime": (libc.MS_LAZYTIME, 0),
    "defaults": (0, 0),
}
PROPAGATION_FLAGS = {
    "private": libc.MS_PRIVATE, "rprivate": libc.MS_PRIVATE | libc.MS_REC,
    "shared": libc.MS_SHARED, "rshared": libc.MS_SHARED | libc.MS_REC,
    "slave": libc.MS_SLAVE, "rslave": libc.MS_SLAVE | libc.MS_REC,
    "unbindable": libc.MS_UNBINDABLE, "runbindable": libc.MS_UNBINDABLE | libc.MS_REC,
}
_UNSUPPORTED_MOUNT_OPTIONS = {"tmpcopyup", "idmap", "ridmap", "copy-symlink"}

RLIMITS = {
    "RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3, "RLIMIT_CORE": 4, "RLIMIT_RSS": 5,
    "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7, "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9, "RLIMIT_LOCKS": 10,
    "RLIMIT_SIGPENDING": 11, "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13, "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15,
}
HOOK_NAMES = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
# Set once the devices a config asks for are injected: the stored config is parsed again (exec, delete), and must not
# look for them again (a GPU that failed its health check since must not make delete fail).
DEVICES_INJECTED_ANNOTATION = "coldbrew.devices.injected"


# ---- the typed spec --------------------------------------------------------------------------------------------

class IdMapping(record("IdMapping", "container_id host_id size")):
    __slots__ = ()

    @classmethod
    def parse_all(cls, value: Any, path: str) -> tuple["IdMapping", ...]:
        result = []
        for i, item in enumerate(array(value, path)):
            p = f"{path}[{i}]"
            item = obj(item, p)
            result.append(cls(integer(item.get("containerID"), f"{p}.containerID", lo=0, hi=2**32 - 1),
                              integer(item.get("hostID"), f"{p}.hostID", lo=0, hi=2**32 - 1),
                              integer(item.get("size"), f"{p}.size", lo=1, hi=2**32 - 1)))
        return tuple(result)


class Rlimit(record("Rlimit", "resource name soft hard")):
    __slots__ = ()


class User(record("User", "uid gid umask additional_gids", defaults=(0, 0, None, ()))):
    __slots__ = ()


class Process(record("Process", "args env cwd terminal console_size user capabilities rlimits "
                                "no_new_privileges oom_score_adj apparmor_profile")):
    """config.json's `process`; `capabilities` is a capabilities.Capabilities, `console_size` (height, width)."""

    __slots__ = ()

    @classmethod
    def from_spec(cls, data: Any, path: str = "process") -> "Process":
        data = obj(data, path)
        args = strings(data.get("args"), f"{path}.args")
        if not args:
            raise SpecError(f"{path}.args", "must name the program to run")
        env = env_entries(data.get("env"), f"{path}.env")
        cwd = abs_path(data.get("cwd", "/"), f"{path}.cwd")
        console = None
        if data.get("consoleSize") is not None:
            cs = obj(data["consoleSize"], f"{path}.consoleSize")
            console = (integer(cs.get("height"), f"{path}.consoleSize.height", lo=0, hi=65535),
                       integer(cs.get("width"), f"{path}.consoleSize.width", lo=0, hi=65535))
        user = obj(data.get("user"), f"{path}.user", optional=True)
        umask = integer(user.get("umask"), f"{path}.user.umask", optional=True, lo=0, hi=0o777)
        gids = tuple(integer(g, f"{path}.user.additionalGids[{i}]", lo=0, hi=2**32 - 2)
                     for i, g in enumerate(array(user.get("additionalGids"), f"{path}.user.additionalGids")))
        if user.get("username") is not None:
            string(user["username"], f"{path}.user.username")  # Windows-only field: validated, not used
        rlimits = []
        seen = set()
        for i, item in enumerate(array(data.get("rlimits"), f"{path}.rlimits")):
            p = f"{path}.rlimits[{i}]"
            item = obj(item, p)
            name = string(item.get("type"), f"{p}.type")
            if name not in RLIMITS:
                raise SpecError(f"{p}.type", f"unknown rlimit {name!r}")
            if name in seen:
                raise SpecError(f"{p}.type", f"{name} is given twice")
            seen.add(name)
            soft = integer(item.get("soft"), f"{p}.soft", lo=0, hi=2**64 - 1)
            hard = integer(item.get("hard"), f"{p}.hard", lo=0, hi=2**64 - 1)
            if soft > hard:
                raise SpecError(f"{p}.soft", f"soft limit {soft} is above the hard limit {hard}")
            rlimits.append(Rlimit(RLIMITS[name], name, soft, hard))
        for unsupported in ("scheduler", "ioPriority", "execCPUAffinity"):
            if data.get(unsupported) is not None:
                raise SpecError(f"{path}.{unsupported}", "is not supported by coldbrew")
        if data.get("selinuxLabel") and os.path.exists("/sys/fs/selinux/enforce"):
            raise SpecError(f"{path}.selinuxLabel", "SELinux labels are not supported by coldbrew")
        from .capabilities import Capabilities

        return cls(
            args=tuple(args), env=tuple(env), cwd=cwd,
            terminal=boolean(data.get("terminal"), f"{path}.terminal"),
            console_size=console,
            user=User(integer(user.get("uid", 0), f"{path}.user.uid", lo=0, hi=2**32 - 2),
                      integer(user.get("gid", 0), f"{path}.user.gid", lo=0, hi=2**32 - 2), umask, gids),
            capabilities=Capabilities.from_spec(data.get("capabilities"), f"{path}.capabilities"),
            rlimits=tuple(rlimits),
            no_new_privileges=boolean(data.get("noNewPrivileges"), f"{path}.noNewPrivileges"),
            oom_score_adj=integer(data.get("oomScoreAdj"), f"{path}.oomScoreAdj", optional=True, lo=-1000, hi=1000),
            apparmor_profile=string(data.get("apparmorProfile"), f"{path}.apparmorProfile", optional=True),
        )


class Mount(record("Mount", "destination type source flags clear_flags propagation data")):
    __slots__ = ()

    @property
    def is_bind(self) -> bool:
        return bool(self.flags & libc.MS_BIND)

    @classmethod
    def from_spec(cls, data: Any, path: str) -> "Mount":
        data = obj(data, path)
        destination = abs_path(data.get("destination"), f"{path}.destination")
        if ".." in destination.split("/"):
            raise SpecError(f"{path}.destination", f"{destination!r} must not contain '..'")
        mtype = string(data.get("type"), f"{path}.type", optional=True)
        source = string(data.get("source"), f"{path}.source", optional=True)
        for idmap in ("uidMappings", "gidMappings"):
            if data.get(idmap):
                raise SpecError(f"{path}.{idmap}", "id-mapped mounts are not supported by coldbrew")
        flags = clear = 0
        propagation = []
        extra = []
        for i, option in enumerate(strings(data.get("options"), f"{path}.options")):
            if option in MOUNT_FLAGS:
                off, on = MOUNT_FLAGS[option]
                flags = (flags & ~off) | on
                clear |= off
            elif option in PROPAGATION_FLAGS:
                propagation.append(PROPAGATION_FLAGS[option])
            elif option in _UNSUPPORTED_MOUNT_OPTIONS:
                raise SpecError(f"{path}.options[{i}]", f"mount option {option!r} is not supported by coldbrew")
            elif "," in option:
                raise SpecError(f"{path}.options[{i}]", f"{option!r}: give one option per entry")
            else:
                extra.append(option)
        if mtype == "bind":
            flags |= libc.MS_BIND
        if flags & libc.MS_BIND:
            if not source:
                raise SpecError(f"{path}.source", "a bind mount needs a source")
            if not source.startswith("/"):
                raise SpecError(f"{path}.source", f"bind source {source!r} must be an absolute path")
        elif not mtype:
            raise SpecError(f"{path}.type", "is required for a mount that is not a bind mount")
        return cls(destination, mtype, source, flags, clear, tuple(propagation), ",".join(extra))


class Namespace(record("Namespace", "type path")):
    __slots__ = ()

    @property
    def flag(self) -> int:
        return NAMESPACE_FLAGS[self.type]


class Device(record("Device", "path type major minor file_mode uid gid")):
    __slots__ = ()

    @classmethod
    def from_spec(cls, data: Any, path: str) -> "Device":
        data = obj(data, path)
        dev_path = abs_path(data.get("path"), f"{path}.path")
        if ".." in dev_path.split("/"):
            raise SpecError(f"{path}.path", f"{dev_path!r} must not contain '..'")
        dtype = string(data.get("type"), f"{path}.type")
        if dtype not in ("c", "b", "u", "p"):
            raise SpecError(f"{path}.type", f"{dtype!r} must be one of c, b, u, p")
        major = minor = 0
        if dtype != "p":
            major = integer(data.get("major"), f"{path}.major", lo=0, hi=2**32 - 1)
            minor = integer(data.get("minor"), f"{path}.minor", lo=0, hi=2**32 - 1)
        return cls(dev_path, dtype, major, minor,
                   integer(data.get("fileMode"), f"{path}.fileMode", optional=True, default=0o666, lo=0, hi=0o7777),
                   integer(data.get("uid"), f"{path}.uid", optional=True, default=0, lo=0, hi=2**32 - 2),
                   integer(data.get("gid"), f"{path}.gid", optional=True, default=0, lo=0, hi=2**32 - 2))


class Hook(record("Hook", "path args env timeout")):
    __slots__ = ()


class Spec(record("Spec", "raw root_path root_readonly process hostname domainname mounts hooks annotations "
                          "namespaces uid_mappings gid_mappings devices cgroups_path resources rootfs_propagation "
                          "seccomp masked_paths readonly_paths sysctl personality")):
    """A validated config.json. `raw` is the JSON as read, kept for the state directory and `exec`."""

    __slots__ = ()

    def namespace(self, ns_type: str) -> Namespace | None:
        for ns in self.namespaces:
            if ns.type == ns_type:
                return ns
        return None


_DIGITS = frozenset("0123456789")
_SYSCTL_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-/")


def _is_version_1(version: str) -> bool:
    """Whether `version` starts "1.MINOR.PATCH" (a suffix such as "-rc.1" may follow); no `re` on the start path."""
    parts = version.split(".", 2)
    return (len(parts) == 3 and parts[0] == "1" and bool(parts[1]) and set(parts[1]) <= _DIGITS
            and parts[2][:1] in _DIGITS)


def load_bundle(bundle: str) -> Spec:
    """Read and validate `bundle`/config.json."""
    config_path = os.path.join(bundle, "config.json")
    try:
        # O_NONBLOCK: a FIFO planted as config.json must not hang the runtime; it is refused below
        fd = os.open(config_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SpecError("", f"{config_path!r} does not exist") from None
    except OSError as e:
        raise SpecError("", f"{config_path!r}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SpecError("", f"{config_path!r} is not a regular file")
    with open(fd, "rb") as f:
        try:
            raw = cjson.loads(f.read())
        except (ValueError, UnicodeDecodeError) as e:
            raise SpecError("", f"{config_path!r} is not valid JSON: {e}") from None
        except RecursionError:
            raise SpecError("", f"{config_path!r} nests too deeply") from None
    return parse(raw, bundle)


def parse(raw: Any, bundle: str) -> Spec:
    raw = obj(raw, "(config.json)")
    if _requests_devices(raw):
        from .cdi import inject_devices

        raw = inject_devices(raw)
    version = string(raw.get("ociVersion"), "ociVersion")
    if not _is_version_1(version):
        raise SpecError("ociVersion", f"{version!r} is not a runtime-spec 1.x version")
    root = obj(raw.get("root"), "root")
    root_path = string(root.get("path"), "root.path")
    if not root_path:
        raise SpecError("root.path", "must not be empty")
    root_path = os.path.normpath(os.path.join(os.path.abspath(bundle), root_path))
    if not os.path.isdir(root_path):
        raise SpecError("root.path", f"{root_path!r} is not a directory")

    process = Process.from_spec(raw["process"]) if raw.get("process") is not None else None
    hostname = string(raw.get("hostname"), "hostname", optional=True, default=None)
    domainname = string(raw.get("domainname"), "domainname", optional=True, default=None)
    for name, value in (("hostname", hostname), ("domainname", domainname)):
        if value is not None and len(value.encode()) > 64:
            raise SpecError(name, "is longer than 64 bytes")

    mounts = tuple(Mount.from_spec(m, f"mounts[{i}]") for i, m in enumerate(array(raw.get("mounts"), "mounts")))
    hooks = _parse_hooks(raw.get("hooks"))
    annotations = obj(raw.get("annotations"), "annotations", optional=True)
    for key, value in annotations.items():
        string(value, f"annotations.{key}")

    linux = obj(raw.get("linux"), "linux", optional=True)
    namespaces = []
    seen = set()
    for i, item in enumerate(array(linux.get("namespaces"), "linux.namespaces")):
        p = f"linux.namespaces[{i}]"
        item = obj(item, p)
        ns_type = string(item.get("type"), f"{p}.type")
        if ns_type not in NAMESPACE_FLAGS:
            raise SpecError(f"{p}.type", f"unknown namespace type {ns_type!r}")
        if ns_type == "time":
            raise SpecError(f"{p}.type", "time namespaces are not supported by coldbrew")
        if ns_type in seen:
            raise SpecError(f"{p}.type", f"namespace {ns_type!r} is given twice")
        seen.add(ns_type)
        ns_path = item.get("path")
        if ns_path is not None:
            ns_path = abs_path(ns_path, f"{p}.path")
            if not os.path.exists(ns_path):
                raise SpecError(f"{p}.path", f"{ns_path} does not exist")
        namespaces.append(Namespace(ns_type, ns_path or None))
    if "mount" not in seen:
        raise SpecError("linux.namespaces", "a mount namespace is required: coldbrew never mounts in the host's")
    uid_mappings = IdMapping.parse_all(linux.get("uidMappings"), "linux.uidMappings")
    gid_mappings = IdMapping.parse_all(linux.get("gidMappings"), "linux.gidMappings")
    user_ns = next((ns for ns in namespaces if ns.type == "user"), None)
    if user_ns and user_ns.path is None and not (uid_mappings and gid_mappings):
        raise SpecError("linux.uidMappings", "a new user namespace needs uidMappings and gidMappings")
    if (uid_mappings or gid_mappings) and not (user_ns and user_ns.path is None):
        raise SpecError("linux.uidMappings", "id mappings are given but no new user namespace is requested")

    devices = tuple(Device.from_spec(d, f"linux.devices[{i}]")
                    for i, d in enumerate(array(linux.get("devices"), "linux.devices")))
    cgroups_path = string(linux.get("cgroupsPath"), "linux.cgroupsPath", optional=True, default=None) or None
    from .cgroups import Resources

    resources = Resources.from_spec(linux.get("resources"), "linux.resources")
    propagation = 0
    if linux.get("rootfsPropagation"):
        name = string(linux["rootfsPropagation"], "linux.rootfsPropagation")
        if name not in PROPAGATION_FLAGS:
            raise SpecError("linux.rootfsPropagation", f"unknown propagation {name!r}")
        propagation = PROPAGATION_FLAGS[name]
    seccomp = None
    if linux.get("seccomp") is not None:
        from .seccomp import SeccompProfile

        seccomp = SeccompProfile.from_spec(linux["seccomp"], "linux.seccomp")
    masked = tuple(abs_path(p, f"linux.maskedPaths[{i}]")
                   for i, p in enumerate(array(linux.get("maskedPaths"), "linux.maskedPaths")))
    readonly = tuple(abs_path(p, f"linux.readonlyPaths[{i}]")
                     for i, p in enumerate(array(linux.get("readonlyPaths"), "linux.readonlyPaths")))
    sysctl = obj(linux.get("sysctl"), "linux.sysctl", optional=True)
    for key, value in sysctl.items():
        string(value, f"linux.sysctl.{key}")
        if not key or not set(key) <= _SYSCTL_NAME_CHARS or ".." in key:
            raise SpecError(f"linux.sysctl.{key}", "is not a valid sysctl name")
    personality = None
    if linux.get("personality") is not None:
        pers = obj(linux["personality"], "linux.personality")
        domain = string(pers.get("domain"), "linux.personality.domain")
        if domain not in ("LINUX", "LINUX32"):
            raise SpecError("linux.personality.domain", f"unknown domain {domain!r}")
        if pers.get("flags"):
            raise SpecError("linux.personality.flags", "personality flags are not supported by coldbrew")
        personality = 0 if domain == "LINUX" else 0x0008
    for unsupported in ("intelRdt", "timeOffsets", "memoryPolicy", "netDevices"):
        if linux.get(unsupported):
            raise SpecError(f"linux.{unsupported}", "is not supported by coldbrew")
    if linux.get("mountLabel") and os.path.exists("/sys/fs/selinux/enforce"):
        raise SpecError("linux.mountLabel", "SELinux labels are not supported by coldbrew")
    if hostname and not any(ns.type == "uts" and ns.path is None for ns in namespaces):
        raise SpecError("hostname", "setting a hostname needs a new uts namespace")

    return Spec(
        raw=raw, root_path=root_path, root_readonly=boolean(root.get("readonly"), "root.readonly"),
        process=process, hostname=hostname, domainname=domainname, mounts=mounts, hooks=hooks,
        annotations=dict(annotations), namespaces=tuple(namespaces), uid_mappings=uid_mappings,
        gid_mappings=gid_mappings, devices=devices, cgroups_path=cgroups_path, resources=resources,
        rootfs_propagation=propagation, seccomp=seccomp, masked_paths=masked, readonly_paths=readonly,
        sysctl=dict(sysctl), personality=personality,
    )


def _requests_devices(raw: dict) -> bool:
    """Whether config.json asks for devices by CDI annotation or NVIDIA_VISIBLE_DEVICES (not void or empty).

    On every container start's path: a dict scan and a scan of env strings, nothing imported.
    """
    annotations = raw.get("annotations")
    if isinstance(annotations, dict):
        if DEVICES_INJECTED_ANNOTATION in annotations:
            return False
        if any(isinstance(key, str) and key.startswith("cdi.k8s.io/") for key in annotations):
            return True
    process = raw.get("process")
    env = process.get("env") if isinstance(process, dict) else None
    if isinstance(env, list):
        for entry in reversed(env):  # the last definition wins, as in nvidia-container-toolkit
            if isinstance(entry, str) and entry.startswith("NVIDIA_VISIBLE_DEVICES="):
                return entry[len("NVIDIA_VISIBLE_DEVICES="):] not in ("", "void")
    return False


def _parse_hooks(value: Any) -> dict[str, tuple[Hook, ...]]:
    hooks_obj = obj(value, "hooks", optional=True)
    result = {}
    for name in HOOK_NAMES:
        entries = []
        for i, item in enumerate(array(hooks_obj.get(name), f"hooks.{name}")):
            p = f"hooks.{name}[{i}]"
            item = obj(item, p)
            entries.append(Hook(abs_path(item.get("path"), f"{p}.path"),
                                tuple(strings(item.get("args"), f"{p}.args")),
                                tuple(strings(item.get("env"), f"{p}.env")),
                                integer(item.get("timeout"), f"{p}.timeout", optional=True, lo=1, hi=86400)))
        result[name] = tuple(entries)
    return result
