"""Capabilities against the real kernel: every set is changed in a forked child, never in the test process."""

from __future__ import annotations

import errno
import json
import os

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from coldbrew.runtime import libc
from conftest import fork_child
from coldbrew.runtime.capabilities import ALL, LAST_CAP, SETS, Capabilities, current
from coldbrew.runtime.errors import SpecError, SyscallError, Unsupported
from coldbrew.runtime.seccomp import SeccompProfile, load_filter

BUSYBOX = "/bin/busybox"
NOBODY = 65534


def as_lists(sets: dict[str, set[str]]) -> dict[str, list[str]]:
    return {key: sorted(value) for key, value in sets.items()}


def expected(caps: Capabilities) -> dict[str, list[str]]:
    return {key: sorted(getattr(caps, key)) for key in SETS}


def parse_status(text: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def names(mask_hex: str) -> list[str]:
    mask = int(mask_hex, 16)
    return sorted(name for number, name in enumerate(ALL) if mask >> number & 1)


# A container-like spec: a narrow bounding set, a smaller effective set, two ambient capabilities.
SPEC = {
    "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_AUDIT_WRITE"],
    "effective": ["CAP_CHOWN", "CAP_NET_BIND_SERVICE"],
    "permitted": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW"],
    "inheritable": ["CAP_NET_BIND_SERVICE", "CAP_NET_RAW"],
    "ambient": ["CAP_NET_BIND_SERVICE", "CAP_NET_RAW"],
}


def test_all_matches_the_kernel():
    with open("/proc/sys/kernel/cap_last_cap") as file:
        assert LAST_CAP == int(file.read())
    assert len(ALL) == min(LAST_CAP + 1, 41)
    assert ALL[0] == "CAP_CHOWN" and ALL[21] == "CAP_SYS_ADMIN" and ALL[8] == "CAP_SETPCAP"
    held = current()
    assert set(held) == set(SETS)
    assert held["bounding"] <= set(ALL) and "CAP_SYS_ADMIN" in held["effective"]  # the suite runs as root


def test_from_spec():
    caps = Capabilities.from_spec({**SPEC, "bounding": SPEC["bounding"] + ["CAP_NOT_INVENTED_YET"]})
    assert expected(caps) == {key: sorted(SPEC[key]) for key in SETS}
    assert caps.ignored == ("CAP_NOT_INVENTED_YET",)
    empty = Capabilities.from_spec(None)
    assert expected(empty) == {key: [] for key in SETS} and empty.ignored == ()
    assert expected(Capabilities.from_spec({"effective": None})) == {key: [] for key in SETS}


@pytest.mark.parametrize(("spec", "path"), [
    ([], "process.capabilities"),
    ({"bounding": "CAP_CHOWN"}, "process.capabilities.bounding"),
    ({"effective": ["CAP_CHOWN", "cap_kill"]}, "process.capabilities.effective[1]"),
    ({"permitted": ["CHOWN"]}, "process.capabilities.permitted[0]"),
    ({"inheritable": ["CAP_"]}, "process.capabilities.inheritable[0]"),
    ({"ambient": ["CAP_NET RAW"]}, "process.capabilities.ambient[0]"),
    ({"ambient": [21]}, "process.capabilities.ambient[0]"),
])
def test_malformed_names_name_their_path(spec, path):
    with pytest.raises(SpecError) as caught:
        Capabilities.from_spec(spec)
    assert caught.value.path == path


def test_child_keeps_exactly_the_listed_sets():
    caps = Capabilities.from_spec(SPEC)

    def body():
        caps.drop_bounding()
        caps.apply()
        return as_lists(current())

    _, report = fork_child(body)
    assert report == {"ok": expected(caps)}
    assert "CAP_SYS_ADMIN" in current()["bounding"]  # the test process itself is untouched


def test_no_capabilities_means_none_at_all():
    def body():
        caps = Capabilities.from_spec(None)
        caps.drop_bounding()
        caps.apply()
        return as_lists(current())

    _, report = fork_child(body)
    assert report == {"ok": {key: [] for key in SETS}}


