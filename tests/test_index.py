"""The image index format and push: round trips, dedupe, sparse files, and hostile indexes refused."""

from __future__ import annotations

import os
import stat
import struct

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coldbrew.fs import objects, profile
from coldbrew.fs.erofs import redirect_paths
from coldbrew.fs.errors import BadIndex, BadReference, ChunkMissing, CorruptChunk, FsError
from coldbrew.fs.index import MAX_CHUNK_SIZE, Chunk, Index, IndexBuilder
from coldbrew.fs.profile import (MAX_STORED_SIZE, PROFILE_MAGIC, PackedChunk, ProfileRecorder, fetch_head,
                                 files_read_whole, metadata_image, packed_chunks, parse_profile, profile_name)
from coldbrew.fs.pushing import push
from coldbrew.fs.store import LocalStore

DIR = stat.S_IFDIR | 0o755
REG = stat.S_IFREG | 0o644


def load(store: LocalStore, reference: str) -> Index:
    digest = bytes.fromhex(reference)
    index = Index(objects.decode(digest, store.get(digest), 1 << 30))
    index.validate()
    return index


# --- objects -------------------------------------------------------------------------------------------------------

def test_objects_verify_their_name():
    digest, stored = objects.encode(b"hello" * 1000)
    assert objects.decode(digest, stored, 5000) == b"hello" * 1000
    with pytest.raises(CorruptChunk, match=digest.hex()):
        objects.decode(digest, objects.compress(b"other"), 5000)
    with pytest.raises(CorruptChunk, match="not a zstd frame"):
        objects.decode(digest, b"garbage", 5000)
    with pytest.raises(CorruptChunk, match="does not decompress|not a zstd"):
        objects.decode(digest, stored[: len(stored) // 2], 5000)
    # A frame that claims more than the reader expects is refused before anything is allocated.
    with pytest.raises(CorruptChunk, match="claims"):
        objects.decode(digest, stored, 100)
    # Without a content size in the frame, the output bound still holds.
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 100_000)
    with pytest.raises(CorruptChunk):
        objects.decode(objects.digest_of(b"\0" * 100_000), unsized, 1000)


def test_references_are_parsed_strictly():
    digest = objects.digest_of(b"x")
    assert objects.parse_reference(digest.hex()) == digest
    assert objects.parse_reference("blake3:" + digest.hex()) == digest
    for bad in ("", "abc", "z" * 64, digest.hex() + "00"):
        with pytest.raises(BadReference):
            objects.parse_reference(bad)


def test_local_store(tmp_path):
    store = LocalStore(str(tmp_path))
    digest, stored = objects.encode(b"data")
    assert not store.has(digest)
    with pytest.raises(ChunkMissing, match=digest.hex()):
        store.get(digest)
    store.put(digest, stored)
    store.put(digest, stored)  # idempotent
    assert store.has(digest) and store.get(digest) == stored
    assert os.path.exists(tmp_path / digest.hex()[:2] / digest.hex()[2:4] / digest.hex())
    assert not [p for p in tmp_path.rglob("*.tmp")]
    with pytest.raises(ValueError):
        store.put_named("../escape/x", b"")


# --- the format ----------------------------------------------------------------------------------------------------

names = st.binary(min_size=1, max_size=40).filter(lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))


@st.composite
def trees(draw):
    """An in-memory tree: {name: None (file) | bytes (symlink target) | dict (directory)}."""
    def directory(depth):
        entries = draw(st.dictionaries(names, st.none() if depth > 2 else st.none() | st.binary(min_size=1, max_size=50).filter(lambda t: b"\0" not in t) | st.deferred(lambda: st.just({})), max_size=6))
        return {name: (directory(depth + 1) if isinstance(value, dict) else value) for name, value in entries.items()}
    return directory(0)


