"""Container networking against the real kernel: loopback bring-up, veth attach/detach through a bridge.

Every namespace here belongs to a process this file forks; every link is on a bridge this file names, and all
traffic goes to 127.0.0.1 inside a private namespace or to addresses on that bridge.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

import pytest
from hypothesis import given, strategies as st
from pyroute2 import IPRoute

from coldbrew.runtime import init, libc, network
from coldbrew.runtime.errors import RuntimeFailure, SpecError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

IFF_UP = 0x1


def _fork(body: Callable[[], Any], *, timeout: float = 10.0) -> Any:
    """Run `body` in a forked child and return what it returned (JSON); re-raise its failure here."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            try:
                out = {"ok": body()}
            except BaseException as err:  # reported to the parent, which fails the test
                out = {"error": repr(err)}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        data = b""
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError("forked child timed out")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    result = json.loads(data)
    assert "error" not in result, result["error"]
    return result["ok"]


class NetnsHolder:
    """A child process asleep in a network namespace of its own, until stop()."""

    def __init__(self) -> None:
        ready_r, ready_w = os.pipe()
        self._hold_r, self._hold_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
                libc.unshare(libc.CLONE_NEWNET)
                os.write(ready_w, b"r")
                os.close(self._hold_w)
                os.read(self._hold_r, 1)  # returns when the parent closes its end (or dies)
            finally:
                os._exit(0)
        os.close(ready_w)
        os.close(self._hold_r)
        ok = os.read(ready_r, 1)
        os.close(ready_r)
        if ok != b"r":
            self.stop()
            raise AssertionError("netns holder failed to unshare")
        self.path = f"/proc/{self.pid}/ns/net"

    def stop(self) -> None:
        if self.pid:
            os.close(self._hold_w)
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            self.pid = 0

    def run(self, body: Callable[[], Any]) -> Any:
        """Run `body` in a forked child that has joined this namespace."""
        path = self.path

        def joined() -> Any:
            fd = os.open(path, os.O_RDONLY)
            libc.setns(fd, libc.CLONE_NEWNET)
            os.close(fd)
            return body()

        return _fork(joined)

    def links(self) -> dict[str, dict[str, Any]]:
        return self.run(_describe_links)


def _describe_links() -> dict[str, dict[str, Any]]:
    """Links, addresses and IPv4/IPv6 default routes of the current namespace, as plain data."""
    with IPRoute() as ipr:
        links = {link.get_attr("IFLA_IFNAME"): {"index": link["index"], "flags": link["flags"],
                                                "mtu": link.get_attr("IFLA_MTU"), "addresses": [], "gateways": []}
                 for link in ipr.get_links()}
        by_index = {v["index"]: v for v in links.values()}
        for addr in ipr.get_addr():
            by_index[addr["index"]]["addresses"].append(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}")
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ipr.get_routes(family=family):
                if route["dst_len"] == 0 and route.get_attr("RTA_GATEWAY"):
                    by_index[route.get_attr("RTA_OIF")]["gateways"].append(route.get_attr("RTA_GATEWAY"))
    return links


def _host_links() -> dict[str, dict[str, Any]]:
    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME"): {"index": link["index"], "master": link.get_attr("IFLA_MASTER"),
                                               "flags": link["flags"], "mtu": link.get_attr("IFLA_MTU")}
                for link in ipr.get_links()}


def _connect_from(holder: NetnsHolder, host: str, *, family: int = socket.AF_INET) -> None:
    """A TCP connection from inside `holder`'s namespace to a listener on `host` in this namespace."""
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def connect() -> bool:
            with socket.create_connection((host, port), timeout=5) as conn:
                conn.sendall(b"hello from the container")
            return True

        assert holder.run(connect)
        listener.settimeout(5)
        conn, peer = listener.accept()
        with conn:
            assert conn.recv(100) == b"hello from the container"


@pytest.fixture
def holder() -> Iterator[NetnsHolder]:
    h = NetnsHolder()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture
def holder2() -> Iterator[NetnsHolder]:
    h = NetnsHolder()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture
