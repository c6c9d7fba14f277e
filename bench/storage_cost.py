"""Per-trial cost of the Optuna storage calls the search driver makes, without Ray.

For each trial the driver (``evomerge.search.loop.Loop``) calls ``study.ask(distributions)`` (one
``set_trial_param`` write per parameter), ``trial.set_user_attr("recipe")``, then on the result
``set_user_attr("metrics")``, ``set_user_attr("timing")`` and ``study.tell`` (the progress bar
reads nothing back). This times exactly that sequence per storage and sampler, with BLAS on one
thread as in the driver.

``journal-mirrored`` / ``sqlite-mirrored``: the driver's in-memory study
(:mod:`evomerge.search.mirror`), whose writer thread copies each finished trial to the storage;
only the driver thread's time is counted (the writer's runs alongside, off the critical path).

    python bench/storage_cost.py --trials 200
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402
from optuna.distributions import BaseDistribution, FloatDistribution  # noqa: E402

from bench.common import format_table  # noqa: E402
from evomerge.search.storage import close_storage  # noqa: E402

PHASES = ("ask", "recipe_attr", "result_attrs", "tell")
COLUMNS = ["storage", "sampler", "params", "trials", "ms_per_trial", *(f"{p}_ms" for p in PHASES)]


def storages(root: Path) -> dict[str, Callable[[str], Any]]:
    """name -> factory(study name): the driver's journal writer (with and without fsync),
    optuna's own locking journal backend (what the driver used before), SQLite, memory."""
    from optuna.storages.journal import JournalFileBackend

    from evomerge.search.storage import open_storage

    return {
        "journal": lambda name: open_storage(f"journal:{root / name}.journal", root, writer=True),
        "journal-fsync": lambda name: open_storage(f"journal:{root / name}.journal", root,
                                                   writer=True, fsync=True),
        "journal-optuna": lambda name: optuna.storages.JournalStorage(
            JournalFileBackend(str(root / f"{name}.journal"))),
        "sqlite": lambda name: open_storage(f"sqlite:///{root / name}.db", root),
        "memory": lambda name: optuna.storages.InMemoryStorage(),
        "journal-mirrored": lambda name: mirrored(
            open_storage(f"journal:{root / name}.journal", root, writer=True), name),
        "sqlite-mirrored": lambda name: mirrored(
            open_storage(f"sqlite:///{root / name}.db", root), name),
    }


def mirrored(target: Any, name: str) -> Any:
    """The driver's in-memory study over ``target`` (its writer thread runs alongside)."""
    from evomerge.search.mirror import MirroredStorage

    study = f"cost-{name.rsplit('-', 1)[1]}"  # the study per_trial_cost creates
    optuna.create_study(storage=target, study_name=study, direction="minimize")
    return MirroredStorage(target, study)


def sampler_for(name: str, seed: int = 0) -> optuna.samplers.BaseSampler:
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=0,
                                            warn_independent_sampling=False)
    return optuna.samplers.RandomSampler(seed=seed)


def per_trial_cost(storage: Any, *, sampler: str, trials: int, params: int,
                   batch: int = 8) -> dict[str, float]:
    """Mean milliseconds per trial of each driver phase; trials are asked ``batch`` at a time
    (as the driver does with idle workers) and told in order."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, sampler=sampler_for(sampler),
                                direction="minimize", study_name=f"cost-{sampler}",
                                load_if_exists=True)  # a mirrored storage holds it already
    dists: dict[str, BaseDistribution] = {
        f"w/x{i % 4}/{i // 4}": FloatDistribution(0.0, 1.0) for i in range(params)
    }
    spent = dict.fromkeys(PHASES, 0.0)
    done = 0
    while done < trials:
        asked = []
        for _ in range(min(batch, trials - done)):
            t0 = time.perf_counter()
            trial = study.ask(dists)
            t1 = time.perf_counter()
            trial.set_user_attr("recipe", {"models": dict(trial.params), "method": "ties"})
            spent["ask"] += t1 - t0
            spent["recipe_attr"] += time.perf_counter() - t1
            asked.append(trial)
        for trial in asked:
            value = sum((v - 0.4) ** 2 for v in trial.params.values())
            t0 = time.perf_counter()
            trial.set_user_attr("metrics", {"entropy/tiny": value})
            trial.set_user_attr("timing", {"merge_s": 0.0, "eval_s": 1.0, "wall_s": 1.0})
            t1 = time.perf_counter()
            study.tell(trial, [value])
            spent["result_attrs"] += t1 - t0
            spent["tell"] += time.perf_counter() - t1
            done += 1
    out = {f"{p}_ms": 1000 * s / trials for p, s in spent.items()}
    out["ms_per_trial"] = sum(out.values())
    return out


def run(trials: int, params: int, names: list[str], samplers: list[str],
        extra: dict[str, Callable[[str], Any]] | None = None) -> list[dict[str, Any]]:
    from threadpoolctl import threadpool_limits

    rows = []
    if "cmaes" in samplers:
        import cmaes  # noqa: F401 - a one-time import (~3 s with scipy here), not a trial cost
    with tempfile.TemporaryDirectory(prefix="evomerge_cost_") as tmp, threadpool_limits(1):
        factories = {**storages(Path(tmp)), **(extra or {})}
        for name in names:
            for sampler in samplers:
                storage = factories[name](f"{name}-{sampler}")
                row: dict[str, Any] = {"storage": name, "sampler": sampler, "params": params,
                                       "trials": trials}
                row.update(per_trial_cost(storage, sampler=sampler, trials=trials,
                                          params=params))
                close_storage(storage)
                print(format_table([row], COLUMNS), flush=True)
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--params", type=int, default=32)
    p.add_argument("--storages", nargs="+", default=["journal", "journal-fsync",
                                                      "journal-optuna", "sqlite", "memory",
                                                      "journal-mirrored", "sqlite-mirrored"])
    p.add_argument("--samplers", nargs="+", default=["random", "cmaes"])
    args = p.parse_args(argv)
    rows = run(args.trials, args.params, args.storages, args.samplers)
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
