"""``search.fidelity.subset.confirm: K``: after the last trial the top K trials by subset
estimate are re-scored on the whole fitness split as trials of their own, and every reader of
"the best trial" prefers them. The rule on a constructed study (journal file), the config's
refusals, and a real search (Ray, journal) killed mid-confirmation and resumed."""

from __future__ import annotations

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

from evomerge.config import parse_job
from evomerge.search.anchors import ON_SUBSET_ATTR
from evomerge.search.fidelity import (
    CONFIRM_ATTR,
    confirmation,
    contenders,
    to_confirm,
)
from evomerge.search.study import counted_trials
from evomerge.strict import ConfigError
from tests.test_search import job_dict

SUBSET = {"method": "random", "size": 8, "warmup": 0, "seed": 5}


def one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg
    return msg


def test_confirm_config_is_refused_in_one_line_naming_the_key(search_suite, tmp_path) -> None:
    from evomerge.search.preflight import preflight

    def job(fidelity: dict, **extra: object) -> dict:
        return {**job_dict(search_suite, tmp_path / "r", fidelity=fidelity), **extra}

    assert parse_job(job({"subset": SUBSET})).search.fidelity.subset.confirm == 0  # off
    assert parse_job(job({"subset": {**SUBSET, "confirm": 3}})).search.fidelity.subset.confirm
    with pytest.raises(ConfigError) as err:
        parse_job(job({"subset": {**SUBSET, "confirm": -1}}))
    one_line(err, "search.fidelity.subset.confirm: must be 0 (off)", "e.g. 3", "got -1")
    with pytest.raises(ConfigError) as err:  # no subset: nothing to confirm
        parse_job(job({"confirm": 3}))
    one_line(err, "search.fidelity.confirm:", "key of subset", "or remove confirm")

    tasks = search_suite["expert_tasks"]
    two = job({"subset": {**SUBSET, "confirm": 3}},
              objectives=[{"metric": f"entropy/{t}", "direction": "minimize"} for t in tasks])
    two["search"]["sampler"] = {"name": "random"}
    with pytest.raises(ConfigError) as err:
        preflight(parse_job(two))
    one_line(err, "search.fidelity.subset.confirm: is 3 with 2 objectives", "set confirm: 0")
    cost = job({"subset": SUBSET}, evaluators=[{"name": "cost"}],
               objectives=[{"metric": "cost/params", "direction": "minimize"}])
    with pytest.raises(ConfigError) as err:
        preflight(parse_job(cost))
    one_line(err, "search.fidelity.subset: every evaluator is cost", "no example to draw",
             "remove search.fidelity.subset")


def constructed(search_suite, tmp_path):
    """A journal-file study of the suite's job (maximised, so higher is better) with five
    subset trials: 1 is the lucky estimate, 3 has 2's recipe; and its job."""
    from evomerge.search.driver import build_space
    from evomerge.search.storage import save_job

    data = job_dict(search_suite, tmp_path / "run", held_out_top_k=1,
                    fidelity={"subset": {**SUBSET, "confirm": 3}})
    data["objectives"][0]["direction"] = "maximize"
    job = parse_job(data)
    space = build_space(job)
    dists = space.distributions()
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
    study = optuna.create_study(storage=storage, study_name="c", direction="maximize")
    save_job(study, job.model_dump(mode="json"))
    for i, (value, frac) in enumerate([(0.60, 0.5), (0.90, 0.1), (0.85, 0.3), (0.80, 0.3),
                                       (0.70, 0.7)]):
        params = {k: d.low + frac * (d.high - d.low) for k, d in dists.items()}
        attrs = {ON_SUBSET_ATTR: "random", "recipe": space.decode(params).to_dict(),
                 **({"baseline": "uniform"} if i == 0 else {})}
        study.add_trial(create_trial(value=value, params=params, distributions=dists,
                                     user_attrs=attrs))
    return study, job


def confirm(study, job, of: int, value: float) -> None:
    """Add the confirmation of trial ``of`` with full score ``value``."""
    t = study.trials[of]
    metrics = {f"entropy/{x}": value for x in ("a", "b")}
    result = {"metrics": metrics, "merge_s": 0.1, "eval_s": 0.2, "pid": 1}
    study.add_trial(confirmation(job, t, result, None))


