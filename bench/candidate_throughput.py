"""Candidate throughput: evaluations per minute of a search, evomerge vs the peer.

Same models (a suite's base and its experts: the small toy suite, or the SmolLM2-135M suite with
``--suite smollm2`` or a path to one), same search space (per-model TIES weight and density
over ``--layer-groups`` layer groups), same lm-eval tasks (``toy_<task>`` or ``smollm2_<task>``,
greedy generation, exact match) on the same ``--limit`` validation examples each, CMA-ES in both:

- evomerge ``lm_eval`` evaluator (lm-evaluation-harness on the in-memory model), 1 and 2 workers;
- evomerge ``accuracy`` evaluator (its own batched greedy generation), 1 and 2 workers;
- mergekit-evolve 0.1.5 through the CPU shim (``bench/mergekit_evolve.py``), pool strategy,
  ``--batch-size 16``, on disk and ``--in-memory``, 1 worker (``--peer-workers`` for more).

Rate = evaluations completed after the first one / seconds from the first to the last completion
(startup excluded: Ray, model loading, resharding); ``e2e`` = all evaluations / command wall time.
For evomerge the per-trial merge/eval/driver split comes from the trials' ``timing``. Peak memory:
the summed RSS of the run's process tree (sampled every 0.5 s) and its largest process.

    python bench/candidate_throughput.py                 # ~10 minutes on 2 loaded cores
    python bench/candidate_throughput.py --suite /work/smollm2_suite --evaluators lm_eval \
        --workers 1 --limit 16 --trials 12 --peer-fevals 12 --no-in-memory   # a real model
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
import threading
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
SUITES = {"toy": Path("/tmp/toy_small"), "smollm2": Path("smollm2_suite")}


def suite_path(arg: str) -> Path:
    """``toy`` and ``smollm2`` name the default folders (``smollm2_suite`` as the configs);
    anything else is the suite's folder."""
    return SUITES.get(arg, Path(arg))


def suite_kind(suite: Path) -> str:
    """``smollm2`` for a SmolLM2 suite (its manifest says so, or its name does while it is not
    built yet), else ``toy``; it names the lm-eval tasks (``<kind>_<task>``)."""
    manifest = suite / "manifest.json"
    if manifest.exists():
        name = json.loads(manifest.read_text())["settings"].get("suite", "")
        return "smollm2" if str(name).startswith("smollm2") else "toy"
    return "smollm2" if "smollm2" in suite.name else "toy"


def suite_tasks(suite: Path) -> tuple[str, ...]:
    """The suite's expert tasks (folder names under ``experts/``)."""
    return tuple(sorted(p.name for p in (suite / "experts").iterdir() if p.is_dir()))


def ensure_suite(suite: Path, wait_s: float = 1800) -> Path:
    """Build the small toy suite (or the SmolLM2 suite, by :func:`suite_kind`) into ``suite``
    once (reused when its manifest exists) and write its lm-eval task YAMLs; waits for
    ``evomerge.toy.build`` while it is being written."""
    if suite_kind(suite) == "smollm2":
        from evomerge.toy.smollm2 import build_smollm2

        return build_smollm2(suite)  # writes tasks/smollm2_<task>.yaml itself
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
            baselines: bool = True, tie_order: str | None = None,
            speculative: bool = True, torch_threads: int = 1) -> dict[str, Any]:
    """An evomerge job dict over the suite (parse with ``evomerge.config.parse_job``)."""
    tasks, kind = suite_tasks(suite), suite_kind(suite)
    if evaluator == "lm_eval":
        evals: list[dict[str, Any]] = [{
            "name": "lm_eval", "tasks": [f"{kind}_{t}" for t in tasks],
            "include_path": str(suite / "tasks"), "limit": limit, "batch_size": 64,
            "speculative": speculative}]
        metrics = [f"lm_eval/{kind}_{t}/exact_match" for t in tasks]
    else:
        evals = [{"name": "accuracy", "data": str(suite / "data" / t), "split": "validation",
                  "limit": limit, "batch_size": 64, "speculative": speculative, **_chat(kind)}
                 for t in tasks]
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
        "resources": {"workers": workers, "num_cpus": 1, "torch_threads": torch_threads},
        **({"load": {"tie_order": tie_order}} if tie_order else {}),
    }


def _chat(kind: str) -> dict[str, Any]:
    """The SmolLM2 ``accuracy`` settings of ``configs/smollm2.yaml`` (the question in the chat
    template, the end of the turn stops); none for the toy suite."""
    if kind != "smollm2":
        return {}
    from evomerge.toy.smollm2 import SYSTEM

    return {"field": "question", "chat_template": True, "system": SYSTEM, "max_new_tokens": 24}


