"""NVIDIA GPUs for containers: find the driver, read NVIDIA_VISIBLE_DEVICES, turn a request into the same container
edits a CDI spec holds (runtime/cdi.py applies them), and generate a CDI spec for this host's GPUs.

The environment variables, with nvidia-container-toolkit's meanings (the last definition in process.env wins):

- NVIDIA_VISIBLE_DEVICES: unset, empty or ``void``: nothing is done. ``none``: the driver's libraries and binaries but
  no GPU. ``all``: every GPU. A comma list of NVML indexes (nvidia-smi's numbering) and GPU UUIDs (``GPU-...``, or a
  prefix matching exactly one GPU): those GPUs. MIG devices (``MIG-...``, ``0:1``) are refused: coldbrew does not
  partition GPUs. Anything else is refused with an error naming the value.
- NVIDIA_DRIVER_CAPABILITIES: a comma list of ``utility`` (NVML, nvidia-smi), ``compute`` (CUDA, OpenCL, PTX JIT) and
  ``video`` (NVENC/NVDEC), or ``all``; unset or empty means ``utility,compute``, the toolkit's default. ``graphics``,
  ``display``, ``ngx`` and ``compat32`` are refused (coldbrew mounts no graphics stack and no 32-bit libraries), and
  ``all`` means the three coldbrew provides.
- NVIDIA_MIG_CONFIG_DEVICES=all / NVIDIA_MIG_MONITOR_DEVICES=all: also the /dev/nvidia-caps node for MIG configuration
  (which, as in the toolkit, needs CAP_SYS_ADMIN in the process's bounding set) or monitoring.

No driver. A request (``none`` and ``all`` included) on a host without the NVIDIA driver refuses to create the
container with NoGpu ("no NVIDIA driver on this host (libnvidia-ml.so.1 not found)"): the user asked for GPUs and a
container that silently starts without them fails later and less clearly. nvidia-container-runtime does the same:
its hook's nvidia-container-cli fails with "load library failed: libnvidia-ml.so.1". CUDA base images set
NVIDIA_VISIBLE_DEVICES=all in their ENV; with the toolkit, GPU-less hosts simply run plain runc and never look at it,
while coldbrew is the runtime on every host, so run such an image without GPUs with NVIDIA_VISIBLE_DEVICES=void.

Health. A GPU that fails its health check (runtime/gpuinfo.py) is never handed out: a request that names it, by
index, UUID, ``all`` or a CDI ``nvidia.com/gpu`` device whose node is its /dev/nvidiaN, fails with an error naming
the GPU and the reason. ``all`` is refused too rather than quietly shrunk; a scheduler picks from
gpuinfo.healthy_gpus().

What a container gets:
- device nodes /dev/nvidiactl, /dev/nvidia-uvm, /dev/nvidia-uvm-tools and /dev/nvidia-modeset where the host has them,
  and /dev/nvidiaN of each GPU handed out (N is the GPU's minor number, not its index), with cgroup allow rules;
- the driver's user-space libraries for the capabilities asked (each ``lib*.so.<driver version>`` file and the SONAME
  links naming it, libcuda.so.1 for instance, each mounted as the file it names), the utility binaries
  (nvidia-smi, nvidia-debugdump, nvidia-persistenced, and the MPS ones with compute), the persistenced socket and the
  GSP firmware directory /lib/firmware/nvidia/<version> where present: all bind-mounted read-only (nosuid, nodev)
  at the host's own paths, as nvidia-ctk's CDI specs mount them.

ldconfig is not run in the container. It would write /etc/ld.so.cache into the image's root, which is often
read-only (root.readonly, a lazily-loaded shared image); it would execute a program of the image with the
runtime's privileges before the container's own confinement applies; and it costs a process start per container.
Mounted at the host's paths, the libraries are found through the loader's default search path when the host's
library directory is one of the image loader's system directories, which holds when host and image are of one
family (/usr/lib/x86_64-linux-gnu on Debian and Ubuntu, /usr/lib64 on RHEL). For other pairs, and for programs that
read the loader cache (``ldconfig -p``) to find libcuda, set LD_LIBRARY_PATH in the image, or use an nvidia-ctk CDI
spec: its update-ldcache createContainer hook runs like any other hook.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import namedtuple

from .errors import RuntimeFailure, SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from .cdi import CdiDevice, ContainerEdits
    from .gpuinfo import GpuInfo

VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
DRIVER_CAPABILITIES = "NVIDIA_DRIVER_CAPABILITIES"
CDI_KIND = "nvidia.com/gpu"
DEFAULT_CDI_SPEC_PATH = "/etc/cdi/nvidia.yaml"
DEFAULT_CAPABILITIES = frozenset({"utility", "compute"})
CAPABILITIES = frozenset({"utility", "compute", "video"})
_REFUSED_CAPABILITIES = frozenset({"graphics", "display", "ngx", "compat32"})

LIBRARIES = {
    "utility": ("libnvidia-ml", "libnvidia-cfg"),
    "compute": ("libcuda", "libcudadebugger", "libnvidia-opencl", "libnvidia-gpucomp", "libnvidia-ptxjitcompiler",
                "libnvidia-fatbinaryloader", "libnvidia-allocator", "libnvidia-compiler", "libnvidia-pkcs11",
                "libnvidia-pkcs11-openssl3", "libnvidia-nvvm"),
    "video": ("libvdpau_nvidia", "libnvidia-encode", "libnvidia-opticalflow", "libnvcuvid"),
}
BINARIES = {
    "utility": ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced"),
    "compute": ("nvidia-cuda-mps-control", "nvidia-cuda-mps-server"),
}
CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
_BIN_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin", "/bin", "/sbin")
_PERSISTENCED_SOCKET = "/run/nvidia-persistenced/socket"
_MOUNT_OPTIONS = ["ro", "nosuid", "nodev", "bind"]
_UUID = re.compile(r"GPU-[0-9a-fA-F-]{1,36}")
_INDEX = re.compile(r"[0-9]{1,6}")
_MIG = re.compile(r"MIG-.*|[0-9]+:[0-9]+", re.S)


class NoGpu(RuntimeFailure):
    """This host has no usable NVIDIA driver or GPU; the message says which part is missing."""


class GpuUnhealthy(RuntimeFailure):
    """A GPU asked for failed its health check; the message names the GPU and the reasons."""


# ---- the request -------------------------------------------------------------------------------------------------

class VisibleDevices(namedtuple("VisibleDevices", "mode ids")):
    """NVIDIA_VISIBLE_DEVICES parsed: `mode` is "void", "none", "all" or "list"; `ids` (for "list") holds int
    indexes and "GPU-..." UUID strings, each once, in the order given."""

    __slots__ = ()


def env_value(env: Sequence[str], name: str) -> str | None:
    """The value of `name` in a process.env list (the last definition wins), None when unset."""
    prefix = name + "="
    for entry in reversed(env):
        if entry.startswith(prefix):
            return entry[len(prefix):]
    return None


def parse_visible_devices(value: str | None) -> VisibleDevices:
    """Parse NVIDIA_VISIBLE_DEVICES; SpecError (field process.env) names the value and what is wrong with it."""
    if value is None or value in ("", "void"):
        return VisibleDevices("void", ())
    if value in ("none", "all"):
        return VisibleDevices(value, ())
    ids: list[int | str] = []
    for item in value.split(","):
        item = item.strip()
        if _INDEX.fullmatch(item):
            gpu_id: int | str = int(item)
        elif _UUID.fullmatch(item):
            gpu_id = item
        elif _MIG.fullmatch(item):
            raise SpecError("process.env", f"{VISIBLE_DEVICES}={value!r}: {item!r} is a MIG device; coldbrew does "
                                           "not support MIG")
        else:
            raise SpecError("process.env", f"{VISIBLE_DEVICES}={value!r}: {item!r} is not a GPU index, a GPU UUID "
                                           "(GPU-...), all, none or void")
        if gpu_id not in ids:
            ids.append(gpu_id)
    return VisibleDevices("list", tuple(ids))


def parse_driver_capabilities(value: str | None) -> frozenset[str]:
    """Parse NVIDIA_DRIVER_CAPABILITIES (unset or empty: utility,compute)."""
    if not value:
        return DEFAULT_CAPABILITIES
    result = set()
    for item in value.split(","):
        item = item.strip()
        if item == "all":
            result |= CAPABILITIES
        elif item in CAPABILITIES:
            result.add(item)
        elif item in _REFUSED_CAPABILITIES:
            raise SpecError("process.env", f"{DRIVER_CAPABILITIES}={value!r}: the {item!r} capability is not "
                                           "supported by coldbrew (it provides utility, compute and video)")
        else:
            raise SpecError("process.env", f"{DRIVER_CAPABILITIES}={value!r}: {item!r} is not a driver capability "
                                           "(utility, compute, video, all)")
    return frozenset(result)


def select_gpus(visible: VisibleDevices, gpus: Sequence[GpuInfo]) -> list[GpuInfo]:
    """The GPUs `visible` names among `gpus` (this host's, from gpuinfo.list_gpus). Refuses an index or UUID that
    matches no GPU (or several), and any selected GPU that failed its health check."""
    if visible.mode in ("void", "none"):
        return []
    if visible.mode == "all":
        selected = list(gpus)
    else:
        selected = []
        for gpu_id in visible.ids:
            if isinstance(gpu_id, int):
                matches = [g for g in gpus if g.index == gpu_id]
                what = f"index {gpu_id}"
            else:
                matches = [g for g in gpus if g.uuid and g.uuid.lower().startswith(gpu_id.lower())]
                what = f"UUID {gpu_id}"
            if not matches:
                raise SpecError("process.env", f"{VISIBLE_DEVICES}: no GPU with {what} on this host (it has "
                                               f"{_describe(gpus)})")
            if len(matches) > 1:
                raise SpecError("process.env", f"{VISIBLE_DEVICES}: {what} matches several GPUs: "
                                               f"{_describe(matches)}")
            if matches[0] not in selected:
                selected.append(matches[0])
    refuse_unhealthy(selected)
    return selected


def refuse_unhealthy(gpus: Iterable[GpuInfo]) -> None:
    """Raise GpuUnhealthy naming every GPU of `gpus` that failed its health check."""
    bad = [g for g in gpus if not g.healthy]
    if bad:
        raise GpuUnhealthy("; ".join(f"GPU {g.index} ({g.uuid or 'UUID unknown'}) failed its health check: "
                                     f"{', '.join(g.problems)}" for g in bad) + ": not handed out")


def refuse_unhealthy_nodes(devices: Iterable[CdiDevice]) -> None:
    """For CDI nvidia.com/gpu devices: find the GPUs behind their /dev/nvidiaN nodes and refuse unhealthy ones."""
    from .gpuinfo import list_gpus

    minors = []
    for device in devices:
        for node in device.edits.device_nodes:
            match = re.fullmatch(r"/dev/nvidia([0-9]+)", node["hostPath"] or node["path"])
            if match:
                minors.append((int(match.group(1)), str(device.qualified)))
    if not minors:
        return
    gpus = {g.minor: g for g in list_gpus()}
    selected = []
    for minor, name in minors:
        if minor not in gpus:
            raise NoGpu(f"CDI device {name} names /dev/nvidia{minor} but no GPU on this host has minor number {minor} "
                        "(a stale CDI spec? regenerate it: coldbrew gpu cdi)")
        selected.append(gpus[minor])
    refuse_unhealthy(selected)


def _describe(gpus: Sequence[GpuInfo]) -> str:
    if not gpus:
        return "no GPU"
    return ", ".join(f"{g.index}: {g.uuid}" for g in gpus)


# ---- the driver --------------------------------------------------------------------------------------------------

class Driver(namedtuple("Driver", "version libraries binaries firmware control_nodes ipc")):
    """The host's NVIDIA driver. `libraries` and `binaries` map a capability to host paths; `firmware` is the GSP
    firmware directory or None; `control_nodes` the non-GPU device nodes present; `ipc` sockets to share."""

    __slots__ = ()


def find_driver() -> Driver:
    """Look for the NVIDIA driver: its libraries (``ldconfig -p``, then the standard library directories), the kernel
    module's version, /dev/nvidiactl, binaries and firmware. NoGpu says what is missing."""
    lib_dirs = _library_dirs()
    if not any(os.path.exists(os.path.join(d, "libnvidia-ml.so.1")) for d in lib_dirs):
        raise NoGpu("no NVIDIA driver on this host (libnvidia-ml.so.1 not found)")
    try:
        with open("/proc/driver/nvidia/version") as f:
            version_text = f.read()
    except FileNotFoundError:
        raise NoGpu("no NVIDIA driver on this host (libnvidia-ml.so.1 is installed but the nvidia kernel module is "
                    "not loaded: /proc/driver/nvidia/version is missing)") from None
    match = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+([0-9]+(?:\.[0-9]+)+)", version_text)
    if not match:
        raise NoGpu(f"cannot read the driver version from /proc/driver/nvidia/version: {version_text[:200]!r}")
    version = match.group(1)
    if not os.path.exists("/dev/nvidiactl"):
        raise NoGpu("the NVIDIA driver is loaded but /dev/nvidiactl is missing (create the device nodes, for "
                    "instance with nvidia-modprobe -c 0 -u)")
    libraries = {cap: _driver_libraries(lib_dirs, names, version) for cap, names in LIBRARIES.items()}
    if not any(os.path.basename(p) == f"libnvidia-ml.so.{version}" for p in libraries["utility"]):
        raise NoGpu(f"the NVIDIA user-space libraries do not match the kernel module {version} "
                    f"(no libnvidia-ml.so.{version} next to libnvidia-ml.so.1): reinstall the driver")
    binaries = {cap: _binaries(names) for cap, names in BINARIES.items()}
    firmware = f"/lib/firmware/nvidia/{version}"
    return Driver(version=version, libraries=libraries, binaries=binaries,
                  firmware=firmware if os.path.isdir(firmware) else None,
                  control_nodes=tuple(p for p in CONTROL_NODES if os.path.exists(p)),
                  ipc=(_PERSISTENCED_SOCKET,) if os.path.exists(_PERSISTENCED_SOCKET) else ())


def _library_dirs() -> list[str]:
    """Directories holding 64-bit NVIDIA libraries: those ``ldconfig -p`` lists them in, then the standard ones."""
    dirs = []
    for path in _ldcache_paths():
        if os.path.basename(path).startswith(("libnvidia-ml.so", "libcuda.so")) and _is_native_elf(path):
            dirs.append(os.path.dirname(path))
    triplet = f"{os.uname().machine}-linux-gnu"
    dirs += [f"/usr/lib/{triplet}", f"/lib/{triplet}", "/usr/lib64", "/lib64", "/usr/lib", "/lib"]
    result = []
    for d in dirs:
        real = os.path.realpath(d)  # /lib -> /usr/lib on merged-/usr systems: one directory, its canonical name
        if real not in result and os.path.isdir(real):
            result.append(real)
    return result


def _ldcache_paths() -> list[str]:
    import subprocess

    for ldconfig in ("/sbin/ldconfig", "/usr/sbin/ldconfig"):
        if os.path.exists(ldconfig):
            try:
                output = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                return []
            return [line.rsplit(" => ", 1)[1].strip() for line in output.splitlines() if " => " in line]
    return []


def _is_native_elf(path: str) -> bool:
    """Whether `path` is an ELF file of this interpreter's word size (ldconfig -p also lists 32-bit libraries)."""
    try:
        with open(path, "rb") as f:
            header = f.read(5)
    except OSError:
        return False
    return header[:4] == b"\x7fELF" and header[4] == (2 if sys.maxsize > 2**32 else 1)  # EI_CLASS: 1 = 32, 2 = 64


def _driver_libraries(lib_dirs: Sequence[str], names: Sequence[str], version: str) -> list[str]:
    """Each ``NAME.so.<version>`` file in `lib_dirs` and the ``NAME.so.N`` links that resolve to it."""
    found = []
    for directory in lib_dirs:
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            real_name = f"{name}.so.{version}"
            if real_name not in entries or not os.path.isfile(os.path.join(directory, real_name)):
                continue
            real = os.path.realpath(os.path.join(directory, real_name))
            for entry in sorted(entries):
                if entry == real_name or (entry.startswith(f"{name}.so.") and
                                          os.path.realpath(os.path.join(directory, entry)) == real):
                    found.append(os.path.join(directory, entry))
    return found


def _binaries(names: Sequence[str]) -> list[str]:
    found, seen = [], set()
    for name in names:
        for directory in _BIN_DIRS:
            path = os.path.join(directory, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                real = os.path.realpath(path)
                if real not in seen:
                    seen.add(real)
                    found.append(path if os.path.realpath(directory) == directory else real)
                break
    return found


def _driver_edits(driver: Driver, capabilities: Iterable[str]) -> dict:
    """A containerEdits object (CDI form) with the driver's control nodes and mounts for `capabilities`."""
    paths = []
    for cap in sorted(capabilities):
        paths += driver.libraries.get(cap, []) + driver.binaries.get(cap, [])
    if "utility" in capabilities:
        paths += list(driver.ipc)
    mounts = [{"hostPath": p, "containerPath": p, "options": list(_MOUNT_OPTIONS)} for p in paths]
    if driver.firmware:
        mounts.append({"hostPath": os.path.realpath(driver.firmware), "containerPath": driver.firmware,
                       "options": list(_MOUNT_OPTIONS)})
    return {"deviceNodes": [{"path": p} for p in driver.control_nodes], "mounts": mounts}


def _mig_cap_nodes(env: Sequence[str], process: dict) -> list[dict]:
    """/dev/nvidia-caps nodes for NVIDIA_MIG_CONFIG_DEVICES=all and NVIDIA_MIG_MONITOR_DEVICES=all."""
    nodes = []
    for variable, cap in (("NVIDIA_MIG_CONFIG_DEVICES", "config"), ("NVIDIA_MIG_MONITOR_DEVICES", "monitor")):
        value = env_value(env, variable)
        if value in (None, ""):
            continue
        if value != "all":
            raise SpecError("process.env", f"{variable}={value!r}: only 'all' is supported")
        if cap == "config":
            capabilities = process.get("capabilities") if isinstance(process.get("capabilities"), dict) else {}
            if "CAP_SYS_ADMIN" not in (capabilities.get("bounding") or ()):
                raise SpecError("process.env", f"{variable}=all needs CAP_SYS_ADMIN in "
                                               "process.capabilities.bounding (MIG configuration is privileged)")
        minor = _mig_minor(cap)
        nodes.append({"path": f"/dev/nvidia-caps/nvidia-cap{minor}"})
    return nodes


def _mig_minor(cap: str) -> int:
    try:
        with open("/proc/driver/nvidia-caps/mig-minors") as f:
            for line in f:
                name, _, minor = line.partition(" ")
                if name == cap:
                    return int(minor)
    except (OSError, ValueError):
        pass
    raise NoGpu(f"the MIG {cap} capability is not in /proc/driver/nvidia-caps/mig-minors on this host")


def container_edits(env: Sequence[str], process: dict) -> ContainerEdits:
    """The container edits for the NVIDIA_* variables in `env` (a process.env list), health checked."""
    from .cdi import ContainerEdits, parse_edits

    value = env_value(env, VISIBLE_DEVICES)
    visible = parse_visible_devices(value)
    capabilities = parse_driver_capabilities(env_value(env, DRIVER_CAPABILITIES))
    mig_nodes = _mig_cap_nodes(env, process)
    if visible.mode == "void":
        return ContainerEdits()
    driver = find_driver()
    gpus: list[GpuInfo] = []
    if visible.mode != "none":
        from .gpuinfo import list_gpus

        gpus = select_gpus(visible, list_gpus())
    edits = _driver_edits(driver, capabilities)
    edits["deviceNodes"] += [{"path": f"/dev/nvidia{g.minor}"} for g in gpus] + mig_nodes
    return parse_edits(edits, f"{VISIBLE_DEVICES}={value}", "containerEdits")


# ---- the CDI spec generator --------------------------------------------------------------------------------------

def generate_cdi_spec() -> dict:
    """A CDI spec (kind nvidia.com/gpu) for this host: devices ``0``..``N-1``, each GPU's UUID, and ``all``; the
    driver's nodes and mounts (every capability coldbrew provides) as the spec's common edits. The spec sets
    NVIDIA_VISIBLE_DEVICES=void in the container, so that an image's own NVIDIA_VISIBLE_DEVICES does not inject
    GPUs a second time (nvidia-ctk's specs do the same). Health is checked when a container asks, not here."""
    from .gpuinfo import list_gpus

    driver = find_driver()
    gpus = [g for g in list_gpus() if g.minor is not None]  # without its minor number a GPU has no node to name
    if not gpus:
        raise NoGpu(f"the NVIDIA driver {driver.version} is loaded but reports no GPU")
    devices = []
    for gpu in gpus:
        node = {"deviceNodes": [{"path": f"/dev/nvidia{gpu.minor}"}]}
        devices.append({"name": str(gpu.index), "containerEdits": node})
        if gpu.uuid:
            devices.append({"name": gpu.uuid, "containerEdits": json.loads(json.dumps(node))})
    devices.append({"name": "all", "containerEdits": {"deviceNodes": [{"path": f"/dev/nvidia{g.minor}"}
                                                                      for g in gpus]}})
    edits = _driver_edits(driver, CAPABILITIES)
    edits["env"] = [f"{VISIBLE_DEVICES}=void"]
    return {"cdiVersion": "0.5.0", "kind": CDI_KIND, "devices": devices, "containerEdits": edits}


def write_cdi_spec(spec: dict, path: str = DEFAULT_CDI_SPEC_PATH) -> str:
    """Validate `spec` and write it to `path` atomically (a temporary file renamed over it): JSON for a .json path,
    YAML otherwise (as the reference implementation writes). CDI readers look only at .json and .yaml files."""
    from .cdi import validate_spec

    validate_spec(spec, path)
    if path.endswith(".json"):
        text = json.dumps(spec, indent=2) + "\n"
    else:
        import yaml

        text = yaml.safe_dump(spec, sort_keys=False, default_flow_style=False)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o755, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with open(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)  # the rename itself survives a crash
    finally:
        os.close(dirfd)
    return path
