"""The run summary printed at the end of ``evomerge search`` and by ``evomerge results
--summary``: the best trial(s) with fitness and held-out score, the baselines, the reference
merges and each expert alone on the same splits, wall time, throughput, failures, and the next
commands.

A pure function of the stored study and its job: every number is read from the storage (the
source of truth), never from the live search.

>>> from evomerge.runs.results import open_run
>>> print(run_summary(*open_run("runs/quickstart")))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from evomerge.config import JobConfig, Objective
from evomerge.runs.cost import RunCost, run_cost
from evomerge.search.objectives import objective_label, objective_values
from evomerge.search.rank_fidelity import STUDY_ATTR, FractionTau, study_taus
from evomerge.search.study import INTERRUPTED

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
MAX_TIED = 4  # tied trials listed under the best one; the rest are counted


@dataclass(frozen=True)
class Row:
    """One line of the summary: ``kind`` is ``best``, ``tied``, ``baseline``, ``expert`` (an
    expert alone) or ``reference``; ``trial`` is ``None`` for a reference merge; values are one
    per objective (``None``: not scored, e.g. no held-out split)."""

    kind: str
    name: str
    trial: int | None
    fitness: tuple[float | None, ...]
    held_out: tuple[float | None, ...]


def held_out_values(job: JobConfig, metrics: Mapping[str, Any] | None) -> tuple[float | None, ...]:
    """The objectives computed on held-out metrics; ``None`` each where they cannot be."""
    if not metrics or "error" in metrics:
        return (None,) * len(job.objectives)
    return tuple(_value(o, metrics) for o in job.objectives)


def _value(objective: Objective, metrics: Mapping[str, Any]) -> float | None:
    try:
        return objective_values([objective], metrics)[0]
    except (KeyError, ValueError, TypeError):  # a metric with no held-out split, or non-finite
        return None


def _held(study: optuna.Study, job: JobConfig) -> dict[int, tuple[float | None, ...]]:
    from evomerge.search.heldout import stored_held_out

    return {n: held_out_values(job, e.get("metrics")) for n, e in stored_held_out(study).items()}


def ranked_best(study: optuna.Study, job: JobConfig) -> list[FrozenTrial]:
    """One objective: every trial that competes for best (all complete ones, or the ones scored
    on the whole fitness split once the subset estimates are confirmed:
    :func:`~evomerge.search.fidelity.contenders`) tied on the best fitness, the winner first
    (better held-out score, then the lower trial number). Several: the Pareto set by trial
    number."""
    from evomerge.search.fidelity import contenders

    done = contenders(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if not done:
        return []
    if len(job.objectives) > 1:
        from evomerge.runs.results import pareto_front

        return sorted(pareto_front(done, [o.direction for o in job.objectives]),
                      key=lambda t: t.number)
    sign = 1.0 if job.objectives[0].direction == "maximize" else -1.0
    top = max(sign * t.values[0] for t in done)
    tied = [t for t in done if sign * t.values[0] == top]
    held = _held(study, job)

    def key(t: FrozenTrial) -> tuple[float, int]:
        h = held.get(t.number, (None,))[0]
        return (-sign * h if h is not None else math.inf, t.number)

    return sorted(tied, key=key)


def summary_rows(study: optuna.Study, job: JobConfig) -> list[Row]:
    """The best trial(s), then each baseline trial, then each reference merge."""
    from evomerge.search.references import stored_references

    held = _held(study, job)
    none = (None,) * len(job.objectives)
    best = ranked_best(study, job)
    single = len(job.objectives) == 1
    rows = [
        Row("best" if i == 0 or not single else "tied", _trial_name(t), t.number,
            tuple(t.values), held.get(t.number, none))
        for i, t in enumerate(best)
    ]
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("baseline"):
            kind = "expert" if t.user_attrs["baseline"].startswith("expert:") else "baseline"
            rows.append(Row(kind, _trial_name(t), t.number, tuple(t.values),
                            held.get(t.number, none)))
    for name, ref in stored_references(study).items():
        rows.append(Row("reference", name, None, held_out_values(job, ref.get("metrics")),
                        held_out_values(job, ref.get("held_out"))))
    return rows


def _trial_name(t: FrozenTrial) -> str:
    from evomerge.search.fidelity import CONFIRM_ATTR

    baseline, of = t.user_attrs.get("baseline"), t.user_attrs.get(CONFIRM_ATTR)
    note = baseline or (None if of is None else f"confirms {of}")
    return f"trial {t.number}" + (f" ({note})" if note else "")


def busy_seconds(spans: Iterable[tuple[datetime, datetime]]) -> float:
    """Seconds covered by the union of the ``(start, end)`` spans: time when at least one trial
    ran. A resumed run's gap between two drivers (minutes or days) is not counted."""
    total, end = 0.0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            total, end = total + (b - a).total_seconds(), b
        elif b > end:
            total, end = total + (b - end).total_seconds(), b
    return total


