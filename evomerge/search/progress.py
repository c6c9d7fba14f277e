"""What a running search reports: small frozen events, and the tqdm bar that shows them.

:class:`evomerge.search.driver.Search` hands each event to one ``on_event`` callback, in order, in
the thread that runs the search. A search that runs to its end sends, per phase (``search``,
``confirm`` when ``search.fidelity.subset.confirm`` is set, ``held_out``, ``reference``), a
:class:`PhaseStarted`, then (in ``search``) one :class:`TrialFinished` per tell, then a
:class:`PhaseFinished`. A stopped search ends with :class:`Stopped` instead, sent once the
writer lock is released and Ray is shut down.

Steps of a phase that take seconds without a trial to show for it (starting Ray, loading the
workers, the confirmations, the held-out and reference evaluations) go to a second callback,
``on_progress``, as :class:`Progress` events, so that the event stream above stays one event
per phase and trial.

The best value is tracked from the values the driver tells, not read back from storage: a
storage read per trial would make the driver's cost grow with the study. The held-out score of
the best is shown when it is known: the held-out pass runs after the search (on the top trials
only), so during a search only a resumed run knows the held-out scores stored by its earlier
run (read once, when the :class:`Tracker` starts); the held-out step's last line names the
best trial (ties broken by held-out, as the run summary does) and its held-out score.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

PHASES = ("search", "confirm", "held_out", "reference")  # confirm: a subset with confirm > 0
TICK_S = 1.0  # how often an open bar redraws its clock while no event comes (starting Ray: 30 s)


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
    best_held_out: float | None = None  # the best trial's stored held-out score, if any


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
    ``workers`` (workers ready), ``confirm``, ``held_out`` and ``reference`` (evaluations
    done)."""

    step: str
    done: int
    total: int
    elapsed_s: float  # since the step began
    note: str = ""  # what the step found, sent with its last unit (e.g. the best's held-out)


