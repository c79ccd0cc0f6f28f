"""Seccomp profiles against the real kernel: each filter is loaded in a forked child, never in the test process."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Callable
from contextlib import contextmanager

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coldbrew.runtime import libc
from conftest import fork_child
from coldbrew.runtime.errors import SpecError, Unsupported
from coldbrew.runtime import seccomp as seccomp_module
from coldbrew.runtime.seccomp import SeccompProfile, load_filter

BUSYBOX = "/bin/busybox"
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def errno_of(call: Callable[[], object]) -> int:
    try:
        call()
    except OSError as error:
        return error.errno
    return 0


def raw_syscall(nr: int, *args: int) -> int:
    """errno of a raw syscall (0 on success), bypassing libc wrappers that might pick another syscall."""
    result = _libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    return ctypes.get_errno() if result == -1 else 0


def seccomp_status() -> dict[str, str]:
    with open("/proc/self/status") as status:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)
    return {key: fields[key] for key in ("Seccomp", "Seccomp_filters", "NoNewPrivs")}


def test_errno_rule_blocks_mkdir_while_the_rest_works(tmp_path):
    profile = SeccompProfile.from_spec({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat", "not_a_syscall_anywhere"], "action": "SCMP_ACT_ERRNO",
                      "errnoRet": 1}],
    })
    program = profile.compile()
    assert program and len(program) % 8 == 0

    def body():
        load_filter(program, profile.flags)
        mkdir = errno_of(lambda: os.mkdir(tmp_path / "blocked"))
        (tmp_path / "written").write_text("yes")
        return {"mkdir": mkdir, "status": seccomp_status()}

    status, report = fork_child(body, dumpable=False)
    assert report == {"ok": {"mkdir": errno.EPERM,
                             "status": {"Seccomp": "2", "Seccomp_filters": "1", "NoNewPrivs": "0"}}}
    assert os.waitstatus_to_exitcode(status) == 0
    assert not (tmp_path / "blocked").exists()
    assert (tmp_path / "written").read_text() == "yes"
    os.mkdir(tmp_path / "unfiltered")  # the parent never got the filter


def personality(persona: int) -> int:
    _libc.personality.restype = ctypes.c_int
    return 0 if _libc.personality(ctypes.c_ulong(persona)) != -1 else ctypes.get_errno()


def test_argument_conditions():
    profile = SeccompProfile.from_spec({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES,
             "args": [{"index": 0, "value": 0x0008, "op": "SCMP_CMP_EQ"}]},
            # MASKED_EQ: (arg0 & value) == valueTwo
            {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EXDEV,
             "args": [{"index": 0, "value": 0x0F00, "valueTwo": 0x0300, "op": "SCMP_CMP_MASKED_EQ"}]},
            # Two conditions on one argument cannot share a rule: each becomes its own rule (either matches).
            {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENXIO,
             "args": [{"index": 0, "value": 0x0001, "op": "SCMP_CMP_EQ"},
                      {"index": 0, "value": 0x0002, "op": "SCMP_CMP_EQ"}]},
        ],
    })
    program = profile.compile()

    def body():
        load_filter(program)
        return {hex(p): personality(p) for p in (0x0008, 0x0301, 0x0001, 0x0002, 0xFFFFFFFF, 0x0000)}

    _, report = fork_child(body, dumpable=False)
    assert report == {"ok": {"0x8": errno.EACCES, "0x301": errno.EXDEV, "0x1": errno.ENXIO, "0x2": errno.ENXIO,
                             "0xffffffff": 0, "0x0": 0}}


@pytest.mark.parametrize("action", ["SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_KILL_PROCESS"])
def test_kill_action_kills_with_sigsys(action):
    program = SeccompProfile.from_spec({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["getppid"], "action": action}],
    }).compile()

    def body():
        load_filter(program)
        os.getpid()  # still allowed
        os.getppid()
        return "survived"

    status, report = fork_child(body, dumpable=False)
    assert report is None
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_trap_action_raises_sigsys_that_a_handler_sees():
    program = SeccompProfile.from_spec({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_TRAP"}],
    }).compile()

    def body():
        seen = []
        signal.signal(signal.SIGSYS, lambda signum, frame: seen.append(signum))
        load_filter(program)
        _libc.getppid()
        return seen

    _, report = fork_child(body, dumpable=False)
    assert report == {"ok": [signal.SIGSYS]}


# A deny-by-default profile in the shape containerd and Docker generate: a long allow list (names for every
# architecture in the filter; those unknown on one architecture are skipped there), personality only with a few
# values, clone without namespace flags. faccessat2 (439 on x86_64) is the newest syscall it names.
_ALLOWED = """
accept accept4 access alarm arch_prctl bind brk capget capset chdir chmod chown chown32 clock_getres
clock_gettime clock_gettime64 clock_nanosleep close close_range connect copy_file_range creat dup dup2 dup3
epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_wait eventfd eventfd2 execve execveat exit exit_group
faccessat faccessat2 fadvise64 fallocate fchdir fchmod fchmodat fchown fchown32 fchownat fcntl fcntl64 fdatasync
fgetxattr flistxattr flock fork fstat fstat64 fstatat64 fstatfs fsync ftruncate futex futex_time64 getcpu getcwd
getdents getdents64 getegid getegid32 geteuid geteuid32 getgid getgid32 getgroups getitimer getpeername getpgid
getpgrp getpid getppid getpriority getrandom getresgid getresuid getrlimit get_robust_list getrusage getsid
getsockname getsockopt gettid gettimeofday getuid getuid32 getxattr inotify_add_watch inotify_init1
inotify_rm_watch ioctl kill lchown lgetxattr link linkat listen listxattr _llseek lseek lstat lstat64 madvise
memfd_create mincore mkdir mkdirat mknod mknodat mlock mmap mmap2 mprotect mremap msync munlock munmap nanosleep
newfstatat _newselect open openat openat2 pause pipe pipe2 poll ppoll prctl pread64 preadv prlimit64 pselect6
pwrite64 pwritev read readahead readlink readlinkat readv recvfrom recvmmsg recvmsg rename renameat renameat2
restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend
rt_sigtimedwait rt_tgsigqueueinfo sched_getaffinity sched_getparam sched_getscheduler sched_yield seccomp select
sendfile sendmmsg sendmsg sendto setfsgid setfsuid setgid setgroups setitimer setpgid setpriority setregid
setresgid setresuid setreuid setrlimit set_robust_list setsid setsockopt set_tid_address setuid shutdown
sigaltstack signalfd4 sigreturn socket socketcall socketpair splice stat stat64 statfs statx symlink symlinkat
sync sysinfo tee tgkill time timer_create timer_delete timer_gettime timer_settime timerfd_create
timerfd_gettime timerfd_settime times tkill truncate ugetrlimit umask uname unlink unlinkat utime utimensat
utimes vfork wait4 waitid waitpid write writev
""".split()
_NAMESPACE_FLAGS = (libc.CLONE_NEWNS | libc.CLONE_NEWUTS | libc.CLONE_NEWIPC | libc.CLONE_NEWUSER
                    | libc.CLONE_NEWPID | libc.CLONE_NEWNET | libc.CLONE_NEWCGROUP)
CLONE_FS = 0x200
X32 = 0x40000000
_ARCHES = {"x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
           "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]}


def docker_shaped(**extra) -> dict:
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": _ARCHES[platform.machine()],
        "syscalls": [
            {"names": _ALLOWED, "action": "SCMP_ACT_ALLOW"},
            *({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": value, "op": "SCMP_CMP_EQ"}]} for value in (0, 8, 0x20000, 0xFFFFFFFF)),
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": _NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
        ],
        **extra,
    }


def test_docker_shaped_profile_runs_busybox():
    profile = SeccompProfile.from_spec(docker_shaped())
    program = profile.compile()

    def body():
        load_filter(program, profile.flags)
        os.execv(BUSYBOX, [BUSYBOX, "true"])

    status, report = fork_child(body, dumpable=False)
    assert report is None, report
    assert os.waitstatus_to_exitcode(status) == 0

    def failing():  # proves the exit status above comes from busybox under the filter
        load_filter(program, profile.flags)
        os.execv(BUSYBOX, [BUSYBOX, "false"])

    status, report = fork_child(failing, dumpable=False)
    assert report is None and os.waitstatus_to_exitcode(status) == 1


@pytest.mark.skipif(platform.machine() != "x86_64", reason="uses x86_64 syscall numbers")
@pytest.mark.parametrize("default_errno", [None, errno.ENXIO])
def test_default_errno_profile_allows_its_list_and_answers_enosys_for_newer_syscalls(default_errno):
    spec = docker_shaped() if default_errno is None else docker_shaped(defaultErrnoRet=default_errno)
    program = SeccompProfile.from_spec(spec).compile()
    denied = default_errno or errno.EPERM

    def body():
        load_filter(program)
        return {
            "getpid": raw_syscall(39),
            "unshare": raw_syscall(272, 0),  # known, older than faccessat2, not listed: the default errno
            "cachestat": raw_syscall(451, -1, 0, 0, 0),  # newer than anything listed: ENOSYS, not the default
            "personality 8": personality(8),
            "personality 1": personality(1),
            # Namespace flags are masked out by the rule. CLONE_FS makes the call invalid (EINVAL) should it pass.
            "clone newns": raw_syscall(56, libc.CLONE_NEWNS | CLONE_FS, 0, 0, 0, 0),
            # x32 numbers carry bit 30 and have their own highest number in the stub (its compat calls go up
            # to 547); without the stub the filter would answer the default errno for any of them.
            "x32 unshare": raw_syscall(X32 | 272, 0),
            "x32 beyond": raw_syscall(X32 | 1000),
        }

    _, report = fork_child(body, dumpable=False)
    assert report == {"ok": {"getpid": 0, "unshare": denied, "cachestat": errno.ENOSYS, "personality 8": 0,
                             "personality 1": denied, "clone newns": denied, "x32 unshare": denied,
                             "x32 beyond": errno.ENOSYS}}


def test_no_enosys_stub_when_the_default_is_already_enosys_or_permissive():
    assert SeccompProfile.from_spec(docker_shaped()).enosys_stub
    assert not SeccompProfile.from_spec(docker_shaped(defaultErrnoRet=errno.ENOSYS)).enosys_stub
    for default in ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_TRACE"):
        assert not SeccompProfile.from_spec({"defaultAction": default}).enosys_stub


def test_flags():
    profile = SeccompProfile.from_spec({
        "defaultAction": "SCMP_ACT_ALLOW",
        "flags": ["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
                  "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"],
        "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_LOG"}],
    })
    assert profile.flags == 1 | 2 | 4  # WAIT_KILLABLE_RECV needs a listener, which is never installed
    program = profile.compile()

    def body():
        load_filter(program, profile.flags)
        return seccomp_status()

    _, report = fork_child(body, dumpable=False)
    assert report == {"ok": {"Seccomp": "2", "Seccomp_filters": "1", "NoNewPrivs": "0"}}


def test_load_filter_refuses_bad_programs():
    with pytest.raises(ValueError):
        load_filter(b"")
    with pytest.raises(ValueError):
        load_filter(b"\x06\x00\x00\x00\x00\x00")

    def body():
        load_filter(b"\xff\xff\x00\x00\x00\x00\x00\x00")  # not a BPF opcode: the kernel says EINVAL

    _, report = fork_child(body, dumpable=False)
    assert report["errno"] == errno.EINVAL
    assert report["error"].startswith("SyscallError: seccomp(SECCOMP_SET_MODE_FILTER")


def test_the_init_side_never_maps_libseccomp(tmp_path):
    program = SeccompProfile.from_spec({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}],
    }).compile()
    (tmp_path / "filter.bpf").write_bytes(program)
    script = (
        "import os, sys\n"
        "from coldbrew.runtime.seccomp import load_filter\n"
        "load_filter(open(sys.argv[1], 'rb').read())\n"
        "try:\n    os.mkdir(sys.argv[1] + '.dir'); print('mkdir worked')\n"
        "except PermissionError:\n    print('mkdir refused')\n"
        "print('libseccomp mapped' if 'libseccomp' in open('/proc/self/maps').read() else 'libseccomp absent')\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "filter.bpf")], capture_output=True,
                            text=True, timeout=30)
    assert result.stdout.split("\n")[:2] == ["mkdir refused", "libseccomp absent"], result.stderr


@pytest.mark.parametrize(("spec", "path"), [
    ({}, "linux.seccomp.defaultAction"),
    ({"defaultAction": "SCMP_ACT_MAYBE"}, "linux.seccomp.defaultAction"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": 1}, "linux.seccomp.defaultErrnoRet"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": -1}, "linux.seccomp.defaultErrnoRet"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": True}, "linux.seccomp.defaultErrnoRet"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_Z80"]},
     "linux.seccomp.architectures[1]"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": "SCMP_ARCH_X86_64"}, "linux.seccomp.architectures"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_NEW_LISTENER"]}, "linux.seccomp.flags[0]"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "listenerMetadata": "x"}, "linux.seccomp.listenerMetadata"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {}}, "linux.seccomp.syscalls"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["write"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["open"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["close"], "action": "SCMP_ACT_NOPE"},
    ]}, "linux.seccomp.syscalls[3].action"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"]}]}, "linux.seccomp.syscalls[0].action"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [], "action": "SCMP_ACT_KILL"}]},
     "linux.seccomp.syscalls[0].names"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"action": "SCMP_ACT_KILL"}]},
     "linux.seccomp.syscalls[0].names"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read", ""], "action": "SCMP_ACT_KILL"}]},
     "linux.seccomp.syscalls[0].names[1]"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["re\x00ad"], "action": "SCMP_ACT_KILL"}]},
     "linux.seccomp.syscalls[0].names[0]"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL",
                                                       "errnoRet": 5}]}, "linux.seccomp.syscalls[0].errnoRet"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                                                       "errnoRet": 70000}]}, "linux.seccomp.syscalls[0].errnoRet"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL", "args": [
        {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}, {"index": 1, "value": 1, "op": "SCMP_CMP_APPROX"}]}]},
     "linux.seccomp.syscalls[0].args[1].op"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL", "args": [
        {"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}, "linux.seccomp.syscalls[0].args[0].index"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL", "args": [
        {"index": 0, "op": "SCMP_CMP_EQ"}]}]}, "linux.seccomp.syscalls[0].args[0].value"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL", "args": [
        {"index": 0, "value": 1 << 64, "op": "SCMP_CMP_EQ"}]}]}, "linux.seccomp.syscalls[0].args[0].value"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_KILL", "args": [
        {"index": 0, "value": 1, "valueTwo": 1.5, "op": "SCMP_CMP_MASKED_EQ"}]}]},
     "linux.seccomp.syscalls[0].args[0].valueTwo"),
])
def test_bad_fields_name_their_path(spec, path):
    with pytest.raises(SpecError) as caught:
        SeccompProfile.from_spec(spec)
    assert caught.value.path == path


def test_custom_path_prefix():
    with pytest.raises(SpecError) as caught:
        SeccompProfile.from_spec({"defaultAction": 7}, path="process.seccomp")
    assert caught.value.path == "process.seccomp.defaultAction"


def test_notify_is_unsupported_but_a_lone_listener_path_is_ignored():
    with pytest.raises(Unsupported, match="SCMP_ACT_NOTIFY"):
        SeccompProfile.from_spec({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock",
                                  "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]})
    with pytest.raises(Unsupported, match="SCMP_ACT_NOTIFY"):
        SeccompProfile.from_spec({"defaultAction": "SCMP_ACT_NOTIFY"})
    # The spec: listenerPath is ignored when no rule uses SCMP_ACT_NOTIFY.
    profile = SeccompProfile.from_spec({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock",
                                        "listenerMetadata": "x"})
    assert profile.compile()


# Arbitrary JSON, with the spec's own keys and constants mixed in so that it reaches past the first checks.
_keys = ["defaultAction", "defaultErrnoRet", "architectures", "flags", "listenerPath", "listenerMetadata",
         "syscalls", "names", "action", "errnoRet", "args", "index", "value", "valueTwo", "op"]
_constants = ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_NOTIFY", "SCMP_ARCH_X86", "SCMP_CMP_EQ",
              "SECCOMP_FILTER_FLAG_LOG", "mkdir"]
_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 65), max_value=1 << 65) | st.floats()
    | st.text(max_size=8) | st.sampled_from(_constants),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(_keys) | st.text(max_size=8), children, max_size=6),
    max_leaves=15,
)


_actions = ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP",
            "SCMP_ACT_TRACE", "SCMP_ACT_LOG"]


@st.composite
def _action(draw: st.DrawFn, action_key: str, errno_key: str) -> dict:
    action = draw(st.sampled_from(_actions))
    if action in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE") and draw(st.booleans()):
        return {action_key: action, errno_key: draw(st.integers(0, 4094 if action == "SCMP_ACT_ERRNO" else 0xFFFF))}
    return {action_key: action}


_arg = st.fixed_dictionaries({
    "index": st.integers(0, 5), "value": st.integers(0, (1 << 64) - 1),
    "op": st.sampled_from(["SCMP_CMP_EQ", "SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_GE",
                           "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ"]),
}, optional={"valueTwo": st.integers(0, (1 << 64) - 1)})
_names = st.sampled_from(["read", "mkdir", "mkdirat", "socketcall", "personality", "clone", "no_such_call"])
_syscall = st.builds(lambda names, action, args: {"names": names, **action, "args": args},
                     st.lists(_names, min_size=1, max_size=3), _action("action", "errnoRet"),
                     st.lists(_arg, max_size=3))
_profile = st.builds(
    lambda default, arches, flags, syscalls: {**default, "architectures": arches, "flags": flags,
                                              "syscalls": syscalls},
    _action("defaultAction", "defaultErrnoRet"),
    st.lists(st.sampled_from(_ARCHES[platform.machine()] + ["SCMP_ARCH_PPC64LE", "SCMP_ARCH_S390X"]), max_size=3),
    st.lists(st.sampled_from(["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG",
                              "SECCOMP_FILTER_FLAG_SPEC_ALLOW"]), max_size=2),
    st.lists(_syscall, max_size=5),
)


_top = st.fixed_dictionaries({"defaultAction": st.sampled_from(["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO"]) | _json},
                             optional={key: _json for key in _keys[1:]})


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(_json | _top)
def test_random_json_raises_only_spec_errors(data):
    try:
        SeccompProfile.from_spec(data)
    except (SpecError, Unsupported):
        pass


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_profile)
def test_every_valid_profile_compiles(data):
    profile = SeccompProfile.from_spec(data)
    try:
        with _compile_timeout(2.0):
            program = profile.compile()
    except SpecError as error:
        # The refusals left to libseccomp: two rules with the same syscall and arguments but other actions,
        # architectures of the other byte order, and rule sets libseccomp 2.5 never finishes adding.
        assert any(reason in error.message for reason in ("conflicts with an earlier one", "byte order",
                                                          "did not finish compiling")), error
        return
    assert program and len(program) % 8 == 0


# Two rules on one syscall sharing their first comparison: libseccomp 2.5.4's seccomp_rule_add never returns.
_LOOPING = {"defaultAction": "SCMP_ACT_TRAP", "syscalls": [
    {"names": ["personality"], "action": "SCMP_ACT_KILL_PROCESS",
     "args": [{"index": 1, "op": "SCMP_CMP_MASKED_EQ", "value": 656199}, {"index": 4, "op": op, "value": 331643},
              {"index": 2, "op": "SCMP_CMP_LT", "value": 2595037813}]}
    for op in ("SCMP_CMP_LE", "SCMP_CMP_MASKED_EQ")]}


@contextmanager
def _compile_timeout(seconds: float):
    saved, seccomp_module.COMPILE_TIMEOUT = seccomp_module.COMPILE_TIMEOUT, seconds
    try:
        yield
    finally:
        seccomp_module.COMPILE_TIMEOUT = saved


def test_a_filter_libseccomp_never_finishes_is_refused_in_time():
    profile = SeccompProfile.from_spec(_LOOPING)
    children = _children()
    with _compile_timeout(1.0):
        try:
            program = profile.compile()
        except SpecError as error:
            assert error.path == "linux.seccomp" and "did not finish compiling" in error.message
        else:  # a libseccomp without the bug compiles it
            assert program and len(program) % 8 == 0
    assert _children() == children  # the forked compiler is killed and reaped


def _children() -> set[int]:
    with open(f"/proc/self/task/{os.getpid()}/children") as file:
        return set(map(int, file.read().split()))
