"""One driver per study in SQLite (a ``flock`` next to the database) and in Redis (a ``SET NX``
key with an expiry): a second driver is refused with the journal's one-line message, and a
``kill -9`` of the first frees the study (SQLite at once, Redis when the key expires)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evomerge.search.journal import JournalLockedError
from evomerge.search.storage import close_storage, lock_study, open_storage
from tests.pg_fixtures import free_port
from tests.test_resume import cli
from tests.test_search import job_dict

HOLD = """
import sys, time
from evomerge.search import lease
lease.REDIS_TTL_S = float(sys.argv[3])
from evomerge.search.storage import lock_study, open_storage
if sys.argv[1].startswith("redis"):
    held = lease.StudyLease.acquire(sys.argv[1], sys.argv[2])
else:
    held = open_storage(sys.argv[1], None, writer=True)  # kept: the lease lives with it
    lock_study(held, sys.argv[2])
print("ready", flush=True)
time.sleep(600)
"""


def held(url: str, study: str, ttl: float = 15.0) -> subprocess.Popen:
    """A process holding ``study``'s lease (as a driver does) until it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, url, study, str(ttl)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def refusal(url: str, study: str) -> str:
    storage = open_storage(url, None, writer=True)  # type: ignore[arg-type]
    try:
        with pytest.raises(JournalLockedError) as err:
            lock_study(storage, study)
    finally:
        close_storage(storage)
    return str(err.value)


