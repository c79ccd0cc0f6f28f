"""A garbled config.json never crashes the runtime and never leaves anything behind.

Through the API every failure is a RuntimeFailure (a SpecError naming the JSON path where the config is at fault);
through the CLI `coldbrew create` exits 1 with one line on stderr, "coldbrew: ...". After each attempt no mount,
cgroup, state directory, process or descriptor of the attempt is left (see test_leaks.HostWatch).

The configs are based on a busybox bundle whose root filesystem belongs to this module alone: a fuzzed mount or
device may create directories and nodes in it before the container fails.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from coldbrew.bench.bundles import busybox_config, make_rootfs
from coldbrew.runtime.container import Runtime
from coldbrew.runtime.errors import RuntimeFailure, SpecError
from conftest import COLDBREW, coldbrew
from test_leaks import HostWatch, warm_up

SURROGATE = "\ud800"  # a lone surrogate: valid in JSON ("\ud800"), not encodable as UTF-8
NO_CONFIG = object()


@pytest.fixture(scope="module")
def own_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rootfs(tmp_path_factory.mktemp("badinput") / "rootfs")


@pytest.fixture
def base_config(own_rootfs: Path) -> dict:
    return busybox_config(own_rootfs, ["true"])


@pytest.fixture
def prefix() -> str:
    return f"bi{uuid.uuid4().hex[:6]}"


@pytest.fixture
def watch(prefix: str, tmp_path: Path, own_rootfs: Path, runtime_root: str) -> HostWatch:
    return HostWatch(prefix, (str(tmp_path), str(own_rootfs), runtime_root), runtime_root)


@pytest.fixture
def devnull() -> int:
    fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    yield fd
    os.close(fd)


class Attempts:
    """Bundles and container ids for one test; `api` and `cli` try a create and clean up whatever succeeded."""

    def __init__(self, base: Path, prefix: str, runtime: Runtime, runtime_root: str, stdio: int) -> None:
        self.base = base
        self.prefix = prefix
        self.runtime = runtime
        self.runtime_root = runtime_root
        self.stdio = (stdio, stdio, stdio)
        self.count = 0

    def bundle(self, config: Any = NO_CONFIG, raw: bytes | None = None) -> Path:
        """A bundle directory with `config` as its config.json (`raw` bytes instead; neither: no config.json)."""
        self.count += 1
        bundle = self.base / f"b{self.count}"
        bundle.mkdir()
        if raw is not None:
            (bundle / "config.json").write_bytes(raw)
        elif config is not NO_CONFIG:
            (bundle / "config.json").write_text(json.dumps(config))
        return bundle

    def next_id(self) -> str:
        self.count += 1
        return f"{self.prefix}-{self.count}"

    def api(self, bundle: Path) -> RuntimeFailure | None:
        """The RuntimeFailure a create raised, or None if it succeeded (then the container is deleted)."""
        try:
            container = self.runtime.create(self.next_id(), str(bundle), stdio=self.stdio)
        except RuntimeFailure as e:
            return e
        container.delete(force=True)
        return None

    def cli(self, bundle: Path) -> str | None:
        """The one error line of `coldbrew create`, or None if it succeeded (then the container is deleted).

        This process is a subreaper (as a shim is) and a failed create's init is reparented to it: check for
        leaks with assert_clean(shim=True), which reaps them as a shim would."""
        cid = self.next_id()
        pid_file = bundle / "pid"
        result = coldbrew(self.runtime_root, "create", "--bundle", str(bundle), "--pid-file", str(pid_file), cid,
                          check=False)
        assert "Traceback" not in result.stderr, result.stderr
        if result.returncode == 0:
            coldbrew(self.runtime_root, "delete", "--force", cid)
            # The init is our orphan (this process is a subreaper, as a shim is): reap it as a shim does.
            try:
                os.waitpid(int(pid_file.read_text()), 0)
            except ChildProcessError:
                pass
            return None
        assert result.returncode == 1, result
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("coldbrew: "), result.stderr
        return lines[0]


@pytest.fixture
def attempts(tmp_path: Path, prefix: str, runtime: Runtime, runtime_root: str, devnull: int) -> Attempts:
    return Attempts(tmp_path, prefix, runtime, runtime_root, devnull)


@pytest.fixture
def warmed(attempts: Attempts, base_config: dict) -> Attempts:
    """Attempts after one good container, so that the runtime's lasting caches (the exec shim) are not leaks."""
    warm_up(attempts.runtime, attempts.bundle(base_config), attempts.prefix + "-warm")
    return attempts


