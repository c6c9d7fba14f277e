"""Candidate throughput: evaluations per minute of a search on the toy suite, evomerge vs the peer.

Same models (the toy base and its experts), same search space (per-model TIES weight and density
over ``--layer-groups`` layer groups), same lm-eval tasks (``toy_<task>``, greedy generation,
exact match) on the same ``--limit`` validation examples each, CMA-ES in both:

- evomerge ``lm_eval`` evaluator (lm-evaluation-harness on the in-memory model), 1 and 2 workers;
- evomerge ``accuracy`` evaluator (its own batched greedy generation), 1 and 2 workers;
- mergekit-evolve 0.1.5 through the CPU shim (``bench/mergekit_evolve.py``), pool strategy,
  ``--batch-size 16``, on disk and ``--in-memory``, 1 worker (``--peer-workers`` for more).

Rate = evaluations completed after the first one / seconds from the first to the last completion
(startup excluded: Ray, model loading, resharding); ``e2e`` = all evaluations / command wall time.
For evomerge the per-trial merge/eval/driver split comes from the trials' ``timing``.

    python bench/candidate_throughput.py                 # ~10 minutes on 2 loaded cores
    python bench/candidate_throughput.py --quick --skip-peer
    python bench/candidate_throughput.py --profile       # also py-spy a 1-worker evomerge run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bench import mergekit_evolve as peer  # noqa: E402
from bench.common import format_table, machine, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def suite_tasks(suite: Path) -> tuple[str, ...]:
    """The suite's expert tasks (folder names under ``experts/``)."""
    return tuple(sorted(p.name for p in (suite / "experts").iterdir() if p.is_dir()))


def ensure_suite(suite: Path, wait_s: float = 1800) -> Path:
    """Build the small toy suite into ``suite`` once (reused when its manifest exists) and
    write its lm-eval task YAMLs; waits for ``evomerge.toy.build`` while it is being written."""
    deadline = time.time() + wait_s
    while not (suite / "manifest.json").exists():
        try:
            from evomerge.toy.build import build_suite
        except ImportError:
            if time.time() > deadline:
                raise
            print("waiting for evomerge.toy.build ...", file=sys.stderr)
            time.sleep(30)
            continue
        build_suite(suite, size="small")
    from evomerge.evaluators.lm_tasks import write_toy_tasks

    tasks = suite_tasks(suite)
    if not all((suite / "tasks" / f"toy_{t}.yaml").exists() for t in tasks):
        write_toy_tasks(suite, list(tasks))
    return suite


def num_layers(suite: Path) -> int:
    return int(json.loads((suite / "base" / "config.json").read_text())["num_hidden_layers"])


def toy_job(suite: Path, run_dir: Path, *, evaluator: str, limit: int, workers: int,
            trials: int, layer_groups: int, sampler: dict[str, Any] | None = None,
            space: dict[str, Any] | None = None, held_out_top_k: int = 0,
            baselines: bool = True) -> dict[str, Any]:
    """An evomerge job dict over the toy suite (parse with ``evomerge.config.parse_job``)."""
    tasks = suite_tasks(suite)
    if evaluator == "lm_eval":
        evals: list[dict[str, Any]] = [{
            "name": "lm_eval", "tasks": [f"toy_{t}" for t in tasks],
            "include_path": str(suite / "tasks"), "limit": limit, "batch_size": 64}]
        metrics = [f"lm_eval/toy_{t}/exact_match" for t in tasks]
    else:
        evals = [{"name": "accuracy", "data": str(suite / "data" / t), "split": "validation",
                  "limit": limit, "batch_size": 64} for t in tasks]
        metrics = [f"accuracy/{t}" for t in tasks]
    return {
        "name": run_dir.name, "run_dir": str(run_dir),
        "models": {"base": {"path": str(suite / "base")},
                   "experts": {t: {"path": str(suite / "experts" / t)} for t in tasks}},
        "search": {
            "space": space or {"name": "parameter", "method": "ties", "per_model": True,
                               "layer_groups": layer_groups},
            "sampler": sampler or {"name": "cmaes", "popsize": 8, "sigma0": 0.25, "seed": 0},
            "trials": trials, "baselines": baselines, "held_out_top_k": held_out_top_k},
        "evaluators": evals,
        "objectives": [{"weights": {m: 1 for m in metrics}, "direction": "maximize"}],
        "resources": {"workers": workers, "num_cpus": 1, "torch_threads": 1},
    }


