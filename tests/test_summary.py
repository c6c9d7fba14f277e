"""The run summary and the default results view read the stored run: a run folder of the
previous version (tests/data/old_runs, no Ray needed) with trials, held-out scores and a
reference merge added to its journal the way the driver stores them."""

from __future__ import annotations

import datetime as dt
import statistics
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from evomerge.cli import main
from evomerge.config import Objective, load_job
from evomerge.runs.results import best_trials, open_run, results_frame
from evomerge.runs.summary import (
    busy_seconds,
    results_view,
    run_stats,
    run_summary,
    summary_rows,
)
from evomerge.search.objectives import objective_label

OLD_RUNS = Path(__file__).parent / "data" / "old_runs"
ROOT = Path(__file__).parent.parent
T0 = dt.datetime(2026, 12, 1, 22, 0, 0)


def _trial(value: float | None, minute: int, **attrs: object) -> optuna.trial.FrozenTrial:
    state = TrialState.FAIL if value is None else TrialState.COMPLETE
    metrics = {} if value is None else {"entropy/a": value - 0.1, "entropy/b": value + 0.1}
    t = create_trial(state=state, value=value, user_attrs={"metrics": metrics, **attrs})
    t.datetime_start = T0 + dt.timedelta(minutes=minute)
    t.datetime_complete = t.datetime_start + dt.timedelta(seconds=30)
    return t


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """The old cmaes run (11 complete trials, 3 baselines) plus two trials tied on the best
    fitness (the later one better on held-out), a failed one, and the TA reference."""
    run = tmp_path / "run"
    run.mkdir()
    for file in ("job.yaml", "study.journal"):
        text = (OLD_RUNS / "cmaes" / file).read_text()
        text = text.replace("/tmp/OLDSUITE/run", str(run))
        (run / file).write_text(text.replace("/tmp/OLDSUITE", str(tmp_path / "suite")))
    study, _ = open_run(run)
    study.add_trial(_trial(3.5, 30))  # trial 12
    study.add_trial(_trial(3.5, 40))  # trial 13: tied on fitness
    study.add_trial(_trial(None, 50, error="RuntimeError: boom"))  # trial 14
    study.set_user_attr("held_out:12", {"metrics": {"entropy/a": 3.6, "entropy/b": 3.8}})
    study.set_user_attr("held_out:13", {"metrics": {"entropy/a": 3.4, "entropy/b": 3.6}})
    study.set_user_attr("held_out:0", {"metrics": {"entropy/a": 3.9, "entropy/b": 3.7}})
    study.set_user_attr("reference:uniform_task_arithmetic", {
        "recipe": {}, "metrics": {"entropy/a": 3.86, "entropy/b": 3.88},
        "held_out": {"entropy/a": 3.9, "entropy/b": 3.92},
    })
    return run


def test_the_summary_numbers_are_the_stored_ones(run: Path) -> None:
    study, job = open_run(run)  # read back from the journal
    stored = {t.number: t for t in study.trials}
    attrs = study.user_attrs
    rows = {(r.kind, r.trial): r for r in summary_rows(study, job)}
    kinds = [r.kind for r in summary_rows(study, job)]
    assert kinds == ["best", "tied", "baseline", "expert", "expert", "reference"]
    # the tie on fitness goes to the better held-out score (lower entropy): 13, not 12
    assert rows["best", 13].fitness == tuple(stored[13].values)
    def held(n: int) -> tuple[float]:
        return (statistics.mean(attrs[f"held_out:{n}"]["metrics"].values()),)

    assert rows["best", 13].held_out == held(13)
    assert rows["tied", 12].held_out == held(12)
    assert rows["baseline", 0].fitness == tuple(stored[0].values)
    assert rows["baseline", 0].held_out == pytest.approx((3.8,))
    for n in (1, 2):  # each expert alone: stored fitness, no held-out scored
        assert rows["expert", n].fitness == tuple(stored[n].values)
        assert rows["expert", n].held_out == (None,)
    ref = attrs["reference:uniform_task_arithmetic"]
    assert rows["reference", None].fitness == (statistics.mean(ref["metrics"].values()),)
    assert rows["reference", None].held_out == (statistics.mean(ref["held_out"].values()),)
    stats = run_stats(study)
    starts = [t.datetime_start for t in study.trials if t.state != TrialState.RUNNING]
    ends = [t.datetime_complete for t in study.trials if t.datetime_complete]
    assert 0 < stats["wall_s"] <= (max(ends) - min(starts)).total_seconds()
    assert (stats["trials"], stats["failed"]) == (14, 1)
    assert stats["evals_per_min"] == pytest.approx(14 / (stats["wall_s"] / 60))
    assert [t.number for t in best_trials(study, job)] == [13]  # `best` and `export --best`


