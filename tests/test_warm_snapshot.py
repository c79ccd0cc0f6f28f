"""The warm point and `coldbrew run --snapshot KEY` with a real CRIU, real containers and a real chunk store.

The main subject is a busybox shell program: it counts, draws a random number, reaches its warm point, then reads a
line from its stdin and prints a few more lines. The first run makes the snapshot and completes; the second is
restored: it prints the same random number, answers "restored", and none of the work before the warm point runs
again. Around it: a changed config.json and a damaged store are refused (with the reason on stderr) and replaced by
a cold run; two snapshots of similar processes share chunks; the Python helper (warmpoint.py) works in a container.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import pytest
from hypothesis import assume, given, settings, strategies as st

from coldbrew.fs import LocalStore
from coldbrew.fs.store import object_path
from coldbrew.snapshot import CriuNotFound, find_criu, warm
from coldbrew.snapshot.store import (CHUNK_SIZE, PAGE_SIZE, SnapshotCache, SnapshotCorrupt, SnapshotMismatch,
                                     SnapshotNotFound, StoredSnapshot, _encode_record, compare_fields, cut, load,
                                     page_cuts, read_record, record_name)
from conftest import COLDBREW, run_through_files
from test_checkpoint import python_bundle, python_rootfs  # noqa: F401  (a fixture)
from test_leaks import HostWatch

try:
    CRIU = find_criu()
    CRIU_MISSING = ""
except CriuNotFound as e:
    CRIU, CRIU_MISSING = None, str(e)
needs_criu = pytest.mark.skipif(CRIU is None, reason=f"no CRIU >= 4 here (run scripts/setup-criu): {CRIU_MISSING}")

PROGRAM = """
i=0; while [ $i -lt 3 ]; do i=$((i+1)); echo "count $i"; done
r=$RANDOM$RANDOM; echo "drawn $r"
echo ready >&3; read answer <&4
echo "warm $answer $r"
read line; echo "got $line"
for j in 1 2; do echo "after $j"; done
exit 7
"""
WARMPOINT_PY = Path(__file__).resolve().parent.parent / "snapshot" / "warmpoint.py"


class Env:
    """One test's store, local snapshot cache and runtime root, and the CLI run against them."""

    def __init__(self, base: Path, runtime_root: str, cid: str) -> None:
        self.store = base / "store"
        self.cache = base / "cache"
        self.root = runtime_root
        self.cid = cid

    def run(self, bundle: Path, key: str, *, input: str = "hello\n", snapshot: bool = True, cache: Path | None = None):
        args = [COLDBREW, "--root", self.root, "run", "-b", str(bundle)]
        if snapshot:
            args += ["--snapshot", key, "--snapshot-store", str(self.store)]
        os.environ[warm.CACHE_ENV] = str(cache or self.cache)
        try:
            return run_through_files([*args, self.cid], input=input, timeout=60)
        finally:
            del os.environ[warm.CACHE_ENV]


@pytest.fixture
def env(tmp_path: Path, runtime_root: str, cid: str) -> Env:
    return Env(tmp_path, runtime_root, cid)


@pytest.fixture
def watch(tmp_path: Path, rootfs: Path, runtime_root: str, cid: str) -> HostWatch:
    return HostWatch(cid, (str(tmp_path), str(rootfs), runtime_root), runtime_root)


def leftovers(env: Env) -> list[str]:
    """What a run may leave besides containers: its bundle copies under /run and dumps or fetches in progress."""
    found = [f"/run/{n}" for n in os.listdir("/run") if n.startswith(f"coldbrew-warm-{env.cid}")]
    scratch = env.cache / "tmp"
    return found + ([str(scratch / n) for n in os.listdir(scratch)] if scratch.is_dir() else [])


def cold_output(out: str) -> tuple[str, list[str]]:
    """(the random number, the lines) of a cold run, checked line by line."""
    lines = out.splitlines()
    drawn = re.fullmatch(r"drawn (\d+)", lines[3])
    assert lines[:3] == ["count 1", "count 2", "count 3"] and drawn, out
    assert lines[4:] == [f"warm snapshotted {drawn[1]}", "got hello", "after 1", "after 2"], out
    return drawn[1], lines


