"""The service's view of every job: its config, its state and its study (cached per job, so
each read replays only the journal records written since the last one)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import optuna

from evomerge.config import JobConfig
from evomerge.service.jobs import Jobs
from evomerge.service.views import summary


class Store:
    """Jobs plus their studies; thread-safe for FastAPI's worker threads."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self._studies: dict[str, optuna.Study] = {}
        self._lock = threading.Lock()

    def open(self, name: str) -> tuple[optuna.Study | None, JobConfig, dict[str, Any]]:
        """(study or None if not created yet, job config, status); KeyError if unknown."""
        job, own = self.jobs.job(name)
        study = self._study(job)
        status = self.jobs.state(name) if own else {"state": _external_state(job, study)}
        return study, job, status

    def summary(self, name: str) -> dict[str, Any]:
        study, job, status = self.open(name)
        return summary(study, job, status)

    def _study(self, job: JobConfig) -> optuna.Study | None:
        from evomerge.search.storage import open_storage, storage_url

        with self._lock:
            if job.name in self._studies:
                return self._studies[job.name]
            url = storage_url(self.jobs.policy.storage or job.storage, job.resolved_run_dir)
            if url.startswith("journal:") and not Path(url.removeprefix("journal:")).is_file():
                return None
            try:
                storage = open_storage(url, job.resolved_run_dir)
                study = optuna.load_study(study_name=job.name, storage=storage, sampler=None)
            except KeyError:
                return None
            self._studies[job.name] = study
            return study


def _external_state(job: JobConfig, study: optuna.Study | None) -> str:
    """A CLI run's state: running while its driver holds the journal's writer lock."""
    from evomerge.search.study import counted_trials

    lock = job.resolved_run_dir / "study.journal.writer"
    try:
        words = lock.read_text().split()  # "pid N on HOST since ..."
    except OSError:
        words = []
    if len(words) >= 4 and words[0] == "pid" and words[3] == socket.gethostname():
        try:
            os.kill(int(words[1]), 0)
            return "running"
        except (OSError, ValueError):
            pass
    if study is not None and counted_trials(study) >= job.search.trials:
        return "finished"
    return "stopped"
