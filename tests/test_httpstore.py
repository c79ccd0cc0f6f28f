"""HttpStore against Debian's real nginx on loopback: uploads by WebDAV PUT, reads by GET, failures and recovery."""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from coldbrew.bench.nginx import NginxError, NginxServer
from coldbrew.fs import objects
from coldbrew.fs.cache import fetch_index
from coldbrew.fs.errors import ChunkMissing, CorruptChunk, StoreUnavailable
from coldbrew.fs.httpstore import HttpStore
from coldbrew.fs.store import LocalStore, object_path


def _objects(count: int, size: int = 4096) -> list[tuple[bytes, bytes, bytes]]:
    """(digest, stored, raw) of `count` distinct objects."""
    result = []
    for index in range(count):
        raw = index.to_bytes(4, "big") * (size // 4) + os.urandom(64)
        digest, stored = objects.encode(raw)
        result.append((digest, stored, raw))
    return result


@pytest.fixture
def served(tmp_path: Path):
    root = tmp_path / "store"
    root.mkdir()
    with NginxServer(str(root), webdav_put=True, access_log=True) as server:
        yield root, server


def test_put_get_has_round_trip(served) -> None:
    root, server = served
    store = HttpStore(server.url)
    (digest, stored, raw), = _objects(1, 1 << 20)
    assert not store.has(digest)
    store.put(digest, stored)
    assert store.has(digest)
    assert objects.decode(digest, store.get(digest), len(raw)) == raw
    # The object lies where LocalStore would put it: the directory is a LocalStore too.
    assert (root / object_path(digest)).read_bytes() == stored
    assert LocalStore(str(root)).get(digest) == stored
    # A second put of an immutable object asks, and does not upload again.
    store.put(digest, stored)
    methods = [method for method, path, _status in server.requests() if path.endswith(digest.hex())]
    assert methods == ["HEAD", "HEAD", "PUT", "HEAD", "GET", "HEAD"]
    assert store.describe() == server.url


def test_missing_object_is_chunk_missing(served) -> None:
    _root, server = served
    store = HttpStore(server.url)
    digest = objects.digest_of(b"never stored")
    assert not store.has(digest)
    with pytest.raises(ChunkMissing) as caught:
        store.get(digest)
    assert digest.hex() in str(caught.value) and server.url in str(caught.value)
    # A 404 is an answer, not a failure: asked once, not retried.
    assert [method for method, _path, _status in server.requests()] == ["HEAD", "GET"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "other object"])
