"""The driver lease through a lost connection: a PostgreSQL restart mid-search (the lease is
taken again and a second driver is still refused), another driver taking the advisory lock
during the outage (this driver stops in one line and writes nothing more), and a Redis lease
key gone or taken by another driver (the mirror writer refuses to write)."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bench.driver_overhead import make_job, sleep_worker_class
from evomerge.search.driver import Search
from evomerge.search.journal import JournalLockedError
from evomerge.search.lease import LeaseLostError, lease_holder, lease_key
from evomerge.search.mirror import MirroredStorage
from evomerge.search.storage import close_storage, lock_study, open_storage
from tests.pg_fixtures import _run, pg_bin, postgres_server, postgres_url  # noqa: F401
from tests.test_sqlite_lock import redis_url  # noqa: F401 - the fixture

RIVAL = "evomerge driver pid 99999 on rival since 2026-12-02 05:00:00"  # < 64 chars


@functools.cache
def reader(url: str) -> Any:
    """One reader storage per URL (each RDBStorage holds a connection pool)."""
    return open_storage(url, Path("."))


def stored_counts(url: str, name: str) -> int:
    """The COMPLETE trials of ``name`` in the storage at ``url``, as a reader sees them."""
    for attempt in range(3):
        try:
            study = optuna.load_study(study_name=name, storage=reader(url))
            return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        except KeyError:  # not created yet
            return 0
        except optuna.exceptions.StorageInternalError:  # a connection from before a restart
            if attempt == 2:
                raise
    raise AssertionError("not reached")


def connect(url: str, app: str = "evomerge test") -> Any:
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    conn = engine.connect()
    conn.execute(text("SELECT set_config('application_name', :a, false)"), {"a": app})
    return conn


def holder(url: str, name: str) -> str | None:
    try:
        conn = connect(url)
    except Exception:  # the server is not up yet
        return None
    try:
        return lease_holder(conn, name)  # pg_locks joined with pg_stat_activity
    finally:
        conn.close()
        conn.engine.dispose()


class Running:
    """A :class:`Search` of SleepWorkers (0.25 s a trial) on PostgreSQL in a thread."""

    def __init__(self, tmp_path: Path, url: str, name: str, trials: int) -> None:
        reader(url)  # the schema, before the driver (two creating it at once collide)
        job = make_job(tmp_path, name=name, workers=4, trials=trials, sampler="random",
                       experts=2, groups=2)
        self.search = Search(job, storage_url=url, worker_class=sleep_worker_class(0.25))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.search.run()
        except BaseException as err:  # the test thread reports it
            self.error = err

    def wait_for(self, what: Any, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while not what():
            assert self.thread.is_alive(), self.error
            assert time.time() < deadline, "timed out"
            time.sleep(0.1)


def finished(search: Search) -> int:
    """Trials finished in the driver's in-memory study."""
    assert search.study is not None
    return sum(t.state.is_finished() for t in search.study.get_trials(deepcopy=False))


def test_restart_mid_search_lease_taken_again(
    ray_local, postgres_server, postgres_url, tmp_path  # noqa: F811
):
    name = f"restart{int(time.time() * 1000) % 10**8}"
    run = Running(tmp_path, postgres_url, name, trials=2000)  # stopped by the test
    try:
        run.wait_for(lambda: stored_counts(postgres_url, name) >= 8)
        me = holder(postgres_url, name)
        assert me is not None and me.startswith(f"evomerge driver pid {os.getpid()} on ")
        postgres_server.stop()  # every session ends, the lease's with it
        time.sleep(2.5)
        postgres_server.start()
        up = time.monotonic()
        run.wait_for(lambda: holder(postgres_url, name) == me, timeout=30)  # the same driver
        retaken_s = time.monotonic() - up
        second = open_storage(postgres_url, tmp_path, writer=True)
        with pytest.raises(JournalLockedError) as err:  # a second driver: the usual refusal
            lock_study(second, name)
        close_storage(second)
        assert str(err.value).startswith(f"study {name!r} in postgresql://evomerge@127.0.0.1:")
        assert f"another evomerge driver (pid {os.getpid()} on " in str(err.value)
        after = stored_counts(postgres_url, name)
        run.wait_for(lambda: stored_counts(postgres_url, name) >= after + 8)  # writes again
    finally:
        run.search.stop()
        run.thread.join(timeout=120)
    assert not run.thread.is_alive() and run.error is None, run.error
    assert retaken_s < 10, retaken_s  # the lease thread's backoff is capped at 5 s
    memory = run.search.study.trials  # type: ignore[union-attr]
    stored = optuna.load_study(study_name=name, storage=postgres_url).trials
    assert len(stored) == len(memory) and not [t for t in stored if t.state == TrialState.RUNNING]
    for a, b in zip(memory, stored, strict=True):  # every trial, as the driver told it
        assert (a.number, a.state, a.params, a.values) == (b.number, b.state, b.params, b.values)
    deadline = time.time() + 10
    while holder(postgres_url, name) is not None:  # released when the search ended
        assert time.time() < deadline, holder(postgres_url, name)
        time.sleep(0.1)


