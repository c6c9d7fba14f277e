"""Launching, finding and stopping service jobs; each job outlives the service.

A job is a folder ``RUNS/.evomerge-service/NAME/`` with the submitted ``job.yaml``, the
runner's ``status.json`` and its ``driver.log``; its trials are in the study (the storage the
CLI uses). Locally a job is its own process (:mod:`evomerge.service.runner`, in a new session,
so stopping the service does not stop it); with ``ray_address`` it is a Ray job submitted
through the Ray Jobs API. A restarted service lists the folders again, sees from the status
file and the process (or Ray) whether each still runs, and also lists the runs the CLI made
(``RUNS/*/job.yaml``), read-only.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from evomerge.config import JobConfig, load_job, parse_job
from evomerge.service.runner import read_status, write_status
from evomerge.service.security import Policy, Refused, check_job

SERVICE_DIR = ".evomerge-service"
LIVE = ("starting", "running")


class Conflict(ValueError):
    """The request clashes with a job or run that exists (HTTP 409)."""


class LaunchError(RuntimeError):
    """The job's process or Ray job could not be started (HTTP 502)."""


def parse_job_text(text: str, policy: Policy) -> JobConfig:
    """The job in a request body: plain YAML, the same config models, then the server's
    policy; ``run_dir`` defaults to ``RUNS/NAME``. Errors name the dotted key."""
    from evomerge.yaml_file import _UniqueKeyLoader, _yaml_error

    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:
        raise ValueError(_yaml_error(Path("job.yaml"), err)) from None
    if isinstance(data, dict) and isinstance(data.get("name"), str) and "run_dir" not in data:
        data["run_dir"] = str(policy.runs.resolve() / data["name"])
    job = parse_job(data, source="job.yaml")
    check_job(job, policy)
    return job