# ---- hand-written cases ------------------------------------------------------------------------------------------

def _edit(fn: Callable[[dict], Any]) -> Callable[[dict], dict]:
    def apply(config: dict) -> dict:
        config = copy.deepcopy(config)
        fn(config)
        return config

    return apply


def _ns_index(config: dict, ns_type: str) -> int:
    return next(i for i, ns in enumerate(config["linux"]["namespaces"]) if ns["type"] == ns_type)


def _set_ns_path(config: dict, ns_type: str, path: str) -> None:
    config["linux"]["namespaces"][_ns_index(config, ns_type)]["path"] = path


def _user_namespace_with_pids_limit_1(config: dict) -> None:
    config["linux"]["namespaces"].append({"type": "user"})
    config["linux"]["uidMappings"] = config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 0,
                                                                         "size": 65536}]
    config["mounts"] = [m for m in config["mounts"] if m["type"] not in ("cgroup", "sysfs", "mqueue")]
    config["linux"]["resources"].update(pids={"limit": 1})


# (id, edit of the base config, the SpecError path expected, or None where the kernel or the init refuses)
CASES: list[tuple[str, Callable[[dict], dict], str | None]] = [
    ("no-args", _edit(lambda c: c["process"].pop("args")), "process.args"),
    ("empty-args", _edit(lambda c: c["process"].update(args=[])), "process.args"),
    ("args-string", _edit(lambda c: c["process"].update(args="sh -c true")), "process.args"),
    ("args-number", _edit(lambda c: c["process"].update(args=["sh", 1])), "process.args[1]"),
    ("args-nul", _edit(lambda c: c["process"].update(args=["sh\0"])), "process.args[0]"),
    ("no-such-program", _edit(lambda c: c["process"].update(args=["/no/such/program"])), None),
    ("no-process", _edit(lambda c: c.pop("process")), "process"),
    ("process-array", _edit(lambda c: c.update(process=[])), "process"),
    ("env-no-equals", _edit(lambda c: c["process"].update(env=["PATH"])), "process.env[0]"),
    ("relative-cwd", _edit(lambda c: c["process"].update(cwd="tmp")), "process.cwd"),
    ("cwd-is-a-file", _edit(lambda c: c["process"].update(cwd="/bin/busybox")), None),
    ("relative-root", _edit(lambda c: c["root"].update(path="rootfs")), "root.path"),
    ("no-root", _edit(lambda c: c.pop("root")), "root"),
    ("root-empty", _edit(lambda c: c["root"].update(path="")), "root.path"),
    ("root-is-a-file", _edit(lambda c: c["root"].update(path="/bin/busybox")), "root.path"),
    ("bad-oci-version", _edit(lambda c: c.update(ociVersion="2.0.0")), "ociVersion"),
    ("no-oci-version", _edit(lambda c: c.pop("ociVersion")), "ociVersion"),
    ("bad-namespace-type", _edit(lambda c: c["linux"]["namespaces"].append({"type": "bogus"})),
     "linux.namespaces[6].type"),
    ("namespace-type-number", _edit(lambda c: c["linux"]["namespaces"].append({"type": 4})),
     "linux.namespaces[6].type"),
    ("namespace-twice", _edit(lambda c: c["linux"]["namespaces"].append({"type": "pid"})),
     "linux.namespaces[6].type"),
    ("namespaces-object", _edit(lambda c: c["linux"].update(namespaces={"type": "mount"})), "linux.namespaces"),
    ("no-mount-namespace", _edit(lambda c: c["linux"]["namespaces"].pop(_ns_index(c, "mount"))),
     "linux.namespaces"),
    ("namespace-path-missing", _edit(lambda c: _set_ns_path(c, "network", "/no/such/ns")),
     "linux.namespaces[1].path"),
    ("namespace-path-not-a-namespace", _edit(lambda c: _set_ns_path(c, "network", "/")), None),
    ("time-namespace", _edit(lambda c: c["linux"]["namespaces"].append({"type": "time"})),
     "linux.namespaces[6].type"),
    ("user-namespace-without-maps", _edit(lambda c: c["linux"]["namespaces"].append({"type": "user"})),
     "linux.uidMappings"),
    ("bad-rlimit-type", _edit(lambda c: c["process"].update(rlimits=[{"type": "RLIMIT_BOGUS", "soft": 1,
                                                                        "hard": 1}])), "process.rlimits[0].type"),
    ("rlimit-soft-above-hard", _edit(lambda c: c["process"].update(rlimits=[{"type": "RLIMIT_NOFILE", "soft": 9,
                                                                               "hard": 8}])),
     "process.rlimits[0].soft"),
    ("rlimit-negative", _edit(lambda c: c["process"].update(rlimits=[{"type": "RLIMIT_NOFILE", "soft": -1,
                                                                        "hard": 8}])), "process.rlimits[0].soft"),
    ("rlimit-above-uint64", _edit(lambda c: c["process"].update(rlimits=[{"type": "RLIMIT_CORE", "soft": 1,
                                                                            "hard": 2**64}])),
     "process.rlimits[0].hard"),
    ("rlimit-string", _edit(lambda c: c["process"].update(rlimits=[{"type": "RLIMIT_CORE", "soft": "1",
                                                                      "hard": 1}])), "process.rlimits[0].soft"),
    ("rlimit-not-allowed", _edit(lambda c: c["process"].update(rlimits=[{"type": "RLIMIT_NOFILE", "soft": 2**40,
                                                                           "hard": 2**40}])), None),
    ("unsupported-mount-option", _edit(lambda c: c["mounts"][1]["options"].append("idmap")),
     "mounts[1].options[4]"),
    ("comma-mount-option", _edit(lambda c: c["mounts"][1]["options"].append("ro,nosuid")), "mounts[1].options[4]"),
    ("kernel-refuses-mount-option", _edit(lambda c: c["mounts"][1]["options"].append("bogus=1")), None),
    ("unknown-filesystem", _edit(lambda c: c["mounts"].append({"destination": "/mnt", "type": "nosuchfs",
                                                                 "source": "none"})), None),
    ("relative-mount-destination", _edit(lambda c: c["mounts"][0].update(destination="proc")),
     "mounts[0].destination"),
    ("dotdot-mount-destination", _edit(lambda c: c["mounts"][0].update(destination="/../proc")),
     "mounts[0].destination"),
    ("bind-without-source", _edit(lambda c: c["mounts"].append({"destination": "/mnt", "type": "bind"})),
     "mounts[7].source"),
    ("bind-missing-source", _edit(lambda c: c["mounts"].append({"destination": "/mnt", "type": "bind",
                                                                  "source": "/no/such/dir"})), None),
    ("bind-file-onto-dir", _edit(lambda c: c["mounts"].append({"destination": "/bin", "type": "bind",
                                                                 "source": "/etc/hostname"})), None),
    ("mount-options-string", _edit(lambda c: c["mounts"][1].update(options="nosuid")), "mounts[1].options"),
    ("mount-null", _edit(lambda c: c["mounts"].append(None)), "mounts[7]"),
    ("hostname-too-long", _edit(lambda c: c.update(hostname="h" * 65)), "hostname"),
    ("hostname-without-uts", _edit(lambda c: c["linux"]["namespaces"].pop(_ns_index(c, "uts"))), "hostname"),
    ("uid-negative", _edit(lambda c: c["process"]["user"].update(uid=-1)), "process.user.uid"),
    ("uid-string", _edit(lambda c: c["process"]["user"].update(uid="0")), "process.user.uid"),
    ("uid-float", _edit(lambda c: c["process"]["user"].update(uid=0.5)), "process.user.uid"),
    ("too-many-groups", _edit(lambda c: c["process"]["user"].update(additionalGids=list(range(70000)))), None),
    ("oom-score-adj", _edit(lambda c: c["process"].update(oomScoreAdj=5000)), "process.oomScoreAdj"),
    ("terminal-without-socket", _edit(lambda c: c["process"].update(terminal=True)), None),
    ("memory-negative", _edit(lambda c: c["linux"]["resources"].update(memory={"limit": -5})),
     "linux.resources.memory.limit"),
    ("memory-too-small-for-init", _edit(lambda c: c["linux"]["resources"].update(memory={"limit": 1 << 16})),
     None),
    # with a user namespace the init forks once inside its cgroup (the pid namespace must come after the user one)
    ("pids-too-small-for-init", _edit(_user_namespace_with_pids_limit_1), None),
    ("cpus-out-of-range", _edit(lambda c: c["linux"]["resources"].update(cpu={"cpus": "999"})), None),
    ("cpu-shares-too-low", _edit(lambda c: c["linux"]["resources"].update(cpu={"shares": 1})),
     "linux.resources.cpu.shares"),
    ("resources-array", _edit(lambda c: c["linux"].update(resources=[])), "linux.resources"),
    ("systemd-cgroups-path", _edit(lambda c: c["linux"].update(cgroupsPath="system.slice:cb:x")), None),
    ("cgroups-path-root", _edit(lambda c: c["linux"].update(cgroupsPath="/")), "linux.cgroupsPath"),
    ("cgroups-path-number", _edit(lambda c: c["linux"].update(cgroupsPath=5)), "linux.cgroupsPath"),
    ("device-bad-type", _edit(lambda c: c["linux"].update(devices=[{"path": "/dev/x", "type": "x"}])),
     "linux.devices[0].type"),
    ("device-over-directory", _edit(lambda c: c["linux"].update(devices=[{"path": "/dev/pts", "type": "c",
                                                                           "major": 1, "minor": 3}])), None),
    ("sysctl-unknown", _edit(lambda c: c["linux"].update(sysctl={"kernel.no_such_knob": "1"})), None),
    ("sysctl-dotdot", _edit(lambda c: c["linux"].update(sysctl={"../../etc/x": "1"})), "linux.sysctl.../../etc/x"),
    ("seccomp-bad-action", _edit(lambda c: c["linux"].update(seccomp={"defaultAction": "SCMP_ACT_BOGUS"})),
     "linux.seccomp.defaultAction"),
    ("capabilities-string", _edit(lambda c: c["process"].update(capabilities="ALL")), "process.capabilities"),
    ("hook-relative-path", _edit(lambda c: c.update(hooks={"prestart": [{"path": "true"}]})),
     "hooks.prestart[0].path"),
    ("hook-fails", _edit(lambda c: c.update(hooks={"createRuntime": [{"path": "/bin/false"}]})), None),
    ("hook-fails-loudly", _edit(lambda c: c.update(hooks={"createRuntime": [
        {"path": "/bin/sh", "args": ["sh", "-c", "echo one >&2; echo two >&2; exit 3"]}]})), None),
    ("hook-missing", _edit(lambda c: c.update(hooks={"createRuntime": [{"path": "/no/such/hook"}]})), None),
    ("hook-env-no-equals", _edit(lambda c: c.update(hooks={"createRuntime": [{"path": "/bin/true",
                                                                               "env": ["NOEQUALS"]}]})), None),
    ("container-hook-fails", _edit(lambda c: c.update(hooks={"createContainer": [{"path": "/bin/false"}]})),
     None),
    ("mount-destination-surrogate", _edit(lambda c: c["mounts"].append(
        {"destination": "/mnt/" + SURROGATE, "type": "tmpfs", "source": "tmpfs"})), None),
    ("hook-path-surrogate", _edit(lambda c: c.update(hooks={"createRuntime": [{"path": "/bin/" + SURROGATE}]})),
     None),
    ("config-array", lambda c: [c], "(config.json)"),
    ("config-null", lambda c: None, "(config.json)"),
    ("config-number", lambda c: 7, "(config.json)"),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_api_refuses_bad_config(case, warmed: Attempts, base_config: dict, watch: HostWatch) -> None:
    _, edit, path = case
    bundle = warmed.bundle(edit(base_config))
    before = watch.snapshot()
    error = warmed.api(bundle)
    assert error is not None, "the create succeeded"
    if path is not None:
        assert isinstance(error, SpecError) and error.path == path, repr(error)
    watch.assert_clean(before)


# Raw config.json files, and the SpecError path expected ("": the file as a whole).
RAW_CASES: list[tuple[str, bytes, str]] = [
    ("empty", b"", ""),
    ("truncated", b'{"ociVersion": "1.2.0", "root": {"path": ', ""),
    ("binary", bytes(range(256)) * 4, ""),
    ("nul-bytes", b"\0" * 64, ""),
    ("latin1", '{"ociVersion": "1.2.0", "hostname": "\xe9"}'.encode("latin-1"), ""),
    ("utf16-is-json-too", '{"ociVersion": "1.2.0"}'.encode("utf-16"), "root"),
    ("trailing-garbage", b'{"ociVersion": "1.2.0"} x', ""),
    ("huge-integer", b'{"ociVersion": "1.2.0", "x": 1' + b"0" * 5000 + b"}", ""),
    ("string", b'"config"', "(config.json)"),
]


@pytest.mark.parametrize("case", RAW_CASES, ids=[case[0] for case in RAW_CASES])
def test_api_refuses_malformed_file(case, warmed: Attempts, watch: HostWatch) -> None:
    bundle = warmed.bundle(raw=case[1])
    before = watch.snapshot()
    error = warmed.api(bundle)
    assert isinstance(error, SpecError) and error.path == case[2], repr(error)
    watch.assert_clean(before)


def test_api_refuses_missing_or_odd_config_file(warmed: Attempts, watch: HostWatch, tmp_path: Path) -> None:
    missing = warmed.bundle()
    directory = warmed.bundle()
    (directory / "config.json").mkdir()
    dangling = warmed.bundle()
    (dangling / "config.json").symlink_to(tmp_path / "nowhere")
    unreadable_bundle = tmp_path / "no-such-bundle"
    before = watch.snapshot()
    for bundle in (missing, directory, dangling, unreadable_bundle):
        error = warmed.api(bundle)
        assert isinstance(error, SpecError) and "config.json" in str(error), (bundle, error)
    watch.assert_clean(before)


def test_api_refuses_deeply_nested_json(warmed: Attempts, watch: HostWatch) -> None:
    before = watch.snapshot()
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        error = warmed.api(warmed.bundle(raw=raw))
        assert isinstance(error, SpecError), repr(error)
    watch.assert_clean(before)


@pytest.mark.parametrize("where", ["hostname", "cgroupsPath"])
def test_api_refuses_lone_surrogates(where: str, warmed: Attempts, base_config: dict, watch: HostWatch) -> None:
    config = copy.deepcopy(base_config)
    if where == "hostname":
        config["hostname"] = "h" + SURROGATE
    else:
        config["linux"]["cgroupsPath"] = f"/coldbrew/{warmed.prefix}-{SURROGATE}"
    before = watch.snapshot()
    assert isinstance(warmed.api(warmed.bundle(config)), SpecError)
    watch.assert_clean(before)


def test_refuses_to_join_the_runtimes_mount_namespace(warmed: Attempts, base_config: dict,
                                                      watch: HostWatch) -> None:
    """The container's mounts and pivot_root would land in the runtime's own (the host's) mount namespace.

    Run under `unshare -m`: were the check ever lost, the pivot_root would hit that throw-away namespace, not ours.
    """
    config = copy.deepcopy(base_config)
    _set_ns_path(config, "mount", "/proc/self/ns/mnt")
    bundle = warmed.bundle(config)
    cid = warmed.next_id()
    before = watch.snapshot()
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", COLDBREW, "--root",
                             warmed.runtime_root, "create", "--bundle", str(bundle), cid],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    assert result.returncode == 1, result
    assert result.stderr.startswith(f"coldbrew: linux.namespaces[{_ns_index(config, 'mount')}].path: "), result
    watch.assert_clean(before, shim=True)