def test_sqlite_lease_one_driver_per_study_freed_by_kill(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    holder = held(url, "s1")
    try:
        msg = refusal(url, "s1")
        assert msg.startswith(f"study 's1' in {url} is being written by another evomerge driver")
        assert f"(pid {holder.pid} on " in msg and "then run again with --resume" in msg
        assert len(msg.splitlines()) == 1
        storage = open_storage(url, None, writer=True)  # type: ignore[arg-type]
        lock_study(storage, "s2")  # another study in the same file is free
        close_storage(storage)
        holder.send_signal(signal.SIGKILL)  # the OS drops the flock with the process
        holder.wait()
        storage = open_storage(url, None, writer=True)  # type: ignore[arg-type]
        lock_study(storage, "s1")  # at once: no wait, no manual unlock
        readers = open_storage(url, None)  # type: ignore[arg-type]
        lock_study(readers, "s1")  # a reader (results, export) takes no lease
        close_storage(storage)
    finally:
        holder.kill()
        holder.wait()
    storage = open_storage(url, None, writer=True)  # type: ignore[arg-type]
    lock_study(storage, "s1")  # close_storage released it
    close_storage(storage)


def test_sqlite_in_memory_takes_no_lock():
    storage = open_storage("sqlite://", None, writer=True)  # type: ignore[arg-type]
    lock_study(storage, "s")  # each process has its own database: nothing to guard
    close_storage(storage)


GATED = """
import sys, time
from pathlib import Path
from evomerge.config import load_job
from evomerge.search.driver import run_search
from evomerge.search.worker import MergeWorker
gate = Path(sys.argv[3])

class Gated(MergeWorker):  # one trial per worker, then wait for the gate (the test kills us)
    served = 0
    def evaluate(self, recipe_json, fraction=1.0):
        self.served += 1
        deadline = time.time() + 300
        while self.served > 1 and not gate.exists() and time.time() < deadline:
            time.sleep(0.05)
        return super().evaluate(recipe_json, fraction)

run_search(load_job(sys.argv[1]), storage_url=sys.argv[2], progress=False, worker_class=Gated)
"""


def count(url: str, name: str) -> int:
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:
        return 0
    return len(study.get_trials(states=(TrialState.COMPLETE,)))


@pytest.mark.slow
def test_second_sqlite_driver_refused_then_resume_after_kill(search_suite, tmp_path):
    """Two real drivers on one SQLite file: the first (whose workers serve one trial each, then
    wait, so it is still running) holds the study; a second ``evomerge search`` is refused in
    one line before it starts any worker; after a SIGKILL of the first, ``--resume`` takes the
    study at once and reaches the budget."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    budget = 40
    data = job_dict(search_suite, tmp_path / "run", trials=budget, held_out_top_k=0)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    gate = tmp_path / "gate"  # never opened: the first driver is killed while it waits
    first = subprocess.Popen(
        [sys.executable, "-c", GATED, str(path), url, str(gate)],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while count(url, data["name"]) < 2:
            assert first.poll() is None and time.time() < deadline, first.communicate()[0]
            time.sleep(0.2)
        t0 = time.time()
        second = cli("search", str(path), "--resume", "--no-progress", "--storage", url)
        out, _ = second.communicate(timeout=120)
        refused_s = time.time() - t0
        assert first.poll() is None, "the first driver finished before the second was refused"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 2, out
    [line] = [ln for ln in out.splitlines() if "error" in ln]
    assert line.startswith(
        f"evomerge search: error: study {data['name']!r} in {url} is being "
        f"written by another evomerge driver (pid {first.pid} on "
    )
    assert refused_s < 60, refused_s  # before any worker starts

    resumed = cli("search", str(path), "--resume", "--no-progress", "--storage", url)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert count(url, data["name"]) == budget


# -- Redis ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A throwaway ``redis-server`` on 127.0.0.1 (Debian's ``redis-server`` package and the
    ``redis`` client; skipped, with the reason, where either is missing)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    pytest.importorskip("redis", reason="the redis client is not installed (pip install redis)")
    import redis

    port, root = free_port(), tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(root),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.time() + 20
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.exceptions.ConnectionError:
            assert proc.poll() is None and time.time() < deadline, "redis-server did not start"
            time.sleep(0.1)
    yield url
    proc.kill()
    proc.wait()


def redis_refusal(url: str, study: str) -> str:
    from evomerge.search.lease import StudyLease

    with pytest.raises(JournalLockedError) as err:
        StudyLease.acquire(url, study)
    return str(err.value)


def test_redis_lease_renewed_then_freed_by_kill_when_it_expires(redis_url):
    from evomerge.search.lease import StudyLease

    ttl = 1.5
    holder = held(redis_url, "s1", ttl=ttl)
    try:
        msg = redis_refusal(redis_url, "s1")
        assert msg.startswith(f"study 's1' in {redis_url} is being written by another evomerge")
        assert f"(pid {holder.pid} on " in msg and "then run again with --resume" in msg
        time.sleep(2 * ttl)  # the holder's thread renews the key: still held after its TTL
        assert f"(pid {holder.pid} on " in redis_refusal(redis_url, "s1")
        StudyLease.acquire(redis_url, "s2").release()  # another study is free
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        t0 = time.time()
        while True:
            try:
                lease = StudyLease.acquire(redis_url, "s1")
                break
            except JournalLockedError:
                assert time.time() - t0 < ttl + 5, "a killed driver's Redis lease did not expire"
                time.sleep(0.1)
        lease.release()
        StudyLease.acquire(redis_url, "s1").release()  # release() deleted the key at once
    finally:
        holder.kill()
        holder.wait()


def test_redis_storage_of_the_driver_takes_the_lease(redis_url, tmp_path):
    """The driver's Redis journal (open_storage(writer=True) + lock_study, as open_study does)
    holds the study: a second driver's storage is refused, a reader is not; close frees it."""
    first = open_storage(redis_url, tmp_path, writer=True)
    lock_study(first, "r1")
    try:
        second = open_storage(redis_url, tmp_path, writer=True)
        with pytest.raises(JournalLockedError, match="study 'r1' in redis://"):
            lock_study(second, "r1")
        lock_study(open_storage(redis_url, tmp_path), "r1")  # a reader takes no lease
        lock_study(second, "r2")  # another study is free
        close_storage(second)
    finally:
        close_storage(first)
    third = open_storage(redis_url, tmp_path, writer=True)
    lock_study(third, "r1")  # released by close_storage
    close_storage(third)
