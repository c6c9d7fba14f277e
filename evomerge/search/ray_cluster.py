"""Starting Ray for a search: connect to a cluster, or start a local one that dies with us.

A local ``ray.init`` starts GCS, raylet, log monitor and two agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``). GCS and raylet are killed with the driver (Ray sets
``PR_SET_PDEATHSIG``), but each agent, on seeing its raylet die, first reports the death to
the (dead) GCS with a fixed 60 s timeout, so after a SIGKILL of the driver the agents linger
about a minute (measured: 62 s, Ray 2.60). Ray has no setting for that timeout, so
:func:`start_ray` starts a small watchdog process, in its own session so that killing the
driver's process group spares it, that kills what is left of our local cluster as soon as
the driver or the cluster's GCS is gone, and then exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

_TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"
_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"
_SCAN_S = 2.0  # how often the watchdog looks for new processes of the cluster
_watchdogs: list[subprocess.Popen] = []  # kept so that Python reaps them


def start_ray(address: str | None, on_progress: Any = None) -> bool:
    """Connect to Ray at ``address``, or start a local Ray; True if this call started Ray.

    Does nothing and returns False when Ray is already initialised in this process; else
    reports the ``ray`` step (:class:`~evomerge.search.progress.Progress`) to ``on_progress``. A
    local
    Ray started before anything imported ``ray`` listens on the loopback interface only.

    >>> if start_ray(None):  # doctest: +SKIP
    ...     ray.shutdown()
    """
    if address is None and "RAY_ADDRESS" not in os.environ and "ray" not in sys.modules:
        # Ray picks the node address when it is imported; this makes a local cluster advertise
        # and listen on 127.0.0.1 only (the setting is named for Windows and macOS, where it
        # is the default). Too late once ray is imported: then the node's own IP is used.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    from evomerge.search.progress import Step

    step = Step("ray", 1, on_progress)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    linux = sys.platform.startswith("linux")  # the watchdog reads /proc
    before = set(_children(os.getpid())) if linux else set()
    with _without_token_notice():
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    started = [pid for pid in _children(os.getpid()) if pid not in before] if linux else []
    if started:  # a local cluster: the processes ray.init just started
        _watchdogs.append(_start_watchdog(started))
    step.advance()
    return True


@contextlib.contextmanager
def _without_token_notice() -> Iterator[None]:
    """Drop Ray's start-up notice that token authentication is on (it stays on), unless
    ``evomerge search -v`` (``EVOMERGE_VERBOSE``) asks for Ray's notices."""
    if os.environ.get("EVOMERGE_VERBOSE"):
        yield
        return

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_TOKEN_NOTICE)

    logger = logging.getLogger(_TOKEN_LOGGER)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _start_watchdog(roots: list[int]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "evomerge.search.ray_cluster", str(os.getpid()), *map(str, roots)]
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def watch(driver: int, roots: list[int]) -> None:
    """Until ``driver`` exits (or all ``roots`` did: ``ray.shutdown``), track the roots'
    process trees; then kill what is left of them (matched by pid and start time)."""
    fd = _pidfd(driver)
    tracked: dict[int, str] = {}
    while _start_time(driver) is not None:
        alive = [p for p in roots if _start_time(p) is not None]
        if not alive:
            break
        for pid in [*alive, *_descendants(alive)]:
            if (start := _start_time(pid)) is not None:
                tracked.setdefault(pid, start)
        if select.select([fd] if fd is not None else [], [], [], _SCAN_S)[0]:
            break
    for pid, start in tracked.items():
        if _start_time(pid) == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when ``pid`` exits (Linux 5.3+), else None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields  # a zombie has exited


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None


def _children(pid: int) -> list[int]:
    return [p for p, parent in _parents().items() if parent == pid]


def _descendants(roots: list[int]) -> list[int]:
    parents = _parents()
    found: set[int] = set()
    frontier = set(roots)
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return sorted(found)


def _parents() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _stat(int(name))) is not None:
            out[int(name)] = int(fields[1])
    return out


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of the driver: still clean up
    driver_pid, *root_pids = map(int, sys.argv[1:])
    watch(driver_pid, root_pids)