def test_sysctls_only_in_the_containers_own_namespaces(warmed: Attempts, base_config: dict, watch: HostWatch,
                                                       tmp_path: Path) -> None:
    """/proc/sys is the host's for every sysctl no namespace owns: such a key must be refused, not written."""
    host_value = Path("/proc/sys/vm/swappiness").read_text()
    refused = [({"vm.swappiness": host_value.strip()}, None),  # the host's value: harmless were it written
               ({"kernel/shm_rmid_forced": "0"}, "ipc"), ({"net.ipv4.ip_forward": "0"}, "network")]
    before = watch.snapshot()
    for sysctl, shared in refused:
        config = copy.deepcopy(base_config)
        config["linux"]["sysctl"] = sysctl
        if shared:
            config["linux"]["namespaces"].pop(_ns_index(config, shared))
        error = warmed.api(warmed.bundle(config))
        assert error is not None and f"linux.sysctl.{next(iter(sysctl))}: " in str(error), (sysctl, error)
    assert Path("/proc/sys/vm/swappiness").read_text() == host_value

    config = copy.deepcopy(base_config)
    config["linux"]["sysctl"] = {"net.ipv4.ip_forward": "1", "kernel.shmmax": "12345678"}
    config["process"]["args"] = ["cat", "/proc/sys/net/ipv4/ip_forward", "/proc/sys/kernel/shmmax"]
    out = tmp_path / "sysctl.out"
    with open(out, "wb") as f:
        assert warmed.runtime.run(warmed.next_id(), str(warmed.bundle(config)),
                                  stdio=(warmed.stdio[0], f.fileno(), f.fileno())) == 0
    assert out.read_text().split() == ["1", "12345678"]
    watch.assert_clean(before)


