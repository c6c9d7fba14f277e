"""Export recipes: a mergekit YAML, a Hugging Face model folder with a card, or the recipe YAML.

:func:`export_recipe` exports one :class:`~evomerge.recipe.Recipe` (no study needed);
:func:`export_run` picks trials from a search run (``trial``, the best, or the whole Pareto front)
and exports them. Every export is atomic: it is written into a hidden temporary sibling of
``out`` and renamed into place, so an interrupted export never leaves a folder or file that
looks complete, and a failed one leaves nothing behind.

``force`` replaces only a previous export of the same kind (:mod:`evomerge.runs.guard` decides
what may be written and replaced).

>>> export_recipe(recipe, "merged/", "hf", metrics={"acc": 0.71})  # doctest: +SKIP
PosixPath('merged')
>>> export_run("runs/quickstart", "front/", "mergekit", pareto=True)  # doctest: +SKIP
[PosixPath('front/trial-12.yaml'), PosixPath('front/trial-31.yaml')]
"""

from __future__ import annotations

import csv
import datetime as dt
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evomerge import __version__
from evomerge.config import JobConfig, LoadConfig
from evomerge.recipe import AnyRecipe, Recipe
from evomerge.runs.guard import HEADER, atomic, mark, run_paths, source_paths

FORMATS = ("mergekit", "hf", "recipe")
INDEX_FILE = "index.csv"


def export_recipe(
    recipe: AnyRecipe, out: str | Path, fmt: str, *,
    metrics: Mapping[str, Any] | None = None, held_out: Mapping[str, Any] | None = None,
    study_name: str | None = None, trial: int | None = None, force: bool = False,
    load: LoadConfig | None = None,
) -> Path:
    """Export ``recipe`` to ``out`` in ``fmt`` (``mergekit``/``recipe``: a YAML file; ``hf``: a
    model folder). ``metrics``/``held_out``/``study_name``/``trial`` go into the headers and the
    model card. Refuses an existing ``out`` unless ``force`` and it is a previous export of the
    same kind (file or folder) that is not, holds or sits in a source model; returns ``out``."""
    _check_format(fmt)
    out = Path(out)
    with atomic(out, force=force, protect=source_paths(recipe), folder=fmt == "hf") as tmp:
        _write_one(recipe, tmp, fmt, metrics=metrics, held_out=held_out,
                   study_name=study_name, trial=trial, load=load)
    return out


def export_run(
    run: str | Path | None, out: str | Path, fmt: str, *, trial: int | None = None,
    best: bool = False, pareto: bool = False, force: bool = False,
    storage_url: str | None = None, study_name: str | None = None,
) -> list[Path]:
    """Export trials of the search in ``run`` (its folder or job YAML), or with ``run=None``
    of study ``study_name`` in ``storage_url`` (:func:`evomerge.runs.results.open_run`).

    ``trial=N`` exports that trial, ``best`` (the default) the best one; either writes ``out``
    itself. ``pareto`` writes a folder ``out`` with ``trial-{N}.yaml`` (or ``trial-{N}/`` for
    ``hf``) per Pareto-optimal trial and ``index.csv`` with their scores. Returns the paths.
    """
    from evomerge.runs.results import open_run
    from evomerge.search.heldout import stored_held_out

    _check_format(fmt)
    study, job = open_run(run, storage_url=storage_url, study_name=study_name)
    run = job.resolved_run_dir if run is None else run
    chosen = select_trials(study, job, trial=trial, best=best, pareto=pareto)
    held = stored_held_out(study)
    entries = [_TrialExport(t, job, held.get(t.number, {})) for t in chosen]
    protect = run_paths(Path(run), job, storage_url)
    protect += [p for e in entries for p in source_paths(e.recipe)]
    out = Path(out)
    with atomic(out, force=force, protect=protect, folder=pareto or fmt == "hf") as tmp:
        if not pareto:
            entries[0].write(tmp, fmt, study.study_name)
            return [out]
        tmp.mkdir()
        suffix = "" if fmt == "hf" else ".yaml"
        for e in entries:
            e.write(tmp / f"trial-{e.number}{suffix}", fmt, study.study_name)
        _write_index(tmp / INDEX_FILE, entries, suffix)
        mark(tmp, fmt, study_name=study.study_name, trial=[e.number for e in entries])
    return [out / f"trial-{e.number}{suffix}" for e in entries]


