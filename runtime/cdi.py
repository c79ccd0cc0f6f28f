"""CDI, the Container Device Interface: device specs from /etc/cdi and /var/run/cdi, requests by qualified name, and
their container edits applied to a raw config.json.

Requests. A container asks for devices with annotations in the standard CDI form: keys prefixed ``cdi.k8s.io/``,
values a comma-separated list of qualified names ``vendor/class=name``. ``vendor/class=all`` is the device named
"all" where the spec defines one (nvidia-ctk's and coldbrew's GPU specs do), else every device of that kind (a coldbrew
convenience). Engines (containerd, podman, docker) usually apply CDI edits themselves and leave the annotations in
config.json; coldbrew applying them again is harmless because every edit replaces its own kind (a device node by
path, a mount by destination, a variable by name) and identical hooks and cgroup rules are not repeated. Once
applied, the config carries the annotation ``coldbrew.devices.injected`` (the names injected): the stored config is
parsed again by exec and delete, and a config holding that annotation is not injected again.

Spec files. ``*.json`` and ``*.yaml`` files in the spec directories, lowest priority first (/etc/cdi, then
/var/run/cdi; ``COLDBREW_CDI_DIRS``, colon-separated, replaces them). As in the reference implementation
(tags.cncf.io/container-device-interface): a device defined in two directories is taken from the later one; a device
defined twice at the same priority is a conflict and neither definition is used; a file that fails validation makes
its devices unavailable. Asking for an unavailable device fails and the message carries the spec errors found, so
the operator sees why. Every error names the file and the field. YAML is imported only when a .yaml file is read.

Edits (applied to the raw config.json, before it is validated as a whole):
- ``env``: set in process.env, replacing a variable of the same name.
- ``deviceNodes``: a linux.devices entry at ``path``; the type, major and minor are read from the host node
  (``hostPath``, default ``path``) when not given, and so is the file mode; uid/gid default to the process's user.
  The cgroup rule (``permissions``, default ``rwm``, ``none`` = no rule) is appended to linux.resources.devices only
  where that list exists: without one the runtime does not restrict device access, so a rule would change nothing.
- ``mounts``: bind mounts replacing any mount at the same destination; mounts are then ordered by depth (stable),
  as the reference implementation does, so that a parent directory is mounted before what lies below it.
- ``hooks``: appended to the named OCI hook list. ``additionalGids``: added to process.user (0 is ignored).
- ``intelRdt`` and ``netDevices`` are refused when a requested device carries them: coldbrew supports neither.
"""

from __future__ import annotations

import copy
import json
import os
import re
import stat
from collections import namedtuple

from .errors import RuntimeFailure, SpecError
from .jsonfields import abs_path, array, env_entries, integer, obj, string, strings
from .spec import DEVICES_INJECTED_ANNOTATION

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from typing import Any

DEFAULT_SPEC_DIRS = ("/etc/cdi", "/var/run/cdi")
ANNOTATION_PREFIX = "cdi.k8s.io/"
HOOK_NAMES = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
# Versions this reader understands and, for each newer one, the first version that allows a feature.
VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0")

_VENDOR_OR_CLASS = re.compile(r"[A-Za-z](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?")
_DEVICE_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?")
_NODE_TYPES = {stat.S_IFCHR: "c", stat.S_IFBLK: "b", stat.S_IFIFO: "p"}


class CdiError(RuntimeFailure):
    """A CDI spec file is malformed, or one of its edits cannot be applied on this host.

    `origin` names the file (or another source of edits) and `field` the JSON path inside it.
    """

    def __init__(self, origin: str, field: str, message: str) -> None:
        self.origin = origin
        self.field = field
        super().__init__(f"{origin}: {field}: {message}" if field else f"{origin}: {message}")


# ---- qualified names ---------------------------------------------------------------------------------------------

class QualifiedName(namedtuple("QualifiedName", "vendor cls name")):
    """``vendor/class=name``."""

    __slots__ = ()

    @property
    def kind(self) -> str:
        return f"{self.vendor}/{self.cls}"

    def __str__(self) -> str:
        return f"{self.vendor}/{self.cls}={self.name}"


def parse_qualified_name(text: str) -> QualifiedName:
    """Split ``vendor/class=name``; ValueError says what is wrong with `text`."""
    kind, sep, name = text.partition("=")
    vendor, slash, cls = kind.partition("/")
    if not sep or not slash or not vendor or not cls or not name:
        raise ValueError(f"{text!r} is not a qualified CDI device name (vendor/class=name)")
    try:
        check_kind(kind)
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}") from None
    if not _DEVICE_NAME.fullmatch(name):
        raise ValueError(f"{text!r}: device name {name!r} must be letters, digits, '_', '.', ':' or '-', starting "
                         "and ending with a letter or digit")
    return QualifiedName(vendor, cls, name)