def build(tree: dict) -> tuple[bytes, dict[bytes, tuple]]:
    """Serialise a tree; returns the index and what each path should read back as."""
    builder = IndexBuilder()
    expected = {}
    counter = iter(range(1, 1 << 30))

    def add_dir(content: dict, ino: int, path: bytes) -> None:
        children = []
        for name, value in content.items():
            child_path = path + b"/" + name if path else name
            n = next(counter)
            if isinstance(value, dict):
                child = builder.add(mode=DIR, parent=ino, mtime_ns=n)
                add_dir(value, child, child_path)
                expected[child_path] = ("dir", n)
            elif value is None:
                chunk = Chunk(objects.digest_of(name), 0, n % 7 + 1)
                child = builder.add(mode=REG, size=n % 7 + 3, parent=ino, mtime_ns=n, chunks=[chunk],
                                    xattrs=[(b"user.n", str(n).encode())])
                expected[child_path] = ("file", n, chunk)
            else:
                child = builder.add(mode=stat.S_IFLNK | 0o777, parent=ino, symlink=value, mtime_ns=n)
                expected[child_path] = ("link", n, value)
            children.append((name, child))
        builder.set_children(ino, children)

    root = builder.add(mode=DIR)
    add_dir(tree, root, b"")
    return builder.build(), expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees())
def test_index_round_trip(tree):
    data, expected = build(tree)
    index = Index(data)
    index.validate()
    walked = dict(index.walk())
    assert set(walked) - {b""} == set(expected)
    for path, want in expected.items():
        ino = walked[path]
        # lookup along the path finds the same inode the walk did
        parent = 1
        for part in path.split(b"/"):
            parent = index.lookup(parent, part)
        assert parent == ino
        attributes = index.attributes(ino)
        assert attributes.mtime_ns == want[1]
        if want[0] == "file":
            assert index.chunks(ino) == [want[2]]
            assert index.xattrs(ino) == {b"user.n": str(want[1]).encode()}
            assert attributes.nlink == 1
        elif want[0] == "link":
            assert index.symlink_target(ino) == want[2]
        else:
            assert stat.S_ISDIR(attributes.mode)
            subdirs = sum(1 for _, _, c in index.children(ino) if stat.S_ISDIR(index.mode(c)))
            assert attributes.nlink == 2 + subdirs
    assert index.lookup(1, b"\xff" * 41) is None


def hostile(mutate) -> bytes:
    builder = IndexBuilder()
    root = builder.add(mode=DIR)
    sub = builder.add(mode=DIR, parent=root)
    leaf = builder.add(mode=REG, size=10, parent=sub, chunks=[Chunk(b"\1" * 32, 0, 10)])
    mutate(builder, root, sub, leaf)
    return builder.build()


@pytest.mark.parametrize("mutate, message", [
    (lambda b, r, s, f: (b.set_children(r, [(b"..", s)]), b.set_children(s, [(b"f", f)])), "not a file name"),
    (lambda b, r, s, f: (b.set_children(r, [(b"a/b", s)]), b.set_children(s, [(b"f", f)])), "not a file name"),
    (lambda b, r, s, f: (b.set_children(r, [(b"s", s)]), b.set_children(s, [(b"loop", r)])), "linked twice"),
    (lambda b, r, s, f: (b.set_children(r, [(b"x" * 256, s)]), b.set_children(s, [(b"f", f)])), "name out of bounds"),
    (lambda b, r, s, f: (b.set_children(r, [(b"s", s), (b"l", b.add(mode=stat.S_IFLNK | 0o777, symlink=b"x" * 4096))
                                            ]), b.set_children(s, [(b"f", f)])),
     r"symlink target \[\d+, \+4096\] out of bounds"),
    (lambda b, r, s, f: (b.set_children(r, [(b"s", s), (b"t", s)])), "linked twice"),
    (lambda b, r, s, f: (b.set_children(r, [(b"s", s)]), b.set_children(s, [(b"f", f)]),
                         b.set_chunks(f, [Chunk(b"\1" * 32, 5, 10)])), "outside its file"),
    (lambda b, r, s, f: (b.set_children(r, [(b"s", s)]), b.set_children(s, [(b"f", f)]),
                         b.set_chunks(f, [Chunk(b"\1" * 32, 0, 4), Chunk(b"\2" * 32, 2, 4)])), "overlaps"),
])
def test_hostile_indexes_are_refused(mutate, message):
    with pytest.raises(BadIndex, match=message):
        Index(hostile(mutate)).validate()


def patch_column(data: bytes, column: str, row: int, value: int, width: int = 4) -> bytes:
    import json

    header_len = int.from_bytes(data[8:12], "little")
    offset = json.loads(data[12: 12 + header_len])["columns"][column][0] + 12 + header_len + row * width
    return data[:offset] + value.to_bytes(width, "little") + data[offset + width:]


