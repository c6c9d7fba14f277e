"""The local Ray that a search starts leaves no process behind: not after a SIGKILL of the
driver (Ray's agents alone would linger about 60 s), nor after a normal exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from optuna.trial import TrialState

from tests.test_resume import load
from tests.test_search import job_dict

pytestmark = pytest.mark.slow  # real searches on a Ray cluster: the full lane

GONE_WITHIN_S = 15.0


def tree(pid: int) -> list:
    return psutil.Process(pid).children(recursive=True)


def survivors(procs: list, within_s: float) -> list[str]:
    """The processes of ``procs`` still running after ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        left = [p for p in procs if _running(p)]
        if not left or time.monotonic() > deadline:
            return [f"{p.pid} {_name(p)}" for p in left]
        time.sleep(0.2)


def _running(p) -> bool:
    try:  # is_running() also compares the start time: a reused pid is not ours
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _name(p) -> str:
    try:
        return p.name()
    except psutil.NoSuchProcess:
        return "?"


def kill_all(procs: list) -> None:
    for p in procs:
        if _running(p):
            p.kill()


def test_sigkill_of_the_search_driver_leaves_no_ray_process(search_suite, tmp_path):
    data = job_dict(search_suite, tmp_path / "run", trials=100_000, held_out_top_k=0)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomerge", "search", str(path), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    procs: list = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            study = load(tmp_path / "run", data["name"])
            if study and len(study.get_trials(states=(TrialState.COMPLETE,))) >= 2:
                break  # both workers are up and answering
            time.sleep(0.3)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        procs = tree(proc.pid)
        names = {_name(p) for p in procs}
        assert {"raylet", "gcs_server", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as a crash or the OOM killer would
        proc.wait()
        assert survivors(procs, GONE_WITHIN_S) == []
        out = proc.stdout.read() if proc.stdout else ""
        assert "Token authentication" not in out, out
    finally:
        kill_all([*procs, psutil.Process(proc.pid)] if proc.poll() is None else procs)


SCRIPT = """
import sys
from evomerge.search.ray_cluster import start_ray
assert start_ray(None) is True
import ray
print(ray.util.get_node_ip_address(), flush=True)
assert start_ray(None) is False  # already running: not ours to start (or stop) twice
sys.stdin.readline()
ray.shutdown()
"""


def test_local_ray_is_on_loopback_and_gone_after_a_normal_exit():
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    procs: list = []
    try:
        first = proc.stdout.readline()
        assert first.strip() == "127.0.0.1", first + proc.stdout.read()
        procs = tree(proc.pid)
        assert "raylet" in {_name(p) for p in procs}
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "Token authentication" not in out, out
        assert survivors(procs, GONE_WITHIN_S) == []  # the watchdog too
    finally:
        kill_all(procs)
        if proc.poll() is None:
            proc.kill()
