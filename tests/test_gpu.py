"""Devices for containers: CDI specs and requests (real device nodes, mounts and device cgroups in real containers),
NVIDIA_VISIBLE_DEVICES, GPU inventory and health, and `coldbrew gpu`.

The CDI tests use a fake vendor, example.com/device, whose nodes are real host nodes (/dev/zero exposed as
/dev/exampledev0, and a node made here whose numbers no driver serves), with spec directories private to each test
(COLDBREW_CDI_DIRS), so /etc/cdi is never written. Tests of a host without a GPU are skipped on a host with one;
tests marked `gpu` are skipped without /dev/nvidiactl.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coldbrew.bench.bundles import busybox_config, make_rootfs
from coldbrew.runtime import cdi, gpu
from coldbrew.runtime.cdi import CdiError
from coldbrew.runtime.cgroups import open_cgroup
from coldbrew.runtime.errors import SpecError
from coldbrew.runtime.gpu import GpuUnhealthy, NoGpu
from coldbrew.runtime.gpuinfo import THROTTLE_REASONS, EccCounts, GpuInfo, assess
from coldbrew.runtime.spec import DEVICES_INJECTED_ANNOTATION
from conftest import COLDBREW, run_through_files

HAS_GPU = os.path.exists("/dev/nvidiactl")
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no NVIDIA GPU here (/dev/nvidiactl absent)")
without_gpu = pytest.mark.skipif(HAS_GPU, reason="checks what a host without a GPU does")
UNBOUND_DEVICE = (1, 250)  # a char device number of the mem driver with nothing behind it: open() gives ENXIO


# ---- helpers -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's own busybox root (it replaces the session's for `bundles`): the runtime makes mount points
    (/opt/example, the driver's paths) in the root directory, and those must not show up in other tests' roots."""
    return make_rootfs(tmp_path_factory.mktemp("devices-rootfs"))