def check_kind(kind: str) -> None:
    """A spec's `kind`, ``vendor/class``: ValueError if malformed."""
    vendor, slash, cls = kind.partition("/")
    if not slash:
        raise ValueError(f"{kind!r} is not of the form vendor/class")
    for what, part in (("vendor", vendor), ("class", cls)):
        if not _VENDOR_OR_CLASS.fullmatch(part):
            raise ValueError(f"{kind!r}: {what} {part!r} must be letters, digits, '_', '.' or '-', starting with a "
                             "letter and ending with a letter or digit")


def requested_names(annotations: dict) -> list[tuple[str, str]]:
    """(annotation key, device name) for every CDI request in `annotations`, in order."""
    requests = []
    for key, value in annotations.items():
        if key.startswith(ANNOTATION_PREFIX):
            value = string(value, f"annotations.{key}")
            for name in value.split(","):
                if not name.strip():
                    raise SpecError(f"annotations.{key}", f"{value!r} has an empty device name")
                requests.append((key, name.strip()))
    return requests


# ---- container edits ---------------------------------------------------------------------------------------------

class ContainerEdits:
    """A validated ``containerEdits`` object. Each entry keeps `where` (origin and field) for later error messages."""

    __slots__ = ("env", "device_nodes", "mounts", "hooks", "additional_gids", "unsupported")

    def __init__(self) -> None:
        self.env: list[str] = []
        self.device_nodes: list[dict] = []
        self.mounts: list[dict] = []
        self.hooks: list[dict] = []
        self.additional_gids: list[int] = []
        self.unsupported: list[str] = []  # fields naming features coldbrew cannot apply

    def is_empty(self) -> bool:
        return not (self.env or self.device_nodes or self.mounts or self.hooks or self.additional_gids
                    or self.unsupported)


def parse_edits(value: Any, origin: str, field: str) -> ContainerEdits:
    """Validate a ``containerEdits`` object; errors are CdiError naming `origin` and the field."""
    try:
        return _parse_edits(value, field, origin)
    except SpecError as e:
        raise CdiError(origin, e.path, e.message) from None


def _parse_edits(value: Any, field: str, origin: str) -> ContainerEdits:
    edits = ContainerEdits()
    data = obj(value, field, optional=True)
    edits.env.extend(env_entries(data.get("env"), f"{field}.env"))
    for i, item in enumerate(array(data.get("deviceNodes"), f"{field}.deviceNodes")):
        p = f"{field}.deviceNodes[{i}]"
        item = obj(item, p)
        node = {"where": f"{origin}: {p}", "path": _clean_path(item.get("path"), f"{p}.path"),
                "hostPath": _clean_path(item["hostPath"], f"{p}.hostPath") if item.get("hostPath") else None,
                "type": string(item.get("type"), f"{p}.type", optional=True) or None,
                "major": integer(item.get("major"), f"{p}.major", optional=True, lo=0, hi=2**32 - 1),
                "minor": integer(item.get("minor"), f"{p}.minor", optional=True, lo=0, hi=2**32 - 1),
                "fileMode": integer(item.get("fileMode"), f"{p}.fileMode", optional=True, lo=0, hi=0o7777),
                "permissions": string(item.get("permissions"), f"{p}.permissions", optional=True),
                "uid": integer(item.get("uid"), f"{p}.uid", optional=True, lo=0, hi=2**32 - 2),
                "gid": integer(item.get("gid"), f"{p}.gid", optional=True, lo=0, hi=2**32 - 2)}
        if node["type"] not in (None, "b", "c", "u", "p"):
            raise SpecError(f"{p}.type", f"{node['type']!r} must be one of b, c, u, p")
        permissions = node["permissions"]
        if permissions not in ("", "none") and permissions.strip("rwm"):
            raise SpecError(f"{p}.permissions", f"{permissions!r} must be letters of 'rwm' (or 'none')")
        edits.device_nodes.append(node)
    for i, item in enumerate(array(data.get("mounts"), f"{field}.mounts")):
        p = f"{field}.mounts[{i}]"
        item = obj(item, p)
        mount = {"where": f"{origin}: {p}", "hostPath": abs_path(item.get("hostPath"), f"{p}.hostPath"),
                 "containerPath": _clean_path(item.get("containerPath"), f"{p}.containerPath"),
                 "type": string(item.get("type"), f"{p}.type", optional=True) or None,
                 "options": strings(item.get("options"), f"{p}.options")}
        if not mount["type"] and not {"bind", "rbind"} & set(mount["options"]):
            raise SpecError(f"{p}.type", "is required unless the options hold bind or rbind")
        edits.mounts.append(mount)
    for i, item in enumerate(array(data.get("hooks"), f"{field}.hooks")):
        p = f"{field}.hooks[{i}]"
        item = obj(item, p)
        name = string(item.get("hookName"), f"{p}.hookName")
        if name not in HOOK_NAMES:
            raise SpecError(f"{p}.hookName", f"{name!r} is not an OCI hook ({', '.join(HOOK_NAMES)})")
        env = env_entries(item.get("env"), f"{p}.env")
        edits.hooks.append({"hookName": name, "path": abs_path(item.get("path"), f"{p}.path"),
                            "args": strings(item.get("args"), f"{p}.args"), "env": env,
                            "timeout": integer(item.get("timeout"), f"{p}.timeout", optional=True, lo=1, hi=86400)})
    for i, gid in enumerate(array(data.get("additionalGids"), f"{field}.additionalGids")):
        edits.additional_gids.append(integer(gid, f"{field}.additionalGids[{i}]", lo=0, hi=2**32 - 1))
    for name in ("intelRdt", "netDevices"):
        if data.get(name):
            edits.unsupported.append(f"{origin}: {field}.{name}")
    return edits


