"""``search.fidelity.subset`` with ``method: random, warmup: 0``: the subset is drawn before the
first trial from the fitness split sizes the workers report, every trial (the baselines too) is
scored on it, and ``--resume`` reuses it. A real search (Ray, journal), as in
``tests/test_anchor_subsets.py``."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.config import parse_job
from evomerge.search.anchors import (
    ON_SUBSET_ATTR,
    PER_EXAMPLE_ATTR,
    SUBSET_ATTR,
    WARMUP_ATTR,
    select_subset,
)
from evomerge.strict import ConfigError
from tests.test_search import job_dict


def test_anchors_without_a_warm_up_is_one_line_naming_the_key(search_suite, tmp_path) -> None:
    for warmup in (0, 2):
        bad = job_dict(search_suite, tmp_path / "r",
                       fidelity={"subset": {"method": "anchors", "size": 8, "warmup": warmup}})
        with pytest.raises(ConfigError) as err:
            parse_job(bad)
        msg = str(err.value)
        assert "search.fidelity.subset.warmup" in msg and "\n" not in msg
        assert "method: random" in msg and f"got {warmup}" in msg
    ok = job_dict(search_suite, tmp_path / "r",
                  fidelity={"subset": {"method": "random", "size": 8, "warmup": 0}})
    assert parse_job(ok).search.fidelity.subset.warmup == 0


def test_warmup_0_scores_every_trial_on_a_subset_drawn_up_front(ray_local, subset_run):
    from optuna.trial import TrialState

    from evomerge.search.driver import run_search

    tasks = subset_run.suite["expert_tasks"][:2]
    data = subset_run.job_dict({"method": "random", "size": 8, "warmup": 0, "seed": 5}, 7)
    job = parse_job(data)
    study = run_search(job, progress=False)
    state = study.user_attrs[SUBSET_ATTR]
    assert state["warmup"] == [] and set(state["labels"]) == {f"entropy/{t}" for t in tasks}
    want = select_subset(np.zeros((1, 32)), size=8, method="random", seed=5)
    for rec in state["labels"].values():  # drawn from the 32 examples (limit) of each label
        assert (rec["indices"], rec["weights"], rec["examples"]) == (*want, 32)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert len(trials) == 7 and all(t.state == TrialState.COMPLETE for t in trials)
    baselines = [t for t in trials if t.user_attrs.get("baseline")]
    assert len(baselines) >= 3  # the baselines come first and are on the subset too
    for t in trials:
        assert t.user_attrs.get(ON_SUBSET_ATTR) == "random"
        assert not t.user_attrs.get(WARMUP_ATTR) and PER_EXAMPLE_ATTR not in t.user_attrs
        assert {t.user_attrs["metrics"][f"scored/examples/entropy/{k}"] for k in tasks} == {8}
    line = "fitness subset: random, 8 of 32 examples per label (2 labels), drawn before"
    for t in subset_run.check_and_resume(study, job, data, line, more=2):
        assert t.user_attrs.get(ON_SUBSET_ATTR) == "random"
        assert t.user_attrs["metrics"][f"scored/examples/entropy/{tasks[0]}"] == 8
