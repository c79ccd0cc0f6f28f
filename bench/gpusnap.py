"""GPU snapshots: checkpoint and restore of a container holding N GB of PyTorch tensors on the GPU, beside the
host-to-device copy bandwidth PyTorch measures on the same machine (`python -m coldbrew.bench gpusnap --gb N`).

The container runs the host's own Python and PyTorch: its root is a directory of mount points onto which the host
directories that Python, PyTorch and the CUDA driver need are bound read-only (found by a probe that imports torch and
initialises CUDA, reading its own /proc/self/maps), with the host's /dev/nvidia* nodes as the spec's devices. Inside,
WORKLOAD fills the tensors with a known pattern, computes a position-weighted checksum on the GPU, and answers queries
on 127.0.0.1 through `exec` (so the answers come from the process itself, wherever it was restored).

Each run: snapshot (CUDA lock + checkpoint, CRIU dump; the container ends), restore (CRIU restore, CUDA restore +
unlock), then the restored process checks on the GPU that every tensor still holds its pattern and the checksum is the
one it computed before the first snapshot; the next run snapshots the restored container. The image files are in the
page cache when restored (written just before): these are warm restores. The target: CUDA restore moves the GPU
memory at least half as fast as PyTorch copies pinned host memory to the device (restore time <= 2x copy time).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..fs.mounts import mount_table
from .report import Result, Row, Target, percentile, render_table

PORT = 7777
WORKDIR = "/var/tmp/coldbrew-gpusnap"
_EXCLUDED_TOPS = frozenset({"/proc", "/sys", "/dev", "/run"})  # the container has its own

# The program in the container. Tensors of 256 MiB: int64 element i of tensor k is i * MULT + k (wrapping). The
# checksum weights each 4 KiB row by its position, so pages swapped or lost change it.
WORKLOAD = r"""
import json, os, socket
import torch