@pytest.fixture
def cdi_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Two spec directories (low, high priority) that the runtime reads instead of /etc/cdi and /var/run/cdi."""
    low, high = tmp_path / "cdi-low", tmp_path / "cdi-high"
    low.mkdir()
    high.mkdir()
    monkeypatch.setenv("COLDBREW_CDI_DIRS", f"{low}:{high}")
    return low, high


@pytest.fixture
def share(tmp_path: Path) -> Path:
    """A host directory the example spec mounts read-only."""
    path = tmp_path / "share"
    path.mkdir()
    (path / "hello").write_text("hello from the host\n")
    return path


@pytest.fixture
def unbound_node(tmp_path: Path) -> Path:
    path = tmp_path / "unbound-node"
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(*UNBOUND_DEVICE))
    return path


def example_spec(share: Path, unbound_node: Path | None = None) -> dict:
    devices = [{"name": "zero", "containerEdits": {
        "env": ["EXAMPLE_DEVICE=zero"],
        "deviceNodes": [{"path": "/dev/exampledev0", "hostPath": "/dev/zero", "permissions": "rw"}]}}]
    if unbound_node is not None:
        devices.append({"name": "unbound", "containerEdits": {
            "deviceNodes": [{"path": "/dev/exampleunbound", "hostPath": str(unbound_node), "permissions": "r"}]}})
    return {"cdiVersion": "0.6.0", "kind": "example.com/device",
            "containerEdits": {"env": ["EXAMPLE_SPEC=common"],
                               "mounts": [{"hostPath": str(share), "containerPath": "/opt/example",
                                           "options": ["ro", "bind", "nosuid", "nodev"]}]},
            "devices": devices}


def write_spec(directory: Path, name: str, document: dict | str) -> Path:
    path = directory / name
    if isinstance(document, str):
        path.write_text(document)
    elif name.endswith(".yaml"):
        import yaml

        path.write_text(yaml.safe_dump(document))
    else:
        path.write_text(json.dumps(document))
    return path


def annotated(*, annotations: dict | None = None, env: list[str] | None = None):
    def edit(config: dict) -> None:
        if annotations:
            config["annotations"] = annotations
        if env:
            config["process"]["env"] += env
    return edit


def run_capture(runtime, cid: str, bundle: Path, tmp_path: Path) -> tuple[int, str]:
    out = tmp_path / f"{cid}.out"
    with open(out, "wb") as f, open(os.devnull, "rb") as null:
        code = runtime.run(cid, str(bundle), stdio=(null.fileno(), f.fileno(), f.fileno()))
    return code, out.read_text()


def assert_nothing_left(runtime_root: str, cid: str) -> None:
    assert not os.path.exists(os.path.join(runtime_root, cid)), "state directory left behind"
    for path in open_cgroup(None, cid).paths.values():
        assert not os.path.exists(path), f"cgroup left behind: {path}"


def devices_list(cid: str) -> set[str]:
    return set(Path(open_cgroup(None, cid).paths["devices"], "devices.list").read_text().split("\n")) - {""}


# ---- CDI in real containers --------------------------------------------------------------------------------------

def test_cdi_device_mount_and_env_in_a_container(runtime, bundles, cid, tmp_path, cdi_dirs, share):
    write_spec(cdi_dirs[0], "example.yaml", example_spec(share))
    script = ("stat -c '%t:%T %F %a' /dev/exampledev0; head -c 8 /dev/exampledev0 | od -An -tx1; "
              "cat /opt/example/hello; grep ' /opt/example ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1; "
              "touch /opt/example/new 2>/dev/null && echo WRITABLE || echo WRITE_REFUSED; "
              "echo \"env: $EXAMPLE_SPEC $EXAMPLE_DEVICE\"")
    bundle = bundles.make(["sh", "-c", script],
                          edit=annotated(annotations={"cdi.k8s.io/test": "example.com/device=zero"}))
    code, output = run_capture(runtime, cid, bundle, tmp_path)
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0] == "1:5 character special file 666"  # /dev/zero's numbers and mode, at the spec's path
    assert lines[1].split() == ["00"] * 8  # usable: it reads zeros
    assert lines[2:6] == ["hello from the host", "ro", "WRITE_REFUSED", "env: common zero"]
    assert not (share / "new").exists()


def test_stored_config_is_not_injected_again(runtime, bundles, cid, cdi_dirs, share):
    """exec and delete parse the stored config again: they must not need the spec (or a GPU's health) again."""
    spec_file = write_spec(cdi_dirs[0], "example.json", example_spec(share))
    bundle = bundles.make(["true"], edit=annotated(annotations={"cdi.k8s.io/test": "example.com/device=zero"}))
    container = runtime.create(cid, str(bundle))
    try:
        assert container.state()["annotations"][DEVICES_INJECTED_ANNOTATION] == "example.com/device=zero"
        spec_file.unlink()
        spec = container.spec()
        assert [d.path for d in spec.devices] == ["/dev/exampledev0"]
        assert [m.destination for m in spec.mounts].count("/opt/example") == 1
    finally:
        container.delete(force=True)


def test_cdi_device_cgroup_allows_exactly_the_requested_device(runtime, bundles, cid, tmp_path, cdi_dirs, share,
                                                               unbound_node):
    write_spec(cdi_dirs[0], "example.yaml", example_spec(share, unbound_node))
    # the node has a number no driver serves: a read open the cgroup allows fails with ENXIO, a write open it
    # denies fails with EPERM before any driver is asked
    script = ("cat /dev/exampleunbound 2>&1; echo x 2>&1 > /dev/exampleunbound; "
              "stat -c '%t:%T %a' /dev/exampleunbound")
    requested = bundles.make(["sh", "-c", script],
                             edit=annotated(annotations={"cdi.k8s.io/test": "example.com/device=unbound"}))
    baseline = bundles.make(["true"])
    v1_devices = "devices" in open_cgroup(None, cid).paths
    with open(tmp_path / "out", "wb") as out, open(os.devnull, "rb") as null:
        container = runtime.create(cid, str(requested), stdio=(null.fileno(), out.fileno(), out.fileno()))
        other = runtime.create(cid + "b", str(baseline))
    try:
        if v1_devices:
            added = devices_list(cid) - devices_list(cid + "b")
            assert added == {"%s %d:%d %s" % ("c", *UNBOUND_DEVICE, "r")}
            assert devices_list(cid + "b") <= devices_list(cid)
        container.start()
        assert container.wait() == 0
    finally:
        container.delete(force=True)
        other.delete(force=True)
    output = (tmp_path / "out").read_text()
    assert "No such device or address" in output.splitlines()[0], output
    assert "Operation not permitted" in output.splitlines()[1], output
    assert output.splitlines()[2] == "%x:%x 600" % UNBOUND_DEVICE


def test_cdi_hooks_additional_gids_and_all(runtime, bundles, cid, tmp_path, cdi_dirs, share, unbound_node):
    marker = tmp_path / "hook-ran"
    spec = example_spec(share, unbound_node)
    spec["cdiVersion"] = "0.7.0"
    spec["devices"][0]["containerEdits"]["hooks"] = [
        {"hookName": "createRuntime", "path": "/bin/sh", "args": ["sh", "-c", f"cat > {marker}"]}]
    spec["devices"][0]["containerEdits"]["additionalGids"] = [4321]
    write_spec(cdi_dirs[0], "example.json", spec)
    bundle = bundles.make(["sh", "-c", "id -G; ls /dev/exampledev0 /dev/exampleunbound"],
                          edit=annotated(annotations={"cdi.k8s.io/a": "example.com/device=all"}))
    code, output = run_capture(runtime, cid, bundle, tmp_path)
    assert code == 0, output
    assert "4321" in output.splitlines()[0].split()
    assert json.loads(marker.read_text())["id"] == cid  # the hook got the container's state on its stdin


def test_higher_priority_directory_wins_and_same_directory_conflicts(cdi_dirs, share, tmp_path):
    low, high = cdi_dirs
    write_spec(low, "a.json", example_spec(share))
    override = example_spec(share)
    override["devices"][0]["containerEdits"]["env"] = ["EXAMPLE_DEVICE=override"]
    write_spec(high, "b.yaml", override)
    registry = cdi.load_registry()
    assert registry.devices["example.com/device=zero"].spec.path == str(high / "b.yaml")
    write_spec(high, "c.json", override)  # a second and a third definition at the same priority
    write_spec(high, "d.json", override)
    with pytest.raises(SpecError) as error:
        cdi.load_registry().resolve([("cdi.k8s.io/x", "example.com/device=zero")])
    assert str(error.value) == (f"annotations.cdi.k8s.io/x: CDI device example.com/device=zero is defined by each of "
                                f"{high / 'b.yaml'}, {high / 'c.json'}, {high / 'd.json'} at the same priority: none "
                                "of them is used")


def test_unknown_device_is_refused_with_the_spec_errors_and_nothing_left(runtime, runtime_root, bundles, cid,
                                                                          cdi_dirs, share):
    write_spec(cdi_dirs[0], "example.json", example_spec(share))
    broken = write_spec(cdi_dirs[0], "broken.yaml", "cdiVersion: '0.6.0'\nkind: [unclosed\n")
    bundle = bundles.make(["true"], edit=annotated(annotations={"cdi.k8s.io/t": "example.com/device=nope"}))
    with pytest.raises(SpecError) as error:
        runtime.create(cid, str(bundle))
    message = str(error.value)
    assert message.startswith("annotations.cdi.k8s.io/t: unknown CDI device example.com/device=nope")
    assert "(kind example.com/device has zero)" in message
    assert f"CDI spec {broken}: is not valid YAML at line" in message
    assert_nothing_left(runtime_root, cid)


def test_missing_host_node_is_named(runtime, runtime_root, bundles, cid, cdi_dirs, share, tmp_path):
    spec = example_spec(share)
    spec["devices"][0]["containerEdits"]["deviceNodes"][0]["hostPath"] = str(tmp_path / "no-such-node")
    path = write_spec(cdi_dirs[1], "example.json", spec)
    bundle = bundles.make(["true"], edit=annotated(annotations={"cdi.k8s.io/t": "example.com/device=zero"}))
    with pytest.raises(CdiError) as error:
        runtime.create(cid, str(bundle))
    assert str(error.value) == (f"CDI spec {path}: devices[0].containerEdits.deviceNodes[0]: hostPath: device node "
                                f"{tmp_path / 'no-such-node'}: No such file or directory")
    assert_nothing_left(runtime_root, cid)


MALFORMED = [
    ("kind", lambda s: s.update(kind="example.com"), "kind: 'example.com' is not of the form vendor/class"),
    ("vendor", lambda s: s.update(kind="-bad/device"), "kind: '-bad/device': vendor '-bad' must be"),
    ("duplicate", lambda s: s["devices"].append(s["devices"][0]),
     "devices[1].name: device 'zero' is defined twice in this spec"),
    ("name", lambda s: s["devices"][0].update(name="bad name"), "devices[0].name: 'bad name' must be"),
    ("no devices", lambda s: s.update(devices=[]), "devices: must name at least one device"),
    ("empty device", lambda s: s["devices"][0].update(containerEdits={}),
     "devices[0].containerEdits: a device needs at least one edit"),
    ("version", lambda s: s.update(cdiVersion="9.9.9"), "cdiVersion: '9.9.9' is not a CDI version coldbrew reads"),
    ("too old", lambda s: s.update(cdiVersion="0.4.0"),
     "devices[0].containerEdits.deviceNodes[0].hostPath: needs cdiVersion 0.5.0 or later; the file declares 0.4.0"),
    ("permissions", lambda s: s["devices"][0]["containerEdits"]["deviceNodes"][0].update(permissions="rwx"),
     "devices[0].containerEdits.deviceNodes[0].permissions: 'rwx' must be letters of 'rwm'"),
    ("node type", lambda s: s["devices"][0]["containerEdits"]["deviceNodes"][0].update(type="x"),
     "devices[0].containerEdits.deviceNodes[0].type: 'x' must be one of b, c, u, p"),
    ("env", lambda s: s["containerEdits"].update(env=["NOVALUE"]),
     "containerEdits.env[0]: 'NOVALUE' is not of the form NAME=value"),
    ("mount", lambda s: s["containerEdits"]["mounts"][0].update(containerPath="relative"),
     "containerEdits.mounts[0].containerPath: 'relative' must be an absolute path"),
    ("mount type", lambda s: s["containerEdits"]["mounts"][0].update(options=["ro"]),
     "containerEdits.mounts[0].type: is required unless the options hold bind or rbind"),
    ("hook", lambda s: s["containerEdits"].update(hooks=[{"hookName": "later", "path": "/bin/true"}]),
     "containerEdits.hooks[0].hookName: 'later' is not an OCI hook"),
    ("type", lambda s: s["devices"][0]["containerEdits"]["deviceNodes"][0].update(major="1"),
     "devices[0].containerEdits.deviceNodes[0].major: must be an integer, got a string"),
]


@pytest.mark.parametrize("case, change, expected", MALFORMED, ids=[m[0] for m in MALFORMED])
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_malformed_specs_name_file_and_field(tmp_path, share, case, change, expected, suffix):
    spec = example_spec(share)
    change(spec)
    path = write_spec(tmp_path, "spec" + suffix, spec)
    with pytest.raises(CdiError) as error:
        cdi.load_spec_file(str(path))
    assert str(error.value).startswith(f"CDI spec {path}: {expected}"), str(error.value)


@pytest.mark.parametrize("text, expected", [
    ("kind: [unclosed\n", "is not valid YAML at line 2"),
    ("- a list\n", "(document): must be an object, got an array"),
    ("cdiVersion: 0.6\nkind: a/b\ndevices: []\n", "cdiVersion: must be a string, got a number"),
])
def test_bad_yaml_is_named(tmp_path, text, expected):
    path = write_spec(tmp_path, "bad.yaml", text)
    with pytest.raises(CdiError) as error:
        cdi.load_spec_file(str(path))
    assert str(error.value).startswith(f"CDI spec {path}: {expected}"), str(error.value)


def test_edits_applied_twice_change_nothing(cdi_dirs, share, unbound_node, rootfs):
    """An engine that applied the CDI edits already and left the annotation: applying them again is harmless."""
    write_spec(cdi_dirs[0], "example.json", example_spec(share, unbound_node))
    devices = cdi.load_registry().resolve([("cdi.k8s.io/t", "example.com/device=all")])
    raw = busybox_config(rootfs, ["true"])
    raw["process"]["user"] = {"uid": 1000, "gid": 1000}
    cdi.apply_edits(raw, cdi.device_edits(devices))
    once = json.loads(json.dumps(raw))
    cdi.apply_edits(raw, cdi.device_edits(devices))
    assert raw == once
    assert {d["path"]: (d["major"], d["minor"], d["uid"]) for d in raw["linux"]["devices"]} == {
        "/dev/exampledev0": (1, 5, 1000), "/dev/exampleunbound": (*UNBOUND_DEVICE, 1000)}
    depths = [m["destination"].count("/") for m in raw["mounts"]]
    assert depths == sorted(depths)


@pytest.fixture(scope="module")
def module_cdi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cdi-module")
    share = directory / "share"
    share.mkdir()
    write_spec(directory, "example.json", example_spec(share))
    return directory


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 2**33) | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
FIELDS = [("process",), ("process", "env"), ("process", "user"), ("process", "user", "additionalGids"), ("linux",),
          ("linux", "devices"), ("linux", "resources"), ("linux", "resources", "devices"), ("mounts",), ("hooks",),
          ("hooks", "createRuntime"), ("annotations",), ("annotations", "cdi.k8s.io/t")]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(FIELDS), JSON)
