"""A fixed pool of Ray worker actors, started once per search."""

from __future__ import annotations

import os
import time
from typing import Any

from evomerge.config import JobConfig
from evomerge.recipe import Recipe


class WorkerPool:
    """Starts Ray (local unless an address is given) and ``resources.workers`` actors.

    ``next_result`` waits for the first finished call and turns Ray errors into an error
    string: a raised exception fails that trial; a dead actor is restarted by Ray.
    """

    def __init__(
        self, job: JobConfig, *, address: str | None = None, worker_class: type | None = None
    ) -> None:
        import ray

        from evomerge.worker import MergeWorker, worker_actor_class

        self.job = job
        self._own_ray = not ray.is_initialized()
        if self._own_ray:
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            ray.init(
                address=address or job.resources.address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        cls = worker_actor_class(job, worker_class or MergeWorker)
        job_json = job.model_dump_json()
        self.actors = [
            cls.options(name=f"evomerge:{job.name}:{i}", get_if_exists=False).remote(job_json)
            for i in range(job.resources.workers)
        ]
        self.size = len(self.actors)
        self.idle = list(range(self.size))
        self._check_started()

    def _check_started(self) -> None:
        import ray

        try:
            self.info = ray.get([a.ping.remote() for a in self.actors])
        except Exception as err:  # the worker's own error, e.g. a missing model path
            self.close()
            raise RuntimeError(f"a worker failed to start: {_cause(err)}") from None

    def submit(self, worker: int, recipe: Recipe, fraction: float) -> Any:
        return self.actors[worker].evaluate.remote(recipe.to_json(), fraction)

    def submit_held_out(self, worker: int, recipe: Recipe) -> Any:
        return self.actors[worker].evaluate_held_out.remote(recipe.to_json())

    def next_result(self, inflight: dict[Any, Any]) -> tuple[Any, Any, dict | None, str | None]:
        """Pop the first finished call: (ref, its payload, result or None, error or None).

        A worker that died (or is restarting) fails its call; Ray restarts it, and we wait
        until it answers again so the next call does not hit a restarting actor.
        """
        import ray

        [ref], _ = ray.wait(list(inflight), num_returns=1)
        payload = inflight.pop(ref)
        try:
            return ref, payload, ray.get(ref), None
        except ray.exceptions.RayActorError as err:
            self.wait_ready(self._worker_of(payload))
            return ref, payload, None, f"worker died: {_cause(err)}"
        except ray.exceptions.RayTaskError as err:
            return ref, payload, None, _cause(err)

    @staticmethod
    def _worker_of(payload: Any) -> int:
        return int(payload.worker if hasattr(payload, "worker") else payload[1])

    def wait_ready(self, worker: int, *, timeout_s: float = 600.0) -> None:
        """Block until Ray has restarted ``worker`` (its ``__init__`` reloads the models)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ray.get(self.actors[worker].ping.remote(), timeout=timeout_s)
                return
            except ray.exceptions.RayActorError:
                if time.monotonic() > deadline:
                    msg = f"worker {worker} did not restart in {timeout_s:.0f} s"
                    raise RuntimeError(msg) from None
                time.sleep(0.5)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        if self._own_ray:
            ray.shutdown()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cause(err: BaseException) -> str:
    """The worker-side exception as 'Type: message' (Ray wraps it with its own traceback)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__