def select_trials(study: Any, job: JobConfig, *, trial: int | None = None, best: bool = False,
                  pareto: bool = False) -> list[Any]:
    """The trials to export; ValueError naming the valid choices when there are none."""
    from optuna.trial import TrialState

    from evomerge.runs.results import best_trials, pareto_front

    if sum([trial is not None, best, pareto]) > 1:
        raise ValueError("give only one of trial (--trial N), best (--best) or pareto (--pareto)")
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if trial is not None:
        return [_one_trial(study, trials, trial)]
    if not done:
        raise ValueError(f"study {study.study_name!r} has no COMPLETE trial to export "
                         f"({len(trials)} trials in all)")
    if pareto:
        return sorted(pareto_front(trials, [o.direction for o in job.objectives]),
                      key=lambda t: t.number)
    chosen = best_trials(study, job)
    if len(chosen) > 1:
        numbers = ", ".join(str(t.number) for t in sorted(chosen, key=lambda t: t.number))
        raise ValueError(
            f"{len(chosen)} trials are Pareto-optimal ({numbers}); export one with --trial N "
            "or all of them with --pareto"
        )
    return chosen


def _one_trial(study: Any, trials: Sequence[Any], number: int) -> Any:
    from optuna.trial import TrialState

    by_number = {t.number: t for t in trials}
    if number not in by_number:
        valid = f"0..{max(by_number)}" if by_number else "none (the study is empty)"
        raise ValueError(
            f"trial {number} does not exist in study {study.study_name!r}; valid trial numbers: "
            f"{valid}"
        )
    t = by_number[number]
    if t.state != TrialState.COMPLETE:
        why = t.user_attrs.get("error")
        raise ValueError(
            f"trial {number} is {t.state.name}; only COMPLETE trials can be exported"
            + (f" (its error: {why})" if why else "")
        )
    if "recipe" not in t.user_attrs:
        raise ValueError(f"trial {number} has no stored recipe (user_attrs['recipe'])")
    return t


class _TrialExport:
    """One trial's recipe and scores, ready to write."""

    def __init__(self, trial: Any, job: JobConfig, held: Mapping[str, Any]) -> None:
        self.number = trial.number
        recipe = Recipe.from_dict(trial.user_attrs["recipe"])
        if recipe.dtype is None and job.load.dtype != "float32":
            # the search merged in the job's dtype; pin it so every format reproduces that
            recipe = Recipe.from_dict({**recipe.to_dict(), "dtype": job.load.dtype})
        self.recipe = recipe
        labels = [o.label for o in job.objectives]
        self.objectives = dict(zip(labels, trial.values or [], strict=False))
        self.metrics = dict(trial.user_attrs.get("metrics", {}))
        self.held_out = dict(held.get("metrics", {}))
        if "error" in held:
            self.held_out["error"] = held["error"]
        self.load = _usable_load(job.load)

    def write(self, path: Path, fmt: str, study_name: str) -> None:
        _write_one(self.recipe, path, fmt, metrics=self.metrics, held_out=self.held_out,
                   study_name=study_name, trial=self.number, load=self.load)


def _usable_load(load: LoadConfig) -> LoadConfig:
    """The job's load settings, on CPU if its accelerator is not here."""
    if load.device == "cpu":
        return load
    import torch

    kind = load.device.split(":")[0]
    here = torch.cuda.is_available() if kind == "cuda" else torch.backends.mps.is_available()
    if here:
        return load
    warnings.warn(f"the job merged on {load.device}, which is not available here; exporting on "
                  "CPU (DARE masks depend on the device)", stacklevel=3)
    return load.model_copy(update={"device": "cpu"})


