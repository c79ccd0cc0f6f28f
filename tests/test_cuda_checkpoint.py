"""GPU memory in snapshots (coldbrew.snapshot.cuda and its use by snapshot/restore).

Without a GPU (here, CI): the driver's absence is reported by name; error codes are named as cuda.h numbers them; a
real CRIU checkpoint/restore of a CPU container goes through the new path, finds no CUDA process, skips the CUDA steps
and records "no GPU state"; CRIU's own plugins stay unloaded; a snapshot claiming GPU state is refused on a host that
cannot take it back. The binding's ABI and the order and rollback of its calls are checked against STAND_IN, a small
C library built here that exports the driver's checkpoint symbols and keeps each pid's CUDA state as the driver
documents it (libcuda itself does not run on this machine); with it, the GPU branch of snapshot/restore also runs
around a real CRIU dump and restore of a container, failures included.

With a GPU (`-m gpu`; skipped without /dev/nvidiactl, libcuda.so.1, CUDA PyTorch or CRIU): a container whose PyTorch
process holds ~4 GiB of tensors on the GPU is snapshotted (CUDA lock + checkpoint, CRIU dump), killed with the dump,
restored (CRIU restore, CUDA restore + unlock), and checks on the GPU that every tensor holds its pattern and the
checksum is the one computed before; --leave-running keeps the original working on its GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from coldbrew.snapshot import cuda, restore, snapshot
from coldbrew.snapshot.errors import CriuError, CudaError, CudaUnavailable, SnapshotError
from test_checkpoint import COUNTER, CRIU, Stdio, needs_criu, read_counter, wait_gone

# ---- a stand-in for the driver's checkpoint entry points -----------------------------------------------------------

STAND_IN = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct { unsigned int timeoutMs, reserved0; unsigned long long reserved1[7]; } LockArgs;
typedef struct { unsigned char oldUuid[16], newUuid[16]; } GpuPair;
typedef struct { GpuPair *gpuPairs; unsigned int gpuPairsCount; unsigned char reserved[52]; } RestoreArgs;

static int pids[256], states[256], known;

static void note(const char *fmt, ...) {
    const char *path = getenv("STAND_IN_LOG");
    FILE *f = path ? fopen(path, "a") : NULL;
    if (!f) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fputc('\n', f);
    fclose(f);
}

/* the CUDA processes: the pids listed in STAND_IN_PIDS, RUNNING when first seen; with STAND_IN_NEW_STATE=N any
   other pid too, in state N (a CRIU restore brings CUDA processes back under new host pids, checkpointed) */
static int slot(int pid) {
    for (int i = 0; i < known; i++) if (pids[i] == pid) return i;
    const char *list = getenv("STAND_IN_PIDS"), *new_state = getenv("STAND_IN_NEW_STATE");
    char buf[1024];
    snprintf(buf, sizeof buf, ",%s,", list ? list : "");
    char want[32];
    snprintf(want, sizeof want, ",%d,", pid);
    int listed = strstr(buf, want) != NULL;
    if ((!listed && !new_state) || known == 256) return -1;
    pids[known] = pid;
    states[known] = listed ? 0 : atoi(new_state);
    return known++;
}

/* STAND_IN_FAIL=call:pid:code[,call:pid:code...] makes that call on that pid return code */
static int injected(const char *call, int pid) {
    const char *spec = getenv("STAND_IN_FAIL");
    char name[32];
    int fpid, code, used;
    while (spec && sscanf(spec, "%31[a-z]:%d:%d%n", name, &fpid, &code, &used) == 3) {
        if (!strcmp(name, call) && fpid == pid) return code;
        spec += used;
        spec += *spec == ',';
    }
    return 0;
}

static int step(const char *call, int pid, int from, int to) {
    int code = injected(call, pid), i = slot(pid);
    if (code) return code;
    if (i < 0) return 1;          /* CUDA_ERROR_INVALID_VALUE */
    if (states[i] != from) return 401;  /* CUDA_ERROR_ILLEGAL_STATE */
    states[i] = to;
    return 0;
}

int cuInit(unsigned int flags) { return flags ? 1 : (getenv("STAND_IN_NO_DEVICE") ? 100 : 0); }
int cuDriverGetVersion(int *version) { *version = STAND_IN_VERSION; return 0; }

#ifndef OLD_DRIVER
int cuCheckpointProcessGetState(int pid, int *state) {
    int i = slot(pid);
    if (i < 0) return 1;
    *state = states[i];
    return 0;
}
int cuCheckpointProcessLock(int pid, LockArgs *args) {
    int reserved = args->reserved0;
    for (int i = 0; i < 7; i++) reserved |= args->reserved1[i] != 0;
    note("lock %d timeout=%u reserved=%d", pid, args->timeoutMs, reserved);
    return reserved ? 1 : step("lock", pid, 0, 1);
}
int cuCheckpointProcessCheckpoint(int pid, void *args) {
    note("checkpoint %d args=%s", pid, args ? "set" : "null");
    return step("checkpoint", pid, 1, 2);
}
int cuCheckpointProcessRestore(int pid, RestoreArgs *args) {
    char pairs[160] = "", *out = pairs;
    unsigned int count = args ? args->gpuPairsCount : 0;
    for (unsigned int p = 0; p < count && p < 2; p++) {  /* each pair as old>new in hex */
        for (int b = 0; b < 16; b++) out += sprintf(out, "%02x", args->gpuPairs[p].oldUuid[b]);
        out += sprintf(out, ">");
        for (int b = 0; b < 16; b++) out += sprintf(out, "%02x", args->gpuPairs[p].newUuid[b]);
        out += sprintf(out, " ");
    }
    note("restore %d pairs=%u %s", pid, count, pairs);
    return step("restore", pid, 2, 1);
}
int cuCheckpointProcessUnlock(int pid, void *args) {
    note("unlock %d", pid);
    return step("unlock", pid, 1, 0);
}
#endif
"""