# ---- the whole flow -------------------------------------------------------------------------------------------

@needs_criu
def test_first_run_snapshots_second_restores(env, bundles, watch):
    before = watch.snapshot()
    bundle = bundles.make(["sh", "-c", PROGRAM])
    first = env.run(bundle, "counter")
    assert first.returncode == 7, first.stderr
    drawn, _ = cold_output(first.stdout)
    assert first.stderr == ""
    record = read_record(LocalStore(str(env.store)), "counter")
    assert record.fields["criu"] == CRIU.version_string and record.fields["image"].startswith("path:")
    assert (env.cache / record.reference / "pages-1.img").is_file()  # the dump became the local cache's entry

    second = env.run(bundle, "counter", input="world\n")
    assert second.returncode == 7, second.stderr
    # the same process memory (the number drawn before the warm point), woken at its warm point: nothing before it
    # ran again, and its stdin and stdout are this run's
    assert second.stdout.splitlines() == [f"warm restored {drawn}", "got world", "after 1", "after 2"]
    assert second.stderr == ""
    watch.assert_clean(before, fds=False, shim=True)
    assert leftovers(env) == []


@needs_criu
def test_changed_config_is_refused_with_the_field_named_and_replaced(env, bundles, watch):
    before = watch.snapshot()
    bundle = bundles.make(["sh", "-c", PROGRAM])
    drawn, _ = cold_output(env.run(bundle, "cfg").stdout)
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["env"].append("MODE=changed")
    (bundle / "config.json").write_text(json.dumps(config))

    changed = env.run(bundle, "cfg")
    assert changed.returncode == 7
    assert "snapshot 'cfg' does not fit here: spec differs" in changed.stderr
    assert "starting cold; the snapshot will be replaced" in changed.stderr
    redrawn, _ = cold_output(changed.stdout)  # a cold start, not the old process
    again = env.run(bundle, "cfg")  # the replacement restores
    assert again.stdout.splitlines()[0] == f"warm restored {redrawn}" and again.stderr == ""
    # a per-run field (annotations) does not count
    config["annotations"] = {"run": uuid.uuid4().hex}
    (bundle / "config.json").write_text(json.dumps(config))
    assert env.run(bundle, "cfg").stdout.splitlines()[0] == f"warm restored {redrawn}"
    watch.assert_clean(before, fds=False, shim=True)
    assert leftovers(env) == []


@needs_criu
def test_corrupt_store_is_refused_loudly_and_replaced(env, bundles, watch):
    before = watch.snapshot()
    bundle = bundles.make(["sh", "-c", PROGRAM])
    cold_output(env.run(bundle, "bad").stdout)
    reference = read_record(LocalStore(str(env.store)), "bad").reference
    flip_byte(biggest_object(env.store, exclude=reference))

    result = env.run(bundle, "bad", cache=env.cache.parent / "fresh-cache")  # an empty cache: the store is read
    assert result.returncode == 7
    assert re.search(r"WARNING: snapshot 'bad' in .*: pages-1\.img: chunk [0-9a-f]{64} is corrupt", result.stderr)
    redrawn, _ = cold_output(result.stdout)
    again = env.run(bundle, "bad", cache=env.cache.parent / "fresh-cache")
    assert again.stdout.splitlines()[0] == f"warm restored {redrawn}"
    watch.assert_clean(before, fds=False, shim=True)
    assert leftovers(env) == []


def run_in_process(runtime, cid: str, bundle: Path, key: str, tmp_path: Path, **options) -> tuple[warm.WarmRun, str]:
    """warm.run with a pipe for stdout: (how it went, what the program printed)."""
    read, write = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        result = warm.run(runtime, cid, str(bundle), key, store=str(tmp_path / "store"),
                          cache=SnapshotCache(str(tmp_path / "cache")), stdio=(null, write, write), **options)
        os.close(write)
        write = -1
        with os.fdopen(read, "r") as f:
            read = -1
            return result, f.read()
    finally:
        for fd in (read, write, null):
            if fd >= 0:
                os.close(fd)


