"""Building an image: each step over the previous step's image, in a coldbrew container where it runs a program.

A step that runs commands (apt_install, pip_install, pip_install_from_requirements, run_commands) gets a writable
root from `coldbrew.fs.create_root(parent, DIR)`: overlayfs over the lazily mounted parent image, so starting a
step copies nothing. The command runs through `/bin/sh -c` in a coldbrew container (the in-process
`coldbrew.runtime.Runtime`) that shares the host's network namespace: the package registries are reached exactly as
the host reaches them, with no bridge, NAT or DNS of our own to set up (the runtime's bridge has no route out).
What the container may see of the host to reach them is a `RegistryAccess`, shown in the build log. The step's
result is pushed as a new image index made from the parent's index and the overlay's upper directory
(`coldbrew.fs.layer.push_layer`): only changed files are read, unchanged files keep their chunks.

Steps that only add files (add_local_file, add_local_dir, workdir) run no container: their changes are laid out in
a directory shaped like an upper directory and pushed the same way. Steps that change only the image config (env,
entrypoint, cmd, a workdir that exists) rewrite the index's header (`coldbrew.fs.layer.push_metadata`).
The image config (env, working directory, entrypoint, cmd, user) is kept in each image's index metadata under
"image_config", so a reference alone is enough to run the image (`coldbrew image bundle`).
"""

from __future__ import annotations

import configparser
import dataclasses
import errno
import json
import os
import re
import select
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable

from .cache import StepCache, StepRecord, ImageRecord, check_name, file_digest, step_key, tree_digest
from .image import Image, ImageBuildError, ImageDefinitionError, Step

if TYPE_CHECKING:
    from coldbrew.fs.index import Index

    from .oci import ImageConfig

DEFAULT_WORK_DIR = "/var/tmp/coldbrew-build"
DEFAULT_RUNTIME_ROOT = "/run/coldbrew"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Where a build container finds what RegistryAccess gives it (under /run, which images keep empty).
BUILD_DIR = "/run/coldbrew-build"
OUTPUT_TAIL_LINES = 30
# Docker's default capability set: what package managers' maintainer scripts expect of root in a build.
BUILD_CAPABILITIES = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                      "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                      "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
_PIP_CONFIG_FILES = ("/etc/xdg/pip/pip.conf", "/etc/pip.conf", "~/.pip/pip.conf", "~/.config/pip/pip.conf")
_PIP_LOCATION_KEYS = ("find-links", "index-url", "extra-index-url")
# apt settings about reaching repositories: per-protocol options (proxies, CA, timeouts) and date checks.
_APT_ACCESS_KEY = re.compile(r"Acquire::((https?|ftp|socks)::|Check-Valid-Until |Check-Date |Retries |ForceIPv[46] )")
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


class BuildError(ImageBuildError):
    """A step failed: names the step (its number and text), the exit status, and the tail of its output."""

    def __init__(self, number: int, step: Step, reason: str, output_tail: str = "",
                 exit_status: int | None = None) -> None:
        self.number = number
        self.step = step
        self.exit_status = exit_status
        self.output_tail = output_tail
        message = f"step {number} ({step.describe()}) {reason}"
        if output_tail:
            message += "; its output ended with:\n" + output_tail
        super().__init__(message)


