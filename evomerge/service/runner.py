"""One service job: the ``evomerge search`` driver in its own process, with a status file.

``python -m evomerge.service.runner JOB.yaml STATUS.json [--resume] [--storage URL]
[--address RAY]`` runs :class:`evomerge.search.driver.Search` to its budget. SIGTERM or SIGINT
(the service's cancel, or ``ray job stop``) calls ``search.stop()`` (the handler is set again at
every event, since ``ray.init`` replaces it with one that exits): the trials in flight are
failed as interrupted and re-queued, so ``--resume`` continues exactly. The status file
(written atomically) says what the storage cannot: ``running``, then ``finished``,
``cancelled`` or ``failed`` with the error line; the study stays the source of truth for trials.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

STATES = ("starting", "running", "finished", "cancelled", "failed", "interrupted")


def write_status(path: Path, **fields: Any) -> None:
    """Merge ``fields`` into the status file at ``path`` (atomic rename)."""
    status = read_status(path)
    status.update(fields)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status))
    tmp.replace(path)


def read_status(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evomerge.service.runner")
    p.add_argument("job", type=Path)
    p.add_argument("status", type=Path)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--storage")
    p.add_argument("--address")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    write_status(args.status, state="running", pid=os.getpid(), host=socket.gethostname(),
                 started=time.time(), finished=None, error=None, resume=args.resume)
    from evomerge.config import load_job
    from evomerge.search.driver import Search

    search = Search(load_job(args.job), resume=args.resume, address=args.address,
                    storage_url=args.storage)
    def stop_on_signals(_event: Any = None) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: search.stop())

    stop_on_signals()  # again at each event: ray.init installs its own SIGTERM handler
    try:
        search.run(on_event=stop_on_signals)
    except BaseException as err:  # noqa: BLE001 - any failure is the job's final state
        write_status(args.status, state="failed", finished=time.time(),
                     error=f"{type(err).__name__}: {err}")
        print(f"evomerge job: error: {err}", file=sys.stderr)
        return 2
    state = "cancelled" if search.stopped else "finished"
    if not search.stopped:
        _save_notes(search.job, args.storage)
    write_status(args.status, state=state, finished=time.time())
    return 0


def _save_notes(job: Any, storage_url: str | None) -> None:
    """optuna-dashboard notes with the held-out and reference scores of the finished run."""
    import optuna

    from evomerge.search.storage import close_storage, open_storage
    from evomerge.search.study import save_dashboard_note

    storage = open_storage(storage_url or job.storage, job.resolved_run_dir, writer=True)
    try:
        save_dashboard_note(optuna.load_study(study_name=job.name, storage=storage), job)
    finally:
        close_storage(storage)


if __name__ == "__main__":
    sys.exit(main())