@needs_criu
def test_failed_dump_answers_failed_and_the_program_runs_on(runtime, bundles, cid, tmp_path, watch):
    """A CRIU that cannot dump (this one only knows its version): the program hears "failed" and completes, no
    snapshot is recorded, and the dump's directory is gone."""
    before = watch.snapshot()
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'Version: 4.2.1' && exit 0\nexit 1\n")
    fake.chmod(0o755)
    result, out = run_in_process(runtime, cid, bundles.make(["sh", "-c", PROGRAM]), "nodump", tmp_path,
                                 criu=str(fake))
    assert result.outcome == "snapshot-failed" and result.exit_code == 7 and result.snapshot is None
    assert re.search(r"^warm failed \d+$", out, re.M) and "after 2" in out
    with pytest.raises(SnapshotNotFound):
        read_record(LocalStore(str(tmp_path / "store")), "nodump")
    assert os.listdir(tmp_path / "cache" / "tmp") == []
    watch.assert_clean(before, fds=False)


@needs_criu
def test_no_warm_point_or_not_the_protocol_makes_no_snapshot(runtime, bundles, cid, tmp_path):
    result, out = run_in_process(runtime, cid, bundles.make(["sh", "-c", "echo plain; exit 3"]), "none", tmp_path)
    assert (result.outcome, result.exit_code, out) == ("no-warm-point", 3, "plain\n")
    said = []
    result, out = run_in_process(runtime, cid, bundles.make(["sh", "-c", "echo hello >&3; read a <&4; echo $a."]),
                                 "wrong", tmp_path, log=said.append)
    assert (result.outcome, result.exit_code, out) == ("no-warm-point", 0, ".\n")  # the reply pipe just ends
    assert said == ["no snapshot 'wrong': the program wrote b'hello\\n' to its warm-point descriptor 3, not "
                    "b'ready\\n'"]


# ---- refusals, in process ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, rootfs: Path):
    """One snapshot in a store, made by the CLI: (store directory, bundle, this host's fields)."""
    if CRIU is None:
        pytest.skip(CRIU_MISSING)
    base = tmp_path_factory.mktemp("made")
    bundle = base / "bundle"
    bundle.mkdir()
    from coldbrew.bench.bundles import busybox_config

    (bundle / "config.json").write_text(json.dumps(busybox_config(rootfs, ["sh", "-c", PROGRAM])))
    env = Env(base, f"/run/coldbrew-test-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:10]}")
    try:
        cold_output(env.run(bundle, "made").stdout)
    finally:
        shutil.rmtree(env.root, ignore_errors=True)
    return env.store, bundle, warm.host_fields(str(bundle), CRIU)


def biggest_object(store: Path, exclude: str) -> Path:
    objects = [p for p in store.glob("??/??/*") if p.name != exclude]
    return max(objects, key=lambda p: p.stat().st_size)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def copy_store(made, tmp_path: Path) -> Path:
    target = tmp_path / "store"
    shutil.copytree(made[0], target)
    return target


