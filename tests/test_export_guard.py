"""`evomerge export --force` replaces only a previous export (issue 10): never a run's files, a
source model, evaluator data, an unrelated file or folder, the current folder or its ancestors,
and a relative output may not climb above the current folder. Every refusal goes through the real
CLI: exit code 2, one stderr line naming the path and the reason, the target byte-for-byte intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from evomerge import cli
from evomerge.recipe import Recipe
from evomerge.runs.export import export_recipe
from evomerge.runs.guard import MARKER
from tests.test_export import _recipe, make_run


@pytest.fixture
def site(tiny_models, tmp_path, monkeypatch) -> dict[str, Path]:
    """A finished run over private copies of the source models (so a broken guard cannot harm
    the session's models), with evaluator data and an lm_eval include_path, run from ``work/``."""
    models = {n: tmp_path / "models" / n for n in ("base", "a", "b")}
    for name, path in models.items():
        shutil.copytree(tiny_models[name], path)
    recipe = _recipe(models, "ties", {"a": {"weight": 0.6, "density": 0.5}, "b": {"weight": 0.5}})
    run_dir = make_run(tmp_path / "runs" / "single", models, [("acc", "maximize")],
                       [(TrialState.COMPLETE, [0.7], recipe, {"acc": 0.7})])
    (run_dir / "study.journal.writer").write_text("pid 1 on host since 2026-12-01 10:00:00\n")
    data, tasks = tmp_path / "data" / "d.jsonl", tmp_path / "tasks"
    data.parent.mkdir()
    data.write_text('{"prompt": "hello"}\n')
    tasks.mkdir()
    (tasks / "toy.yaml").write_text("task: toy\n")
    job = yaml.safe_load((run_dir / "job.yaml").read_text())
    job["evaluators"] = [{"name": "entropy", "data": str(data)},
                         {"name": "lm_eval", "tasks": ["toy"], "include_path": str(tasks)}]
    (run_dir / "job.yaml").write_text(yaml.safe_dump(job))
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    return {"root": tmp_path, "run": run_dir, "models": tmp_path / "models", "data": data,
            "tasks": tasks, "work": work, "recipe": recipe}


def digest(path: Path) -> str:
    """A hash of a file, or of a folder's every relative path and file content."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*")) if path.is_dir() else [path]
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def export(site, out, *args: str) -> int:
    return cli.main(["export", str(site["run"]), str(out), *args])


def assert_refused(site, capsys, out, reason: str, *args: str, kept: Path | None = None) -> str:
    """The CLI refuses ``out`` with one stderr line naming it (absolute) and ``reason``; ``kept``
    (default ``out``) is byte-for-byte unchanged. Returns the stderr line."""
    kept = kept or Path(out)
    before = digest(kept) if kept.exists() else None
    capsys.readouterr()
    assert export(site, out, "--format", "recipe", "--force", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("evomerge export: error: ") and err.count("\n") == 1, err
    assert reason in err, err
    assert repr(os.path.abspath(out)) in err, err  # the path, absolute
    assert (digest(kept) if kept.exists() else None) == before
    return err


@pytest.mark.parametrize("target, reason", [
    ("runs/single/study.journal", "it is the study storage"),
    ("runs/single/study.journal.writer", "it is the study storage's writer lock"),
    ("runs/single/job.yaml", "it is the run's job config"),
    ("runs/single", "it is the run folder"),
    ("runs", "it holds the run folder"),
    ("models/a/model.safetensors", "it is inside source model 'a'"),
    ("models/a/config.json", "it is inside source model 'a'"),
    ("models/a", "it is source model 'a'"),
    ("models", "it holds source model 'base'"),
    ("data/d.jsonl", "it is evaluator data (evaluators.0.data)"),
    ("data", "it holds evaluator data (evaluators.0.data)"),
    ("tasks", "it is evaluator data (evaluators.1.include_path)"),
    ("tasks/toy.yaml", "it is inside evaluator data (evaluators.1.include_path)"),
])
def test_force_never_replaces_run_models_or_data(site, capsys, target, reason):
    assert_refused(site, capsys, site["root"] / target, reason)
    assert cli.main(["results", str(site["run"])]) == 0  # the run still opens


def test_force_never_replaces_an_unrelated_folder_or_file(site, capsys):
    folder = site["root"] / "some" / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "weights.bin").write_bytes(b"\0" * 100)
    (folder / "notes.txt").write_text("mine")
    err = assert_refused(site, capsys, folder, f"a folder without the {MARKER} marker")
    assert "--force only replaces a previous evomerge export" in err
    notes = site["root"] / "notes.yaml"
    notes.write_text("# my own notes\nmerge_method: ties\n")
    assert_refused(site, capsys, notes, "it is not an evomerge export")


def test_force_refuses_a_previous_export_folder_holding_other_files(site, capsys):
    front = site["root"] / "front"
    assert export(site, front, "--format", "recipe", "--pareto") == 0
    (front / "my-notes.txt").write_text("keep")
    assert_refused(site, capsys, front, "it holds 'my-notes.txt', which that export did not write",
                   "--pareto")
    (front / "my-notes.txt").unlink()
    (front / MARKER).unlink()  # a marker-less look-alike is not an export either
    assert_refused(site, capsys, front, f"without the {MARKER} marker", "--pareto")


def test_force_never_replaces_the_current_folder_or_its_ancestors(site, capsys):
    work = site["work"]
    (work / "file.txt").write_text("in the current folder")
    assert_refused(site, capsys, Path("."), "it is the current folder", kept=work)
    assert_refused(site, capsys, work.parent, "it holds the current folder", kept=work.parent)


@pytest.mark.parametrize("target", ["../../x.yaml", "a/../../y.yaml", "../sibling/z.yaml"])
def test_relative_out_may_not_climb_above_the_current_folder(site, capsys, target):
    where = (site["work"] / target).resolve()
    assert export(site, target, "--format", "recipe") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"refusing to write {target!r}" in err, err
    assert "climbs above the current folder" in err and "absolute path" in err
    assert not where.exists() and not list(site["root"].rglob(".*partial-*"))
    assert export(site, where, "--format", "recipe") == 0  # the same place, given absolute
    assert where.read_text().startswith("# Exported by evomerge")


def test_symlinks_are_not_followed_into_the_run(site, capsys):
    link = site["root"] / "latest"
    link.symlink_to(site["run"])
    assert_refused(site, capsys, link / "job.yaml", "it is the run's job config",
                   kept=site["run"] / "job.yaml")
    journal_link = site["root"] / "j.yaml"
    journal_link.symlink_to(site["run"] / "study.journal")
    assert_refused(site, capsys, journal_link, "it is a symbolic link",
                   kept=site["run"] / "study.journal")


def test_force_replaces_a_previous_file_export_only(site, capsys):
    out = site["root"] / "best.yaml"
    assert export(site, out, "--format", "mergekit") == 0
    assert export(site, out, "--format", "recipe", "--force") == 0  # mergekit -> recipe
    assert Recipe.from_yaml(out.read_text()) == site["recipe"]
    assert export(site, out, "--format", "mergekit", "--force") == 0  # recipe -> mergekit
    assert yaml.safe_load(out.read_text())["merge_method"] == "ties"
    out.write_text(out.read_text().split("\n", 1)[1])  # the user dropped the header: now theirs
    assert_refused(site, capsys, out, "it is not an evomerge export")


def test_force_replaces_previous_hf_and_pareto_folder_exports(site, capsys):
    hf, front = site["root"] / "merged", site["root"] / "front"
    for args in (["--format", "hf"], ["--format", "recipe", "--pareto"],
                 ["--format", "hf", "--pareto"]):
        out = front if "--pareto" in args else hf
        assert export(site, out, *args, "--force") == 0, capsys.readouterr().err
        assert export(site, out, *args, "--force") == 0, capsys.readouterr().err
    marker = json.loads((hf / MARKER).read_text())
    assert marker["format"] == "hf" and marker["study"] == "single" and marker["trial"] == 0
    assert {"model.safetensors", "config.json", "README.md"} <= set(marker["files"])
    front_marker = json.loads((front / MARKER).read_text())
    assert front_marker["trial"] == [0] and f"trial-0/{MARKER}" in front_marker["files"]
    assert sorted(p.name for p in front.iterdir()) == [MARKER, "index.csv", "trial-0"]
    # a file export does not replace a folder export (and the reverse): a different kind
    assert_refused(site, capsys, hf, "it is a folder and this export writes one file")


def test_first_export_into_new_nested_folders(site):
    assert export(site, "new/deeper/best.yaml", "--format", "recipe") == 0
    assert export(site, "a/../inside.yaml", "--format", "mergekit") == 0  # stays in cwd
    assert (site["work"] / "inside.yaml").read_text().startswith("# Exported by evomerge")
    out = export_recipe(site["recipe"], "nested/new/hf", "hf")
    marker = json.loads((out / MARKER).read_text())
    assert marker["study"] is None and marker["format"] == "hf"
    assert set(marker["files"]) == {p.name for p in out.iterdir()} - {MARKER}
    export_recipe(site["recipe"], "nested/new/hf", "hf", force=True)  # its own kind: replaced
    with pytest.raises(ValueError, match="it is inside source model 'a'"):
        export_recipe(site["recipe"], site["models"] / "a" / "config.json", "recipe", force=True)


def test_merge_command_has_the_same_guard(site, capsys):
    """`evomerge merge RECIPE OUT` once wrote into any existing folder (e.g. one with the user's
    files); it is an hf export now: refused without --force, and --force replaces only an
    earlier merge output."""
    recipe_file = site["work"] / "r.yaml"
    recipe_file.write_text(site["recipe"].to_yaml())
    mine = site["root"] / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    before = digest(mine)
    for force in ([], ["--force"]):
        capsys.readouterr()
        assert cli.main(["merge", str(recipe_file), str(mine), *force]) == 2
        err = capsys.readouterr().err
        assert err.startswith("evomerge merge: error: ") and err.count("\n") == 1, err
        assert digest(mine) == before
    out = site["root"] / "merged"
    assert cli.main(["merge", str(recipe_file), str(out)]) == 0
    assert (out / MARKER).is_file() and (out / "model.safetensors").is_file()
    assert cli.main(["merge", str(recipe_file), str(out)]) == 2
    assert cli.main(["merge", str(recipe_file), str(out), "--force"]) == 0
    assert (out / "model.safetensors").is_file()