def run_stats(study: optuna.Study) -> dict[str, Any]:
    """Finished trials, failures (interrupted ones apart), wall time of the trials (seconds
    when at least one trial ran: a resumed run's pause is left out) and evaluations per
    minute over it."""
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in FINISHED]
    interrupted = sum(1 for t in finished if t.user_attrs.get(INTERRUPTED))
    failed = sum(1 for t in finished if t.state == TrialState.FAIL) - interrupted
    wall = busy_seconds(
        (t.datetime_start, t.datetime_complete)
        for t in finished if t.datetime_start and t.datetime_complete
    )
    evaluations = len(finished) - interrupted
    return {
        "trials": evaluations,
        "failed": failed,
        "interrupted": interrupted,
        "pruned": sum(1 for t in finished if t.state == TrialState.PRUNED),
        "wall_s": wall,
        "evals_per_min": evaluations / (wall / 60) if wall > 0 else 0.0,
    }


def run_summary(study: optuna.Study, job: JobConfig, *, run: str | None = None,
                total_s: float | None = None) -> str:
    """The summary as text. ``run`` is how the next commands name the run (default: the run
    folder; give ``--storage URL --study NAME`` for a run opened by its storage); ``total_s``
    is the whole command's time, when the caller measured it."""
    run = run or str(job.resolved_run_dir)
    s = run_stats(study)
    lines = [
        f"done: {s['trials']} trials, {s['failed']} failed"
        + (f", {s['pruned']} pruned" if s["pruned"] else "")
        + (f", {s['interrupted']} interrupted and re-run" if s["interrupted"] else "")
        + f"; study {study.study_name!r}",
        f"time: the trials ran {_duration(s['wall_s'])} ({s['evals_per_min']:.1f} "
        "evaluations/min)" + ("" if total_s is None else f"; {_duration(total_s)} in all, "
                              "with start-up and held-out passes"),
    ]
    lines += _workers(study.user_attrs.get("evomerge:workers"))
    lines += cost_lines(run_cost(study, job), s["trials"])
    lines += fidelity_lines(study_taus(study.get_trials(deepcopy=False)))
    lines += auto_fidelity_lines(study.user_attrs.get(STUDY_ATTR))
    lines += subset_lines(study.user_attrs.get("fidelity:subset"))
    lines += confirm_lines(study.get_trials(deepcopy=False))
    for i, o in enumerate(job.objectives, 1):
        lines.append(f"objective {i}: {objective_label(o)} ({o.direction})")
    lines.append("held-out: the objective(s) on each evaluator's held-out split")
    lines += [""] + _table(summary_rows(study, job), len(job.objectives))
    runs = str(job.resolved_run_dir.parent)
    best = ranked_best(study, job)
    lines += ["", "next:", *_next(run, runs, best[:1] if len(job.objectives) == 1 else best)]
    return "\n".join(lines)


def cost_lines(cost: RunCost, trials: int) -> list[str]:
    """``cost: the search scored 3,000 examples (41,000 tokens) in 14 trials; after it, not
    search cost: held-out 256, reference 1,328``; says so when the counts are estimated
    (:mod:`evomerge.runs.cost`) or not known (``?``)."""
    search = cost.search
    if search.examples is None:
        return textwrap.wrap("cost: examples scored not recorded (a run of an older "
                             "evomerge; its data files are not there to estimate from)", 100,
                             subsequent_indent="  ")
    tokens = f" ({search.tokens:,} tokens)" if search.tokens is not None else ""
    line = f"cost: the search scored {search.examples:,} examples{tokens} in {trials} trials"
    after = {"held-out": cost.held_out.examples, "reference": cost.reference.examples}
    if any(n != 0 for n in after.values()):
        line += "; after it, not search cost: " + ", ".join(
            f"{name} {'?' if n is None else f'{n:,}'}" for name, n in after.items())
    if cost.estimated:
        line += ("; estimated from the fidelity fractions and the data sizes (this run stored "
                 "no scored/ metrics)")
    return textwrap.wrap(line, 100, subsequent_indent="  ")


