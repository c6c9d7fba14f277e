"""`evomerge export --format mergekit` writes a YAML file from the stored recipe, the models'
``config.json`` and their safetensors headers: it imports neither torch nor transformers (nor
Ray) and takes about a second, not the seconds those imports cost.

The real command runs in a fresh interpreter, so that nothing the test process imported counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from optuna.trial import TrialState

from evomerge.runs.export_mergekit import mergekit_config
from tests.test_export import NUM_LAYERS, _recipe, make_run

HEAVY = ("torch", "transformers", "ray", "safetensors.torch")
# main()'s wall time: 1.1 s on the 2-core VM at load 3 (importing torch alone: 2.7 s there),
# 7.3 s at load 32; the bound grows with the run queue so a shared machine does not fail it
MAX_S = 5.0 * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))

# the CLI's own entry, then what it imported and how long main() took, as JSON on stdout's end
WRAPPER = (
    "import json, sys, time; start = time.monotonic(); from evomerge.cli import main; "
    "rc = main(sys.argv[1:]); print(json.dumps({'rc': rc, 'seconds': time.monotonic() - start, "
    f"'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))"
)


@pytest.fixture(scope="module")
def run(tiny_models, tmp_path_factory):
    """Trial 0: TIES over folders; trial 1: DARE-TIES with ``non_layer: base`` (the tensor
    names are read from the safetensors headers, and a note on DARE's masks is written)."""
    ties = _recipe(tiny_models, "ties", {"a": {"weight": (0.2, 0.6), "density": 0.5},
                                         "b": {"weight": 0.5}})
    dare = _recipe(tiny_models, "dare_ties", {"a": {"weight": 0.4, "density": 0.5},
                                              "b": {"weight": 0.3}}, non_layer="base")
    done = TrialState.COMPLETE
    run_dir = make_run(tmp_path_factory.mktemp("runs") / "fast", tiny_models,
                       [("acc", "maximize")],
                       [(done, [0.5], ties, {"acc": 0.5}), (done, [0.6], dare, {"acc": 0.6})])
    return run_dir, {0: ties, 1: dare}


@pytest.mark.parametrize("trial", [0, 1])
def test_mergekit_export_imports_no_torch_and_is_fast(run, trial, tmp_path):
    run_dir, recipes = run
    out = tmp_path / "merge.yaml"
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, "export", str(run_dir), str(out),
         "--format", "mergekit", "--trial", str(trial)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["rc"] == 0 and report["heavy"] == [], report
    assert report["seconds"] < MAX_S, report
    assert proc.stdout.splitlines()[0] == str(out)
    # the same config as with the tensor names read by safetensors itself
    expected = mergekit_config(recipes[trial], num_layers=NUM_LAYERS,
                               tensor_names=_names(recipes[trial]))
    assert yaml.safe_load(out.read_text()) == expected
    assert ("NOTE: DARE" in out.read_text()) == (trial == 1)


def _names(recipe) -> list[str]:
    """The base model's tensor names, read here with safetensors (the export reads the header
    itself)."""
    from safetensors import safe_open

    folder = recipe.sources["base"]
    with safe_open(f"{folder}/model.safetensors", framework="np") as f:
        return list(f.keys())

