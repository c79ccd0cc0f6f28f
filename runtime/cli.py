"""`coldbrew`: runc's command line over the in-process API, so containerd's shim and podman's conmon can drive it.

Thin on purpose: each verb parses its arguments and calls coldbrew.runtime.container. This is on the path of every
container start, so only the verb's own modules are imported.
"""

from __future__ import annotations

import gc
import os
import sys

from . import cjson
from .cli_args import Namespace, Option, UsageError, Verb, parse, usage

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

VERSION = "0.1.0"
SPEC_VERSION = "1.2.0"

GLOBAL_OPTIONS = (
    Option("--root", "root", value=True, default="/run/coldbrew", help="state directory for containers"),
    Option("--log", "log", value=True, help="also write errors to this file"),
    Option("--log-format", "log_format", value=True, default="text", help="text or json"),
    Option("--debug", "debug", help="more output"),
    Option("--systemd-cgroup", "systemd_cgroup", help="not supported: refused with an error"),
    Option("--rootless", "rootless", value=True, default="auto", help="accepted for runc compatibility"),
    Option("--criu", "criu", value=True, help="path of the criu binary"),
    Option("-v --version", "version", help="print the version"),
)
_CREATE_OPTIONS = (
    Option("-b --bundle", "bundle", value=True, default=".", help="the bundle directory"),
    Option("--console-socket", "console_socket", value=True, help="unix socket that receives the pty master"),
    Option("--pid-file", "pid_file", value=True, help="write the init's pid here"),
    Option("--pidfd-socket", "pidfd_socket", value=True, help="not supported"),
    Option("--no-pivot", "no_pivot", help="chroot instead of pivot_root"),
    Option("--no-new-keyring", "no_new_keyring", help="accepted for runc compatibility"),
    Option("--preserve-fds", "preserve_fds", value=True, default="0", help="pass N more fds (from 3 on)"),
)
# runc's checkpoint/restore flags; those CRIU features coldbrew does not drive are refused when given
_CRIU_OPTIONS = (
    Option("--image-path", "image_path", value=True, help="the checkpoint's directory (default ./checkpoint)"),
    Option("--work-path", "work_path", value=True, help="where CRIU writes its log (checkpoint: the image path by default)"),
    Option("--tcp-established", "tcp_established", help="include established TCP connections"),
    Option("--ext-unix-sk", "ext_unix_sk", help="allow unix sockets connected outside the container"),
    Option("--shell-job", "shell_job", help="the container runs in a terminal outside it"),
    Option("--file-locks", "file_locks", help="include file locks"),
    Option("--manage-cgroups-mode", "manage_cgroups_mode", value=True, default="",
           help="soft, full, strict or ignore (CRIU's default: soft)"),
    Option("--empty-ns", "empty_ns", repeat=True, help="not supported"),
    Option("--page-server", "page_server", value=True, help="not supported"),
    Option("--lazy-pages", "lazy_pages", help="not supported"),
    Option("--status-fd", "status_fd", value=True, help="not supported"),
    Option("--auto-dedup", "auto_dedup", help="not supported"),
)
_RESOURCE_FLAGS = {"memory": ("memory", "limit"), "memory-swap": ("memory", "swap"),
                   "memory-reservation": ("memory", "reservation"), "cpu-shares": ("cpu", "shares"),
                   "cpu-quota": ("cpu", "quota"), "cpu-period": ("cpu", "period"),
                   "cpu-rt-runtime": ("cpu", "realtimeRuntime"), "cpu-rt-period": ("cpu", "realtimePeriod"),
                   "pids-limit": ("pids", "limit"), "blkio-weight": ("blockIO", "weight")}