# --- registry access ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RegistryAccess:
    """What a build step may see of the host to reach package registries. Nothing of it stays in the image.

    - `ca_bundle` (a host file) is bound read-only at `ca_destination`, and every variable in `ca_variables`
      names that path (SSL_CERT_FILE, PIP_CERT, REQUESTS_CA_BUNDLE, ...); apt gets it as Acquire::https::CAInfo.
    - `pip_config` (text) is given to pip as PIP_CONFIG_FILE; `apt_config` (text) to apt as APT_CONFIG.
    - `env` is passed to every step as is (PIP_* settings, proxies).
    - `read_only_dirs` are host directories bound read-only at the same path (local wheel folders and indexes the
      pip settings name). `resolv_conf` is bound at /etc/resolv.conf: the container shares the host's network.
    - `debian_mirror` and `debian_security_mirror` are where debian_slim's packages come from.

    `RegistryAccess.from_host()` derives all of it from this host's settings; change any field with
    `dataclasses.replace`, or pass `RegistryAccess()` for none at all.
    """

    ca_bundle: str | None = None
    ca_destination: str = f"{BUILD_DIR}/ca-certificates.crt"
    ca_variables: tuple[str, ...] = ()
    pip_config: str = ""
    apt_config: str = ""
    env: tuple[tuple[str, str], ...] = ()
    read_only_dirs: tuple[str, ...] = ()
    resolv_conf: str | None = None
    debian_mirror: str = "http://deb.debian.org/debian"
    debian_security_mirror: str = "http://deb.debian.org/debian-security"

    @classmethod
    def from_host(cls, environ: dict[str, str] | None = None) -> "RegistryAccess":
        environ = dict(os.environ if environ is None else environ)
        pip = _host_pip_config(environ)
        ca_bundle = next((path for path in (environ.get("SSL_CERT_FILE"), environ.get("PIP_CERT"),
                                            environ.get("REQUESTS_CA_BUNDLE"), pip.get("global", "cert", fallback=None),
                                            "/etc/ssl/certs/ca-certificates.crt")
                          if path and os.path.isfile(path)), None)
        ca_variables = {"SSL_CERT_FILE"} if ca_bundle else set()
        env = []
        for name, value in sorted(environ.items()):
            if ca_bundle and value == ca_bundle:
                ca_variables.add(name)
            elif (name.startswith("PIP_") and name != "PIP_CONFIG_FILE") or name in _PROXY_VARIABLES:
                env.append((name, value))
        if ca_bundle:
            for section in pip.sections():
                if pip.get(section, "cert", fallback=None) == ca_bundle:
                    pip.set(section, "cert", cls.ca_destination)
        dirs = []
        for value in [environ.get(f"PIP_{key.upper().replace('-', '_')}", "") for key in _PIP_LOCATION_KEYS] + [
                pip.get(section, key, fallback="") for section in pip.sections() for key in _PIP_LOCATION_KEYS]:
            dirs.extend(_local_dirs(value))
        mirror, security = _host_debian_mirrors()
        return cls(ca_bundle=ca_bundle, ca_variables=tuple(sorted(ca_variables)), pip_config=_ini_text(pip),
                   apt_config=_host_apt_acquire_config(), env=tuple(env),
                   read_only_dirs=tuple(dict.fromkeys(dirs)),
                   resolv_conf="/etc/resolv.conf" if os.path.isfile("/etc/resolv.conf") else None,
                   debian_mirror=mirror or cls.debian_mirror,
                   debian_security_mirror=security or cls.debian_security_mirror)

    def check(self) -> None:
        """Refuse settings that cannot work (a missing file or directory), naming the field."""
        if self.ca_bundle is not None and not os.path.isfile(self.ca_bundle):
            raise ImageBuildError(f"registry access: ca_bundle {self.ca_bundle} is not a file")
        if self.resolv_conf is not None and not os.path.isfile(self.resolv_conf):
            raise ImageBuildError(f"registry access: resolv_conf {self.resolv_conf} is not a file")
        for directory in self.read_only_dirs:
            if not os.path.isabs(directory) or not os.path.isdir(directory):
                raise ImageBuildError(f"registry access: read_only_dirs: {directory} is not an absolute directory")
        if not self.ca_destination.startswith("/"):
            raise ImageBuildError(f"registry access: ca_destination {self.ca_destination!r} is not absolute")

    def container_env(self) -> list[str]:
        env = [f"{name}={value}" for name, value in self.env]
        if self.ca_bundle:
            env += [f"{name}={self.ca_destination}" for name in self.ca_variables]
        if self.pip_config:
            env.append(f"PIP_CONFIG_FILE={BUILD_DIR}/pip.conf")
        if self.apt_config or self.ca_bundle:
            env.append(f"APT_CONFIG={BUILD_DIR}/apt.conf")
        return env

    def apt_config_for(self, ca_path: str | None) -> str:
        """The apt configuration to use, with the CA bundle at `ca_path` (where apt sees it)."""
        text = self.apt_config
        if self.ca_bundle and ca_path:
            text += f'Acquire::https::CAInfo "{ca_path}";\n'
        return text

    def describe(self) -> str:
        """Every setting, for the build log."""
        lines = ["registry access (host network namespace):"]
        if self.ca_bundle:
            lines.append(f"  CA bundle {self.ca_bundle} -> {self.ca_destination} (read-only), named by "
                         f"{', '.join(self.ca_variables) or 'no variable'} and apt's Acquire::https::CAInfo")
        else:
            lines.append("  no CA bundle")
        for directory in self.read_only_dirs:
            lines.append(f"  {directory} -> {directory} (read-only)")
        if self.resolv_conf:
            lines.append(f"  {self.resolv_conf} -> /etc/resolv.conf (read-only)")
        for name, value in self.env:
            lines.append(f"  env {name}={value}")
        if self.pip_config:
            lines.append(f"  pip config ({BUILD_DIR}/pip.conf, PIP_CONFIG_FILE):")
            lines += ["    " + line for line in self.pip_config.splitlines() if line.strip()]
        apt = self.apt_config_for(self.ca_destination)
        if apt:
            lines.append(f"  apt config ({BUILD_DIR}/apt.conf, APT_CONFIG):")
            lines += ["    " + line for line in apt.splitlines() if line.strip()]
        lines.append(f"  Debian mirrors {self.debian_mirror} {self.debian_security_mirror}")
        return "\n".join(lines)


def _host_pip_config(environ: dict[str, str]) -> configparser.ConfigParser:
    """The host's pip configuration files merged in pip's order (later files win)."""
    parser = configparser.ConfigParser(interpolation=None)
    paths = [os.path.expanduser(path) for path in _PIP_CONFIG_FILES]
    if environ.get("PIP_CONFIG_FILE") and environ["PIP_CONFIG_FILE"] != os.devnull:
        paths.append(environ["PIP_CONFIG_FILE"])
    for path in paths:
        try:
            parser.read(path)
        except configparser.Error as error:
            raise ImageBuildError(f"registry access: the pip configuration {path} does not parse ({error})") from None
    return parser


def _ini_text(parser: configparser.ConfigParser) -> str:
    lines = []
    for section in parser.sections():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value}" for key, value in parser.items(section, raw=True)]
    return "\n".join(lines) + "\n" if lines else ""


def _local_dirs(value: str) -> list[str]:
    """Host directories a pip location setting names (file:// URLs, absolute paths). A file:// index ending in
    /simple is bound with its parent: its pages link to files beside it (../../files/...)."""
    found = []
    for word in value.split():
        path = word.removeprefix("file://") if word.startswith("file://") else word
        if not path.startswith("/") or not os.path.isdir(path):
            continue
        if word.startswith("file://") and os.path.basename(path.rstrip("/")) == "simple":
            path = os.path.dirname(path.rstrip("/"))
        found.append(path.rstrip("/") or "/")
    return found


def _host_apt_acquire_config() -> str:
    """The host's apt settings about reaching repositories (`apt-config dump`: proxies, http/https options,
    Check-Valid-Until, Check-Date, Retries), as apt.conf lines; empty where apt is not installed."""
    try:
        dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, check=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError):
        return ""
    return "".join(line + "\n" for line in dump.splitlines() if _APT_ACCESS_KEY.match(line))


def _host_debian_mirrors() -> tuple[str | None, str | None]:
    """The Debian archive and security URIs of the host's apt sources, if it uses Debian's."""
    uris = []
    for path in ["/etc/apt/sources.list"] + sorted(
            os.path.join("/etc/apt/sources.list.d", name) for name in _listdir("/etc/apt/sources.list.d")
            if name.endswith((".list", ".sources"))):
        try:
            with open(path) as file:
                for line in file:
                    words = line.split("#", 1)[0].split()
                    if words[:1] == ["URIs:"]:
                        uris += words[1:]
                    elif words[:1] == ["deb"]:
                        uris += [word for word in words[1:] if "://" in word][:1]
        except (FileNotFoundError, UnicodeDecodeError):
            continue
    archive = next((uri.rstrip("/") for uri in uris if uri.rstrip("/").endswith("/debian")), None)
    security = next((uri.rstrip("/") for uri in uris if uri.rstrip("/").endswith("/debian-security")), None)
    return archive, security


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


