"""GPU memory in snapshots: the CUDA driver's process checkpoint API (libcuda.so.1), called through ctypes.

The driver (NVIDIA r570 and later) can move a process's whole GPU state into that process's own host memory and back:

- dump: lock every CUDA process of the container (RUNNING -> LOCKED: CUDA calls that would change GPU state block,
  work already submitted drains), then checkpoint each (LOCKED -> CHECKPOINTED: device memory is copied into host
  allocations the driver owns inside the process, and every GPU handle is released: no /dev/nvidia* descriptor and no
  device mapping is left). CRIU then dumps an ordinary process, GPU memory included.
- restore: CRIU brings the processes back, still CHECKPOINTED (their CUDA calls block); restore each (CHECKPOINTED ->
  LOCKED: GPUs re-opened from inside the process, memory copied back to the same device addresses), then unlock each
  (LOCKED -> RUNNING).

NVIDIA's cuda-checkpoint utility and CRIU's cuda_plugin drive the same calls in the same order. Pids are host pids
(this process's pid namespace; CRIU's plugin passes the restored task's real pid too). The driver does the work in a
helper thread of the target process, so the target must be running, not frozen: locking and checkpointing come before
CRIU freezes the container, restoring after CRIU lets it go. Restore needs cuInit in the calling process, which loading
the driver here does. Not supported by the driver: managed (UVM) memory, CUDA IPC, MPS and MIG.

Nothing here is imported or loaded until it is used: a host without a GPU never opens libcuda.
"""

from __future__ import annotations

import os
import re
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

from .errors import CudaError, CudaUnavailable, SnapshotError

LIBRARY = "libcuda.so.1"
LIBRARY_ENV = "COLDBREW_LIBCUDA"  # a libcuda to load instead (one outside the dynamic loader's path)
NVIDIA_MAJOR = 195  # the kernel module's fixed major: /dev/nvidiaN, /dev/nvidiactl (255), /dev/nvidia-modeset (254)
_CONTROL_MINORS = frozenset({254, 255})
DEFAULT_LOCK_TIMEOUT_MS = 30_000
PROC_DRIVER = "/proc/driver/nvidia"

CHECKPOINT_API = ("cuCheckpointProcessGetState", "cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint",
                  "cuCheckpointProcessRestore", "cuCheckpointProcessUnlock")

