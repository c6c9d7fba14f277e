"""A fixed pool of Ray worker actors, started once per search, and the one scheduler over it.

Every phase (the ask/tell loop, the held-out pass, the reference merges) submits calls with
:meth:`WorkerPool.submit` and collects them with :meth:`WorkerPool.next_result`, or hands a list
of calls to :meth:`WorkerPool.as_completed`. A worker that dies is restarted by Ray
(``max_restarts=-1``); while it reloads its models the pool pings it and keeps feeding the
others, and it rejoins the idle list when the ping answers. A call that runs past
``search.trial_timeout`` seconds is given up: its worker is killed (``ray.kill``, restarted by
Ray the same way) and the call fails with ``"timed out after N s"``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from evomerge.config import JobConfig


class Outcome(NamedTuple):
    """A finished call: its ``item``, the worker's result or an error string, and ``died``
    when the worker died under it (the call may well succeed on another worker)."""

    item: Any
    result: dict[str, Any] | None
    error: str | None
    died: bool


class WorkerPool:
    """Starts Ray (local unless an address is given) and ``resources.workers`` actors.

    One call per worker at a time: ``idle`` lists the free workers, ``inflight`` maps each
    call's ref to ``(worker, item)``, ``restarting`` maps a ping ref to ``(worker, since)``.
    A call that raised fails with the worker's exception as ``"Type: message"``; the actor
    lives on. A call whose actor died fails with ``"worker died: ..."``; one still running
    after ``search.trial_timeout`` seconds with ``"timed out after N s ..."`` (not retried by
    :meth:`as_completed`: a call that hung once is likely to hang again).
    """

    restart_timeout_s = 600.0

    def __init__(
        self,
        job: JobConfig,
        *,
        address: str | None = None,
        worker_class: type | None = None,
        on_progress: Any = None,
    ) -> None:
        from evomerge.search.ray_cluster import start_ray
        from evomerge.search.worker import MergeWorker, worker_actor_class

        self.job = job
        self.on_progress = on_progress  # gets the ray and workers steps
        self._own_ray = start_ray(address or job.resources.address, on_progress)
        try:
            check_fits(job)
        except ValueError:
            self._shutdown_own()
            raise
        cls = worker_actor_class(job, worker_class or MergeWorker)
        job_json = job.model_dump_json()
        self.actors = [
            cls.options(name=f"evomerge:{job.name}:{i}", get_if_exists=False).remote(job_json)
            for i in range(job.resources.workers)
        ]
        self.size = len(self.actors)
        self.idle = list(range(self.size))
        self.inflight: dict[Any, tuple[int, Any]] = {}
        self.restarting: dict[Any, tuple[int, float]] = {}
        self.timeout: float | None = job.search.trial_timeout
        self.deadlines: dict[Any, float] = {}  # call ref -> when it times out
        self._check_started()

    def _check_started(self) -> None:
        import ray

        from evomerge.search.progress import Step

        step = Step("workers", self.size, self.on_progress)
        refs = [a.ping.remote() for a in self.actors]
        try:
            pending = list(refs)
            while pending:  # one at a time, to count the workers ready
                ready, pending = ray.wait(pending, num_returns=1)
                ray.get(ready)  # a worker that failed to start raises here, before the count
                step.advance()
            self.info = ray.get(refs)
        except Exception as err:  # the worker's own error, e.g. a missing model path
            self.close()
            raise RuntimeError(f"a worker failed to start: {_cause(err)}") from None

    def refresh_info(self) -> list[dict[str, Any]]:
        """Ping every worker again (peak memory grows as they work) and keep what they say;
        the earlier info if one does not answer within seconds (e.g. it is restarting)."""
        import ray

        try:
            self.info = ray.get([a.ping.remote() for a in self.actors], timeout=10)
        except ray.exceptions.RayError:  # GetTimeoutError is one
            pass  # timings are a report, not a reason to fail a finished search
        return self.info

    def submit(self, item: Any, method: str, *args: Any) -> None:
        """Call ``method(*args)`` on an idle worker; its :class:`Outcome` carries ``item``."""
        worker = self.idle.pop()
        ref = getattr(self.actors[worker], method).remote(*args)
        self.inflight[ref] = (worker, item)
        if self.timeout is not None:  # the worker is idle: the call starts now
            self.deadlines[ref] = time.monotonic() + self.timeout

    def next_result(self, timeout: float | None = None) -> Outcome | None:
        """Wait for the next finished call; ``None`` when a restarted worker came back instead
        (it is idle again: submit more work) or when ``timeout`` seconds passed first."""
        import ray

        if not self.inflight and not self.restarting:
            raise RuntimeError("next_result: no call in flight and no worker restarting")
        start = time.monotonic()
        while True:
            wait = self._until_deadline(timeout, start)
            ready, _ = ray.wait([*self.inflight, *self.restarting], num_returns=1, timeout=wait)
            if ready:
                break
            late = self._timed_out()
            if late is not None:
                return late
            if timeout is not None and time.monotonic() - start >= timeout:
                return None
        [ref] = ready
        if ref in self.restarting:
            self._pinged(ref)
            return None
        worker, item = self.inflight.pop(ref)
        self.deadlines.pop(ref, None)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # the call raised; the actor lives on
            self.idle.append(worker)
            return Outcome(item, None, _cause(err), died=False)
        except ray.exceptions.RayError as err:  # the actor died: Ray restarts it, we ping it
            self._ping(worker, time.monotonic())
            return Outcome(item, None, f"worker died: {_cause(err)}", died=True)
        self.idle.append(worker)
        return Outcome(item, result, None, died=False)

    def _until_deadline(self, timeout: float | None, start: float) -> float | None:
        """How long ``ray.wait`` may block: until ``timeout`` or the first call's deadline."""
        now = time.monotonic()
        waits = [] if timeout is None else [start + timeout - now]
        if self.deadlines:
            waits.append(min(self.deadlines.values()) - now)
        return max(0.0, min(waits)) if waits else None

    def _timed_out(self) -> Outcome | None:
        """Give up the call most overdue, if one is: kill its worker (Ray restarts it; the
        pool pings it back in) and fail the call."""
        import ray

        if not self.deadlines:
            return None
        ref = min(self.deadlines, key=self.deadlines.__getitem__)
        if self.deadlines[ref] > time.monotonic():
            return None
        del self.deadlines[ref]
        worker, item = self.inflight.pop(ref)
        ray.kill(self.actors[worker], no_restart=False)
        self._ping(worker, time.monotonic())
        error = (
            f"timed out after {self.timeout:g} s (search.trial_timeout); the worker was "
            "killed and restarted"
        )
        return Outcome(item, None, error, died=False)

    def _ping(self, worker: int, since: float) -> None:
        self.restarting[self.actors[worker].ping.remote()] = (worker, since)

    def _pinged(self, ref: Any) -> None:
        import ray

        worker, since = self.restarting.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.ActorUnavailableError:  # still restarting (Ray answers in ~1 s)
            waited = time.monotonic() - since
            if waited > self.restart_timeout_s:
                raise RuntimeError(f"worker {worker} did not restart in {waited:.0f} s") from None
            self._ping(worker, since)
            return
        except ray.exceptions.RayError as err:  # e.g. its __init__ raised on restart
            msg = f"worker {worker} died and could not restart: {_cause(err)}"
            raise RuntimeError(msg) from None
        self.idle.append(worker)

    def as_completed(
        self, calls: Iterable[tuple[Any, str, tuple[Any, ...]]], *, retries: int = 2
    ) -> Iterator[tuple[Any, dict[str, Any] | None, str | None]]:
        """Run each ``(item, method, args)`` and yield ``(item, result, error)`` as they finish.

        Every idle worker is kept busy. A call whose worker died is re-run on the next free
        worker, up to ``retries`` times; any other error is yielded. Example::

            calls = [(name, "evaluate", (recipe.to_json(), 1.0)) for name, recipe in todo]
            for name, result, error in pool.as_completed(calls):
                ...
        """
        todo = deque((item, method, args, 0) for item, method, args in calls)
        while todo or self.inflight:
            while todo and self.idle:
                item, method, args, tries = todo.popleft()
                self.submit((item, method, args, tries), method, *args)
            out = self.next_result()
            if out is None:
                continue
            item, method, args, tries = out.item
            if out.died and tries < retries:
                todo.append((item, method, args, tries + 1))
                continue
            yield item, out.result, out.error

    def drop_inflight(self) -> list[Any]:
        """Forget the calls in flight and return their items: their results are never read (a
        worker still busy with one runs its next call after it)."""
        items = [item for _, item in self.inflight.values()]
        self.idle += [worker for worker, _ in self.inflight.values()]
        self.inflight.clear()
        self.deadlines.clear()
        return items

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        self._shutdown_own()

    def _shutdown_own(self) -> None:
        import ray

        if self._own_ray:
            ray.shutdown()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def worker_needs(job: JobConfig) -> dict[str, float]:
    """The Ray resources one worker asks for (``CPU``, ``GPU`` and the custom ones)."""
    res = job.resources
    need = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.custom_resources}
    return {k: v for k, v in need.items() if v > 0}


def check_fits(job: JobConfig) -> None:
    """Refuse, in one line, a job whose worker fits on no live node: Ray would wait forever."""
    import ray

    need = worker_needs(job)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
        return
    offers = "; ".join(
        ", ".join(
            f"{k}={v:g}"
            for k, v in sorted(n.items())
            if not k.startswith("node:") and k not in ("memory", "object_store_memory")
        )
        for n in nodes
    )
    raise ValueError(
        f"no node of the Ray cluster can hold one worker: it needs "
        f"{', '.join(f'{k}={v:g}' for k, v in need.items())} (resources.num_cpus, num_gpus, "
        f"custom_resources) and the nodes offer: {offers}; lower them or start a node that has "
        "them (ray start --num-gpus/--resources)"
    )


def _cause(err: BaseException) -> str:
    """The worker-side exception as 'Type: message' (Ray wraps it with its own traceback)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__