def bridge() -> Iterator[str]:
    """A bridge name private to this test; teardown removes it and any port left on it."""
    name = "cbt" + os.urandom(3).hex()
    try:
        yield name
    finally:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if found:
                for link in ipr.get_links():
                    if link.get_attr("IFLA_MASTER") == found[0]:
                        ipr.link("del", index=link["index"])
                ipr.link("del", index=found[0])


@pytest.fixture
def subnet() -> ipaddress.IPv4Network:
    # A /24 from a private range the host does not route, picked per test so that runs never share one.
    return ipaddress.ip_network(f"10.252.{int.from_bytes(os.urandom(1), 'big')}.0/24")


def _attach(holder: NetnsHolder, bridge: str, subnet: ipaddress.IPv4Network, host: int, **kw: Any) -> network.Attachment:
    return network.attach(holder.pid, bridge=bridge, address=f"{subnet[host]}/{subnet.prefixlen}",
                          gateway=str(subnet[1]), **kw)


# --- loopback -------------------------------------------------------------------------------------------------


def test_bring_up_loopback_in_fresh_netns() -> None:
    def body() -> dict[str, Any]:
        libc.unshare(libc.CLONE_NEWNET)
        probe = socket.socket()
        try:
            probe.connect(("127.0.0.1", 9))
            before = 0
        except OSError as err:
            before = err.errno
        finally:
            probe.close()
        init.bring_up_loopback()
        init.bring_up_loopback()  # already up: a no-op, not an error
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            with socket.create_connection(listener.getsockname(), timeout=2) as conn:
                conn.sendall(b"ping")
                peer, _ = listener.accept()
                with peer:
                    echoed = peer.recv(4)
        return {"before": before, "echoed": echoed.decode(), "links": _describe_links()}

    result = _fork(body)
    assert result["before"] == errno.ENETUNREACH  # lo really was down in the new namespace
    lo = result["links"]["lo"]
    assert lo["flags"] & IFF_UP
    assert "127.0.0.1/8" in lo["addresses"]
    assert result["echoed"] == "ping"