# CUresult (cuda.h, CUDA 13): the names for codes when the driver cannot name them itself (cuGetErrorName)
RESULT_NAMES = {
    0: "CUDA_SUCCESS", 1: "CUDA_ERROR_INVALID_VALUE", 2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED", 4: "CUDA_ERROR_DEINITIALIZED", 5: "CUDA_ERROR_PROFILER_DISABLED",
    6: "CUDA_ERROR_PROFILER_NOT_INITIALIZED", 7: "CUDA_ERROR_PROFILER_ALREADY_STARTED",
    8: "CUDA_ERROR_PROFILER_ALREADY_STOPPED", 34: "CUDA_ERROR_STUB_LIBRARY", 46: "CUDA_ERROR_DEVICE_UNAVAILABLE",
    100: "CUDA_ERROR_NO_DEVICE", 101: "CUDA_ERROR_INVALID_DEVICE", 102: "CUDA_ERROR_DEVICE_NOT_LICENSED",
    200: "CUDA_ERROR_INVALID_IMAGE", 201: "CUDA_ERROR_INVALID_CONTEXT", 202: "CUDA_ERROR_CONTEXT_ALREADY_CURRENT",
    205: "CUDA_ERROR_MAP_FAILED", 206: "CUDA_ERROR_UNMAP_FAILED", 207: "CUDA_ERROR_ARRAY_IS_MAPPED",
    208: "CUDA_ERROR_ALREADY_MAPPED", 209: "CUDA_ERROR_NO_BINARY_FOR_GPU", 210: "CUDA_ERROR_ALREADY_ACQUIRED",
    211: "CUDA_ERROR_NOT_MAPPED", 212: "CUDA_ERROR_NOT_MAPPED_AS_ARRAY", 213: "CUDA_ERROR_NOT_MAPPED_AS_POINTER",
    214: "CUDA_ERROR_ECC_UNCORRECTABLE", 215: "CUDA_ERROR_UNSUPPORTED_LIMIT", 216: "CUDA_ERROR_CONTEXT_ALREADY_IN_USE",
    217: "CUDA_ERROR_PEER_ACCESS_UNSUPPORTED", 218: "CUDA_ERROR_INVALID_PTX",
    219: "CUDA_ERROR_INVALID_GRAPHICS_CONTEXT", 220: "CUDA_ERROR_NVLINK_UNCORRECTABLE",
    221: "CUDA_ERROR_JIT_COMPILER_NOT_FOUND", 222: "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
    223: "CUDA_ERROR_JIT_COMPILATION_DISABLED", 224: "CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY",
    225: "CUDA_ERROR_UNSUPPORTED_DEVSIDE_SYNC", 226: "CUDA_ERROR_CONTAINED", 300: "CUDA_ERROR_INVALID_SOURCE",
    301: "CUDA_ERROR_FILE_NOT_FOUND", 302: "CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND",
    303: "CUDA_ERROR_SHARED_OBJECT_INIT_FAILED", 304: "CUDA_ERROR_OPERATING_SYSTEM", 400: "CUDA_ERROR_INVALID_HANDLE",
    401: "CUDA_ERROR_ILLEGAL_STATE", 402: "CUDA_ERROR_LOSSY_QUERY", 500: "CUDA_ERROR_NOT_FOUND",
    600: "CUDA_ERROR_NOT_READY", 700: "CUDA_ERROR_ILLEGAL_ADDRESS", 701: "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
    702: "CUDA_ERROR_LAUNCH_TIMEOUT", 703: "CUDA_ERROR_LAUNCH_INCOMPATIBLE_TEXTURING",
    704: "CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED", 705: "CUDA_ERROR_PEER_ACCESS_NOT_ENABLED",
    708: "CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE", 709: "CUDA_ERROR_CONTEXT_IS_DESTROYED", 710: "CUDA_ERROR_ASSERT",
    711: "CUDA_ERROR_TOO_MANY_PEERS", 712: "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED",
    713: "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED", 714: "CUDA_ERROR_HARDWARE_STACK_ERROR",
    715: "CUDA_ERROR_ILLEGAL_INSTRUCTION", 716: "CUDA_ERROR_MISALIGNED_ADDRESS",
    717: "CUDA_ERROR_INVALID_ADDRESS_SPACE", 718: "CUDA_ERROR_INVALID_PC", 719: "CUDA_ERROR_LAUNCH_FAILED",
    720: "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE", 721: "CUDA_ERROR_TENSOR_MEMORY_LEAK",
    800: "CUDA_ERROR_NOT_PERMITTED", 801: "CUDA_ERROR_NOT_SUPPORTED", 802: "CUDA_ERROR_SYSTEM_NOT_READY",
    803: "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH", 804: "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
    805: "CUDA_ERROR_MPS_CONNECTION_FAILED", 806: "CUDA_ERROR_MPS_RPC_FAILURE", 807: "CUDA_ERROR_MPS_SERVER_NOT_READY",
    808: "CUDA_ERROR_MPS_MAX_CLIENTS_REACHED", 809: "CUDA_ERROR_MPS_MAX_CONNECTIONS_REACHED",
    810: "CUDA_ERROR_MPS_CLIENT_TERMINATED", 811: "CUDA_ERROR_CDP_NOT_SUPPORTED",
    812: "CUDA_ERROR_CDP_VERSION_MISMATCH",
    900: "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", 901: "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
    902: "CUDA_ERROR_STREAM_CAPTURE_MERGE", 903: "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED",
    904: "CUDA_ERROR_STREAM_CAPTURE_UNJOINED", 905: "CUDA_ERROR_STREAM_CAPTURE_ISOLATION",
    906: "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT", 907: "CUDA_ERROR_CAPTURED_EVENT",
    908: "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD", 909: "CUDA_ERROR_TIMEOUT",
    910: "CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE",
    911: "CUDA_ERROR_EXTERNAL_DEVICE", 912: "CUDA_ERROR_INVALID_CLUSTER_SIZE", 913: "CUDA_ERROR_FUNCTION_NOT_LOADED",
    914: "CUDA_ERROR_INVALID_RESOURCE_TYPE", 915: "CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION",
    916: "CUDA_ERROR_KEY_ROTATION", 999: "CUDA_ERROR_UNKNOWN",
}
# CUprocessState; 4 and 5 are transient states of newer drivers
PROCESS_STATES = {0: "running", 1: "locked", 2: "checkpointed", 3: "failed", 4: "checkpointing", 5: "restoring"}