MULT = 0x9E3779B1
CHUNK = 256 << 20
device = torch.device("cuda")
total = int(float(os.environ["GPUSNAP_GB"]) * (1 << 30)) // 4096 * 4096
sizes = [CHUNK] * (total // CHUNK) + ([total % CHUNK] if total % CHUNK else [])

def pattern(k, n):
    t = torch.arange(n, dtype=torch.int64, device=device)
    return t.mul_(MULT).add_(k)

def checksum():
    value = 0
    for k, t in enumerate(tensors):
        rows = t.view(-1, 512)
        weights = torch.arange(1, rows.shape[0] + 1, dtype=torch.int64, device=device)
        value += int((rows.sum(dim=1) * weights).sum()) * (k + 1)
    return value % (1 << 64)

def intact():
    return all(torch.equal(t, pattern(k, t.numel())) for k, t in enumerate(tensors))

token = os.urandom(8).hex()
tensors = [pattern(k, size // 8) for k, size in enumerate(sizes)]
counter = torch.zeros(1, dtype=torch.int64, device=device)
ready_checksum = checksum()
torch.cuda.synchronize()
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(os.environ["GPUSNAP_PORT"])))
server.listen(8)
print("ready", sum(sizes), flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        command = conn.makefile().readline().strip()
        counter += 1
        answer = {"token": token, "bytes": sum(sizes), "ready_checksum": ready_checksum,
                  "counter": int(counter.item()), "pid": os.getpid()}
        if command == "verify":
            answer.update(checksum=checksum(), intact=intact())
        conn.sendall((json.dumps(answer) + "\n").encode())
"""

CLIENT = ("import socket, sys; s = socket.create_connection(('127.0.0.1', {port}), timeout=120); "
          "s.sendall(sys.argv[1].encode() + b'\\n'); print(s.makefile().readline(), end='')")

# Run by the host's Python to learn what a CUDA PyTorch process reads: the files it maps, its import path.
PROBE = r"""
import json, os, sys
import torch
t = torch.arange(1024, dtype=torch.int64, device="cuda").mul_(3).add_(1)  # the kernels WORKLOAD runs
assert torch.equal(t, t.clone()) and int((t.view(-1, 512).sum(dim=1) * t[:2]).sum()) != 0
files = set()
with open("/proc/self/maps") as f:
    for line in f:
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].startswith("/"):
            files.add(fields[5].rstrip("\n").removesuffix(" (deleted)"))
print(json.dumps({"files": sorted(files), "path": [p for p in sys.path if p], "executable": sys.executable,
                  "prefix": sys.prefix, "base_prefix": sys.base_prefix}))
"""


class NoGpu(Exception):
    """This host cannot run the GPU workload: no NVIDIA device, no CUDA PyTorch, or no usable GPU."""


def gpu_missing(python: str | None = None) -> str | None:
    """Why this host cannot run the GPU workload with `python` (default: this one), or None if it can."""
    if not os.path.exists("/dev/nvidiactl"):
        return "no /dev/nvidiactl (no NVIDIA driver or GPU on this host)"
    python = python or sys.executable
    check = "import torch; assert torch.cuda.is_available(), 'torch.cuda.is_available() is False'"
    try:
        result = subprocess.run([python, "-c", check], capture_output=True, text=True, timeout=300,
                                env=container_env())
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run {python}: {e}"
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        return f"{python} has no CUDA PyTorch: {lines[-1] if lines else f'exit {result.returncode}'}"
    return None


def container_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the host that the container's Python needs (PATH, LD_LIBRARY_PATH), without PYTHONPATH
    and the rest of this process's environment."""
    env = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "HOME": "/tmp",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    if os.environ.get("LD_LIBRARY_PATH"):
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    env.update(extra or {})
    return env


_BINDS: dict[str, list[str]] = {}  # python -> its binds: the probe takes seconds (torch, CUDA)


def host_binds(python: str) -> list[str]:
    """The host directories to bind read-only into the container for `python` to import torch and use CUDA, outermost
    first: the top-level directory of each needed file on the root filesystem, each mount point (deeper than /) that
    holds one, and /etc (the loader's cache)."""
    if python not in _BINDS:
        _BINDS[python] = _probe_binds(python)
    return _BINDS[python]


def _probe_binds(python: str) -> list[str]:
    result = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=600, env=container_env())
    if result.returncode != 0:
        raise NoGpu(f"the probe of {python} (import torch, a tensor on the GPU) failed: "
                    f"{(result.stderr or result.stdout).strip()[-2000:]}")
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    needed = {*probe["files"], *probe["path"], os.path.dirname(probe["executable"]), probe["executable"],
              probe["prefix"], probe["base_prefix"], "/etc"}
    points = sorted((entry.point for entry in mount_table()), key=len, reverse=True)
    binds = set()
    for path in needed:
        name = os.path.realpath(path)  # the top-level links (usr-merged /lib) are the rootfs's own
        top = "/" + name.strip("/").split("/")[0]
        if not os.path.exists(name) or top in _EXCLUDED_TOPS:
            continue
        if top == "/tmp":
            raise NoGpu(f"{python} needs {name}, under /tmp, which is the container's own tmpfs")
        point = next(p for p in points if name == p or name.startswith(p.rstrip("/") + "/"))
        if point != "/":
            binds.add(point)
        binds.add(top)
    return sorted(binds, key=lambda p: (p.count("/"), p))


def nvidia_devices() -> list[dict[str, Any]]:
    """The host's /dev/nvidia* character devices as linux.devices entries."""
    import stat

    devices = []
    for name in sorted(os.listdir("/dev")):
        path = f"/dev/{name}"
        if name.startswith("nvidia"):
            st = os.stat(path)
            if stat.S_ISCHR(st.st_mode):
                devices.append({"path": path, "type": "c", "major": os.major(st.st_rdev),
                                "minor": os.minor(st.st_rdev), "fileMode": 0o666, "uid": 0, "gid": 0})
    return devices


