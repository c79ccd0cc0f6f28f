"""coldbrew's OCI runtime: runc's command line (`coldbrew`) over an in-process API for schedulers.

The names below are the public surface; everything else is an implementation module. They load on first use, so
importing one submodule (the CLI, the network helper) does not pay for the others.
"""

_EXPORTS = {
    "Runtime": "container", "Container": "container", "ExecProcess": "container",
    "Process": "spec", "Spec": "spec", "load_bundle": "spec",
    "RuntimeFailure": "errors", "SpecError": "errors", "ContainerExists": "errors", "ContainerNotFound": "errors",
    "InvalidState": "errors", "NotRunning": "errors", "Unsupported": "errors",
    "NoGpu": "gpu", "GpuUnhealthy": "gpu", "generate_cdi_spec": "gpu", "write_cdi_spec": "gpu",
    "GpuInfo": "gpuinfo", "list_gpus": "gpuinfo", "healthy_gpus": "gpuinfo", "CdiError": "cdi", "load_registry": "cdi",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
