"""Driver overhead: trials/s the real search driver sustains with many simulated workers.

``evomerge.search.driver.run_search`` runs unchanged with ``worker_class=SleepWorker``: real Ray
actors (``resources.num_cpus`` tiny) whose ``evaluate`` sleeps a fixed time and returns a
deterministic metric computed from the recipe. Ideal throughput is ``workers / sleep_s`` trials/s;
overhead is ``1 - measured / ideal``. *Sustained* counts the trials completed from the first end
after generation 1 to the first end of the last generation, a whole number of generations (pipeline
full; unbiased when the workers finish in step); *end to end* runs from the first trial's start to
the last trial's end (baselines, ramp-up and ramp-down included; actor start-up not).

*Before* (``--modes before``) drives the study in the storage itself, as the driver did before
the in-memory study (:mod:`evomerge.search.mirror`); *after* is today's driver. The driver's CPU
per trial counts this process (Ray's threads and the mirror's writer included) from the first
trial's start to the last one's end; ``driver_cpu_all`` also counts the start-up.

    python bench/driver_overhead.py --modes before after --storages journal sqlite postgres
    python bench/driver_overhead.py --workers 128 --storages journal --modes before after \
        --cost-trials 0 --generations 3 --out driver_overhead_128   # ~9 GB, minutes to start
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import storage_cost  # noqa: E402
from bench.common import format_table, machine, new_figure, save_figure, write_json  # noqa: E402
from bench.profile_driver import PySpy  # noqa: E402

NAME = "driver_overhead"
METRIC = "entropy/tiny"
COLUMNS = ["mode", "storage", "sampler", "workers", "trials", "ideal_per_s", "sustained_per_s",
           "overhead_pct", "e2e_per_s", "e2e_overhead_pct", "driver_cpu_ms_per_trial",
           "driver_cpu_all_ms_per_trial", "load1", "start_s", "workers_uss_gb"]


def sleep_worker_class(sleep_s: float) -> type:
    """A class with :class:`evomerge.search.worker.MergeWorker`'s methods that only sleeps."""

    class SleepWorker:
        def __init__(self, job_json: str) -> None:
            self.sleep_s = sleep_s

        def ping(self) -> dict[str, Any]:
            return {"pid": os.getpid(), "load_s": 0.0}

        def evaluate(self, recipe_json: str, fraction: float = 1.0) -> dict[str, Any]:
            time.sleep(self.sleep_s)
            return {"metrics": {METRIC: score(recipe_json)}, "merge_s": 0.0,
                    "eval_s": self.sleep_s, "pid": os.getpid()}

        def evaluate_held_out(self, recipe_json: str) -> dict[str, Any]:
            return self.evaluate(recipe_json)

    return SleepWorker


def score(recipe_json: str) -> float:
    """Deterministic: mean squared distance of the recipe's coefficients from 0.4."""
    values: list[float] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, float):
            values.append(x)

    walk(json.loads(recipe_json).get("models", {}))
    return sum((v - 0.4) ** 2 for v in values) / max(1, len(values))


def make_job(root: Path, *, name: str, workers: int, trials: int, sampler: str,
             experts: int, groups: int) -> Any:
    from evomerge.config import JobConfig

    data = root / "tiny.jsonl"
    if not data.exists():
        data.write_text('{"prompt": "abc"}\n')
    folders = {n: placeholder_model(root / "models" / n, groups)
               for n in ["base", *(f"x{i}" for i in range(experts))]}
    return JobConfig.model_validate({
        "name": name, "run_dir": str(root / name),
        "models": {"base": {"path": folders["base"]},
                   "experts": {f"x{i}": {"path": folders[f"x{i}"]} for i in range(experts)}},
        "search": {"space": {"name": "parameter", "method": "task_arithmetic",
                             "layer_groups": groups},
                   "sampler": {"name": sampler}, "trials": trials, "held_out_top_k": 0},
        "evaluators": [{"name": "entropy", "data": str(data)}],
        "objectives": [{"metric": METRIC, "direction": "minimize"}],
        "resources": {"workers": workers, "num_cpus": 0.01},
    })


