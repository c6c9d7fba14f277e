"""Fewer evaluations (issue 18): coarse to fine, a CMA-ES start from AdaMerging, Optuna's GP.

On the small toy suite, the space and settings of ``bench/search_quality.py``'s ``cmaes per-layer
TA`` row (task-arithmetic weights per model and layer, 3 experts; accuracy on ``--limit``
validation examples per task; 2 workers; the baselines first), ``--evals`` evaluations, over
``--seeds``: CMA-ES from the middle of the bounds, coarse to fine, CMA-ES from the uniform merge
(the row's own setting), CMA-ES from AdaMerging, and GP. Prints final best fitness, the test
accuracy of the best trial and the evaluations to 95 % of the final best; writes
``bench/results/coarse_to_fine.json``. ``--gp-asks`` instead times GP asks on a 24-parameter
space at 32, 64 and 128 trials.

    python bench/coarse_to_fine.py                # 64 evaluations x 3 seeds
    python bench/coarse_to_fine.py --gp-asks      # ms per GP ask, ~1 min
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # GPSampler's advice (torch reads it at import)

from bench.candidate_throughput import ensure_suite, num_layers, toy_job  # noqa: E402
from bench.common import format_table, machine, write_json  # noqa: E402

CMA = {"name": "cmaes", "popsize": 8, "sigma0": 0.25}  # search_quality's, without its start


def methods(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    ada = {"granularity": "layer", "steps": args.ada_steps}
    return {
        "cmaes": {"sampler": CMA},
        "cmaes+coarse": {"sampler": {**CMA, "start": "uniform", "sigma0": 0.1,
                                     "coarse": {"trials": args.coarse, "sigma0": 0.25}}},
        "cmaes start uniform": {"sampler": {**CMA, "start": "uniform"}},
        "cmaes start adamerging": {"sampler": {**CMA, "start": "adamerging"}, "adamerging": ada},
        "gp": {"sampler": {"name": "gp", "n_startup_trials": 10}},
    }


def run(label: str, spec: dict[str, Any], seed: int, args: argparse.Namespace,
        held: Any) -> dict[str, Any]:
    from bench.search_quality import incumbents, record, run_evomerge

    layers = num_layers(args.suite)
    space = {"name": "parameter", "method": "task_arithmetic", "per_model": True,
             "layer_groups": layers}
    job = toy_job(args.suite, args.work / f"{label.replace(' ', '_').replace('+', '-')}_{seed}",
                  evaluator="accuracy", limit=args.limit, workers=args.workers,
                  trials=args.evals, layer_groups=layers, sampler={**spec["sampler"],
                                                                   "seed": seed},
                  space=copy.deepcopy(space))
    if "adamerging" in spec:
        job["adamerging"] = {**spec["adamerging"], "seed": seed}
    t0 = time.time()
    rows = run_evomerge(job)
    seconds = time.time() - t0
    values = [r["value"] for r in rows]
    tests = [(m, held.recipe(rows[i]["recipe"])) for m, i in incumbents(values, args.every)]
    out = record(label, seed, values, tests, seconds)
    out["start_s"] = _start_seconds(Path(job["run_dir"]))
    return out


def _start_seconds(run_dir: Path) -> float | None:
    from evomerge.runs.results import open_run
    from evomerge.search.start import START_ATTR

    study, _ = open_run(run_dir)
    return (study.user_attrs.get(START_ATTR) or {}).get("seconds")


def gp_asks(sizes: tuple[int, ...] = (32, 64, 128), dim: int = 24) -> list[dict[str, Any]]:
    """Milliseconds per GP ask after ``n`` completed trials of a ``dim``-parameter bowl."""
    import numpy as np
    import optuna
    from optuna.distributions import FloatDistribution

    from evomerge.config import GpConfig
    from evomerge.search.samplers import make_gp

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {f"w/m{i % 3}/{i // 3}": FloatDistribution(0.0, 1.0) for i in range(dim)}
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        study = optuna.create_study(sampler=make_gp(GpConfig(name="gp"), space),
                                    direction="maximize")
        for _ in range(n):
            params = {k: float(rng.uniform()) for k in space}
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions=space,
                value=-sum((v - 0.3) ** 2 for v in params.values())))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            trial = study.ask(space)
            times.append(time.perf_counter() - t0)
            study.tell(trial, -sum((v - 0.3) ** 2 for v in trial.params.values()))
        rows.append({"trials": n, "params": dim, "ms_per_ask": 1000 * statistics.median(times),
                     "ms_min": 1000 * min(times), "ms_max": 1000 * max(times)})
        print(rows[-1], file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", type=Path, default=Path("/tmp/toy_small"))
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_c2f"))
    p.add_argument("--evals", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--limit", type=int, default=64, help="validation examples per task")
    p.add_argument("--every", type=int, default=32, help="held-out scoring interval")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--coarse", type=int, default=24, help="coarse trials")
    p.add_argument("--ada-steps", type=int, default=200)
    p.add_argument("--methods", nargs="+", help="only these labels")
    p.add_argument("--gp-asks", action="store_true", help="time GP asks only")
    p.add_argument("--name", default="coarse_to_fine")
    args = p.parse_args(argv)
    info = machine()
    if args.gp_asks:
        rows = gp_asks()
        print(format_table(rows, ["trials", "params", "ms_per_ask", "ms_min", "ms_max"]))
        write_json(f"{args.name}_gp_asks", settings=vars(args) | {"suite": str(args.suite),
                   "work": str(args.work)}, info=info, results=rows)
        return 0
    import ray
    import torch

    from bench.search_quality import HeldOut, summarize

    torch.set_num_threads(1)
    args.suite = ensure_suite(args.suite)
    args.work.mkdir(parents=True, exist_ok=True)
    held = HeldOut(args.suite)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    for attempt in range(3):  # a loaded machine can time the local node's startup out
        try:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            break
        except Exception as err:  # ray raises a bare Exception here
            if attempt == 2 or "timed out" not in str(err):
                raise
            time.sleep(30)
    runs = []
    for label, spec in methods(args).items():
        if args.methods and label not in args.methods:
            continue
        for seed in args.seeds:
            runs.append(run(label, spec, seed, args, held))
            r = runs[-1]
            print(f"{label} seed {seed}: best {r['final_fitness']:.4f} test {r['final_test']:.4f}"
                  f" to95 {r['evals_to_95']} {r['seconds']:.0f} s start {r['start_s']}",
                  file=sys.stderr, flush=True)
            settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            write_json(args.name, settings=settings, info=info,
                       results={"summary": summarize(runs), "runs": runs})
    ray.shutdown()
    rows = summarize(runs)
    for row in rows:
        row["start_s"] = _mean_of([r["start_s"] for r in runs if r["method"] == row["method"]])
    print(format_table(rows, ["method", "seeds", "evals", "fitness", "fitness_sd", "test",
                              "test_sd", "evals_to_95", "seconds", "start_s"]))
    print(json.dumps({"loadavg_end": os.getloadavg()}))
    return 0


def _mean_of(xs: list[Any]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.mean(vals) if vals else None


if __name__ == "__main__":
    raise SystemExit(main())
