"""Server-sent events of one job: a ``trial`` event per trial that finishes, a ``job`` event
when its state or progress changes. Read from the study (the source of truth), so it works for
a local job, a Ray job and a run of the CLI alike; the page never polls the whole table.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from optuna.trial import TrialState

from evomerge.service.views import clean

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def trial_event(trial: Any, labels: list[str]) -> dict[str, Any]:
    """What the page needs of a finished trial to add it to the plots and the table."""
    values = dict(zip(labels, trial.values, strict=False)) if trial.values else {}
    return clean({
        "trial": trial.number, "state": trial.state.name,
        "baseline": trial.user_attrs.get("baseline", ""), "values": values,
        "metrics": trial.user_attrs.get("metrics", {}), "error": trial.user_attrs.get("error"),
    })


def frame(event: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


async def job_events(
    read: Callable[[], tuple[list[Any], dict[str, Any]]],
    labels: list[str],
    disconnected: Callable[[], Awaitable[bool]],
    *, interval: float = 0.5, heartbeat: float = 15.0,
) -> AsyncIterator[str]:
    """Yield SSE frames until the client goes away. ``read`` (run in a thread) returns the
    study's trials and the job summary; trials finished before the stream opened are not sent
    (the page loads the table first)."""
    trials, summary = await asyncio.to_thread(read)
    seen = {t.number for t in trials if t.state in FINISHED}
    last = (summary.get("state"), summary.get("done"))
    yield frame("job", summary)
    quiet = 0.0
    while not await disconnected():
        await asyncio.sleep(interval)
        quiet += interval
        trials, summary = await asyncio.to_thread(read)
        new = [t for t in trials if t.state in FINISHED and t.number not in seen]
        for t in sorted(new, key=lambda t: t.datetime_complete):
            seen.add(t.number)
            quiet = 0.0
            yield frame("trial", trial_event(t, labels), t.number)
        now = (summary.get("state"), summary.get("done"))
        if now != last:
            last, quiet = now, 0.0
            yield frame("job", summary)
        if quiet >= heartbeat:
            quiet = 0.0
            yield ": keep-alive\n\n"