def test_malformed_configs_asking_for_devices_give_clear_errors(module_cdi_dir, rootfs, field, value):
    """Whatever a config asking for a CDI device holds, injection gives a config or a RuntimeFailure naming what is
    wrong, never another exception."""
    from coldbrew.runtime.errors import RuntimeFailure
    from coldbrew.runtime.spec import parse

    raw = busybox_config(rootfs, ["true"])
    raw["annotations"] = {"cdi.k8s.io/t": "example.com/device=zero"}
    raw["process"]["user"] = {"uid": 0, "gid": 0}
    target = raw
    for name in field[:-1]:
        target = target.setdefault(name, {})
    target[field[-1]] = value
    try:
        parse(cdi.inject_devices(raw, dirs=[str(module_cdi_dir)]), str(rootfs))
    except RuntimeFailure as e:
        assert str(e)


def test_plain_container_start_imports_no_device_modules(bundles):
    """The check on every container start's path costs no import: no cdi, gpu, yaml or pynvml module."""
    bundle = bundles.make(["true"])
    code = ("import sys\nfrom coldbrew.runtime.spec import load_bundle\n"
            f"load_bundle({str(bundle)!r})\n"
            "print(sorted(m for m in ('yaml', 'pynvml', 'coldbrew.runtime.cdi', 'coldbrew.runtime.gpu') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---- parsers: properties -----------------------------------------------------------------------------------------

VENDOR = st.from_regex(r"[A-Za-z]([A-Za-z0-9_.-]{0,20}[A-Za-z0-9])?", fullmatch=True)
DEVICE = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9_.:-]{0,20}[A-Za-z0-9])?", fullmatch=True)
ALLOWED = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-/=")


