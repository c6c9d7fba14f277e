"""Exported files are readable by the other users of a shared machine as the umask allows:
transformers writes ``model.safetensors`` through a 0600 temporary file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from evomerge.recipe import Recipe
from evomerge.runs.export import export_recipe


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def linear(paths: dict[str, Path]) -> Recipe:
    return Recipe(method="linear", sources={n: str(paths[n]) for n in ("a", "b")},
                  models={"a": {"weight": 0.5}, "b": {"weight": 0.5}})


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
            for p in [folder, *folder.rglob("*")]}


def test_every_file_of_an_hf_export_is_0644_under_umask_022(tiny_models, tmp_path, umask_022):
    recipe = linear(tiny_models)
    out = tmp_path / "merged"
    export_recipe(recipe, out, "hf")
    found = modes(out)
    assert "model.safetensors" in found and "config.json" in found
    assert found.pop(".") == 0o755
    assert found == dict.fromkeys(found, 0o644), found


def test_the_modes_follow_a_stricter_umask(tiny_models, tmp_path, umask_022):
    recipe = linear(tiny_models)
    os.umask(0o027)
    out = tmp_path / "merged"
    export_recipe(recipe, out, "hf")
    found = modes(out)
    assert found.pop(".") == 0o750
    assert set(found.values()) == {0o640}, found