def _write_one(recipe: AnyRecipe, path: Path, fmt: str, *, metrics: Mapping[str, Any] | None,
               held_out: Mapping[str, Any] | None, study_name: str | None, trial: int | None,
               load: LoadConfig | None) -> None:
    header = _header(study_name, trial, metrics, held_out)
    if fmt == "recipe":
        again = "evomerge merge THIS_FILE OUT/"
        if load is not None and load.tie_order != "mergekit":
            again += f" --tie-order {load.tie_order}"  # else ties cut by a trim differ
        header.append(f"Re-create the weights: {again}")
        path.write_text("".join(f"# {line}\n" for line in header) + recipe.to_yaml())
    elif fmt == "mergekit":
        from evomerge.runs.export_mergekit import export_mergekit_yaml

        header.append("Run: mergekit-yaml THIS_FILE OUT/")
        tie_order = load.tie_order if load else "mergekit"
        path.write_text(export_mergekit_yaml(recipe, header=header, tie_order=tie_order))
    else:
        _write_hf(recipe, path, metrics=metrics, held_out=held_out, study_name=study_name,
                  trial=trial, load=load)


def _write_hf(recipe: AnyRecipe, folder: Path, *, metrics: Mapping[str, Any] | None,
              held_out: Mapping[str, Any] | None, study_name: str | None, trial: int | None,
              load: LoadConfig | None) -> None:
    from transformers.utils import logging as hf_logging

    from evomerge.merge.workspace import merge_to_folder
    from evomerge.runs.export_mergekit import export_mergekit_yaml
    from evomerge.runs.model_card import RECIPE_FILE, model_card

    shown = hf_logging.is_progress_bar_enabled()  # "Loading weights" / "Writing model shards"
    hf_logging.disable_progress_bar()
    try:
        merge_to_folder(recipe, folder, load=load)  # a dfs recipe: a plain model of its path
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    (folder / RECIPE_FILE).write_text(recipe.to_yaml())
    mk_text, mk_error = None, None
    try:
        mk_text = export_mergekit_yaml(recipe, tie_order=load.tie_order if load else "mergekit")
    except ValueError as err:
        mk_error = str(err)
    title = f"{study_name} trial {trial}" if study_name and trial is not None else "Merged model"
    card = model_card(recipe, title=title, metrics=metrics, held_out=held_out,
                      study_name=study_name, trial=trial, mergekit_yaml=mk_text,
                      mergekit_error=mk_error)
    (folder / "README.md").write_text(card)
    mark(folder, "hf", study_name=study_name, trial=trial)


def _header(study_name: str | None, trial: int | None, metrics: Mapping[str, Any] | None,
            held_out: Mapping[str, Any] | None) -> list[str]:
    now = dt.datetime.now(dt.timezone.utc)
    origin = f"study {study_name!r} trial {trial}" if study_name else "a recipe"
    lines = [f"{HEADER}{__version__} from {origin} on {now:%Y-%m-%d %H:%M} UTC."]
    for label, values in (("metrics", metrics), ("held-out metrics", held_out)):
        if values:
            lines.append(f"{label}: " + ", ".join(f"{k}={_num(v)}" for k, v in values.items()))
    return lines


def _num(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _write_index(path: Path, entries: Sequence[_TrialExport], suffix: str) -> None:
    rows = []
    for e in entries:
        row: dict[str, Any] = {"trial": e.number, "path": f"trial-{e.number}{suffix}"}
        row.update({f"objective:{k}": v for k, v in e.objectives.items()})
        row.update(e.metrics)
        row.update({f"held_out:{k}": v for k, v in e.held_out.items()})
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