# ---- fuzzing -----------------------------------------------------------------------------------------------------

# Lone surrogates are left out until spec._str refuses them (test_api_refuses_lone_surrogates).
ODD_STRINGS = ["", "/", ".", "..", "../..", "a/../../b", "-1", "0x10", "1e400", "null", "rw", "bind", "rbind",
               "tmpfs", "proc", "cgroup", "CAP_SYS_ADMIN", "RLIMIT_NOFILE", "SCMP_ACT_KILL", "\u2603", "é" * 40,
               "x" * 300, " ", "\t\n", "\u202e", "%s%n", "\\", "a=b", "=", "/dev/null", "/proc/self/fd/0"]
KNOWN_KEYS = ["args", "env", "cwd", "type", "path", "source", "destination", "options", "limit", "soft", "hard",
              "uid", "gid", "memory", "pids", "cpu", "devices", "namespaces", "mounts", "hooks", "readonly",
              "terminal", "rlimits", "capabilities", "seccomp", "sysctl", "major", "minor", "allow", "access"]
INTEGERS = st.one_of(st.integers(-2**70, 2**70),
                     st.sampled_from([0, -1, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
                                      -2**63, -2**64]))
SCALARS = st.one_of(st.none(), st.booleans(), INTEGERS, st.floats(), st.sampled_from(ODD_STRINGS),
                    st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6), inner, max_size=3),
                      max_leaves=10)