def test_import_is_cheap() -> None:
    code = ("import sys, coldbrew.runtime.network\n"
            "heavy = [m for m in ('pyroute2', 'socket', 'threading') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


# --- attach / detach ------------------------------------------------------------------------------------------


def test_attach_configures_container_end_and_reaches_gateway(holder: NetnsHolder, bridge: str,
                                                             subnet: ipaddress.IPv4Network) -> None:
    before = _host_links()
    fds_before = len(os.listdir("/proc/self/fd"))
    att = _attach(holder, bridge, subnet, 2, mtu=1450)
    assert len(att.host_ifname) <= 15 and att.host_ifname not in before
    assert (att.ifname, att.bridge, att.address, att.gateway) == ("eth0", bridge, f"{subnet[2]}/24", str(subnet[1]))

    inside = holder.links()
    assert sorted(inside) == ["eth0", "lo"]
    eth0 = inside["eth0"]
    assert eth0["flags"] & IFF_UP
    assert f"{subnet[2]}/24" in eth0["addresses"]
    assert eth0["gateways"] == [str(subnet[1])]
    assert eth0["mtu"] == 1450

    host = _host_links()
    assert host[bridge]["flags"] & IFF_UP
    assert host[att.host_ifname]["master"] == host[bridge]["index"]
    assert host[att.host_ifname]["flags"] & IFF_UP
    assert host[att.host_ifname]["mtu"] == 1450
    _connect_from(holder, str(subnet[1]))

    # The record survives state.json, and the copy read back is enough to undo everything.
    network.detach(network.Attachment.from_dict(json.loads(json.dumps(att.to_dict()))))
    after = _host_links()
    made = {host[bridge]["index"], host[att.host_ifname]["index"]}
    assert bridge not in after and att.host_ifname not in after
    assert not made & {link["index"] for link in after.values()}
    assert sorted(holder.links()) == ["lo"]
    network.detach(att)  # already gone: not an error
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_attach_by_path_with_ipv6(holder: NetnsHolder, bridge: str) -> None:
    att = network.attach(holder.path, bridge=bridge, address="fd00:c01d:b4e::2/64", gateway="fd00:c01d:b4e::1",
                         ifname="net0", host_ifname=bridge + "h")
    try:
        assert att.host_ifname == bridge + "h"
        assert holder.links()["net0"]["gateways"] == ["fd00:c01d:b4e::1"]
        _connect_from(holder, "fd00:c01d:b4e::1", family=socket.AF_INET6)
    finally:
        network.detach(att)
    assert bridge not in _host_links()


def test_two_attachments_share_the_bridge(holder: NetnsHolder, holder2: NetnsHolder, bridge: str,
                                          subnet: ipaddress.IPv4Network) -> None:
    first = _attach(holder, bridge, subnet, 2)
    second = _attach(holder2, bridge, subnet, 3)
    assert first.host_ifname != second.host_ifname
    network.detach(first)
    host = _host_links()
    assert first.host_ifname not in host
    assert host[second.host_ifname]["master"] == host[bridge]["index"]
    _connect_from(holder2, str(subnet[1]))
    network.detach(second)
    assert bridge not in _host_links()  # the last detach removes the bridge attach() created


def test_detach_keeps_a_bridge_it_did_not_create(holder: NetnsHolder, bridge: str,
                                                 subnet: ipaddress.IPv4Network) -> None:
    with IPRoute() as ipr:
        ipr.link("add", ifname=bridge, kind="bridge")
        index = ipr.link_lookup(ifname=bridge)[0]
        ipr.addr("add", index=index, address=str(subnet[1]), prefixlen=24)
    att = _attach(holder, bridge, subnet, 2)
    _connect_from(holder, str(subnet[1]))  # attach brought the existing bridge up
    network.detach(att)
    host = _host_links()
    assert host[bridge]["index"] == index
    assert att.host_ifname not in host


def test_detach_after_the_container_netns_died(bridge: str, subnet: ipaddress.IPv4Network) -> None:
    holder = NetnsHolder()
    try:
        att = _attach(holder, bridge, subnet, 2)
    finally:
        holder.stop()
    network.detach(att)
    host = _host_links()
    assert bridge not in host and att.host_ifname not in host


# --- refusals leave nothing behind ----------------------------------------------------------------------------


def test_attach_to_dead_process_netns(bridge: str) -> None:
    holder = NetnsHolder()
    pid = holder.pid
    holder.stop()
    before = set(_host_links())
    with pytest.raises(RuntimeFailure, match=rf"/proc/{pid}/ns/net does not exist"):
        network.attach(pid, bridge=bridge, host_ifname=bridge + "h")
    assert set(_host_links()) - before == set()
    assert bridge not in _host_links()


def test_ifname_taken_removes_the_new_bridge(holder: NetnsHolder, bridge: str,
                                             subnet: ipaddress.IPv4Network) -> None:
    with pytest.raises(RuntimeFailure, match=r"interface lo already exists in network namespace"):
        _attach(holder, bridge, subnet, 2, ifname="lo", host_ifname=bridge + "h")
    host = _host_links()
    assert bridge not in host and bridge + "h" not in host
    assert sorted(holder.links()) == ["lo"]


def test_host_ifname_taken(holder: NetnsHolder, bridge: str, subnet: ipaddress.IPv4Network) -> None:
    before = _host_links()
    with pytest.raises(RuntimeFailure, match=r"host interface lo already exists"):
        _attach(holder, bridge, subnet, 2, host_ifname="lo")
    after = _host_links()
    assert bridge not in after
    assert after["lo"] == before["lo"]
    assert sorted(holder.links()) == ["lo"]


def test_failure_after_the_veth_exists_removes_everything(holder: NetnsHolder, bridge: str,
                                                          subnet: ipaddress.IPv4Network) -> None:
    # The namespace already has a default route, so the last step of attach fails.
    with IPRoute(netns=holder.path, flags=0) as ipr:
        ipr.link("set", index=1, state="up")
        ipr.route("add", dst="0.0.0.0/0", oif=1, scope=253)
    with pytest.raises(RuntimeFailure, match=r"default route .* one already exists"):
        _attach(holder, bridge, subnet, 2, host_ifname=bridge + "h")
    host = _host_links()
    assert bridge not in host and bridge + "h" not in host
    assert sorted(holder.links()) == ["lo"]


def test_existing_non_bridge_is_refused(holder: NetnsHolder, bridge: str, subnet: ipaddress.IPv4Network) -> None:
    with pytest.raises(RuntimeFailure, match=r"lo exists and is not a bridge"):
        network.attach(holder.pid, bridge="lo", address=f"{subnet[2]}/24", gateway=str(subnet[1]),
                       host_ifname=bridge + "h")
    assert bridge + "h" not in _host_links()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"address": "10.252.0.2"}, "address"),
    ({"address": "10.252.0.300/24"}, "address"),
    ({"address": "10.252.0.0/24"}, "address"),
    ({"address": "10.252.0.255/24"}, "address"),
    ({"address": "127.0.0.2/8", "gateway": "127.0.0.1"}, "address"),
    ({"address": "10.252.0.2/24", "gateway": "10.252.1.1"}, "gateway"),
    ({"address": "10.252.0.2/24", "gateway": "10.252.0.2"}, "gateway"),
    ({"address": "10.252.0.2/24", "gateway": "fd00::1"}, "gateway"),
    ({"address": "10.252.0.2/24", "gateway": "nope"}, "gateway"),
    ({"ifname": "a-name-too-long0"}, "ifname"),
    ({"ifname": "eth/0"}, "ifname"),
    ({"ifname": ""}, "ifname"),
    ({"host_ifname": "has space"}, "host_ifname"),
    ({"bridge": ".."}, "bridge"),
    ({"mtu": 67}, "mtu"),
    ({"mtu": 70000}, "mtu"),
    ({"mtu": True}, "mtu"),
])
def test_bad_arguments_name_the_field(holder: NetnsHolder, kwargs: dict[str, Any], field: str) -> None:
    before = set(_host_links())
    with pytest.raises(SpecError) as caught:
        network.attach(holder.pid, **{"bridge": "cbtbad0", **kwargs})
    assert caught.value.path == field
    assert set(_host_links()) == before