def test_out_of_bounds_references_are_refused():
    good = hostile(lambda b, r, s, f: (b.set_children(r, [(b"s", s)]), b.set_children(s, [(b"f", f)])))
    with pytest.raises(BadIndex, match="inode 99 out of bounds"):
        Index(patch_column(good, "dirent_ino", 1, 99)).validate()
    with pytest.raises(BadIndex, match="chunks .* out of bounds"):
        Index(patch_column(good, "ref_count", 2, 1 << 30)).validate()
    with pytest.raises(BadIndex, match="dirents .* out of bounds"):
        Index(patch_column(good, "ref_count", 0, 1 << 30)).validate()
    with pytest.raises(BadIndex, match="no file type"):
        Index(patch_column(good, "mode", 2, 0o170644)).validate()


def test_hostile_headers_are_refused():
    good = hostile(lambda b, r, s, f: (b.set_children(r, [(b"s", s)]), b.set_children(s, [(b"f", f)])))
    Index(good).validate()
    with pytest.raises(BadIndex, match="magic"):
        Index(b"XXXX" + good[4:])
    with pytest.raises(BadIndex):
        Index(good[:40])
    header_len = int.from_bytes(good[8:12], "little")
    header = good[12: 12 + header_len]
    huge = header.replace(b'"entries":3', b'"entries":9999999')
    with pytest.raises(BadIndex, match="entries"):
        Index(good[:12] + huge.ljust(header_len) + good[12 + header_len:])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_corrupted_bytes_never_crash_the_reader(data):
    """Any single-byte change is either refused with BadIndex or still a consistent index: no other exception."""
    good = bytearray(hostile(lambda b, r, s, f: (b.set_children(r, [(b"s", s), (b"z", f)]),
                                                 b.set_children(s, [(b"f", f)]))))
    position = data.draw(st.integers(0, len(good) - 1))
    good[position] = data.draw(st.integers(0, 255))
    try:
        index = Index(bytes(good))
        index.validate()
    except BadIndex:
        return
    for path, ino in index.walk():  # what validates can be walked and read without errors
        index.attributes(ino)
        if stat.S_ISREG(index.mode(ino)):
            index.chunks(ino)



def two_files() -> bytes:
    """root/{a,b}: two files of one chunk each."""
    builder = IndexBuilder()
    root = builder.add(mode=DIR)
    a = builder.add(mode=REG, size=4, chunks=[Chunk(b"\1" * 32, 0, 4)])
    b = builder.add(mode=REG, size=4, chunks=[Chunk(b"\2" * 32, 0, 4)])
    builder.set_children(root, [(b"a", a), (b"b", b)])
    return builder.build()


def test_ranges_must_follow_one_another():
    """Each chunk and dirent belongs to exactly one entry, laid out in inode order as IndexBuilder writes them."""
    Index(two_files()).validate()
    with pytest.raises(BadIndex, match=r"entries\[3\].*chunks \[0, \+1\] do not follow"):
        Index(patch_column(two_files(), "ref_first", 2, 0, width=8)).validate()  # b's chunk is a's
    with pytest.raises(BadIndex, match="1 of them belong to no entry"):
        Index(patch_column(two_files(), "ref_count", 2, 0)).validate()  # b has none: its chunk is no one's
    nested = hostile(lambda b, r, s, f: (b.set_children(r, [(b"s", s)]), b.set_children(s, [(b"f", f)])))
    with pytest.raises(BadIndex, match=r"entries\[1\].*dirents \[1, \+1\] do not follow"):
        Index(patch_column(nested, "ref_first", 0, 1, width=8)).validate()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40),  # a file's size, then its chunks' (offset, length)
                          st.lists(st.tuples(st.integers(0, 40), st.integers(1, 12)), max_size=4)), max_size=6))
