"""What an export may write and replace, and how it writes: atomically, beside its target.

``--force`` replaces only a previous evomerge export: a folder holding :data:`MARKER` and nothing
it does not list, a file whose first line is :data:`HEADER`, or an empty folder. Runs, source
models, evaluator data, the current folder and its parents, symlinks, and relative paths that
climb above the current folder are refused with one line naming the path and the reason.

>>> with atomic(Path("best.yaml"), force=False) as tmp:  # doctest: +SKIP
...     tmp.write_text("# Exported by evomerge ...")
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from evomerge import __version__
from evomerge.config import JobConfig
from evomerge.recipe import AnyRecipe

MARKER = ".evomerge-export"  # in every exported folder: JSON naming the export and its files
HEADER = "Exported by evomerge "  # first line of every exported YAML file, after "# "


@contextlib.contextmanager
def atomic(out: Path, *, force: bool, protect: Sequence[tuple[Path, str]] = (),
            folder: bool | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path of ``out`` to write; on success rename it to ``out``.

    An existing ``out`` is replaced only with ``force`` and only if it is a previous export
    (a folder export when ``folder``, a file export when not); see :func:`_check_replaceable`.
    On failure the temporary path, and any parent folders this call created, are removed.
    """
    _check_inside_cwd(out)
    out = Path(os.path.abspath(out.expanduser()))
    if out.exists() or out.is_symlink():
        _check_replaceable(out, protect, folder=folder)
        if not force:
            raise FileExistsError(f"{str(out)!r} already exists; pass --force (force=True) to "
                                  "replace it")
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    done = False
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.touch()
            tmp.unlink()
        except OSError as err:
            raise ValueError(f"cannot write {str(out)!r}: {err}; choose a writable "
                             "location") from None
        yield tmp
        _umask_modes(tmp)
        _replace(tmp, out)
        done = True
    finally:
        _remove(tmp)
        if not done:
            for folder_ in created:  # innermost first
                with contextlib.suppress(OSError):
                    folder_.rmdir()


def _umask_modes(tmp: Path) -> None:
    """Give every file and folder written under ``tmp`` the mode the umask allows (644 / 755
    under umask 022): transformers writes ``model.safetensors`` through a 600 temporary file,
    which other users of a shared machine could not read."""
    umask = _umask()
    paths = [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]
    for path in paths:
        if path.exists() and not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _umask() -> int:
    """The process umask: from /proc on Linux (setting it to read it races other threads)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _replace(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first, then deleted."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    if tmp.is_file() and out.is_file() and not out.is_symlink():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
    os.replace(tmp, out)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


# -- what an export may replace ------------------------------------------------------------------
# --force replaces only a previous export: a folder holding MARKER and nothing it does not list,
# or a file whose first line is HEADER. Everything else a user could lose is refused.
def mark(folder: Path, fmt: str, *, study_name: str | None,
          trial: int | list[int] | None) -> None:
    """Write MARKER into an exported ``folder``: what wrote it, and every file it holds."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())
    info = {"evomerge": __version__, "format": fmt, "study": study_name, "trial": trial,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "files": files}
    (folder / MARKER).write_text(json.dumps(info, indent=1) + "\n")


def source_paths(recipe: AnyRecipe) -> list[tuple[Path, str]]:
    return [(Path(s), f"source model {n!r}") for n, s in recipe.model_sources().items()]


def run_paths(run: Path, job: JobConfig, storage_url: str | None) -> list[tuple[Path, str]]:
    """The run's files, source models and evaluator data: never replaced, most specific first."""
    from evomerge.search.journal import LOCK_SUFFIX
    from evomerge.search.storage import storage_url as resolve_url

    run_dir = job.resolved_run_dir
    out = [(run / "job.yaml" if run.is_dir() else run, "the run's job config")]
    url = resolve_url(storage_url or job.storage, run_dir)
    if url.startswith(("journal:", "sqlite:///")):
        db = Path(url.removeprefix("journal:").removeprefix("sqlite:///"))
        out += [(db, "the study storage"),
                (db.with_name(db.name + LOCK_SUFFIX), "the study storage's writer lock"),
                (db.with_name(db.name + ".lock"), "the study storage's lock")]
    out += [(d, "the run folder") for d in (run, run_dir) if d.is_dir()]
    models = {"base": job.models.base, **job.models.experts}
    out += [(Path(m.path), f"source model {n!r}") for n, m in models.items() if m is not None]
    for i, ev in enumerate(job.evaluators):
        for key in ("data", "include_path"):
            if getattr(ev, key, None):
                out.append((Path(getattr(ev, key)), f"evaluator data (evaluators.{i}.{key})"))
    if job.toy_suite is not None:
        out.append((Path(job.toy_suite.dir), "the toy suite"))
    return out


