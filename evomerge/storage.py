"""Study storage: an Optuna journal file in the run directory by default, or any URL.

- ``None`` -> ``JournalFileBackend(RUN_DIR/study.journal)`` (fast, no server, optuna-dashboard
  reads it);
- ``sqlite:///...``, ``postgresql://...``, ``mysql://...`` -> ``RDBStorage``;
- ``redis://...`` -> ``JournalRedisBackend``;
- ``journal:PATH`` -> a journal file at PATH.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend

JOURNAL_NAME = "study.journal"
JOB_ATTR = "evomerge:job"


def storage_url(url: str | None, run_dir: Path) -> str:
    return url or f"journal:{run_dir / JOURNAL_NAME}"


def open_storage(url: str | None, run_dir: Path) -> BaseStorage:
    """Open (creating if needed) the storage named by ``url``; see the module docstring."""
    url = storage_url(url, run_dir)
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("redis://") or url.startswith("rediss://"):
        from optuna.storages.journal import JournalRedisBackend

        return JournalStorage(JournalRedisBackend(url))
    if "://" in url:
        return optuna.storages.RDBStorage(url, heartbeat_interval=None)
    raise ValueError(
        f"storage {url!r} is not a URL; use journal:PATH, sqlite:///PATH, "
        "postgresql://USER@HOST/DB or redis://HOST:PORT"
    )


def study_exists(storage: BaseStorage, name: str) -> bool:
    return any(s.study_name == name for s in storage.get_all_studies())


def save_job(study: optuna.Study, job_dict: dict[str, Any]) -> None:
    study.set_user_attr(JOB_ATTR, json.loads(json.dumps(job_dict)))


def load_job_dict(study: optuna.Study) -> dict[str, Any]:
    job = study.user_attrs.get(JOB_ATTR)
    if job is None:
        raise ValueError(f"study {study.study_name!r} has no stored evomerge job config")
    return dict(job)