# What the checkpoint calls' errors usually mean
_HINTS = {
    "CUDA_ERROR_NOT_SUPPORTED": "the process uses what CUDA cannot checkpoint (managed/UVM memory, CUDA IPC, MPS, "
                                "MIG)",
    "CUDA_ERROR_TIMEOUT": "its submitted GPU work did not finish within the lock timeout",
    "CUDA_ERROR_OUT_OF_MEMORY": "the GPU has too little free memory for the process's checkpointed memory",
    "CUDA_ERROR_ILLEGAL_STATE": "the process is not in the CUDA state this step needs",
    "CUDA_ERROR_NO_DEVICE": "the driver finds no GPU this process may use",
}

_DRIVERS: dict[str, "Driver"] = {}


def error_name(code: int) -> str:
    """cuda.h's name of a CUresult, as far as this module knows them."""
    return RESULT_NAMES.get(code, f"CUresult {code}")


class Driver:
    """libcuda.so.1, initialised (cuInit), with its process checkpoint calls bound.

    CudaUnavailable when it cannot be loaded or lacks the checkpoint API (drivers before r570).
    """

    def __init__(self, library: str = LIBRARY) -> None:
        import ctypes

        self.library = library
        try:
            lib = ctypes.CDLL(library)
        except OSError as e:
            raise CudaUnavailable(f"cannot load {library}, the NVIDIA driver's CUDA library ({e}): GPU state can be "
                                  "checkpointed only where the NVIDIA driver is installed") from None
        missing = [name for name in ("cuInit", "cuDriverGetVersion", *CHECKPOINT_API) if not hasattr(lib, name)]
        version = None
        if "cuDriverGetVersion" not in missing:
            lib.cuDriverGetVersion.argtypes = [ctypes.POINTER(ctypes.c_int)]
            lib.cuDriverGetVersion.restype = ctypes.c_int
            value = ctypes.c_int()
            if lib.cuDriverGetVersion(ctypes.byref(value)) == 0:
                version = value.value
        self.version = version or 0  # the CUDA version the driver implements, e.g. 13000 for 13.0
        if missing:
            known = [f"NVIDIA driver {v}" for v in (host_driver_version(),) if v]
            known += [f"CUDA {cuda_version_string(version)}"] if version else []
            what = ", ".join(known) or "a driver of unknown version"
            raise CudaUnavailable(f"{library} ({what}) lacks {missing[0]}: checkpointing GPU state needs the CUDA "
                                  "driver's checkpoint API, in NVIDIA drivers r570 and later")
        self._lib = lib
        self._ctypes = ctypes
        self._get_error_name = getattr(lib, "cuGetErrorName", None)
        if self._get_error_name is not None:
            self._get_error_name.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
            self._get_error_name.restype = ctypes.c_int
        pid_and = {
            "cuCheckpointProcessGetState": ctypes.POINTER(ctypes.c_int),
            "cuCheckpointProcessLock": ctypes.POINTER(_types()["LockArgs"]),
            "cuCheckpointProcessCheckpoint": ctypes.c_void_p,
            "cuCheckpointProcessRestore": ctypes.POINTER(_types()["RestoreArgs"]),
            "cuCheckpointProcessUnlock": ctypes.c_void_p,
        }
        for name, second in pid_and.items():
            function = getattr(lib, name)
            function.argtypes = [ctypes.c_int, second]
            function.restype = ctypes.c_int
        lib.cuInit.argtypes = [ctypes.c_uint]
        lib.cuInit.restype = ctypes.c_int
        self._check("cuInit", lib.cuInit(0))  # the checkpoint calls need it; restore in particular

    def __repr__(self) -> str:
        return f"Driver({self.library!r}, cuda={cuda_version_string(self.version)})"

    def error_name(self, code: int) -> str:
        """The driver's own name for `code` (cuGetErrorName), else cuda.h's as transcribed here."""
        if self._get_error_name is not None:
            name = self._ctypes.c_char_p()
            if self._get_error_name(code, self._ctypes.byref(name)) == 0 and name.value:
                return name.value.decode(errors="replace")
        return error_name(code)

    def _check(self, function: str, code: int, pid: int | None = None) -> None:
        if code != 0:
            name = self.error_name(code)
            raise CudaError(function, code, name, pid, _HINTS.get(name, ""))

    def state(self, pid: int) -> str:
        """running, locked, checkpointed or failed (cuCheckpointProcessGetState)."""
        value = self._ctypes.c_int(-1)
        self._check("cuCheckpointProcessGetState",
                    self._lib.cuCheckpointProcessGetState(pid, self._ctypes.byref(value)), pid)
        return PROCESS_STATES.get(value.value, f"state {value.value}")

    def lock(self, pid: int, timeout_ms: int) -> None:
        """RUNNING -> LOCKED, waiting at most `timeout_ms` (0: forever) for submitted work to drain."""
        args = _types()["LockArgs"](timeoutMs=timeout_ms)
        self._check("cuCheckpointProcessLock", self._lib.cuCheckpointProcessLock(pid, self._ctypes.byref(args)), pid)

    def checkpoint(self, pid: int) -> None:
        """LOCKED -> CHECKPOINTED: device memory into the process's host memory, GPU handles released."""
        self._check("cuCheckpointProcessCheckpoint", self._lib.cuCheckpointProcessCheckpoint(pid, None), pid)

    def restore(self, pid: int, gpu_pairs: tuple[tuple[str, str], ...] = ()) -> None:
        """CHECKPOINTED -> LOCKED, on the GPUs it had, or each (old UUID, new UUID) of `gpu_pairs` remapped."""
        args = None
        if gpu_pairs:
            types = _types()
            pairs = (types["GpuPair"] * len(gpu_pairs))(*[types["GpuPair"](_uuid_bytes(old), _uuid_bytes(new))
                                                          for old, new in gpu_pairs])
            args = self._ctypes.byref(types["RestoreArgs"](gpuPairs=self._ctypes.cast(pairs, self._ctypes.c_void_p),
                                                           gpuPairsCount=len(gpu_pairs)))
        self._check("cuCheckpointProcessRestore", self._lib.cuCheckpointProcessRestore(pid, args), pid)

    def unlock(self, pid: int) -> None:
        """LOCKED -> RUNNING: its CUDA calls go on."""
        self._check("cuCheckpointProcessUnlock", self._lib.cuCheckpointProcessUnlock(pid, None), pid)