def gpu_bundle(base: Path, gb: float, *, python: str | None = None, port: int = PORT) -> Path:
    """A bundle running WORKLOAD (`gb` GB of tensors) with the host's `python` (default: this one)."""
    from coldbrew.runtime.features import default_spec

    python = python or sys.executable
    bundle = base / f"gpu-bundle-{uuid.uuid4().hex[:8]}"
    rootfs, app = bundle / "rootfs", bundle / "app"
    app.mkdir(parents=True)
    rootfs.mkdir()
    rootfs.chmod(0o755)
    (app / "workload.py").write_text(WORKLOAD)
    binds = host_binds(python)
    for name in ("proc", "sys", "dev", "tmp", "app"):
        (rootfs / name).mkdir()
    for entry in os.listdir("/"):
        if os.path.islink(f"/{entry}") and f"/{entry}" not in binds:  # usr-merged /lib, /bin...: into the bound /usr
            (rootfs / entry).symlink_to(os.readlink(f"/{entry}"))
    for path in binds:
        (rootfs / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    config = default_spec()
    config["root"] = {"path": str(rootfs), "readonly": True}
    config["process"]["terminal"] = False
    config["process"]["args"] = [python, "-u", "/app/workload.py"]
    env = container_env({"GPUSNAP_GB": str(gb), "GPUSNAP_PORT": str(port)})
    config["process"]["env"] = [f"{k}={v}" for k, v in env.items()]
    config["mounts"] += [{"destination": path, "type": "bind", "source": path, "options": ["bind", "ro"]}
                         for path in binds]
    config["mounts"] += [
        {"destination": "/app", "type": "bind", "source": str(app), "options": ["bind", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "size=262144k"]},
    ]
    devices = nvidia_devices()
    config["linux"]["devices"] = devices
    config["linux"]["resources"]["devices"] += [
        {"allow": True, "type": "c", "major": d["major"], "minor": d["minor"], "access": "rwm"} for d in devices]
    (bundle / "config.json").write_text(json.dumps(config, indent=1))
    return bundle


@dataclass
class Answer:
    token: str
    bytes: int
    ready_checksum: int
    counter: int
    pid: int  # in the container's pid namespace
    checksum: int | None = None
    intact: bool | None = None


def ask(container: Any, command: str = "query", *, timeout: float = 600.0, python: str | None = None,
        port: int = PORT) -> Answer:
    """The workload's answer to `command` ("query": counters; "verify": also checksum and pattern check on the GPU),
    through an exec of `python` in the container; waits for the workload to be listening."""
    from coldbrew.runtime.spec import Process

    raw = dict(container.spec().raw["process"])
    raw["args"] = [python or sys.executable, "-c", CLIENT.format(port=port), command]
    deadline = time.monotonic() + timeout
    while True:
        read, write = os.pipe2(os.O_CLOEXEC)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            code = container.exec(Process.from_spec(raw, "process"), stdio=(null, write, write)).wait()
            os.close(write)
            write = -1
            with os.fdopen(read, "rb", closefd=False) as out:
                text = out.read().decode(errors="replace")
        finally:
            for fd in (read, write, null):
                if fd >= 0:
                    os.close(fd)
        if code == 0 and text.startswith("{"):
            return Answer(**json.loads(text))
        if container.status != "running":
            raise RuntimeError(f"the GPU workload's container is {container.status} (exit status "
                               f"{container.exit_status}); the last query said: {text[-2000:]}")
        if time.monotonic() >= deadline:  # the workload imports torch and fills the GPU first
            raise RuntimeError(f"no answer from the GPU workload in {timeout:.0f} s (exit {code}): {text[-2000:]}")
        time.sleep(0.5)


# ---- the benchmark --------------------------------------------------------------------------------------------------

def measure_h2d(nbytes: int, reps: int = 5) -> dict[str, list[float]]:
    """Seconds PyTorch takes to copy `nbytes` from pinned and from pageable host memory to the GPU (CUDA events)."""
    import torch

    times: dict[str, list[float]] = {"pinned": [], "pageable": []}
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for kind in times:
        host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=(kind == "pinned"))
        device.copy_(host, non_blocking=True)  # warm-up: first-touch and mapping costs out of the samples
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            device.copy_(host, non_blocking=True)
            end.record()
            end.synchronize()
            times[kind].append(start.elapsed_time(end) / 1000)
        del host
    del device
    torch.cuda.empty_cache()
    return times