class TreeMemory:
    """Peak RSS of this process's children (recursively: Ray's raylet and workers, the peer's
    processes), sampled every ``every`` seconds in a thread while the ``with`` block runs."""

    def __init__(self, every: float = 0.5) -> None:
        self.every, self.total_mb, self.process_mb = every, 0.0, 0.0
        self._stop = threading.Event()

    def __enter__(self) -> TreeMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(self.every):
            rss = []
            for child in me.children(recursive=True):
                try:
                    rss.append(child.memory_info().rss / 2**20)
                except psutil.Error:
                    continue
            self.total_mb = max(self.total_mb, sum(rss))
            self.process_mb = max([self.process_mb, *rss])

    def result(self) -> dict[str, float]:
        return {"peak_tree_mb": round(self.total_mb), "peak_process_mb": round(self.process_mb)}


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
        with TreeMemory() as mem:
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
    return {"wall_s": wall, "t0": t0, "trials": read_trials(run_dir), "profile": prof,
            "memory": mem.result(), "workers": read_workers(run_dir)}


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


def read_workers(run_dir: Path) -> list[dict[str, Any]]:
    """The workers' own record (``peak_rss_mb``, ``load_s``: the summary's ``workers:`` line)."""
    from evomerge.runs.results import open_run

    study, _ = open_run(run_dir)
    return list(study.user_attrs.get("evomerge:workers") or [])


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
    workers = [w["peak_rss_mb"] for w in res.get("workers") or [] if w.get("peak_rss_mb")]
    return {"run": label, "evals": n, "evals_per_min": rate,
            "e2e_per_min": 60 * n / res["wall_s"] if res["wall_s"] else None,
            "wall_s": res["wall_s"], "cand_s": wall,
            "merge_s": merge, "eval_s": ev, "other_s": wall - merge - ev,
            "best": max(r["value"] for r in rows),
            "worker_peak_mb": max(workers) if workers else None,
            **(res.get("memory") or {})}


def peer_summary(label: str, res: dict[str, Any]) -> dict[str, Any]:
    rows = res["candidates"]
    return {"run": label, "evals": len(rows), "evals_per_min": peer.steady_rate(rows),
            "e2e_per_min": 60 * len(rows) / res["wall_s"] if rows and res["wall_s"] else None,
            "wall_s": res["wall_s"], **_peer_split(rows, res.get("merge_probe_s")),
            "best": max((r["score"] for r in rows), default=None),
            "rc": res["rc"], **(res.get("memory") or {})}


def _peer_split(rows: list[dict[str, Any]], merge_s: float | None) -> dict[str, Any]:
    """Seconds per candidate (a generation's time over its candidates; the peer logs no finer
    timing), split into the probed merge time and the rest (model load and lm-eval)."""
    gens = {(r["t_start"], r["t_end"]): r.get("n") or 1 for r in rows}
    total = sum(t1 - t0 for t0, t1 in gens)
    cand = total / sum(gens.values()) if gens else None
    return {"cand_s": cand, "merge_s": merge_s,
            "eval_s": cand - merge_s if cand is not None and merge_s is not None else None}