def test_corrupt_object_behind_nginx_is_refused_by_decode(served, damage: str) -> None:
    root, server = served
    store = HttpStore(server.url)
    (digest, stored, raw), (other_digest, other_stored, _other_raw) = _objects(2)
    store.put(digest, stored)
    path = root / object_path(digest)
    if damage == "flip":
        broken = bytearray(stored)
        broken[len(broken) // 2] ^= 0xFF
        path.write_bytes(bytes(broken))
    elif damage == "truncate":
        path.write_bytes(stored[: len(stored) // 2])
    else:
        path.write_bytes(other_stored)
    served_bytes = store.get(digest)
    assert served_bytes == path.read_bytes()  # the store hands over what it got; verifying is decode's job
    with pytest.raises(CorruptChunk) as caught:
        objects.decode(digest, served_bytes, len(raw))
    assert digest.hex() in str(caught.value)
    for source in (store, LocalStore(str(root))):  # and as a stream, decoded while it arrives
        stream = source.stream(digest)
        with pytest.raises(CorruptChunk, match=digest.hex()):
            objects.decode_stream(digest, stream, len(raw))
        stream.close()


def test_an_object_streams_from_nginx_and_from_the_directory_alike(served) -> None:
    root, server = served
    store = HttpStore(server.url)
    (digest, stored, raw), = _objects(1, 3 << 20)
    store.put(digest, stored)
    for source in (store, LocalStore(str(root))):
        stream = source.stream(digest)
        assert objects.decode_stream(digest, stream, len(raw)) == raw
        assert stream.read(1) == b""  # read to its end: the connection goes back to the pool whole
        stream.close()
    with pytest.raises(ChunkMissing, match=server.url):
        store.stream(objects.digest_of(b"never stored"))
    with pytest.raises(ChunkMissing, match=str(root)):
        LocalStore(str(root)).stream(objects.digest_of(b"never stored"))
    methods = [method for method, path, _status in server.requests() if path.endswith(digest.hex())]
    assert methods == ["HEAD", "PUT", "GET"]


def test_an_index_broken_midway_is_fetched_again_whole() -> None:
    """`fetch_index` streams; a server that drops the connection halfway through the body gets asked again."""
    index = objects.encode(os.urandom(1 << 16))
    digest, stored = index
    requests: list[bytes] = []

    def serve(listener: socket.socket) -> None:
        for _ in range(2):
            connection, _ = listener.accept()
            with connection:
                requests.append(connection.recv(4096).split(b"\r\n", 1)[0])
                body = stored if len(requests) > 1 else stored[: len(stored) // 2]
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                                   % len(stored) + body)

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        server = threading.Thread(target=serve, args=(listener,))
        server.start()
        store = HttpStore(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=5)
        assert fetch_index(digest.hex(), store) == objects.decompress(stored, 1 << 20)
        server.join()
    assert requests == [f"GET /{object_path(digest)} HTTP/1.1".encode()] * 2


def test_stopped_server_is_unavailable_after_bounded_retries_then_recovers(served) -> None:
    _root, server = served
    store = HttpStore(server.url, retries=3)
    (digest, stored, raw), = _objects(1)
    store.put(digest, stored)
    assert store.get(digest) == stored  # leaves a kept-alive connection in the pool, which the stop breaks
    url = server.url
    server.stop()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        store.get(digest)
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert server.url in message and digest.hex() in message and "4 attempts" in message
    # Three backoffs (0.05 + 0.1 + 0.2 s) were waited, and no more than that plus refused connects.
    assert 0.3 <= elapsed < 2.0
    with pytest.raises(StoreUnavailable):
        store.has(digest)
    server.start()
    assert server.url == url  # same port: the store's URL is good again
    assert objects.decode(digest, store.get(digest), len(raw)) == raw


def test_silent_server_times_out_in_bounded_time() -> None:
    # A listener that never accepts: connects succeed (kernel backlog), answers never come.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        store = HttpStore(url, timeout=0.2, retries=1)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            store.get(objects.digest_of(b"x"))
        elapsed = time.monotonic() - started
    assert "timed out" in str(caught.value).lower() and "2 attempts" in str(caught.value)
    assert 0.4 <= elapsed < 2.0


def test_32_threads_at_once(served) -> None:
    _root, server = served
    store = HttpStore(server.url, pool_size=32)
    items = _objects(64)
    for digest, stored, _raw in items:
        store.put(digest, stored)
    barrier = threading.Barrier(32)

    def reader(worker: int) -> int:
        barrier.wait()
        checked = 0
        for step in range(len(items)):
            digest, _stored, raw = items[(worker + step) % len(items)]
            assert objects.decode(digest, store.get(digest), len(raw)) == raw
            checked += 1
        return checked

    with ThreadPoolExecutor(32) as pool:
        assert sum(pool.map(reader, range(32))) == 32 * 64
    gets = [status for method, _path, status in server.requests() if method == "GET"]
    assert gets == [200] * (32 * 64)


def test_local_store_directory_served_read_only(tmp_path: Path) -> None:
    root = tmp_path / "pushed"
    local = LocalStore(str(root))
    items = _objects(5)
    for digest, stored, _raw in items:
        local.put(digest, stored)
    with NginxServer(str(root)) as server:
        store = HttpStore(server.url)
        for digest, _stored, raw in items:
            assert store.has(digest)
            assert objects.decode(digest, store.get(digest), len(raw)) == raw
        # This server has no WebDAV: a push over HTTP says how to push instead.
        digest = objects.digest_of(b"new")
        with pytest.raises(StoreUnavailable, match="405.*push to its directory"):
            store.put(digest, objects.compress(b"new"))
        with pytest.raises(StoreUnavailable, match="read-only"):
            HttpStore(server.url, upload=False).put(digest, objects.compress(b"new"))


def test_store_under_a_url_path(tmp_path: Path) -> None:
    (tmp_path / "images" / "store").mkdir(parents=True)
    with NginxServer(str(tmp_path), webdav_put=True) as server:
        store = HttpStore(f"{server.url}/images/store/")
        (digest, stored, _raw), = _objects(1)
        store.put(digest, stored)
        assert (tmp_path / "images" / "store" / object_path(digest)).read_bytes() == stored
        assert store.get(digest) == stored


def test_bad_url_is_refused() -> None:
    with pytest.raises(StoreUnavailable, match="ftp://x"):
        HttpStore("ftp://x")


def test_nginx_root_with_spaces_and_private_upload_folder(tmp_path: Path) -> None:
    root = tmp_path / "a store with spaces"
    root.mkdir()
    with NginxServer(str(root), webdav_put=True) as server:
        uploads = [name for name in os.listdir(root) if name.startswith(".nginx-upload-")]
        assert len(uploads) == 1
        store = HttpStore(server.url)
        (digest, stored, _raw), = _objects(1)
        store.put(digest, stored)
        assert store.get(digest) == stored
        # Half-uploaded bodies are never served.
        with pytest.raises(StoreUnavailable, match="403"):
            HttpStore(f"{server.url}/{uploads[0]}").get(digest)
    assert os.listdir(root) == [object_path(digest).split("/")[0]]


def test_nginx_refuses_a_path_it_would_misread(tmp_path: Path) -> None:
    root = tmp_path / "cost$5"
    root.mkdir()
    with pytest.raises(NginxError, match=r"\$"):
        NginxServer(str(root))


def test_named_files_round_trip_over_webdav(tmp_path):
    from coldbrew.bench.nginx import NginxServer
    from coldbrew.fs.httpstore import HttpStore

    with NginxServer(str(tmp_path), webdav_put=True) as server:
        store = HttpStore(server.url)
        assert store.get_named("profiles/abc") is None
        store.put_named("profiles/abc", b"first")
        store.put_named("profiles/abc", b"second")  # named files are replaced, not immutable
        assert store.get_named("profiles/abc") == b"second"
        assert (tmp_path / "named" / "profiles" / "abc").read_bytes() == b"second"
        with pytest.raises(ValueError):
            store.get_named("../../etc/passwd")


def _read_all(stream) -> bytes:
    data = b""
    while part := stream.read(1000):
        data += part
    stream.close()
    return data


def test_named_files_are_read_in_ranges_the_same_from_nginx_and_the_directory(served) -> None:
    root, server = served
    store, local = HttpStore(server.url, pool_size=1), LocalStore(str(root))
    data = os.urandom(100_000)
    store.put_named("profiles/ranged", data)
    for reader in (store, local):
        assert reader.read_named("profiles/none", 0) is None
        assert _read_all(reader.read_named("profiles/ranged", 0)) == data
        assert _read_all(reader.read_named("profiles/ranged", 99_990)) == data[99_990:]
        assert _read_all(reader.read_named("profiles/ranged", 200_000)) == b""  # past the end: nothing
        # A range read to its end hands its connection back (one in the pool): the next request works.
        assert _read_all(reader.read_named("profiles/ranged", 5, 70_005))[:70_000] == data[5:70_005]
    partial = store.read_named("profiles/ranged", 0)
    assert partial.read(10) == data[:10]
    partial.close()  # the rest of the body is not read: that connection is closed, not reused
    assert store.get_named("profiles/ranged") == data
    assert ("GET", "/named/profiles/ranged", 206) in server.requests()