def test_chunk_layouts_are_checked_as_each_file_reads_them(files):
    """The column-wide chunk check refuses exactly the files whose chunks a reader could not take in order: each
    starting at or after the end of the one before, all inside the file."""
    builder = IndexBuilder()
    root = builder.add(mode=DIR)
    children = []
    for number, (size, chunks) in enumerate(files):
        children.append((b"f%d" % number, builder.add(mode=REG, size=size, chunks=[
            Chunk(bytes([number, position]) * 16, offset, length) for position, (offset, length) in enumerate(chunks)])))
    builder.set_children(root, children)

    def readable(size, chunks):
        end = 0
        for offset, length in chunks:
            if offset < end or offset + length > size:
                return False
            end = offset + length
        return True

    index = Index(builder.build())
    if all(readable(size, chunks) for size, chunks in files):
        index.validate()
    else:
        with pytest.raises(BadIndex, match="overlaps or lies outside its file"):
            index.validate()


def linked_tree() -> tuple[Index, dict[str, int]]:
    """root/{a/y, b/x, b/z, c}: x and y are one file (its parent is b, its first name in a walk a/y)."""
    builder = IndexBuilder()
    root = builder.add(mode=DIR)
    a = builder.add(mode=DIR, parent=root)
    b = builder.add(mode=DIR, parent=root)
    linked = builder.add(mode=REG, size=1, parent=b, chunks=[Chunk(b"\1" * 32, 0, 1)])
    single = builder.add(mode=REG, size=1, parent=b, chunks=[Chunk(b"\2" * 32, 0, 1)])
    top = builder.add(mode=REG, size=0, parent=root)
    builder.set_children(root, [(b"a", a), (b"b", b), (b"c", top)])
    builder.set_children(a, [(b"y", linked)])
    builder.set_children(b, [(b"x", linked), (b"z", single)])
    index = Index(builder.build())
    index.validate()
    return index, {"linked": linked, "single": single, "top": top}


def test_redirect_paths_of_some_files():
    index, files = linked_tree()
    assert redirect_paths(index) == {files["linked"]: b"/a/y", files["single"]: b"/b/z", files["top"]: b"/c"}
    assert redirect_paths(index, [files["single"], files["top"]]) == {files["single"]: b"/b/z", files["top"]: b"/c"}
    assert redirect_paths(index, [files["linked"]]) == {files["linked"]: b"/a/y"}  # a hard link: a walk decides


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(), st.data())
def test_redirect_paths_of_some_files_match_a_walk(tree, data):
    index = Index(build(tree)[0])
    index.validate()
    every = redirect_paths(index)
    some = data.draw(st.lists(st.sampled_from(sorted(every)), unique=True)) if every else []
    assert redirect_paths(index, some) == {ino: every[ino] for ino in some}


# --- start-up profiles ---------------------------------------------------------------------------------------------

def profiled_index() -> tuple[Index, list[Chunk], list[Chunk]]:
    """root/{whole (2 chunks), part (3 chunks)}: (index, whole's chunks, part's chunks)."""
    builder = IndexBuilder()
    root = builder.add(mode=DIR)
    whole = [Chunk(bytes([1, k]) * 16, 10 * k, 10) for k in range(2)]
    part = [Chunk(bytes([2, k]) * 16, 10 * k, 10) for k in range(3)]
    a = builder.add(mode=REG, size=20, chunks=whole)
    b = builder.add(mode=REG, size=30, chunks=part)
    builder.set_children(root, [(b"part", b), (b"whole", a)])
    index = Index(builder.build())
    index.validate()
    return index, whole, part


def stored_chunks(chunks):
    """A `stored_chunk` for `ProfileRecorder.serialize`: made-up stored bytes, one chunk left out."""
    stored = {chunk.digest: bytes([k + 1]) * (k + 3) for k, chunk in enumerate(chunks)}
    return lambda chunk: stored.get(chunk.digest)


