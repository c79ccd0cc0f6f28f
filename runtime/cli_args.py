"""Command-line parsing for `coldbrew`, table-driven, without argparse.

argparse costs more to import and to build (gettext, locale, shutil, a formatter per option) than the rest of a
`coldbrew start`; runc's surface is small and regular, so a table and one loop do. Accepted forms, as urfave/cli
(runc's parser) takes them: `--flag value`, `--flag=value`, `-f value`, `-f` for switches, `--switch=false`,
`-no-subreaper` (one dash, long name), `--` to end options. Options may come before or between positionals; a verb
with `rest` takes everything after its positionals as-is (`exec ID CMD ARGS...`).
"""

from __future__ import annotations

from .errors import RuntimeFailure


class UsageError(RuntimeFailure):
    pass


class Option:
    __slots__ = ("names", "dest", "takes_value", "default", "repeat", "help")

    def __init__(self, names: str, dest: str, *, value: bool = False, default: object = None, repeat: bool = False,
                 help: str = "") -> None:
        self.names = names.split()
        self.dest = dest
        self.takes_value = value or repeat
        self.default = [] if repeat else (default if value else False)
        self.repeat = repeat
        self.help = help


class Verb:
    __slots__ = ("name", "handler", "help", "options", "positionals", "optional", "rest")

    def __init__(self, name: str, handler: object, help: str, options: tuple[Option, ...] = (),
                 positionals: tuple[str, ...] = ("id",), optional: tuple[tuple[str, str], ...] = (),
                 rest: str | None = None) -> None:
        self.name = name
        self.handler = handler
        self.help = help
        self.options = options
        self.positionals = positionals
        self.optional = optional  # (name, default) positionals that may be left out
        self.rest = rest


class Namespace:
    """The parsed arguments: options and positionals as attributes."""

    def __init__(self, **values: object) -> None:
        self.__dict__.update(values)


def parse(argv: list[str], options: tuple[Option, ...], verbs: dict[str, Verb]) -> Namespace:
    """Global options, then a verb and its own options and positionals."""
    result = Namespace(verb=None, handler=None, help=False)
    _defaults(options, result)
    index = _parse_options(argv, 0, options, result)
    if index >= len(argv):
        return result
    name = argv[index]
    verb = verbs.get(name)
    if verb is None:
        raise UsageError(f"unknown command {name!r}; see 'coldbrew --help'")
    result.verb, result.handler = name, verb.handler
    _defaults(verb.options, result)
    wanted = list(verb.positionals) + [n for n, _ in verb.optional]
    for n, default in verb.optional:
        setattr(result, n, default)
    given = 0
    i = index + 1
    while i < len(argv):
        if given >= len(wanted) and verb.rest:
            break
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("-") and arg != "-":
            i = _parse_options(argv, i, verb.options, result, verb=name)
            continue
        if given >= len(wanted):
            raise UsageError(f"{name}: unexpected argument {arg!r}")
        setattr(result, wanted[given], arg)
        given += 1
        i += 1
    while given < len(wanted) and i < len(argv) and not verb.rest:
        setattr(result, wanted[given], argv[i])
        given += 1
        i += 1
    if result.help:
        return result
    if given < len(verb.positionals):
        raise UsageError(f"{name}: missing {verb.positionals[given]!r}; see 'coldbrew {name} --help'")
    if verb.rest:
        setattr(result, verb.rest, argv[i:])
    elif i < len(argv):
        raise UsageError(f"{name}: unexpected argument {argv[i]!r}")
    return result


def _defaults(options: tuple[Option, ...], result: Namespace) -> None:
    for opt in options:
        setattr(result, opt.dest, list(opt.default) if opt.repeat else opt.default)


def _parse_options(argv: list[str], i: int, options: tuple[Option, ...], result: Namespace,
                   verb: str | None = None) -> int:
    """Consume options from argv[i]; return the index of the first argument that is not one."""
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-" or arg == "--":
            return i
        if arg in ("-h", "--help"):
            result.help = True
            i += 1
            continue
        name, eq, inline = arg.partition("=")
        opt = _find(options, name)
        if opt is None:
            where = f"{verb}: " if verb else ""
            raise UsageError(f"{where}unknown option {name!r}")
        if opt.takes_value:
            if eq:
                value = inline
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                raise UsageError(f"option {name} needs a value")
            if opt.repeat:
                getattr(result, opt.dest).append(value)
            else:
                setattr(result, opt.dest, value)
        else:
            if eq and inline not in ("true", "false"):
                raise UsageError(f"option {name} takes true or false, not {inline!r}")
            setattr(result, opt.dest, not eq or inline == "true")
        i += 1
    return i


def _find(options: tuple[Option, ...], name: str) -> Option | None:
    if name.startswith("-") and not name.startswith("--") and len(name) > 2:
        name = "-" + name  # urfave/cli accepts -long-name with one dash (containerd passes -no-subreaper)
    for opt in options:
        if name in opt.names:
            return opt
    return None


def usage(options: tuple[Option, ...], verbs: dict[str, Verb], verb: str | None) -> str:
    if verb is None:
        lines = ["usage: coldbrew [global options] COMMAND [options] ARGS", "", "commands:"]
        lines += [f"  {v.name:<10} {v.help}" for v in verbs.values()]
        lines += ["", "global options:"] + _describe(options)
        return "\n".join(lines) + "\n"
    v = verbs[verb]
    args = " ".join(p.upper() for p in v.positionals) + "".join(f" [{n.upper()}]" for n, _ in v.optional)
    if v.rest:
        args += f" [{v.rest.upper()}...]"
    lines = [f"usage: coldbrew {v.name} [options] {args}", "", v.help]
    if v.options:
        lines += ["", "options:"] + _describe(v.options)
    return "\n".join(lines) + "\n"


def _describe(options: tuple[Option, ...]) -> list[str]:
    rows = []
    for opt in options:
        flags = ", ".join(opt.names) + (" VALUE" if opt.takes_value else "")
        rows.append(f"  {flags:<28} {opt.help}")
    return rows
