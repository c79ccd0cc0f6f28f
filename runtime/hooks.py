"""OCI hooks: each runs with the container's state JSON on its stdin, and a timeout if the spec gives one."""

from __future__ import annotations

import json
import subprocess

from .errors import RuntimeFailure
from .spec import Hook


class HookFailed(RuntimeFailure):
    pass


def run_hooks(hooks: tuple[Hook, ...], state: dict, stage: str) -> None:
    """Run `hooks` in order; the first failure raises HookFailed naming the stage and the hook."""
    payload = json.dumps(state).encode()
    for i, hook in enumerate(hooks):
        args = list(hook.args) or [hook.path]
        bad = next((e for e in hook.env if "=" not in e), None)
        if bad is not None:
            raise HookFailed(f"{stage} hook {i} ({hook.path}): env entry {bad!r} is not of the form KEY=value")
        env = dict(e.split("=", 1) for e in hook.env)
        try:
            result = subprocess.run(args, executable=hook.path, input=payload, env=env, capture_output=True,
                                    timeout=hook.timeout, close_fds=True)
        except subprocess.TimeoutExpired:
            raise HookFailed(f"{stage} hook {i} ({hook.path}) timed out after {hook.timeout}s") from None
        except OSError as e:
            raise HookFailed(f"{stage} hook {i} ({hook.path}): {e.strerror}") from None
        except ValueError as e:  # a path, argument or variable the OS cannot take (not UTF-8 encodable)
            raise HookFailed(f"{stage} hook {i} ({hook.path!r}): {e}") from None
        if result.returncode != 0:
            output = (result.stderr or result.stdout).decode(errors="replace")
            # one line: the CLI prints one line per error, and clients read their log line by line
            detail = "; ".join(line.strip() for line in output.splitlines() if line.strip())[-500:]
            raise HookFailed(f"{stage} hook {i} ({hook.path}) exited with status {result.returncode}: {detail}")