def test_confirmed_trials_win_everywhere_once_the_study_has_them(search_suite, tmp_path):
    from evomerge.runs.results import best_trials
    from evomerge.runs.summary import ranked_best, run_summary
    from evomerge.search.heldout import chosen_trials
    from evomerge.search.phases import pick_winner
    from evomerge.search.progress import Tracker
    from evomerge.service.views import summary

    study, job = constructed(search_suite, tmp_path)
    live = Tracker(study, budget=5, done=5)
    assert ranked_best(study, job)[0].number == 1 == pick_winner(study)[0].number  # lucky
    assert [t.number for t in to_confirm(study.trials, 3, maximize=True)] == [1, 2, 4]
    confirm(study, job, 1, 0.65)
    confirm(study, job, 2, 0.78)  # trial 6: the confirmed best, not the lucky trial 1
    assert [t.number for t in to_confirm(study.trials, 3, maximize=True)] == [4]  # left
    confirm(study, job, 4, 0.72)
    assert to_confirm(study.trials, 3, maximize=True) == []  # done: a re-run adds none
    assert [t.number for t in contenders(study.trials)] == [5, 6, 7]
    assert [t.user_attrs[CONFIRM_ATTR] for t in contenders(study.trials)] == [1, 2, 4]

    assert ranked_best(study, job)[0].number == 6 == best_trials(study, job)[0].number
    assert [t.number for t in chosen_trials(job, study)] == [0, 6]  # top 1 + the baseline
    winner, recipe = pick_winner(study)
    assert winner.number == 6 and recipe.to_dict() == study.trials[2].user_attrs["recipe"]
    view = summary(study, job, {"state": "done"})
    assert (view["best_trial"], view["best"], view["done"]) == (6, 0.78, 5)
    assert counted_trials(study) == 5
    assert Tracker(study, budget=5, done=5).best_trial == 6  # a resumed run's tracker
    for t in study.trials[5:]:  # the live tracker, told of the confirmations as they come
        event = live.finished(t.number, TrialState.COMPLETE, t.values, None, done=5,
                              attrs=t.user_attrs)
    assert (event.best_trial, event.best) == (6, 0.78)
    text = run_summary(study, job)
    assert "best      trial 6 (confirms 2)" in text
    assert ("confirmed: the top 3 trials by subset estimate (1, 2, 4) re-scored on the whole "
            "fitness split") in " ".join(text.split())


def test_a_killed_confirmation_resumes_without_rescoring(ray_local, subset_run) -> None:
    from evomerge.runs.cost import run_cost
    from evomerge.runs.summary import ranked_best, run_summary
    from evomerge.search.driver import Search
    from evomerge.search.heldout import stored_held_out

    data = subset_run.job_dict({**SUBSET, "confirm": 3}, 7)
    job = parse_job(data)

    class Killed(Exception):
        pass

    def kill(p) -> None:  # the driver dies once the first confirmation is stored
        if p.step == "confirm" and p.done == 1:
            raise Killed

    first = Search(job)
    with pytest.raises(Killed):
        first.run(on_progress=kill)
    searched = first.study.get_trials(deepcopy=False)
    assert len(searched) == 8 and counted_trials(first.study) == 7
    want = sorted(t.number for t in to_confirm(searched[:7], 3, maximize=False))
    assert len(want) == 3 and searched[7].user_attrs[CONFIRM_ATTR] in want

    study = Search(job, resume=True).run()
    trials = study.get_trials(deepcopy=False)
    confirms = [t for t in trials if CONFIRM_ATTR in t.user_attrs]
    assert len(trials) == 10 and sorted(t.user_attrs[CONFIRM_ATTR] for t in confirms) == want
    assert confirms[0].number == 7  # the one scored before the kill, not scored again
    tasks = subset_run.suite["expert_tasks"]
    for t in confirms:  # the whole fitness split (limit 32), a plain COMPLETE trial
        assert t.state == TrialState.COMPLETE and ON_SUBSET_ATTR not in t.user_attrs
        assert {t.user_attrs["metrics"][f"scored/examples/entropy/{k}"] for k in tasks} == {32}
        assert t.user_attrs["recipe"] == trials[t.user_attrs[CONFIRM_ATTR]].user_attrs["recipe"]
    assert run_cost(study, job).search.examples == 7 * 2 * 8 + 3 * 2 * 32  # search cost
    best = ranked_best(study, job)[0]
    assert best in confirms and best.number in stored_held_out(study)  # held-out of the pick
    assert f"trial {best.number} (confirms {best.user_attrs[CONFIRM_ATTR]})" in run_summary(
        study, job)

    again = Search(job, resume=True).run()  # finished: nothing confirmed again
    assert len(again.get_trials(deepcopy=False)) == 10

    more = parse_job({**data, "search": {**data["search"], "trials": 8}})
    study = Search(more, resume=True).run()  # one more trial: the confirmations are not budget
    trials = study.get_trials(deepcopy=False)
    assert counted_trials(study) == 8 and len([t for t in trials if ON_SUBSET_ATTR in
                                            t.user_attrs]) == 8
    of = [t.user_attrs[CONFIRM_ATTR] for t in trials if CONFIRM_ATTR in t.user_attrs]
    assert len(of) == len(set(of)) and to_confirm(trials, 3, maximize=False) == []


def test_results_name_the_trial_each_confirmation_rescored(search_suite, tmp_path):
    from evomerge.runs.results import results_frame
    from evomerge.runs.summary import results_view

    study, job = constructed(search_suite, tmp_path)
    assert "confirms" not in results_view(results_frame(study, job), job, width=200)
    confirm(study, job, 2, 0.78)
    frame = results_frame(study, job)
    assert frame.loc[5, "confirm_of"] == 2 and frame.loc[1, "confirm_of"] == ""
    lines = results_view(frame, job, width=200).splitlines()
    assert "confirms" in lines[0]
    row = next(ln for ln in lines if ln.split()[:1] == ["5"])
    assert "#2" in row.split()