def _verbs() -> dict[str, Verb]:
    verbs = (
        Verb("create", _create, "create a container, its init waiting for start", _CREATE_OPTIONS),
        Verb("start", _start, "start a created container"),
        Verb("run", _run, "create, start and wait for a container, then delete it", _CREATE_OPTIONS + (
            Option("-d --detach", "detach", help="return once started"),
            Option("--keep", "keep", help="do not delete the container after it exits"),
            Option("--snapshot", "snapshot", value=True,
                   help="start from the snapshot KEY if a valid one exists, else make it at the warm point"),
            Option("--snapshot-store", "snapshot_store", value=True,
                   help="chunk store of --snapshot (default $COLDBREW_STORE or /var/lib/coldbrew/store)"))),
        Verb("state", _state, "print the OCI state of a container"),
        Verb("kill", _kill, "send a signal to a container's init (or all its processes)",
             (Option("-a --all", "all", help="signal every process of the container"),),
             optional=(("signal", "SIGTERM"),)),
        Verb("delete", _delete, "delete a container and everything made for it",
             (Option("-f --force", "force", help="kill it first if it runs"),)),
        Verb("list", _list, "list containers", (
            Option("-f --format", "format", value=True, default="table", help="table or json"),
            Option("-q --quiet", "quiet", help="ids only")), positionals=()),
        Verb("exec", _exec, "run a process in a running container", (
            Option("-p --process", "process", value=True, help="process.json to run"),
            Option("--console-socket", "console_socket", value=True, help="unix socket for the pty master"),
            Option("-d --detach", "detach", help="return once started"),
            Option("--pid-file", "pid_file", value=True, help="write the process's pid here"),
            Option("-t --tty", "tty", help="allocate a terminal"),
            Option("--cwd", "cwd", value=True, help="working directory"),
            Option("-e --env", "env", repeat=True, help="KEY=value, repeatable"),
            Option("-u --user", "user", value=True, help="UID[:GID]"),
            Option("-g --additional-gids", "additional_gids", repeat=True, help="repeatable"),
            Option("-c --cap", "cap", repeat=True, help="add a capability, repeatable"),
            Option("--no-new-privs", "no_new_privs", help="set no_new_privs"),
            Option("--preserve-fds", "preserve_fds", value=True, default="0", help="pass N more fds"),
            Option("--pidfd-socket", "pidfd_socket", value=True, help="not supported"),
            Option("--process-label", "process_label", value=True, help="not supported"),
            Option("--apparmor", "apparmor", value=True, help="AppArmor profile")), rest="args"),
        Verb("ps", _ps, "list the processes of a container",
             (Option("-f --format", "format", value=True, default="table", help="table or json"),), rest="ps_args"),
        Verb("pause", _pause, "freeze every process of a container"),
        Verb("resume", _resume, "thaw a paused container"),
        Verb("events", _events, "print a container's resource statistics", (
            Option("--stats", "stats", help="print one statistics object and exit"),
            Option("--interval", "interval", value=True, default="5s", help="between statistics"))),
        Verb("update", _update, "change a running container's resource limits", (
            Option("-r --resources", "resources", value=True, help="LinuxResources JSON file, or - for stdin"),
            Option("--cpuset-cpus", "cpuset_cpus", value=True, help=""),
            Option("--cpuset-mems", "cpuset_mems", value=True, help=""),
            *(Option(f"--{flag}", flag.replace("-", "_"), value=True, help="") for flag in _RESOURCE_FLAGS))),
        Verb("features", _features, "print what this runtime supports (runtime-spec features JSON)", positionals=()),
        Verb("spec", _spec, "write a default config.json into the bundle", (
            Option("-b --bundle", "bundle", value=True, default=".", help="where to write config.json"),
            Option("--rootless", "rootless", help="a spec for a user namespace")), positionals=()),
        Verb("network", _network, "attach a container to a bridge", (
            Option("--bridge", "bridge", value=True, default="coldbrew0", help="the bridge (made if missing)"),
            Option("--address", "address", value=True, help="the container's address, e.g. 10.88.0.2/16"),
            Option("--gateway", "gateway", value=True, help="the bridge's address and the default route"),
            Option("--ifname", "ifname", value=True, default="eth0", help="the interface in the container")),
             positionals=("action", "id")),
        Verb("checkpoint", _checkpoint, "checkpoint a running container with CRIU", _CRIU_OPTIONS + (
            Option("--leave-running", "leave_running", help="keep the container running after the checkpoint"),
            Option("--pre-dump", "pre_dump", help="dump memory only, for a later checkpoint with --parent-path"),
            Option("--parent-path", "parent_path", value=True,
                   help="a pre-dump to build on, relative to the image path"))),
        Verb("restore", _restore, "restore a container from a checkpoint", _CRIU_OPTIONS + (
            Option("-b --bundle", "bundle", value=True, help="the bundle (default: the one checkpointed)"),
            Option("-d --detach", "detach", help="return once restored"),
            Option("--pid-file", "pid_file", value=True, help="write the init's pid here"),
            Option("--console-socket", "console_socket", value=True, help="unix socket that receives the pty master"),
            Option("--no-pivot", "no_pivot", help="accepted for runc compatibility"),
            Option("--no-subreaper", "no_subreaper", help="accepted for runc compatibility"))),
    )
    return {v.name: v for v in verbs}


