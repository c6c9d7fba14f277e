"""The driver's study held in memory and mirrored to the run's storage by a background thread.

Every ask, tell and attribute write of the driver goes to an Optuna ``InMemoryStorage``
(microseconds); :class:`MirroredStorage` marks the trial it touched, and a writer thread copies
the changes to the real storage (journal, SQLite, PostgreSQL) off the driver's critical path:
once a trial finishes (or an enqueued one starts), in one batch per wake-up, at most every
``interval`` seconds (a journal batch is one ``write``). Readers of the storage (the service,
optuna-dashboard, ``evomerge results``) see a finished trial within about ``interval + hold``.

Trial numbers are those of the storage: the study is loaded from it on start and trials are
created there in number order. A trial that finishes while one asked before it still runs waits
up to ``hold`` seconds for it (trials of equal cost finish nearly in order), then the running one
is written as RUNNING and updated when it finishes: most trials are one write. A driver killed
with trials finished in memory but not yet written leaves them RUNNING or absent in the storage:
``--resume`` fails the RUNNING ones as interrupted and re-runs them, as for any trial a dead
driver left.

A storage that stops answering (a PostgreSQL restart) is retried with backoff, one log line
per outage; the search goes on in memory and nothing is lost. Any other write error (a full
disk) is raised in the driver at its next write, and by :meth:`MirroredStorage.close`.

Each batch first checks the driver lease of a target that holds one (PostgreSQL, Redis:
:meth:`~evomerge.search.lease.StudyLease.check`): a lease that is lost with its connection is
taken again before anything is written, and one that another driver took meanwhile raises its
:class:`~evomerge.search.lease.LeaseLostError` the same way (this driver writes nothing more).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.storages import BaseStorage, InMemoryStorage
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

INTERVAL_S = 0.1  # the writer's shortest period: batches the trials of a burst
HOLD_S = 0.5  # how long a finished trial waits for a running one asked before it
OUTAGE_LIMIT_S = 600.0  # a storage down longer than this ends the search (resume continues)


@dataclass
class _Batch:
    study_attrs: list[tuple[str, str, Any]] = field(default_factory=list)  # (kind, key, value)
    updates: list[tuple[FrozenTrial, FrozenTrial]] = field(default_factory=list)  # (old, new)
    creates: list[FrozenTrial] = field(default_factory=list)  # in number order


class MirroredStorage(InMemoryStorage):
    """The study ``study_name`` of ``target`` in memory, mirrored back by a writer thread.

    >>> storage = MirroredStorage(open_storage(None, run_dir, writer=True), "s")  # doctest: +SKIP
    >>> study = optuna.load_study(study_name="s", storage=storage)  # doctest: +SKIP
    >>> storage.close()  # writes what is left and stops the thread  # doctest: +SKIP
    """

    def __init__(
        self,
        target: BaseStorage,
        study_name: str,
        *,
        interval: float = INTERVAL_S,
        hold: float = HOLD_S,
    ) -> None:
        super().__init__()
        self.target, self.interval, self.hold = target, interval, hold
        self._due_since: dict[int, float] = {}  # number -> when it was first seen finished
        self._held = False  # finished trials wait for a running one before them
        self._cond = threading.Condition(self._lock)
        self._dirty: set[int] = set()  # memory trial ids changed since last written
        self._ready = False  # a change the writer should not wait for
        self._study_attrs: list[tuple[str, str, Any]] = []
        self._written: dict[int, FrozenTrial] = {}  # number -> as last written to target
        self._ids: dict[int, int] = {}  # number -> trial id in target
        self._error: BaseException | None = None
        self._closing = False  # the writer writes what is left and ends
        self._closed = False  # the writer has ended: later writes go through at once
        self._writing = False  # the writer holds a batch it has not written yet
        self.outages = 0  # storage outages survived (for tests and reports)
        self._load(study_name)
        self._thread = threading.Thread(target=self._run, name="evomerge-mirror", daemon=True)
        self._thread.start()

    def _load(self, name: str) -> None:
        tgt = self.target
        self._target_id = tgt.get_study_id_from_name(name)
        self._study_id = super().create_new_study(tgt.get_study_directions(self._target_id), name)
        for key, value in tgt.get_study_user_attrs(self._target_id).items():
            super().set_study_user_attr(self._study_id, key, value)
        for key, value in tgt.get_study_system_attrs(self._target_id).items():
            super().set_study_system_attr(self._study_id, key, value)
        for t in tgt.get_all_trials(self._target_id, deepcopy=False):
            assert t.number == len(self._written), "trial numbers in the storage have a gap"
            super().create_new_trial(self._study_id, template_trial=t)
            self._written[t.number], self._ids[t.number] = snapshot(t), t._trial_id

    # -- the driver's side: every write marks what it changed --------------------------------

    def create_new_study(self, directions: Any, study_name: str | None = None) -> int:
        if study_name == self.get_study_name_from_id(self._study_id):  # create_study(load_if_..)
            raise optuna.exceptions.DuplicatedStudyError(f"study {study_name!r} exists")
        raise NotImplementedError("a MirroredStorage holds the one study it was opened on")

    def delete_study(self, study_id: int) -> None:
        raise NotImplementedError("a MirroredStorage holds the one study it was opened on")

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._study_attr("user", study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._study_attr("system", study_id, key, value)

    def _study_attr(self, kind: str, study_id: int, key: str, value: Any) -> None:
        with self._cond:
            self._raise_error()
            setter = (
                super().set_study_user_attr if kind == "user" else super().set_study_system_attr
            )
            setter(study_id, key, value)
            self._study_attrs.append((kind, key, value))
            self._wake()

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        with self._cond:
            self._raise_error()
            trial_id = super().create_new_trial(study_id, template_trial)
            self._touch(
                trial_id,
                urgent=template_trial is not None and template_trial.state != TrialState.RUNNING,
            )
            return trial_id

    def set_trial_param(self, trial_id: int, name: str, value: float, dist: Any) -> None:
        with self._cond:
            self._raise_error()
            super().set_trial_param(trial_id, name, value, dist)
            self._touch(trial_id)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        with self._cond:
            self._raise_error()
            was = self._get_trial(trial_id).state
            changed = super().set_trial_state_values(trial_id, state, values)
            # finished, or an enqueued trial started (so its start time is the real one)
            self._touch(trial_id, urgent=state.is_finished() or was == TrialState.WAITING)
            return changed

    def set_trial_intermediate_value(self, trial_id: int, step: int, value: float) -> None:
        with self._cond:
            self._raise_error()
            super().set_trial_intermediate_value(trial_id, step, value)
            self._touch(trial_id)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._cond:
            self._raise_error()
            super().set_trial_user_attr(trial_id, key, value)
            self._touch(trial_id)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._cond:
            self._raise_error()
            super().set_trial_system_attr(trial_id, key, value)
            self._touch(trial_id)

    def _touch(self, trial_id: int, *, urgent: bool = False) -> None:
        self._dirty.add(trial_id)
        if urgent or self._closed or self._get_trial(trial_id).state.is_finished():
            self._wake()

    def _wake(self) -> None:
        self._ready = True
        if self._closed:  # no writer thread any more: write through, in this thread
            self._write(self._take(final=True))
        else:
            self._cond.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the writer's side ------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything changed so far (running trials included) is in the target."""
        with self._cond:
            self._ready, self._flush_all = True, True
            self._cond.notify_all()
            self._cond.wait_for(
                lambda: not self._pending() or self._error is not None, timeout=timeout
            )
            self._raise_error()

    def close(self) -> None:
        """Write everything left, stop the writer and raise its error, if it had one; the
        study stays readable, and later writes go through to the target at once."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        with self._cond:
            self._closed = True
            self._raise_error()
            self._write(self._take(final=True))  # anything written while the writer ended

    def _pending(self) -> bool:
        return bool(self._dirty or self._study_attrs or self._writing)

    _flush_all = False

    def _run(self) -> None:
        last = 0.0
        while True:
            with self._cond:  # wake for news, or when a held trial's wait is over
                self._cond.wait_for(
                    lambda: self._ready or self._closing, timeout=self.hold if self._held else None
                )
                final = self._closing or self._flush_all
            if not final:  # let the trials of a burst gather into one batch
                time.sleep(max(0.0, last + self.interval - time.monotonic()))
            last = time.monotonic()
            with self._cond:
                batch = self._take(final=self._closing or self._flush_all)
                self._writing = True
            try:
                self._write(batch)
            except BaseException as err:  # a full disk, a bug: the driver raises it
                with self._cond:
                    self._error = err
                    self._cond.notify_all()
                return
            with self._cond:
                self._writing = False
                self._flush_all = self._flush_all and self._pending()
                self._cond.notify_all()
                if self._closing and not self._pending():
                    return

    def _take(self, *, final: bool) -> _Batch:
        """What to write now (the lock held): every finished or waiting trial changed, and the
        trials the target lacks up to the last of those that is not held (see the module
        docstring); with ``final`` everything."""
        self._ready = False
        batch = _Batch(study_attrs=self._study_attrs)
        self._study_attrs = []
        now = {t.number: t for t in map(self._get_trial, self._dirty)}
        clock = time.monotonic()
        due = {n for n, t in now.items() if final or t.state != TrialState.RUNNING}
        for n in due:
            self._due_since.setdefault(n, clock)
        stored = len(self._written)
        top = stored - 1  # create the trials without a running one before them at once
        while top + 1 in due:
            top += 1
        late = [n for n in due if n > top and clock - self._due_since[n] >= self.hold]
        top = max([top, *late])
        for n in sorted(now):
            if stored <= n <= top:
                assert n == stored + len(batch.creates), "a trial to create is not marked"
                batch.creates.append(snapshot(now[n]))
            elif n < stored and n in due:
                batch.updates.append((self._written[n], snapshot(now[n])))
            else:
                continue
            self._dirty.discard(now[n]._trial_id)
            self._due_since.pop(n, None)
        self._held = any(n > top for n in due)
        return batch

    def _write(self, batch: _Batch) -> None:
        """Write ``batch`` to the target, retrying through an outage; each part is marked done
        as it lands, so a retry does not write a created trial twice."""
        if not (batch.study_attrs or batch.updates or batch.creates):
            return  # nothing to write: no lease check either
        start = None
        while True:
            try:
                self._check_lease()  # a write without the lease could interleave another's
                with self._batched():
                    created = self._write_once(batch)
                self._fill_ids(created)
                batch.creates = []
                if start is not None:
                    log.warning(
                        f"study storage answers again after {time.monotonic() - start:.1f}"
                        " s; every trial finished meanwhile is written"
                    )
                return
            except _retryable() as err:
                start = self._outage(start, err)

    def _check_lease(self) -> None:
        lease = getattr(self.target, "lease", None)  # see evomerge.search.storage.LEASED
        if lease is not None:
            lease.check()

    def _outage(self, start: float | None, err: BaseException) -> float:
        now = time.monotonic()
        if start is None:
            self.outages += 1
            log.warning(
                f"study storage unreachable ({type(err).__name__}); the search goes "
                "on in memory and the writes are retried with backoff"
            )
            return now
        if now - start > OUTAGE_LIMIT_S:
            raise RuntimeError(
                f"the study storage has not answered for {now - start:.0f} s; "
                "restart it, then run again with --resume"
            ) from err
        time.sleep(min(5.0, 0.2 * 2 ** min(5, int(now - start))))
        return start

    def _write_once(self, batch: _Batch) -> list[FrozenTrial]:
        tgt, sid = self.target, self._target_id
        while batch.study_attrs:
            kind, key, value = batch.study_attrs[0]
            setter = tgt.set_study_user_attr if kind == "user" else tgt.set_study_system_attr
            setter(sid, key, value)
            batch.study_attrs.pop(0)
        while batch.updates:
            old, new = batch.updates[0]
            self._written[new.number] = write_changes(tgt, self._ids[new.number], old, new)
            batch.updates.pop(0)
        batching = self._batching()
        for t in batch.creates:
            if t.number not in self._written:
                try:
                    self._ids[t.number] = tgt.create_new_trial(sid, template_trial=t)
                except AttributeError:  # a buffered journal has not replayed it: no id yet
                    if not batching:
                        raise
                self._written[t.number] = t
        return batch.creates if batching else []

    def _fill_ids(self, created: list[FrozenTrial]) -> None:
        """The target ids of trials a buffered journal created (it returns none)."""
        for t in created:
            tid = self.target.get_trial_id_from_study_id_trial_number(self._target_id, t.number)
            self._ids[t.number] = tid

    def _batching(self) -> bool:
        return hasattr(getattr(self.target, "_backend", None), "batch")

    def _batched(self) -> Any:
        backend: Any = getattr(self.target, "_backend", None)
        return backend.batch() if hasattr(backend, "batch") else nullcontext()


def snapshot(t: FrozenTrial) -> FrozenTrial:
    """A copy of ``t`` that later writes cannot change: optuna's ``Trial`` updates the dicts of
    the frozen trial a storage returned in place (and a journal's replay updates its own)."""
    s = copy.copy(t)
    s.params, s.distributions = dict(t.params), dict(t.distributions)
    s.user_attrs, s.system_attrs = dict(t.user_attrs), dict(t.system_attrs)
    s.intermediate_values = dict(t.intermediate_values)
    return s


def write_changes(
    target: BaseStorage, trial_id: int, old: FrozenTrial, new: FrozenTrial
) -> FrozenTrial:
    """Write to ``target``'s trial ``trial_id`` what ``new`` has that ``old`` (as written last
    time) has not; return ``new``. The state goes last when it finishes the trial."""
    if old.state == TrialState.WAITING and new.state != TrialState.WAITING:
        target.set_trial_state_values(trial_id, TrialState.RUNNING)
    for name, value in new.params.items():
        if name not in old.params:
            dist = new.distributions[name]
            target.set_trial_param(trial_id, name, dist.to_internal_repr(value), dist)
    for step, value in new.intermediate_values.items():
        if old.intermediate_values.get(step) != value:
            target.set_trial_intermediate_value(trial_id, step, value)
    for key, value in new.user_attrs.items():
        if key not in old.user_attrs or old.user_attrs[key] != value:
            target.set_trial_user_attr(trial_id, key, value)
    for key, value in new.system_attrs.items():
        if key not in old.system_attrs or old.system_attrs[key] != value:
            target.set_trial_system_attr(trial_id, key, value)
    if new.state.is_finished() and not old.state.is_finished():
        _finish(target, trial_id, new)
    return new


def _finish(target: BaseStorage, trial_id: int, new: FrozenTrial) -> None:
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        target.set_trial_state_values(trial_id, new.state, new.values)
    except UpdateFinishedTrialError:  # a retry after the server committed the first try
        pass


def _retryable() -> tuple[type[BaseException], ...]:
    """The errors of a storage that is down for a while (not of a bad write)."""
    from optuna.exceptions import StorageInternalError

    errors: list[type[BaseException]] = [StorageInternalError, ConnectionError, TimeoutError]
    try:
        from sqlalchemy.exc import InterfaceError, OperationalError

        errors += [OperationalError, InterfaceError]
    except ImportError:
        pass
    return tuple(errors)
