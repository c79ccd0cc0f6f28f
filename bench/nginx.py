"""A private nginx (Debian's real binary) serving a directory: the HTTP chunk store of the tests and the benchmark.

Everything nginx writes (its config, pid file, logs, request-body temp files) lives in a private temporary folder;
the system's /etc/nginx and its running server are never touched. nginx runs in the foreground (`daemon off`) as a
child of this process, with keep-alive and sendfile on. Optionally it accepts WebDAV PUT (uploads to the store) and
runs inside a named network namespace (the shaped link of `netshape`).

    with NginxServer(store_dir) as server:
        HttpStore(server.url).get(digest)
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from coldbrew.runtime import libc

NGINX = "/usr/sbin/nginx"
NETNS_RUN_DIR = "/run/netns"
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_PORT_ATTEMPTS = 5
_LOG_SETTLE = 0.05
_UPLOAD_TEMP_PREFIX = ".nginx-upload-"


class NginxError(Exception):
    """nginx did not start (the message carries its error log) or was misused."""


class NginxServer:
    """nginx serving `root` read-only at `url` (and accepting PUT into it when `webdav_put`).

    `port=0` picks a free port once; it stays the same across `stop()` and `start()`, so a test can take the
    server away and bring it back at the same URL. `access_log=True` records one line per request, which
    `requests()` returns (to count fetches).
    """

    def __init__(self, root: str, *, address: str = "127.0.0.1", port: int = 0, webdav_put: bool = False,
                 netns: str | None = None, access_log: bool = False, workers: int | str = "auto") -> None:
        self.root = os.path.abspath(root)
        if not os.path.isdir(self.root):
            raise NginxError(f"root {self.root!r} is not a directory")
        _quote(self.root)
        self.address = address
        self.port = port
        self.webdav_put = webdav_put
        self.netns = netns
        self.access_log = access_log
        self.workers = workers
        self._process: subprocess.Popen | None = None
        self._prefix: str | None = None
        self._upload_temp: str | None = None

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> NginxServer:
        if self.running:
            raise NginxError(f"nginx for {self.root} is already running at {self.url}")
        pick_port = self.port == 0
        for _attempt in range(_PORT_ATTEMPTS if pick_port else 1):
            if pick_port:
                self.port = _free_port(self.address, self.netns)
            try:
                self._launch()
                return self
            except _AddressInUse as error:
                # Another program took the port between our probe and nginx's bind: try another one.
                if not pick_port:
                    raise NginxError(str(error)) from None
                self.port = 0
        raise NginxError(f"nginx found no free port on {self.address} after {_PORT_ATTEMPTS} attempts")

    def stop(self) -> None:
        """Stop nginx (fast shutdown, then SIGKILL of its process group) and remove its private folder."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            # Fast shutdown: the master ends its workers, then itself.
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # Workers that outlived their master would keep the port: end the whole session nginx started
                # (its id is still ours: the master is not reaped yet).
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._prefix is not None:
            shutil.rmtree(self._prefix, ignore_errors=True)
            self._prefix = None
        if self._upload_temp is not None:
            shutil.rmtree(self._upload_temp, ignore_errors=True)
            self._upload_temp = None

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request served since start, oldest first (needs `access_log=True`)."""
        if not self.access_log or self._prefix is None:
            raise NginxError("requests() needs a running server started with access_log=True")
        log = Path(self._prefix, "access.log")
        # nginx logs a request just after sending its response: wait until the log stops growing.
        size = -1
        while size != (size := log.stat().st_size if log.exists() else 0):
            time.sleep(_LOG_SETTLE)
        lines = log.read_text().splitlines()
        return [(method, path, int(status)) for method, status, path in (line.split(" ", 2) for line in lines)]

    def __enter__(self) -> NginxServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _launch(self) -> None:
        self._prefix = tempfile.mkdtemp(prefix="coldbrew-nginx-")
        if self.webdav_put:
            # PUT bodies land in a temp file that nginx renames into place: on root's filesystem that rename is
            # atomic, so a reader never sees half an object. One folder per server: two may share a root.
            self._upload_temp = tempfile.mkdtemp(prefix=_UPLOAD_TEMP_PREFIX, dir=self.root)
        conf = os.path.join(self._prefix, "nginx.conf")
        Path(conf).write_text(self._config())
        error_log = os.path.join(self._prefix, "error.log")
        argv = [NGINX, "-p", self._prefix, "-c", conf, "-e", error_log]
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        if self.netns is None:
            self._process = subprocess.Popen(argv, start_new_session=True, **quiet)
        else:
            with _open_netns(self.netns) as fd:
                # The fd is CLOEXEC: the child joins the namespace before exec, then nginx never sees it.
                self._process = subprocess.Popen(argv, start_new_session=True, preexec_fn=lambda: _enter_netns(fd),
                                                 **quiet)
        self._wait_ready(error_log)

    def _wait_ready(self, error_log: str) -> None:
        # nginx writes its pid file only after it has bound its listening socket: from then on the kernel
        # accepts connections, whichever network namespace nginx runs in.
        pid_file = os.path.join(self._prefix, "nginx.pid")
        deadline = time.monotonic() + _START_TIMEOUT
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = Path(error_log).read_text() if os.path.exists(error_log) else ""
                self.stop()
                if "Address already in use" in log:
                    raise _AddressInUse(f"nginx could not bind {self.address}:{self.port}: {log.strip()}")
                raise NginxError(f"nginx exited at start-up ({self._describe()}):\n{log.strip()}")
            if os.path.exists(pid_file) and Path(pid_file).read_text().strip():
                return
            time.sleep(0.005)
        self.stop()
        raise NginxError(f"nginx did not start within {_START_TIMEOUT} s ({self._describe()})")

    def _describe(self) -> str:
        where = f" in network namespace {self.netns}" if self.netns else ""
        return f"serving {self.root} at {self.url}{where}"

    def _config(self) -> str:
        assert self._prefix is not None
        prefix = self._prefix
        # As root, workers would otherwise run as nobody, who cannot read a private (0700) test folder.
        user = ""
        if os.geteuid() == 0:
            user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
        access_log = f"access_log {_quote(prefix + '/access.log')} requests;" if self.access_log else "access_log off;"
        listen = f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"
        upload = ""
        if self._upload_temp is not None:
            upload = f"""
        client_body_temp_path {_quote(self._upload_temp)};
        dav_methods PUT;
        create_full_put_path on;
        dav_access user:rw group:r all:r;
        location ^~ /{_UPLOAD_TEMP_PREFIX} {{ return 403; }}"""
        return f"""