def fidelity_lines(taus: Sequence[FractionTau]) -> list[str]:
    """``rank fidelity: Kendall tau of the score on a fraction of the examples against the full
    score, over the candidates scored at both: 0.25 -> 0.71 (6 candidates)``."""
    if not taus:
        return []
    parts = [
        f"{t.fraction:g} -> {'/'.join('-' if math.isnan(x) else f'{x:.2f}' for x in t.taus)} "
        f"({t.n} candidates)"
        for t in taus
    ]
    return textwrap.wrap("rank fidelity: Kendall tau of the score on a fraction of the examples "
                         "against the full score, over the candidates scored at both: "
                         + ", ".join(parts), 100, subsequent_indent="  ")


def auto_fidelity_lines(state: Any) -> list[str]:
    """``fidelity: auto chose 0.25 (after 24 probes; decisions over the search: 0.1, 0.25)``
    from the study attribute the loop stores for ``search.fidelity.mode: auto``."""
    if not isinstance(state, dict) or not state.get("history"):
        return []
    history = state["history"]
    path = ", ".join(f"{h['fraction']:g}" for h in history)
    return textwrap.wrap(f"fidelity: auto chose {history[-1]['fraction']:g} (after "
                         f"{history[-1]['probes']} probes; decisions over the search: {path})",
                         100, subsequent_indent="  ")


def subset_lines(state: Any) -> list[str]:
    """``fitness subset: anchors, 16 of 600 examples per label ...`` (search.fidelity.subset)."""
    from evomerge.search.anchors import subset_line

    line = subset_line(state)
    return [] if line is None else textwrap.wrap(line, 100, subsequent_indent="  ")


def confirm_lines(trials: Iterable[FrozenTrial]) -> list[str]:
    """``confirmed: the top 3 trials by subset estimate (12, 40, 41) re-scored on the whole
    fitness split; the best is chosen among the trials scored in full``
    (``search.fidelity.subset.confirm``)."""
    from evomerge.search.fidelity import CONFIRM_ATTR

    of = sorted(t.user_attrs[CONFIRM_ATTR] for t in trials
                if t.state == TrialState.COMPLETE and CONFIRM_ATTR in t.user_attrs)
    if not of:
        return []
    return textwrap.wrap(f"confirmed: the top {len(of)} trials by subset estimate "
                         f"({', '.join(map(str, of))}) re-scored on the whole fitness split; "
                         "the best is chosen among the trials scored in full", 100,
                         subsequent_indent="  ")


def _workers(info: Any) -> list[str]:
    """``workers: 2 on host1 (load 12.1 s, 13.0 s; peak memory 512, 530 MiB)``; none for a run
    that stored no workers (an older one)."""
    if not info:
        return []
    hosts = sorted({w.get("host") or "?" for w in info})
    load = ", ".join(f"{w['load_s']:.1f}" for w in info if w.get("load_s") is not None)
    peak = ", ".join(f"{w['peak_rss_mb']:.0f}" for w in info if w.get("peak_rss_mb"))
    parts = [f"load {load} s" if load else "", f"peak memory {peak} MiB" if peak else ""]
    details = "; ".join(p for p in parts if p)
    return [f"workers: {len(info)} on {', '.join(hosts)}" + (f" ({details})" if details else "")]


def _table(rows: Sequence[Row], n: int) -> list[str]:
    if not rows:
        return ["no completed trial"]
    heads = ["fitness", "held-out"] if n == 1 else [
        h for i in range(1, n + 1) for h in (f"fit {i}", f"held {i}")]
    width = max(24, *(len(r.name) for r in rows)) + 2
    out = [" " * 10 + f"{'':<{width}}" + "".join(f"{h:>10}" for h in heads)]
    tie = sum(1 for r in rows if r.kind == "tied")
    for i, r in enumerate(rows):  # rows[0] is the best, the tied ones follow it
        if r.kind == "tied" and i > MAX_TIED:
            if i == MAX_TIED + 1:
                out.append(f"{'tied':<10}... and {tie - MAX_TIED} more with that fitness")
            continue
        cells = [c for pair in zip(r.fitness, r.held_out, strict=True) for c in pair]
        note = ""
        if r.kind == "best" and tie and n == 1:
            note = f"  <- {tie + 1} tie on fitness: better held-out wins"
        out.append(f"{r.kind:<10}{r.name:<{width}}" + "".join(_cell(c) for c in cells) + note)
    return out