# --- image config ------------------------------------------------------------------------------------------------

def _config_type() -> type:
    from .oci import ImageConfig

    return ImageConfig


def config_from_json(data: dict) -> "ImageConfig":
    try:
        return _config_type().from_json(data)
    except ValueError as error:
        raise ImageBuildError(f"image config: {error}") from None


def _default_config(**changes: Any) -> "ImageConfig":
    return dataclasses.replace(_config_type().from_json({}), **changes)


def _env_with(env: Iterable[str], updates: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """KEY=VALUE entries with `updates` set (replacing an entry of the same name in place)."""
    result = list(env)
    for name, value in updates:
        entry = f"{name}={value}"
        for position, existing in enumerate(result):
            if existing.split("=", 1)[0] == name:
                result[position] = entry
                break
        else:
            result.append(entry)
    return tuple(result)


def image_config(store: Any, reference: str) -> "ImageConfig":
    """The image config kept in an image's index (a default one for an index pushed without)."""
    index = load_index(store, reference)
    try:
        return config_from_json(index.metadata.get("image_config") or {})
    finally:
        index.release()


def load_index(store: Any, reference: str) -> "Index":
    from coldbrew.fs import objects
    from coldbrew.fs.errors import BadReference, ChunkMissing
    from coldbrew.fs.index import Index
    from coldbrew.fs.index import MAX_INDEX_SIZE

    digest = objects.parse_reference(reference)
    try:
        stored = store.get(digest)
    except ChunkMissing:
        raise BadReference(f"image {reference} is not in the store {store.describe()}") from None
    index = Index(objects.decode(digest, stored, MAX_INDEX_SIZE))
    index.validate()
    return index


# --- results and progress ----------------------------------------------------------------------------------------

@dataclass
class StepResult:
    number: int  # 1-based
    step: str
    key: str
    reference: str
    cached: bool
    seconds: float
    containers: int = 0  # containers this build ran for the step
    entries: int = 0
    file_bytes: int = 0
    uploaded_bytes: int = 0
    push_seconds: float = 0.0


@dataclass
class BuildResult:
    """The built image: its reference (what `coldbrew fs mount`, `image bundle` and `coldbrew run` take), its
    config, and each step's outcome."""

    reference: str
    config: "ImageConfig"
    steps: list[StepResult]
    seconds: float
    name: str | None = None

    def __str__(self) -> str:
        return self.reference

    @property
    def containers(self) -> int:
        return sum(step.containers for step in self.steps)

    @property
    def cached_steps(self) -> int:
        return sum(step.cached for step in self.steps)


@dataclass
class DedupeReport:
    """How much the store holds for an image's steps against the sum of their trees."""

    steps: int
    tree_bytes: int  # sum over the steps of the data bytes of each step's whole tree
    unique_bytes: int  # distinct chunks over all those trees (each stored once), uncompressed
    stored_bytes: int  # those chunks and the steps' indexes as stored (compressed)

    @property
    def ratio(self) -> float:
        return self.tree_bytes / self.stored_bytes if self.stored_bytes else 0.0


def dedupe_report(store: Any, references: Iterable[str]) -> DedupeReport:
    from coldbrew.fs import objects

    references = list(dict.fromkeys(references))
    chunks: dict[bytes, int] = {}
    tree_bytes = 0
    stored = 0
    for reference in references:
        index = load_index(store, reference)
        try:
            for chunk in index.all_chunks():
                chunks[chunk.digest] = chunk.length
                tree_bytes += chunk.length
        finally:
            index.release()
        stored += _stored_size(store, objects.parse_reference(reference))
    stored += sum(_stored_size(store, digest) for digest in chunks)
    return DedupeReport(len(references), tree_bytes, sum(chunks.values()), stored)


def _stored_size(store: Any, digest: bytes) -> int:
    from coldbrew.fs.store import LocalStore, object_path

    if isinstance(store, LocalStore):
        return os.stat(os.path.join(store.root, object_path(digest))).st_size
    return len(store.get(digest))


class Reporter:
    """Where a build tells what it does: a log stream (everything, plain lines) and/or progress on a terminal."""

    def __init__(self, log: IO[str] | None = None, terminal: IO[str] | None = None) -> None:
        self._log = log
        self._terminal = terminal
        self._status = ""
        self._shown = 0.0
        self._width = shutil.get_terminal_size((100, 20)).columns
        self._lock = threading.Lock()  # push progress comes from worker threads

    def _write_log(self, text: str) -> None:
        if self._log is not None:
            self._log.write(text + "\n")
            self._log.flush()

    def _show(self, text: str, *, final: bool = False) -> None:
        if self._terminal is None:
            return
        with self._lock:
            now = time.monotonic()
            if not final and now - self._shown < 0.1:
                return
            self._shown = now
            line = text[: self._width - 1]
            self._terminal.write("\r\033[K" + line + ("\n" if final else ""))
            self._terminal.flush()

    def note(self, text: str) -> None:
        self._write_log(text)
        if self._terminal is not None:
            self._show(text.splitlines()[0] if text else "", final=True)

    def begin(self, number: int, total: int, step: Step) -> None:
        self._status = f"[{number}/{total}] {step.describe()}"
        self._write_log(self._status)
        self._show(self._status + " ...")

    def output(self, line: str) -> None:
        self._write_log("  | " + line)
        self._show(f"{self._status} | {line.strip()}")

    def transfer(self, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        bar = "#" * int(fraction * 20)
        self._show(f"{self._status} push [{bar:<20}] {done / 1e6:,.1f}/{total / 1e6:,.1f} MB")

    def failed(self, seconds: float) -> None:
        text = f"{self._status}: failed after {seconds:.1f} s"
        self._write_log(text)
        self._show(text, final=True)

    def end(self, result: StepResult) -> None:
        if result.cached:
            text = f"{self._status}: cached ({result.reference[:12]})"
        else:
            text = (f"{self._status}: built in {result.seconds:.1f} s ({result.reference[:12]}, "
                    f"{result.uploaded_bytes / 1e6:,.1f} MB stored)")
        self._write_log(text)
        self._show(text, final=True)


def _reporter(progress: bool | Reporter, log: IO[str] | None) -> Reporter:
    if isinstance(progress, Reporter):
        return progress
    if progress:
        if sys.stderr.isatty():
            return Reporter(log, terminal=sys.stderr)
        return Reporter(log if log is not None else sys.stderr)
    return Reporter(log)


# --- building ----------------------------------------------------------------------------------------------------

@dataclass
class _Context:
    store_location: str
    store: Any
    cache: StepCache
    access: RegistryAccess
    reporter: Reporter
    work_dir: str
    runtime_root: str
    mount_options: dict
    push_mode: str
    step_timeout: float | None
    runtime: Any = None

    def get_runtime(self) -> Any:
        if self.runtime is None:
            from coldbrew.runtime import Runtime

            self.runtime = Runtime(self.runtime_root)
        return self.runtime


def build_image(image: Image, store: str, *, name: str | None = None, progress: bool | Reporter = False,
                log: IO[str] | None = None, access: RegistryAccess | None = None, force_build: bool = False,
                work_dir: str = DEFAULT_WORK_DIR, runtime_root: str = DEFAULT_RUNTIME_ROOT,
                cache_dir: str | None = None, push_mode: str = "layer",
                step_timeout: float | None = None) -> BuildResult:
    """Build `image` into the chunk store at `store` (a directory or an http(s) URL); steps whose cache key is
    recorded in the store are not built again.

    name: also record the image under this name (`coldbrew image ls`). progress: show progress on stderr (bars on
    a terminal). log: a text stream that gets every line of the build, the steps' output included. access: what
    build containers see to reach registries (default: RegistryAccess.from_host()). force_build: rebuild every
    step. work_dir: where step roots and bootstrap trees are made. cache_dir: the chunk cache of the steps' image
    mounts (default coldbrew.fs's). push_mode: "layer" (index from the parent's and the changes) or "full" (push
    the whole merged tree). step_timeout: seconds a step's container may run.

    Steps run through the in-process runtime, which makes the calling process a child subreaper (the containers'
    init processes are reaped by it). Raises BuildError naming the failed step; nothing it made is left behind.
    """
    from coldbrew.fs.store import open_store

    if not isinstance(image, Image):
        raise ImageDefinitionError(f"build: expected an Image, got {type(image).__name__}")
    if name is not None:
        check_name(name)
    if push_mode not in ("layer", "full"):
        raise ImageBuildError(f"push_mode {push_mode!r}: use 'layer' or 'full'")
    started = time.monotonic()
    reporter = _reporter(progress, log)
    chunk_store = open_store(store)
    access = access if access is not None else RegistryAccess.from_host()
    context = _Context(store_location=store, store=chunk_store, cache=StepCache(chunk_store), access=access,
                       reporter=reporter, work_dir=work_dir, runtime_root=runtime_root,
                       mount_options={"cache_dir": cache_dir} if cache_dir else {}, push_mode=push_mode,
                       step_timeout=step_timeout)
    access_checked = False
    parent: StepRecord | None = None
    results: list[StepResult] = []
    for number, step in enumerate(image.steps, 1):
        reporter.begin(number, len(image.steps), step)
        step_started = time.monotonic()
        try:
            inputs = _step_inputs(number, step)
            key = step_key(parent.reference if parent else None, step.definition(), inputs)
            try:
                record = None if force_build or step.force_build else context.cache.lookup(key)
            except ImageBuildError as error:
                raise BuildError(number, step, f"has a damaged cache record ({error}); rebuild it with force_build")
            cached = record is not None
            containers = 0
            if record is None:
                if not access_checked and _uses_registries(step):
                    access.check()
                    reporter.note(access.describe())
                    access_checked = True
                record, containers = _build_step_reporting_errors(context, number, step, parent)
                record.seconds = time.monotonic() - step_started
                context.cache.record(key, record)
        except BaseException:
            reporter.failed(time.monotonic() - step_started)
            raise
        if cached:
            result = StepResult(number, step.describe(), key, record.reference, True,
                                time.monotonic() - step_started, 0, record.entries, record.file_bytes, 0)
        else:
            result = StepResult(number, step.describe(), key, record.reference, False, record.seconds, containers,
                                record.entries, record.file_bytes, record.uploaded_bytes, record.push_seconds)
        reporter.end(result)
        results.append(result)
        parent = record
    assert parent is not None  # an Image has at least its base
    config = config_from_json(parent.config)
    if name is not None:
        context.cache.name_image(ImageRecord(name=name, reference=parent.reference,
                                             steps=[step.describe() for step in image.steps], built_at=time.time(),
                                             file_bytes=parent.file_bytes, config=parent.config))
    return BuildResult(parent.reference, config, results, time.monotonic() - started, name)


def _uses_registries(step: Step) -> bool:
    return step.kind in ("debian_slim", "apt_install", "pip_install", "pip_install_from_requirements", "run_commands")


def _step_inputs(number: int, step: Step) -> dict[str, str]:
    """Content digests of what the step reads from the host."""
    if step.local_path is None:
        return {}
    path = step.local_path
    try:
        if step.kind in ("add_local_file", "pip_install_from_requirements"):
            if not os.path.isfile(path):
                raise BuildError(number, step, f"needs the file {path}, which is not a file")
            return {"content": file_digest(path)}
        if step.kind == "add_local_dir" and not os.path.isdir(path):
            raise BuildError(number, step, f"needs the directory {path}, which is not a directory")
        if step.kind == "from_dir":
            if not os.path.isdir(path):
                raise BuildError(number, step, f"needs the directory {path}, which is not a directory")
            return {"tree": tree_digest(path, owners=True)}
        if step.kind == "from_oci" and not os.path.exists(path):
            raise BuildError(number, step, f"needs {path}, which does not exist")
        return {"tree": tree_digest(path)}
    except OSError as error:
        raise BuildError(number, step, f"cannot read {error.filename or path}: {error.strerror}") from None


def _build_step_reporting_errors(context: _Context, number: int, step: Step,
                                 parent: StepRecord | None) -> tuple[StepRecord, int]:
    """_build_step, with what the filesystem, the runtime or the host refuses reported as the step's BuildError."""
    from coldbrew.fs.errors import FsError
    from coldbrew.runtime.errors import RuntimeFailure, describe_os_error

    try:
        return _build_step(context, number, step, parent)
    except BuildError:
        raise
    except (ImageBuildError, FsError, RuntimeFailure) as error:
        raise BuildError(number, step, f"failed: {error}") from None
    except OSError as error:
        raise BuildError(number, step, f"failed: {describe_os_error(error)}") from None


def _build_step(context: _Context, number: int, step: Step, parent: StepRecord | None) -> tuple[StepRecord, int]:
    """Build one step; returns its record and the number of containers it ran."""
    os.makedirs(context.work_dir, exist_ok=True)
    if step.kind == "debian_slim":
        return _bootstrap_debian(context, number, step), 0
    if step.kind == "from_dir":
        return _push_tree(context, step, step.local_path, _default_config(env=(DEFAULT_PATH,)), None), 0
    if step.kind == "from_oci":
        return _import_oci(context, number, step), 0
    assert parent is not None
    config = config_from_json(parent.config)
    if step.kind == "env":
        config = dataclasses.replace(config, env=_env_with(config.env, step.param("vars")))
        return _push_config(context, step, parent, config), 0
    if step.kind in ("entrypoint", "cmd"):
        config = dataclasses.replace(config, **{step.kind: tuple(step.param("args"))})
        return _push_config(context, step, parent, config), 0
    if step.kind == "workdir":
        path = step.param("path")
        config = dataclasses.replace(config, working_dir=path)
        index = load_index(context.store, parent.reference)
        try:
            existing = lookup_path(index, path)
            exists = existing is not None and stat.S_ISDIR(index.mode(existing))
        finally:
            index.release()
        if exists:
            return _push_config(context, step, parent, config), 0
        return _push_changes(context, number, step, parent, config,
                             lambda staging, index: _stage_directories(staging, index, path)), 0
    if step.kind in ("add_local_file", "add_local_dir"):
        return _push_changes(context, number, step, parent, config,
                             lambda staging, index: _stage_local(number, step, staging, index)), 0
    return _run_step(context, number, step, parent, config)


# --- bases -------------------------------------------------------------------------------------------------------

def _record(step: Step, parent: str | None, config: "ImageConfig", push: Callable[[], Any]) -> StepRecord:
    """Store the step's image with `push()` (a PushResult) and make its record, the push timed."""
    started = time.monotonic()
    result = push()
    return StepRecord(reference=result.reference, config=config.to_json(), step=step.describe(), parent=parent,
                      entries=result.entries, file_bytes=result.file_bytes, uploaded_bytes=result.uploaded_bytes,
                      push_seconds=time.monotonic() - started)


def _push_tree(context: _Context, step: Step, tree: str, config: "ImageConfig", parent: str | None) -> StepRecord:
    from coldbrew.fs.pushing import push

    return _record(step, parent, config, lambda: push(tree, context.store, metadata={"image_config": config.to_json()},
                                                      progress=context.reporter.transfer))


def _bootstrap_debian(context: _Context, number: int, step: Step) -> StepRecord:
    """mmdebstrap (minbase) on the host into a new directory, made slim, then pushed."""
    access = context.access
    suite = step.param("suite")
    directory = tempfile.mkdtemp(prefix="debian-", dir=context.work_dir)
    tree = os.path.join(directory, "tree")
    try:
        apt_conf = os.path.join(directory, "apt.conf")
        with open(apt_conf, "w") as file:
            file.write(access.apt_config_for(access.ca_bundle))
        command = ["mmdebstrap", f"--variant={step.param('variant')}", "--mode=root", "--format=directory",
                   "--include=" + ",".join(step.param("packages")), f"--aptopt={apt_conf}",
                   *(f"--dpkgopt={option}" for option in step.param("dpkg_options")), suite, tree,
                   f"deb {access.debian_mirror} {suite} main", f"deb {access.debian_mirror} {suite}-updates main",
                   f"deb {access.debian_security_mirror} {suite}-security main"]
        context.reporter.output("$ " + shlex.join(command))
        tail: list[str] = []
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT)
        except FileNotFoundError:
            raise BuildError(number, step, "needs mmdebstrap, which is not installed (apt-get install mmdebstrap)")
        assert process.stdout is not None
        try:
            for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                context.reporter.output(line)
                tail = (tail + [line])[-OUTPUT_TAIL_LINES:]
        except BaseException:  # interrupted: mmdebstrap unmounts what it mounted in the tree on SIGTERM
            process.terminate()
            process.wait()
            raise
        status = process.wait()
        if status != 0:
            raise BuildError(number, step, f"failed: mmdebstrap exited with status {status}", "\n".join(tail),
                             status)
        _make_slim(tree)
        config = _default_config(env=(DEFAULT_PATH,), cmd=("python3",))
        return _push_tree(context, step, tree, config, None)
    finally:
        remove_tree(directory)


def remove_tree(directory: str) -> None:
    """rmtree of a build's own directory, after detaching anything still mounted below it (a chroot's /proc left by
    an interrupted mmdebstrap, a step root whose unmount failed): rmtree must never descend into a mount."""
    from coldbrew.fs.mounts import mounts_below, umount

    for point in mounts_below(os.path.realpath(directory)):
        umount(point, detach=True)
    shutil.rmtree(directory, ignore_errors=True)


def _make_slim(tree: str) -> None:
    """What mmdebstrap leaves that an image should not carry: the host's resolver, host name and apt options;
    and Debian's marker that keeps pip off the system Python (an image's Python is the image's own)."""
    with open(os.path.join(tree, "etc/resolv.conf"), "w"):
        pass  # empty: a container gets its resolver bound here
    os.chmod(os.path.join(tree, "etc/resolv.conf"), 0o644)
    with open(os.path.join(tree, "etc/hostname"), "w") as file:
        file.write("localhost\n")
    library = os.path.join(tree, "usr/lib")
    markers = [os.path.join(library, name, "EXTERNALLY-MANAGED") for name in _listdir(library)
               if name.startswith("python3")]
    for path in [os.path.join(tree, "etc/apt/apt.conf.d/99mmdebstrap"), *markers]:
        if os.path.lexists(path):
            os.unlink(path)


def _import_oci(context: _Context, number: int, step: Step) -> StepRecord:
    from .oci import ImageImportError, import_oci

    directory = tempfile.mkdtemp(prefix="oci-", dir=context.work_dir)
    try:
        tree = os.path.join(directory, "tree")
        try:
            name = step.param("name")
            source = f"{step.local_path}:{name}" if name else step.local_path
            # device nodes (a debootstrapped /dev) are inert in the tree; in a container the device cgroup rules
            config = import_oci(source, tree, progress=context.reporter.transfer, allow_devices=True)
        except ImageImportError as error:
            raise BuildError(number, step, f"could not import the image: {error}") from None
        return _push_tree(context, step, tree, config, None)
    finally:
        remove_tree(directory)


# --- steps without a container -----------------------------------------------------------------------------------

def _push_config(context: _Context, step: Step, parent: StepRecord, config: "ImageConfig") -> StepRecord:
    """The parent's tree with a new image config: only the index header changes."""
    from coldbrew.fs.layer import push_metadata

    return _record(step, parent.reference, config,
                   lambda: push_metadata(parent.reference, context.store, {"image_config": config.to_json()}))


def _push_changes(context: _Context, number: int, step: Step, parent: StepRecord, config: "ImageConfig",
                  stage: Callable[[str, "Index"], None]) -> StepRecord:
    """A new image from the parent's with the changes `stage(directory, parent_index)` lays out in an
    upper-directory-shaped directory (its root and the parent directories it makes carry the parent's metadata)."""
    from coldbrew.fs.layer import push_layer

    index = load_index(context.store, parent.reference)
    directory = tempfile.mkdtemp(prefix="stage-", dir=context.work_dir)
    try:
        _copy_metadata(index, 1, directory)
        stage(directory, index)
        return _record(step, parent.reference, config,
                       lambda: push_layer(index, directory, context.store,
                                          metadata=dict(index.metadata, image_config=config.to_json()),
                                          progress=context.reporter.transfer))
    finally:
        index.release()
        remove_tree(directory)


def _copy_metadata(index: "Index", ino: int, path: str) -> None:
    attributes = index.attributes(ino)
    os.chown(path, attributes.uid, attributes.gid)
    os.chmod(path, stat.S_IMODE(attributes.mode))
    os.utime(path, ns=(attributes.mtime_ns, attributes.mtime_ns))


def lookup_path(index: "Index", path: str) -> int | None:
    """The inode of an absolute path in an image (symlinks are not followed), or None."""
    ino = 1
    for part in path.strip("/").split("/"):
        if not part:
            continue
        found = index.lookup(ino, part.encode())
        if found is None:
            return None
        ino = found
    return ino


def _stage_directories(staging: str, index: "Index", path: str) -> list[str]:
    """Make `path` and its parents in the staging directory: those the parent image has keep its metadata, new
    ones are root's 0755. Returns the directories made new. A non-directory on the way is an error."""
    made = []
    ino: int | None = 1
    current = staging
    for part in path.strip("/").split("/"):
        if not part:
            continue
        current = os.path.join(current, part)
        ino = index.lookup(ino, part.encode()) if ino is not None else None
        if ino is not None and not stat.S_ISDIR(index.mode(ino)):
            raise ImageBuildError(f"{path}: {current.removeprefix(staging)} is not a directory in the image")
        os.mkdir(current, 0o755)
        if ino is not None:
            _copy_metadata(index, ino, current)
        else:
            os.chmod(current, 0o755)
            made.append(current)
    return made


def _stage_local(number: int, step: Step, staging: str, index: "Index") -> None:
    """add_local_file / add_local_dir: the copy, owned by root, modes and times kept."""
    remote = step.param("remote")
    source = step.local_path
    try:
        if step.kind == "add_local_file":
            if remote.endswith("/") or remote == "/":
                remote = remote.rstrip("/") + "/" + os.path.basename(source)
            _stage_directories(staging, index, os.path.dirname(remote))
            target = os.path.join(staging, remote.lstrip("/"))
            shutil.copy2(source, target, follow_symlinks=True)
            os.chown(target, 0, 0)
            return
        if remote == "/":
            target = staging
        else:
            _stage_directories(staging, index, os.path.dirname(remote))
            target = os.path.join(staging, remote.lstrip("/"))
            existing = lookup_path(index, remote)
            os.mkdir(target)
            if existing is not None and stat.S_ISDIR(index.mode(existing)):
                _copy_metadata(index, existing, target)
            else:
                shutil.copystat(source, target)
        for entry in os.listdir(source):
            path = os.path.join(source, entry)
            destination = os.path.join(target, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.copytree(path, destination, symlinks=True)
            else:
                shutil.copy2(path, destination, follow_symlinks=False)
        for root, directories, files in os.walk(target):
            for name in directories + files:
                os.lchown(os.path.join(root, name), 0, 0)
    except OSError as error:
        raise BuildError(number, step, f"could not copy {error.filename or source}: {error.strerror}") from None


# --- steps in a container ----------------------------------------------------------------------------------------

@dataclass
class _Bind:
    source: str
    destination: str


def _step_commands(step: Step) -> tuple[list[str], list[tuple[str, str]], list[_Bind]]:
    """The shell commands a step runs, the environment it adds, and the host files it binds."""
    if step.kind == "apt_install":
        packages = shlex.join(step.param("packages"))
        return ([f"apt-get update -q && apt-get install -y -q --no-install-recommends {packages} && apt-get clean "
                 "&& rm -rf /var/lib/apt/lists/*"], [("DEBIAN_FRONTEND", "noninteractive")], [])
    pip_env = [("PIP_ROOT_USER_ACTION", "ignore"), ("PIP_BREAK_SYSTEM_PACKAGES", "1")]
    if step.kind == "pip_install":
        return [f"python3 -m pip install --no-cache-dir {shlex.join(step.param('packages'))}"], pip_env, []
    if step.kind == "pip_install_from_requirements":
        inside = f"{BUILD_DIR}/requirements.txt"
        return ([f"python3 -m pip install --no-cache-dir -r {inside}"], pip_env,
                [_Bind(step.local_path, inside)])
    return list(step.param("commands")), [], []


def _run_step(context: _Context, number: int, step: Step, parent: StepRecord,
              config: "ImageConfig") -> tuple[StepRecord, int]:
    """Run the step's commands in containers over a writable root on the parent image, then push the changes."""
    from coldbrew.fs.rootfs import create_root, remove_root

    commands, step_env, binds = _step_commands(step)
    directory = tempfile.mkdtemp(prefix="step-", dir=context.work_dir)
    root_dir = os.path.join(directory, "root")
    index = load_index(context.store, parent.reference)
    containers = 0
    try:
        rootfs = create_root(parent.reference, root_dir, store=_absolute_location(context.store_location),
                             **context.mount_options)
        bundle = os.path.join(directory, "bundle")
        os.mkdir(bundle)
        spec, destinations = _build_spec(context.access, rootfs, config, step_env, binds, directory)
        for position, command in enumerate(commands, 1):
            spec["process"]["args"] = ["/bin/sh", "-c", command]
            with open(os.path.join(bundle, "config.json"), "w") as file:
                json.dump(spec, file)
            context.reporter.output("$ " + command)
            status, tail = _run_container(context, bundle, step)
            containers += 1
            if status != 0:
                which = f"command {position} of {len(commands)} " if len(commands) > 1 else ""
                reason = "timed out" if status is None else f"failed: {which}exited with status {status}"
                raise BuildError(number, step, reason, "\n".join(tail), status)
        upper = os.path.join(root_dir, "upper")
        _prune_mount_points(upper, index, destinations)
        metadata = dict(index.metadata, image_config=config.to_json())
        from coldbrew.fs.layer import LayerError, push_layer
        from coldbrew.fs.pushing import push

        def push_merged() -> Any:
            return push(rootfs, context.store, metadata=metadata, progress=context.reporter.transfer)

        def push_changes() -> Any:
            try:
                return push_layer(index, upper, context.store, metadata=metadata, progress=context.reporter.transfer)
            except LayerError as error:
                context.reporter.note(f"{error}: pushing the whole tree")
                return push_merged()

        record = _record(step, parent.reference, config, push_changes if context.push_mode == "layer" else push_merged)
    finally:
        index.release()
        if os.path.isdir(root_dir):
            remove_root(root_dir)
        remove_tree(directory)
    return record, containers


def _absolute_location(location: str) -> str:
    return location if location.startswith(("http://", "https://")) else os.path.abspath(location)


def _build_spec(access: RegistryAccess, rootfs: str, config: "ImageConfig", step_env: list[tuple[str, str]],
                binds: list[_Bind], directory: str) -> tuple[dict, list[str]]:
    """The build container's config.json (process args are set per command) and its mount destinations."""
    import resource

    from coldbrew.runtime.features import default_spec

    spec = default_spec()
    uid, gid = resolve_user(rootfs, config.user)
    env = [DEFAULT_PATH, "HOME=/root" if uid == 0 else "HOME=/", *access.container_env()]
    env = list(_env_with(env, [tuple(entry.split("=", 1)) for entry in config.env if "=" in entry]))
    env = list(_env_with(env, step_env))
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    spec["process"] = {
        "terminal": False, "user": {"uid": uid, "gid": gid}, "args": ["/bin/sh"], "env": env,
        "cwd": config.working_dir or "/",
        "capabilities": {kind: list(BUILD_CAPABILITIES) for kind in ("bounding", "effective", "permitted")},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
        "noNewPrivileges": False,
    }
    spec["root"] = {"path": rootfs, "readonly": False}
    spec["hostname"] = "coldbrew-build"
    # No network namespace of its own: the registries are reached as the host reaches them.
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    files = os.path.join(directory, "registry")
    os.mkdir(files)
    all_binds = list(binds)
    if access.ca_bundle:
        all_binds.append(_Bind(access.ca_bundle, access.ca_destination))
    if access.pip_config:
        all_binds.append(_Bind(_write(files, "pip.conf", access.pip_config), f"{BUILD_DIR}/pip.conf"))
    apt = access.apt_config_for(access.ca_destination)
    if apt:
        all_binds.append(_Bind(_write(files, "apt.conf", apt), f"{BUILD_DIR}/apt.conf"))
    all_binds += [_Bind(path, path) for path in access.read_only_dirs]
    if access.resolv_conf:
        all_binds.append(_Bind(access.resolv_conf, "/etc/resolv.conf"))
    spec["mounts"] += [{"destination": bind.destination, "type": "bind", "source": bind.source,
                        "options": ["rbind", "ro", "nosuid", "nodev"]} for bind in all_binds]
    return spec, [mount["destination"] for mount in spec["mounts"]]


def _write(directory: str, name: str, text: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as file:
        file.write(text)
    os.chmod(path, 0o644)
    return path


def resolve_user(rootfs: str, user: str) -> tuple[int, int]:
    """uid and gid of an image's user ("", "name", "uid", "name:group", "uid:gid"), from its /etc/passwd and
    /etc/group where names are given."""
    if not user:
        return 0, 0
    name, _, group = user.partition(":")
    uid, gid = _lookup_id(rootfs, "etc/passwd", name, user)
    if group:
        gid = _lookup_id(rootfs, "etc/group", group, user)[0]
    return uid, gid


def _lookup_id(rootfs: str, table: str, name: str, user: str) -> tuple[int, int]:
    if name.isdigit():
        if table == "etc/group":
            return int(name), 0
        # A numeric uid with no group given: its passwd entry's group, else 0, as runc does.
        for fields in _table(rootfs, table):
            if fields[2:3] == [name] and fields[3:4] and fields[3].isdigit():
                return int(name), int(fields[3])
        return int(name), 0
    for fields in _table(rootfs, table):
        if fields[0] == name and len(fields) > 3 and fields[2].isdigit():
            return int(fields[2]), int(fields[3]) if fields[3].isdigit() else 0
    raise ImageBuildError(f"image user {user!r}: {name!r} is not in the image's /{table}")


def _table(rootfs: str, table: str) -> list[list[str]]:
    from coldbrew.runtime import libc

    root = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # resolved inside the image: its /etc/passwd may be a symlink to an absolute path
        fd = libc.openat2(root, table, os.O_RDONLY | os.O_CLOEXEC, libc.RESOLVE_IN_ROOT | libc.RESOLVE_NO_MAGICLINKS)
    except OSError as error:
        if error.errno == errno.ENOENT:
            return []
        raise
    finally:
        os.close(root)
    with open(fd, errors="replace") as file:
        return [line.rstrip("\n").split(":") for line in file if line.strip() and not line.startswith("#")]


def _run_container(context: _Context, bundle: str, step: Step) -> tuple[int | None, list[str]]:
    """Run the bundle's process, streaming its output; (exit status or None when it timed out, last lines)."""
    runtime = context.get_runtime()
    container_id = f"build-{uuid.uuid4().hex[:12]}"
    read_end, write_end = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    container = None
    tail: list[str] = []
    try:
        try:
            container = runtime.create(container_id, bundle, stdio=(null, write_end, write_end))
        finally:
            os.close(write_end)
            write_end = -1
        container.start()
        deadline = time.monotonic() + context.step_timeout if context.step_timeout else None
        pending = b""
        timed_out = False
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([read_end], [], [], wait)
            if not ready:
                timed_out = True
                container.kill("KILL", all_processes=True)
                break
            data = os.read(read_end, 65536)
            if not data:
                break
            pending += data
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").rstrip("\r")
                context.reporter.output(line)
                tail.append(line)
            del tail[:-OUTPUT_TAIL_LINES]
        if pending:
            line = pending.decode(errors="replace")
            context.reporter.output(line)
            tail = (tail + [line])[-OUTPUT_TAIL_LINES:]
        status = container.wait(keep=False)
        return (None if timed_out else status), tail
    finally:
        if write_end >= 0:
            os.close(write_end)
        os.close(read_end)
        os.close(null)
        if container is not None:
            container.delete(force=True)


def _prune_mount_points(upper: str, index: "Index", destinations: list[str]) -> None:
    """Remove from the upper directory what the runtime made only to mount on (an empty file or directory the
    parent image lacks), and parent directories left holding no change: the mounts are not part of the image."""
    for destination in sorted(set(destinations), key=lambda path: -path.count("/")):
        path = destination.rstrip("/")
        while path and path != "/":
            upper_path = upper + path
            try:
                st = os.lstat(upper_path)
            except FileNotFoundError:
                path = os.path.dirname(path)
                continue
            ino = lookup_path(index, path)
            if stat.S_ISDIR(st.st_mode):
                if os.listdir(upper_path):
                    break
                if ino is not None:
                    from coldbrew.fs.layer import is_opaque

                    attributes = index.attributes(ino)
                    if (is_opaque(os.fsencode(upper_path)) or not stat.S_ISDIR(attributes.mode)
                            or (attributes.mode, attributes.uid, attributes.gid) != (st.st_mode, st.st_uid, st.st_gid)):
                        break
                os.rmdir(upper_path)
            elif stat.S_ISREG(st.st_mode) and st.st_size == 0 and ino is None:
                os.unlink(upper_path)
            else:
                break
            path = os.path.dirname(path)


# --- bundles -----------------------------------------------------------------------------------------------------

def resolve_image(store: Any, reference_or_name: str) -> str:
    """An image reference from a reference (64 hex digits, optionally `blake3:`) or a name built into `store`."""
    text = reference_or_name.removeprefix("blake3:")
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return text.lower()
    record = StepCache(store).image(check_name(reference_or_name))
    if record is None:
        raise ImageBuildError(f"no image named {reference_or_name!r} in the store {store.describe()} (and it is not "
                              "a 64-digit reference)")
    return record.reference


def make_bundle(store: str, reference_or_name: str, directory: str, *, args: list[str] | None = None,
                network: str = "none", terminal: bool = False, cache_dir: str | None = None) -> str:
    """An OCI bundle in `directory` (new or empty): its root is the image lazily mounted with a writable layer
    (`directory/rootfs`, see coldbrew.fs.create_root), its config.json the image config's process (entrypoint +
    `args` or cmd, env, working directory, user). network: "none" (a network namespace of its own, loopback only)
    or "host" (the host's, with its /etc/resolv.conf). Returns the directory; `remove_bundle` takes it down."""
    from coldbrew.fs.rootfs import create_root, remove_root
    from coldbrew.fs.store import open_store
    from coldbrew.runtime.features import default_spec

    if network not in ("none", "host"):
        raise ImageBuildError(f"network {network!r}: use 'none' or 'host'")
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and os.listdir(directory):
        raise ImageBuildError(f"bundle directory {directory} is not empty")
    chunk_store = open_store(store)
    reference = resolve_image(chunk_store, reference_or_name)
    config = image_config(chunk_store, reference)
    process_args = list(config.entrypoint) + (list(args) if args else list(config.cmd))
    if not process_args:
        raise ImageBuildError(f"image {reference_or_name} has neither entrypoint nor cmd: give the command to run")
    rootfs = create_root(reference, directory, store=_absolute_location(store),
                         **({"cache_dir": cache_dir} if cache_dir else {}))
    try:
        spec = default_spec()
        uid, gid = resolve_user(rootfs, config.user)
        env = list(_env_with([DEFAULT_PATH, "HOME=/root" if uid == 0 else "HOME=/"],
                             [tuple(entry.split("=", 1)) for entry in config.env]))
        if terminal:
            env.append("TERM=xterm")
        spec["process"].update(terminal=terminal, user={"uid": uid, "gid": gid}, args=process_args, env=env,
                               cwd=config.working_dir or "/")
        spec["root"] = {"path": "rootfs", "readonly": False}
        if config.labels:
            spec["annotations"] = dict(config.labels)
        if network == "host":
            spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
            if os.path.isfile("/etc/resolv.conf"):
                spec["mounts"].append({"destination": "/etc/resolv.conf", "type": "bind", "source": "/etc/resolv.conf",
                                       "options": ["rbind", "ro", "nosuid", "nodev"]})
        with open(os.path.join(directory, "config.json"), "w") as file:
            json.dump(spec, file, indent=2)
    except BaseException:
        remove_root(directory)
        raise
    return directory


def remove_bundle(directory: str) -> None:
    """Take down a bundle made by make_bundle: the root's mounts, its writable layer and config.json."""
    from coldbrew.fs.rootfs import remove_root

    directory = os.path.abspath(directory)
    config = os.path.join(directory, "config.json")
    if not os.path.isfile(config):
        raise ImageBuildError(f"{directory} is not a bundle (no config.json)")
    os.unlink(config)
    remove_root(directory)