def test_damaged_store_is_refused_naming_what(made, tmp_path):
    store_dir, _, fields = made
    reference = read_record(LocalStore(str(store_dir)), "made").reference

    def damage_chunk(store: Path) -> None:
        flip_byte(biggest_object(store, exclude=reference))

    def delete_chunk(store: Path) -> None:
        biggest_object(store, exclude=reference).unlink()

    def edit_record(store: Path) -> None:
        path = store / "named" / record_name("made")
        record = json.loads(path.read_text())
        record["fields"]["kernel"] = "0.0.0"
        path.write_text(json.dumps(record))

    def delete_index(store: Path) -> None:
        (store / object_path(bytes.fromhex(reference))).unlink()

    cases = {
        "flipped": (damage_chunk, r"pages-1\.img: chunk [0-9a-f]{64} is corrupt: its data hashes to"),
        "deleted": (delete_chunk, r"chunk [0-9a-f]{64} of pages-1\.img is missing from the store"),
        "edited": (edit_record, r"does not match its own digest: it was edited or damaged"),
        "garbled": (lambda s: (s / "named" / record_name("made")).write_text("{"), r"is not JSON"),
        "no index": (delete_index, rf"its index {reference} is missing"),
    }
    for name, (damage, message) in cases.items():
        store = copy_store(made, tmp_path / name)
        damage(store)
        cache = SnapshotCache(str(tmp_path / name / "cache"))
        with pytest.raises(SnapshotCorrupt, match=message):
            load(LocalStore(str(store)), "made", fields, cache)
        assert cache.entries() == [] and os.listdir(cache.scratch) == []  # nothing half-fetched is kept
    # the undamaged store loads, every chunk checked, into the cache
    cache = SnapshotCache(str(tmp_path / "good-cache"))
    with load(LocalStore(str(store_dir)), "made", fields, cache) as loaded:
        assert loaded.fetched and loaded.snapshot.kind == "dump" and loaded.path == cache.path(reference)
    with load(LocalStore(str(store_dir)), "made", fields, cache) as loaded:
        assert not loaded.fetched  # from the cache now
    with pytest.raises(SnapshotNotFound, match="no snapshot 'other'"):
        load(LocalStore(str(store_dir)), "other", fields, cache)


def test_mismatched_fields_are_refused_naming_the_field(made, tmp_path):
    store_dir, _, fields = made
    store = LocalStore(str(store_dir))
    cache = SnapshotCache(str(tmp_path / "cache"))
    for name, value in (("kernel", "9.9.9-other"), ("criu", "3.0.0"), ("gpu", "NVIDIA H100; driver 580.0"),
                        ("image", "coldbrew.fs:" + "ab" * 32), ("spec", "0" * 64)):
        expected = rf"{name} differs: it was made with .*, here it is '{re.escape(value)}'"
        with pytest.raises(SnapshotMismatch, match=expected):
            load(store, "made", {**fields, name: value}, cache)
    with pytest.raises(SnapshotMismatch, match="cpu_flags differs: the snapshot's CPU had .*, which this CPU lacks"):
        load(store, "made", {**fields, "cpu_flags": fields["cpu_flags"][1:]}, cache)
    load(store, "made", {**fields, "cpu_flags": fields["cpu_flags"] + ["zz_newer_feature"]}, cache).close()
    assert cache.entries() != []


def test_compare_fields_names_a_field_missing_on_either_side():
    with pytest.raises(SnapshotMismatch, match=r"gpu differs: it was made with '\(not recorded\)'"):
        compare_fields("k", {"kernel": "6"}, {"kernel": "6", "gpu": "none"})
    with pytest.raises(SnapshotMismatch, match=r"kernel differs: .*'\(unknown here\)'"):
        compare_fields("k", {"kernel": "6"}, {})


# ---- what must match, computed ----------------------------------------------------------------------------------

def test_host_fields(tmp_path, bundles):
    bundle = bundles.make(["true"])
    if CRIU is None:
        pytest.skip(CRIU_MISSING)
    fields = warm.host_fields(str(bundle), CRIU)
    assert set(fields) == {"image", "spec", "criu", "kernel", "arch", "cpu_flags", "gpu"}
    assert fields["image"].startswith(f"path:{os.path.realpath(bundles.rootfs)} on ")
    assert fields["cpu_flags"] == sorted(set(fields["cpu_flags"])) and fields["cpu_flags"]
    assert fields["gpu"] == warm.gpu_identity()


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse here")
def test_image_identity_of_a_coldbrew_fs_root_is_its_reference(tmp_path, rootfs):
    from coldbrew import fs

    reference = fs.push(str(rootfs), fs.open_store(str(tmp_path / "store"))).reference
    root = fs.create_root(reference, str(tmp_path / "root"), store=str(tmp_path / "store"),
                          cache_dir=str(tmp_path / "fscache"))
    try:
        assert warm.image_identity(root) == f"coldbrew.fs:{reference}"  # the overlay `coldbrew fs rootfs` makes
        assert warm.image_identity(str(tmp_path / "root" / "image")) == f"coldbrew.fs:{reference}"
    finally:
        fs.remove_root(str(tmp_path / "root"))