def placeholder_model(folder: Path, layers: int) -> str:
    """A model folder the job's checks accept (config, tokenizer file, one safetensors tensor)
    and the sleep workers never load."""
    if not (folder / "config.json").exists():
        import numpy as np
        from safetensors.numpy import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({"model.layers.0.mlp.down_proj.weight": np.zeros((2, 2), np.float32)},
                  str(folder / "model.safetensors"))
        (folder / "tokenizer_config.json").write_text("{}")
        (folder / "config.json").write_text(json.dumps({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "num_hidden_layers": layers}))
    return str(folder)


class ActorMemory:
    """Once all ``workers`` ray::SleepWorker processes exist, sum their RSS and USS (USS counts
    only pages private to the process), and the rise of system memory in use.

    Runs in a separate, niced process: its /proc scans (~1 s for 128 actors) must not take the
    driver's GIL, or they show up as driver overhead (they did: a third of its samples).
    """

    def __init__(self, workers: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.queue: Any = ctx.Queue()
        self.stop = ctx.Event()
        self.proc = ctx.Process(target=measure_actors, args=(workers, self.stop, self.queue),
                                daemon=True)
        self.result: dict[str, Any] = {}

    def start(self) -> None:
        self.proc.start()

    def finish(self) -> None:
        self.stop.set()
        try:
            self.result = self.queue.get(timeout=60)
        finally:
            self.proc.join(timeout=10)


def measure_actors(workers: int, stop: Any, queue: Any) -> None:
    import psutil

    os.nice(19)
    base_used = psutil.virtual_memory().used
    result: dict[str, Any] = {}
    while not stop.wait(2.0):
        actors = [p for p in psutil.process_iter(["cmdline"])
                  if (p.info["cmdline"] or [""])[0].startswith("ray::SleepWorker")]
        if len(actors) < workers:
            continue
        rss = uss = 0
        for p in actors:
            try:
                info = p.memory_full_info()
            except psutil.Error:
                continue
            rss, uss = rss + info.rss, uss + info.uss
        used = psutil.virtual_memory().used - base_used
        result = {"actors_seen": len(actors), "workers_rss_gb": rss / 2**30,
                  "workers_uss_gb": uss / 2**30, "mem_used_gb": used / 2**30,
                  "uss_mb_per_actor": uss / 2**20 / len(actors)}
        break
    queue.put(result)


def rates(study: Any, workers: int, sleep_s: float) -> dict[str, float]:
    """Sustained and end-to-end trials/s from the stored trial timestamps."""
    trials = [t for t in study.trials if t.datetime_complete is not None]
    ends = sorted(t.datetime_complete.timestamp() for t in trials)
    start = min(t.datetime_start.timestamp() for t in trials)
    n = len(ends)
    # from the first end after generation 1 to the first end of the last generation, a whole
    # number of generations apart: unbiased when workers finish in step (bursts)
    lo, periods = workers, (n - 2 * workers) // workers
    hi = lo + periods * workers
    ideal = workers / sleep_s
    out = {"trials": n, "ideal_per_s": ideal, "e2e_per_s": n / (ends[-1] - start)}
    steady = periods >= 1 and ends[hi] > ends[lo]  # else too few trials for a steady window
    out["sustained_per_s"] = (hi - lo) / (ends[hi] - ends[lo]) if steady else out["e2e_per_s"]
    out["overhead_pct"] = 100 * (1 - out["sustained_per_s"] / ideal)
    out["e2e_overhead_pct"] = 100 * (1 - out["e2e_per_s"] / ideal)
    out["loop_s"] = ends[-1] - start
    out["window"] = (start, ends[-1])
    return out


class CpuClock:
    """This process's CPU time (all its threads, Ray's included) sampled every 50 ms, so the
    CPU spent between two wall-clock moments (the search loop's first start and last end) can
    be read off afterwards."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append((time.time(), time.process_time()))

    def __enter__(self) -> CpuClock:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> float:
        inside = [cpu for wall, cpu in self.samples if start <= wall <= end]
        return inside[-1] - inside[0] if len(inside) > 1 else float("nan")


def run_one(args: argparse.Namespace, root: Path, storage: str, sampler: str, workers: int,
            profile: bool = False, mode: str = "after") -> dict[str, Any]:
    from evomerge.search.driver import run_search

    name = f"ovh-{mode}-{storage}-{sampler}-{workers}"
    trials = max(args.generations * workers, args.min_trials)
    job = make_job(root, name=name, workers=workers, trials=trials, sampler=sampler,
                   experts=args.experts, groups=args.groups)
    url = {"sqlite": f"sqlite:///{root / name}.db", "postgres": args.postgres_url}.get(storage)
    mem = ActorMemory(workers)
    mem.start()
    spy = PySpy(root / f"{name}.raw", rate=args.profile_rate) if profile else None
    t0, cpu0 = time.perf_counter(), time.process_time()
    with spy or nullcontext(), blas_limit(args.blas_threads), CpuClock() as clock:
        study = run_search(job, storage_url=url, progress=False, mirror=mode == "after",
                           worker_class=sleep_worker_class(args.sleep))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    mem.finish()
    row: dict[str, Any] = {"mode": mode, "storage": storage, "sampler": sampler,
                           "workers": workers, "load1": os.getloadavg()[0]}
    row.update(rates(study, workers, args.sleep))
    row["start_s"] = wall - row["loop_s"]  # ray actors + study creation + held-out phase
    # the driver's own CPU in the search loop (first trial start to last end), all threads
    row["driver_cpu_ms_per_trial"] = 1000 * clock.between(*row.pop("window")) / row["trials"]
    row["driver_cpu_all_ms_per_trial"] = 1000 * cpu / row["trials"]  # start-up included
    row.update(mem.result)
    if spy is not None:
        row["profile"] = spy.summary()
    return row


def blas_limit(threads: int | None) -> Any:
    """Limit numpy's BLAS threads in the driver (CMA-ES runs eigh per ask), or do nothing."""
    if threads is None:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[8, 32])
    p.add_argument("--storages", nargs="+", default=["journal", "sqlite"],
                   choices=["journal", "sqlite", "postgres"])
    p.add_argument("--modes", nargs="+", default=["after"], choices=["before", "after"],
                   help="after: the in-memory study mirrored to storage, trials asked ahead; "
                        "before: every ask/tell a storage write (run_search(mirror=False))")
    p.add_argument("--postgres-url", help="for --storages postgres; default: a throwaway "
                   "server on 127.0.0.1 (Debian's postgresql, as the tests start it)")
    p.add_argument("--samplers", nargs="+", default=["cmaes", "random"])
    p.add_argument("--sleep", type=float, default=1.0, help="seconds per simulated evaluation")
    p.add_argument("--generations", type=int, default=4, help="trials = generations * workers")
    p.add_argument("--min-trials", type=int, default=32)
    p.add_argument("--sqlite-max-workers", type=int, default=32,
                   help="skip SQLite runs above this many workers (it caps at ~2 trials/s here)")
    p.add_argument("--blas-threads", type=int, help="threadpoolctl limit in the driver")
    p.add_argument("--cost-trials", type=int, default=30,
                   help="trials of the Ray-free storage micro-benchmark (0: skip)")
    p.add_argument("--out", default=NAME, help="name of the JSON/PNG in bench/results")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--groups", type=int, default=8, help="layer groups: experts*groups params")
    p.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--address", help="join a running Ray cluster (e.g. auto) instead of starting "
                   "one: the actors then live on that cluster's nodes, off the driver's cores")
    p.add_argument("--driver-cpus", type=int, nargs="+",
                   help="pin the driver process to these CPU cores (os.sched_setaffinity)")
    p.add_argument("--profile", action="store_true", help="py-spy the driver in every run")
    p.add_argument("--profile-rate", type=int, default=50, help="py-spy samples per second")
    return p.parse_args(argv)