@given(VENDOR, VENDOR, DEVICE)
def test_qualified_names_round_trip(vendor, cls, name):
    text = f"{vendor}/{cls}={name}"
    parsed = cdi.parse_qualified_name(text)
    assert parsed == (vendor, cls, name) and str(parsed) == text and parsed.kind == f"{vendor}/{cls}"


@settings(max_examples=300)
@given(st.one_of(st.text(), st.text(alphabet="ab1/=.-_:", max_size=12)))
def test_qualified_name_parser_accepts_only_well_formed_names(text):
    try:
        parsed = cdi.parse_qualified_name(text)
    except ValueError as e:
        assert repr(text) in str(e)
        return
    kind, name = text.split("=")  # exactly one '='
    vendor, cls = kind.split("/")  # exactly one '/' before it
    assert set(text) <= ALLOWED and (vendor, cls, name) == tuple(parsed)
    for part in (vendor, cls):
        assert part[0].isalpha() and part[-1].isalnum()
    assert name[0].isalnum() and name[-1].isalnum()


UUID = st.uuids().map(lambda u: f"GPU-{u}")
GPU_ID = st.one_of(st.integers(0, 9999), UUID)


@given(st.lists(GPU_ID, min_size=1, max_size=8), st.sampled_from([",", ", ", " ,"]))
def test_visible_devices_lists_parse(ids, separator):
    parsed = gpu.parse_visible_devices(separator.join(str(i) for i in ids))
    assert parsed.mode == "list"
    assert list(parsed.ids) == list(dict.fromkeys(ids))  # in order, each once


