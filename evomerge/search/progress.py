"""What a running search reports: small frozen events, and the tqdm bar that shows them.

:class:`evomerge.search.driver.Search` hands each event to one ``on_event`` callback, in order, in
the thread that runs the search. A search that runs to its end sends, per phase (``search``,
``held_out``, ``reference``), a :class:`PhaseStarted`, then (in ``search``) one
:class:`TrialFinished` per tell, then a :class:`PhaseFinished`. A stopped search ends with
:class:`Stopped` instead, sent once the writer lock is released and Ray is shut down.

The best value is tracked from the values the driver tells, not read back from storage: a
storage read per trial would make the driver's cost grow with the study.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

PHASES = ("search", "held_out", "reference")


@dataclass(frozen=True)
class PhaseStarted:
    phase: str  # one of PHASES
    done: int  # trials counted toward the budget so far
    budget: int


@dataclass(frozen=True)
class PhaseFinished:
    phase: str
    done: int
    budget: int


@dataclass(frozen=True)
class TrialFinished:
    number: int
    state: str  # "COMPLETE", "PRUNED" or "FAIL"
    values: tuple[float, ...] | None  # the objective values of a COMPLETE trial
    error: str | None  # why a FAIL trial failed
    best: float | None  # the best value so far (single objective; None for several)
    best_trial: int | None
    done: int
    budget: int
    evals_per_min: float  # trials finished by this driver per minute
    elapsed_s: float  # since the search phase started


@dataclass(frozen=True)
class Stopped:
    """The search was stopped; ``phase`` is the first phase that did not run to its end.
    ``Search(job, resume=True).run()`` continues it."""

    phase: str
    done: int
    budget: int


Event = PhaseStarted | PhaseFinished | TrialFinished | Stopped
OnEvent = Callable[[Event], Any]


def ignore(event: Event) -> None:
    """The ``on_event`` of a search nobody watches."""


class Tracker:
    """Turns the driver's tells into :class:`TrialFinished` events."""

    def __init__(self, study: optuna.Study, *, budget: int, done: int) -> None:
        self.start = time.monotonic()
        self.budget, self.initial = budget, done
        self.sign = 0
        if len(study.directions) == 1:
            self.sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
        self.best: float = -math.inf
        self.best_trial: int | None = None
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            self._seen(t.number, t.values)

    def _seen(self, number: int, values: list[float] | None) -> None:
        if values and self.sign and self.sign * values[0] > self.best:
            self.best, self.best_trial = self.sign * values[0], number

    def finished(
        self, number: int, state: TrialState, values: list[float] | None, error: str | None,
        *, done: int,
    ) -> TrialFinished:
        self._seen(number, values)
        elapsed = time.monotonic() - self.start
        found = self.best_trial is not None
        return TrialFinished(
            number=number, state=state.name, values=tuple(values) if values else None,
            error=error, best=self.sign * self.best if found else None,
            best_trial=self.best_trial, done=done, budget=self.budget,
            evals_per_min=(done - self.initial) / (elapsed / 60) if elapsed > 0 else 0.0,
            elapsed_s=elapsed,
        )


class ProgressBar:
    """The search's tqdm bar (trials done/total, best value, evaluations per minute, ETA),
    drawn from its events: ``Search(job).run(on_event=ProgressBar(job.name))``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.failed = 0
        self.bar: Any = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, PhaseStarted) and event.phase == "search":
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=event.budget, initial=event.done, desc=self.name, unit="trial",
                dynamic_ncols=True,
            )
        elif isinstance(event, TrialFinished) and self.bar is not None:
            self.failed += event.state == "FAIL"
            best = "-" if event.best is None else f"{event.best:.4g}"
            rate = event.evals_per_min
            self.bar.set_postfix_str(f"best={best} evals/min={rate:.1f} failed={self.failed}")
            self.bar.update(1)
        elif isinstance(event, PhaseFinished | Stopped):
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