def test_the_summary_text(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study, job = open_run(run)
    text = run_summary(study, job)
    lines = text.splitlines()
    assert lines[0] == "done: 14 trials, 1 failed; study 'oldrun'"
    assert lines[1] == "time: the trials ran 1m31s (9.2 evaluations/min)"  # 55m54s first to last
    assert lines[2].startswith("cost: examples scored not recorded")  # old run, data gone
    assert "objective 1: mean(entropy/a, entropy/b) (minimize)" in lines
    best = next(line for line in lines if line.startswith("best"))
    assert "trial 13" in best and "3.5000" in best and f"{3.5:10.4f}" in best
    assert "2 tie on fitness" in best
    tied = next(line for line in lines if line.startswith("tied"))
    assert "trial 12" in tied and f"{3.7:10.4f}" in tied
    ref = next(line for line in lines if line.startswith("reference"))
    assert f"{3.87:10.4f}{3.91:10.4f}" in ref
    assert f"evomerge export {run} merged --format hf --trial 13" in text
    assert f"evomerge best {run}" in text and "evomerge serve --runs" in text
    capsys.readouterr()
    assert main(["results", str(run), "--summary"]) == 0
    assert capsys.readouterr().out == text + "\n"


def test_the_default_results_view_fits_100_columns(run: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["results", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert max(map(len, out)) <= 100
    # metric columns go first when the width runs out (the reference's name is long)
    assert out[0].split() == ["state", "baseline", "objective", "held_out", "examples",
                              "entropy/a"]
    row13 = next(line for line in out if line.startswith("13 "))
    assert row13.split()[1:5] == ["COMPLETE", "3.5000", "3.5000", "-"]  # no cost recorded
    assert "examples: scored by the trial's search evaluations" in "\n".join(out)
    assert main(["results", str(run), "--all"]) == 0
    every = capsys.readouterr().out
    assert "timing" in every or "duration_s" in every
    study, job = open_run(run)
    df = results_frame(study, job)
    assert df.loc[13, "held_out:objective:" + job.objectives[0].label] == 3.5  # in the CSV too


def test_the_view_of_the_quickstart_objective_fits_100_columns() -> None:
    """Three long metric names and a long label: the view shortens the headers and drops the
    metric columns that do not fit, never the objective or held-out columns."""
    job = load_job(ROOT / "configs" / "quickstart.yaml")
    study = optuna.create_study(direction="maximize")
    names = list(job.objectives[0].metrics)
    for i in range(5):
        metrics = {m: 0.1 * i + 0.01 * k for k, m in enumerate(names)}
        metrics.update({f"extra/{k}": 1.0 for k in range(20)})
        study.add_trial(create_trial(value=0.1 * i, user_attrs={"metrics": metrics}))
    study.set_user_attr("held_out:4", {"metrics": {m: 0.3 for m in names}})
    text = results_view(results_frame(study, job), job)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100, text
    assert lines[0].split()[:4] == ["state", "baseline", "objective", "held_out"]
    assert "extra/0" not in text
    assert f"objective: mean({', '.join(names)}) (maximize)" in " ".join(lines)


def test_objective_labels_say_what_they_are() -> None:
    assert objective_label(Objective(metric="accuracy/a")) == "accuracy/a"
    mean = Objective(weights={"accuracy/shift": 1, "accuracy/rot13": 1, "accuracy/mirror": 1})
    assert objective_label(mean) == "mean(accuracy/shift, accuracy/rot13, accuracy/mirror)"
    weighted = Objective(weights={"accuracy/a": 2, "accuracy/b": 0.5})
    assert objective_label(weighted) == "weighted_mean(accuracy/a=2, accuracy/b=0.5)"


def test_resume_of_a_finished_run_starts_no_ray_and_prints_the_summary(
    search_suite, tmp_path, capsys, monkeypatch
):
    import evomerge.search.driver as driver

    run = tmp_path / "run"
    run.mkdir()
    for file in ("job.yaml", "study.journal"):
        text = (OLD_RUNS / "cmaes" / file).read_text().replace("/tmp/OLDSUITE/run", str(run))
        text = text.replace("/tmp/OLDSUITE", str(search_suite["dir"]))
        (run / file).write_text(text.replace("trials: 16", "trials: 11"))  # 11 are done
    study, _ = open_run(run)
    for n in (0, 1, 2):  # the chosen trials (top 1 and the baselines) scored on held-out
        study.set_user_attr(f"held_out:{n}", {"metrics": {"entropy/a": 3.0, "entropy/b": 3.2}})
    scores = {"entropy/a": 3.86, "entropy/b": 3.88}
    study.set_user_attr("reference:uniform_task_arithmetic",
                        {"recipe": {}, "metrics": scores, "held_out": scores})

    def no_pool(*args, **kwargs):
        raise AssertionError("a finished run started workers")

    def no_ray(*args, **kwargs):
        raise AssertionError("a finished run started Ray")

    monkeypatch.setattr(driver, "WorkerPool", no_pool)  # the pool is what starts Ray
    monkeypatch.setattr("evomerge.search.ray_cluster.start_ray", no_ray)
    capsys.readouterr()
    t0 = time.monotonic()
    assert main(["search", str(run / "job.yaml"), "--resume", "--no-progress"]) == 0
    assert time.monotonic() - t0 < 10
    out = capsys.readouterr().out
    assert out.startswith("done: 11 trials") and "evomerge export" in out
    # one held-out score missing: the resume has work to do, and starts the workers
    study.set_user_attr("held_out:2", {"error": "boom"})
    with pytest.raises(AssertionError, match="started workers"):
        main(["search", str(run / "job.yaml"), "--resume", "--no-progress"])


def test_several_objectives_show_the_pareto_set_each_objective_held_out_alone() -> None:
    from evomerge.config import parse_job

    job = parse_job({
        "name": "mo", "models": {"experts": {"a": {"path": "a"}, "b": {"path": "b"}}},
        "search": {"space": {"name": "parameter", "method": "linear"},
                   "sampler": {"name": "nsga2"}},
        "evaluators": [{"name": "entropy", "data": "d.jsonl"}, {"name": "cost"}],
        "objectives": [{"metric": "entropy/d", "direction": "minimize"},
                       {"metric": "cost/params", "direction": "minimize"}],
    }, source="test")
    study = optuna.create_study(directions=["minimize", "minimize"])
    for e, c in [(1.0, 5.0), (2.0, 3.0), (3.0, 1.0), (3.0, 6.0)]:
        metrics = {"entropy/d": e, "cost/params": c}
        study.add_trial(create_trial(values=[e, c], user_attrs={"metrics": metrics}))
    study.set_user_attr("held_out:1", {"metrics": {"entropy/d": 2.5}})  # cost has no held-out
    rows = summary_rows(study, job)
    assert [(r.kind, r.trial) for r in rows] == [("best", 0), ("best", 1), ("best", 2)]
    assert rows[1].fitness == (2.0, 3.0) and rows[1].held_out == (2.5, None)
    assert [t.number for t in best_trials(study, job)] == [0, 1, 2]
    text = run_summary(study, job)
    assert "front --format hf --pareto" in text and "objective 2: cost/params" in text


def test_many_ties_are_counted_not_listed(run: Path) -> None:
    study, job = open_run(run)
    for minute in range(60, 66):  # six more trials tied with 12 and 13
        study.add_trial(_trial(3.5, minute))
    rows = summary_rows(study, job)
    assert [r.kind for r in rows].count("tied") == 7  # every tie is in the data
    lines = run_summary(study, job).splitlines()
    assert sum(line.startswith("tied") for line in lines) == 4 + 1
    assert "tied      ... and 3 more with that fitness" in lines
    assert "<- 8 tie on fitness" in next(line for line in lines if line.startswith("best"))


def test_the_summary_and_results_show_worker_and_trial_timings(run: Path, capsys) -> None:
    study, job = open_run(run)
    study.set_user_attr("evomerge:workers", [
        {"pid": 1, "host": "h1", "load_s": 12.13, "peak_rss_mb": 512.4},
        {"pid": 2, "host": "h1", "load_s": 13.0, "peak_rss_mb": 530.0},
    ])
    timing = {"merge_s": 0.25, "eval_s": 1.5, "queue_s": 0.0125, "wall_s": 1.8, "pid": 1}
    study.add_trial(_trial(3.6, 55, timing=timing))  # trial 15
    lines = run_summary(*open_run(run)).splitlines()
    assert "workers: 2 on h1 (load 12.1, 13.0 s; peak memory 512, 530 MiB)" in lines
    df = results_frame(*open_run(run))
    assert df.loc[15, ["merge_s", "eval_s", "queue_s"]].tolist() == [0.25, 1.5, 0.0125]
    assert df.loc[12, ["merge_s", "eval_s", "queue_s"]].isna().all()  # stored no timing
    capsys.readouterr()
    assert main(["results", str(run), "--all"]) == 0
    out = capsys.readouterr().out
    assert all(col in out for col in ("merge_s", "eval_s", "queue_s"))


def test_the_summary_shows_the_stored_cost_and_rank_fidelity(run: Path) -> None:
    """Trials with rungs and ``scored/`` metrics, held-out and reference passes with theirs:
    the summary's totals and taus are those of the stored numbers."""
    from evomerge.search.rank_fidelity import kendall_tau

    _, job = open_run(run)
    study = optuna.create_study(direction="minimize")
    scores = [(3.7, 3.6), (3.5, 3.55), (3.6, 3.4), (3.8, 3.9), (3.3, 3.35)]
    for i, (cheap, full) in enumerate(scores):
        rungs = [
            {"fraction": 0.25, "values": [cheap],
             "metrics": {"scored/examples/a": 16 + i, "scored/tokens/a": 160 + i}},
            {"fraction": 1.0, "values": [full],
             "metrics": {"scored/examples/a": 64, "scored/tokens/a": 640 + i}},
        ]
        study.add_trial(_trial(full, i, rungs=rungs))
    study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs={"rungs": [
        {"fraction": 0.25, "values": [3.99],
         "metrics": {"scored/examples/a": 16, "scored/tokens/a": 100}}]}))
    study.set_user_attr("held_out:4", {"metrics": {"entropy/a": 3.0, "scored/examples/a": 30}})
    study.set_user_attr("reference:uniform_task_arithmetic", {
        "recipe": {}, "metrics": {"entropy/a": 3.1, "entropy/b": 3.2, "scored/examples/a": 64},
        "held_out": {"entropy/a": 3.0, "entropy/b": 3.1, "scored/examples/a": 30},
    })
    stored = [t.user_attrs["rungs"] for t in study.trials]
    examples = sum(r["metrics"]["scored/examples/a"] for rs in stored for r in rs)
    tokens = sum(r["metrics"]["scored/tokens/a"] for rs in stored for r in rs)
    held = study.user_attrs["held_out:4"]["metrics"]["scored/examples/a"]
    ref = study.user_attrs["reference:uniform_task_arithmetic"]
    ref_n = ref["metrics"]["scored/examples/a"] + ref["held_out"]["scored/examples/a"]
    text = " ".join(run_summary(study, job).split())  # the lines wrap at 100 columns
    n = run_stats(study)["trials"]
    assert (f"cost: the search scored {examples:,} examples ({tokens:,} tokens) in {n} trials; "
            f"after it, not search cost: held-out {held:,}, reference {ref_n:,}") in text
    promoted = [rs for rs in stored if len(rs) == 2]
    tau = kendall_tau([r[0]["values"][0] for r in promoted], [r[1]["values"][0] for r in promoted])
    assert f"0.25 -> {tau:.2f} ({len(promoted)} candidates)" in text
    assert "fidelity: auto" not in text
    history = [{"probes": 8, "fraction": 0.25, "taus": {}}, {"probes": 9, "fraction": 0.5}]
    study.set_user_attr("fidelity:auto", {"fraction": 0.5, "history": history})
    text = " ".join(run_summary(study, job).split())
    assert "fidelity: auto chose 0.5 (after 9 probes; decisions over the search: 0.25, 0.5)" \
        in text
    df = results_frame(study, job)
    assert df["cost:examples_cum"].tolist()[:-1] == [  # the last row: the reference
        sum(r["metrics"]["scored/examples/a"] for rs in stored[: i + 1] for r in rs)
        for i in range(len(stored))]
    view = results_view(df, job)
    assert max(map(len, view.splitlines())) <= 100
    pruned = next(line for line in view.splitlines() if line.startswith("5 "))
    assert pruned.split()[1:3] == ["PRUNED", "-"] and pruned.split()[4] == "16"


def test_wall_time_leaves_out_the_pause_of_a_resumed_run():
    """Trials of two drivers a day apart: only the time when a trial ran counts."""
    from datetime import datetime, timedelta

    t0 = datetime(2026, 12, 1, 10, 0, 0)
    sec = timedelta(seconds=1)
    spans = [(t0, t0 + 4 * sec), (t0 + sec, t0 + 2 * sec), (t0 + 3 * sec, t0 + 6 * sec),
             (t0 + timedelta(days=1), t0 + timedelta(days=1) + 5 * sec)]
    assert busy_seconds(spans) == 6 + 5
    assert busy_seconds([]) == 0.0
