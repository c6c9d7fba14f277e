"""What a running search reports: small frozen events, and the tqdm bar that shows them.

:class:`evomerge.search.driver.Search` hands each event to one ``on_event`` callback, in order, in
the thread that runs the search. A search that runs to its end sends, per phase (``search``,
``held_out``, ``reference``), a :class:`PhaseStarted`, then (in ``search``) one
:class:`TrialFinished` per tell, then a :class:`PhaseFinished`. A stopped search ends with
:class:`Stopped` instead, sent once the writer lock is released and Ray is shut down.

Steps of a phase that take seconds without a trial to show for it (starting Ray, loading the
workers, the held-out and reference evaluations) go to a second callback, ``on_progress``, as
:class:`Progress` events, so that the event stream above stays one event per phase and trial.

The best value is tracked from the values the driver tells, not read back from storage: a
storage read per trial would make the driver's cost grow with the study.
"""

from __future__ import annotations

import math
import sys
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
    eta_s: float | None = None  # at the steady-state rate; None until it is known


@dataclass(frozen=True)
class Stopped:
    """The search was stopped; ``phase`` is the first phase that did not run to its end.
    ``Search(job, resume=True).run()`` continues it."""

    phase: str
    done: int
    budget: int


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units of a step: ``ray`` (starting Ray, 0/1 then 1/1),
    ``workers`` (workers ready), ``held_out`` and ``reference`` (evaluations done)."""

    step: str
    done: int
    total: int
    elapsed_s: float  # since the step began


STEP_TEXT = {  # (bar description, log-line verb)
    "ray": ("starting Ray", "started"),
    "workers": ("workers ready", "ready"),
    "held_out": ("held-out", "done"),
    "reference": ("references", "done"),
}


class Step:
    """Sends the :class:`Progress` events of one step: ``step = Step("workers", n, cb)``, then
    ``step.advance()`` per unit done. Sends ``0/total`` on creation."""

    def __init__(self, name: str, total: int, on_progress: OnProgress | None) -> None:
        self.name, self.total, self.done = name, total, 0
        self.on_progress = on_progress or ignore
        self.start = time.monotonic()
        self.on_progress(Progress(name, 0, total, 0.0))

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.on_progress(Progress(self.name, self.done, self.total,
                                  time.monotonic() - self.start))


Event = PhaseStarted | PhaseFinished | TrialFinished | Stopped
OnEvent = Callable[[Event], Any]
OnProgress = Callable[[Progress], Any]


def ignore(event: Any) -> None:
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
        self.warm: set[Any] = set()  # the workers that finished their first trial
        self.steady = 0  # trials finished after their worker's first one
        self.steady_since: float | None = None  # when the first worker's first trial ended
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            self._seen(t.number, t.values)

    def _seen(self, number: int, values: list[float] | None) -> None:
        if values and self.sign and self.sign * values[0] > self.best:
            self.best, self.best_trial = self.sign * values[0], number

    def finished(
        self, number: int, state: TrialState, values: list[float] | None, error: str | None,
        *, done: int, worker: Any = None,
    ) -> TrialFinished:
        self._seen(number, values)
        now = time.monotonic()
        elapsed = now - self.start
        eta = self._eta(worker, now, done)
        found = self.best_trial is not None
        return TrialFinished(
            number=number, state=state.name, values=tuple(values) if values else None,
            error=error, best=self.sign * self.best if found else None,
            best_trial=self.best_trial, done=done, budget=self.budget,
            evals_per_min=(done - self.initial) / (elapsed / 60) if elapsed > 0 else 0.0,
            elapsed_s=elapsed, eta_s=eta,
        )

    def _eta(self, worker: Any, now: float, done: int) -> float | None:
        """Seconds left at the rate of the trials after each worker's first: a worker's first
        trial builds its merge caches and compiles, so start-up would skew the estimate."""
        if worker is None or worker not in self.warm:
            self.warm.add(worker)
            if self.steady_since is None:
                self.steady_since = now
        else:
            self.steady += 1
        if not self.steady or self.steady_since is None or now <= self.steady_since:
            return None
        return (self.budget - done) / (self.steady / (now - self.steady_since))


class ProgressBar:
    """What a terminal shows of a search, drawn from its events and :class:`Progress` steps:
    ``Search(job).run(on_event=bar, on_progress=bar)`` with ``bar = ProgressBar(job.name)``.

    On a terminal (``bars=None``: stderr is a TTY) each step is a tqdm bar, the search's
    showing trials done/total, best value, evaluations per minute and the ETA at the
    steady-state rate; otherwise (``bars=False``) one log line per phase on stderr, e.g.
    ``evomerge: workers 2/2 ready (14.2 s)``.
    """

    def __init__(self, name: str, *, bars: bool | None = None) -> None:
        self.name = name
        self.bars = sys.stderr.isatty() if bars is None else bars
        self.failed = 0
        self.bar: Any = None
        self.steps: dict[str, Any] = {}
        self.last: TrialFinished | None = None

    def __call__(self, event: Event | Progress) -> None:
        if isinstance(event, Progress):
            self._progress(event)
        elif isinstance(event, PhaseStarted) and event.phase == "search":
            self.start, self.failed, self.last = time.monotonic(), 0, None  # a phase each
            if self.bars:
                from tqdm.auto import tqdm

                self.bar = tqdm(
                    total=event.budget, initial=event.done, desc=self.name, unit="trial",
                    dynamic_ncols=True, file=sys.stderr,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                    "[{elapsed}{postfix}]",
                )
        elif isinstance(event, TrialFinished):
            self.failed += event.state == "FAIL"
            self.last = event
            if self.bar is not None:
                self.bar.set_postfix_str(_trial_text(event, self.failed), refresh=False)
                self.bar.update(1)
        elif isinstance(event, PhaseFinished | Stopped) and event.phase == "search":
            self.close()
            if not self.bars:
                text = "" if self.last is None else ": " + _trial_text(self.last, self.failed,
                                                                      eta=False)
                took = time.monotonic() - getattr(self, "start", time.monotonic())
                verb = "stopped" if isinstance(event, Stopped) else "done"
                _log(f"search {event.done}/{event.budget} trials {verb} ({took:.1f} s){text}")

    def _progress(self, p: Progress) -> None:
        desc, verb = STEP_TEXT.get(p.step, (p.step, "done"))
        if not self.bars:
            if p.done >= p.total:
                _log(f"{desc.split()[0]} {p.done}/{p.total} {verb} ({p.elapsed_s:.1f} s)"
                     if p.step != "ray" else f"Ray started ({p.elapsed_s:.1f} s)")
            return
        bar = self.steps.get(p.step)
        if bar is None:
            from tqdm.auto import tqdm

            bar = self.steps[p.step] = tqdm(
                total=p.total, desc=desc, dynamic_ncols=True, file=sys.stderr,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}]",
            )
        bar.update(p.done - bar.n)
        if p.done >= p.total:
            bar.close()
            del self.steps[p.step]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for bar in self.steps.values():
            bar.close()
        self.steps.clear()


def _trial_text(e: TrialFinished, failed: int, *, eta: bool = True) -> str:
    best = "-" if e.best is None else f"{e.best:.4g}"
    best += "" if e.best_trial is None else f" (trial {e.best_trial})"
    text = f"best={best} evals/min={e.evals_per_min:.1f} failed={failed}"
    if eta:
        text += " eta=" + ("?" if e.eta_s is None else _clock(e.eta_s))
    return text


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _log(line: str) -> None:
    print(f"evomerge: {line}", file=sys.stderr, flush=True)