def test_init_sequence_as_non_root_keeps_the_spec_sets_and_ambient_survives_exec():
    """The init's order: bounding, keepcaps, user switch, capset, no_new_privs, seccomp, execve."""
    caps = Capabilities.from_spec(SPEC)
    program = SeccompProfile.from_spec({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}],
    }).compile()
    before_read, before_write = os.pipe()
    out_read, out_write = os.pipe()

    def body():
        os.close(before_read)
        os.close(out_read)
        caps.drop_bounding()
        libc.prctl(libc.PR_SET_KEEPCAPS, 1)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        libc.prctl(libc.PR_SET_KEEPCAPS, 0)
        caps.apply()
        os.write(before_write, json.dumps(as_lists(current())).encode())
        os.close(before_write)
        libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
        load_filter(program)
        os.dup2(out_write, 1)
        os.execv(BUSYBOX, [BUSYBOX, "cat", "/proc/self/status"])

    status, report = fork_child(body)
    os.close(before_write)
    os.close(out_write)
    with os.fdopen(before_read, "rb") as pipe:
        before_exec = json.loads(pipe.read() or b"null")
    with os.fdopen(out_read) as pipe:
        after_exec = parse_status(pipe.read())
    assert report is None, report
    assert os.waitstatus_to_exitcode(status) == 0
    assert before_exec == expected(caps)
    assert after_exec["Uid"].split() == [str(NOBODY)] * 4
    assert after_exec["NoNewPrivs"] == "1" and after_exec["Seccomp"] == "2"
    # Across execve as a non-root user without file capabilities, the ambient set becomes permitted and
    # effective; inheritable and bounding stay.
    ambient = sorted(SPEC["ambient"])
    assert {key: names(after_exec[field]) for key, field in
            [("ambient", "CapAmb"), ("permitted", "CapPrm"), ("effective", "CapEff"),
             ("inheritable", "CapInh"), ("bounding", "CapBnd")]} == {
        "ambient": ambient, "permitted": ambient, "effective": ambient,
        "inheritable": sorted(SPEC["inheritable"]), "bounding": sorted(SPEC["bounding"])}


def test_refusals_name_the_problem():
    narrow = Capabilities.from_spec({"permitted": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"]})

    def body():
        narrow.apply()
        errors = {}
        for label, spec in [("more permitted", {"permitted": ["CAP_CHOWN", "CAP_KILL"]}),
                            ("effective beyond permitted", {"permitted": [], "effective": ["CAP_CHOWN"]}),
                            ("ambient not inheritable", {"permitted": ["CAP_CHOWN"], "ambient": ["CAP_CHOWN"]})]:
            try:
                Capabilities.from_spec(spec).apply()
                errors[label] = None
            except SyscallError as error:
                errors[label] = [error.errno, str(error)]
        return errors

    _, report = fork_child(body)
    errors = report["ok"]
    assert errors["more permitted"][0] == errno.EPERM
    assert "permitted ['CAP_KILL'] not held" in errors["more permitted"][1]
    assert errors["effective beyond permitted"][0] == errno.EPERM
    assert "effective ['CAP_CHOWN'] not in permitted" in errors["effective beyond permitted"][1]
    assert errors["ambient not inheritable"][0] == errno.EPERM
    assert "ambient CAP_CHOWN" in errors["ambient not inheritable"][1]


def test_drop_bounding_needs_setpcap():
    def body():
        Capabilities.from_spec({"permitted": ["CAP_KILL"], "effective": ["CAP_KILL"]}).apply()
        Capabilities.from_spec({"bounding": ["CAP_KILL"]}).drop_bounding()

    _, report = fork_child(body)
    assert report["errno"] == errno.EPERM and "PR_CAPBSET_DROP" in report["error"]


def test_seccomp_after_capset_needs_no_new_privs():
    """Without no_new_privs the filter must go in while CAP_SYS_ADMIN is still effective (as runc orders it)."""
    program = SeccompProfile.from_spec({"defaultAction": "SCMP_ACT_ALLOW"}).compile()

    def body():
        Capabilities.from_spec(SPEC).apply()
        load_filter(program)

    _, report = fork_child(body)
    assert report["errno"] == errno.EACCES


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from(list(ALL) + ["CAP_FUTURE", "cap_chown", "CAP_"]),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(
        st.sampled_from(list(SETS)) | st.text(max_size=6), children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=200)
@given(_json)
def test_random_json_raises_only_spec_errors(data):
    try:
        caps = Capabilities.from_spec(data)
    except (SpecError, Unsupported):
        return
    for key in SETS:
        assert getattr(caps, key) <= set(ALL)
