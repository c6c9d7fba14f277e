"""Ranking-preserving fitness subsets (``search.fidelity.subset``): the selection on synthetic
score matrices, evaluators scoring exactly a weighted subset, the config's refusals, and a real
search (Ray, journal) whose later trials are scored on the subset stored in the study."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.config import AccuracyEvalConfig, EntropyEvalConfig, LmEvalConfig, parse_job
from evomerge.evaluators.base import build_evaluator
from evomerge.search.anchors import (
    ON_SUBSET_ATTR,
    PER_EXAMPLE_ATTR,
    SUBSET_ATTR,
    WARMUP_ATTR,
    estimate,
    full_score,
    loo_estimates,
    select_subset,
)
from evomerge.search.rank_fidelity import kendall_tau
from evomerge.strict import ConfigError
from tests.test_evaluator_contract import ROWS, write_suite
from tests.test_search import job_dict


def grouped_matrix(seed: int, candidates: int = 40) -> np.ndarray:
    """Examples in 8 groups of very unequal size; within a group every example scores alike
    (plus a little noise): the structure anchor points exploit."""
    rng = np.random.default_rng(seed)
    sizes = [200, 120, 60, 30, 15, 8, 4, 3]
    groups = np.repeat(np.arange(len(sizes)), sizes)
    skill = rng.random((candidates, len(sizes)))
    return skill[:, groups] + rng.normal(0, 0.02, (candidates, len(groups)))


def test_anchors_rank_new_candidates_better_than_most_random_subsets() -> None:
    scores = grouped_matrix(0)
    warm, new = scores[:8], scores[8:]
    full = [full_score(r) for r in new]

    def tau(method: str, seed: int) -> float:
        idx, w = select_subset(warm, size=8, method=method, seed=seed)
        assert len(idx) == 8 and sorted(set(idx)) == idx
        return kendall_tau([estimate(r, idx, w) for r in new], full)

    anchors = tau("anchors", 0)
    randoms = [tau("random", s) for s in range(20)]
    assert anchors > 0.8 and anchors > np.quantile(randoms, 0.8), (anchors, randoms)
    idx, w = select_subset(warm, size=8, method="anchors", seed=0)
    assert sum(w) == pytest.approx(scores.shape[1])  # clusters' sizes: the estimate's level
    assert abs(np.mean([estimate(r, idx, w) for r in new]) - np.mean(full)) < 0.05


def test_selection_is_deterministic_for_a_seed_and_fills_tied_clusters() -> None:
    scores = grouped_matrix(1)[:8]
    for method in ("anchors", "random"):
        assert select_subset(scores, size=6, method=method, seed=3) == select_subset(
            scores, size=6, method=method, seed=3)
    assert select_subset(scores, size=6, method="random", seed=3) != select_subset(
        scores, size=6, method="random", seed=4)
    ties = np.tile([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]], (4, 1))  # two distinct examples, 6 slots
    idx, w = select_subset(ties, size=4, method="anchors", seed=0, sizes=[1, 2, 1, 1, 1, 1])
    assert len(idx) == 4 and estimate(ties[0], idx, w, [1, 2, 1, 1, 1, 1]) == pytest.approx(
        full_score(ties[0], [1, 2, 1, 1, 1, 1]))
    assert select_subset(ties, size=9, method="anchors") == (list(range(6)), [1.0] * 6)
    loo = loo_estimates(grouped_matrix(2)[:6], size=8, method="anchors")
    assert len(loo) == 6


@pytest.fixture(scope="module")
def lm(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["c"], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_models["c"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [*ROWS, *[{"prompt": r["prompt"] + "!", "answer": "x"} for r in ROWS]]
    return write_suite(tmp_path_factory.mktemp("subset_data"), rows)


@pytest.mark.parametrize("name", ["accuracy", "entropy", "lm_eval"])
def test_an_evaluator_scores_exactly_the_weighted_subset(lm, data, name) -> None:
    folder, tasks = data
    cfg = {
        "accuracy": AccuracyEvalConfig(name="accuracy", data=str(folder), max_new_tokens=4),
        "entropy": EntropyEvalConfig(name="entropy", data=str(folder), batch_size=4),
        "lm_eval": LmEvalConfig(name="lm_eval", tasks=("toy_ctr",), include_path=str(tasks),
                                batch_size=4),
    }[name]
    ev = build_evaluator(cfg)
    label = {"lm_eval": "lm_eval/toy_ctr"}.get(name, f"{name}/ctr")
    metric = {"lm_eval": "lm_eval/toy_ctr/exact_match"}.get(name, label)
    if name == "accuracy":  # a model that gets some right (its own answers); the tiny one
        ev.rows = [{**r, "answer": _greedy(lm, r) if i % 3 == 0 else "never"}  # gets none
                   for i, r in enumerate(ev.rows)]
    vectors: dict = {}
    full = ev.evaluate(*lm, per_example=vectors)
    rec = vectors[label]
    assert len(rec["values"]) == len(ROWS) * 2 and all(type(v) is float for v in full.values())
    if name == "accuracy":
        assert rec["values"] == [float(i % 3 == 0) for i in range(12)]
    assert full[metric] == pytest.approx(full_score(rec["values"], rec.get("sizes")), abs=1e-6)
    idx, weights = [1, 4, 7, 10], [3.0, 1.0, 0.5, 2.0]
    sub = ev.evaluate(*lm, subset={label: {"indices": idx, "weights": weights}})
    assert sub[f"scored/examples/{label}"] == 4
    want = estimate(rec["values"], idx, weights, rec.get("sizes"))
    assert sub[metric] == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="outside the 12 examples"):
        ev.evaluate(*lm, subset={label: {"indices": [12], "weights": [1.0]}})
    with pytest.raises(ValueError, match="a limit or a subset"):
        ev.evaluate(*lm, limit=2, subset={label: {"indices": [0], "weights": [1.0]}})


def _greedy(lm, row) -> str:
    from evomerge.evaluators.accuracy import generate

    return generate(*lm, [row["prompt"]], max_new_tokens=4)[0]


def test_bad_subset_config_is_one_line(search_suite, tmp_path) -> None:
    from evomerge.search.preflight import preflight

    bad = job_dict(search_suite, tmp_path / "r", fidelity={"subset": {"size": 8},
                                                           "fractions": [0.25, 1.0]})
    with pytest.raises(ConfigError) as err:
        parse_job(bad)
    assert "search.fidelity.subset" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"search\.fidelity\.subset\.size"):
        parse_job(job_dict(search_suite, tmp_path / "r", fidelity={"subset": {"size": 0}}))
    job = job_dict(search_suite, tmp_path / "r", fidelity={"subset": {"size": 8}})
    job["evaluators"][1] = {**job["evaluators"][1], "name": "perplexity"}
    job["objectives"] = [{"metric": "entropy/a", "direction": "minimize"}]
    with pytest.raises(ConfigError) as err:
        preflight(parse_job(job))
    msg = str(err.value)
    assert msg.startswith("evaluators.1: perplexity cannot be scored on a weighted subset")
    assert "remove search.fidelity.subset" in msg and "\n" not in msg


def test_a_search_scores_the_warm_up_in_full_then_the_stored_subset(ray_local, subset_run):
    from optuna.trial import TrialState

    from evomerge.search.driver import run_search

    tasks = subset_run.suite["expert_tasks"]
    data = subset_run.job_dict({"method": "anchors", "size": 8, "warmup": 4}, 8)
    job = parse_job(data)
    study = run_search(job, progress=False)
    state = study.user_attrs[SUBSET_ATTR]
    assert set(state["labels"]) == {f"entropy/{t}" for t in tasks}
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    warm = [t for t in trials if t.user_attrs.get(WARMUP_ATTR)]
    later = [t for t in trials if t.user_attrs.get(ON_SUBSET_ATTR)]
    assert len(warm) >= 4 and later and len(warm) + len(later) == 8
    assert len(state["warmup"]) == 4 and set(state["warmup"]) <= {t.number for t in warm}
    for t in warm:  # the whole fitness split (limit 32), with per-example scores stored
        assert {t.user_attrs["metrics"][f"scored/examples/entropy/{k}"] for k in tasks} == {32}
        assert len(t.user_attrs[PER_EXAMPLE_ATTR][f"entropy/{tasks[0]}"]["values"]) == 32
    for t in later:
        assert t.state == TrialState.COMPLETE and PER_EXAMPLE_ATTR not in t.user_attrs
        assert {t.user_attrs["metrics"][f"scored/examples/entropy/{k}"] for k in tasks} == {8}
    line = "fitness subset: anchors, 8 of 32 examples per label (2 labels), chosen from 4"
    for t in subset_run.check_and_resume(study, job, data, line, more=3):
        assert t.user_attrs.get(ON_SUBSET_ATTR) == "anchors" and not t.user_attrs.get(WARMUP_ATTR)
        assert t.user_attrs["metrics"][f"scored/examples/entropy/{tasks[0]}"] == 8