@settings(max_examples=300)
@given(st.one_of(st.text(), st.text(alphabet="0123456789,GPU-MIG:abcdef ", max_size=20)))
def test_visible_devices_parser_never_crashes(text):
    try:
        parsed = gpu.parse_visible_devices(text)
    except SpecError as e:
        assert e.path == "process.env" and f"NVIDIA_VISIBLE_DEVICES={text!r}" in e.message
        return
    if text in ("", "void"):
        assert parsed.mode == "void"
    elif text in ("all", "none"):
        assert parsed.mode == text
    else:
        items = [item.strip() for item in text.split(",")]
        expected = [int(item) if item.isascii() and item.isdigit() else item for item in items]
        assert parsed.mode == "list" and parsed.ids == tuple(dict.fromkeys(expected))
        for item in parsed.ids:
            assert isinstance(item, int) or re.fullmatch(r"GPU-[0-9a-fA-F-]+", item)


def test_visible_devices_and_capabilities_values():
    assert gpu.parse_visible_devices(None).mode == "void"
    with pytest.raises(SpecError, match="'MIG-1234' is a MIG device"):
        gpu.parse_visible_devices("0,MIG-1234")
    with pytest.raises(SpecError, match="'0:1' is a MIG device"):
        gpu.parse_visible_devices("0:1")
    assert gpu.parse_driver_capabilities(None) == {"utility", "compute"}
    assert gpu.parse_driver_capabilities("all") == {"utility", "compute", "video"}
    assert gpu.parse_driver_capabilities("utility, video") == {"utility", "video"}
    with pytest.raises(SpecError, match="the 'graphics' capability is not supported by coldbrew"):
        gpu.parse_driver_capabilities("compute,graphics")
    with pytest.raises(SpecError, match="'computer' is not a driver capability"):
        gpu.parse_driver_capabilities("computer")
    assert gpu.env_value(["A=1", "NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_VISIBLE_DEVICES=void"],
                         "NVIDIA_VISIBLE_DEVICES") == "void"