@pytest.mark.parametrize(("netns", "error", "message"), [
    (True, SpecError, "neither a namespace path nor a pid"),
    (0, SpecError, "is not a pid"),
    ("/nonexistent/netns", RuntimeFailure, "does not exist"),
    ("/proc/self/ns/mnt", RuntimeFailure, "is not a network namespace"),
    ("/proc/self/ns/net", RuntimeFailure, "runtime's own network namespace"),
])
def test_bad_netns_is_refused(netns: Any, error: type[Exception], message: str) -> None:
    before = set(_host_links())
    with pytest.raises(error, match=message):
        network.attach(netns, bridge="cbtbad0")
    assert set(_host_links()) == before


def test_from_dict_refuses_a_malformed_record() -> None:
    with pytest.raises(RuntimeFailure, match="malformed network attachment"):
        network.Attachment.from_dict({"bridge": "coldbrew0"})


@given(prefix=st.integers(min_value=8, max_value=30), data=st.data())
def test_addresses_inside_the_subnet_are_accepted(prefix: int, data: st.DataObject) -> None:
    net = ipaddress.ip_network(f"10.0.0.0/{prefix}")
    hosts = st.integers(min_value=1, max_value=net.num_addresses - 2)
    host, gw = data.draw(st.tuples(hosts, hosts).filter(lambda pair: pair[0] != pair[1]))
    iface, gateway = network._parse_addresses(f"{net[host]}/{prefix}", str(net[gw]))
    assert (iface.ip, iface.network, gateway) == (net[host], net, net[gw])
    outside = net.broadcast_address + 1
    with pytest.raises(SpecError) as caught:
        network._parse_addresses(f"{net[host]}/{prefix}", str(outside))
    assert caught.value.path == "gateway"
