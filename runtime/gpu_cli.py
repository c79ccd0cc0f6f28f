"""`coldbrew gpu ...`: list this host's GPUs, check their health, write a CDI spec for them.

    coldbrew gpu ls [--json]          index, UUID, model, memory, temperature and health of each GPU
    coldbrew gpu check [--json]       the health verdict of each GPU; exit status 1 when one fails
    coldbrew gpu cdi [--output PATH]  write a CDI spec (nvidia.com/gpu) for this host (default /etc/cdi/nvidia.yaml;
                                      "-" prints it)

Without a GPU each command exits 1 with a one-line message saying what is missing. Not on a container's start path:
argparse is fine here.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import RuntimeFailure, describe_os_error

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .gpuinfo import GpuInfo

MiB = 1 << 20


def _parser() -> argparse.ArgumentParser:
    from .gpu import DEFAULT_CDI_SPEC_PATH

    parser = argparse.ArgumentParser(prog="coldbrew gpu", description="NVIDIA GPUs: inventory, health, CDI spec")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = commands.add_parser("ls", help="list the GPUs")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    check = commands.add_parser("check", help="check each GPU's health (exit status 1 when one fails)")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    cdi = commands.add_parser("cdi", help="write a CDI spec for this host's GPUs")
    cdi.add_argument("--output", default=DEFAULT_CDI_SPEC_PATH,
                     help="where to write it (default %(default)s; '-' prints it)")
    return parser


def _gpus() -> list[GpuInfo]:
    from .gpu import NoGpu
    from .gpuinfo import list_gpus

    gpus = list_gpus()
    if not gpus:
        raise NoGpu("the NVIDIA driver is loaded but reports no GPU")
    return gpus


def _ls(args: argparse.Namespace) -> int:
    gpus = _gpus()
    if args.json:
        print(json.dumps([g.to_dict() for g in gpus], indent=2))
        return 0
    rows = [("INDEX", "UUID", "MODEL", "MEMORY USED/TOTAL", "TEMP", "HEALTH")]
    for g in gpus:
        memory = (f"{g.memory_used // MiB}/{g.memory_total // MiB} MiB"
                  if g.memory_total is not None and g.memory_used is not None else "?")
        rows.append((str(g.index), g.uuid or "?", g.name or "?", memory,
                     f"{g.temperature} C" if g.temperature is not None else "?",
                     "healthy" if g.healthy else "UNHEALTHY: " + "; ".join(g.problems)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def _check(args: argparse.Namespace) -> int:
    gpus = _gpus()
    if args.json:
        print(json.dumps([{"index": g.index, "uuid": g.uuid, "healthy": g.healthy, "problems": list(g.problems)}
                          for g in gpus], indent=2))
    else:
        for g in gpus:
            verdict = "healthy" if g.healthy else "UNHEALTHY: " + "; ".join(g.problems)
            print(f"GPU {g.index} ({g.uuid or 'UUID unknown'}, {g.name or 'model unknown'}): {verdict}")
    return 0 if all(g.healthy for g in gpus) else 1


def _cdi(args: argparse.Namespace) -> int:
    from .gpu import generate_cdi_spec, write_cdi_spec

    spec = generate_cdi_spec()
    names = [d["name"] for d in spec["devices"]]
    if args.output == "-":
        from .cdi import validate_spec

        validate_spec(spec, "(stdout)")
        import yaml

        sys.stdout.write(yaml.safe_dump(spec, sort_keys=False, default_flow_style=False))
        return 0
    path = write_cdi_spec(spec, args.output)
    print(f"wrote {path}: {spec['kind']} devices {', '.join(names)}")
    return 0


_COMMANDS = {"ls": _ls, "check": _check, "cdi": _cdi}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except RuntimeFailure as error:
        sys.stderr.write(f"coldbrew gpu: {error}\n")
        return 1
    except OSError as error:
        sys.stderr.write(f"coldbrew gpu: {describe_os_error(error)}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