# ---- verbs --------------------------------------------------------------------------------------------------------

def _runtime(args: Namespace) -> Any:
    from .container import Runtime

    return Runtime(args.root, subreaper=args.verb in ("run", "exec"))


def _create_kwargs(args: Namespace) -> dict:
    if args.pidfd_socket:
        from .errors import Unsupported

        raise Unsupported("--pidfd-socket is not supported by coldbrew")
    return {"console_socket": args.console_socket, "pid_file": args.pid_file, "no_pivot": args.no_pivot,
            "preserve_fds": _count(args.preserve_fds, "--preserve-fds")}


def _count(value: str, flag: str) -> int:
    if not value.isdigit():
        raise UsageError(f"{flag} {value!r}: give a number")
    return int(value)


def _choice(value: str, flag: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UsageError(f"{flag} {value!r}: give one of {', '.join(choices)}")
    return value


def _create(args: Namespace) -> int:
    _runtime(args).create(args.id, args.bundle, **_create_kwargs(args))
    return 0


def _run(args: Namespace) -> int:
    if args.snapshot is not None:
        return _run_with_snapshot(args)
    runtime = _runtime(args)
    container = runtime.create(args.id, args.bundle, **_create_kwargs(args))
    try:
        if args.detach:
            container.start()
            return 0
        _forward_signals(container.pid)
        container.start()
        code = container.wait(keep=args.keep)
        return 0 if code is None else code
    finally:
        if not args.detach and not args.keep:
            container.delete(force=True)


def _run_with_snapshot(args: Namespace) -> int:
    """`run --snapshot KEY` (coldbrew.snapshot.warm): restored, or cold with a snapshot at the warm point."""
    if not args.snapshot:
        raise UsageError("--snapshot needs a key (any non-empty string naming the snapshot)")
    for flag, given in (("--detach", args.detach), ("--keep", args.keep), ("--console-socket", args.console_socket),
                        ("--pidfd-socket", args.pidfd_socket), ("--preserve-fds", args.preserve_fds != "0")):
        if given:
            raise UsageError(f"--snapshot cannot be combined with {flag}: the run relays the container's stdio "
                             "and deletes it at its end, and a restored copy has no descriptors from outside")
    from ..fs.cli import DEFAULT_STORE
    from ..snapshot import warm

    def say(message: str) -> None:
        sys.stderr.write(f"coldbrew: {message}\n")
        _log(args, "warning", message)

    store = args.snapshot_store or os.environ.get("COLDBREW_STORE", DEFAULT_STORE)
    result = warm.run(_runtime(args), args.id, args.bundle, args.snapshot, store=store, criu=args.criu,
                      pid_file=args.pid_file, no_pivot=args.no_pivot, log=say,
                      on_start=lambda container: _forward_signals(container.pid))
    return result.exit_code


def _forward_signals(pid: int) -> None:
    import _signal as signal  # the C core: `signal` imports `enum`

    def forward(signum: int, _frame: Any) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                signal.SIGWINCH):
        signal.signal(sig, forward)