def _cell(v: float | None) -> str:
    return f"{'-':>10}" if v is None else f"{v:>10.4f}"


def _next(run: str, runs: str, best: Sequence[FrozenTrial]) -> list[str]:
    pick = f"merged --format hf --trial {best[0].number}" if len(best) == 1 else (
        "front --format hf --pareto")
    commands = [
        (f"evomerge best {run}", "the best recipe(s) as YAML"),
        (f"evomerge results {run}", "every trial (--all: all columns)"),
        (f"evomerge export {run} {pick}", "a Hugging Face folder"),
        (f"evomerge serve --runs {runs}", "the web dashboard"),
    ]
    width = max(len(c) for c, _ in commands) + 2
    return [f"  {c:<{width}}# {why}" for c, why in commands]


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def results_view(df: pd.DataFrame, job: JobConfig, *, width: int = 100) -> str:
    """The default ``evomerge results`` table: trial, state, baseline (and, once a subset search
    confirmed some, the trial each confirmation re-scored), the objective(s), the
    held-out score(s), the examples the trial scored (all rungs), then the metrics of each
    weighted mean while the table fits ``width`` columns (``--all`` prints every column). The
    lines under it name what the headers stand for."""
    if df.empty:
        return "no trials yet"
    labels = [o.label for o in job.objectives]
    one = len(labels) == 1
    names = ["objective"] if one else [f"objective {i}" for i in range(1, len(labels) + 1)]
    view = pd.DataFrame(index=df.index)
    view["state"] = df["state"]
    view["baseline"] = df["baseline"].where(df["state"] != "REFERENCE", "")  # named in the index
    confirms = df["confirm_of"].fillna("") if "confirm_of" in df.columns else None
    if confirms is not None and (confirms != "").any():  # the reference rows have none
        view["confirms"] = [f"#{v}" if v != "" else "" for v in confirms]
    for label, name in zip(labels, names, strict=True):
        held = f"held_out{name.removeprefix('objective')}"
        for col, key in ((name, f"objective:{label}"), (held, held_out_column(label))):
            view[col] = df[key] if key in df.columns else math.nan
    # as text: a column of ints and None would print "None" or "1500.0000"
    counts = df["cost:examples"] if "cost:examples" in df.columns else [None] * len(df)
    view["examples"] = [f"{_count(v):>9}" for v in counts]  # 9: two spaces before the header
    core = len(view.columns)  # never dropped, even past the width
    metrics = dict.fromkeys(  # a one-metric objective is its own column already
        m for o in job.objectives if o.weights for m in o.metrics if m in df.columns)
    for m in metrics:
        view[m] = df[m]
    legend = [f"{n}: {objective_label(o)} ({o.direction})"
              for n, o in zip(names, job.objectives, strict=True)]
    legend.append("held_out: the same on the held-out split; --all: every column")
    legend.append(_examples_legend(df))
    legend = [part for line in legend for part in textwrap.wrap(line, width)]
    while True:
        text = view.to_string(float_format=lambda v: f"{v:.4f}", na_rep="-")
        if max(len(line) for line in text.splitlines()) <= width or len(view.columns) <= core:
            return "\n".join([text, *legend])
        view = view.drop(columns=view.columns[-1])


def _examples_legend(df: pd.DataFrame) -> str:
    text = ("examples: scored by the trial's search evaluations, every rung (held-out and "
            "reference passes apart)")
    known = df["cost:examples"].notna() if "cost:examples" in df.columns else None
    if known is None or not known.any():
        return text + "; '-': not recorded (a run of an older evomerge)"
    if (df["cost:estimated"].fillna(False).astype(bool) & known).any():
        text += "; estimated from the fractions and data sizes (no scored/ metrics stored)"
    return text


def _count(v: Any) -> str:
    return "-" if v is None or pd.isna(v) else f"{int(v)}"


def held_out_column(label: str) -> str:
    """The results-frame column of an objective computed on the held-out metrics."""
    return f"held_out:objective:{label}"