def run_evomerge(job: dict[str, Any], *, profile_s: float = 0) -> dict[str, Any]:
    """``python -m evomerge search`` in a fresh process; read the trials from its journal."""
    run_dir = Path(job["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for attempt in range(3):  # a loaded machine can time Ray's node startup out: retry
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "evomerge", "search", str(path),
                                 "--no-progress"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        prof = _py_spy(proc, run_dir, profile_s) if profile_s else None
        out, _ = proc.communicate()
        wall = time.time() - t0
        if proc.returncode == 0:
            break
        if attempt == 2 or "timed out during startup" not in out:
            raise RuntimeError(f"evomerge search failed:\n{out[-3000:]}")
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        time.sleep(30)
    return {"wall_s": wall, "t0": t0, "trials": read_trials(run_dir), "profile": prof}


def read_trials(run_dir: Path) -> list[dict[str, Any]]:
    from evomerge.runs.results import open_run

    study, _ = open_run(run_dir)
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.datetime_complete is None:
            continue
        rows.append({"number": t.number, "state": t.state.name, "value": t.values[0]
                     if t.values else None, "start": t.datetime_start.timestamp(),
                     "end": t.datetime_complete.timestamp(),
                     "baseline": t.user_attrs.get("baseline"),
                     "metrics": t.user_attrs.get("metrics", {}),
                     "recipe": t.user_attrs.get("recipe"), **t.user_attrs.get("timing", {})})
    return rows


def _py_spy(proc: subprocess.Popen, run_dir: Path, seconds: float) -> dict[str, Any] | None:
    """py-spy one evomerge worker (a ``MergeWorker`` descendant of ``proc``) while it evaluates;
    return the inclusive share of samples per ``function (file)``, top 40."""
    import psutil

    deadline, pid = time.time() + 120, None
    while pid is None and time.time() < deadline and proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "MergeWorker" in " ".join(child.cmdline()):
                    pid = child.pid
            except psutil.Error:
                continue
        time.sleep(1)
    if pid is None:
        return None
    journal = run_dir / "study.journal"
    while proc.poll() is None and time.time() < deadline + 300:  # until a trial has finished
        if journal.exists() and '"merge_s"' in journal.read_text():
            break
        time.sleep(1)
    raw = run_dir / "py-spy.txt"
    subprocess.run(["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)),
                    "--format", "raw", "--output", str(raw), "--nonblocking"],
                   capture_output=True, check=False)
    return collapsed_shares(raw) if raw.exists() else None


def collapsed_shares(path: Path, top: int = 40) -> dict[str, Any]:
    """Inclusive sample share of each ``function (file)`` in py-spy's collapsed stacks."""
    counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        frames = {f.rsplit(":", 1)[0] + ")" if ":" in f else f for f in stack.split(";")}
        for f in frames:
            counts[f] = counts.get(f, 0) + int(n)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return {"samples": total, "inclusive": {k: v / total for k, v in ranked}}


def evomerge_summary(label: str, res: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in res["trials"] if r["state"] == "COMPLETE"]
    ends = sorted(r["end"] for r in rows)
    rate = 60 * (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else None
    n = len(rows)
    merge = sum(r.get("merge_s", 0) for r in rows) / n
    ev = sum(r.get("eval_s", 0) for r in rows) / n
    wall = sum(r.get("wall_s", 0) for r in rows) / n
    return {"run": label, "evals": n, "evals_per_min": rate,
            "e2e_per_min": 60 * n / res["wall_s"] if res["wall_s"] else None,
            "wall_s": res["wall_s"],
            "merge_s": merge, "eval_s": ev, "other_s": wall - merge - ev,
            "best": max(r["value"] for r in rows)}


def peer_summary(label: str, res: dict[str, Any]) -> dict[str, Any]:
    rows = res["candidates"]
    return {"run": label, "evals": len(rows), "evals_per_min": peer.steady_rate(rows),
            "e2e_per_min": 60 * len(rows) / res["wall_s"] if rows and res["wall_s"] else None,
            "wall_s": res["wall_s"], "best": max((r["score"] for r in rows), default=None),
            "rc": res["rc"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", type=Path, default=Path("/tmp/toy_small"))
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_throughput"))
    p.add_argument("--limit", type=int, default=32, help="examples per task per evaluation")
    p.add_argument("--trials", type=int, default=40, help="evaluations per evomerge run")
    p.add_argument("--peer-fevals", type=int, default=24)
    p.add_argument("--peer-workers", type=int, nargs="+", default=[1])
    p.add_argument("--peer-venv", type=Path, default=peer.DEFAULT_VENV)
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--reuse-peer", action="store_true",
                   help="read the peer's candidate logs already in --work instead of running it")
    p.add_argument("--peer-only", action="store_true",
                   help="run only the peer; evomerge rows from the journals under --work")
    p.add_argument("--no-in-memory", action="store_true", help="skip the peer's --in-memory run")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--layer-groups", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="16 trials, 16 peer evaluations")
    p.add_argument("--profile", type=float, default=0, help="py-spy seconds (1-worker lm_eval)")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.peer_fevals = 16, 16
    info = machine()
    suite = ensure_suite(args.suite)
    args.work.mkdir(parents=True, exist_ok=True)
    rows, raw = [], {}
    if args.peer_only:
        for evaluator in ("lm_eval", "accuracy"):  # the searches' journals under --work
            for w in args.workers:
                label = f"evomerge {evaluator} x{w}"
                trials = read_trials(args.work / f"evomerge_{evaluator}_{w}")
                run: dict[str, Any] = {"wall_s": None, "trials": trials}
                raw[label] = run
                rows.append(evomerge_summary(label, run))
    for evaluator in ("lm_eval", "accuracy") if not args.peer_only else ():
        for w in args.workers:
            label = f"evomerge {evaluator} x{w}"
            job = toy_job(suite, args.work / f"evomerge_{evaluator}_{w}", evaluator=evaluator,
                          limit=args.limit, workers=w, trials=args.trials,
                          layer_groups=args.layer_groups)
            prof = args.profile if (evaluator == "lm_eval" and w == 1) else 0
            raw[label] = run_evomerge(job, profile_s=prof)
            rows.append(evomerge_summary(label, raw[label]))
            print(format_table(rows[-1:], list(rows[-1])), file=sys.stderr)
    if not args.skip_peer:
        py = peer.ensure_peer_venv(args.peer_venv)
        tasks = peer.peer_tasks(suite / "tasks", args.work / "peer_tasks")
        cfg = peer.evolve_config(suite, list(suite_tasks(suite)), limit=args.limit,
                                 layer_granularity=num_layers(suite) // args.layer_groups)
        modes = [False] if args.no_in_memory else [False, True]
        for w in args.peer_workers:
            for mem in modes:
                label = f"mergekit-evolve x{w}" + (" in-memory" if mem else "")
                out = args.work / label.replace(" ", "_")
                if args.reuse_peer and (out / "candidates.jsonl").exists():
                    lines = (out / "candidates.jsonl").read_text().splitlines()
                    res = {"rc": 0, "wall_s": None, "candidates": [json.loads(x) for x in lines]}
                else:
                    res = peer.run_peer(py, cfg, tasks, out, fevals=args.peer_fevals,
                                        workers=w, in_memory=mem, popsize=8)
                raw[label] = res
                rows.append(peer_summary(label, res))
                print(format_table(rows[-1:], list(rows[-1])), file=sys.stderr)
    ratios = ratio_rows(rows)
    cols = ["run", "evals", "evals_per_min", "e2e_per_min", "wall_s", "merge_s", "eval_s",
            "other_s", "best"]
    print(format_table(rows, cols))
    if ratios:
        print()
        print(format_table(ratios, list(ratios[0])))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["tasks"] = list(suite_tasks(suite))
    path = write_json("candidate_throughput", settings=settings, info=info,
                      results={"rows": rows, "ratios": ratios, "raw": raw})
    print(f"wrote {path}", file=sys.stderr)
    return 0


def ratio_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each evomerge rate over the peer's best rate (target >= 10)."""
    peers = [r for r in rows if r["run"].startswith("mergekit") and r["evals_per_min"]]
    if not peers:
        return []
    best = max(peers, key=lambda r: r["evals_per_min"])
    return [{"evomerge": r["run"], "peer": best["run"],
             "ratio": r["evals_per_min"] / best["evals_per_min"],
             "ratio_e2e": r["e2e_per_min"] / best["e2e_per_min"]
             if r["e2e_per_min"] and best["e2e_per_min"] else None,
             "target": 10.0}
            for r in rows if r["run"].startswith("evomerge")]


if __name__ == "__main__":
    raise SystemExit(main())