def pin_process(cpus: set[int]) -> None:
    """Pin every thread of this process (Ray's included) and the threads it starts later."""
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except OSError:  # a thread that ended meanwhile
            pass


def main(argv: list[str] | None = None) -> None:
    import ray

    args = parse_args(argv)
    info = machine()
    costs = []
    if args.cost_trials:
        with blas_limit(args.blas_threads):
            costs = storage_cost.run(args.cost_trials, args.experts * args.groups,
                                     ["journal", "journal-mirrored", "sqlite",
                                      "sqlite-mirrored", "memory"], args.samplers)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if args.address:
        ray.init(address=args.address, log_to_driver=False, configure_logging=False)
    else:
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, object_store_memory=256 * 2**20)
    rows = []
    server = None
    if "postgres" in args.storages and not args.postgres_url:
        from tests.pg_fixtures import PostgresServer

        server = PostgresServer()
        args.postgres_url = server.url
    if args.driver_cpus:
        pin_process(set(args.driver_cpus))
    try:
        with tempfile.TemporaryDirectory(prefix="evomerge_ovh_") as tmp:
            for workers in args.workers:
                for storage in args.storages:
                    if storage == "sqlite" and workers > args.sqlite_max_workers:
                        continue
                    for sampler in args.samplers:
                        for mode in args.modes:
                            row = run_one(args, Path(tmp), storage, sampler, workers,
                                          args.profile, mode)
                            print(format_table([row], COLUMNS), flush=True)
                            rows.append(row)
    finally:
        ray.shutdown()
        if server is not None:
            server.remove()
    print(format_table(rows, COLUMNS))
    settings = {**vars(args), "space": f"task_arithmetic, {args.experts} experts x "
                f"{args.groups} layer groups = {args.experts * args.groups} parameters",
                "ideal": "workers / sleep trials/s",
                "memory": "summed RSS and USS (private pages) of the ray::SleepWorker processes "
                          "once all had started; mem_used_gb: rise of system memory in use",
                "storage_cost": "bench/storage_cost.py: the driver's Optuna calls per trial, "
                                "no Ray (ask = one storage write per parameter)"}
    if costs:
        print(format_table(costs, storage_cost.COLUMNS))
    results = {"runs": rows, "storage_cost_per_trial": costs}
    print("wrote", write_json(args.out, settings=settings, results=results, info=info))
    print("wrote", plot(rows, args))