_TYPES: dict[str, type] = {}


def _types() -> dict[str, type]:
    """The argument structures of the checkpoint calls, made on first use (ctypes stays unimported until then).
    Each *Args is 64 bytes; what is not named here is reserved and must be zero (ctypes zeroes it)."""
    if not _TYPES:
        import ctypes

        class LockArgs(ctypes.Structure):  # CUcheckpointLockArgs
            _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint),
                        ("reserved1", ctypes.c_uint64 * 7)]

        class GpuPair(ctypes.Structure):  # CUcheckpointGpuPair: two CUuuid
            _fields_ = [("oldUuid", ctypes.c_ubyte * 16), ("newUuid", ctypes.c_ubyte * 16)]

        class RestoreArgs(ctypes.Structure):  # CUcheckpointRestoreArgs; the GPU pairs remap GPUs (r580)
            _fields_ = [("gpuPairs", ctypes.c_void_p), ("gpuPairsCount", ctypes.c_uint),
                        ("reserved", ctypes.c_ubyte * 52)]

        _TYPES.update(LockArgs=LockArgs, GpuPair=GpuPair, RestoreArgs=RestoreArgs)
    return _TYPES


def _uuid_bytes(uuid: str) -> Any:
    """A GPU UUID as the driver prints it (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx) as a CUuuid's 16 bytes."""
    import ctypes

    hexdigits = uuid.removeprefix("GPU-").replace("-", "")
    try:
        raw = bytes.fromhex(hexdigits)
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise SnapshotError(f"GPU UUID {uuid!r} is malformed (want GPU- and 32 hex digits)")
    return (ctypes.c_ubyte * 16)(*raw)


def cuda_version_string(version: int | None) -> str:
    """13000 -> "13.0" (cuDriverGetVersion's encoding: 1000 * major + 10 * minor)."""
    if not version:
        return "unknown"
    return f"{version // 1000}.{version % 1000 // 10}"


def load_driver(library: str | None = None) -> Driver:
    """The driver, loaded and initialised once per library: `library`, $COLDBREW_LIBCUDA, else libcuda.so.1."""
    library = library or os.environ.get(LIBRARY_ENV) or LIBRARY
    if library not in _DRIVERS:
        _DRIVERS[library] = Driver(library)
    return _DRIVERS[library]


