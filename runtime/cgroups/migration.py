"""Keep the kernel's cgroup migration lock on its fast path while containers start.

Moving a process into a cgroup (a write to cgroup.procs, on v1 and v2 alike) takes the global
cgroup_threadgroup_rwsem for writing. When no migration happened for a while, taking it waits for an RCU grace
period (rcu_sync_enter): 6-20 ms on this 2-core VM, as long as half of runc's whole start, and paid by runc too. Within
about a grace period of the previous migration it costs ~0.05 ms.

`warm_migrations(seconds)` starts a thread that moves itself (the thread alone, through a v1 hierarchy's `tasks`
file) into the cgroup it is already in, at once and then every few milliseconds, until `seconds` from the last call.
Called as a start begins, the one slow wait runs in that thread, in parallel with the imports, the spec's parsing
and the namespace set-up, and the start's own migrations find the lock warm. Only that thread ever moves: were the
process moved meanwhile by someone else, nothing but this short-lived thread could end up behind. While it runs,
forks and exits on the host take the rwsem's slower reader path (an atomic instead of a per-CPU counter), the price
the `favordynmods` mount option pays permanently. cgroup v2 moves single threads only within threaded subtrees, so
on a pure v2 host there is no warm-up.

The CLI calls it first thing for the verbs that move processes (create, run, exec, restore), before the runtime's
modules are imported. The in-process API does not: within a create the fork follows the call too soon to gain
anything, and a scheduler that starts containers back to back keeps the lock warm by itself. One that starts
them after pauses can call it ahead of a burst.
"""

from __future__ import annotations

import _thread
import os
import time

_INTERVAL = 0.004  # well inside a grace period, so the lock never goes cold between two moves

_lock = _thread.allocate_lock()
_deadline = 0.0
_running = False


def warm_migrations(seconds: float = 0.1) -> None:
    """Keep cgroup migrations fast for the next `seconds` (extends a warm-up already running). Does nothing where
    there is no writable v1 hierarchy (pure cgroup v2, read-only cgroup file system, not root)."""
    global _deadline, _running
    with _lock:
        _deadline = max(_deadline, time.monotonic() + seconds)
        if _running:
            return
        path = _own_tasks_file()
        if path is None:
            return
        _running = True
    _thread.start_new_thread(_migrate_repeatedly, (path,))


def _migrate_repeatedly(path: str) -> None:
    global _running
    tid = str(_thread.get_native_id()).encode()
    while True:
        with _lock:
            if time.monotonic() >= _deadline:
                _running = False  # under the lock: a call from now on starts a new thread
                return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, tid)
            finally:
                os.close(fd)
        except OSError:  # moved meanwhile, cgroup gone, read-only: the starts just pay the wait
            with _lock:
                _running = False
            return
        time.sleep(_INTERVAL)


def _own_tasks_file() -> str | None:
    """The `tasks` file of this process's cgroup in a v1 controller hierarchy (any will do: the rwsem is global)."""
    from . import _own_cgroups, _resolve, mounts

    v1, _ = mounts()
    own = _own_cgroups()
    for name, mount in v1.items():
        if name != "systemd" and name in own:
            path = os.path.join(_resolve(".", mount, own, name), "tasks")
            if os.access(path, os.W_OK):
                return path
    return None