def test_gpu_identity_reads_the_driver(tmp_path):
    assert warm.gpu_identity(str(tmp_path / "absent")) == "none"
    proc = tmp_path / "nvidia"
    (proc / "gpus" / "0000:01:00.0").mkdir(parents=True)
    (proc / "version").write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release "
                                  "Build  (dvs-builder@U16-I3-B03-4-3)  Tue Jul 15 2025\nGCC version: gcc 12\n")
    (proc / "gpus" / "0000:01:00.0" / "information").write_text("Model: \t\t NVIDIA H100 80GB HBM3\nIRQ: 33\n")
    assert warm.gpu_identity(str(proc)) == "NVIDIA H100 80GB HBM3; driver 580.65.06"


def test_spec_digest_ignores_only_per_run_fields(rootfs):
    from coldbrew.bench.bundles import busybox_config

    base = busybox_config(rootfs, ["true"])
    base["mounts"].append({"destination": "/etc/hosts", "type": "bind", "source": "/a/hosts", "options": ["rbind"]})
    digest = warm.spec_digest(base)
    same = json.loads(json.dumps(base))
    same["root"]["path"] = "/elsewhere"
    same["annotations"] = {"io.kubernetes.pod": "x"}
    same["linux"]["cgroupsPath"] = "/other/path"
    same["mounts"][-1]["source"] = "/b/hosts"
    assert warm.spec_digest(same) == digest
    for edit in (lambda c: c["process"]["args"].append("x"), lambda c: c["process"]["env"].append("A=1"),
                 lambda c: c["mounts"][-1].update(destination="/etc/other"), lambda c: c.update(hostname="h2")):
        other = json.loads(json.dumps(base))
        edit(other)
        assert warm.spec_digest(other) != digest


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 700), max_size=8), st.integers(0, 2**32), st.sampled_from([0.0, 0.01, 0.2, 1.0]),
       st.booleans())