# ---- health policy and selection (data in, verdict out) ----------------------------------------------------------

def reading(index: int, **fields) -> GpuInfo:
    base = {"uuid": f"GPU-{index:08x}-1111-2222-3333-444444444444", "name": "NVIDIA H100 80GB HBM3",
            "minor": index, "temperature": 40, "temperature_slowdown": 90}
    gpu_reading = GpuInfo(index=index, **{**base, **fields})
    return GpuInfo(index=index, **{**base, **fields, "problems": assess(gpu_reading)})


@pytest.mark.parametrize("fields, problem", [
    ({}, None),
    ({"ecc": EccCounts(volatile_corrected=12, aggregate_uncorrected=3)}, None),  # reported, not failing
    ({"throttle_reasons": ("gpu_idle", "sw_power_cap")}, None),
    ({"ecc": EccCounts(volatile_uncorrected=2)}, "2 uncorrectable ECC errors since the driver loaded"),
    ({"retired_pages_pending": True}, "retired memory pages are pending: the GPU needs a reset"),
    ({"remapped_rows_pending": True}, "memory row remapping is pending: the GPU needs a reset"),
    ({"remapped_rows_failed": True}, "memory row remapping failed"),
    ({"throttle_reasons": ("hw_thermal_slowdown",)}, "hardware slowdown active (hw_thermal_slowdown)"),
    ({"temperature": 93}, "temperature 93 C is at or above its slowdown threshold 90 C"),
    ({"minor": None}, "NVML gives no minor number: its /dev/nvidiaN node is unknown"),
    ({"lost": True}, "NVML reports the GPU lost (fallen off the bus): it needs a reset or a reboot"),
])
def test_health_verdict(fields, problem):
    gpu_reading = reading(0, **fields)
    assert gpu_reading.problems == ((problem,) if problem else ())
    assert gpu_reading.healthy is (problem is None)


def test_selection_refuses_unknown_and_unhealthy_gpus():
    gpus = [reading(0), reading(1, ecc=EccCounts(volatile_uncorrected=1)), reading(2)]
    pick = gpu.parse_visible_devices
    assert [g.index for g in gpu.select_gpus(pick("2,0"), gpus)] == [2, 0]
    assert [g.index for g in gpu.select_gpus(pick(gpus[2].uuid[:12]), gpus)] == [2]
    assert gpu.select_gpus(pick("none"), gpus) == []
    with pytest.raises(GpuUnhealthy) as error:
        gpu.select_gpus(pick("0,1"), gpus)
    assert str(error.value) == (f"GPU 1 ({gpus[1].uuid}) failed its health check: 1 uncorrectable ECC errors since "
                                "the driver loaded: not handed out")
    with pytest.raises(GpuUnhealthy, match="GPU 1 "):
        gpu.select_gpus(pick("all"), gpus)
    with pytest.raises(SpecError, match="no GPU with index 7 on this host"):
        gpu.select_gpus(pick("7"), gpus)
    with pytest.raises(SpecError, match="UUID GPU-0 matches several GPUs"):
        gpu.select_gpus(pick("GPU-0"), gpus)


# ---- a host without a GPU ----------------------------------------------------------------------------------------

NO_DRIVER = "no NVIDIA driver on this host (libnvidia-ml.so.1 not found)"


@without_gpu
@pytest.mark.parametrize("value", ["all", "0", "none"])
def test_gpu_request_without_driver_is_refused_and_leaves_nothing(runtime, runtime_root, bundles, cid, value):
    bundle = bundles.make(["true"], edit=annotated(env=[f"NVIDIA_VISIBLE_DEVICES={value}"]))
    with pytest.raises(NoGpu, match=re.escape(NO_DRIVER)):
        runtime.create(cid, str(bundle))
    assert_nothing_left(runtime_root, cid)


@without_gpu
def test_gpu_request_without_driver_through_the_cli(runtime_root, bundles, cid):
    bundle = bundles.make(["true"], edit=annotated(env=["NVIDIA_VISIBLE_DEVICES=all"]))
    result = run_through_files([COLDBREW, "--root", runtime_root, "run", "--bundle", str(bundle), cid])
    assert result.returncode == 1
    assert result.stderr.strip().endswith(NO_DRIVER)
    assert_nothing_left(runtime_root, cid)