def _clean_path(value: Any, field: str) -> str:
    path = abs_path(value, field)
    if ".." in path.split("/"):
        raise SpecError(field, f"{path!r} must not contain '..'")
    return os.path.normpath(path)


# ---- spec files --------------------------------------------------------------------------------------------------

class CdiDevice(namedtuple("CdiDevice", "qualified edits spec")):
    """One device of a spec: `qualified` is a QualifiedName, `spec` the CdiSpec defining it."""

    __slots__ = ()


class CdiSpec(namedtuple("CdiSpec", "path priority version kind edits devices")):
    """A validated spec file; `devices` maps device name -> CdiDevice, in file order."""

    __slots__ = ()


def load_spec_file(path: str, priority: int = 0) -> CdiSpec:
    """Read and validate one spec file (.json or .yaml). Raises CdiError naming the file and the field."""
    origin = f"CDI spec {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO planted there must not hang us
    except OSError as e:
        raise CdiError(origin, "", e.strerror) from None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise CdiError(origin, "", "is not a regular file")
        data = f.read()
    if path.endswith(".yaml"):
        import yaml

        try:
            document = yaml.load(data, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise CdiError(origin, "", f"is not valid YAML{where}: {problem}") from None
    else:
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CdiError(origin, "", f"is not valid JSON: {e}") from None
        except RecursionError:
            raise CdiError(origin, "", "nests too deeply") from None
    return validate_spec(document, path, priority)


def validate_spec(document: Any, path: str, priority: int = 0) -> CdiSpec:
    """Validate a spec already decoded (from a file at `path`, or made by a generator before it is written)."""
    origin = f"CDI spec {path}"
    try:
        return _validate_spec(document, path, priority, origin)
    except SpecError as e:
        raise CdiError(origin, e.path, e.message) from None


def _validate_spec(document: Any, path: str, priority: int, origin: str) -> CdiSpec:
    document = obj(document, "(document)")
    version = string(document.get("cdiVersion"), "cdiVersion")
    if version not in VERSIONS:
        raise SpecError("cdiVersion", f"{version!r} is not a CDI version coldbrew reads ({', '.join(VERSIONS)})")
    kind = string(document.get("kind"), "kind")
    try:
        check_kind(kind)
    except ValueError as e:
        raise SpecError("kind", str(e)) from None
    vendor, cls = kind.split("/", 1)
    needs = []  # (version, field) for every feature newer than 0.3.0 the file uses
    if "." in cls:
        needs.append(("0.6.0", "kind"))
    if document.get("annotations"):
        needs.append(("0.6.0", "annotations"))
    for key, value in obj(document.get("annotations"), "annotations", optional=True).items():
        string(value, f"annotations.{key}")
    edits = _parse_edits(document.get("containerEdits"), "containerEdits", origin)
    needs += _edit_needs(document.get("containerEdits"), "containerEdits")
    devices: dict[str, CdiDevice] = {}
    items = array(document.get("devices"), "devices", optional=False)
    if not items:
        raise SpecError("devices", "must name at least one device")
    for i, item in enumerate(items):
        p = f"devices[{i}]"
        item = obj(item, p)
        name = string(item.get("name"), f"{p}.name")
        if not _DEVICE_NAME.fullmatch(name):
            raise SpecError(f"{p}.name", f"{name!r} must be letters, digits, '_', '.', ':' or '-', starting and "
                                         "ending with a letter or digit")
        if name in devices:
            raise SpecError(f"{p}.name", f"device {name!r} is defined twice in this spec")
        if not name[0].isalpha():
            needs.append(("0.5.0", f"{p}.name"))
        if item.get("annotations"):
            needs.append(("0.6.0", f"{p}.annotations"))
        for key, value in obj(item.get("annotations"), f"{p}.annotations", optional=True).items():
            string(value, f"{p}.annotations.{key}")
        device_edits = _parse_edits(item.get("containerEdits"), f"{p}.containerEdits", origin)
        if device_edits.is_empty():
            raise SpecError(f"{p}.containerEdits", "a device needs at least one edit")
        needs += _edit_needs(item.get("containerEdits"), f"{p}.containerEdits")
        devices[name] = CdiDevice(QualifiedName(vendor, cls, name), device_edits, None)
    for needed, field in needs:
        if VERSIONS.index(needed) > VERSIONS.index(version):
            raise SpecError(field, f"needs cdiVersion {needed} or later; the file declares {version}")
    spec = CdiSpec(path, priority, version, kind, edits, {})
    spec.devices.update((name, device._replace(spec=spec)) for name, device in devices.items())
    return spec


def _edit_needs(edits: Any, field: str) -> list[tuple[str, str]]:
    """The fields of an (already validated) containerEdits that need a CDI version newer than 0.3.0."""
    needs = []
    edits = edits or {}
    for i, mount in enumerate(edits.get("mounts") or ()):
        if mount.get("type"):
            needs.append(("0.4.0", f"{field}.mounts[{i}].type"))
    for i, node in enumerate(edits.get("deviceNodes") or ()):
        if node.get("hostPath"):
            needs.append(("0.5.0", f"{field}.deviceNodes[{i}].hostPath"))
    for name in ("additionalGids", "intelRdt"):
        if edits.get(name):
            needs.append(("0.7.0", f"{field}.{name}"))
    if edits.get("netDevices"):
        needs.append(("1.0.0", f"{field}.netDevices"))
    return needs


def spec_dirs() -> list[str]:
    """The spec directories, lowest priority first: $COLDBREW_CDI_DIRS (colon-separated) or /etc/cdi, /var/run/cdi."""
    override = os.environ.get("COLDBREW_CDI_DIRS")
    if override is not None:
        return [d for d in override.split(":") if d]
    return list(DEFAULT_SPEC_DIRS)


class Registry:
    """Every device of every readable spec in the spec directories, with the errors met while reading them."""

    def __init__(self, dirs: Sequence[str]) -> None:
        self.dirs = list(dirs)
        self.devices: dict[str, CdiDevice] = {}  # qualified name -> device
        self.errors: dict[str, list[str]] = {}  # spec file -> messages
        self.conflicts: dict[str, str] = {}  # qualified name -> message
        definitions: dict[str, list[CdiDevice]] = {}  # qualified name -> its definitions, lowest priority first
        for priority, directory in enumerate(self.dirs):
            try:
                names = sorted(os.listdir(directory))
            except FileNotFoundError:
                continue
            except OSError as e:
                self.errors.setdefault(directory, []).append(f"CDI spec directory {directory}: {e.strerror}")
                continue
            for file_name in names:
                if not file_name.endswith((".json", ".yaml")):
                    continue
                path = os.path.join(directory, file_name)
                try:
                    spec = load_spec_file(path, priority)
                except CdiError as e:
                    self.errors.setdefault(path, []).append(str(e))
                    continue
                for device in spec.devices.values():
                    definitions.setdefault(str(device.qualified), []).append(device)
        for name, devices in definitions.items():
            top = [d for d in devices if d.spec.priority == devices[-1].spec.priority]
            if len(top) == 1:
                self.devices[name] = top[0]
                continue
            files = [d.spec.path for d in top]
            self.conflicts[name] = f"device {name} is defined by each of {', '.join(files)}"
            for file in files:
                self.errors.setdefault(file, []).append(f"CDI spec {file}: {self.conflicts[name]}")

    def resolve(self, requests: Iterable[tuple[str, str]]) -> list[CdiDevice]:
        """The devices for (annotation key, qualified name) requests, each once, in request order."""
        result: dict[str, CdiDevice] = {}
        for key, text in requests:
            field = f"annotations.{key}"
            try:
                qualified = parse_qualified_name(text)
            except ValueError as e:
                raise SpecError(field, str(e)) from None
            name = str(qualified)
            if name in self.devices:
                result.setdefault(name, self.devices[name])
                continue
            if name in self.conflicts:
                raise SpecError(field, f"CDI {self.conflicts[name]} at the same priority: none of them is used")
            same_kind = sorted((n, d) for n, d in self.devices.items() if d.qualified.kind == qualified.kind)
            if qualified.name == "all" and same_kind:
                for n, device in same_kind:
                    result.setdefault(n, device)
                continue
            message = f"unknown CDI device {name}"
            if same_kind:
                message += f" (kind {qualified.kind} has {', '.join(d.qualified.name for _, d in same_kind)})"
            else:
                message += f" (no spec of kind {qualified.kind} in {', '.join(self.dirs) or 'no spec directory'})"
            problems = [m for messages in self.errors.values() for m in messages]
            if problems:
                message += "; spec errors: " + "; ".join(problems)
            raise SpecError(field, message)
        return list(result.values())


def load_registry(dirs: Sequence[str] | None = None) -> Registry:
    return Registry(spec_dirs() if dirs is None else dirs)


def device_edits(devices: Iterable[CdiDevice]) -> list[ContainerEdits]:
    """The edits for `devices`: each spec's own edits once (before its first device's), then the device's."""
    edits = []
    seen_specs: set[int] = set()
    for device in devices:
        if id(device.spec) not in seen_specs:
            seen_specs.add(id(device.spec))
            edits.append(device.spec.edits)
        edits.append(device.edits)
    return edits


# ---- applying edits to config.json -------------------------------------------------------------------------------

def apply_edits(raw: dict, all_edits: Iterable[ContainerEdits]) -> None:
    """Apply `all_edits`, in order, to the raw config.json `raw` (changed in place)."""
    all_edits = list(all_edits)
    for edits in all_edits:
        if edits.unsupported:
            raise CdiError(edits.unsupported[0], "", "is not supported by coldbrew")
    process = obj(raw.get("process"), "process", optional=True)
    user = obj(process.get("user"), "process.user", optional=True)
    linux = _dict_at(raw, "linux", "linux")
    devices = _list_at(linux, "devices", "linux.devices")
    resources = obj(linux.get("resources"), "linux.resources", optional=True)
    rules = resources.get("devices")
    rules = array(rules, "linux.resources.devices") if rules is not None else None
    mounts = _list_at(raw, "mounts", "mounts")
    hooks = _dict_at(raw, "hooks", "hooks")
    mounts_added = False
    for edits in all_edits:
        if edits.env and process:
            env = strings(process.get("env"), "process.env")
            for entry in edits.env:
                key = entry.split("=", 1)[0] + "="
                env = [e for e in env if not e.startswith(key)] + [entry]
            process["env"] = env
        for node in edits.device_nodes:
            device = _device_entry(node, user)
            devices[:] = [d for d in devices if not (isinstance(d, dict) and d.get("path") == device["path"])]
            devices.append(device)
            access = "rwm" if not node["permissions"] else node["permissions"]
            if rules is not None and device["type"] != "p" and access != "none":
                rule = {"allow": True, "type": "b" if device["type"] == "b" else "c",  # "u" is a char device
                        "major": device["major"], "minor": device["minor"], "access": access}
                if rule not in rules:
                    rules.append(rule)
        for mount in edits.mounts:
            if not os.path.exists(mount["hostPath"]):
                raise CdiError(mount["where"], "hostPath", f"{mount['hostPath']} does not exist on this host")
            entry = {"destination": mount["containerPath"], "source": mount["hostPath"], "options": mount["options"]}
            if mount["type"]:
                entry["type"] = mount["type"]
            mounts[:] = [m for m in mounts if not (isinstance(m, dict) and isinstance(m.get("destination"), str)
                                                   and os.path.normpath(m["destination"]) == entry["destination"])]
            mounts.append(entry)
            mounts_added = True
        for hook in edits.hooks:
            entry = {"path": hook["path"], "args": hook["args"] or [hook["path"]], "env": hook["env"]}
            if hook["timeout"] is not None:
                entry["timeout"] = hook["timeout"]
            stage = _list_at(hooks, hook["hookName"], f"hooks.{hook['hookName']}")
            if entry not in stage:
                stage.append(entry)
        for gid in edits.additional_gids:
            if gid and process:
                gids = _list_at(_dict_at(process, "user", "process.user"), "additionalGids",
                                "process.user.additionalGids")
                if gid not in gids:
                    gids.append(gid)
    if mounts_added:
        # sorted() is stable: mounts of one depth keep their order, a parent comes before what it holds
        mounts[:] = sorted(mounts, key=lambda m: os.path.normpath(m["destination"]).count("/")
                           if isinstance(m, dict) and isinstance(m.get("destination"), str) else 0)


def _dict_at(parent: dict, key: str, path: str) -> dict:
    """parent[key], an object, made (and attached) where it is absent or null."""
    if parent.get(key) is None:
        parent[key] = {}
    return obj(parent[key], path)


def _list_at(parent: dict, key: str, path: str) -> list:
    """parent[key], an array, made (and attached) where it is absent or null."""
    if parent.get(key) is None:
        parent[key] = []
    return array(parent[key], path)


def _device_entry(node: dict, user: dict) -> dict:
    """The linux.devices entry for a CDI device node, with what the spec leaves out read from the host node."""
    host_path = node["hostPath"] or node["path"]
    field = "hostPath" if node["hostPath"] else "path"
    dtype, major, minor, mode = node["type"], node["major"], node["minor"], node["fileMode"]
    st = None
    if dtype is None or (dtype != "p" and not major):
        try:
            st = os.stat(host_path)
        except OSError as e:
            raise CdiError(node["where"], field, f"device node {host_path}: {e.strerror}") from None
        host_type = _NODE_TYPES.get(stat.S_IFMT(st.st_mode))
        if host_type is None:
            raise CdiError(node["where"], field, f"{host_path} is not a device node")
        if dtype is None:
            dtype = host_type
        elif host_type != ("c" if dtype == "u" else dtype):
            raise CdiError(node["where"], "type", f"{dtype!r} but the host node {host_path} is of type {host_type!r}")
        if dtype != "p":
            major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif mode is None:
        try:
            st = os.stat(host_path)
        except OSError:
            st = None  # the spec gives type and numbers: the host node is only a hint for the mode
    if mode is None and st is not None:
        mode = stat.S_IMODE(st.st_mode)
    device = {"path": node["path"], "type": dtype, "fileMode": mode if mode is not None else 0o666}
    if dtype != "p":
        device["major"], device["minor"] = major, minor or 0
    uid, gid = node["uid"], node["gid"]
    if uid is None and isinstance(user.get("uid"), int) and user["uid"] > 0:
        uid = user["uid"]
    if gid is None and isinstance(user.get("gid"), int) and user["gid"] > 0:
        gid = user["gid"]
    if uid is not None:
        device["uid"] = uid
    if gid is not None:
        device["gid"] = gid
    return device


# ---- the hook spec.parse calls -----------------------------------------------------------------------------------

def inject_devices(raw: dict, *, dirs: Sequence[str] | None = None) -> dict:
    """A copy of config.json `raw` with the devices it asks for (CDI annotations, then NVIDIA_VISIBLE_DEVICES as it
    stands after those edits) injected, marked with the DEVICES_INJECTED_ANNOTATION so that a later parse of the
    stored config (exec, delete) does not look for the devices again."""
    from . import gpu  # light: NVML and the driver are looked at only when a GPU is asked for

    raw = copy.deepcopy(raw)
    annotations = obj(raw.get("annotations"), "annotations", optional=True)
    injected = []
    requests = requested_names(annotations)
    if requests:
        devices = load_registry(dirs).resolve(requests)
        if any(device.qualified.kind == gpu.CDI_KIND for device in devices):
            gpu.refuse_unhealthy_nodes(device for device in devices if device.qualified.kind == gpu.CDI_KIND)
        apply_edits(raw, device_edits(devices))
        injected += [str(device.qualified) for device in devices]
    process = obj(raw.get("process"), "process", optional=True)
    env = strings(process.get("env"), "process.env")
    visible = gpu.env_value(env, gpu.VISIBLE_DEVICES)
    if visible not in (None, "", "void"):
        apply_edits(raw, [gpu.container_edits(env, process)])
        injected.append(f"{gpu.VISIBLE_DEVICES}={visible}")
    raw["annotations"] = {**annotations, DEVICES_INJECTED_ANNOTATION: ",".join(injected)}
    return raw
