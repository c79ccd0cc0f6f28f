"""`coldbrew`: runc's command line over the in-process API, so containerd's shim and podman's conmon can drive it.

Thin on purpose: each verb parses its arguments and calls coldbrew.runtime.container. This is on the path of every
container start, so only the verb's own modules are imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

VERSION = "0.1.0"
SPEC_VERSION = "1.2.0"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # usage errors exit 1 with one line, as runc's
        sys.stderr.write(f"coldbrew: {message}\n")
        raise SystemExit(1)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="coldbrew", description="An OCI runtime (runc-compatible) built for fast cold starts.")
    p.add_argument("--root", default="/run/coldbrew", help="state directory for containers")
    p.add_argument("--log", default=None, help="write errors (and debug lines) to this file")
    p.add_argument("--log-format", default="text", choices=("text", "json"))
    p.add_argument("--debug", action="store_true")
    p.add_argument("--systemd-cgroup", action="store_true", help="not supported: refused with an error")
    p.add_argument("--rootless", default="auto")
    p.add_argument("--criu", default=None, help="path of the criu binary (for checkpoint/restore)")
    p.add_argument("-v", "--version", action="store_true")
    verbs = p.add_subparsers(dest="verb", parser_class=_Parser)

    def verb(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_text)
        sub.set_defaults(handler=handler)
        return sub

    def create_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("-b", "--bundle", default=".")
        sub.add_argument("--console-socket")
        sub.add_argument("--pid-file")
        sub.add_argument("--pidfd-socket")
        sub.add_argument("--no-pivot", action="store_true")
        sub.add_argument("--no-new-keyring", action="store_true")
        sub.add_argument("--preserve-fds", type=int, default=0)
        sub.add_argument("id")

    create_options(verb("create", _create, "create a container, its init waiting for start"))
    run = verb("run", _run, "create, start and wait for a container, then delete it")
    create_options(run)
    run.add_argument("-d", "--detach", action="store_true")
    run.add_argument("--keep", action="store_true", help="do not delete the container after it exits")
    verb("start", _start, "start a created container").add_argument("id")
    verb("state", _state, "print the OCI state of a container").add_argument("id")
    kill = verb("kill", _kill, "send a signal to a container's init (or all its processes)")
    kill.add_argument("-a", "--all", action="store_true")
    kill.add_argument("id")
    kill.add_argument("signal", nargs="?", default="SIGTERM")
    delete = verb("delete", _delete, "delete a container and everything made for it")
    delete.add_argument("-f", "--force", action="store_true")
    delete.add_argument("id")
    lst = verb("list", _list, "list containers")
    lst.add_argument("-f", "--format", default="table", choices=("table", "json"))
    lst.add_argument("-q", "--quiet", action="store_true")
    ex = verb("exec", _exec, "run a process in a running container")
    ex.add_argument("-p", "--process")
    ex.add_argument("--console-socket")
    ex.add_argument("-d", "--detach", action="store_true")
    ex.add_argument("--pid-file")
    ex.add_argument("-t", "--tty", action="store_true")
    ex.add_argument("--cwd")
    ex.add_argument("-e", "--env", action="append", default=[])
    ex.add_argument("-u", "--user")
    ex.add_argument("--additional-gids", "-g", action="append", default=[])
    ex.add_argument("-c", "--cap", action="append", default=[])
    ex.add_argument("--no-new-privs", action="store_true")
    ex.add_argument("--preserve-fds", type=int, default=0)
    ex.add_argument("--pidfd-socket")
    ex.add_argument("id")
    ex.add_argument("args", nargs=argparse.REMAINDER)
    ps = verb("ps", _ps, "list the processes of a container")
    ps.add_argument("-f", "--format", default="table", choices=("table", "json"))
    ps.add_argument("id")
    ps.add_argument("ps_args", nargs=argparse.REMAINDER)
    verb("pause", _pause, "freeze every process of a container").add_argument("id")
    verb("resume", _resume, "thaw a paused container").add_argument("id")
    events = verb("events", _events, "print a container's resource statistics")
    events.add_argument("--stats", action="store_true", help="print one statistics object and exit")
    events.add_argument("--interval", default="5s")
    events.add_argument("id")
    update = verb("update", _update, "change a running container's resource limits")
    update.add_argument("-r", "--resources", help="LinuxResources JSON file, or - for stdin")
    for flag in ("memory", "memory-swap", "memory-reservation", "cpu-shares", "cpu-quota", "cpu-period",
                 "cpu-rt-runtime", "cpu-rt-period", "pids-limit", "blkio-weight"):
        update.add_argument(f"--{flag}")
    update.add_argument("--cpuset-cpus")
    update.add_argument("--cpuset-mems")
    update.add_argument("id")
    verb("features", _features, "print what this runtime supports (runtime-spec features JSON)")
    spec = verb("spec", _spec, "write a default config.json into the bundle")
    spec.add_argument("-b", "--bundle", default=".")
    spec.add_argument("--rootless", action="store_true")
    net = verb("network", _network, "attach a container to a bridge, or detach it")
    net.add_argument("action", choices=("attach",))
    net.add_argument("id")
    net.add_argument("--bridge", default="coldbrew0")
    net.add_argument("--address", required=True, help="the container's address with prefix, e.g. 10.88.0.2/16")
    net.add_argument("--gateway", default=None)
    net.add_argument("--ifname", default="eth0")
    return p


# ---- verbs --------------------------------------------------------------------------------------------------------

def _runtime(args: argparse.Namespace) -> Any:
    from .container import Runtime

    return Runtime(args.root, subreaper=args.verb in ("run", "exec"))


def _create_kwargs(args: argparse.Namespace) -> dict:
    if args.pidfd_socket:
        from .errors import Unsupported

        raise Unsupported("--pidfd-socket is not supported by coldbrew")
    return {"console_socket": args.console_socket, "pid_file": args.pid_file, "no_pivot": args.no_pivot,
            "preserve_fds": args.preserve_fds}


def _create(args: argparse.Namespace) -> int:
    _runtime(args).create(args.id, args.bundle, **_create_kwargs(args))
    return 0


def _run(args: argparse.Namespace) -> int:
    runtime = _runtime(args)
    container = runtime.create(args.id, args.bundle, **_create_kwargs(args))
    try:
        if args.detach:
            container.start()
            return 0
        _forward_signals(container.pid)
        container.start()
        code = container.wait()
        return 0 if code is None else code
    finally:
        if not args.detach and not args.keep:
            container.delete(force=True)


def _forward_signals(pid: int) -> None:
    import signal

    def forward(signum: int, _frame: Any) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                signal.SIGWINCH):
        signal.signal(sig, forward)


def _start(args: argparse.Namespace) -> int:
    _runtime(args).get(args.id).start()
    return 0


def _state(args: argparse.Namespace) -> int:
    _print_json(_runtime(args).get(args.id).state(), indent=2)
    return 0


def _kill(args: argparse.Namespace) -> int:
    _runtime(args).get(args.id).kill(args.signal, all_processes=args.all)
    return 0


def _delete(args: argparse.Namespace) -> int:
    from .errors import ContainerNotFound

    try:
        container = _runtime(args).get(args.id)
    except ContainerNotFound:
        if args.force:
            return 0  # runc: delete --force of a missing container is not an error
        raise
    container.delete(force=args.force)
    return 0


def _list(args: argparse.Namespace) -> int:
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


def _exec(args: argparse.Namespace) -> int:
    from .spec import Process

    runtime = _runtime(args)
    container = runtime.get(args.id)
    if args.process:
        with open(args.process, "rb") as f:
            try:
                raw = json.load(f)
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
                          preserve_fds=args.preserve_fds)
    if args.detach:
        return 0
    _forward_signals(proc.pid)
    code = proc.wait()
    return 0 if code is None else code


def _ps(args: argparse.Namespace) -> int:
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


def _pause(args: argparse.Namespace) -> int:
    _runtime(args).get(args.id).pause()
    return 0


def _resume(args: argparse.Namespace) -> int:
    _runtime(args).get(args.id).resume()
    return 0


def _events(args: argparse.Namespace) -> int:
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


def _update(args: argparse.Namespace) -> int:
    from .errors import SpecError

    resources: dict = {}
    if args.resources:
        source = sys.stdin if args.resources == "-" else open(args.resources)
        with source:
            try:
                resources = json.load(source)
            except ValueError as e:
                raise SpecError("resources", f"is not valid JSON: {e}") from None
    flags = {"memory": ("memory", "limit"), "memory_swap": ("memory", "swap"),
             "memory_reservation": ("memory", "reservation"), "cpu_shares": ("cpu", "shares"),
             "cpu_quota": ("cpu", "quota"), "cpu_period": ("cpu", "period"),
             "cpu_rt_runtime": ("cpu", "realtimeRuntime"), "cpu_rt_period": ("cpu", "realtimePeriod"),
             "pids_limit": ("pids", "limit"), "blkio_weight": ("blockIO", "weight")}
    for attr, (section, key) in flags.items():
        value = getattr(args, attr)
        if value is not None:
            try:
                resources.setdefault(section, {})[key] = int(value)
            except ValueError:
                raise SpecError(f"--{attr.replace('_', '-')}", f"{value!r} is not an integer") from None
    for attr, key in (("cpuset_cpus", "cpus"), ("cpuset_mems", "mems")):
        if getattr(args, attr) is not None:
            resources.setdefault("cpu", {})[key] = getattr(args, attr)
    _runtime(args).get(args.id).update(resources)
    return 0


def _features(args: argparse.Namespace) -> int:
    from .features import features

    _print_json(features(), indent=2)
    return 0


def _spec(args: argparse.Namespace) -> int:
    from .errors import RuntimeFailure
    from .features import default_spec

    path = os.path.join(args.bundle, "config.json")
    if os.path.exists(path):
        raise RuntimeFailure(f"{path} exists: remove it first")
    with open(path, "w") as f:
        json.dump(default_spec(rootless=args.rootless), f, indent=2)
    return 0


def _network(args: argparse.Namespace) -> int:
    container = _runtime(args).get(args.id)
    _print_json(container.attach_network(bridge=args.bridge, address=args.address, gateway=args.gateway,
                                         ifname=args.ifname))
    return 0


# ---- plumbing -----------------------------------------------------------------------------------------------------

def _print_json(value: Any, indent: int | None = None) -> None:
    sys.stdout.write(json.dumps(value, indent=indent) + "\n")


def _log_error(args: argparse.Namespace, message: str) -> None:
    sys.stderr.write(f"coldbrew: {message}\n")
    if not args.log:
        return
    from .state import now_rfc3339

    if args.log_format == "json":
        line = json.dumps({"level": "error", "msg": message, "time": now_rfc3339()})
    else:
        line = f'time="{now_rfc3339()}" level=error msg="{message}"'
    try:
        with open(args.log, "a") as f:
            f.write(line + "\n")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"coldbrew version {VERSION}\ncommit: none\nspec: {SPEC_VERSION}")
        return 0
    if not args.verb:
        parser.print_help()
        return 0
    from .errors import RuntimeFailure

    try:
        if args.systemd_cgroup:
            from .errors import Unsupported

            raise Unsupported("--systemd-cgroup is not supported: coldbrew manages cgroupfs directly")
        return args.handler(args)
    except RuntimeFailure as e:
        _log_error(args, str(e))
        return 1
    except OSError as e:
        _log_error(args, f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
        return 1
    except KeyboardInterrupt:
        return 130