STEP_TEXT = {  # (bar description, log-line verb)
    "ray": ("starting Ray", "started"),
    "workers": ("workers ready", "ready"),
    "confirm": ("confirmations", "done"),
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

    def advance(self, n: int = 1, *, note: str = "") -> None:
        self.done += n
        self.on_progress(Progress(self.name, self.done, self.total,
                                  time.monotonic() - self.start, note))


Event = PhaseStarted | PhaseFinished | TrialFinished | Stopped
OnEvent = Callable[[Event], Any]
OnProgress = Callable[[Progress], Any]


def ignore(event: Any) -> None:
    """The ``on_event`` of a search nobody watches."""


class Tracker:
    """Turns the driver's tells into :class:`TrialFinished` events. The held-out scores stored
    when it starts (a resumed run's) are read once, with the objective of the job stored in the
    study; a tie on the best value goes to the better held-out score, as in the run summary.
    Once the study has a confirmation of its subset estimates, the best is the best of the
    trials that compete then (:func:`~evomerge.search.fidelity.competes`: those scored on the
    whole fitness split), as everywhere else."""

    def __init__(self, study: optuna.Study, *, budget: int, done: int) -> None:
        from evomerge.search.heldout import held_out_scores

        self.start = time.monotonic()
        self.budget, self.initial = budget, done
        self.sign = 0
        if len(study.directions) == 1:
            self.sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
        self.best: float = -math.inf
        self.best_trial: int | None = None
        self.confirmed = False  # a confirmation was seen: the best of the full scores counts
        self.bests: dict[bool, tuple[float, int | None]] = {  # by ``confirmed``
            False: (-math.inf, None), True: (-math.inf, None)}
        self.warm: set[Any] = set()  # the workers that finished their first trial
        self.steady = 0  # trials finished after their worker's first one
        self.steady_since: float | None = None  # when the first worker's first trial ended
        self.held = held_out_scores(study) if self.sign else {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            self._seen(t.number, t.values, t.user_attrs)

    def _seen(self, number: int, values: list[float] | None, attrs: Mapping[str, Any]) -> None:
        """Keep the best of every trial and the best of those that compete once confirmed;
        report the one the study's state (:attr:`confirmed`) calls for."""
        from evomerge.search.fidelity import CONFIRM_ATTR, competes

        if not values or not self.sign:
            return
        self.confirmed = self.confirmed or CONFIRM_ATTR in attrs
        value = self.sign * values[0]
        for confirmed, (best, trial) in list(self.bests.items()):
            tie = value == best and self._held(number) > self._held(trial)
            if competes(attrs, confirmed) and (value > best or tie):
                self.bests[confirmed] = (value, number)
        self.best, self.best_trial = self.bests[self.confirmed]

    def _held_out(self, number: int | None) -> float | None:
        return None if number is None else self.held.get(number)

    def _held(self, number: int | None) -> float:
        """The held-out score as a sort key (higher is better); -inf when not known."""
        score = self._held_out(number)
        return -math.inf if score is None else self.sign * score

    def finished(
        self, number: int, state: TrialState, values: list[float] | None, error: str | None,
        *, done: int, worker: Any = None, attrs: Mapping[str, Any] | None = None,
    ) -> TrialFinished:
        """The event of one tell; ``attrs``: the trial's user attrs that
        :func:`~evomerge.search.fidelity.competes` reads (its subset mark)."""
        self._seen(number, values, attrs or {})
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
            best_held_out=self._held_out(self.best_trial),
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
    ``evomerge: workers 2/2 ready (14.2 s)``. A daemon thread redraws the open bars every
    :data:`TICK_S` so that their clocks run while a step sends nothing (tqdm redraws on
    updates only); it and the events share one lock.
    """

    def __init__(self, name: str, *, bars: bool | None = None) -> None:
        self.name = name
        self.bars = sys.stderr.isatty() if bars is None else bars
        self.failed = 0
        self.bar: Any = None
        self.steps: dict[str, Any] = {}
        self.last: TrialFinished | None = None
        self.lock = threading.RLock()  # the ticker's redraws against the events' updates
        self.ticker: threading.Thread | None = None

    def __call__(self, event: Event | Progress) -> None:
        with self.lock:
            self._event(event)

    def _event(self, event: Event | Progress) -> None:
        if isinstance(event, Progress):
            self._progress(event)
        elif isinstance(event, PhaseStarted) and event.phase == "search":
            self.start, self.failed, self.last = time.monotonic(), 0, None  # a phase each
            if self.bars:
                self.bar = self._new_bar(total=event.budget, initial=event.done,
                                         desc=self.name, unit="trial")
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
                                                                      bar=False)
                took = time.monotonic() - getattr(self, "start", time.monotonic())
                verb = "stopped" if isinstance(event, Stopped) else "done"
                _log(f"search {event.done}/{event.budget} trials {verb} ({took:.1f} s){text}")

    def _progress(self, p: Progress) -> None:
        desc, verb = STEP_TEXT.get(p.step, (p.step, "done"))
        if not self.bars:
            if p.done >= p.total:
                _log((f"{desc.split()[0]} {p.done}/{p.total} {verb} ({p.elapsed_s:.1f} s)"
                      if p.step != "ray" else f"Ray started ({p.elapsed_s:.1f} s)")
                     + (f": {p.note}" if p.note else ""))
            return
        bar = self.steps.get(p.step)
        if bar is None:
            bar = self.steps[p.step] = self._new_bar(total=p.total, desc=desc)
        if p.note:
            bar.set_postfix_str(p.note, refresh=False)
        bar.update(p.done - bar.n)
        if p.done >= p.total:
            bar.close()
            del self.steps[p.step]

    def _new_bar(self, **kwargs: Any) -> Any:
        from tqdm.auto import tqdm

        bar = tqdm(dynamic_ncols=True, file=sys.stderr, **kwargs,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                   "[{elapsed}{postfix}]")
        if self.ticker is None:
            self.ticker = threading.Thread(target=self._tick, name="evomerge-progress",
                                           daemon=True)
            self.ticker.start()
        return bar

    def _tick(self) -> None:
        """Redraw the open bars every TICK_S; end when none is open (the next bar starts a
        new ticker)."""
        while True:
            time.sleep(TICK_S)
            with self.lock:
                bars = [b for b in (self.bar, *self.steps.values()) if b is not None]
                if not bars:
                    self.ticker = None
                    return
                for bar in bars:
                    bar.refresh()

    def close(self) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            for bar in self.steps.values():
                bar.close()
            self.steps.clear()


def _trial_text(e: TrialFinished, failed: int, *, bar: bool = True) -> str:
    """``best=0.7552 (trial 62, held-out 0.7233) evals/min=73.4 eta=00:09``: the bar's text
    (``failed=N`` once a trial failed) or the log line's (always ``failed=N``, no ETA). It
    fits 100 columns after a 10-character job name; tqdm cuts a longer line at the right."""
    best = "-" if e.best is None else f"{e.best:.4g}"
    about = [] if e.best_trial is None else [f"trial {e.best_trial}"]
    if e.best_held_out is not None:
        about.append(f"held-out {e.best_held_out:.4g}")
    best += f" ({', '.join(about)})" if about else ""
    text = f"best={best} evals/min={e.evals_per_min:.1f}"
    if failed or not bar:
        text += f" failed={failed}"
    if bar:
        text += " eta=" + ("?" if e.eta_s is None else _clock(e.eta_s))
    return text


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _log(line: str) -> None:
    print(f"evomerge: {line}", file=sys.stderr, flush=True)