@pytest.mark.parametrize("env", [[], ["NVIDIA_VISIBLE_DEVICES=void"], ["NVIDIA_VISIBLE_DEVICES="],
                                 ["NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_VISIBLE_DEVICES=void"]])
def test_void_or_unset_runs_without_gpu_devices(runtime, bundles, cid, tmp_path, env):
    bundle = bundles.make(["sh", "-c", "ls /dev | grep -c nvidia; echo \"[$NVIDIA_VISIBLE_DEVICES]\""],
                          edit=annotated(env=env))
    code, output = run_capture(runtime, cid, bundle, tmp_path)
    assert code == 0 and output.splitlines()[0] == "0"  # grep -c counted no nvidia node
    assert output.splitlines()[1] == "[" + (gpu.env_value(env, "NVIDIA_VISIBLE_DEVICES") or "") + "]"


def test_bad_visible_devices_value_is_named(runtime, runtime_root, bundles, cid):
    bundle = bundles.make(["true"], edit=annotated(env=["NVIDIA_VISIBLE_DEVICES=gpu0"]))
    with pytest.raises(SpecError) as error:
        runtime.create(cid, str(bundle))
    assert str(error.value) == ("process.env: NVIDIA_VISIBLE_DEVICES='gpu0': 'gpu0' is not a GPU index, a GPU UUID "
                                "(GPU-...), all, none or void")
    assert_nothing_left(runtime_root, cid)


@without_gpu
def test_cdi_gpu_request_without_driver_is_refused(runtime, runtime_root, bundles, cid, cdi_dirs):
    spec = {"cdiVersion": "0.5.0", "kind": "nvidia.com/gpu",
            "devices": [{"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0"}]}}]}
    write_spec(cdi_dirs[0], "nvidia.yaml", spec)
    bundle = bundles.make(["true"], edit=annotated(annotations={"cdi.k8s.io/gpu": "nvidia.com/gpu=0"}))
    with pytest.raises(NoGpu, match=re.escape(NO_DRIVER)):
        runtime.create(cid, str(bundle))
    assert_nothing_left(runtime_root, cid)


@without_gpu
def test_inventory_without_driver():
    from coldbrew.runtime import gpuinfo

    for call in (gpuinfo.list_gpus, gpuinfo.healthy_gpus, gpu.find_driver, gpu.generate_cdi_spec):
        with pytest.raises(NoGpu) as error:
            call()
        assert str(error.value) == NO_DRIVER


@without_gpu
@pytest.mark.parametrize("command", [["ls"], ["ls", "--json"], ["check"], ["cdi", "--output", "-"]])
def test_gpu_cli_without_gpu(tmp_path, command):
    result = subprocess.run([sys.executable, "-m", "coldbrew.runtime.gpu_cli", *command], capture_output=True,
                            text=True)
    assert result.returncode == 1
    assert result.stderr == f"coldbrew gpu: {NO_DRIVER}\n" and result.stdout == ""


@without_gpu
def test_coldbrew_gpu_group_without_gpu():
    from coldbrew.runtime.cli import GROUPS

    if "gpu" not in GROUPS:
        pytest.skip("the gpu group is not registered in runtime/cli.py GROUPS yet")
    result = run_through_files([COLDBREW, "gpu", "ls"])
    assert result.returncode == 1 and result.stderr == f"coldbrew gpu: {NO_DRIVER}\n"


# ---- with a GPU (an H100 with driver 580 in the project's GPU runs) ----------------------------------------------

def glibc_mounts() -> list[dict]:
    """Read-only binds of the C library files nvidia-smi and NVML need: the busybox root has no glibc. The driver's
    own files are left to the runtime, which is what is under test. The host's loader is bound too, so its default
    search path (where the runtime mounts libnvidia-ml.so.1) is the host's."""
    paths = set()
    for target in (shutil.which("nvidia-smi"), "libnvidia-ml.so.1"):
        if target == "libnvidia-ml.so.1":
            target = next(p for p in gpu.find_driver().libraries["utility"] if p.endswith("libnvidia-ml.so.1"))
        output = subprocess.run(["ldd", target], capture_output=True, text=True, check=True).stdout
        for line in output.splitlines():
            match = re.search(r"(/\S+)", line.split("=>")[-1])
            if match and "nvidia" not in match.group(1):
                paths.add(match.group(1))
    return [{"destination": p, "source": p, "type": "bind", "options": ["bind", "ro", "nosuid", "nodev"]}
            for p in sorted(paths)]


