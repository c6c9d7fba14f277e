"""Fault (c): the PostgreSQL server is stopped for a few seconds in the middle of a search. The
driver's in-memory study goes on, its writer retries with backoff (one log line per outage),
and at the end every trial is in PostgreSQL exactly as the driver told it."""

from __future__ import annotations

import json
import logging
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from bench.driver_overhead import make_job, sleep_worker_class
from evomerge.search.driver import run_search
from tests.pg_fixtures import postgres_server, postgres_url  # noqa: F401 - the fixtures

pytestmark = pytest.mark.slow  # a real search on Ray: the full lane

KEYS = ("number", "state", "params", "values", "intermediate_values", "system_attrs")


def completed(db: optuna.storages.BaseStorage, name: str) -> int:
    try:
        study = optuna.load_study(study_name=name, storage=db)
    except KeyError:  # not created yet
        return 0
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def test_postgres_stopped_mid_search_loses_nothing(
    ray_local, postgres_server, postgres_url, tmp_path, caplog  # noqa: F811
):
    name = f"outage{int(time.time() * 1000) % 10**8}"
    # 4 workers x 0.25 s evaluations: ~8 s of search, a few with the server down
    job = make_job(
        tmp_path, name=name, workers=4, trials=160, sampler="random", experts=2, groups=2
    )
    result: dict[str, object] = {}

    def search() -> None:
        try:
            result["study"] = run_search(
                job,
                storage_url=postgres_url,
                progress=False,
                worker_class=sleep_worker_class(0.25),
            )
        except BaseException as err:  # the test thread reports it
            result["error"] = err

    db = optuna.storages.RDBStorage(postgres_url)  # the schema, before the driver; polling
    with caplog.at_level(logging.WARNING, logger="evomerge.search.mirror"):
        thread = threading.Thread(target=search)
        thread.start()
        deadline = time.time() + 90
        while completed(db, name) < 8:
            assert thread.is_alive() and time.time() < deadline, result
            time.sleep(0.1)
        down = time.monotonic()
        postgres_server.stop()  # every session ends, the lease's too
        while not [r for r in caplog.records if "unreachable" in r.getMessage()]:
            assert time.monotonic() - down < 30, "the driver did not notice the outage"
            time.sleep(0.1)
        time.sleep(2.0)  # retried with backoff meanwhile, logged once
        postgres_server.start()
        up = time.monotonic()
        thread.join(timeout=120)
    assert not thread.is_alive(), "the search did not finish after the server came back"
    assert "error" not in result, result.get("error")
    study = result["study"]
    assert isinstance(study, optuna.Study)
    assert up - down >= 2.0
    stored = optuna.load_study(study_name=name, storage=postgres_url).trials
    assert [t.number for t in stored] == list(range(len(stored)))  # no gap, no duplicate
    assert len([t for t in stored if t.state == TrialState.COMPLETE]) == 160
    assert not [t for t in stored if t.state == TrialState.RUNNING]
    for a, b in zip(study.trials, stored, strict=True):  # exactly what the driver told
        for key in KEYS:
            assert getattr(a, key) == getattr(b, key), (a.number, key)
        assert json.dumps(a.user_attrs, sort_keys=True) == json.dumps(b.user_attrs, sort_keys=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "evomerge.search.mirror"]
    outages = [line for line in lines if "unreachable" in line]
    assert len(outages) == 1 and any("answers again" in line for line in lines), lines