def test_cut_covers_the_file_and_starts_a_piece_at_every_run(pages, seed, density, wrong_total):
    runs = [n * PAGE_SIZE for n in pages]
    size = sum(runs) + (PAGE_SIZE if wrong_total else 0)
    rng = random.Random(seed)
    cuts = [rng.random() < density for _ in range(size // PAGE_SIZE)]
    pieces = cut(size, runs, cuts)
    assert [o for o, _ in pieces] == [sum(length for _, length in pieces[:i]) for i in range(len(pieces))]
    assert sum(length for _, length in pieces) == size and all(0 < n <= CHUNK_SIZE for _, n in pieces)
    starts = {o for o, _ in pieces}
    if wrong_total:  # runs that do not add up to the file: fixed pieces
        assert starts == set(range(0, size, CHUNK_SIZE))
        return
    run_starts = {sum(runs[:i]) for i in range(len(runs))}
    assert run_starts <= starts  # a piece starts where each run does
    for o, n in pieces:  # and within a run only at a marked page, or where a piece reached its largest size
        if o not in run_starts:
            previous = max(p for p in starts if p < o)
            assert cuts[o // PAGE_SIZE] or o - previous == CHUNK_SIZE
            assert o - previous >= 16 * PAGE_SIZE


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=30), st.dictionaries(st.sampled_from(["kernel", "criu", "gpu"]), st.text()),
       st.integers(0, 10**12), st.sampled_from(["key", "fields", "dump_bytes", "reference"]))
def test_record_round_trips_and_any_edit_is_refused(tmp_path_factory, key, fields, size, edited):
    store = LocalStore(str(tmp_path_factory.mktemp("records")))
    stored = StoredSnapshot(key=key, reference="ab" * 32, fields=fields, files=3, dump_bytes=size, chunks=4,
                            unique_chunks=4, uploaded_chunks=0, uploaded_bytes=0, created="2026-01-01T00:00:00Z")
    store.put_named(record_name(key), _encode_record(stored))
    assert read_record(store, key) == stored
    record = json.loads(store.get_named(record_name(key)))
    record[edited] = {"key": key + "x", "fields": {**fields, "cpu": "x"}, "dump_bytes": size + 1,
                      "reference": "cd" * 32}[edited]
    store.put_named(record_name(key), json.dumps(record).encode())
    with pytest.raises(SnapshotCorrupt, match="does not match its own digest"):
        read_record(store, key)


# ---- dedupe ---------------------------------------------------------------------------------------------------

@needs_criu
def test_snapshots_of_similar_processes_share_chunks(tmp_path, runtime, bundles, cid, watch):
    """Two snapshots of one program whose memory differs by a random number and a little heap share chunks, the
    pages file's among them (memory runs that did not change)."""
    before = watch.snapshot()
    store = LocalStore(str(tmp_path / "store"))
    cache = SnapshotCache(str(tmp_path / "cache"))
    program = ("r=$RANDOM; n=0; while [ $n -lt $((r % 50)) ]; do v=\"$v$n\"; n=$((n+1)); done; "
               "echo ready >&3; read answer <&4; echo $answer")
    bundle = str(bundles.make(["sh", "-c", program]))
    made = []
    for key in ("first", "second"):
        null = os.open(os.devnull, os.O_RDWR)
        try:
            result = warm.run(runtime, f"{cid}-{key}", bundle, key, store=store, cache=cache, criu=CRIU,
                              stdio=(null, null, null))
        finally:
            os.close(null)
        assert result.outcome == "snapshotted" and result.exit_code == 0
        made.append(result.snapshot)
    first, second = made
    assert first.reference != second.reference
    shared = second.unique_chunks - second.uploaded_chunks
    pages = [set(chunk_digests(store, snap.reference, "pages-1.img")) for snap in made]
    report = (f"first: {first.unique_chunks} chunks, second: {second.unique_chunks} chunks, {shared} shared, "
              f"{second.uploaded_chunks} new; pages-1.img: {len(pages[0])} and {len(pages[1])} chunks, "
              f"{len(pages[0] & pages[1])} shared")
    print(f"\ndedupe of two similar busybox snapshots: {report}")
    assert shared >= 8 and pages[0] & pages[1] and len(pages[1]) > 1, report
    watch.assert_clean(before, fds=False)


def chunk_digests(store: LocalStore, reference: str, name: str) -> list[bytes]:
    from coldbrew.fs import objects
    from coldbrew.fs.index import Index

    index = Index(objects.decode(bytes.fromhex(reference), store.get(bytes.fromhex(reference)), 1 << 26))
    ino = next(i for _, n, i in index.children(1) if n == name.encode())
    return [c.digest for c in index.chunks(ino)]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 600), st.integers(1, 3))