def _check_inside_cwd(out: Path) -> None:
    """Refuse a relative ``out`` whose ``..`` parts climb above the current folder."""
    if out.expanduser().is_absolute() or ".." not in out.parts:
        return
    cwd = Path(os.path.realpath(Path.cwd()))
    for where in (Path(os.path.normpath(cwd / out)), Path(os.path.realpath(cwd / out))):
        if where != cwd and cwd not in where.parents:
            raise ValueError(f"refusing to write {str(out)!r}: it climbs above the current folder "
                             f"{str(cwd)!r} (to {str(where)!r}); give it as an absolute path if "
                             "you mean it")


def _check_replaceable(out: Path, protect: Sequence[tuple[Path, str]], *,
                       folder: bool | None) -> None:
    """ValueError unless the existing ``out`` (absolute) is a previous export that holds, is or
    sits in nothing protected."""
    why = _why_not_replaceable(out, protect, folder=folder)
    if why:
        raise ValueError(f"refusing to replace {str(out)!r}: {why}; --force only replaces a "
                         "previous evomerge export, so choose another output path")


def _why_not_replaceable(out: Path, protect: Sequence[tuple[Path, str]], *,
                         folder: bool | None) -> str | None:
    if out.is_symlink():
        return "it is a symbolic link"
    real = Path(os.path.realpath(out))
    cwd = Path(os.path.realpath(Path.cwd()))
    if real == cwd or real in cwd.parents:
        return f"it {'is' if real == cwd else 'holds'} the current folder"
    clash = _clash(real, protect)
    if clash:
        return clash
    if out.is_dir():
        why = _not_a_folder_export(out)
        return why or ("it is a folder and this export writes one file" if folder is False
                       else None)
    if not out.is_file():
        return "it is not a regular file or folder"
    try:
        with out.open("rb") as f:
            first = f.read(256)
    except OSError as err:
        return f"it cannot be read to check that it is an export ({err})"
    if not first.startswith(f"# {HEADER}".encode()):
        return f"it is not an evomerge export (its first line is not '# {HEADER}...')"
    return "it is a file and this export writes a folder" if folder else None


def _clash(real: Path, protect: Sequence[tuple[Path, str]]) -> str | None:
    """How ``real`` is, sits in or holds a protected path: "is" before "is inside" (the innermost
    container) before "holds" (the outermost content, e.g. the run folder, not its journal)."""
    hits = []
    for i, (path, what) in enumerate(protect):
        if not (path.expanduser().exists() or path.expanduser().is_symlink()):
            continue
        p = Path(os.path.realpath(path.expanduser()))
        depth = len(p.parts)
        key = ((0, i) if p == real else (1, -depth) if p in real.parents else
               (2, depth) if real in p.parents else None)
        if key is not None:
            hits.append((key, i, f"it {('is', 'is inside', 'holds')[key[0]]} {what} {str(p)!r}"))
    return min(hits)[2] if hits else None


def _not_a_folder_export(folder: Path) -> str | None:
    """Why ``folder`` is not a previous folder export (None: it is one, or it is empty)."""
    if not any(folder.iterdir()):
        return None
    try:
        listed = json.loads((folder / MARKER).read_text())["files"]
        if not (isinstance(listed, list) and all(isinstance(f, str) for f in listed)):
            raise TypeError("'files' is not a list of paths")
    except FileNotFoundError:
        return f"it is a folder without the {MARKER} marker that evomerge exports carry"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MARKER} marker is unreadable ({type(err).__name__}: {err})"
    files = set(listed)
    allowed = files | {MARKER} | {p.as_posix() for f in files for p in Path(f).parents}
    for root, dirs, names in os.walk(folder):
        for name in [*dirs, *names]:
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if rel not in allowed:
                return f"it holds {rel!r}, which that export did not write"
    return None