def run_gpusnap(gb: float, runs: int, workdir: str = WORKDIR,
                progress: Callable[[str], None] | None = None) -> Result:
    """Measure `runs` snapshot/restore rounds of a container holding `gb` GB on the GPU; NoGpu without one."""
    from coldbrew.runtime.container import Runtime
    from coldbrew.snapshot import cuda
    from coldbrew.snapshot.checkpoint import restore, snapshot

    say = progress or (lambda text: None)
    reason = gpu_missing()
    if reason:
        raise NoGpu(reason)
    nbytes = int(gb * (1 << 30)) // 4096 * 4096
    say(f"host-to-device copies of {nbytes / 1e9:.2f} GB through PyTorch")
    h2d = measure_h2d(nbytes)
    scenario = f"{gb:g} GiB"
    rows = {
        "h2d_time": Row(scenario, "torch", "h2d_time", "torch H2D copy, pinned (time)"),
        "h2d_pinned": Row(scenario, "torch", "h2d_pinned", "torch H2D copy, pinned", "GB/s"),
        "h2d_pageable": Row(scenario, "torch", "h2d_pageable", "torch H2D copy, pageable", "GB/s"),
        "cuda_checkpoint": Row(scenario, "coldbrew", "cuda_checkpoint", "CUDA lock + checkpoint"),
        "criu_dump": Row(scenario, "coldbrew", "criu_dump", "CRIU dump"),
        "criu_restore": Row(scenario, "coldbrew", "criu_restore", "CRIU restore"),
        "cuda_restore": Row(scenario, "coldbrew", "cuda_restore", "CUDA restore + unlock"),
        "restore_gbps": Row(scenario, "coldbrew", "restore_gbps", "CUDA restore", "GB/s"),
        "restore_total": Row(scenario, "coldbrew", "restore_total", "whole restore (CRIU + CUDA)"),
        "image_gb": Row(scenario, "coldbrew", "image_gb", "snapshot size", "GB"),
    }
    rows["h2d_time"].samples = [t * 1000 for t in h2d["pinned"]]
    rows["h2d_pinned"].samples = [nbytes / t / 1e9 for t in h2d["pinned"]]
    rows["h2d_pageable"].samples = [nbytes / t / 1e9 for t in h2d["pageable"]]

    os.makedirs(workdir, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=workdir, prefix="run-"))
    runtime = Runtime(str(scratch / "state"))
    cid = f"gpusnap-{os.getpid()}"
    out_read, out_write = os.pipe2(os.O_CLOEXEC)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    stdio = (null, out_write, out_write)
    result = Result("gpusnap", runs, 0, ("torch", "h2d_time"))
    try:
        say(f"starting the workload ({gb:g} GiB of tensors) in a container")
        container = runtime.create(cid, str(gpu_bundle(scratch, gb)), stdio=stdio)
        container.start()
        first = ask(container)
        for run in range(runs):
            timings: dict[str, float] = {}
            images = scratch / f"images-{run}"
            say(f"run {run + 1}/{runs}: snapshot")
            snap = snapshot(container, str(images), timings=timings)
            if not snap.gpu["inside"]:
                raise RuntimeError(f"the snapshot holds no GPU state: {snap.gpu['note']}")
            say(f"run {run + 1}/{runs}: restore")
            container = restore(runtime, snap, cid, stdio=stdio, timings=timings)
            answer = ask(container, "verify")
            if (answer.token, answer.checksum, answer.intact) != (first.token, first.ready_checksum, True):
                raise RuntimeError(f"run {run + 1}: the restored tensors differ: {answer} (before: {first})")
            for step in ("cuda_checkpoint", "criu_dump", "criu_restore", "cuda_restore"):
                rows[step].samples.append(timings[step] * 1000)
            rows["restore_gbps"].samples.append(answer.bytes / timings["cuda_restore"] / 1e9)
            rows["restore_total"].samples.append((timings["criu_restore"] + timings["cuda_restore"]) * 1000)
            rows["image_gb"].samples.append(snap.size / 1e9)
            shutil.rmtree(images)
        result.host = {"driver": cuda.host_driver_version(), "gpus": cuda.host_gpus(), "bytes": first.bytes,
                       "kernel": os.uname().release}
    except BaseException:
        say("the container's output:\n" + drain(out_read))
        raise
    finally:
        for leftover in runtime.list():
            leftover.delete(force=True)
        for fd in (out_read, out_write, null):
            os.close(fd)
        shutil.rmtree(scratch, ignore_errors=True)
    result.rows = list(rows.values())
    result.targets = [Target(scenario, "coldbrew", "cuda_restore", "torch", "h2d_time", 2.0,
                             "CUDA restore at least half torch's pinned host-to-device GB/s")]
    result.settings = {"image files": "in the page cache (warm restore)", "H2D samples": len(h2d["pinned"])}
    return result