def test_page_cuts_fall_back_into_step_after_inserted_pages(seed, inserted, runs):
    """The same memory after a different number of pages (a bigger heap before it) is cut the same way from the
    first place both copies cut at, so every chunk from there on is shared; fixed offsets would share none."""
    rng = random.Random(seed)
    region = rng.randbytes(1000 * PAGE_SIZE)
    shifted = rng.randbytes(inserted * PAGE_SIZE) + region
    split = [len(region) // (runs * PAGE_SIZE) * PAGE_SIZE] * (runs - 1)
    pieces_a = cut(len(region), [*split, len(region) - sum(split)], page_cuts(region))
    pieces_b = cut(len(shifted), [inserted * PAGE_SIZE, *split, len(region) - sum(split)], page_cuts(shifted))
    offset = inserted * PAGE_SIZE
    in_step = {o for o, _ in pieces_a} & {o - offset for o, _ in pieces_b}
    assume(in_step - {0})
    first = min(in_step - {0})
    chunks_b = {shifted[o:o + n] for o, n in pieces_b}
    assert all(region[o:o + n] in chunks_b for o, n in pieces_a if o >= first)
    assert all(n <= CHUNK_SIZE for _, n in pieces_a + pieces_b)


# ---- the Python helper ---------------------------------------------------------------------------------------

PY_PROGRAM = """
import os, sys
sys.path.insert(0, "/app")
import warmpoint
token = os.urandom(8).hex()
print("token", token, flush=True)
state = warmpoint.ready()
print(state, token, os.environ.get("COLDBREW_WARM_FD"), flush=True)
"""


@needs_criu
def test_python_helper_in_a_container(env, tmp_path, python_rootfs, watch):
    bundle = python_bundle(tmp_path, python_rootfs, PY_PROGRAM)
    shutil.copy(WARMPOINT_PY, bundle / "app" / "warmpoint.py")
    before = watch.snapshot()

    plain = env.run(bundle, "py", snapshot=False)
    token = plain.stdout.split()[1]
    assert plain.returncode == 0 and plain.stdout.splitlines()[1] == f"none {token} None", plain.stderr
    first = env.run(bundle, "py")
    token = first.stdout.split()[1]
    # the helper answers, closes the descriptors and takes the variables out of the environment
    assert first.returncode == 0 and first.stdout.splitlines() == [f"token {token}", f"snapshotted {token} None"]
    second = env.run(bundle, "py")
    assert second.returncode == 0 and second.stdout.splitlines() == [f"restored {token} None"], second.stderr
    watch.assert_clean(before, fds=False, shim=True)


# ---- the command line -----------------------------------------------------------------------------------------

def test_cli_refuses_what_a_snapshot_run_cannot_do(env, bundles):
    bundle = bundles.make(["true"])
    for extra, message in ((["-d"], "--snapshot cannot be combined with --detach"),
                           (["--preserve-fds", "1"], "cannot be combined with --preserve-fds"),
                           (["--keep"], "cannot be combined with --keep")):
        result = run_through_files([COLDBREW, "--root", env.root, "run", *extra, "--snapshot", "k", "-b",
                                    str(bundle), env.cid])
        assert result.returncode == 1 and message in result.stderr
    result = run_through_files([COLDBREW, "--root", env.root, "run", "--snapshot", "", "-b", str(bundle), env.cid])
    assert result.returncode == 1 and "--snapshot needs a key" in result.stderr
    assert "--snapshot-store" in run_through_files([COLDBREW, "run", "--help"]).stdout


def test_write_record_with_a_given_listing_keeps_its_digests(tmp_path):
    """A record-only rewrite (warm's descriptors by identity) reuses the listing: files are not hashed again."""
    from coldbrew.snapshot import image
    from coldbrew.snapshot.errors import SnapshotError

    (tmp_path / "pages-1.img").write_bytes(b"a" * 5000)
    (tmp_path / "core-1.img").write_bytes(b"core")
    (tmp_path / "dump.log").write_text("not listed")
    base = {"kind": image.DUMP, "container": {"id": "c"}}
    image.write_record(str(tmp_path), base)
    files = image.Snapshot.open(str(tmp_path)).record["files"]
    assert sorted(files) == ["core-1.img", "pages-1.img"]
    # same size, other content: a rehash would list the new digest, a reused listing keeps the old one
    (tmp_path / "pages-1.img").write_bytes(b"b" * 5000)
    image.write_record(str(tmp_path), {**base, "descriptors": {"0": {"key": "pipe:[1]"}}}, files=files)
    rewritten = image.Snapshot.open(str(tmp_path), verify=False).record
    assert rewritten["files"] == files and rewritten["descriptors"] == {"0": {"key": "pipe:[1]"}}
    with pytest.raises(SnapshotError, match="pages-1.img does not have the content"):
        image.Snapshot.open(str(tmp_path))
    # a listing that does not fit the directory is refused, naming the file; the record is left as it was
    (tmp_path / "pages-1.img").write_bytes(b"b" * 10)
    with pytest.raises(SnapshotError, match="pages-1.img has 10 bytes, the listing given says 5000"):
        image.write_record(str(tmp_path), base, files=files)
    (tmp_path / "extra.img").write_bytes(b"x")
    with pytest.raises(SnapshotError, match="not listed: extra.img"):
        image.write_record(str(tmp_path), base, files=files)
    assert image.Snapshot.open(str(tmp_path), verify=False).record == rewritten