def _build(tmp: Path, name: str, *defines: str) -> str:
    source = tmp / "stand_in.c"
    source.write_text(STAND_IN)
    library = tmp / name
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", *defines, "-o", str(library), str(source)], check=True,
                   capture_output=True)
    return str(library)


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the driver stand-in")
    tmp = tmp_path_factory.mktemp("stand-in")
    return {"r580": _build(tmp, "libcuda-r580.so", "-DSTAND_IN_VERSION=13000"),
            "r535": _build(tmp, "libcuda-r535.so", "-DSTAND_IN_VERSION=12020", "-DOLD_DRIVER")}


class StandIn:
    """The r580 stand-in loaded as a Driver, with `pids` as its CUDA processes and its call log."""

    _next = 4_000_000  # pids no process has: each test gets its own, the stand-in's state lives as long as we do

    def __init__(self, library: str, log: Path, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        self.pids = list(range(StandIn._next, StandIn._next + count))
        StandIn._next += count
        self.log = log
        monkeypatch.setenv("STAND_IN_PIDS", ",".join(map(str, self.pids)))
        monkeypatch.setenv("STAND_IN_LOG", str(log))
        self.driver = cuda.Driver(library)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def states(self) -> list[str]:
        return [self.driver.state(pid) for pid in self.pids]


@pytest.fixture
def own_stand_in(stand_ins, tmp_path) -> str:
    """A copy of the r580 stand-in of this test's own: loaded apart, its pid table starts empty (pids are reused)."""
    library = tmp_path / "libcuda-own.so"
    shutil.copy(stand_ins["r580"], library)
    return str(library)


@pytest.fixture
def stand_in(stand_ins, tmp_path, monkeypatch):
    return lambda count=2: StandIn(stand_ins["r580"], tmp_path / "calls.log", monkeypatch, count)


# ---- absence, age, names ---------------------------------------------------------------------------------------------

def _libcuda_loads() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@pytest.mark.skipif(_libcuda_loads(), reason="this host has libcuda.so.1")
def test_missing_driver_is_reported_by_name(monkeypatch):
    monkeypatch.delenv(cuda.LIBRARY_ENV, raising=False)
    with pytest.raises(CudaUnavailable, match=r"cannot load libcuda\.so\.1, the NVIDIA driver's CUDA library"):
        cuda.load_driver()
    monkeypatch.setenv(cuda.LIBRARY_ENV, "/nonexistent/libcuda.so.1")
    with pytest.raises(CudaUnavailable, match="cannot load /nonexistent/libcuda.so.1"):
        cuda.load_driver()


def test_old_driver_names_the_missing_symbol(stand_ins):
    with pytest.raises(CudaUnavailable, match=r"\(CUDA 12\.2\) lacks cuCheckpointProcessGetState: .*r570 and later"):
        cuda.Driver(stand_ins["r535"])


def test_result_names_are_cuda_h_numbers():
    # cuda.h's CUresult, as NVIDIA's driver API reference numbers them
    documented = {0: "CUDA_SUCCESS", 1: "CUDA_ERROR_INVALID_VALUE", 2: "CUDA_ERROR_OUT_OF_MEMORY",
                  3: "CUDA_ERROR_NOT_INITIALIZED", 100: "CUDA_ERROR_NO_DEVICE", 401: "CUDA_ERROR_ILLEGAL_STATE",
                  500: "CUDA_ERROR_NOT_FOUND", 700: "CUDA_ERROR_ILLEGAL_ADDRESS", 801: "CUDA_ERROR_NOT_SUPPORTED",
                  909: "CUDA_ERROR_TIMEOUT", 999: "CUDA_ERROR_UNKNOWN"}
    assert {code: cuda.error_name(code) for code in documented} == documented
    assert len(set(cuda.RESULT_NAMES.values())) == len(cuda.RESULT_NAMES)  # a transcription slip shows as a twin
    assert cuda.error_name(4242) == "CUresult 4242"
    error = CudaError("cuCheckpointProcessLock", 909, "CUDA_ERROR_TIMEOUT", 1234, "work did not drain")
    assert str(error) == "cuCheckpointProcessLock(pid 1234) failed: CUDA_ERROR_TIMEOUT (909): work did not drain"


def test_argument_structures_are_the_drivers_64_bytes():
    import ctypes

    types = cuda._types()
    assert ctypes.sizeof(types["LockArgs"]) == ctypes.sizeof(types["RestoreArgs"]) == 64
    assert ctypes.sizeof(types["GpuPair"]) == 32
    assert types["RestoreArgs"].gpuPairsCount.offset == 8


def test_module_is_import_light():
    code = "import sys, coldbrew.snapshot.cuda; print(sorted(m for m in ('ctypes', 'torch') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_no_device_at_init_is_named(stand_ins, monkeypatch):
    monkeypatch.setenv("STAND_IN_NO_DEVICE", "1")
    with pytest.raises(CudaError, match=r"cuInit\(\) failed: CUDA_ERROR_NO_DEVICE \(100\): the driver finds no GPU"):
        cuda.Driver(stand_ins["r580"])


# ---- order and rollback, against the stand-in ---------------------------------------------------------------------

def test_checkpoint_locks_all_then_checkpoints_each_and_restore_reverses(stand_in):
    s = stand_in(3)
    cuda.checkpoint_gpu(s.pids, 7000, driver=s.driver)
    first, second, third = s.pids
    assert s.calls() == [f"lock {first} timeout=7000 reserved=0", f"lock {second} timeout=7000 reserved=0",
                         f"lock {third} timeout=7000 reserved=0", f"checkpoint {first} args=null",
                         f"checkpoint {second} args=null", f"checkpoint {third} args=null"]
    assert s.states() == ["checkpointed"] * 3
    assert cuda.gpu_state(first, driver=s.driver) == "checkpointed"
    s.log.unlink()
    cuda.restore_gpu(s.pids, driver=s.driver)
    assert s.calls() == [f"restore {first} pairs=0 ", f"restore {second} pairs=0 ", f"restore {third} pairs=0 ",
                         f"unlock {first}", f"unlock {second}", f"unlock {third}"]
    assert s.states() == ["running"] * 3
    with pytest.raises(CudaError, match=rf"cuCheckpointProcessRestore\(pid {first}\) failed: "
                                        r"CUDA_ERROR_ILLEGAL_STATE \(401\)"):
        cuda.restore_gpu(s.pids, driver=s.driver)  # running, not checkpointed


def test_failed_checkpoint_brings_every_process_back_to_running(stand_in, monkeypatch):
    s = stand_in(3)
    first, second, third = s.pids
    monkeypatch.setenv("STAND_IN_FAIL", f"checkpoint:{second}:801")
    with pytest.raises(CudaError, match=rf"cuCheckpointProcessCheckpoint\(pid {second}\) failed: "
                                        r"CUDA_ERROR_NOT_SUPPORTED \(801\): .*managed/UVM memory"):
        cuda.checkpoint_gpu(s.pids, driver=s.driver)
    assert s.states() == ["running"] * 3
    calls = s.calls()
    assert calls[calls.index(f"checkpoint {second} args=null") + 1:] == [
        f"restore {first} pairs=0 ", f"unlock {first}", f"unlock {second}", f"unlock {third}"]


def test_failed_lock_unlocks_those_locked(stand_in, monkeypatch):
    s = stand_in(2)
    first, second = s.pids
    monkeypatch.setenv("STAND_IN_FAIL", f"lock:{second}:909")
    with pytest.raises(CudaError, match=r"CUDA_ERROR_TIMEOUT \(909\): its submitted GPU work did not finish"):
        cuda.checkpoint_gpu(s.pids, 50, driver=s.driver)
    assert s.calls()[-1] == f"unlock {first}" and s.states() == ["running", "running"]


def test_rollback_that_fails_says_what_is_left(stand_in, monkeypatch):
    s = stand_in(2)
    first, second = s.pids
    monkeypatch.setenv("STAND_IN_FAIL", f"checkpoint:{second}:2,restore:{first}:999")
    with pytest.raises(CudaError) as caught:
        cuda.checkpoint_gpu([first, second], driver=s.driver)  # second's checkpoint fails, then first's restore
    assert caught.value.name == "CUDA_ERROR_OUT_OF_MEMORY" and caught.value.pid == second
    assert any(f"process {first} could not be brought back to running" in note and "CUDA_ERROR_UNKNOWN" in note
               for note in caught.value.__notes__)
    assert s.states() == ["checkpointed", "running"]


def test_gpu_pairs_reach_the_driver_as_uuid_bytes(stand_in):
    s = stand_in(1)
    old, new = "GPU-00112233-4455-6677-8899-aabbccddeeff", "GPU-ffeeddcc-bbaa-9988-7766-554433221100"
    cuda.checkpoint_gpu(s.pids, driver=s.driver)
    cuda.restore_gpu(s.pids, ((old, new),), driver=s.driver)
    assert f"restore {s.pids[0]} pairs=1 00112233445566778899aabbccddeeff>ffeeddccbbaa99887766554433221100 " \
        in s.calls()
    with pytest.raises(SnapshotError, match="GPU UUID 'GPU-12' is malformed"):
        s.driver.restore(s.pids[0], (("GPU-12", new),))


# ---- which GPU and driver a snapshot needs ---------------------------------------------------------------------------

H100 = {"uuid": "GPU-5c4f0b6a-1111-2222-3333-444455556666", "model": "NVIDIA H100 80GB HBM3", "minor": 0,
        "bus": "0000:00:05.0"}


def test_restore_needs_the_same_driver_and_gpu_model():
    recorded = {"driver": "580.65.06", "cuda_version": 13000, "devices": [H100]}
    cuda.check_driver(recorded, "580.65.06", 13000)
    with pytest.raises(SnapshotError, match="under NVIDIA driver 580.65.06; this host runs NVIDIA driver 575.1"):
        cuda.check_driver(recorded, "575.1", 12090)
    with pytest.raises(SnapshotError, match="this host has no NVIDIA driver loaded"):
        cuda.check_driver(recorded, None, None)
    with pytest.raises(SnapshotError, match=r"CUDA 13\.0 driver; this host's implements CUDA 12\.9"):
        cuda.check_driver({"driver": None, "cuda_version": 13000}, None, 12090)

    assert cuda.match_gpus([H100], [H100]) == ()
    other = {**H100, "uuid": "GPU-99999999-1111-2222-3333-444455556666", "bus": "0000:00:06.0"}
    assert cuda.match_gpus([H100], [other]) == ((H100["uuid"], other["uuid"]),)  # same model, same node: remapped
    with pytest.raises(SnapshotError, match=r"GPU memory of a NVIDIA H100 80GB HBM3 at /dev/nvidia0 .*; this host "
                                            r"has NVIDIA H200 at /dev/nvidia0: .*same GPU model"):
        cuda.match_gpus([H100], [{**other, "model": "NVIDIA H200"}])
    with pytest.raises(SnapshotError, match="this host has no NVIDIA GPU"):
        cuda.match_gpus([H100], [])


_values = st.text(st.characters(codec="ascii", categories=("L", "N", "P", "Zs")), min_size=1, max_size=30).map(
    str.strip).filter(lambda v: v and ":" not in v)


@settings(max_examples=200, deadline=None)
@given(model=_values, uuid=st.uuids(), minor=st.integers(0, 253), pad=st.text(" \t", min_size=1, max_size=4))
def test_information_file_parses(model, uuid, minor, pad):
    text = (f"Model:{pad}{model}\nIRQ:{pad}42\nGPU UUID:{pad}GPU-{uuid}\nBus Type:{pad}PCIe\n"
            f"Device Minor:{pad}{minor}\nGPU Excluded:{pad}No\n")
    fields = cuda.parse_information(text)
    assert (fields["Model"], fields["GPU UUID"], int(fields["Device Minor"])) == (model, f"GPU-{uuid}", minor)


@settings(max_examples=100, deadline=None)
@given(version=st.lists(st.integers(0, 999), min_size=2, max_size=3).map(lambda v: ".".join(map(str, v))),
       kind=st.sampled_from(["NVIDIA UNIX x86_64 Kernel Module", "NVIDIA UNIX Open Kernel Module for x86_64"]))
def test_driver_version_line_parses(version, kind):
    text = f"NVRM version: {kind}  {version}  Release Build  (dvs-builder@U16)  Thu Jul 10 2025\nGCC version:  gcc 12\n"
    assert cuda.parse_driver_version(text) == version
    assert cuda.parse_driver_version("something else " + version) is None


def test_no_process_of_ours_holds_a_gpu():
    gone = subprocess.Popen(["true"])
    gone.wait()
    with open("/dev/null") as null:  # a character device, not the NVIDIA driver's
        assert os.fstat(null.fileno()).st_rdev and cuda.cuda_pids([os.getpid(), gone.pid]) == []
    assert cuda.gpu_minors([os.getpid()]) == set()
    assert cuda.ns_pid(os.getpid()) > 0


# ---- a real CRIU checkpoint/restore of a CPU container through the new path ----------------------------------------

@needs_criu
def test_cpu_container_goes_through_without_gpu_state(runtime, bundles, cid, tmp_path, monkeypatch):
    """The CUDA steps find no CUDA process and are skipped, the record says so; CRIU runs without its plugins (a
    plugin directory that makes CRIU fail when loaded is ignored); a record claiming GPU state this host cannot take
    back is refused before anything is made."""
    broken = tmp_path / "plugins"
    broken.mkdir()
    (broken / "broken_plugin.so").write_text("not an ELF object")
    monkeypatch.setenv("CRIU_LIBS_DIR", str(broken))
    io = Stdio()
    try:
        container = runtime.create(cid, str(bundles.make(COUNTER)), stdio=io.fds)
        container.start()
        read_counter(io)
        # the control: CRIU on its own loads that directory and fails
        images = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            from coldbrew.snapshot import rpc

            with pytest.raises(CriuError, match="Unable to load"):
                CRIU.call({"type": rpc.DUMP, "opts": {"images_dir_fd": images, "pid": container.pid,
                                                      "log_file": "control.log", "log_level": 4}},
                          log=(images, "control.log"))
        finally:
            os.close(images)
        assert container.status == "running"
        dumped: dict[str, float] = {}
        snap = snapshot(container, str(tmp_path / "images"), timings=dumped)
        wait_gone(container.pid)
        assert snap.gpu["inside"] is False and snap.gpu["note"].startswith("no GPU state: none of the container's")
        assert set(dumped) == {"criu_dump"} and dumped["criu_dump"] > 0  # no CUDA step ran
        restored_timings: dict[str, float] = {}
        restored = restore(runtime, snap, cid, stdio=io.fds, timings=restored_timings)
        assert set(restored_timings) == {"criu_restore"}
        counted = read_counter(io)
        time.sleep(0.1)
        assert read_counter(io) > counted
        restored.delete(force=True)

        claimed = tmp_path / "claimed"
        shutil.copytree(snap.path, claimed, symlinks=True)
        record = json.loads((claimed / "coldbrew-snapshot.json").read_text())
        record["gpu"] = {"inside": True, "note": "edited", "processes": [1], "driver": "1.0.0",
                         "cuda_version": 13000, "devices": [H100]}
        (claimed / "coldbrew-snapshot.json").write_text(json.dumps(record))
        with pytest.raises(SnapshotError, match="GPU memory checkpointed under NVIDIA driver 1.0.0; this host"):
            restore(runtime, str(claimed), f"{cid}-gpu", stdio=io.fds)
        record["gpu"] = {"inside": True, "processes": "all"}
        (claimed / "coldbrew-snapshot.json").write_text(json.dumps(record))
        with pytest.raises(SnapshotError, match="gpu entry is malformed"):
            restore(runtime, str(claimed), f"{cid}-gpu", stdio=io.fds)
        assert runtime.list() == []
        assert not Path(f"/sys/fs/cgroup/memory/coldbrew/{cid}-gpu").exists()
    finally:
        io.close()


@needs_criu
def test_gpu_steps_around_real_criu_with_the_stand_in(runtime, bundles, cid, tmp_path, own_stand_in, monkeypatch):
    """The GPU branch of snapshot/restore in order, with CRIU, the container and its pid namespace real and the GPU
    stood in for: the stand-in driver keeps the CUDA states, and the container's init is taken for a CUDA process
    (no NVIDIA device node can be opened on this machine, so cuda_pids is told which processes hold one)."""
    log = tmp_path / "calls.log"
    monkeypatch.setenv(cuda.LIBRARY_ENV, own_stand_in)
    monkeypatch.setenv("STAND_IN_LOG", str(log))
    monkeypatch.setattr(cuda, "cuda_pids",
                        lambda pids: [p for p in pids if str(p) in os.environ.get("STAND_IN_PIDS", "").split(",")])
    io = Stdio()
    try:
        container = runtime.create(cid, str(bundles.make(COUNTER)), stdio=io.fds)
        container.start()
        read_counter(io)
        monkeypatch.setenv("STAND_IN_PIDS", str(container.pid))
        dumped: dict[str, float] = {}
        snap = snapshot(container, str(tmp_path / "images"), timings=dumped)
        assert log.read_text().splitlines() == [f"lock {container.pid} timeout=30000 reserved=0",
                                                f"checkpoint {container.pid} args=null"]
        assert list(dumped) == ["cuda_checkpoint", "criu_dump"]
        assert snap.gpu["inside"] and snap.gpu["processes"] == [1] and snap.gpu["cuda_version"] == 13000

        # the restored init has a new host pid the stand-in does not know: the CUDA restore fails, nothing is left
        with pytest.raises(CudaError, match=r"cuCheckpointProcessRestore\(pid [0-9]+\) failed: "
                                            r"CUDA_ERROR_INVALID_VALUE"):
            restore(runtime, snap, cid, stdio=io.fds)
        assert runtime.list() == [] and not Path(f"/sys/fs/cgroup/memory/coldbrew/{cid}").exists()

        monkeypatch.setenv("STAND_IN_NEW_STATE", "2")  # new pids come as CRIU restores them: checkpointed
        restored_timings: dict[str, float] = {}
        restored = restore(runtime, snap, cid, stdio=io.fds, timings=restored_timings)
        assert list(restored_timings) == ["criu_restore", "cuda_restore"]
        assert log.read_text().splitlines()[-2:] == [f"restore {restored.pid} pairs=0 ", f"unlock {restored.pid}"]
        assert cuda.gpu_state(restored.pid) == "running"
        counted = read_counter(io)
        time.sleep(0.1)
        assert read_counter(io) > counted

        # --leave-running: the GPU state goes back right after the dump
        monkeypatch.setenv("STAND_IN_PIDS", str(restored.pid))
        snapshot(restored, str(tmp_path / "again"), leave_running=True)
        assert log.read_text().splitlines()[-4:] == [
            f"lock {restored.pid} timeout=30000 reserved=0", f"checkpoint {restored.pid} args=null",
            f"restore {restored.pid} pairs=0 ", f"unlock {restored.pid}"]
        assert restored.status == "running" and cuda.gpu_state(restored.pid) == "running"
        restored.delete(force=True)
    finally:
        io.close()


@needs_criu
def test_failed_dump_gives_the_gpu_back_with_the_stand_in(runtime, bundles, cid, tmp_path, own_stand_in,
                                                          monkeypatch):
    """CRIU refuses the dump (stdout on an outside unix socket) after the CUDA checkpoint: the container's CUDA
    process is restored and unlocked, and when even that fails the error says both."""
    import socket

    monkeypatch.setenv(cuda.LIBRARY_ENV, own_stand_in)
    monkeypatch.setenv("STAND_IN_LOG", str(tmp_path / "calls.log"))
    monkeypatch.setattr(cuda, "cuda_pids",
                        lambda pids: [p for p in pids if str(p) in os.environ.get("STAND_IN_PIDS", "").split(",")])
    ours, theirs = socket.socketpair()
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        container = runtime.create(cid, str(bundles.make(COUNTER)), stdio=(null, theirs.fileno(), theirs.fileno()))
        theirs.close()
        container.start()
        ours.settimeout(5)
        assert ours.recv(64)
        monkeypatch.setenv("STAND_IN_PIDS", str(container.pid))
        with pytest.raises(CriuError, match="criu dump failed"):
            snapshot(container, str(tmp_path / "images"))
        assert (tmp_path / "calls.log").read_text().splitlines()[-2:] == [
            f"restore {container.pid} pairs=0 ", f"unlock {container.pid}"]
        assert container.status == "running" and cuda.gpu_state(container.pid) == "running"
        monkeypatch.setenv("STAND_IN_FAIL", f"restore:{container.pid}:2")
        with pytest.raises(SnapshotError, match=r"(?s)criu dump failed.*and giving the container's CUDA processes "
                                                r"\[[0-9]+\] their GPU state back failed: cuCheckpointProcessRestore"
                                                r"\(pid [0-9]+\) failed: CUDA_ERROR_OUT_OF_MEMORY"):
            snapshot(container, str(tmp_path / "images2"))
        assert container.status == "running"  # CRIU let it go; its CUDA state is what the driver left
        container.delete(force=True)
    finally:
        ours.close()
        os.close(null)


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="this host has an NVIDIA GPU")
def test_benchmark_says_no_gpu_and_fails():
    result = subprocess.run([sys.executable, "-m", "coldbrew.bench.gpusnap", "--gb", "1", "--runs", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == "coldbrew bench gpusnap: no GPU: no /dev/nvidiactl (no NVIDIA driver or GPU on " \
                                    "this host)"


# ---- on a GPU --------------------------------------------------------------------------------------------------------

def _gpu_missing() -> str | None:
    if not os.path.exists("/dev/nvidiactl"):
        return "no GPU here (no /dev/nvidiactl)"
    if CRIU is None:
        return "no CRIU >= 4 (run scripts/setup-criu)"
    try:
        cuda.load_driver()
    except (CudaUnavailable, CudaError) as e:
        return str(e)
    from coldbrew.bench.gpusnap import gpu_missing

    return gpu_missing()


@pytest.fixture(scope="module")
def gpu_ready():
    reason = _gpu_missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def gpu_container(runtime, cid, tmp_path, gpu_ready):
    """make(gb) -> (container, its stdio, first answer): the GPU workload running in a container."""
    from coldbrew.bench.gpusnap import ask, drain, gpu_bundle

    made: list[Stdio] = []

    def make(gb: float):
        io = Stdio()
        made.append(io)
        container = runtime.create(cid, str(gpu_bundle(tmp_path, gb)), stdio=io.fds)
        container.start()
        try:
            return container, io, ask(container)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\ncontainer output:\n{drain(io.read)}") from None

    yield make
    for io in made:
        io.close()


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_gpu_tensors_survive_checkpoint_kill_restore(runtime, cid, tmp_path, gpu_container):
    from coldbrew.bench.gpusnap import ask

    container, io, first = gpu_container(4)
    assert first.bytes >= 4 << 30
    holders = cuda.cuda_pids(container.processes())
    assert len(holders) == 1 and cuda.gpu_state(holders[0]) == "running"
    old_pid = container.pid

    dumped: dict[str, float] = {}
    snap = snapshot(container, str(tmp_path / "images"), timings=dumped)
    wait_gone(old_pid)
    assert snap.gpu["inside"] and snap.gpu["processes"] == [first.pid]
    assert snap.size > first.bytes  # the GPU memory went through host memory into the images
    assert set(dumped) == {"cuda_checkpoint", "criu_dump"}

    restored_timings: dict[str, float] = {}
    restored = restore(runtime, snap, cid, stdio=io.fds, timings=restored_timings)
    assert set(restored_timings) == {"criu_restore", "cuda_restore"}
    answer = ask(restored, "verify")
    assert answer.token == first.token  # the same process, not a fresh start
    assert answer.intact and answer.checksum == first.ready_checksum
    assert answer.counter > first.counter  # it goes on running GPU work
    assert [cuda.gpu_state(pid) for pid in cuda.cuda_pids(restored.processes())] == ["running"]

    # a snapshot from another driver is refused before anything is made
    claimed = tmp_path / "claimed"
    shutil.copytree(snap.path, claimed, symlinks=True)
    record = json.loads((claimed / "coldbrew-snapshot.json").read_text())
    record["gpu"]["driver"] = "1.0.0"
    (claimed / "coldbrew-snapshot.json").write_text(json.dumps(record))
    with pytest.raises(SnapshotError, match="GPU memory checkpointed under NVIDIA driver 1.0.0; this host"):
        restore(runtime, str(claimed), f"{cid}-other", stdio=io.fds)

    restored.kill("KILL")
    assert restored.wait() == 128 + signal.SIGKILL
    restored.delete()
    # where it came from: the driver and the GPU the process had open
    assert snap.gpu["driver"] == cuda.host_driver_version() and snap.gpu["devices"], snap.gpu
    assert {d["uuid"] for d in snap.gpu["devices"]} <= {g["uuid"] for g in cuda.host_gpus()}


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_gpu_leave_running_keeps_working_and_the_copy_restores(runtime, cid, tmp_path, gpu_container):
    from coldbrew.bench.gpusnap import ask

    container, io, first = gpu_container(1)
    timings: dict[str, float] = {}
    snap = snapshot(container, str(tmp_path / "images"), leave_running=True, timings=timings)
    assert set(timings) == {"cuda_checkpoint", "criu_dump", "cuda_restore"} and snap.gpu["inside"]
    assert container.status == "running"
    again = ask(container, "verify")
    assert again.token == first.token and again.intact and again.checksum == first.ready_checksum
    assert again.counter > first.counter
    holders = cuda.cuda_pids(container.processes())
    assert holders and all(cuda.gpu_state(pid) == "running" for pid in holders)  # its GPU handles are back

    copy_io = Stdio()
    try:
        copy = restore(runtime, snap, f"{cid}-copy", stdio=copy_io.fds)
        answer = ask(copy, "verify")
        assert answer.token == first.token and answer.intact and answer.checksum == first.ready_checksum
        assert ask(container).counter > again.counter  # the original still answers beside its copy
        copy.delete(force=True)
    finally:
        copy_io.close()
    container.delete(force=True)


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_gpu_failed_dump_gives_the_gpu_back(runtime, cid, tmp_path, gpu_ready):
    """stdout on a unix socket outside the container: CRIU refuses the dump after the CUDA checkpoint; the container
    must go on running on its GPU with its tensors intact."""
    import socket

    from coldbrew.bench.gpusnap import ask, gpu_bundle

    ours, theirs = socket.socketpair()
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        container = runtime.create(cid, str(gpu_bundle(tmp_path, 1)), stdio=(null, theirs.fileno(), theirs.fileno()))
        theirs.close()
        container.start()
        first = ask(container)
        with pytest.raises(CriuError, match="criu dump failed"):
            snapshot(container, str(tmp_path / "images"))
        assert container.status == "running"
        holders = cuda.cuda_pids(container.processes())
        assert holders and [cuda.gpu_state(pid) for pid in holders] == ["running"]
        answer = ask(container, "verify")
        assert answer.token == first.token and answer.intact and answer.checksum == first.ready_checksum
        container.delete(force=True)
    finally:
        ours.close()
        theirs.close()
        os.close(null)


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_gpu_checkpointed_process_holds_no_device(gpu_container):
    """What the dump relies on: after the CUDA checkpoint no /dev/nvidia* descriptor or mapping is left."""
    from coldbrew.bench.gpusnap import ask

    container, io, first = gpu_container(1)
    holders = cuda.cuda_pids(container.processes())
    cuda.checkpoint_gpu(holders)
    try:
        assert [cuda.gpu_state(pid) for pid in holders] == ["checkpointed"]
        assert cuda.cuda_pids(holders) == []
    finally:
        cuda.restore_gpu(holders)
    assert [cuda.gpu_state(pid) for pid in holders] == ["running"]
    answer = ask(container, "verify")
    assert answer.intact and answer.checksum == first.ready_checksum
    container.delete(force=True)
