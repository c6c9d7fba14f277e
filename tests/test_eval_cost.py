"""Evaluation cost (examples and tokens scored) of a run, read from its storage: the pure sums,
the estimate for runs without ``scored/`` metrics, and a real multi-fidelity search on Ray
whose costs are checked against the fractions and the data sizes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState, create_trial

from evomerge.cli import main
from evomerge.config import parse_job
from evomerge.runs.cost import (
    Cost,
    estimators,
    limited,
    metrics_cost,
    run_cost,
    search_costs,
    trial_cost,
)
from evomerge.runs.results import open_run, results_frame
from evomerge.runs.summary import results_view, run_summary
from evomerge.search.rank_fidelity import kendall_tau
from evomerge.search.worker import MergeWorker, _limit

SCORED = "scored/examples/"


def test_a_trial_costs_the_sum_of_its_rungs() -> None:
    rungs = [
        {
            "fraction": 0.25,
            "values": [1.0],
            "metrics": {"scored/examples/a": 150, "scored/tokens/a": 1500, "x": 1.0},
        },
        {
            "fraction": 1.0,
            "values": [1.1],
            "metrics": {"scored/examples/a": 600, "scored/tokens/a": 6000, "x": 1.1},
        },
    ]
    attrs = {"rungs": rungs, "metrics": rungs[-1]["metrics"]}  # metrics: the last rung's
    assert trial_cost(attrs) == Cost(750, 7500)
    assert trial_cost({"metrics": rungs[0]["metrics"]}) == Cost(150, 1500)  # one evaluation
    assert trial_cost({"error": "boom"}) == Cost(0, 0)  # failed with nothing: not counted
    # a rung read off the full evaluation's prefix (one call scored both) costs nothing more
    free = [{**rungs[0], "prefix": True}, rungs[1]]
    assert trial_cost({"rungs": free}) == Cost(600, 6000)
    assert metrics_cost({"x": 1.0}) is None  # an older run: no scored/ metrics
    assert metrics_cost({"scored/examples/a": 3, "scored/examples/b": 4}) == Cost(7, None)


def test_the_estimate_follows_the_old_worker_limit() -> None:
    assert [limited(600, f, None) for f in (0.1, 0.25, 1.0)] == [60, 150, 600]
    assert limited(601, 0.25, None) == math.ceil(0.25 * 601)
    assert limited(600, 0.25, 32) == 32  # the fraction is of the rows, then the config's limit
    assert limited(3, 0.01, None) == 1

    class Ev:  # what worker._limit reads
        num_examples = 601

    assert limited(601, 0.25, None) == _limit(Ev(), 0.25)
    attrs = {
        "rungs": [{"fraction": 0.25, "metrics": {"x": 1}}, {"fraction": 1.0, "metrics": {"x": 2}}]
    }
    cost = trial_cost(attrs, estimate=lambda f: limited(600, f, None) * 2)
    assert cost == Cost(1500, None, estimated=True)


def _frozen(number: int, attrs: dict[str, Any]) -> optuna.trial.FrozenTrial:
    t = create_trial(value=1.0, user_attrs=attrs)
    t.number = number
    return t


def old_job() -> Any:
    from tests.test_summary import OLD_RUNS

    return parse_job(yaml.safe_load((OLD_RUNS / "cmaes" / "job.yaml").read_text()), source="old")


def test_cumulative_cost_is_in_trial_order() -> None:
    trials = [_frozen(n, {"metrics": {"scored/examples/a": 10 * (n + 1)}}) for n in (2, 0, 1)]
    costs = search_costs(trials, old_job())
    assert [c.number for c in costs] == [0, 1, 2]
    assert [c.cumulative.examples for c in costs] == [10, 30, 60]


class CountingWorker(MergeWorker):
    """Reports ``scored/examples/<label>`` and ``scored/tokens/<label>`` the way the evaluators
    are to report them (issue 18), where they do not yet: the examples actually scored (the
    worker's fidelity limit, then the config's) and their prompt tokens."""

    def evaluate(self, recipe_json: str, fraction: float = 1.0) -> dict[str, Any]:
        return self._counted(super().evaluate(recipe_json, fraction), self.evaluators, fraction)

    def evaluate_held_out(self, recipe_json: str) -> dict[str, Any]:
        out = super().evaluate_held_out(recipe_json)
        return self._counted(out, self._held_out or [], 1.0)

    def _counted(self, out: dict[str, Any], evaluators: list[Any], fraction: float) -> dict:
        from transformers import AutoTokenizer

        from evomerge.evaluators.base import effective_limit

        metrics = out["metrics"]
        if any(k.startswith(SCORED) for k in metrics):  # the evaluators count: theirs stand
            return out
        tok = AutoTokenizer.from_pretrained(self.job.models.base.path)
        for ev in evaluators:
            n = effective_limit(ev.num_examples, _limit(ev, fraction), ev.cfg.limit)
            label = ev.metric.split("/", 1)[1]
            metrics[SCORED + label] = n
            metrics[f"scored/tokens/{label}"] = sum(len(tok(t)["input_ids"]) for t in ev.texts[:n])
        return out


def _rows(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def test_a_multi_fidelity_search_costs_what_its_fractions_and_data_say(
    ray_local, search_suite, tmp_path, capsys
):
    from evomerge.search.driver import run_search
    from tests.test_search import job_dict

    data = job_dict(
        search_suite,
        tmp_path / "run",
        trials=10,
        held_out_top_k=2,
        sampler={"name": "random", "seed": 3},
        fidelity={"fractions": [0.25, 1.0], "reduction_factor": 2},
    )
    for ev in data["evaluators"]:
        del ev["limit"]  # the fraction is of the rows: with limit 32 both rungs would score 32
    job = parse_job(data)
    study = run_search(job, progress=False, worker_class=CountingWorker)
    tasks = search_suite["expert_tasks"]
    root = search_suite["dir"] / "data"
    val = {t: _rows(root / t / "validation.jsonl") for t in tasks}
    test = {t: _rows(root / t / "test.jsonl") for t in tasks}

    def at(fraction: float) -> int:  # examples of one evaluation at this fraction, every task
        return sum(math.ceil(fraction * val[t]) for t in tasks)

    trials = study.get_trials(deepcopy=False)
    states = {t.number: t.state for t in trials}
    assert TrialState.PRUNED in states.values()
    costs = search_costs(trials, job)
    fit_est, held_est = estimators(job)
    for c in costs:
        t = study.trials[c.number]
        fractions = [r["fraction"] for r in t.user_attrs.get("rungs", [])] or [0.25]
        assert t.state == TrialState.COMPLETE or fractions == [0.25]
        assert c.cost.examples == sum(at(f) for f in fractions)
        assert c.cost.tokens is not None and c.cost.tokens > c.cost.examples
        # an older run stores no scored/ metrics: the estimate gives the same examples
        bare = [
            {**r, "metrics": {k: v for k, v in r["metrics"].items() if "scored/" not in k}}
            for r in t.user_attrs.get("rungs", [])
        ]
        if bare:
            assert trial_cost({"rungs": bare}, estimate=fit_est).examples == c.cost.examples
    assert [c.cumulative.examples for c in costs] == [
        sum(x.cost.examples for x in costs[: i + 1]) for i in range(len(costs))
    ]
    run = run_cost(study, job)
    assert run.search.examples == costs[-1].cumulative.examples
    held = [k for k in study.user_attrs if k.startswith("held_out:")]
    assert held and run.held_out.examples == len(held) * sum(test.values())
    refs = [k for k in study.user_attrs if k.startswith("reference:")]
    assert run.reference.examples == len(refs) * (at(1.0) + sum(test.values()))
    assert held_est(1.0) == sum(test.values()) and fit_est(0.25) == at(0.25)

    # the results table and the summary show these numbers (of the study the search returns,
    # as `evomerge search` prints its summary; the journal's copy is read by the CLI below)
    df = results_frame(study, job)
    stored = results_frame(*open_run(tmp_path / "run"))  # the journal holds the same
    cost_cols = [c for c in df.columns if c.startswith("cost:")]
    assert stored[cost_cols].equals(df[cost_cols])
    for c in costs:
        assert df.loc[c.number, "cost:examples"] == c.cost.examples
        assert df.loc[c.number, "cost:examples_cum"] == c.cumulative.examples
    view = results_view(df, job).splitlines()
    assert max(map(len, view)) <= 100 and "examples" in view[0].split()
    pruned = next(n for n, s in states.items() if s == TrialState.PRUNED)
    row = next(line for line in view if line.split()[0] == str(pruned))
    assert str(at(0.25)) in row.split()
    text = run_summary(study, job)
    assert (
        f"cost: the search scored {run.search.examples:,} examples "
        f"({run.search.tokens:,} tokens) in {len(trials)} trials"
    ) in text
    assert f"held-out {run.held_out.examples:,}, reference {run.reference.examples:,}" in text
    promoted = [t for t in trials if len(t.user_attrs.get("rungs", [])) == 2]
    if len(promoted) >= 2:  # rank fidelity of the promoted candidates, from their rungs
        cheap = [t.user_attrs["rungs"][0]["values"][0] for t in promoted]
        full = [t.user_attrs["rungs"][1]["values"][0] for t in promoted]
        tau = kendall_tau(cheap, full)
        shown = "-" if math.isnan(tau) else f"{tau:.2f}"
        assert f"0.25 -> {shown} ({len(promoted)} candidates)" in " ".join(text.split())
    capsys.readouterr()
    assert main(["results", str(tmp_path / "run"), "--all"]) == 0
    out = capsys.readouterr().out
    assert all(
        col in out for col in ("cost:examples_cum", "cost:tokens", "cost:held_out_examples")
    )


def test_a_run_without_scored_metrics_is_estimated_from_its_data(tmp_path: Path) -> None:
    """An older run (tests/data/old_runs: entropy on a and b, limit 64, held-out on test):
    with its data files there, the cost is estimated from their sizes and says so."""
    from tests.test_summary import OLD_RUNS

    run, suite = tmp_path / "run", tmp_path / "suite"
    run.mkdir()
    for file in ("job.yaml", "study.journal"):
        text = (OLD_RUNS / "cmaes" / file).read_text().replace("/tmp/OLDSUITE/run", str(run))
        (run / file).write_text(text.replace("/tmp/OLDSUITE", str(suite)))
    sizes = {"a": (100, 30), "b": (40, 20)}  # validation rows, test rows
    for task, (n_val, n_test) in sizes.items():
        (suite / "data" / task).mkdir(parents=True)
        for split, n in (("validation", n_val), ("test", n_test)):
            (suite / "data" / task / f"{split}.jsonl").write_text('{"prompt": "x"}\n' * n)
    study, job = open_run(run)
    study.set_user_attr("held_out:0", {"metrics": {"entropy/a": 3.0, "entropy/b": 3.1}})
    per_trial = min(100, 64) + min(40, 64)  # each evaluator's limit
    done = [t for t in study.trials if t.user_attrs.get("metrics")]
    cost = run_cost(study, job)
    assert cost.search == Cost(per_trial * len(done), None, estimated=True)
    assert cost.held_out.examples == 30 + 20
    text = run_summary(study, job)
    assert f"the search scored {per_trial * len(done):,} examples in" in text
    assert "estimated from the fidelity fractions and the data sizes" in " ".join(text.split())
    df = results_frame(study, job)
    assert df.loc[0, "cost:examples"] == per_trial and df.loc[0, "cost:held_out_examples"] == 50
    legend = " ".join(results_view(df, job).splitlines()[-3:])
    assert "estimated from the fractions and data sizes" in legend


@pytest.mark.parametrize("attrs", [{"metrics": {}}, {}])
def test_a_trial_with_no_evaluation_shows_no_cost(attrs: dict[str, Any]) -> None:
    study = optuna.create_study(direction="minimize")
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs=attrs))
    assert pd.isna(results_frame(study, old_job()).loc[0, "cost:examples"])