# ---- which processes hold a GPU -------------------------------------------------------------------------------------

def _nvidia_node(path: str, mode: int, rdev: int) -> bool:
    """Whether a file is one of the NVIDIA driver's device nodes (nvidia-uvm's major is dynamic: known by name)."""
    return stat.S_ISCHR(mode) and (os.major(rdev) == NVIDIA_MAJOR or path.startswith("/dev/nvidia"))


def _nvidia_files(pid: int) -> list[tuple[str, int]] | None:
    """(path, rdev) of the NVIDIA device nodes `pid` has open, and the paths (rdev -1) it has mapped; None if gone."""
    found = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if _nvidia_node(target, st.st_mode, st.st_rdev):
            found.append((target, st.st_rdev))
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) == 6 and fields[5].startswith("/dev/nvidia"):
                    found.append((fields[5].rstrip("\n"), -1))
    except OSError:
        return None
    return found


def cuda_pids(pids: Iterable[int]) -> list[int]:
    """Those of `pids` that hold an NVIDIA GPU: one of the driver's device nodes open or mapped. A process whose CUDA
    state is checkpointed holds none."""
    return [pid for pid in pids if _nvidia_files(pid)]


def gpu_minors(pids: Iterable[int]) -> set[int]:
    """The minors of the /dev/nvidiaN GPUs (not the control nodes) that `pids` have open."""
    minors = set()
    for pid in pids:
        for _, rdev in _nvidia_files(pid) or ():
            if rdev >= 0 and os.major(rdev) == NVIDIA_MAJOR and os.minor(rdev) not in _CONTROL_MINORS:
                minors.add(os.minor(rdev))
    return minors


def ns_pid(pid: int) -> int:
    """`pid` as its own (innermost) pid namespace numbers it: the number CRIU restores it with."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    return pid  # a kernel without NSpid (before 4.1): no nested namespaces to tell apart


# ---- the checkpoint steps -------------------------------------------------------------------------------------------

def gpu_state(pid: int, *, driver: Driver | None = None) -> str:
    """The CUDA state of host pid `pid`: running, locked, checkpointed or failed."""
    return (driver or load_driver()).state(pid)


def checkpoint_gpu(pids: list[int], timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS, *,
                   driver: Driver | None = None) -> None:
    """Lock every process of `pids`, then checkpoint each: afterwards their GPU memory is in their host memory and
    they hold no GPU. If a step fails, those already changed are brought back to running, and the CudaError says
    which call failed on which process."""
    cuda = driver or load_driver()
    locked: list[int] = []
    try:
        for pid in pids:
            cuda.lock(pid, timeout_ms)
            locked.append(pid)
        for pid in pids:
            cuda.checkpoint(pid)
    except CudaError as error:
        for problem in _back_to_running(cuda, locked):
            error.add_note(problem)
        raise


def restore_gpu(pids: list[int], gpu_pairs: tuple[tuple[str, str], ...] = (), *,
                driver: Driver | None = None) -> None:
    """Restore every checkpointed process of `pids` (onto the same GPUs, or remapped by (old UUID, new UUID)
    `gpu_pairs`), then unlock each: their CUDA calls go on."""
    cuda = driver or load_driver()
    for pid in pids:
        cuda.restore(pid, gpu_pairs)
    for pid in pids:
        cuda.unlock(pid)


def _back_to_running(cuda: Driver, pids: list[int]) -> list[str]:
    """Best effort after a failed step: each of `pids` from whatever state it reached back to running. What could not
    be undone, one line each."""
    problems = []
    for pid in pids:
        try:
            state = cuda.state(pid)
            if state == "checkpointed":
                cuda.restore(pid)
                state = "locked"
            if state == "locked":
                cuda.unlock(pid)
            elif state != "running":
                problems.append(f"process {pid} is left in CUDA state {state}")
        except CudaError as e:
            problems.append(f"process {pid} could not be brought back to running: {e}")
    return problems


# ---- which GPU and driver a snapshot needs ---------------------------------------------------------------------------

def parse_driver_version(text: str) -> str | None:
    """The version in /proc/driver/nvidia/version's first line ("NVRM version: NVIDIA UNIX ... Kernel Module ...
    580.65.06  Release Build ...")."""
    first = text.split("\n", 1)[0]
    if not first.startswith("NVRM version:"):
        return None
    match = re.search(r"\s(\d+\.\d+(?:\.\d+)*)(?:\s|$)", first)
    return match.group(1) if match else None


