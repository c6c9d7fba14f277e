"""Study storage: an Optuna journal file in the run directory by default, or any URL.

- ``None`` -> ``RUN_DIR/study.journal`` (fast, no server, optuna-dashboard reads it);
- ``sqlite:///...``, ``postgresql://...``, ``mysql://...`` -> ``RDBStorage``;
- ``redis://...`` -> ``JournalRedisBackend``;
- ``journal:PATH`` -> a journal file at PATH.

The driver opens a journal file with ``writer=True``: a :class:`DriverJournalFile` that holds an
exclusive lock on the journal for its lifetime and appends without optuna's per-write lock
file and fsync (a second driver on the same run is refused). Everything else (results, export)
reads with :class:`JournalFileReader`, optuna's own ``JournalFileBackend`` that skips a partly
written last line, so reading while the driver writes is safe, and names the file and the record
when a line in the middle is corrupt.

A study in PostgreSQL opened with ``writer=True`` is held the same way, per study:
:func:`lock_study` takes a :class:`~evomerge.search.lease.StudyLease` (an advisory lock) and a
second driver on that study gets the journal's refusal; SQLite (a ``flock`` per study) and Redis
(a renewed ``SET NX`` key) too.

The journal file backends live in :mod:`evomerge.search.journal`. The driver itself works on
an in-memory copy of its study that a background thread writes back here
(:mod:`evomerge.search.mirror`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage

from evomerge.search.journal import DriverJournalFile, JournalFileReader
from evomerge.search.lease import StudyLease, guard_connections, supports_lease
from evomerge.search.mirror import MirroredStorage

JOURNAL_NAME = "study.journal"
JOB_ATTR = "evomerge:job"


class DriverRDBStorage(optuna.storages.RDBStorage):
    """optuna's ``RDBStorage`` for the driver: holds the lease of the study it drives."""

    lease: StudyLease | None = None


class DriverJournalRedis(JournalStorage):
    """A Redis journal for the driver: holds the lease (a renewed ``SET NX`` key) of the study
    it drives."""

    lease: StudyLease | None = None
    url: str = ""


LEASED = (DriverRDBStorage, DriverJournalRedis)


def storage_url(url: str | None, run_dir: Path) -> str:
    return url or f"journal:{run_dir / JOURNAL_NAME}"


def open_storage(
    url: str | None, run_dir: Path, *, writer: bool = False, fsync: bool = False
) -> BaseStorage:
    """Open (creating if needed) the storage named by ``url``; see the module docstring.

    ``writer=True`` (the driver only) opens a journal file with :class:`DriverJournalFile`;
    ``fsync`` then fsyncs every append. Both are ignored by other storages.
    """
    url = storage_url(url, run_dir)
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        if writer:
            return JournalStorage(DriverJournalFile(path, fsync=fsync))
        return JournalStorage(JournalFileReader(str(path)))
    if url.startswith("redis://") or url.startswith("rediss://"):
        from optuna.storages.journal import JournalRedisBackend

        if not writer:
            return JournalStorage(JournalRedisBackend(url))
        redis = DriverJournalRedis(JournalRedisBackend(url))
        redis.url = url
        return redis
    if "://" in url:
        cls = DriverRDBStorage if writer and supports_lease(url) else optuna.storages.RDBStorage
        return cls(url, heartbeat_interval=None)
    raise ValueError(
        f"storage {url!r} is not a URL; use journal:PATH, sqlite:///PATH, "
        "postgresql://USER@HOST/DB or redis://HOST:PORT"
    )


def lock_study(storage: BaseStorage, study: str) -> None:
    """Take the driver lease of ``study`` in a PostgreSQL, SQLite or Redis storage opened with
    ``writer=True`` (a journal file is locked when opened); a study held elsewhere raises
    :class:`~evomerge.search.journal.JournalLockedError`. Released by :func:`close_storage`."""
    if isinstance(storage, LEASED) and storage.lease is None and supports_lease(storage.url):
        storage.lease = StudyLease.acquire(storage.url, study)
        if isinstance(storage, DriverRDBStorage):  # no write on a new connection without it
            guard_connections(storage.engine, storage.lease)


def close_storage(storage: BaseStorage) -> None:
    """Release the driver's writer lock, if ``storage`` holds one; the storage stays usable.
    A :class:`~evomerge.search.mirror.MirroredStorage` first writes what it holds (and raises
    its writer's error, if it had one) and then releases its target's lock."""
    if isinstance(storage, MirroredStorage):
        try:
            storage.close()
        finally:
            close_storage(storage.target)
        return
    backend = getattr(storage, "_backend", None)
    if isinstance(backend, DriverJournalFile):
        backend.close()
    held = backend if isinstance(backend, DriverRDBStorage) else storage  # optuna's cache wraps it
    if isinstance(held, LEASED) and held.lease is not None:
        held.lease.release()
        held.lease = None


def study_exists(storage: BaseStorage, name: str) -> bool:
    return any(s.study_name == name for s in storage.get_all_studies())


def save_job(study: optuna.Study, job_dict: dict[str, Any]) -> None:
    study.set_user_attr(JOB_ATTR, json.loads(json.dumps(job_dict)))


def load_job_dict(study: optuna.Study) -> dict[str, Any]:
    job = study.user_attrs.get(JOB_ATTR)
    if job is None:
        raise ValueError(f"study {study.study_name!r} has no stored evomerge job config")
    return dict(job)