def _paths(value: Any, here: tuple = ()) -> list[tuple]:
    """Every path into a JSON value: tuples of keys and indexes; () is the whole value."""
    found = [here]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, here + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _paths(item, here + (i,))
    return found


def _nest(value: Any, depth: int) -> Any:
    for i in range(depth):
        value = [value] if i % 2 else {"x": value}
    return value


@st.composite
def mutated_configs(draw: st.DrawFn, base: dict) -> dict:
    """The base config with one to three mutations: a key dropped, a value replaced (wrong type, huge or
    negative number, odd string, nested garbage), a key added, or a value buried deep in nesting."""
    config = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(config)))
        op = draw(st.sampled_from(["drop", "replace", "add", "nest"] if path else ["add"]))
        parent = config
        for key in path[:-1]:
            parent = parent[key]
        target = parent[path[-1]] if path else config
        if op == "drop":
            del parent[path[-1]]
        elif op == "replace":
            parent[path[-1]] = draw(VALUES)
        elif op == "nest":
            parent[path[-1]] = _nest(target, draw(st.integers(5, 200)))
        elif isinstance(target, dict):
            target[draw(st.sampled_from(KNOWN_KEYS) | st.text(max_size=8))] = draw(VALUES)
        elif isinstance(target, list):
            target.insert(draw(st.integers(0, len(target))), draw(VALUES))
    return config