def host_driver_version() -> str | None:
    """The loaded NVIDIA kernel module's version; None where there is none (or /proc does not show it)."""
    try:
        with open(os.path.join(PROC_DRIVER, "version")) as f:
            return parse_driver_version(f.read())
    except OSError:
        return None


def parse_information(text: str) -> dict[str, str]:
    """The "Key: value" lines of /proc/driver/nvidia/gpus/BUS/information."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def host_gpus() -> list[dict[str, Any]]:
    """The GPUs the NVIDIA kernel module drives: [{uuid, model, minor, bus}], by minor."""
    gpus = []
    directory = os.path.join(PROC_DRIVER, "gpus")
    try:
        buses = sorted(os.listdir(directory))
    except OSError:
        return []
    for bus in buses:
        try:
            with open(os.path.join(directory, bus, "information")) as f:
                fields = parse_information(f.read())
        except OSError:
            continue
        minor = fields.get("Device Minor", "")
        if fields.get("GPU UUID") and minor.isdigit():
            gpus.append({"uuid": fields["GPU UUID"], "model": fields.get("Model", "unknown"), "minor": int(minor),
                         "bus": bus})
    return sorted(gpus, key=lambda gpu: gpu["minor"])


def gpu_record(pids: list[int], *, driver: Driver | None = None) -> dict[str, Any]:
    """What a snapshot of `pids` (holding their GPUs still) records to be restored only where that can work: the
    driver's version, the CUDA version it implements, and the GPUs they have open."""
    minors = gpu_minors(pids)
    return {"driver": host_driver_version(), "cuda_version": (driver or load_driver()).version,
            "devices": [gpu for gpu in host_gpus() if gpu["minor"] in minors]}


def check_driver(recorded: dict[str, Any], host_driver: str | None, host_cuda_version: int | None) -> None:
    """SnapshotError unless this host's driver is the one the GPU state was checkpointed under."""
    wanted = recorded.get("driver")
    if wanted and host_driver != wanted:
        here = f"this host runs NVIDIA driver {host_driver}" if host_driver else \
            f"this host has no NVIDIA driver loaded (no {PROC_DRIVER}/version)"
        raise SnapshotError(f"the snapshot holds GPU memory checkpointed under NVIDIA driver {wanted}; {here}: the "
                            "CUDA driver restores GPU state only under the driver version that checkpointed it")
    wanted_cuda = recorded.get("cuda_version")
    if wanted_cuda and host_cuda_version is not None and host_cuda_version != wanted_cuda:
        raise SnapshotError(f"the snapshot holds GPU memory checkpointed by a CUDA {cuda_version_string(wanted_cuda)} "
                            f"driver; this host's implements CUDA {cuda_version_string(host_cuda_version)}")


def match_gpus(recorded: list[dict[str, Any]], here: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """(old UUID, new UUID) for each recorded GPU not on this host, matched to a GPU of the same model at the same
    /dev/nvidiaN (the node the container's /dev has); SnapshotError where there is none."""
    present = {gpu["uuid"] for gpu in here}
    pairs = []
    for gpu in recorded:
        if gpu["uuid"] in present:
            continue
        same = [g for g in here if g["model"] == gpu["model"] and g["minor"] == gpu["minor"]]
        if not same:
            have = ", ".join(f"{g['model']} at /dev/nvidia{g['minor']}" for g in here) or "no NVIDIA GPU"
            raise SnapshotError(f"the snapshot holds GPU memory of a {gpu['model']} at /dev/nvidia{gpu['minor']} "
                                f"({gpu['uuid']}); this host has {have}: CUDA restores GPU state only onto the same "
                                "GPU model")
        pairs.append((gpu["uuid"], same[0]["uuid"]))
    return tuple(pairs)


def plan_restore(recorded: dict[str, Any]) -> tuple[Driver, tuple[tuple[str, str], ...]]:
    """Check that this host can take the recorded GPU state back: (the driver to do it with, GPU pairs to remap)."""
    check_driver(recorded, host_driver_version(), None)  # says "no NVIDIA driver here" before libcuda is looked for
    driver = load_driver()
    check_driver(recorded, host_driver_version(), driver.version)
    return driver, match_gpus(recorded.get("devices", []), host_gpus())