def test_profile_round_trip_packs_its_chunks_in_first_access_order():
    index, whole, part = profiled_index()
    recorder = ProfileRecorder()
    for ino, position in [(2, 1), (3, 2), (2, 0), (2, 1), (99, 0), (3, 7), (3, 0)]:
        recorder.note(ino, position)
    image = objects.digest_of(b"a metadata image")
    data = recorder.serialize(index, stored_chunks([whole[1], part[2], whole[0]]), image)  # part[0] is not had
    assert metadata_image(data) == image
    # What does not fit the image (inode 99, chunk 7 of a 3-chunk file) is dropped when read.
    assert parse_profile(data, index) == [(2, whole[1]), (3, part[2]), (2, whole[0]), (3, part[0])]
    assert files_read_whole(parse_profile(data, index), index) == {2: whole}
    packed = packed_chunks(data)
    assert [(chunk.digest, chunk.length, chunk.stored, chunk.hot) for chunk in packed] == [
        (whole[1].digest, 10, 3, True), (part[2].digest, 10, 4, False), (whole[0].digest, 10, 5, True)]
    for chunk, expected in zip(packed, [b"\1" * 3, b"\2" * 4, b"\3" * 5]):
        assert data[chunk.offset: chunk.offset + chunk.stored] == expected
    assert packed[-1].offset + packed[-1].stored == len(data)
    # The head alone reads the same; the pack's offsets stay those of the file.
    head = data[:packed[0].offset]
    assert packed_chunks(head) == packed and parse_profile(head, index) == parse_profile(data, index)


def test_a_packed_chunk_out_of_bounds_is_left_out_and_the_rest_keep_their_place():
    index, whole, _ = profiled_index()
    table = b"".join(struct.pack("<32sIIB", digest, length, stored, 1) for digest, length, stored in [
        (whole[0].digest, MAX_CHUNK_SIZE + 1, 7), (whole[1].digest, 10, 5)])
    frame = objects.compress(bytes(32) + (0).to_bytes(4, "little") + (2).to_bytes(4, "little") + table)
    head = PROFILE_MAGIC + len(frame).to_bytes(4, "little") + frame
    assert packed_chunks(head) == [PackedChunk(whole[1].digest, 10, len(head) + 7, 5, True)]
    assert metadata_image(head) is None


def test_the_head_is_read_in_ranges_from_a_store(tmp_path, monkeypatch):
    index, whole, part = profiled_index()
    store = LocalStore(str(tmp_path))
    assert fetch_head(store, "ab" * 32) is None
    recorder = ProfileRecorder()
    for position in range(3):
        recorder.note(3, position)
    data = recorder.serialize(index, stored_chunks(part))
    store.put_named(profile_name("ab" * 32), data)
    head_size = packed_chunks(data)[0].offset
    for first_read in (head_size, 16):  # the head read at once, or in a second read
        monkeypatch.setattr(profile, "HEAD_READ", first_read)
        assert fetch_head(store, "ab" * 32) == data[:head_size]
    store.put_named(profile_name("ab" * 32), data[:head_size - 1])
    with pytest.raises(FsError, match="truncated"):
        fetch_head(store, "ab" * 32)


def frame(payload):
    return len(payload).to_bytes(4, "little") + payload


@pytest.mark.parametrize("data, message", [
    (b"not a profile", "not a coldbrew profile"),
    (b"CBPROF\x00\x03" + frame(objects.compress(b"")), "not a coldbrew profile of this version"),
    (PROFILE_MAGIC + frame(b"garbage"), "not a zstd frame"),
    (PROFILE_MAGIC + frame(objects.compress(bytes(32) + b"\1\0")), "truncated"),
    (PROFILE_MAGIC + frame(objects.compress(bytes(32) + (5).to_bytes(4, "little") + b"\0" * 8)), "fewer pairs"),
    (PROFILE_MAGIC + (1 << 30).to_bytes(4, "little"), "too large"),
])
def test_bad_profiles_are_refused(data, message):
    index, _, _ = profiled_index()
    with pytest.raises(FsError, match=message):
        parse_profile(data, index)
    with pytest.raises(FsError, match=message):
        packed_chunks(data)
    with pytest.raises(FsError, match=message):
        metadata_image(data)


def test_a_profile_larger_than_its_image_allows_is_refused_before_it_is_decompressed():
    index, _, _ = profiled_index()  # 5 chunks: image, pairs and table of at most 285 bytes
    claims = PROFILE_MAGIC + frame(zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 5000))
    with pytest.raises(FsError, match="claims 5000 bytes, at most 285"):
        parse_profile(claims, index)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_corrupted_profiles_never_crash_the_reader(data):
    index, whole, part = profiled_index()
    recorder = ProfileRecorder()
    for ino, position in [(2, 0), (2, 1), (3, 1)]:
        recorder.note(ino, position)
    damaged = bytearray(recorder.serialize(index, stored_chunks([*whole, *part])))
    position = data.draw(st.integers(0, len(damaged) - 1))
    damaged[position] = data.draw(st.integers(0, 255))
    try:
        pairs = parse_profile(bytes(damaged), index)
        packed = packed_chunks(bytes(damaged))
        image = metadata_image(bytes(damaged))
    except FsError:
        return
    assert image is None or len(image) == objects.DIGEST_SIZE
    assert all(1 <= ino <= index.entries for ino, _ in pairs)
    assert all(len(chunk.digest) == objects.DIGEST_SIZE and 0 < chunk.length <= MAX_CHUNK_SIZE
               and 0 < chunk.stored <= MAX_STORED_SIZE for chunk in packed)
    assert all(b.offset >= a.offset + a.stored for a, b in zip(packed, packed[1:]))