daemon off;
master_process on;
worker_processes {self.workers};
{user}
pid {_quote(prefix + '/nginx.pid')};
error_log {_quote(prefix + '/error.log')} warn;
events {{ worker_connections 4096; }}
http {{
    default_type application/octet-stream;
    types {{ }}
    server_tokens off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_max_body_size 0;
    client_body_temp_path {_quote(prefix + '/client_body_temp')};
    proxy_temp_path {_quote(prefix + '/proxy_temp')};
    fastcgi_temp_path {_quote(prefix + '/fastcgi_temp')};
    uwsgi_temp_path {_quote(prefix + '/uwsgi_temp')};
    scgi_temp_path {_quote(prefix + '/scgi_temp')};
    log_format requests '$request_method $status $uri';
    {access_log}
    server {{
        listen {listen} backlog=4096;
        root {_quote(self.root)};
        autoindex off;
        {upload}
    }}
}}
"""


class _AddressInUse(NginxError):
    pass


def _quote(path: str) -> str:
    """A path as an nginx string: quoted; characters nginx would interpret inside quotes are refused."""
    bad = sorted({char for char in path if char in '"\\$\n'})
    if bad:
        raise NginxError(f"path {path!r}: nginx cannot be given a path containing {''.join(bad)!r}")
    return f'"{path}"'


def _free_port(address: str, netns: str | None) -> int:
    """A port nobody listens on at `address`, asked of the kernel of the namespace nginx will run in."""
    found: list[int] = []
    failed: list[BaseException] = []

    def probe() -> None:
        try:
            if netns is not None:
                # Only this short-lived thread moves into the namespace: a socket belongs to its creator's netns.
                with _open_netns(netns) as fd:
                    _enter_netns(fd)
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((address, 0))
                found.append(sock.getsockname()[1])
        except OSError as error:
            failed.append(error)

    thread = threading.Thread(target=probe, name="nginx-port-probe")
    thread.start()
    thread.join()
    if failed:
        where = f" in network namespace {netns}" if netns else ""
        raise NginxError(f"cannot listen on {address}{where}: {failed[0]}")
    return found[0]


class _open_netns:
    def __init__(self, name: str) -> None:
        path = os.path.join(NETNS_RUN_DIR, name)
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NginxError(f"network namespace {name!r} does not exist ({path})") from None

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc_info: object) -> None:
        os.close(self.fd)


def _enter_netns(fd: int) -> None:
    libc.setns(fd, libc.CLONE_NEWNET)
