"""Ranking-preserving fitness subsets: anchor points vs random subsets of the same size.

On the small toy suite (base + experts; per-layer task-arithmetic weights, the space of
``bench/search_quality.py``'s "cmaes per-layer TA" row), ``--candidates`` recipes (the
baselines and seeded uniform draws of the space) are scored on the whole validation split of
every task by the ``accuracy`` evaluator with per-example scores (cached in ``--work``). Then,
for each split of the candidates into ``--warmup`` used to choose and the rest to test on, and
each subset size per task: anchors (:func:`evomerge.search.anchors.select_subset`, 3 seeds)
and random subsets (10 draws) are chosen from the warm-up candidates' per-example scores, and
measured on the *other* candidates: Kendall tau of the estimated objective (the mean over
tasks) against the full objective, the mean tau per task, and the mean absolute error of the
estimated objective.

    python bench/anchor_subsets.py            # ~3-12 min on 2 loaded cores (the scoring)
    python bench/anchor_subsets.py --quick    # 12 candidates, sizes 8 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.candidate_throughput import ensure_suite, num_layers, toy_job  # noqa: E402
from bench.common import format_table, machine, markdown_table, write_json  # noqa: E402
from evomerge.search.anchors import estimate, full_score, select_subset  # noqa: E402
from evomerge.search.rank_fidelity import kendall_tau  # noqa: E402


def candidates(job: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """The space's baselines, then uniform draws of its parameters, as recipe dicts."""
    from evomerge.search.driver import build_space

    space = build_space(job)
    out = [space.decode(p).to_dict() for p in space.baselines().values()][:n]
    rng = np.random.default_rng(seed)
    dists = space.distributions()
    while len(out) < n:
        params = {k: float(rng.uniform(d.low, d.high)) for k, d in dists.items()}
        out.append(space.decode(params).to_dict())
    return out


def score_all(job: Any, recipes: list[dict[str, Any]], cache: Path) -> list[dict[str, Any]]:
    """``{"metrics", "per_example"}`` of each recipe on the full validation splits (cached)."""
    import torch

    from evomerge.engines import engine_factory
    from evomerge.evaluators.base import build_evaluator
    from evomerge.recipe import Recipe

    done: list[dict[str, Any]] = json.loads(cache.read_text()) if cache.exists() else []
    if len(done) >= len(recipes):
        return done[: len(recipes)]
    torch.set_num_threads(1)
    engine = engine_factory("ps").from_job(job)
    evaluators = [build_evaluator(cfg) for cfg in job.evaluators]
    for i, recipe in enumerate(recipes[len(done):], start=len(done)):
        t0 = time.perf_counter()
        model, tok = engine.apply(Recipe.from_dict(recipe))
        metrics: dict[str, float] = {}
        vectors: dict[str, Any] = {}
        for ev in evaluators:
            metrics.update(ev.evaluate(model, tok, per_example=vectors))
        done.append({"metrics": metrics, "per_example": vectors})
        cache.write_text(json.dumps(done))
        print(f"candidate {i + 1}/{len(recipes)}: {time.perf_counter() - t0:.1f} s", flush=True)
    return done


def compare(scored: list[dict[str, Any]], *, sizes: list[int], warmup: int,
            splits: int) -> list[dict[str, Any]]:
    labels = sorted(scored[0]["per_example"])
    mats = {k: np.array([c["per_example"][k]["values"] for c in scored]) for k in labels}
    rows = []
    for size in sizes:
        out: dict[str, dict[str, list[float]]] = {m: {"tau": [], "tau_task": [], "err": []}
                                                  for m in ("anchors", "random")}
        for split in range(splits):
            order = np.random.default_rng(100 + split).permutation(len(scored))
            warm, test = order[:warmup], order[warmup:]
            full = [np.mean([full_score(mats[k][j]) for k in labels]) for j in test]
            for method, seeds in (("anchors", range(3)), ("random", range(10))):
                for seed in seeds:
                    per_task = []
                    chosen = {k: select_subset(mats[k][warm], size=size, method=method,
                                               seed=seed) for k in labels}
                    for k in labels:
                        e = [estimate(mats[k][j], *chosen[k]) for j in test]
                        per_task.append(kendall_tau(e, [full_score(mats[k][j]) for j in test]))
                    est = [np.mean([estimate(mats[k][j], *chosen[k]) for k in labels])
                           for j in test]
                    out[method]["tau"].append(kendall_tau(est, full))
                    out[method]["tau_task"].append(float(np.nanmean(per_task)))
                    out[method]["err"].append(float(np.mean(np.abs(np.subtract(est, full)))))
        row: dict[str, Any] = {"size per task": size, "of": mats[labels[0]].shape[1]}
        for method, r in out.items():
            tau, sd = statistics.mean(r["tau"]), statistics.stdev(r["tau"])
            row[f"{method} tau"] = f"{tau:.3f} ± {sd:.3f}"
            row[f"{method} task tau"] = f"{statistics.mean(r['tau_task']):.3f}"
            row[f"{method} |err|"] = f"{statistics.mean(r['err']):.4f}"
        row["raw"] = out
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", type=Path, default=Path("/tmp/toy_small"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_anchor_subsets"))
    ap.add_argument("--candidates", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.candidates, args.warmup, args.sizes = 12, 6, [8, 16]
    from evomerge.config import parse_job

    info = machine()
    suite = ensure_suite(args.suite)
    args.work.mkdir(parents=True, exist_ok=True)
    layers = num_layers(suite)
    space = {"name": "parameter", "method": "task_arithmetic", "per_model": True,
             "layer_groups": layers}
    data = toy_job(suite, args.work / "run", evaluator="accuracy", limit=10**6, workers=1,
                   trials=1, layer_groups=layers, space=space)
    for ev in data["evaluators"]:
        ev.pop("limit")  # the whole validation split
    job = parse_job(data)
    t0 = time.time()
    scored = score_all(job, candidates(job, args.candidates, args.seed),
                       args.work / f"scores_{args.candidates}_{args.seed}.json")
    score_s = time.time() - t0
    rows = compare(scored, sizes=args.sizes, warmup=args.warmup, splits=args.splits)
    cols = ["size per task", "of", "anchors tau", "random tau", "anchors task tau",
            "random task tau", "anchors |err|", "random |err|"]
    print(format_table(rows, cols))
    print(markdown_table(rows, cols))
    objective = [statistics.mean(v for k, v in c["metrics"].items() if k.startswith("accuracy/"))
                 for c in scored]
    path = write_json("anchor_subsets", info=info, settings={
        **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "space": space, "score_s": score_s,
        "objective_range": [min(objective), max(objective)],
        "objective_sd": statistics.stdev(objective)}, results=rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
