"""The shipped quickstart config, pointed at the tiny toy suite, runs through the CLI:
search (suite cache hit), results (CSV) and best."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.toy_fixtures import toy_suite_tiny  # noqa: F401

pytestmark = pytest.mark.slow  # real searches on a Ray cluster: the full lane

ROOT = Path(__file__).parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evomerge", *args], capture_output=True,
                          text=True, timeout=600)


def test_quickstart_config_runs_on_the_tiny_suite(toy_suite_tiny, tmp_path):  # noqa: F811
    text = (ROOT / "configs" / "quickstart.yaml").read_text()
    job = yaml.safe_load(text.replace("toy_suite/", f"{toy_suite_tiny}/"))
    job["toy_suite"] = {"dir": str(toy_suite_tiny), "size": "tiny"}
    job["run_dir"] = str(tmp_path / "run")
    job["search"]["trials"] = 6
    job["search"]["space"]["layer_groups"] = 2  # the tiny suite has 2 layers
    job["search"]["sampler"]["popsize"] = 2
    for ev in job["evaluators"]:
        ev["limit"] = 8
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))

    searched = run("search", str(path), "--no-progress")
    assert searched.returncode == 0, searched.stderr[-3000:]
    assert "done: 6 trials" in searched.stdout

    table = run("results", str(tmp_path / "run"), "--csv", str(tmp_path / "t.csv"))
    assert table.returncode == 0, table.stderr[-2000:]
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert len(lines) == 8 and "accuracy/rot13" in lines[0]  # 6 trials + uniform TA reference
    assert lines[-1].startswith("reference:uniform_task_arithmetic,REFERENCE")
    assert "held_out:accuracy/rot13" in lines[0]

    best = run("best", str(tmp_path / "run"))
    assert best.returncode == 0, best.stderr[-2000:]
    recipe = yaml.safe_load(best.stdout.split("\n", 1)[1])
    assert recipe["method"] == "ties" and set(recipe["models"]) == {
        "shift", "rot13", "mirror"
    }