@pytest.fixture
def hba_only_rival(postgres_server) -> Iterator[Any]:  # noqa: F811
    """A function that makes the server accept only the role ``rival`` (as a driver's fresh
    connection would race it), and puts pg_hba.conf back (and reloads it) when called again."""
    hba = Path(postgres_server.data) / "pg_hba.conf"
    original = hba.read_text()
    conn = connect(postgres_server.url)
    conn.execute(text("DO $$ BEGIN CREATE ROLE rival LOGIN SUPERUSER; EXCEPTION WHEN "
                      "duplicate_object THEN NULL; END $$"))
    conn.close()
    conn.engine.dispose()

    def only_rival(on: bool) -> None:
        hba.write_text(
            "local all all trust\nhost all rival 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 reject\n" if on else original
        )
        if not on:
            _run([pg_bin("pg_ctl"), "-D", str(postgres_server.data), "reload"])

    try:
        yield only_rival
    finally:
        hba.write_text(original)
        _run([pg_bin("pg_ctl"), "-D", str(postgres_server.data), "reload"])


def table_writes_since(conn: Any, xid: int) -> dict[str, int]:
    """Rows of each optuna table written (inserted or updated) by a transaction after ``xid``."""
    tables = conn.execute(text(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    )).scalars().all()
    counts = {t: conn.execute(text(f'SELECT count(*) FROM "{t}" WHERE xmin::text::bigint > :x'),
                              {"x": xid}).scalar() for t in tables}
    return {t: n for t, n in counts.items() if n}


def test_lock_taken_by_another_driver_during_the_outage_stops_this_one(
    ray_local, postgres_server, postgres_url, tmp_path, hba_only_rival  # noqa: F811
):
    name = f"rival{int(time.time() * 1000) % 10**8}"
    run = Running(tmp_path, postgres_url, name, trials=2000)
    rival = None
    try:
        run.wait_for(lambda: stored_counts(postgres_url, name) >= 8)
        postgres_server.stop()
        hba_only_rival(True)  # the server comes back for the rival only...
        postgres_server.start()
        rival = connect(postgres_server.url.replace("evomerge@", "rival@"), RIVAL)
        assert rival.execute(text("SELECT pg_try_advisory_lock(:k)"),
                             {"k": lease_key(name)}).scalar()  # ...which takes the study first
        xid = rival.execute(text("SELECT txid_current()")).scalar()
        stored = rival.execute(text("SELECT count(*) FROM trials")).scalar()
        run.wait_for(lambda: finished(run.search) >= stored + 4)  # in memory; it cannot connect
        hba_only_rival(False)  # now the driver reconnects, and finds the lock taken
        run.thread.join(timeout=60)
        assert not run.thread.is_alive(), "the driver did not stop"
        assert table_writes_since(rival, xid) == {}  # not one row written after the loss
        assert rival.execute(text("SELECT count(*) FROM trials")).scalar() == stored
    finally:
        run.search.stop()
        run.thread.join(timeout=120)
        if rival is not None:
            rival.close()
            rival.engine.dispose()
    err = run.error
    assert isinstance(err, LeaseLostError) and isinstance(err, RuntimeError), err  # CLI: exit 2
    msg = str(err)
    assert len(msg.splitlines()) == 1, msg
    assert msg.startswith(
        f"study {name!r} in postgresql://evomerge@127.0.0.1:{postgres_server.port}/evomerge is "
        "now driven by another evomerge driver (pid 99999 on rival since 2026-12-02 05:00:00"
        "), which took its lease while this driver's connection to the database was down; "
        "this driver stopped and wrote nothing to it since;"
    ), msg
    assert msg.endswith("then run again with --resume")
    assert finished(run.search) > stored  # it went on in memory during the outage, not stored


# -- Redis ---------------------------------------------------------------------------------


def redis_study(url: str, tmp_path: Path, name: str) -> tuple[Any, MirroredStorage]:
    """The driver's side of a Redis study: the leased journal and its in-memory mirror."""
    target = open_storage(url, tmp_path, writer=True)
    lock_study(target, name)
    optuna.create_study(study_name=name, storage=target)
    return target, MirroredStorage(target, name)


def tell_one(study: optuna.Study) -> None:
    trial = study.ask()
    study.tell(trial, trial.suggest_float("x", 0, 1))


@pytest.mark.parametrize("how", ["taken", "gone"])
def test_redis_lease_lost_stops_the_writer(redis_url, tmp_path, how):  # noqa: F811
    import redis

    name = f"redis-{how}-{int(time.time() * 1000) % 10**8}"
    target, memory = redis_study(redis_url, tmp_path, name)
    study = optuna.load_study(study_name=name, storage=memory)
    try:
        for _ in range(3):
            tell_one(study)
        memory.flush(timeout=30)
        assert stored_counts(redis_url, name) == 3
        client = redis.Redis.from_url(redis_url)
        key = f"evomerge:driver:{name}"
        if how == "taken":  # the key expired and another driver set it
            client.set(key, f"{RIVAL} [0123abcd]")
        else:  # Redis lost it (a restart without persistence, a flush)
            client.delete(key)
        client.close()
        with pytest.raises(LeaseLostError) as err:
            for _ in range(50):  # the writer's next batch finds out; the driver at its next write
                tell_one(study)
                time.sleep(0.05)
        assert stored_counts(redis_url, name) == 3  # nothing written after the loss
        with pytest.raises(LeaseLostError):  # and nothing later either
            tell_one(study)
    finally:
        with pytest.raises(LeaseLostError):
            close_storage(memory)  # raises the writer's error, releases the lease
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and msg.endswith("then run again with --resume"), msg
    if how == "taken":
        assert msg.startswith(f"study {name!r} in {redis_url} is now driven by another "
                              "evomerge driver (pid 99999 on rival since "), msg
    else:
        assert msg.startswith(f"the driver lease of study {name!r} in {redis_url} expired"), msg
    assert stored_counts(redis_url, name) == 3