def drain(fd: int) -> str:
    """What a container wrote to the pipe `fd` so far (its output, for a failure's report)."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def bandwidth_ratio(result: Result) -> float:
    """p50 CUDA restore GB/s over p50 pinned H2D GB/s."""
    scenario = result.rows[0].scenario
    return (percentile(result.row(scenario, "coldbrew", "restore_gbps").samples, 50)
            / percentile(result.row(scenario, "torch", "h2d_pinned").samples, 50))


def add_parser(benches: Any) -> None:
    """The `gpusnap` subcommand on coldbrew.bench's parser."""
    g = benches.add_parser("gpusnap", help="snapshot/restore of N GB of GPU memory beside torch's H2D bandwidth")
    g.add_argument("--gb", type=float, default=4.0, help="GiB of tensors on the GPU (default 4)")
    g.add_argument("--runs", type=int, default=3, help="snapshot/restore rounds (default 3)")
    g.add_argument("--workdir", default=WORKDIR, help=f"where images and state go (default {WORKDIR})")
    g.add_argument("--json", metavar="FILE", help="also write every row, with its samples, to FILE")


def main(args: Any) -> int:
    """Run the benchmark for parsed `args`; 2 without a GPU, 1 if it fails or misses its target."""
    from coldbrew.snapshot.errors import CriuNotFound

    if args.gb <= 0 or args.runs < 1:
        sys.stderr.write("coldbrew bench gpusnap: --gb must be positive and --runs at least 1\n")
        return 1
    try:
        result = run_gpusnap(args.gb, args.runs, args.workdir, progress=lambda text: sys.stderr.write(text + "\n"))
    except NoGpu as e:
        sys.stderr.write(f"coldbrew bench gpusnap: no GPU: {e}\n")
        return 2
    except CriuNotFound as e:
        sys.stderr.write(f"coldbrew bench gpusnap: {e}\n")
        return 1
    sys.stdout.write(render_table(result))
    ratio = bandwidth_ratio(result)
    met = ratio >= 0.5
    sys.stdout.write(f"CUDA restore GB/s / torch pinned H2D GB/s (p50s): {ratio:.2f} (target >= 0.50: "
                     f"{'met' if met else 'MISSED'})\n")
    if args.json:
        result.write_json(args.json)
    return 0 if met else 1


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m coldbrew.bench.gpusnap", description=__doc__.split("\n")[0])
    add_parser(parser.add_subparsers(dest="bench", required=True))
    sys.exit(main(parser.parse_args(["gpusnap", *sys.argv[1:]])))