def _safe_to_try(config: Any, bundle: Path, allowed: tuple[Path, ...]) -> bool:
    """Only configs whose fallout stays inside the test's own files: a root inside `allowed` (a fuzzed "/" would
    have devices made in the host's /dev) and the default cgroup (a fuzzed cgroupsPath would make cgroups anywhere
    in the host's hierarchy)."""
    if not isinstance(config, dict):
        return True
    root = config.get("root")
    if isinstance(root, dict) and isinstance(root.get("path"), str) and "\0" not in root["path"]:
        resolved = os.path.normpath(os.path.join(bundle, root["path"]))
        if not any(resolved == str(a) or resolved.startswith(f"{a}/") for a in allowed):
            return False
    linux = config.get("linux")
    return not (isinstance(linux, dict) and linux.get("cgroupsPath"))


FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))


def test_api_survives_fuzzed_configs(warmed: Attempts, base_config: dict, watch: HostWatch, own_rootfs: Path,
                                     tmp_path: Path) -> None:
    before = watch.snapshot()
    outcomes = {"refused": 0, "created": 0}

    @settings(FUZZ, max_examples=200)
    @given(mutated_configs(base_config))
    def attempt(config: dict) -> None:
        bundle = warmed.bundle()
        assume(_safe_to_try(config, bundle, (own_rootfs, tmp_path)))
        (bundle / "config.json").write_text(json.dumps(config))
        error = warmed.api(bundle)
        outcomes["created" if error is None else "refused"] += 1
        assert not (found := watch.problems(before)), f"left behind: {found}"

    attempt()
    assert outcomes["refused"] > 0 and outcomes["created"] > 0, outcomes
    watch.assert_clean(before)