class Jobs:
    """The service's jobs: submit, list, state, cancel, resume."""

    def __init__(self, policy: Policy, *, ray_address: str | None = None) -> None:
        self.policy, self.ray_address = policy, ray_address
        self.root = policy.runs / SERVICE_DIR
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def folder(self, name: str) -> Path:
        return self.root / name

    def names(self) -> list[str]:
        """Every job of this service and every CLI run under the runs folder."""
        found = {p.parent.name for p in self.root.glob("*/job.yaml")}
        found |= {p.parent.name for p in self.policy.runs.glob("*/job.yaml")}
        return sorted(found)

    def job(self, name: str) -> tuple[JobConfig, bool]:
        """The job config of ``name`` and whether this service launched it."""
        own = self.folder(name) / "job.yaml"
        if own.is_file():
            return load_job(own), True
        cli = self.policy.runs / name / "job.yaml"
        if name in self.names() and cli.is_file():
            return load_job(cli), False
        raise KeyError(name)

    def submit(self, job: JobConfig) -> None:
        """Check what the job points at (the driver's preflight: models, data, devices), store
        the job and start it; :class:`Conflict` if the name is taken by any run."""
        from evomerge.search.preflight import preflight

        self._check_free(job)
        preflight(job, storage_url=self.policy.storage, address=self.ray_address)
        folder = self.folder(job.name)
        folder.mkdir(parents=True)
        (folder / "job.yaml").write_text(yaml.safe_dump(job.model_dump(mode="json"),
                                                        sort_keys=False))
        try:
            self._launch(job.name, resume=False)
        except Exception as err:  # e.g. the Ray cluster refused it: leave no half-made job
            for name in ("job.yaml", "status.json", "driver.log"):
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()
            raise LaunchError(f"the job could not be started: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from None

    def _check_free(self, job: JobConfig) -> None:
        from evomerge.search.storage import open_storage, study_exists

        if self.folder(job.name).exists() or (self.policy.runs / job.name).exists():
            raise Conflict(f"name: a job or run named {job.name!r} exists already; pick "
                           "another name (or resume that job)")
        if job.resolved_run_dir.exists() and any(job.resolved_run_dir.iterdir()):
            raise Conflict(f"run_dir: {job.resolved_run_dir} is not empty; pick another")
        if self.policy.storage is not None:
            storage = open_storage(self.policy.storage, job.resolved_run_dir)
            if study_exists(storage, job.name):
                raise Conflict(f"name: study {job.name!r} exists in {self.policy.storage}; "
                               "pick another name")

    def state(self, name: str) -> dict[str, Any]:
        """The runner's status, with ``state`` corrected when its process is gone."""
        status = read_status(self.folder(name) / "status.json")
        if not status:
            return {"state": "external"}  # a run of the CLI: the storage says the rest
        try:
            alive = status.get("state") not in LIVE or self._alive(name, status)
        except Exception as err:  # Ray unreachable: say so, keep the last known status
            return {**status, "state": "unknown", "error": f"cannot reach Ray: {err}"}
        if not alive:
            status = {**read_status(self.folder(name) / "status.json")}
            if status.get("state") in LIVE:  # it died without a word (kill -9, OOM, reboot)
                status["state"] = "interrupted"
        return status

    def _alive(self, name: str, status: dict[str, Any]) -> bool:
        if status.get("ray_job"):
            return self._ray().get_job_status(status["ray_job"]).name in ("PENDING", "RUNNING")
        proc = self._procs.get(name)
        if proc is not None:
            return proc.poll() is None
        return _pid_alive(status.get("pid"))

    def cancel(self, name: str) -> dict[str, Any]:
        """Ask the job to stop cleanly (SIGTERM: in-flight trials are re-queued for resume)."""
        self.job(name)
        status = self.state(name)
        if status.get("state") not in LIVE:
            raise Conflict(f"job {name!r} is {status.get('state')}, not running")
        if status.get("ray_job"):
            self._ray().stop_job(status["ray_job"])
        elif name in self._procs:
            self._procs[name].send_signal(signal.SIGTERM)
        elif isinstance(status.get("pid"), int):
            os.kill(status["pid"], signal.SIGTERM)
        return self.state(name)

    def resume(self, name: str) -> dict[str, Any]:
        """Start the job again with ``--resume``: it continues to its budget."""
        _, own = self.job(name)
        if not own:
            raise Conflict(f"{name!r} is a run of the CLI; resume it with `evomerge search "
                           "JOB.yaml --resume`")
        if self.state(name).get("state") in LIVE:
            raise Conflict(f"job {name!r} is running; cancel it first")
        try:
            self._launch(name, resume=True)
        except Exception as err:
            raise LaunchError(f"the job could not be resumed: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from None
        return self.state(name)

    def _launch(self, name: str, *, resume: bool) -> None:
        folder = self.folder(name)
        status = folder / "status.json"
        cmd = ["-m", "evomerge.service.runner", str(folder / "job.yaml"), str(status)]
        cmd += ["--resume"] * resume
        if self.policy.storage:
            cmd += ["--storage", self.policy.storage]
        # the service writes the status file only before the runner starts; from then on the
        # runner alone writes it (its own pid, its state), so no update is lost
        ray_job = f"evomerge-{name}-{int(time.time())}" if self.ray_address else None
        write_status(status, state="starting", submitted=time.time(), pid=None, error=None,
                     finished=None, ray_job=ray_job)
        if ray_job is not None:  # the driver joins the cluster the Ray job runs on
            cmd += ["--address", "auto"]
            self._ray().submit_job(entrypoint=shlex.join(["python", *cmd]),
                                   submission_id=ray_job)
            return
        with open(folder / "driver.log", "ab") as log:
            proc = subprocess.Popen(  # noqa: S603 - our own module, no shell
                [sys.executable, *cmd], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, cwd=Path.cwd(),
            )
        self._procs[name] = proc

    def _ray(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.ray_address)


def _pid_alive(pid: Any) -> bool:
    """Whether ``pid`` is a live (not zombie) runner process on this machine."""
    if not isinstance(pid, int):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z" and b"evomerge.service.runner" in cmdline


def refuse(err: Refused | ValueError) -> dict[str, str]:
    """The 422 body of a refused job: the message and, when known, its dotted key."""
    text = str(err).removeprefix("job.yaml: ")
    key = getattr(err, "key", None) or text.partition(":")[0]
    return {"key": key, "error": text}
