"""The container lifecycle through the in-process API and the runc-compatible CLI, on real namespaces."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from coldbrew.bench.bundles import make_rootfs
from coldbrew.runtime.errors import ContainerExists, ContainerNotFound, InvalidState, NotRunning
from coldbrew.runtime.spec import Process
from conftest import coldbrew


def run_capture(runtime, cid, bundle, tmp_path, **kwargs) -> tuple[int, str]:
    """Run a container to completion with its stdout and stderr in a file; returns (exit status, output)."""
    out = tmp_path / f"{cid}.out"
    with open(out, "wb") as f, open(os.devnull, "rb") as null:
        code = runtime.run(cid, bundle, stdio=(null.fileno(), f.fileno(), f.fileno()), **kwargs)
    return code, out.read_text()


def test_run_returns_exit_status(runtime, bundles, cid, tmp_path):
    assert run_capture(runtime, cid, bundles.make(["true"]), tmp_path)[0] == 0
    assert run_capture(runtime, cid + "b", bundles.make(["sh", "-c", "exit 3"]), tmp_path)[0] == 3
    # pid 1 of a pid namespace cannot be killed from inside it: share the host's pid namespace for this one
    bundle = bundles.make(["sh", "-c", "kill -9 $$"], edit=lambda c: c["linux"]["namespaces"].remove({"type": "pid"}))
    assert run_capture(runtime, cid + "c", bundle, tmp_path)[0] == 128 + 9


def test_create_start_state_kill_delete(runtime, bundles, cid):
    container = runtime.create(cid, bundles.make(["sleep", "60"]))
    state = container.state()
    assert state["status"] == "created" and state["pid"] > 0 and state["id"] == cid
    assert set(state) >= {"ociVersion", "id", "status", "pid", "bundle", "annotations", "created"}
    # the init waits in its namespaces: not yet running sleep
    with open(f"/proc/{container.pid}/cmdline", "rb") as f:
        assert b"sleep" not in f.read()
    container.start()
    assert runtime.get(cid).status == "running"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{container.pid}/cmdline", "rb") as f:
            if f.read().startswith(b"sleep"):
                break
    else:
        pytest.fail("the container's program never ran")
    with pytest.raises(InvalidState):
        container.start()
    with pytest.raises(InvalidState):
        container.delete()
    container.kill("KILL")  # pid 1 of its namespace: TERM without a handler would be ignored
    assert container.wait() == 128 + signal.SIGKILL
    assert runtime.get(cid).status == "stopped"
    with pytest.raises(NotRunning):
        container.kill(signal.SIGKILL)
    assert container.delete() == 128 + signal.SIGKILL
    with pytest.raises(ContainerNotFound):
        runtime.get(cid)


def test_create_twice_is_refused(runtime, bundles, cid):
    runtime.create(cid, bundles.make(["true"]))
    with pytest.raises(ContainerExists):
        runtime.create(cid, bundles.make(["true"]))


def test_delete_created_container(runtime, bundles, cid):
    container = runtime.create(cid, bundles.make(["true"]))
    pid = container.pid
    container.delete()
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_namespaces_hostname_pid1(runtime, bundles, cid, tmp_path):
    script = "echo pid=$$; hostname; for n in mnt pid net ipc uts cgroup; do readlink /proc/self/ns/$n; done"
    code, out = run_capture(runtime, cid, bundles.make(["sh", "-c", script], edit=lambda c: c.update(
        hostname="inside")), tmp_path)
    assert code == 0, out
    lines = out.split()
    assert lines[0] == "pid=1" and lines[1] == "inside"
    for name, link in zip(("mnt", "pid", "net", "ipc", "uts", "cgroup"), lines[2:]):
        assert link != os.readlink(f"/proc/self/ns/{name}"), name


def test_init_is_the_only_process_in_its_cgroup(runtime, bundles, cid, tmp_path):
    # Without a user namespace the runtime forks the init straight into its new pid namespace: nothing else is ever
    # forked inside the cgroup, so a pids limit of 1 holds the init alone and it runs.
    bundle = bundles.make(["sh", "-c", "echo pid=$$"], edit=lambda c: c["linux"]["resources"].update(pids={"limit": 1}))
    code, out = run_capture(runtime, cid, bundle, tmp_path)
    assert code == 0, out
    assert out.split() == ["pid=1"]
    # the runtime's own next children are born in its pid namespace again
    assert os.readlink("/proc/thread-self/ns/pid_for_children") == os.readlink("/proc/self/ns/pid")


def _in_user_namespace(rootfs: Path):
    """A bundle edit: a user namespace mapping the container's root to host uid 100000."""
    def edit(c):
        c["root"]["path"] = str(rootfs)
        c["linux"]["namespaces"].append({"type": "user"})
        c["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        c["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        c["mounts"] = [m for m in c["mounts"] if m["type"] not in ("cgroup", "sysfs", "mqueue")]
        c["linux"]["resources"] = {}

    return edit


@pytest.fixture
def shared_rootfs():
    # the container's root is host uid 100000: its rootfs must be reachable for others (pytest's tmp is 0700)
    shared = Path(tempfile.mkdtemp(prefix="coldbrew-userns-"))
    shared.chmod(0o755)
    yield make_rootfs(shared / "rootfs")
    shutil.rmtree(shared)


def test_user_namespace_mappings(runtime, bundles, cid, tmp_path, shared_rootfs):
    bundle = bundles.make(["sh", "-c", "id -u; cat /proc/self/uid_map"], edit=_in_user_namespace(shared_rootfs))
    code, out = run_capture(runtime, cid, bundle, tmp_path)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "0"
    assert lines[1].split() == ["0", "100000", "65536"]


def test_exec_into_a_user_namespace_joins_the_container_cgroup(runtime, bundles, cid, tmp_path, shared_rootfs):
    # the exec'd child moves itself into the cgroup before it enters the user namespace (after it, it could not)
    container = runtime.create(cid, bundles.make(["sleep", "60"], edit=_in_user_namespace(shared_rootfs)))
    container.start()
    out = tmp_path / "exec.out"
    process = Process.from_spec({"args": ["sh", "-c", "id -u; cat /proc/self/cgroup"], "cwd": "/",
                                 "env": ["PATH=/bin"]})
    with open(out, "wb") as f:
        assert container.exec(process, stdio=(0, f.fileno(), f.fileno())).wait() == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "0"
    # in the container's cgroup namespace, the container's own cgroup is "/" in every hierarchy
    assert lines[1:] and all(line.endswith(":/") for line in lines[1:]), lines
    container.kill(signal.SIGKILL)
    container.wait()


def test_join_namespace_by_path(runtime, bundles, cid, tmp_path):
    first = runtime.create(cid, bundles.make(["sleep", "60"]))
    first.start()

    def edit(c):
        for ns in c["linux"]["namespaces"]:
            if ns["type"] in ("network", "uts"):
                ns["path"] = f"/proc/{first.pid}/ns/{'net' if ns['type'] == 'network' else 'uts'}"
        c.pop("hostname", None)

    code, out = run_capture(runtime, cid + "b", bundles.make(["readlink", "/proc/self/ns/net"], edit=edit), tmp_path)
    assert code == 0, out
    assert out.strip() == os.readlink(f"/proc/{first.pid}/ns/net")
    first.kill(signal.SIGKILL)
    first.wait()


def test_cli_lifecycle(runtime_root, bundles, cid, tmp_path):
    bundle = bundles.make(["sleep", "60"])
    pid_file = tmp_path / "pid"
    coldbrew(runtime_root, "create", "--bundle", str(bundle), "--pid-file", str(pid_file), cid)
    state = json.loads(coldbrew(runtime_root, "state", cid).stdout)
    assert state["status"] == "created" and state["pid"] == int(pid_file.read_text())
    listed = json.loads(coldbrew(runtime_root, "list", "--format", "json").stdout)
    assert [s["id"] for s in listed] == [cid]
    coldbrew(runtime_root, "start", cid)
    assert json.loads(coldbrew(runtime_root, "state", cid).stdout)["status"] == "running"
    assert json.loads(coldbrew(runtime_root, "ps", "--format", "json", cid).stdout) == [state["pid"]]
    refused = coldbrew(runtime_root, "delete", cid, check=False)
    assert refused.returncode == 1 and "not stopped" in refused.stderr
    coldbrew(runtime_root, "kill", cid, "9")
    deadline = time.monotonic() + 5
    while json.loads(coldbrew(runtime_root, "state", cid).stdout)["status"] != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    coldbrew(runtime_root, "delete", cid)
    missing = coldbrew(runtime_root, "state", cid, check=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_cli_run_passes_stdio_and_exit_code(runtime_root, bundles, cid):
    result = coldbrew(runtime_root, "run", "--bundle", str(bundles.make(["sh", "-c", "cat; echo err >&2; exit 7"])),
                      cid, check=False, input="from stdin\n")
    assert result.returncode == 7
    assert result.stdout == "from stdin\n" and result.stderr == "err\n"


def test_cli_kill_signal_names(runtime_root, bundles, cid):
    for n, sig in enumerate(("KILL", "SIGKILL", "9", "TERM", "SIGTERM", "15")):
        name = f"{cid}-{n}"
        # a shell that traps TERM: pid 1 of a namespace ignores signals it has no handler for
        script = "trap 'exit 0' TERM; while true; do sleep 0.1; done"
        coldbrew(runtime_root, "run", "-d", "--bundle", str(bundles.make(["sh", "-c", script])), name)
        coldbrew(runtime_root, "kill", name, sig)
        deadline = time.monotonic() + 5
        while json.loads(coldbrew(runtime_root, "state", name).stdout)["status"] != "stopped":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        coldbrew(runtime_root, "delete", name)
    bad = coldbrew(runtime_root, "kill", cid, "NOTASIGNAL", check=False)
    assert bad.returncode == 1


def test_cli_kill_all(runtime_root, bundles, cid):
    bundle = bundles.make(["sh", "-c", "sleep 60 & sleep 60 & wait"],
                          edit=lambda c: c["linux"]["namespaces"].remove({"type": "pid"}))
    coldbrew(runtime_root, "run", "-d", "--bundle", str(bundle), cid)
    deadline = time.monotonic() + 5
    while len(json.loads(coldbrew(runtime_root, "ps", "--format", "json", cid).stdout)) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    coldbrew(runtime_root, "kill", "--all", cid, "KILL")
    deadline = time.monotonic() + 5
    while json.loads(coldbrew(runtime_root, "ps", "--format", "json", cid).stdout):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    coldbrew(runtime_root, "delete", cid)


def test_cli_version_features_spec(runtime_root, tmp_path):
    version = coldbrew(runtime_root, "--version").stdout.splitlines()
    assert version[0].startswith("coldbrew version ") and version[2].startswith("spec: ")
    features = json.loads(coldbrew(runtime_root, "features").stdout)
    assert "mount" in features["linux"]["namespaces"] and features["linux"]["seccomp"]["enabled"]
    coldbrew(runtime_root, "spec", "--bundle", str(tmp_path))
    spec = json.loads((tmp_path / "config.json").read_text())
    assert spec["process"]["args"] == ["sh"]
    again = coldbrew(runtime_root, "spec", "--bundle", str(tmp_path), check=False)
    assert again.returncode == 1 and "exists" in again.stderr


def test_cli_errors_are_json_logged(runtime_root, tmp_path):
    log = tmp_path / "log.json"
    result = coldbrew(runtime_root, "--log", str(log), "--log-format", "json", "start", "nope", check=False)
    assert result.returncode == 1
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and "does not exist" in entry["msg"]
    coldbrew(runtime_root, "--debug", "--log", str(log), "--log-format", "json", "list")
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "debug" and entry["msg"].endswith("list")
    refused = coldbrew(runtime_root, "--systemd-cgroup", "state", "x", check=False)
    assert refused.returncode == 1 and "systemd" in refused.stderr


def test_cli_runs_short_verbs_without_the_garbage_collector(runtime_root, capsys):
    from coldbrew.runtime import cli

    gc.disable()  # as run_and_exit leaves it for main()
    try:
        assert cli.main(["--root", runtime_root, "state", "missing"]) == 1
        assert not gc.isenabled()
        assert cli.main(["--root", runtime_root, "list"]) == 0  # not on the start path: collected as usual
        assert gc.isenabled()
        gc.disable()
        with pytest.raises(SystemExit):  # argparse's --help
            cli.main(["fs", "--help"])
        assert gc.isenabled()  # the command groups hold long-running commands (coldbrew fs mount)
    finally:
        gc.enable()
    capsys.readouterr()


def test_no_pivot_runs_in_a_chroot(runtime_root, bundles, cid):
    result = coldbrew(runtime_root, "run", "--no-pivot", "--bundle",
                      str(bundles.make(["sh", "-c", "ls /; grep -c . /proc/self/mountinfo"])), cid, check=False)
    assert result.returncode == 0, result.stderr
    listing = result.stdout.split()
    assert "bin" in listing and "etc" in listing
    assert not os.path.exists(os.path.join(runtime_root, cid))
