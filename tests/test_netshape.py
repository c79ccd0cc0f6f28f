"""The shaped link: a namespace behind a veth pair with a rate limit and a round-trip delay, measured through a real
nginx running inside the namespace; and nothing of it left behind."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns

from coldbrew.bench.netshape import NetShapeError, ShapedLink, leftovers
from coldbrew.bench.nginx import NginxServer

BIG = 12 << 20


@pytest.fixture
def www(tmp_path: Path) -> Path:
    (tmp_path / "big").write_bytes(os.urandom(BIG))
    return tmp_path


@pytest.fixture(autouse=True)
def no_leftovers():
    before = leftovers()
    yield
    assert leftovers() == before


def _connect_ms(address: str, port: int, count: int = 25) -> float:
    """Shortest time of a TCP connect (one SYN / SYN-ACK round trip) in milliseconds: the delay is added in user
    space, so a busy machine only ever lengthens a sample, and the shortest one is the link's own."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        with socket.create_connection((address, port), timeout=5):
            times.append((time.perf_counter() - started) * 1000)
    return min(times)


def _get(address: str, port: int, path: str) -> tuple[int, float]:
    """Bytes of the body of one GET and the seconds it took, over a plain socket."""
    with socket.create_connection((address, port), timeout=10) as sock:
        started = time.perf_counter()
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        received = bytearray()
        while chunk := sock.recv(1 << 20):
            received += chunk
        elapsed = time.perf_counter() - started
    header, _, body = bytes(received).partition(b"\r\n\r\n")
    assert header.startswith(b"HTTP/1.1 200")
    return len(body), elapsed


@pytest.mark.parametrize("rtt_ms", [2.0, 10.0])
def test_round_trip_time(www: Path, rtt_ms: float) -> None:
    with ShapedLink(rate_bit=100e6, rtt_ms=rtt_ms) as link, \
            NginxServer(str(www), address=link.ns_address, netns=link.netns) as server:
        measured = _connect_ms(link.ns_address, server.port)
    # The delay is added in user space: it can only come out a little longer than asked, never shorter.
    assert rtt_ms * 0.95 <= measured <= rtt_ms + 1.5


def test_without_delay_the_link_is_fast(www: Path) -> None:
    with ShapedLink(rate_bit=100e6, rtt_ms=0) as link, \
            NginxServer(str(www), address=link.ns_address, netns=link.netns) as server:
        assert _connect_ms(link.ns_address, server.port) < 0.5


def test_throughput_is_limited_by_the_rate(www: Path) -> None:
    with ShapedLink(rate_bit=100e6, rtt_ms=2.0) as link, \
            NginxServer(str(www), address=link.ns_address, netns=link.netns) as server:
        size, seconds = _get(link.ns_address, server.port, "/big")
    assert size == BIG
    mbit_s = size * 8 / seconds / 1e6
    # Goodput under a 100 Mbit/s line: headers take ~5%, slow start a little more; the lower bound leaves room for
    # a busy machine starving the user-space delayer (the upper one is what shows the limit).
    assert 50 <= mbit_s <= 100


def test_the_rate_applies_to_uploads_too(www: Path) -> None:
    with ShapedLink(rate_bit=100e6, rtt_ms=2.0) as link, \
            NginxServer(str(www), address=link.ns_address, netns=link.netns, webdav_put=True) as server:
        body = os.urandom(BIG // 2)
        with socket.create_connection((link.ns_address, server.port), timeout=10) as sock:
            started = time.perf_counter()
            sock.sendall(f"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            answer = sock.recv(4096)
            seconds = time.perf_counter() - started
    assert answer.startswith(b"HTTP/1.1 201")
    assert (www / "up").read_bytes() == body
    assert 50 <= len(body) * 8 / seconds / 1e6 <= 100


def test_teardown_removes_everything_even_after_an_error(www: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with ShapedLink(rtt_ms=2.0) as link:
            name, host_ifname, delayer = link.netns, link.host_ifname, link._delayer
            assert name in netns.listnetns()
            with IPRoute() as ipr:
                assert ipr.link_lookup(ifname=host_ifname)
            assert delayer is not None and delayer.poll() is None
            raise RuntimeError("boom")
    assert name not in netns.listnetns()
    with IPRoute() as ipr:
        assert not ipr.link_lookup(ifname=host_ifname)
    assert delayer.poll() is not None


def test_failed_set_up_undoes_itself_and_leaves_other_links_alone() -> None:
    link = ShapedLink()
    with IPRoute() as ipr:
        # Someone else's interface already has the name the link wants: set-up fails half-way.
        ipr.link("add", ifname=link.host_ifname, kind="veth", peer={"ifname": f"x{link.host_ifname[1:]}"})
        try:
            with pytest.raises(Exception, match="exists"):
                link.__enter__()
            assert link.netns not in netns.listnetns()
            assert ipr.link_lookup(ifname=link.host_ifname)
        finally:
            ipr.link("del", ifname=link.host_ifname)


@pytest.mark.parametrize("kwargs", [{"rate_bit": 0}, {"rate_bit": 1e12}, {"rtt_ms": -1}])
def test_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(NetShapeError):
        ShapedLink(**kwargs)
