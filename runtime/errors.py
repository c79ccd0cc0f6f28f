"""Errors raised by the runtime. Each carries a message meant for the operator; the CLI prints it as is."""

from __future__ import annotations


def describe_os_error(error: OSError) -> str:
    """An OSError as one line for the operator: "No such file or directory: /the/path"."""
    return f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")


class RuntimeFailure(Exception):
    """Base class: any error the runtime reports instead of a traceback."""


class SpecError(RuntimeFailure):
    """A config.json (or process.json, resources JSON) field is malformed or unsupported.

    `path` is the JSON path of the offending field, e.g. ``process.rlimits[2].type``.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class ContainerNotFound(RuntimeFailure):
    def __init__(self, container_id: str) -> None:
        # "does not exist" is what containerd and podman look for to mean "not found".
        super().__init__(f"container {container_id} does not exist")
        self.container_id = container_id


class ContainerExists(RuntimeFailure):
    def __init__(self, container_id: str) -> None:
        super().__init__(f"container with id {container_id} already exists")
        self.container_id = container_id


class InvalidState(RuntimeFailure):
    """The operation is not allowed in the container's current status."""


class NotRunning(InvalidState):
    def __init__(self, container_id: str) -> None:
        # runc's words: containerd's shim takes "container not running" to mean "already exited"
        super().__init__(f"cannot signal container {container_id}: container not running")


class Unsupported(RuntimeFailure):
    """A feature this host or this runtime cannot provide, said plainly instead of half-doing it."""


class SyscallError(RuntimeFailure, OSError):
    """A kernel call failed; the message names the call and its arguments."""

    def __init__(self, errno_: int, call: str) -> None:
        import os

        OSError.__init__(self, errno_, f"{call}: {os.strerror(errno_)}")

    def __str__(self) -> str:
        return self.strerror
