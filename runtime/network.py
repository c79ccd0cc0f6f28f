"""Container networking: a veth pair from a host bridge into the container's netns (the init brings up `lo`
itself, see coldbrew.runtime.init).

pyroute2 (about 300 ms to import) is loaded inside `attach` and `detach`, which run in the runtime.
"""

from __future__ import annotations

import errno
import fcntl
import os

from .errors import RuntimeFailure, SpecError
from .records import record

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: `typing` costs ~4 ms to import
    from typing import Any, Iterator

_NS_GET_NSTYPE = 0xB703  # ioctl on a namespace fd: its CLONE_NEW* type
_CLONE_NEWNET = 0x40000000  # libc.CLONE_NEWNET, without importing ctypes at module level
_IFNAMSIZ = 16
# Bridges that attach() creates carry this alias, so that the last detach removes them and never an admin's bridge.
_BRIDGE_ALIAS = "coldbrew"
# Serialises bridge creation and removal between concurrent runtime processes.
_LOCK_PATH = "/run/coldbrew-network.lock"


class Attachment(record("Attachment", "netns bridge host_ifname ifname address gateway mtu")):
    """What attach() made; stored in the container's state so that `delete` can undo it in another process."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attachment:
        try:
            return cls(**{name: data[name] for name in cls._fields})
        except (KeyError, TypeError) as err:
            raise RuntimeFailure(f"malformed network attachment record {data!r}: {err}") from err


def attach(netns: str | int, *, bridge: str = "coldbrew0", address: str = "10.88.0.2/16",
           gateway: str | None = "10.88.0.1", ifname: str = "eth0", mtu: int = 1500,
           host_ifname: str | None = None) -> Attachment:
    """Connect the network namespace `netns` (a path, or a pid) to `bridge` with a veth pair.

    The bridge is created (up, holding `gateway`) when missing. The container end is named `ifname`, gets
    `address` (CIDR) and a default route via `gateway`. Anything made is removed again if a later step fails.
    """
    iface, gw = _parse_addresses(address, gateway)
    _check_ifname("bridge", bridge)
    _check_ifname("ifname", ifname)
    if host_ifname is not None:
        _check_ifname("host_ifname", host_ifname)
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65535:
        raise SpecError("mtu", f"{mtu!r} is not an MTU between 68 and 65535")
    if host_ifname is None:
        host_ifname = "cbv" + os.urandom(4).hex()
    ns_path = _netns_path(netns)
    ns_fd = _open_netns(ns_path)

    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    attachment = Attachment(netns=ns_path, bridge=bridge, host_ifname=host_ifname, ifname=ifname,
                            address=str(iface), gateway=None if gw is None else str(gw), mtu=mtu)
    try:
        with IPRoute() as host, _ipr_in_netns(ns_fd, ns_path) as inner:
            with _host_lock():
                bridge_index = _ensure_bridge(host, bridge, iface, gw)
                try:
                    host.link("add", ifname=host_ifname, kind="veth", mtu=mtu, master=bridge_index,
                              peer={"ifname": ifname, "net_ns_fd": ns_fd, "mtu": mtu})
                except NetlinkError as err:
                    _remove_bridge_if_unused(host, bridge)
                    if err.code == errno.EEXIST:
                        raise _name_taken(host, inner, host_ifname, ifname, ns_path) from err
                    raise RuntimeFailure(f"cannot create veth pair {host_ifname} <-> {ifname} in {ns_path}: "
                                         f"{os.strerror(err.code)}") from err
            try:
                _configure_peer(host, inner, attachment, iface, gw)
            except BaseException:
                _remove(host, attachment)
                raise
    finally:
        os.close(ns_fd)
    return attachment


def detach(attachment: Attachment) -> None:
    """Remove the host veth (its peer goes with it) and the bridge if attach() made it and no port is left.

    Whatever is already gone (a dead container's netns takes its veth pair with it) is not an error.
    """
    from pyroute2 import IPRoute

    with IPRoute() as host:
        _remove(host, attachment)


def _parse_addresses(address: str, gateway: str | None) -> tuple[Any, Any]:
    import ipaddress

    if not isinstance(address, str) or "/" not in address:
        raise SpecError("address", f"{address!r} is not an address with a prefix length, like 10.88.0.2/16")
    try:
        iface = ipaddress.ip_interface(address)
    except ValueError as err:
        raise SpecError("address", f"{address!r} is not a valid address: {err}") from err
    _check_host_address("address", iface.ip, iface.network)
    if gateway is None:
        return iface, None
    try:
        gw = ipaddress.ip_address(gateway)
    except ValueError as err:
        raise SpecError("gateway", f"{gateway!r} is not a valid address: {err}") from err
    if gw.version != iface.version or gw not in iface.network:
        raise SpecError("gateway", f"{gateway} is not inside the container's network {iface.network}")
    if gw == iface.ip:
        raise SpecError("gateway", f"{gateway} is the container's own address")
    _check_host_address("gateway", gw, iface.network)
    return iface, gw


def _check_host_address(field: str, ip: Any, network: Any) -> None:
    if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local:
        raise SpecError(field, f"{ip} cannot be given to a container interface")
    # The network and broadcast addresses of an IPv4 subnet are not hosts (/31 and /32 have neither).
    if ip.version == 4 and network.prefixlen < 31 and ip in (network.network_address, network.broadcast_address):
        raise SpecError(field, f"{ip} is the network or broadcast address of {network}")


def _check_ifname(field: str, name: object) -> None:
    # The kernel's dev_valid_name(): at most 15 bytes, not "." or "..", no "/", ":" or white space.
    if (not isinstance(name, str) or not name or len(name.encode()) >= _IFNAMSIZ or name in (".", "..")
            or any(c in "/:" or c.isspace() for c in name)):
        raise SpecError(field, f"{name!r} is not a valid interface name (1-15 characters, no '/', ':' or spaces)")


def _netns_path(netns: str | int) -> str:
    if isinstance(netns, bool) or not isinstance(netns, (str, int)):
        raise SpecError("netns", f"{netns!r} is neither a namespace path nor a pid")
    if isinstance(netns, int):
        if netns <= 0:
            raise SpecError("netns", f"{netns} is not a pid")
        return f"/proc/{netns}/ns/net"
    return netns


def _open_netns(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise RuntimeFailure(f"network namespace {path} does not exist (has its process exited?)") from err
    except OSError as err:
        raise RuntimeFailure(f"cannot open network namespace {path}: {err.strerror}") from err
    try:
        try:
            nstype = fcntl.ioctl(fd, _NS_GET_NSTYPE)
        except OSError:
            nstype = None
        if nstype != _CLONE_NEWNET:
            raise RuntimeFailure(f"{path} is not a network namespace")
        own = os.stat("/proc/thread-self/ns/net")
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            raise RuntimeFailure(f"{path} is the runtime's own network namespace, not a container's")
    except BaseException:
        os.close(fd)
        raise
    return fd


class _ipr_in_netns:
    """An IPRoute whose netlink socket lives in the namespace `ns_fd`.

    A netlink socket belongs to the namespace of the thread that created it, and setns(CLONE_NEWNET) is allowed
    in a threaded process, so a short-lived thread joins the namespace and opens the socket; that costs about
    a millisecond where pyroute2's own netns support forks a process.
    """

    def __init__(self, ns_fd: int, ns_path: str) -> None:
        self.ns_fd = ns_fd
        self.ns_path = ns_path

    def __enter__(self) -> Any:
        import socket
        import threading

        from pyroute2 import IPRoute

        from . import libc

        made: list[socket.socket | BaseException] = []

        def open_inside() -> None:
            try:
                libc.setns(self.ns_fd, libc.CLONE_NEWNET)
                made.append(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                          socket.NETLINK_ROUTE))
            except BaseException as err:  # handed to the caller's thread
                made.append(err)

        thread = threading.Thread(target=open_inside, name="coldbrew-netns")
        thread.start()
        thread.join()
        if isinstance(made[0], BaseException):
            raise RuntimeFailure(f"cannot enter network namespace {self.ns_path}: {made[0]}") from made[0]
        sock = made[0]
        try:
            self.ipr = IPRoute(fileno=sock.fileno())
        except BaseException:
            sock.close()
            raise
        sock.detach()  # the IPRoute owns the fd now
        return self.ipr

    def __exit__(self, *exc: object) -> None:
        self.ipr.close()


class _host_lock:
    def __enter__(self) -> None:
        self.fd = os.open(_LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the flock


def _link(ipr: Any, name: str) -> Any | None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as err:
        if err.code == errno.ENODEV:
            return None
        raise


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


def _ports(ipr: Any, index: int) -> Iterator[Any]:
    return (link for link in ipr.get_links() if link.get_attr("IFLA_MASTER") == index)


def _ensure_bridge(host: Any, bridge: str, iface: Any, gw: Any) -> int:
    """The bridge's index, creating it (marked as ours, holding the gateway, up) when missing."""
    from pyroute2.netlink.exceptions import NetlinkError

    link = _link(host, bridge)
    if link is not None:
        if _kind(link) != "bridge":
            raise RuntimeFailure(f"{bridge} exists and is not a bridge ({_kind(link) or 'no kind'})")
        host.link("set", index=link["index"], state="up")
        return link["index"]
    # A fixed MAC: otherwise the bridge takes the lowest port MAC, which changes as containers come and go
    # and leaves stale ARP entries for the gateway in the other containers.
    mac = ":".join(f"{b:02x}" for b in bytes([0x02]) + os.urandom(5))
    try:
        host.link("add", ifname=bridge, kind="bridge", address=mac)
    except NetlinkError as err:
        raise RuntimeFailure(f"cannot create bridge {bridge}: {os.strerror(err.code)}") from err
    try:
        index = host.link_lookup(ifname=bridge)[0]
        host.link("set", index=index, ifalias=_BRIDGE_ALIAS)
        if gw is not None:
            _add_address(host, index, gw, iface.network.prefixlen)
        host.link("set", index=index, state="up")
    except NetlinkError as err:
        host.link("del", ifname=bridge)
        raise RuntimeFailure(f"cannot set up bridge {bridge} with gateway {gw}: {os.strerror(err.code)}") from err
    except BaseException:
        host.link("del", ifname=bridge)
        raise
    return index


def _add_address(ipr: Any, index: int, ip: Any, prefixlen: int) -> None:
    import socket

    if ip.version == 4:
        ipr.addr("add", index=index, address=str(ip), prefixlen=prefixlen)
    else:
        # No duplicate address detection: the address would stay unusable ("tentative") for a second or more.
        ifa_f_nodad = 0x02
        ipr.addr("add", index=index, address=str(ip), prefixlen=prefixlen, family=socket.AF_INET6,
                 flags=ifa_f_nodad)


def _configure_peer(host: Any, inner: Any, attachment: Attachment, iface: Any, gw: Any) -> None:
    import socket

    from pyroute2.netlink.exceptions import NetlinkError

    step = f"bring up {attachment.host_ifname}"
    try:
        host.link("set", index=host.link_lookup(ifname=attachment.host_ifname)[0], state="up")
        index = inner.link_lookup(ifname=attachment.ifname)[0]
        step = f"give {attachment.ifname} the address {iface} in {attachment.netns}"
        _add_address(inner, index, iface.ip, iface.network.prefixlen)
        step = f"bring up {attachment.ifname} in {attachment.netns}"
        inner.link("set", index=index, state="up")
        if gw is not None:
            step = f"add a default route via {gw} in {attachment.netns}"
            family = socket.AF_INET if gw.version == 4 else socket.AF_INET6
            inner.route("add", dst="0.0.0.0/0" if gw.version == 4 else "::/0", gateway=str(gw), oif=index,
                        family=family)
    except NetlinkError as err:
        reason = "one already exists" if err.code == errno.EEXIST else os.strerror(err.code)
        raise RuntimeFailure(f"cannot {step}: {reason}") from err


def _name_taken(host: Any, inner: Any, host_ifname: str, ifname: str, ns_path: str) -> RuntimeFailure:
    if _link(host, host_ifname) is not None:
        return RuntimeFailure(f"host interface {host_ifname} already exists")
    if _link(inner, ifname) is not None:
        return RuntimeFailure(f"interface {ifname} already exists in network namespace {ns_path}")
    return RuntimeFailure(f"veth pair {host_ifname} <-> {ifname}: a name is already taken")


def _remove(host: Any, attachment: Attachment) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    with _host_lock():
        link = _link(host, attachment.host_ifname)
        # Only a veth: a record read back from state.json must not take down whatever reused the name since.
        if link is not None and _kind(link) == "veth":
            try:
                host.link("del", index=link["index"])
            except NetlinkError as err:
                if err.code != errno.ENODEV:
                    raise RuntimeFailure(f"cannot remove {attachment.host_ifname}: "
                                         f"{os.strerror(err.code)}") from err
        _remove_bridge_if_unused(host, attachment.bridge)


def _remove_bridge_if_unused(host: Any, bridge: str) -> None:
    """Delete `bridge` if attach() created it and no port is left; the caller holds the host lock."""
    from pyroute2.netlink.exceptions import NetlinkError

    link = _link(host, bridge)
    if link is None or _kind(link) != "bridge" or link.get_attr("IFLA_IFALIAS") != _BRIDGE_ALIAS:
        return
    if next(_ports(host, link["index"]), None) is not None:
        return
    try:
        host.link("del", index=link["index"])
    except NetlinkError as err:
        if err.code != errno.ENODEV:
            raise RuntimeFailure(f"cannot remove bridge {bridge}: {os.strerror(err.code)}") from err
