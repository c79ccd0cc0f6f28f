"""The container's process: env, cwd, user, rlimits, capabilities, no_new_privs, seccomp, terminal, hooks, exec."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from coldbrew.runtime.console import recv_fd
from coldbrew.runtime.errors import RuntimeFailure
from coldbrew.runtime.spec import Process
from conftest import coldbrew
from test_lifecycle import run_capture


def status_field(out: str, name: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith(name + ":"))


def test_env_cwd_user(runtime, bundles, cid, tmp_path):
    def edit(c):
        c["process"]["env"].append("GREETING=hello world")
        c["process"]["cwd"] = "/tmp/work"
        c["process"]["user"] = {"uid": 1000, "gid": 1001, "additionalGids": [5, 7], "umask": 0o077}
        c["root"]["readonly"] = False

    bundle = bundles.make(["sh", "-c", 'echo "$GREETING"; pwd; id -u; id -g; id -G; umask'], edit=edit)
    bundles_root = bundles.rootfs
    code, out = run_capture(runtime, cid, bundle, tmp_path)
    (bundles_root / "tmp" / "work").rmdir()
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "hello world" and lines[1] == "/tmp/work"
    assert lines[2] == "1000" and lines[3] == "1001"
    assert set(lines[4].split()) == {"1001", "5", "7"}
    assert lines[5] == "0077"


def test_rlimits_oom_score_nnp_caps(runtime, bundles, cid, tmp_path):
    def edit(c):
        c["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 321, "hard": 654},
                                   {"type": "RLIMIT_NPROC", "soft": 100, "hard": 100}]
        c["process"]["oomScoreAdj"] = 333
        c["process"]["noNewPrivileges"] = True
        c["process"]["capabilities"] = {k: ["CAP_CHOWN", "CAP_NET_RAW"] for k in ("bounding", "effective",
                                                                                  "permitted")}

    script = "ulimit -n; ulimit -H -n; ulimit -u; cat /proc/self/oom_score_adj; cat /proc/self/status"
    code, out = run_capture(runtime, cid, bundles.make(["sh", "-c", script], edit=edit), tmp_path)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[:4] == ["321", "654", "100", "333"]
    assert status_field(out, "NoNewPrivs") == "1"
    expected = (1 << 0) | (1 << 13)  # CAP_CHOWN, CAP_NET_RAW
    for field in ("CapEff", "CapPrm", "CapBnd"):
        assert int(status_field(out, field), 16) == expected, field
    assert int(status_field(out, "CapInh"), 16) == 0


def test_seccomp_filter_from_spec(runtime, bundles, cid, tmp_path):
    def edit(c):
        c["root"]["readonly"] = False
        c["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
                                 "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                                               "errnoRet": 1}]}

    code, out = run_capture(runtime, cid, bundles.make(["sh", "-c", "mkdir /tmp/x; echo rc=$?; grep Seccomp: "
                                                                     "/proc/self/status"], edit=edit), tmp_path)
    assert code == 0, out
    assert "rc=1" in out and "Operation not permitted" in out
    assert status_field(out, "Seccomp") == "2"
    assert not (bundles.rootfs / "tmp" / "x").exists()


def test_terminal_over_console_socket(runtime, bundles, cid, tmp_path):
    path = str(tmp_path / "console.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def edit(c):
        c["process"]["terminal"] = True
        c["process"]["consoleSize"] = {"height": 40, "width": 123}

    container = runtime.create(cid, bundles.make(["sh", "-c", "tty; stty size; echo done"], edit=edit),
                               console_socket=path)
    conn, _ = server.accept()
    master = recv_fd(conn)
    container.start()
    output = b""
    deadline = time.monotonic() + 10
    while b"done" not in output and time.monotonic() < deadline:
        try:
            output += os.read(master, 4096)
        except OSError:
            break
    assert container.wait() == 0
    text = output.decode()
    assert "/dev/pts/0" in text and "40 123" in text
    os.close(master)
    conn.close()
    server.close()


def test_terminal_needs_console_socket(runtime, bundles, cid):
    with pytest.raises(RuntimeFailure, match="console-socket"):
        runtime.create(cid, bundles.make(edit=lambda c: c["process"].update(terminal=True)))


def test_hooks_all_stages(runtime, bundles, cid, tmp_path):
    log = tmp_path / "hooks.log"
    hook = tmp_path / "hook.sh"
    # createContainer and startContainer run in the container's mount namespace: the hook lives in a shared path
    hook.write_text(f"#!/bin/sh\necho \"$1 $(cat)\" >> {log}\n")
    hook.chmod(0o755)
    stages = ("prestart", "createRuntime", "createContainer", "poststart", "poststop")

    def edit(c):
        c["hooks"] = {s: [{"path": str(hook), "args": ["hook", s]}] for s in stages}

    container = runtime.create(cid, bundles.make(["true"], edit=edit))
    container.start()
    container.wait()
    container.delete()
    entries = [line.split(" ", 1) for line in log.read_text().splitlines()]
    assert [e[0] for e in entries] == list(stages)
    for stage, payload in entries:
        state = json.loads(payload)
        assert state["id"] == cid and state["bundle"]
        if stage in ("createRuntime", "createContainer", "poststart"):
            assert state["pid"] > 0


def test_start_container_hook_runs_inside(runtime, bundles, cid, tmp_path):
    def edit(c):
        c["root"]["readonly"] = False
        c["hooks"] = {"startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "hostname > /tmp/started"]}]}
        c["hostname"] = "hooked"

    code, _ = run_capture(runtime, cid, bundles.make(["true"], edit=edit), tmp_path)
    started = bundles.rootfs / "tmp" / "started"
    try:
        assert code == 0 and started.read_text().strip() == "hooked"
    finally:
        started.unlink(missing_ok=True)


def test_failing_hook_aborts_create_and_leaves_nothing(runtime, runtime_root, bundles, cid):
    def edit(c):
        c["hooks"] = {"createRuntime": [{"path": "/bin/false"}]}

    with pytest.raises(RuntimeFailure, match="createRuntime hook 0"):
        runtime.create(cid, bundles.make(["true"], edit=edit))
    assert not os.path.exists(os.path.join(runtime_root, cid))


def test_exec_in_running_container(runtime, bundles, cid, tmp_path):
    container = runtime.create(cid, bundles.make(["sleep", "60"], edit=lambda c: c.update(hostname="box")))
    container.start()
    out = tmp_path / "exec.out"
    process = Process.from_spec({"args": ["sh", "-c", "hostname; echo $$; exit 4"], "cwd": "/", "env": ["PATH=/bin"],
                                 "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"],
                                                  "permitted": ["CAP_KILL"]}})
    with open(out, "wb") as f:
        proc = container.exec(process, stdio=(0, f.fileno(), f.fileno()))
        assert proc.wait() == 4
    lines = out.read_text().split()
    assert lines[0] == "box"
    assert int(lines[1]) > 1  # a pid inside the container's pid namespace
    assert proc.pid != int(lines[1])
    container.kill(signal.SIGKILL)
    container.wait()


def test_cli_exec_detach_and_process_file(runtime_root, bundles, cid, tmp_path):
    coldbrew(runtime_root, "run", "-d", "--bundle", str(bundles.make(["sleep", "60"])), cid)
    result = coldbrew(runtime_root, "exec", cid, "sh", "-c", "echo via-args; exit 2", check=False)
    assert result.returncode == 2 and result.stdout == "via-args\n"
    process_file = tmp_path / "process.json"
    process_file.write_text(json.dumps({"args": ["sleep", "30"], "cwd": "/", "env": ["PATH=/bin"]}))
    pid_file = tmp_path / "exec.pid"
    coldbrew(runtime_root, "exec", "--process", str(process_file), "--detach", "--pid-file", str(pid_file), cid)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5  # --detach returns once the process is set up, a moment before its execve
    while not open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"sleep"):
        assert time.monotonic() < deadline, "the exec'd program never ran"
        time.sleep(0.01)
    assert pid in json.loads(coldbrew(runtime_root, "ps", "--format", "json", cid).stdout)
    init_pid = json.loads(coldbrew(runtime_root, "state", cid).stdout)["pid"]
    init_cgroups = open(f"/proc/{init_pid}/cgroup").read()
    joined = [line for line in init_cgroups.splitlines() if line.endswith("/" + cid)]
    assert joined and all(line in joined or line.startswith("0::") for line in init_cgroups.splitlines())
    assert open(f"/proc/{pid}/cgroup").read() == init_cgroups  # the exec'd process is in the container's cgroup
    table = coldbrew(runtime_root, "ps", cid).stdout.splitlines()
    assert "PID" in table[0] and len(table) == 3
    coldbrew(runtime_root, "delete", "--force", cid)
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_exec_missing_program_is_clear(runtime, bundles, cid):
    container = runtime.create(cid, bundles.make(["sleep", "60"]))
    container.start()
    with pytest.raises(RuntimeFailure, match="not found"):
        container.exec(Process.from_spec({"args": ["no-such-program"], "cwd": "/", "env": ["PATH=/bin"]}))
    container.kill(signal.SIGKILL)
    container.wait()


def test_missing_program_fails_at_create(runtime, bundles, cid):
    with pytest.raises(RuntimeFailure, match="not found in \\$PATH"):
        runtime.create(cid, bundles.make(["no-such-program"]))


def test_seccomp_program_is_compiled_once_per_profile(runtime, bundles, cid, tmp_path, monkeypatch):
    from coldbrew.runtime import seccomp

    compiled = []
    original = seccomp.SeccompProfile.compile

    def counting(self):
        compiled.append(self)
        return original(self)

    monkeypatch.setattr(seccomp.SeccompProfile, "compile", counting)

    def edit(c):
        c["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
        c["root"]["readonly"] = False

    for n in range(3):
        code, out = run_capture(runtime, f"{cid}-{n}", bundles.make(["sh", "-c", "mkdir /tmp/y || echo denied"],
                                                                    edit=edit), tmp_path)
        assert code == 0 and "denied" in out, out
    assert len(compiled) <= 1  # compiled once, or not at all if an earlier test left it cached


# ---- extra_fds ---------------------------------------------------------------------------------------------------

def _pipes(n: int) -> list[tuple[int, int]]:
    return [os.pipe() for _ in range(n)]  # close-on-exec here: the container gets them through extra_fds only


def _read_all(fd: int) -> str:
    chunks = []
    while data := os.read(fd, 4096):
        chunks.append(data)
    return b"".join(chunks).decode()


def _run_writing_fd_names(runtime, bundles, cid, tmp_path, numbers: list[int], **create_options) -> tuple[int, str]:
    """Run a container in which descriptor N (for each N of `numbers`) writes what it leads to into itself."""
    script = "; ".join(f"readlink /proc/self/fd/{n} >&{n}" for n in numbers)
    return run_capture(runtime, cid, bundles.make(["sh", "-c", script]), tmp_path, **create_options)


def test_extra_fd_lands_at_3_and_the_caller_is_untouched(runtime, bundles, cid, tmp_path):
    [(read, write)] = _pipes(1)
    before = {fd: os.fstat(fd) for fd in (3, 4) if _open(fd)}
    try:
        code, out = _run_writing_fd_names(runtime, bundles, cid, tmp_path, [3], extra_fds=(write,))
        after = {fd: os.fstat(fd) for fd in (3, 4) if _open(fd)}
        os.close(write)
        assert code == 0, out
        assert _read_all(read) == f"pipe:[{os.fstat(read).st_ino}]\n"
    finally:
        os.close(read)
    assert {fd: (st.st_dev, st.st_ino) for fd, st in after.items()} == \
        {fd: (st.st_dev, st.st_ino) for fd, st in before.items()}


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_extra_fds_follow_preserved_fds(runtime, bundles, cid, tmp_path):
    (read_a, write_a), (read_b, write_b) = _pipes(2)
    try:
        code, out = _run_writing_fd_names(runtime, bundles, cid, tmp_path, [4, 5], preserve_fds=1,
                                          extra_fds=(write_a, write_b))
        os.close(write_a)
        os.close(write_b)
        assert code == 0, out
        assert _read_all(read_a) == f"pipe:[{os.fstat(read_a).st_ino}]\n"
        assert _read_all(read_b) == f"pipe:[{os.fstat(read_b).st_ino}]\n"
    finally:
        os.close(read_a)
        os.close(read_b)


def test_extra_fd_numbered_as_another_ones_target(runtime, bundles, cid, tmp_path):
    """extra_fds=(b, a) with a's number being b's target: a must be copied before b lands on it."""
    (read_a, write_a), (read_b, write_b) = _pipes(2)
    preserve = write_a - 3  # the target of extra_fds[0] is write_a's number, extra_fds[1] (write_a) goes above
    try:
        code, out = _run_writing_fd_names(runtime, bundles, cid, tmp_path, [write_a, write_a + 1],
                                          preserve_fds=preserve, extra_fds=(write_b, write_a))
        os.close(write_a)
        os.close(write_b)
        assert code == 0, out
        assert _read_all(read_b) == f"pipe:[{os.fstat(read_b).st_ino}]\n"
        assert _read_all(read_a) == f"pipe:[{os.fstat(read_a).st_ino}]\n"
    finally:
        os.close(read_a)
        os.close(read_b)


def test_extra_fds_over_the_runtimes_own_descriptors(runtime, bundles, cid, tmp_path):
    """Targets from the lowest free number on: where create opens its state directory and init socket."""
    [(read, write)] = _pipes(1)
    lowest = os.dup(0)
    os.close(lowest)
    count = 6
    try:
        code, out = _run_writing_fd_names(runtime, bundles, cid, tmp_path, list(range(lowest, lowest + count)),
                                          preserve_fds=lowest - 3, extra_fds=(write,) * count)
        os.close(write)
        assert code == 0, out
        assert _read_all(read) == f"pipe:[{os.fstat(read).st_ino}]\n" * count
    finally:
        os.close(read)


def test_extra_fds_closed_descriptor_is_refused(runtime, bundles, cid):
    read, write = os.pipe()
    os.close(read)
    os.close(write)
    with pytest.raises(RuntimeFailure, match=f"extra_fds: descriptor {write} is not open"):
        runtime.create(cid, bundles.make(["true"]), extra_fds=(write,))
    assert runtime.list() == []