def peer_task_dir(suite: Path, out: Path, kind: str) -> Path:
    """The peer's copies of the suite's lm-eval tasks, scoring the validation split
    (:func:`bench.mergekit_evolve.peer_tasks` for the toy suite's ``toy_*.yaml``)."""
    if kind == "toy":
        return peer.peer_tasks(suite / "tasks", out)
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted((suite / "tasks").glob(f"{kind}_*.yaml")):
        cfg = yaml.safe_load(src.read_text())
        cfg.pop("test_split", None)
        (out / src.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def peer_merge_seconds(py: Path, candidate: dict[str, Any], out: Path) -> float | None:
    """Seconds of one on-disk ``mergekit-yaml`` merge of a peer candidate's config (CPU, as the
    peer's workers merge with ``--no-merge-cuda``); None if it fails."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "merge.yml").write_text(candidate["config"])
    cli = py.parent / "mergekit-yaml"
    t0 = time.time()
    proc = subprocess.run([str(cli), str(out / "merge.yml"), str(out / "model")],
                          env=peer.peer_env(), capture_output=True, text=True)
    seconds = time.time() - t0
    shutil.rmtree(out / "model", ignore_errors=True)
    return seconds if proc.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", type=suite_path, default=SUITES["toy"],
                   help="toy (/tmp/toy_small), smollm2 (smollm2_suite) or a suite folder")
    p.add_argument("--evaluators", nargs="+", default=["lm_eval", "accuracy"],
                   choices=["lm_eval", "accuracy"])
    p.add_argument("--name", help="results name (default candidate_throughput[_smollm2])")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_throughput"))
    p.add_argument("--limit", type=int, default=32, help="examples per task per evaluation")
    p.add_argument("--trials", type=int, default=40, help="evaluations per evomerge run")
    p.add_argument("--peer-fevals", type=int, default=24)
    p.add_argument("--peer-workers", type=int, nargs="+", default=[1])
    p.add_argument("--peer-venv", type=Path, default=peer.DEFAULT_VENV)
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--skip-evomerge", action="store_true", help="run only the peer (its result "
                   "is kept in --work for a later --reuse-peer)")
    p.add_argument("--reuse-peer", action="store_true",
                   help="read the peer's candidate logs already in --work instead of running it")
    p.add_argument("--peer-only", action="store_true",
                   help="run only the peer; evomerge rows from the journals under --work")
    p.add_argument("--no-in-memory", action="store_true", help="skip the peer's --in-memory run")
    p.add_argument("--peer-merge-probe", action="store_true",
                   help="time mergekit-yaml on the peer's first candidate (its merge seconds)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--layer-groups", type=int, default=2)
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads per evomerge worker (2 for one worker on 2 cores)")
    p.add_argument("--tie-order", choices=["mergekit", "index"],
                   help="evomerge's load.tie_order (default: the config default, mergekit)")
    p.add_argument("--no-speculative", action="store_true",
                   help="evaluators generate every token (speculative: false), as before 12-02")
    p.add_argument("--popsize", type=int, default=8, help="CMA-ES population, both tools")
    p.add_argument("--quick", action="store_true", help="16 trials, 16 peer evaluations")
    p.add_argument("--profile", type=float, default=0, help="py-spy seconds (1-worker lm_eval)")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.peer_fevals = 16, 16
    info = machine()
    suite = ensure_suite(args.suite)
    kind = suite_kind(suite)
    args.work.mkdir(parents=True, exist_ok=True)
    rows, raw = [], {}
    if args.peer_only:
        for evaluator in args.evaluators:  # the searches' journals under --work
            for w in args.workers:
                label = f"evomerge {evaluator} x{w}"
                trials = read_trials(args.work / f"evomerge_{evaluator}_{w}")
                run: dict[str, Any] = {"wall_s": None, "trials": trials}
                raw[label] = run
                rows.append(evomerge_summary(label, run))
    for evaluator in args.evaluators if not (args.peer_only or args.skip_evomerge) else ():
        for w in args.workers:
            label = f"evomerge {evaluator} x{w}" + (
                f" ({args.torch_threads} threads)" if args.torch_threads > 1 else "")
            job = toy_job(suite, args.work / f"evomerge_{evaluator}_{w}", evaluator=evaluator,
                          limit=args.limit, workers=w, trials=args.trials,
                          layer_groups=args.layer_groups, tie_order=args.tie_order,
                          speculative=not args.no_speculative, torch_threads=args.torch_threads,
                          sampler={"name": "cmaes", "popsize": args.popsize, "sigma0": 0.25,
                                   "seed": 0})
            prof = args.profile if (evaluator == "lm_eval" and w == 1) else 0
            raw[label] = run_evomerge(job, profile_s=prof)
            rows.append(evomerge_summary(label, raw[label]))
            print(format_table(rows[-1:], list(rows[-1])), file=sys.stderr)
    if not args.skip_peer:
        py = peer.ensure_peer_venv(args.peer_venv)
        tasks = peer_task_dir(suite, args.work / "peer_tasks", kind)
        cfg = peer.evolve_config(suite, list(suite_tasks(suite)), limit=args.limit,
                                 layer_granularity=num_layers(suite) // args.layer_groups)
        for task in cfg["tasks"]:
            task["name"] = task["name"].replace("toy_", f"{kind}_", 1)
        modes = [False] if args.no_in_memory else [False, True]
        for w in args.peer_workers:
            for mem in modes:
                label = f"mergekit-evolve x{w}" + (" in-memory" if mem else "")
                out = args.work / label.replace(" ", "_")
                if args.reuse_peer and (out / "result.json").exists():  # a whole earlier run
                    res = json.loads((out / "result.json").read_text())
                elif args.reuse_peer and (out / "candidates.jsonl").exists():
                    lines = (out / "candidates.jsonl").read_text().splitlines()
                    res = {"rc": 0, "wall_s": None, "candidates": [json.loads(x) for x in lines]}
                else:
                    with TreeMemory() as tree:
                        res = peer.run_peer(py, cfg, tasks, out, fevals=args.peer_fevals,
                                            workers=w, in_memory=mem,
                                            popsize=args.popsize)
                    res["memory"] = tree.result()
                    if args.peer_merge_probe and not mem and res["candidates"]:
                        res["merge_probe_s"] = peer_merge_seconds(py, res["candidates"][0],
                                                                  out / "merge_probe")
                    (out / "result.json").write_text(json.dumps(res, default=str))
                raw[label] = res
                rows.append(peer_summary(label, res))
                print(format_table(rows[-1:], list(rows[-1])), file=sys.stderr)
    ratios = ratio_rows(rows)
    cols = ["run", "evals", "evals_per_min", "e2e_per_min", "wall_s", "cand_s", "merge_s",
            "eval_s", "other_s", "best", "worker_peak_mb", "peak_process_mb", "peak_tree_mb"]
    print(format_table(rows, cols))
    if ratios:
        print()
        print(format_table(ratios, list(ratios[0])))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["tasks"] = [f"{kind}_{t}" for t in suite_tasks(suite)]
    name = args.name or ("candidate_throughput" + ("_smollm2" if kind == "smollm2" else ""))
    path = write_json(name, settings=settings, info=info,
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