def plot(rows: list[dict[str, Any]], args: argparse.Namespace) -> Path:
    fig, (ax1, ax2) = new_figure(2)
    for storage, sampler, mode in itertools.product(args.storages, args.samplers, args.modes):
        sel = [r for r in rows if (r["storage"], r["sampler"], r["mode"])
               == (storage, sampler, mode)]
        if not sel:
            continue
        ws = [r["workers"] for r in sel]
        label = f"{storage} / {sampler} ({mode})"
        ax1.plot(ws, [r["sustained_per_s"] for r in sel], marker="o", label=label)
        ax2.plot(ws, [r["overhead_pct"] for r in sel], marker="o", label=label)
    ws = sorted({r["workers"] for r in rows})
    ax1.plot(ws, [w / args.sleep for w in ws], ls=":", color="grey", label="ideal")
    ax2.axhline(2.0, ls=":", color="grey", label="2% target")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xticks(ws, [str(w) for w in ws])
        ax.minorticks_off()
    ax1.set(xlabel="workers", ylabel="trials/s (sustained)", yscale="log")
    ax2.set(xlabel="workers", ylabel="overhead % of ideal")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    return save_figure(fig, args.out, subtitle=f"{args.sleep:g} s simulated evaluations")


if __name__ == "__main__":
    main()
