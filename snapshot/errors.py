"""Errors of coldbrew.snapshot. All are RuntimeFailures, so the CLI reports them like the runtime's own."""

from __future__ import annotations

from ..runtime.errors import RuntimeFailure


class CriuNotFound(RuntimeFailure):
    """No usable CRIU: missing, too old, or not runnable."""


class CriuError(RuntimeFailure):
    """CRIU ran and failed; the message ends with the lines of its log that say why."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message + (f"\n{log_tail}" if log_tail else ""))
        self.log_tail = log_tail


class SnapshotError(RuntimeFailure):
    """A snapshot that cannot be used: not one of coldbrew's, corrupt, or not matching where it is restored."""


class CudaUnavailable(RuntimeFailure):
    """The CUDA driver's checkpoint API cannot be used here: no libcuda.so.1, or one too old to have it."""


class CudaError(RuntimeFailure):
    """A CUDA driver call failed: the message names the function, the process and the driver's error name."""

    def __init__(self, function: str, code: int, name: str, pid: int | None = None, hint: str = "") -> None:
        target = f"(pid {pid})" if pid is not None else "()"
        super().__init__(f"{function}{target} failed: {name} ({code})" + (f": {hint}" if hint else ""))
        self.function = function
        self.code = code
        self.name = name
        self.pid = pid
        self.hint = hint