def nvidia_smi_uuids(runtime, cid: str, tmp_path: Path, rootfs: Path, *, env=(), annotations=None) -> list[str]:
    config = busybox_config(rootfs, ["nvidia-smi", "-L"])
    config["mounts"] += glibc_mounts()
    config["process"]["env"] += list(env)
    if annotations:
        config["annotations"] = annotations
    bundle = tmp_path / f"bundle-{cid}"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(config))
    code, output = run_capture(runtime, cid, bundle, tmp_path)
    assert code == 0, output
    return re.findall(r"\(UUID: (GPU-[0-9a-f-]+)\)", output)


@pytest.mark.gpu
@needs_gpu
def test_list_gpus_on_a_gpu_host():
    from coldbrew.runtime.gpuinfo import healthy_gpus, list_gpus

    gpus = list_gpus()
    assert gpus and [g.index for g in gpus] == list(range(len(gpus)))
    for g in gpus:
        assert re.fullmatch(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", g.uuid)
        assert g.name and g.memory_total > 1 << 30 and 0 <= g.memory_used <= g.memory_total
        assert re.fullmatch(r"[0-9]+\.[0-9]+(\.[0-9]+)?", g.driver_version)
        assert g.driver_version == gpu.find_driver().version
        assert re.fullmatch(r"[0-9]+\.[0-9]+", g.cuda_driver_version)
        assert 0 < g.temperature < 120 and g.minor is not None and os.path.exists(f"/dev/nvidia{g.minor}")
        assert set(g.throttle_reasons) <= set(THROTTLE_REASONS.values())
        json.dumps(g.to_dict())
    assert healthy_gpus(), [g.problems for g in gpus]


@pytest.mark.gpu
@needs_gpu
def test_container_with_one_gpu_sees_exactly_it(runtime, cid, tmp_path, rootfs):
    from coldbrew.runtime.gpuinfo import list_gpus

    first = list_gpus()[0]
    uuids = nvidia_smi_uuids(runtime, cid, tmp_path, rootfs, env=["NVIDIA_VISIBLE_DEVICES=0"])
    assert uuids == [first.uuid]
    by_uuid = nvidia_smi_uuids(runtime, cid + "u", tmp_path, rootfs,
                               env=[f"NVIDIA_VISIBLE_DEVICES={first.uuid}"])
    assert by_uuid == [first.uuid]


@pytest.mark.gpu
@needs_gpu
def test_generated_cdi_spec_validates_and_gives_all_gpus(runtime, cid, tmp_path, rootfs, cdi_dirs):
    from coldbrew.runtime.gpuinfo import list_gpus

    path = gpu.write_cdi_spec(gpu.generate_cdi_spec(), str(cdi_dirs[1] / "nvidia.yaml"))
    spec = cdi.load_spec_file(path)
    gpus = list_gpus()
    assert set(spec.devices) == {"all"} | {str(g.index) for g in gpus} | {g.uuid for g in gpus}
    uuids = nvidia_smi_uuids(runtime, cid, tmp_path, rootfs,
                             annotations={"cdi.k8s.io/gpu": "nvidia.com/gpu=all"})
    assert sorted(uuids) == sorted(g.uuid for g in gpus)
    one = nvidia_smi_uuids(runtime, cid + "1", tmp_path, rootfs,
                           annotations={"cdi.k8s.io/gpu": f"nvidia.com/gpu={gpus[-1].uuid}"})
    assert one == [gpus[-1].uuid]


@pytest.mark.gpu
@needs_gpu
def test_gpu_cli_on_a_gpu_host(tmp_path):
    from coldbrew.runtime.gpuinfo import list_gpus

    gpus = list_gpus()
    listing = subprocess.run([sys.executable, "-m", "coldbrew.runtime.gpu_cli", "ls", "--json"], capture_output=True,
                             text=True, check=True)
    assert [g["uuid"] for g in json.loads(listing.stdout)] == [g.uuid for g in gpus]
    check = subprocess.run([sys.executable, "-m", "coldbrew.runtime.gpu_cli", "check"], capture_output=True,
                           text=True)
    assert check.returncode == (0 if all(g.healthy for g in gpus) else 1), check.stdout + check.stderr
    output = tmp_path / "cdi" / "nvidia.json"
    written = subprocess.run([sys.executable, "-m", "coldbrew.runtime.gpu_cli", "cdi", "--output", str(output)],
                             capture_output=True, text=True, check=True)
    assert written.stdout.startswith(f"wrote {output}: nvidia.com/gpu devices ")
    assert cdi.load_spec_file(str(output)).kind == "nvidia.com/gpu"
