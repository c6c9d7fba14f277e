"""What the service lets in: the bearer token, the request size cap, the paths a job may name.

A submitted job runs code on the server's machine with the server's rights, so:

- every write needs ``Authorization: Bearer TOKEN`` (reads too with ``--token-for-reads``);
- a job may name model folders, data, run folders and the toy suite only inside the allowed
  roots (``--allow-root``; default: the runs folder and the current folder), never an absolute
  path or a ``..`` outside them; a hub id (``org/name``, not a local path) is allowed;
- ``load.allow_pickle`` and ``load.trust_remote_code`` run code from the checkpoint: refused
  unless the server was started with ``--allow-unsafe-loading``;
- ``storage`` and ``resources.address`` are the server's to choose;
- export names are plain names (:data:`evomerge.config.PLAIN_NAME`): they cannot leave the runs
  folder.

Each refusal is a :class:`Refused` naming the dotted key, what is wrong and the fix.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from evomerge.config import PLAIN_NAME, JobConfig

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_BODY = 1 << 20  # bytes; a job YAML is a few kB


class Refused(ValueError):
    """A request the security model refuses: ``key`` is the dotted config key (or field)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Policy:
    """What this server allows; built once by ``evomerge serve``."""

    token: str
    runs: Path
    roots: tuple[Path, ...] = ()
    token_for_reads: bool = False
    allow_unsafe_loading: bool = False
    max_body: int = MAX_BODY
    storage: str | None = None

    def all_roots(self) -> tuple[Path, ...]:
        return tuple(r.resolve() for r in (self.runs, *self.roots))


def token_ok(policy: Policy, header: str | None) -> bool:
    """Whether an ``Authorization`` header carries the server's token (constant time)."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header.removeprefix("Bearer ").strip(), policy.token)


def check_export_name(name: str) -> str:
    """An export name: a plain name, so ``runs/JOB/exports/NAME`` stays inside the runs dir."""
    if not PLAIN_NAME.fullmatch(name) or name in (".", ".."):
        raise Refused(
            "name", f"{name!r} is not a plain name; use letters, digits and _.- (no '/', no "
            "leading '.'), e.g. best-merge"
        )
    return name


def check_job(job: JobConfig, policy: Policy) -> None:
    """Refuse a job that reaches outside the server's roots or enables unsafe loading."""
    for key, flag in (("load.allow_pickle", job.load.allow_pickle),
                      ("load.trust_remote_code", job.load.trust_remote_code)):
        if flag and not policy.allow_unsafe_loading:
            raise Refused(key, "is true, which lets the checkpoint run code on this server; "
                          "remove it, or start the server with --allow-unsafe-loading")
    if job.storage is not None and job.storage != policy.storage:
        raise Refused("storage", "is set; this server keeps every job in its own storage "
                      "(--storage of `evomerge serve`): remove the key")
    if job.resources.address is not None:
        raise Refused("resources.address", "is set; this server chooses where jobs run "
                      "(--ray-address of `evomerge serve`): remove the key")
    if job.search.then is not None:
        raise Refused("search.then", "is set; a PS-then-DFS job runs two studies, which this "
                      "version of the service does not show yet: run it with `evomerge search "
                      "JOB.yaml`, or submit the PS search and the DFS search as two jobs")
    roots = policy.all_roots()
    for key, value, hub in _paths(job):
        _check_path(key, value, roots, hub_ok=hub)
    if job.run_dir is not None:
        _check_path("run_dir", job.run_dir, (policy.runs.resolve(),), hub_ok=False)


def _paths(job: JobConfig) -> Iterator[tuple[str, str, bool]]:
    """(dotted key, path, may be a hub id) of every path the job names."""
    if job.models.base is not None:
        yield "models.base.path", job.models.base.path, True
    for name, model in job.models.experts.items():
        yield f"models.experts.{name}.path", model.path, True
    for i, ev in enumerate(job.evaluators):
        for attr in ("data", "include_path"):
            value = getattr(ev, attr, None)
            if value is not None:
                yield f"evaluators.{i}.{attr}", value, False
    if job.toy_suite is not None:
        yield "toy_suite.dir", job.toy_suite.dir, False
    for name, recipe in getattr(job.search.space, "recipes", {}).items():  # a dfs space's
        key = f"search.space.recipes.{name}"
        if isinstance(recipe, str):  # a recipe YAML on this filesystem
            yield key, recipe, False
        else:
            for source, where in dict(recipe.get("sources", {})).items():
                if isinstance(where, str):
                    yield f"{key}.sources.{source}", where, True


def _check_path(key: str, value: str, roots: Sequence[Path], *, hub_ok: bool) -> None:
    path = Path(value).expanduser()
    local = path.is_absolute() or path.exists() or value.startswith(".") or ".." in path.parts
    if hub_ok and not local and HUB_ID.fullmatch(value):
        return  # a hub id: resolved from the hub cache, not from this filesystem
    real = path.resolve()
    if not any(real == r or real.is_relative_to(r) for r in roots):
        shown = ", ".join(str(r) for r in roots)
        raise Refused(key, f"{value!r} is outside the folders this server allows ({shown}); "
                      "move it under one of them, or start the server with --allow-root DIR")
