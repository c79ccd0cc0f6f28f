"""A shaped network link for the benchmark: a named network namespace joined to the host by a veth pair, with a
rate limit and half the round-trip delay on each direction. Built with pyroute2 and raw netlink: no `ip`, `tc` or
`nft` binaries.

    with ShapedLink(rate_bit=1e9, rtt_ms=2.0) as link, \\
            NginxServer(store, address=link.ns_address, netns=link.netns) as server:
        HttpStore(server.url)  # every request and response crosses the shaped link

How it is shaped. The natural tool, netem, is not in every kernel (this machine's kernel lacks CONFIG_NET_SCH_NETEM),
so the link is made of parts that are commonly built in:
- rate: a token-bucket qdisc (`tbf`) on the egress of each veth end;
- delay: inside the namespace, nftables rules (xtables' NFQUEUE target through nft_compat) hand every packet that
  enters or leaves through the veth to an nfnetlink queue, and a small delay process, living in the namespace,
  accepts each packet rtt/2 after it arrived (packets keep their order; verdicts go out in batches). Only metadata
  crosses to user space (copy mode META, GSO packets unsplit), so the process costs little CPU.
Packets on the namespace's loopback are not delayed.

Only the benchmark uses this module, so importing pyroute2 at the top costs nothing on a container's start path.
Teardown removes the delay process, the namespace and the veth pair whatever happened in between; a failure
half-way through set-up undoes what was made so far.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import time

from pyroute2 import IPRoute, netns

from coldbrew.runtime import libc

NETNS_PREFIX = "cbshape-"
NETNS_RUN_DIR = "/run/netns"
# Addresses come from a /30 in this range, chosen at random and checked against the host's own addresses.
_ADDRESS_POOL = ipaddress.ip_network("10.201.0.0/16")
_ADDRESS_TRIES = 64
_QUEUE_NUM = 0
_QUEUE_MAXLEN = 65536
_DELAY_START_TIMEOUT = 10.0
_NFT_TABLE = "cbshape"


class NetShapeError(Exception):
    """The shaped link could not be set up (or its parameters are wrong)."""


class ShapedLink:
    """A veth pair between the host and the network namespace `netns`, shaped in both directions.

    `rate_bit` is the link's rate in bits per second in each direction; `rtt_ms` the round-trip time added (half of
    it each way). `host_address` is the host end's IPv4 address, `ns_address` the namespace end's (a /30).
    """

    def __init__(self, rate_bit: float = 1e9, rtt_ms: float = 2.0) -> None:
        if not 8_000 <= rate_bit <= 8 * (2**32 - 1):
            raise NetShapeError(f"rate_bit {rate_bit}: expected 8 kbit/s to 34 Gbit/s")
        if not 0 <= rtt_ms <= 10_000:
            raise NetShapeError(f"rtt_ms {rtt_ms}: expected 0 to 10000")
        self.rate_bit = rate_bit
        self.rtt_ms = rtt_ms
        tag = secrets.token_hex(3)
        self.netns = f"{NETNS_PREFIX}{tag}"
        # Interface names are at most 15 bytes.
        self.host_ifname = f"cbh{tag}"
        self.ns_ifname = f"cbn{tag}"
        self.host_address = ""
        self.ns_address = ""
        self.prefixlen = 30
        self._made_netns = False
        self._made_link = False
        self._delayer: subprocess.Popen | None = None

    def __enter__(self) -> ShapedLink:
        try:
            self._set_up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the delay process, remove the veth pair and the namespace (each only if this link made it)."""
        delayer, self._delayer = self._delayer, None
        if delayer is not None:
            delayer.kill()
            delayer.wait()
        if self._made_link:
            with IPRoute() as ipr:
                # Deleting one end of a veth pair deletes both (the namespace end may be gone with its namespace).
                if ipr.link_lookup(ifname=self.host_ifname):
                    ipr.link("del", ifname=self.host_ifname)
            self._made_link = False
        if self._made_netns:
            netns.remove(self.netns)
            self._made_netns = False

    def _set_up(self) -> None:
        if self.netns in netns.listnetns():
            raise NetShapeError(f"network namespace {self.netns!r} exists already")
        netns.create(self.netns)
        self._made_netns = True
        with IPRoute() as ipr:
            host_address, ns_address = self._pick_addresses(ipr)
            ipr.link("add", ifname=self.host_ifname, kind="veth", peer={"ifname": self.ns_ifname})
            self._made_link = True
            ipr.link("set", index=ipr.link_lookup(ifname=self.ns_ifname)[0], net_ns_fd=self.netns)
            host_index = ipr.link_lookup(ifname=self.host_ifname)[0]
            ipr.addr("add", index=host_index, address=host_address, prefixlen=self.prefixlen)
            self._limit_rate(ipr, host_index)
            ipr.link("set", index=host_index, state="up")
        with IPRoute(netns=self.netns) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            ns_index = ns.link_lookup(ifname=self.ns_ifname)[0]
            ns.addr("add", index=ns_index, address=ns_address, prefixlen=self.prefixlen)
            self._limit_rate(ns, ns_index)
            ns.link("set", index=ns_index, state="up")
        if self.rtt_ms > 0:
            self._start_delayer()
        self.host_address, self.ns_address = host_address, ns_address

    def _limit_rate(self, ipr: IPRoute, index: int) -> None:
        rate = int(self.rate_bit / 8)  # bytes per second
        # The bucket holds 1 ms at line rate (at least one 64 KiB GSO packet); the queue behind it one
        # bandwidth-delay product, as a switch port would, so queueing does not inflate the RTT much.
        burst = max(65536, rate // 1000)
        limit = burst + max(65536, int(rate * self.rtt_ms / 1000))
        ipr.tc("add", "tbf", index=index, handle="1:", rate=rate, burst=burst, limit=limit)

    def _start_delayer(self) -> None:
        fd = os.open(os.path.join(NETNS_RUN_DIR, self.netns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._delayer = subprocess.Popen(
                [sys.executable, "-m", "coldbrew.bench.netshape", "delay", self.ns_ifname, str(self.rtt_ms / 2)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                preexec_fn=lambda: _enter_netns(fd),
            )
        finally:
            os.close(fd)
        ready, _, _ = select.select([self._delayer.stdout], [], [], _DELAY_START_TIMEOUT)
        line = self._delayer.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self._delayer.kill()
            _out, err = self._delayer.communicate()
            raise NetShapeError(f"the delay process did not start in {self.netns}: {err.decode(errors='replace')}")

    def _pick_addresses(self, ipr: IPRoute) -> tuple[str, str]:
        taken = [ipaddress.ip_network(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}", strict=False)
                 for a in ipr.get_addr(family=socket.AF_INET)]
        subnets = _ADDRESS_POOL.num_addresses // 4
        for _try in range(_ADDRESS_TRIES):
            subnet = ipaddress.ip_network((int(_ADDRESS_POOL.network_address) + 4 * secrets.randbelow(subnets), 30))
            if not any(subnet.overlaps(other) for other in taken):
                host, ns = list(subnet.hosts())
                return str(host), str(ns)
        raise NetShapeError(f"no free /30 in {_ADDRESS_POOL} after {_ADDRESS_TRIES} tries")


def leftovers() -> tuple[list[str], list[str]]:
    """Network namespaces and host links that look like a ShapedLink's (for leak checks)."""
    namespaces = [name for name in netns.listnetns() if name.startswith(NETNS_PREFIX)]
    with IPRoute() as ipr:
        links = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    return namespaces, [name for name in links if name.startswith(("cbh", "cbn"))]


def _enter_netns(fd: int) -> None:
    libc.setns(fd, libc.CLONE_NEWNET)
    # The delay process must not outlive the benchmark that started it.
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)


# --- the delay process (runs inside the namespace) -------------------------------------------------------------

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 4
NF_ACCEPT = 1
NFT_META_IIF = 4
NFT_META_OIF = 5
PR_SET_TIMERSLACK = 29


def _attr(kind: int, payload: bytes) -> bytes:
    header = struct.pack("=HH", 4 + len(payload), kind)
    return header + payload + b"\0" * (-len(payload) % 4)


class _Queue:
    """One nfnetlink queue, bound in this process's network namespace."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: bursts of packets queue here
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self._seq = 0
        self._config(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0)))
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
                     + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", _QUEUE_MAXLEN))
                     + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO))
                     + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO)))

    def _send(self, message_type: int, attrs: bytes, flags: int) -> None:
        self._seq += 1
        body = struct.pack("!BBH", socket.AF_UNSPEC, 0, self.number) + attrs
        self.sock.send(struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | message_type, flags,
                                   self._seq, 0) + body)

    def _config(self, attrs: bytes) -> None:
        self._send(NFQNL_MSG_CONFIG, attrs, NLM_F_REQUEST | NLM_F_ACK)
        data = self.sock.recv(65536)
        length, kind = struct.unpack_from("=IH", data)
        if kind == NLMSG_ERROR:
            error = struct.unpack_from("=i", data, 16)[0]
            if error:
                raise OSError(-error, f"nfnetlink queue {self.number} configuration: {os.strerror(-error)}")

    def accept_through(self, packet_id: int) -> None:
        """Accept every queued packet up to and including `packet_id` (one batch verdict)."""
        self._send(NFQNL_MSG_VERDICT_BATCH, _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id)),
                   NLM_F_REQUEST)

    def packet_ids(self) -> list[int]:
        """Ids of the packets queued since the last call (without blocking)."""
        ids: list[int] = []
        while True:
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return ids
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    ids.extend(_packet_id(data, offset + 20, offset + length))
                offset += (length + 3) & ~3


def _packet_id(data: bytes, start: int, end: int) -> list[int]:
    while start + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, start)
        if kind & 0x3FFF == NFQA_PACKET_HDR:
            return [struct.unpack_from("!I", data, start + 4)[0]]
        start += (length + 3) & ~3
    return []


def _queue_rules(ifname: str, queue: int) -> None:
    """nftables rules in this namespace: packets entering or leaving through `ifname` go to `queue`."""
    from pyroute2.nftables.expressions import genex
    from pyroute2.nftables.main import NFTables

    index = socket.if_nametoindex(ifname)
    # xt_NFQ_info_v3: queue number, number of queues, flags (the nft_compat form of `-j NFQUEUE`).
    target = genex("target", {"name": "NFQUEUE", "rev": 3, "info": struct.pack("=HHH2x", queue, 1, 0)})
    with NFTables(nfgen_family=socket.AF_INET) as nft:
        nft.table("add", name=_NFT_TABLE)
        for chain, hook, key in (("ingress", "prerouting", NFT_META_IIF), ("egress", "output", NFT_META_OIF)):
            nft.chain("add", table=_NFT_TABLE, name=chain, hook=hook, type="filter", policy=NF_ACCEPT, priority=0)
            match = [genex("meta", {"key": key, "dreg": 1}),
                     genex("cmp", {"sreg": 1, "op": 0,
                                   "data": {"attrs": [("NFTA_DATA_VALUE", struct.pack("=I", index))]}})]
            nft.rule("add", table=_NFT_TABLE, chain=chain, expressions=(match, [target]))


def _delay_forever(ifname: str, delay_s: float) -> None:
    # The default 50 us timer slack would add itself to every delay, twice per round trip.
    libc.prctl(PR_SET_TIMERSLACK, 1)
    queue = _Queue(_QUEUE_NUM)
    _queue_rules(ifname, _QUEUE_NUM)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    pending: collections.deque[tuple[float, int]] = collections.deque()
    while True:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
        readable, _, _ = select.select([queue.sock], [], [], timeout)
        if readable:
            due = time.monotonic() + delay_s
            pending.extend((due, packet_id) for packet_id in queue.packet_ids())
        now = time.monotonic()
        last = None
        while pending and pending[0][0] <= now:
            last = pending.popleft()[1]
        if last is not None:
            queue.accept_through(last)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "delay":
        sys.exit("usage: python -m coldbrew.bench.netshape delay IFNAME DELAY_MS (started by ShapedLink)")
    _delay_forever(sys.argv[2], float(sys.argv[3]) / 1000)
