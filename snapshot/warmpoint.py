"""Tell coldbrew "I am warmed up now": the program's side of the warm point. Standard library only, one file:
import it as `coldbrew.snapshot.warmpoint`, or copy it into an image and `import warmpoint`.

    import warmpoint
    model = load_the_model()          # the slow start-up: imports, weights, caches
    state = warmpoint.ready()         # "snapshotted", "restored", "failed" or "none"
    serve(model)                      # every later run of `coldbrew run --snapshot KEY` starts here

The protocol, for any language
------------------------------
Under `coldbrew run --snapshot KEY` the program's environment names two inherited descriptors:

    COLDBREW_WARM_FD=3          the write end of a pipe: write the line "ready\\n" to it once, when warmed up
    COLDBREW_WARM_REPLY_FD=4    the read end of another: then read one line from it

The runtime snapshots the process while it waits for that line (the process is frozen for the dump, then carries
on), and the line says which copy of the process reads it:

    snapshotted   the cold run: the snapshot was taken; carry on
    restored      a copy restored from the snapshot, waking up here; carry on (re-open what must be fresh:
                  connections to the outside, clocks and random seeds that must differ between copies)
    failed        the cold run: no snapshot could be taken (the runtime's stderr says why); carry on

End of file instead of a line means the runtime went away without answering. Without COLDBREW_WARM_FD the program
is not run under a warm-point runtime: it just carries on. Afterwards the program may close both descriptors (this
helper does, and removes the two variables from its environment, so that its children do not try again).

From a shell (busybox sh, dash, bash):

    if [ -n "$COLDBREW_WARM_FD" ]; then
        echo ready >&3; read answer <&4    # the descriptors are 3 and 4 unless the variables say otherwise
    fi

What is in the process when it writes "ready" is what every restored copy starts with: state drawn before it (a
random seed, a token) is the same in all of them.
"""

from __future__ import annotations

import os

WARM_ENV = "COLDBREW_WARM_FD"
REPLY_ENV = "COLDBREW_WARM_REPLY_FD"
ANSWERS = ("snapshotted", "restored", "failed")
_LINE_MAX = 64


def _descriptor(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def ready() -> str:
    """Say the program is warmed up and wait for the runtime's answer: "snapshotted" (this is the cold run; the
    snapshot was taken), "restored" (this is a copy restored from it), "failed" (no snapshot was taken), or "none"
    (not under a warm-point runtime, or it went away). Call it once."""
    warm, reply = _descriptor(WARM_ENV), _descriptor(REPLY_ENV)
    if warm is None or reply is None:
        return "none"
    for name in (WARM_ENV, REPLY_ENV):
        os.environ.pop(name, None)
    try:
        try:
            os.write(warm, b"ready\n")
        except OSError:  # not a descriptor of ours any more, or nobody reads it: no runtime listens
            return "none"
        line = b""
        while not line.endswith(b"\n") and len(line) < _LINE_MAX:
            try:
                part = os.read(reply, _LINE_MAX - len(line))
            except OSError:
                return "none"
            if not part:
                return "none"
            line += part
        answer = line.decode(errors="replace").strip()
        return answer if answer in ANSWERS else "none"
    finally:
        _close(warm)
        _close(reply)