def test_cli_survives_fuzzed_configs(warmed: Attempts, base_config: dict, watch: HostWatch, own_rootfs: Path,
                                     tmp_path: Path) -> None:
    before = watch.snapshot()

    @settings(FUZZ, max_examples=25)
    @given(mutated_configs(base_config))
    def attempt(config: dict) -> None:
        bundle = warmed.bundle()
        assume(_safe_to_try(config, bundle, (own_rootfs, tmp_path)))
        (bundle / "config.json").write_text(json.dumps(config))
        warmed.cli(bundle)
        watch.assert_clean(before, shim=True)

    attempt()
    watch.assert_clean(before, shim=True)


CLI_CASES = [case for case in CASES if case[0] in (
    "no-args", "relative-root", "bad-namespace-type", "bad-rlimit-type", "rlimit-not-allowed",
    "unsupported-mount-option", "kernel-refuses-mount-option", "memory-too-small-for-init", "hook-fails-loudly",
    "no-such-program", "systemd-cgroups-path", "config-array", "device-over-directory")]


@pytest.mark.parametrize("case", CLI_CASES, ids=[case[0] for case in CLI_CASES])
def test_cli_refuses_bad_config(case, warmed: Attempts, base_config: dict, watch: HostWatch) -> None:
    _, edit, path = case
    bundle = warmed.bundle(edit(base_config))
    before = watch.snapshot()
    line = warmed.cli(bundle)
    assert line is not None, "the create succeeded"
    if path is not None:
        assert line.startswith(f"coldbrew: {path}: "), line
    watch.assert_clean(before, shim=True)


def test_cli_refuses_malformed_files(warmed: Attempts, watch: HostWatch) -> None:
    bundles = [warmed.bundle(raw=raw) for _, raw, path in RAW_CASES if path == ""]
    directory = warmed.bundle()
    (directory / "config.json").mkdir()
    bundles += [directory, warmed.bundle()]  # the last one has no config.json
    before = watch.snapshot()
    for bundle in bundles:
        line = warmed.cli(bundle)
        assert line is not None and "config.json" in line, (bundle, line)
    watch.assert_clean(before, shim=True)


def test_cli_error_is_one_line_with_a_newline_in_a_value(warmed: Attempts, base_config: dict,
                                                          watch: HostWatch) -> None:
    config = copy.deepcopy(base_config)
    config["root"]["path"] = "no\nsuch"
    before = watch.snapshot()
    assert warmed.cli(warmed.bundle(config)).startswith("coldbrew: root.path: ")
    watch.assert_clean(before, shim=True)


def test_cli_does_not_hang_on_a_fifo_config(warmed: Attempts, watch: HostWatch) -> None:
    bundle = warmed.bundle()
    os.mkfifo(bundle / "config.json")
    before = watch.snapshot()
    try:
        result = subprocess.run([COLDBREW, "--root", warmed.runtime_root, "create", "--bundle", str(bundle),
                                 warmed.next_id()], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                timeout=2)
    except subprocess.TimeoutExpired:
        pytest.fail("coldbrew create blocked opening a FIFO config.json")
    assert result.returncode == 1 and result.stderr.startswith("coldbrew: "), result
    watch.assert_clean(before, shim=True)
