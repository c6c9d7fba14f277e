"""`import evomerge` and `evomerge --help` import nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["torch", "ray", "transformers", "lm_eval", "optuna", "pandas"]


def loaded_after(code: str) -> list[str]:
    probe = code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_imports_nothing_heavy():
    code = (
        "import contextlib, io\nfrom evomerge.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
        "import evomerge.config, evomerge.recipe, evomerge.registries"
    )
    mods = loaded_after(code)
    assert not [m for m in HEAVY if m in mods]


def test_cli_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "evomerge", "--help"], capture_output=True, text=True, check=True
    )
    for cmd in ("toy", "merge", "search", "results", "best", "adamerge"):
        assert cmd in out.stdout
