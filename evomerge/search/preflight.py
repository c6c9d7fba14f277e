"""Preflight: check a job's files, models and machine before Ray starts or anything is written.

``evomerge validate`` and :func:`evomerge.search.driver.run_search` call :func:`preflight`
(models in :mod:`evomerge.search.model_checks`). It
reads ``config.json`` files, safetensors headers and the evaluation JSONL, never weights, and
raises :class:`ConfigError` naming the dotted key and the fix on one line: a missing or odd model
folder, pickle-only weights, models whose tensors differ, ``layer_groups`` above the layer count, a
hub id that cannot be fetched, missing or malformed data, a ``run_dir`` that cannot be created, a
device or GPU this machine lacks, an objective no evaluator produces.

>>> notes = preflight(load_job("configs/quickstart.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from evomerge.config import DataEvalConfig, JobConfig
from evomerge.search.model_checks import check_models
from evomerge.strict import ConfigError, MachineError


def preflight(
    job: JobConfig, *, storage_url: str | None = None, address: str | None = None,
    search: bool = True,
) -> list[str]:
    """Refuse the job with one :class:`ConfigError` line, or return notes on skipped checks.

    Model and data paths inside a ``toy_suite.dir`` that is not built yet are skipped (with a
    note): ``run_search`` builds the suite first, then calls this again. Problems of this
    machine (:class:`MachineError`) refuse a ``search`` whose workers run here (no cluster
    ``address``); for ``validate`` (``search=False``) or on a cluster they are notes.
    """
    from evomerge.search.objectives import check_objectives

    try:
        check_objectives(job.objectives, job.evaluators)
    except ValueError as err:
        raise ConfigError(f"{err}; fix the metric name or add the evaluator") from None
    check_subset_job(job)
    local = not (address or job.resources.address or os.environ.get("RAY_ADDRESS"))
    notes: list[str] = []
    strict = search and local
    pending = _pending_toy_suite(job)
    _check_storage(job, storage_url)
    if local or not search:  # a search on a cluster: its workers run elsewhere
        _machine_check(notes, strict, _check_machine, job)
    check_models(job, skip=lambda location: _inside(location, pending),
                 machine=lambda check, *args: _machine_check(notes, strict, check, *args))
    _check_data(job, pending)
    if pending is not None:
        notes.append(
            f"toy_suite.dir {job.toy_suite.dir!r} is not built yet, so the models and data in "  # type: ignore[union-attr]
            "it were not checked; `evomerge search` builds it, then checks them"
        )
    return notes


def _machine_check(notes: list[str], strict: bool, check: Any, *args: Any) -> Any:
    """``check(*args)``; a :class:`MachineError` is raised when ``strict``, else noted."""
    try:
        return check(*args)
    except MachineError as err:
        if strict:
            raise
        notes.append(f"{err} (on this machine; fine where the workers have it)")
        return None


def _pending_toy_suite(job: JobConfig) -> Path | None:
    if job.toy_suite is None:
        return None
    from evomerge.toy.build import suite_is_valid

    root = Path(job.toy_suite.dir)
    return None if suite_is_valid(root, job.toy_suite.size) else root.resolve()


def _inside(path: str | Path, root: Path | None) -> bool:
    return root is not None and Path(path).expanduser().resolve().is_relative_to(root)


# -- where the run writes ----------------------------------------------------------------------
def _check_storage(job: JobConfig, storage_url: str | None) -> None:
    url = storage_url or job.storage
    if url is None:
        check_writable_dir("run_dir", job.resolved_run_dir)
    elif url.startswith("journal:"):
        check_writable_dir("storage", Path(url.removeprefix("journal:")).parent)


def check_writable_dir(key: str, folder: Path) -> None:
    """``folder`` exists as a writable folder or could be created; nothing is created."""
    node = folder
    while not node.exists():
        if node.parent == node:
            break
        node = node.parent
    if not node.is_dir():
        raise ConfigError(
            f"{key}: {str(folder)!r} cannot be a folder: {str(node)!r} is a file; choose "
            "another path"
        )
    if not os.access(node, os.W_OK | os.X_OK):
        what = "is not writable" if node == folder else f"cannot be created in {str(node)!r}"
        raise ConfigError(
            f"{key}: {str(folder)!r} {what} (no write permission or a read-only disk); "
            "choose a writable folder"
        )


# -- this machine ------------------------------------------------------------------------------
def _check_machine(job: JobConfig) -> None:
    device = job.load.device
    if device.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            have = f"has {count} CUDA device(s)" if count else "has no CUDA device"
            raise MachineError(
                f"load.device: {device!r} but this machine {have} "
                "(torch.cuda.is_available() is False or the index is too high); use "
                "device: cpu, or run where the GPU is"
            )
    if device == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise MachineError("load.device: 'mps' is not available here; use device: cpu")
    if not _ray_running():
        _check_local_resources(job)


def _ray_running() -> bool:
    ray = sys.modules.get("ray")  # an already started Ray has its own resources
    return bool(ray is not None and ray.is_initialized())


def _check_local_resources(job: JobConfig) -> None:
    """A local Ray waits forever for an actor that asks for more than the machine has."""
    res = job.resources
    if res.num_gpus > 0:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if res.num_gpus * res.workers > gpus:
            raise MachineError(
                f"resources.num_gpus: {res.workers} worker(s) x {res.num_gpus:g} GPU need "
                f"{res.num_gpus * res.workers:g} GPU(s) but this machine has {gpus}; lower "
                "num_gpus or workers, or pass --address of a cluster"
            )
    cpus = os.cpu_count() or 1
    if res.num_cpus * res.workers > cpus:
        raise MachineError(
            f"resources.num_cpus: {res.workers} worker(s) x {res.num_cpus:g} CPU need "
            f"{res.num_cpus * res.workers:g} CPUs but this machine has {cpus}; lower num_cpus "
            "or workers, or pass --address of a cluster"
        )


# -- evaluation data ---------------------------------------------------------------------------
def _check_data(job: JobConfig, pending: Path | None) -> None:
    from evomerge.search.worker import has_held_out

    for i, ev in enumerate(job.evaluators):
        include = getattr(ev, "include_path", None)
        if include is not None and not _inside(include, pending) and not Path(include).exists():
            raise ConfigError(
                f"evaluators.{i}.include_path: {include!r} does not exist; fix the path"
            )
        if getattr(ev, "chat_template", False):
            _check_chat_template(f"evaluators.{i}.chat_template", job)
        if not isinstance(ev, DataEvalConfig) or _inside(ev.data, pending):
            continue
        _check_split(f"evaluators.{i}.data", ev, ev.split)
        if ev.held_out_split and job.search.held_out_top_k > 0 and has_held_out(ev):
            _check_split(f"evaluators.{i}.held_out_split", ev, ev.held_out_split)


def _check_chat_template(key: str, job: JobConfig) -> None:
    """``chat_template: true`` needs a template in the tokenizer the workers load (the base's,
    else the first expert's); checked from the saved files of a local folder (a hub id is left
    to the first trial)."""
    from evomerge.evaluators.rows import has_chat_template

    source = next(iter(job.models.sources().values()))
    if Path(source).is_dir() and not has_chat_template(source):
        raise ConfigError(
            f"{key}: true but the tokenizer in {source!r} has no chat template; set "
            "chat_template: false (prompts used as they are) or use a model whose tokenizer "
            "has one"
        )


def _check_split(key: str, ev: DataEvalConfig, split: str) -> None:
    from evomerge.evaluators.base import read_jsonl, resolve_data

    try:
        path = resolve_data(ev.data, split)
        rows = read_jsonl(path, required=_required(ev))
    except FileNotFoundError as err:
        fix = "or set held_out_split: null" if key.endswith("held_out_split") else "or fix data"
        raise ConfigError(f"{key}: {err}; add the file {fix}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}: {err}; fix that line of the file") from None
    if ev.name == "accuracy":
        from evomerge.evaluators.rows import row_kind

        try:
            row_kind(rows, path)
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None
    elif ev.name == "perplexity" and getattr(ev, "field", None) == "text":
        for lineno, row in enumerate(rows, start=1):
            if "text" not in row and not {"prompt", "answer"} <= set(row):
                raise ConfigError(
                    f"{key}: {path}: row {lineno} has no 'text' (keys: {sorted(row)}); set "
                    "the evaluator's 'field' to the key holding the text"
                )


def _required(ev: DataEvalConfig) -> tuple[str, ...]:
    field = getattr(ev, "field", None)
    if field is None:  # accuracy
        return ("prompt",)
    if ev.name == "perplexity" and field == "text":
        return ()  # the toy data's prompt + answer also make a text (evaluators.text)
    return (field,)


def check_subset_job(job: Any) -> None:
    """ConfigError, when ``search.fidelity.subset`` is on (``search`` or ``search.then``),
    naming the evaluator that cannot score a weighted subset; or saying that no evaluator
    scores examples (all ``cost``); or that ``confirm`` is set on several objectives (the
    confirmation re-scores the top trials of one objective)."""
    from evomerge.search.anchors import SUBSET_EVALUATORS

    then = job.search.then
    for key, fid, objectives in (
        ("search", job.search.fidelity, job.objectives),
        ("search.then", getattr(then, "fidelity", None),
         getattr(then, "objectives", None) or job.objectives),
    ):
        if fid is None or fid.subset is None:
            continue
        if all(ev.name == "cost" for ev in job.evaluators):
            raise ConfigError(
                f"{key}.fidelity.subset: every evaluator is cost, which scores no examples, "
                f"so there is no example to draw a subset from; add an accuracy, entropy or "
                f"lm_eval evaluator, or remove {key}.fidelity.subset"
            )
        if fid.subset.confirm and len(objectives) > 1:
            raise ConfigError(
                f"{key}.fidelity.subset.confirm: is {fid.subset.confirm} with "
                f"{len(objectives)} objectives, but it re-scores the top trials of one "
                f"objective; set confirm: 0, or combine the metrics in one objective with "
                f"'weights'"
            )
        for i, ev in enumerate(job.evaluators):
            if ev.name not in SUBSET_EVALUATORS:
                raise ConfigError(
                    f"evaluators.{i}: {ev.name} cannot be scored on a weighted subset of "
                    f"examples ({key}.fidelity.subset is on; {ev.name} is not a mean over "
                    f"examples); use {', '.join(SUBSET_EVALUATORS[:3])}, or remove "
                    f"{key}.fidelity.subset"
                )
