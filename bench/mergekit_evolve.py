"""Run the peer, mergekit-evolve (mergekit 0.1.5), on the toy suite from a separate venv.

mergekit-evolve does not run on a CPU-only machine as installed; the shim in
``shared/peers/mergekit-evolve-cpu/`` (see its README) patches it. It runs from its own virtual
environment (default ``/work/peer-venv``, flag ``--peer-venv`` of the benchmarks), created here
on first use with a CPU torch, ``mergekit[evolve]==0.1.5``, lm-eval and ray; nothing of it is
committed. ``bench/peer/evolve_logged.py`` logs every candidate (score, timing, merge YAML).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = Path("/work/peer-venv")
PEER_PACKAGES = ("mergekit[evolve]==0.1.5", "lm-eval==0.4.13", "ray==2.60.0")


def find_shim() -> Path:
    """The shim folder: ``shared/`` beside the repository, else ``/work/shared``."""
    for root in (REPO.parent / "shared", REPO / "shared", Path("/work/shared")):
        shim = root / "peers" / "mergekit-evolve-cpu"
        if (shim / "sitecustomize.py").is_file():
            return shim
    raise FileNotFoundError("shared/peers/mergekit-evolve-cpu not found beside the repository")


def ensure_peer_venv(venv: Path = DEFAULT_VENV) -> Path:
    """Create (or reuse) the peer venv and return its python; CPU torch is installed first."""
    py = venv / "bin" / "python"
    probe = "import mergekit.evo.strategy, lm_eval, ray, cma"
    if py.is_file() and _ok([str(py), "-c", probe], shim=True):
        return py
    print(f"creating the peer venv {venv} (a few minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    torch_version = _version("torch").split("+")[0]
    # install torch first, the same version as here (a local ``+cpu`` wheel where pip's
    # find-links has one), so mergekit's dependency does not pull another (CUDA) build
    subprocess.run([*pip, f"torch=={torch_version}"], check=True)
    tf = _version("transformers")
    subprocess.run([*pip, *PEER_PACKAGES, f"transformers=={tf}"], check=True)
    if not _ok([str(py), "-c", probe], shim=True):
        raise RuntimeError(f"peer venv {venv} cannot import mergekit-evolve; see pip output")
    return py


def _version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


def _ok(cmd: list[str], *, shim: bool) -> bool:
    env = peer_env() if shim else None
    return subprocess.run(cmd, env=env, capture_output=True).returncode == 0


def peer_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"MK_SHIM_VLLM_STUB": "1", "MK_SHIM_EMPTY_CACHE": "1", "MK_SHIM_HFLM_CPU": "1",
                "MK_SHIM_RETURN_TENSOR": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "WANDB_MODE": "disabled", "PYTHONPATH": str(find_shim())})
    env.update(extra)
    return env


def peer_tasks(suite_tasks: Path, out: Path) -> Path:
    """Copies of the toy lm-eval tasks that score the validation split (as evomerge's fitness).

    The toy YAMLs name ``test_split: test`` (what the stock CLI scores); without it lm-eval
    evaluates ``validation_split``. Same task names, same examples, same metric.
    """
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted(suite_tasks.glob("toy_*.yaml")):
        cfg = yaml.safe_load(src.read_text())
        cfg.pop("test_split", None)
        (out / src.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def evolve_config(suite: Path, tasks: list[str], *, limit: int, method: str = "ties",
                  layer_granularity: int = 1) -> dict[str, Any]:
    """mergekit-evolve's config: the toy experts on the base, lm-eval exact match per task."""
    return {
        "genome": {
            "models": [str(suite / "experts" / t) for t in tasks],
            "merge_method": method,
            "base_model": str(suite / "base"),
            "layer_granularity": layer_granularity,
        },
        "tasks": [{"name": f"toy_{t}", "metric": "exact_match,none", "weight": 1 / len(tasks)}
                  for t in tasks],
        "limit": limit,
        "num_fewshot": 0,
        "apply_chat_template": False,
    }


def run_peer(py: Path, config: dict[str, Any], task_dir: Path, run_dir: Path, *,
             fevals: int, batch_size: int = 16, workers: int = 1, in_memory: bool = False,
             popsize: int | None = None, seed: int | None = None,
             timeout_s: float = 1800) -> dict[str, Any]:
    """Run one mergekit-evolve search (pool strategy); return its candidates and timings."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "evolve.yml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = run_dir / "candidates.jsonl"
    log.unlink(missing_ok=True)
    cmd = [str(py), str(REPO / "bench" / "peer" / "evolve_logged.py"),
           "--storage-path", str(run_dir / "storage"), "--strategy", "pool",
           "--batch-size", str(batch_size), "--no-merge-cuda", "--max-fevals", str(fevals),
           "--num-gpus", str(workers), "--task-search-path", str(task_dir),
           "--no-save-final-model", "--no-wandb"]
    if in_memory:
        cmd.append("--in-memory")
    if popsize:
        cmd += ["--force-population-size", str(popsize)]
    env = peer_env(MK_CANDIDATE_LOG=str(log), MK_FAKE_GPUS=str(workers),
                   MK_RAY_CPUS=str(max(2, workers)), **({"MK_SEED": str(seed)} if seed else {}))
    t0 = time.time()
    with open(run_dir / "stdout.log", "w") as out:
        proc = subprocess.run([*cmd, str(cfg_path)], env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout_s, cwd=run_dir)
    wall = time.time() - t0
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    tail = (run_dir / "stdout.log").read_text()[-3000:]
    return {"rc": proc.returncode, "wall_s": wall, "t0": t0, "candidates": rows,
            "log_tail": tail if proc.returncode else ""}


def steady_rate(rows: list[dict[str, Any]]) -> float | None:
    """Evaluations per minute after the first generation finished (startup excluded)."""
    ends = sorted({r["t_end"] for r in rows})
    if len(ends) < 2:
        return None
    first = [r for r in rows if r["t_end"] == ends[0]]
    return 60.0 * (len(rows) - len(first)) / (ends[-1] - ends[0])