def _start(args: Namespace) -> int:
    _runtime(args).get(args.id).start()
    return 0


def _state(args: Namespace) -> int:
    _print_json(_runtime(args).get(args.id).state(), indent=2)
    return 0


def _kill(args: Namespace) -> int:
    _runtime(args).get(args.id).kill(args.signal, all_processes=args.all)
    return 0


def _delete(args: Namespace) -> int:
    from .errors import ContainerNotFound
    from .state import StateDir

    try:
        container = _runtime(args).get(args.id)
    except ContainerNotFound:
        if args.force:
            # runc: --force of a missing container is no error; a create killed half-way leaves a directory
            # without state.json, which would block the id for good
            leftover = StateDir(args.root, args.id)
            if leftover.exists():
                leftover.remove()
            return 0
        raise
    container.delete(force=args.force)
    return 0


def _list(args: Namespace) -> int:
    states = [c.state() for c in _runtime(args).list()]
    if args.quiet:
        for s in states:
            print(s["id"])
    elif args.format == "json":
        _print_json(states)
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [(s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"], s["owner"] or "root")
                 for s in states]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _exec(args: Namespace) -> int:
    from .spec import Process

    runtime = _runtime(args)
    container = runtime.get(args.id)
    if args.process:
        with open(args.process, "rb") as f:
            try:
                raw = cjson.loads(f.read())
            except ValueError as e:
                from .errors import SpecError

                raise SpecError("", f"{args.process} is not valid JSON: {e}") from None
    else:
        if not args.args:
            from .errors import RuntimeFailure

            raise RuntimeFailure("exec needs --process FILE or the command to run after the container id")
        raw = dict(container.spec().raw["process"])
        raw["args"] = args.args
        raw["terminal"] = args.tty
        raw.pop("consoleSize", None)
        raw["env"] = list(raw.get("env") or []) + args.env
        if args.cwd:
            raw["cwd"] = args.cwd
        if args.user:
            uid, _, gid = args.user.partition(":")
            raw["user"] = {**raw.get("user", {}), "uid": int(uid), "gid": int(gid or 0)}
        if args.additional_gids:
            raw.setdefault("user", {})["additionalGids"] = [int(g) for g in args.additional_gids]
        if args.cap:
            caps = dict(raw.get("capabilities") or {})
            for key in ("bounding", "effective", "permitted", "ambient"):
                caps[key] = sorted(set(caps.get(key) or []) | set(args.cap))
            raw["capabilities"] = caps
        if args.no_new_privs:
            raw["noNewPrivileges"] = True
    process = Process.from_spec(raw, "process")
    proc = container.exec(process, console_socket=args.console_socket, pid_file=args.pid_file,
                          preserve_fds=_count(args.preserve_fds, "--preserve-fds"))
    if args.detach:
        return 0
    _forward_signals(proc.pid)
    code = proc.wait()
    return 0 if code is None else code


def _ps(args: Namespace) -> int:
    pids = _runtime(args).get(args.id).processes()
    if args.format == "json":
        _print_json(pids)
        return 0
    import subprocess

    out = subprocess.run(["ps", *(args.ps_args or ["-ef"])], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    column = lines[0].split().index("PID")
    print(lines[0])
    wanted = set(pids)
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > column and fields[column].isdigit() and int(fields[column]) in wanted:
            print(line)
    return 0


def _pause(args: Namespace) -> int:
    _runtime(args).get(args.id).pause()
    return 0


def _resume(args: Namespace) -> int:
    _runtime(args).get(args.id).resume()
    return 0


def _events(args: Namespace) -> int:
    import time

    from .errors import NotRunning

    container = _runtime(args).get(args.id)
    if args.stats:
        _print_json({"type": "stats", "id": args.id, "data": container.stats()})
        return 0
    interval = _parse_duration(args.interval)
    while True:
        try:
            _print_json({"type": "stats", "id": args.id, "data": container.stats()})
        except NotRunning:
            return 0
        sys.stdout.flush()
        time.sleep(interval)


def _parse_duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
            value = float(text[: -len(suffix)]) * units[suffix]
            if value > 0:
                return value
    from .errors import RuntimeFailure

    raise RuntimeFailure(f"--interval {text!r}: give a positive duration such as 500ms, 5s or 1m")


def _update(args: Namespace) -> int:
    from .errors import SpecError

    resources: dict = {}
    if args.resources:
        source = sys.stdin if args.resources == "-" else open(args.resources)
        with source:
            try:
                resources = cjson.loads(source.read())
            except ValueError as e:
                raise SpecError("resources", f"is not valid JSON: {e}") from None
    for flag, (section, key) in _RESOURCE_FLAGS.items():
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            try:
                resources.setdefault(section, {})[key] = int(value)
            except ValueError:
                raise SpecError(f"--{flag}", f"{value!r} is not an integer") from None
    for attr, key in (("cpuset_cpus", "cpus"), ("cpuset_mems", "mems")):
        if getattr(args, attr) is not None:
            resources.setdefault("cpu", {})[key] = getattr(args, attr)
    _runtime(args).get(args.id).update(resources)
    return 0


def _features(args: Namespace) -> int:
    from .features import features

    _print_json(features(), indent=2)
    return 0


def _spec(args: Namespace) -> int:
    from .errors import RuntimeFailure
    from .features import default_spec

    path = os.path.join(args.bundle, "config.json")
    if os.path.exists(path):
        raise RuntimeFailure(f"{path} exists: remove it first")
    with open(path, "w") as f:
        f.write(cjson.dumps(default_spec(rootless=args.rootless), indent=2))
    return 0


def _network(args: Namespace) -> int:
    _choice(args.action, "network", ("attach",))
    if not args.address:
        raise UsageError("network attach needs --address, e.g. 10.88.0.2/16")
    container = _runtime(args).get(args.id)
    _print_json(container.attach_network(bridge=args.bridge, address=args.address, gateway=args.gateway,
                                         ifname=args.ifname))
    return 0


def _criu_options(args: Namespace) -> dict:
    """The checkpoint/restore options both verbs share, as coldbrew.snapshot takes them."""
    for flag, given in (("--empty-ns", args.empty_ns), ("--page-server", args.page_server),
                        ("--lazy-pages", args.lazy_pages), ("--status-fd", args.status_fd),
                        ("--auto-dedup", args.auto_dedup)):
        if given:
            from .errors import Unsupported

            raise Unsupported(f"{flag} is not supported by coldbrew's checkpoint/restore")
    if args.manage_cgroups_mode:
        _choice(args.manage_cgroups_mode, "--manage-cgroups-mode", ("soft", "full", "strict", "ignore"))
    return {"work_path": args.work_path, "tcp_established": args.tcp_established, "ext_unix_sk": args.ext_unix_sk,
            "shell_job": args.shell_job, "file_locks": args.file_locks,
            "manage_cgroups_mode": args.manage_cgroups_mode or None, "criu": args.criu}


def _checkpoint(args: Namespace) -> int:
    from ..snapshot.checkpoint import snapshot

    options = _criu_options(args)
    container = _runtime(args).get(args.id)
    snapshot(container, args.image_path or os.path.join(os.getcwd(), "checkpoint"), parent_path=args.parent_path,
             leave_running=args.leave_running, pre_dump=args.pre_dump, **options)
    return 0


def _restore(args: Namespace) -> int:
    from ..snapshot.checkpoint import restore

    options = _criu_options(args)
    container = restore(_runtime(args), args.image_path or os.path.join(os.getcwd(), "checkpoint"), args.id,
                        args.bundle, console_socket=args.console_socket, pid_file=args.pid_file, **options)
    if args.detach:
        return 0
    try:
        _forward_signals(container.pid)
        code = container.wait(keep=False)  # the restored init is our child (CRIU restores it as our sibling's)
        return 0 if code is None else code
    finally:
        container.delete(force=True)


# ---- plumbing -----------------------------------------------------------------------------------------------------

def _print_json(value: Any, indent: int | None = None) -> None:
    sys.stdout.write(cjson.dumps(value, indent=indent) + "\n")


def _log_error(args: Namespace, message: str) -> None:
    message = message.replace("\n", "\\n")  # one error, one line: clients read the last line
    sys.stderr.write(f"coldbrew: {message}\n")
    _log(args, "error", message)


def _log(args: Namespace, level: str, message: str) -> None:
    """A line in --log, in runc's text or JSON format (containerd reads the last error from it)."""
    if not args.log:
        return
    from .state import now_rfc3339

    if args.log_format == "json":
        line = cjson.dumps({"level": level, "msg": message, "time": now_rfc3339()})
    else:
        line = f'time="{now_rfc3339()}" level={level} msg="{message}"'
    try:
        with open(args.log, "a") as f:
            f.write(line + "\n")
    except OSError:
        pass


# Verbs that allocate little and end soon (run and exec wait idle): they keep the garbage collector off (run_and_exit)
_SHORT_VERBS = ("create", "start", "run", "exec", "state", "kill", "delete")

# Command groups beyond runc's verbs, each a module with its own `main(argv) -> int` (imported only when used).
GROUPS = {"fs": "coldbrew.fs.cli", "gpu": "coldbrew.runtime.gpu_cli", "image": "coldbrew.imagebuild.cli"}
GROUP_HELP = {"fs": "push, mount and serve lazily fetched images", "gpu": "GPU inventory, health and CDI specs",
              "image": "build images defined in Python, import OCI images, make bundles"}


def main(argv: list[str] | None = None) -> int:
    from .errors import RuntimeFailure

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in GROUPS:
        gc.enable()  # long-running commands among them (coldbrew fs mount serves a FUSE mount)
        import importlib

        return importlib.import_module(GROUPS[argv[0]]).main(argv[1:])
    verbs = _verbs()
    try:
        args = parse(argv, GLOBAL_OPTIONS, verbs)
    except UsageError as e:
        sys.stderr.write(f"coldbrew: {e}\n")
        return 1
    if args.help or (not args.verb and not args.version):
        sys.stdout.write(usage(GLOBAL_OPTIONS, verbs, args.verb))
        if not args.verb:
            sys.stdout.write("\ncommand groups (coldbrew GROUP --help):\n" + "".join(
                f"  {name:<10} {about}\n" for name, about in GROUP_HELP.items()))
        return 0
    if args.version:
        print(f"coldbrew version {VERSION}\ncommit: none\nspec: {SPEC_VERSION}")
        return 0
    if args.verb not in _SHORT_VERBS:
        gc.enable()
    try:
        _choice(args.log_format, "--log-format", ("text", "json"))
        if hasattr(args, "format"):
            _choice(args.format, "--format", ("table", "json"))
        if args.systemd_cgroup:
            from .errors import Unsupported

            raise Unsupported("--systemd-cgroup is not supported: coldbrew manages cgroupfs directly")
        if args.debug:
            _log(args, "debug", f"coldbrew {' '.join(argv)}")
            if not args.log:
                sys.stderr.write(f"coldbrew: debug: {args.verb} {getattr(args, 'id', '')}\n")
        return args.handler(args)
    except RuntimeFailure as e:
        _log_error(args, str(e))
        return 1
    except OSError as e:
        from .errors import describe_os_error

        _log_error(args, describe_os_error(e))
        return 1
    except KeyboardInterrupt:
        return 130


def run_and_exit() -> None:
    """The console script's entry: skip the interpreter's teardown (tens of ms), flushing output first.

    Without the cyclic garbage collector until main() knows the verb: the collections that the imports' allocations
    set off walk every object, ~1.5 ms of each container start (and in the forked init, copy-on-write faults).
    """
    gc.disable()
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
