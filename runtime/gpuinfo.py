"""GPU inventory and health through NVML (nvidia-ml-py's `pynvml`), for the scheduler and for the runtime's refusal
to hand out a failing GPU.

Health verdict (`assess`): a GPU fails its check when NVML reports it lost, when it has uncorrectable ECC errors
since the driver loaded (volatile count), when retired pages or remapped rows are pending (the GPU needs a reset
before its memory is trustworthy) or row remapping failed, when a hardware slowdown is active (HW slowdown, HW
thermal slowdown, HW power brake: a fault in cooling or power, not load), when its temperature is at or above its
slowdown threshold, or when NVML cannot tell its device node (minor number). Corrected ECC errors, aggregate
(lifetime) counts and software throttling are reported but are not failures. A reading the GPU does not support is
None and counts as no evidence either way.

On a host without the driver `list_gpus` raises gpu.NoGpu with a message saying what is missing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .errors import RuntimeFailure
from .gpu import NoGpu

# NVML's clock event (throttle) reason bits, named as nvidia-smi names them.
THROTTLE_REASONS = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
FAILING_THROTTLE_REASONS = ("hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown")


@dataclass(frozen=True)
class EccCounts:
    """ECC error counts: volatile = since the driver loaded, aggregate = over the GPU's life. None: not readable."""

    volatile_corrected: int | None = None
    volatile_uncorrected: int | None = None
    aggregate_corrected: int | None = None
    aggregate_uncorrected: int | None = None


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML sees it. Memory in bytes, temperatures in degrees Celsius."""

    index: int
    uuid: str | None = None
    name: str | None = None  # the model, e.g. "NVIDIA H100 80GB HBM3"
    minor: int | None = None  # N of /dev/nvidiaN
    pci_bus_id: str | None = None
    memory_total: int | None = None
    memory_used: int | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None  # the CUDA version the driver supports, e.g. "13.0"
    ecc_enabled: bool | None = None
    ecc: EccCounts = field(default_factory=EccCounts)
    temperature: int | None = None
    temperature_slowdown: int | None = None
    throttle_reasons: tuple[str, ...] = ()
    retired_pages: int | None = None
    retired_pages_pending: bool | None = None
    remapped_rows_pending: bool | None = None
    remapped_rows_failed: bool | None = None
    lost: bool = False
    problems: tuple[str, ...] = ()  # why it fails its health check; empty = healthy

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "healthy": self.healthy}


def assess(gpu: GpuInfo) -> tuple[str, ...]:
    """The reasons `gpu` (its readings; `problems` ignored) fails its health check, empty when it passes."""
    problems = []
    if gpu.lost:
        problems.append("NVML reports the GPU lost (fallen off the bus): it needs a reset or a reboot")
    elif gpu.minor is None:
        problems.append("NVML gives no minor number: its /dev/nvidiaN node is unknown")
    if gpu.ecc.volatile_uncorrected:
        problems.append(f"{gpu.ecc.volatile_uncorrected} uncorrectable ECC errors since the driver loaded")
    if gpu.retired_pages_pending:
        problems.append("retired memory pages are pending: the GPU needs a reset")
    if gpu.remapped_rows_pending:
        problems.append("memory row remapping is pending: the GPU needs a reset")
    if gpu.remapped_rows_failed:
        problems.append("memory row remapping failed")
    failing = [r for r in gpu.throttle_reasons if r in FAILING_THROTTLE_REASONS]
    if failing:
        problems.append(f"hardware slowdown active ({', '.join(failing)})")
    if gpu.temperature is not None and gpu.temperature_slowdown and gpu.temperature >= gpu.temperature_slowdown:
        problems.append(f"temperature {gpu.temperature} C is at or above its slowdown threshold "
                        f"{gpu.temperature_slowdown} C")
    return tuple(problems)


def list_gpus() -> list[GpuInfo]:
    """Every GPU NVML sees, in NVML index order (nvidia-smi's), each with its readings and health verdict."""
    import pynvml

    _init(pynvml)
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = _optional(pynvml, pynvml.nvmlSystemGetCudaDriverVersion)
        cuda_version = f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None
        return [_read_gpu(pynvml, i, driver, cuda_version) for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def healthy_gpus() -> list[GpuInfo]:
    """The GPUs that pass their health check: the ones a scheduler may hand out."""
    return [gpu for gpu in list_gpus() if gpu.healthy]


def _init(pynvml) -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        raise NoGpu("no NVIDIA driver on this host (libnvidia-ml.so.1 not found)") from None
    except pynvml.NVMLError_DriverNotLoaded:
        raise NoGpu("no NVIDIA driver on this host (libnvidia-ml.so.1 is installed but the nvidia kernel module is "
                    "not loaded)") from None
    except pynvml.NVMLError as e:
        raise RuntimeFailure(f"NVML failed to start: {e}") from None


def _read_gpu(pynvml, index: int, driver: str, cuda_version: str | None) -> GpuInfo:
    base = {"index": index, "driver_version": driver, "cuda_driver_version": cuda_version}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        gpu = GpuInfo(**base, **_readings(pynvml, handle))
    except pynvml.NVMLError_GpuIsLost:
        gpu = GpuInfo(**base, lost=True)
    except pynvml.NVMLError as e:  # NVML cannot even name it: never hand it out
        return GpuInfo(**base, problems=(f"NVML cannot read it: {e}",))
    return replace(gpu, problems=assess(gpu))


def _readings(pynvml, handle) -> dict:
    """Everything list_gpus reports for one GPU; NVMLError_GpuIsLost goes up, unsupported readings are None."""
    def read(fn, *args):
        return _optional(pynvml, fn, *args)

    memory = read(pynvml.nvmlDeviceGetMemoryInfo, handle)
    pci = read(pynvml.nvmlDeviceGetPciInfo, handle)
    ecc_mode = read(pynvml.nvmlDeviceGetEccMode, handle)
    ecc_enabled = None if ecc_mode is None else bool(ecc_mode[0])
    ecc = EccCounts()
    if ecc_enabled:
        def count(error_type, counter):
            return read(pynvml.nvmlDeviceGetTotalEccErrors, handle, error_type, counter)

        ecc = EccCounts(
            volatile_corrected=count(pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC),
            volatile_uncorrected=count(pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC),
            aggregate_corrected=count(pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_AGGREGATE_ECC),
            aggregate_uncorrected=count(pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC))
    reasons_fn = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
    reasons = read(reasons_fn, handle) or 0
    retired = None
    single = read(pynvml.nvmlDeviceGetRetiredPages, handle,
                  pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS)
    double = read(pynvml.nvmlDeviceGetRetiredPages, handle, pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)
    if single is not None or double is not None:
        retired = len(single or ()) + len(double or ())
    pending = read(pynvml.nvmlDeviceGetRetiredPagesPendingStatus, handle)
    remapped = read(pynvml.nvmlDeviceGetRemappedRows, handle)  # (corrected, uncorrected, pending, failed)
    return {
        "uuid": _text(read(pynvml.nvmlDeviceGetUUID, handle)),
        "name": _text(read(pynvml.nvmlDeviceGetName, handle)),
        "minor": read(pynvml.nvmlDeviceGetMinorNumber, handle),
        "pci_bus_id": _text(pci.busId) if pci is not None else None,
        "memory_total": memory.total if memory is not None else None,
        "memory_used": memory.used if memory is not None else None,
        "ecc_enabled": ecc_enabled,
        "ecc": ecc,
        "temperature": read(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU),
        "temperature_slowdown": read(pynvml.nvmlDeviceGetTemperatureThreshold, handle,
                                     pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN),
        "throttle_reasons": tuple(name for bit, name in THROTTLE_REASONS.items() if reasons & bit),
        "retired_pages": retired,
        "retired_pages_pending": None if pending is None else pending == pynvml.NVML_FEATURE_ENABLED,
        "remapped_rows_pending": None if remapped is None else bool(remapped[2]),
        "remapped_rows_failed": None if remapped is None else bool(remapped[3]),
    }


def _optional(pynvml, fn, *args):
    """fn(*args), or None where the GPU or driver cannot give that reading; a lost GPU raises."""
    try:
        return fn(*args)
    except pynvml.NVMLError_GpuIsLost:
        raise
    except pynvml.NVMLError:
        return None


def _text(value: bytes | str | None) -> str | None:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