# --- push ----------------------------------------------------------------------------------------------------------

def make_tree(root):
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "small").write_bytes(b"small file")
    (root / "empty").write_bytes(b"")
    (root / "exact").write_bytes(os.urandom(1 << 20))
    (root / "plus1").write_bytes((root / "exact").read_bytes() + b"!")
    os.link(root / "dir" / "small", root / "dir" / "sub" / "hardlink")
    os.symlink("../small", root / "dir" / "sub" / "link")
    with open(root / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.seek(5 << 20)
        f.write(b"island")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.setxattr(root / "dir" / "small", "user.origin", b"test")
    os.chown(root / "dir" / "small", 1234, 5678, follow_symlinks=False)


def test_push_keeps_metadata_and_data(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    make_tree(tree)
    store = LocalStore(str(tmp_path / "store"))
    result = push(str(tree), store)
    index = load(store, result.reference)
    inodes = dict(index.walk())
    for path, ino in inodes.items():
        st_ = os.lstat(tree / os.fsdecode(path)) if path else os.lstat(tree)
        attributes = index.attributes(ino)
        assert (attributes.mode, attributes.uid, attributes.gid, attributes.mtime_ns) == \
               (st_.st_mode, st_.st_uid, st_.st_gid, st_.st_mtime_ns), path
        assert attributes.nlink == st_.st_nlink, path
        if stat.S_ISREG(st_.st_mode):
            assert attributes.size == st_.st_size
            content = bytearray(st_.st_size)
            for chunk in index.chunks(ino):
                raw = objects.decode(chunk.digest, store.get(chunk.digest), chunk.length)
                content[chunk.offset: chunk.offset + chunk.length] = raw
            assert bytes(content) == (tree / os.fsdecode(path)).read_bytes(), path
    assert inodes[b"dir/small"] == inodes[b"dir/sub/hardlink"]
    assert index.symlink_target(inodes[b"dir/sub/link"]) == b"../small"
    assert index.xattrs(inodes[b"dir/small"]) == {b"user.origin": b"test"}
    assert index.attributes(inodes[b"null"]).rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO(index.mode(inodes[b"fifo"]))
    # the hole is not stored: one small chunk holds the island
    sparse = index.chunks(inodes[b"sparse"])
    assert sum(c.length for c in sparse) < 1 << 20 and any(c.offset <= 5 << 20 < c.offset + c.length for c in sparse)
    assert [c.length for c in index.chunks(inodes[b"exact"])] == [1 << 20]
    assert [c.length for c in index.chunks(inodes[b"plus1"])] == [1 << 20, 1]


def test_push_dedupes_across_files_and_images(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    payload = os.urandom(3 << 20)
    (tree / "a").write_bytes(payload)
    (tree / "b").write_bytes(payload)  # same data, another file
    store = LocalStore(str(tmp_path / "store"))
    first = push(str(tree), store)
    assert first.chunks == 6 and first.unique_chunks == 3 and first.uploaded_chunks == 3
    again = push(str(tree), store)
    assert again.reference == first.reference and again.uploaded_chunks == 0 and again.uploaded_bytes == 0
    (tree / "c").write_bytes(b"one new file")
    second = push(str(tree), store)
    assert second.reference != first.reference and second.uploaded_chunks == 1
    assert len(list((tmp_path / "store").rglob("*"))) > 0


def test_push_refuses_what_is_not_a_directory(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    from coldbrew.fs.errors import FsError

    with pytest.raises(FsError, match="not a directory"):
        push(str(tmp_path / "file"), LocalStore(str(tmp_path / "store")))
