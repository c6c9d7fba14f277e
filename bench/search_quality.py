"""Search quality: best validation fitness and held-out (test) accuracy vs evaluations.

On the small toy suite (base + shift/rot13/mirror experts; fitness = mean exact match on
``--limit`` validation examples per task, held-out = the full test splits), over ``--seeds``:

- CMA-ES on per-model TIES coefficients (1 layer group) and per-layer ones (every layer);
  optional (``--methods "cmaes per-layer TA"``): CMA-ES on per-layer task-arithmetic weights;
  optional: CMA-ES on per-layer DELLA coefficients (``cmaes per-layer della``; dare_ties where
  della is not registered) and on TIES coefficients as a ``linear`` layer schedule (LiNeS:
  2 parameters per model and parameter instead of one per layer; ``cmaes linear TIES``);
- NSGA-II and random search on the per-layer space; every search starts with evomerge's baselines;
- grid-searched task arithmetic (shared lambda, 11 points) and TIES (shared weight = lambda with
  ``normalize: false``, and density; 5 x 5) -- ``per_model: false``, ``grid`` sampler;
- layer-wise AdaMerging (``evomerge.search.adamerging.run_adamerging``): one point, 1 evaluation;
- mergekit-evolve 0.1.5 (CMA-ES, per-layer TIES, lm-eval fitness) through the CPU shim, its
  per-candidate scores logged by ``bench/peer/evolve_logged.py``; its incumbents are merged with
  mergekit and scored on the same test splits.

The held-out curve scores the incumbent (best fitness so far) at every ``--every`` evaluations.
Cost is counted in evaluations and in examples scored (``evomerge.runs.cost``: every rung of
every trial, pruned and failed ones included; the peer: ``--limit`` x tasks per candidate); the
table gives both to reach 95 % of the final best, and the figure plots against both.

    python bench/search_quality.py            # 40 evaluations x 3 seeds, ~20 min on 2 cores
    python bench/search_quality.py --quick    # 16 evaluations x 2 seeds, no peer
    python bench/search_quality.py --rows dfs # DFS alone and PS then DFS (40 + 40) next to PS
                                              # alone, uniform TA and the experts, ~6 min
    python bench/search_quality.py --methods "cmaes per-layer" "cmaes per-layer della" \
        "cmaes linear TIES" --skip-peer --name search_quality_kinds_schedules \
        --compare search_quality       # the issue-12 rows, next to the earlier ones
    python bench/search_quality.py --methods "cmaes per-layer" --fidelity 0.25 1.0 \
        --skip-peer --name search_quality_fidelity   # successive halving on 25 % first
    python bench/search_quality.py --rows cost --reuse   # issue 18: samplers, starts and
        # fidelity on the per-layer TA space next to the peer, the table in examples scored
    python bench/search_quality.py --rows cost --merge A B   # one table from results/A, B.json
    python bench/search_quality.py --rows cost --methods "gp per-layer TA random subset up front" \
        --skip-peer --reuse --confirm 3 5   # subset rows: the top k re-scored in full, after
    python bench/search_quality.py --rows cost --skip-peer \
        --methods "gp per-layer TA random subset up front confirm 3"   # the option itself: the
        # fitness and held-out of its pick, the examples with the 3 confirmations
    python bench/search_quality.py --rows cost --methods mergekit-evolve --seeds 1 \
        --peer-first-seed 2 --peer-seeds 1 --peer-timeout 3600   # the peer's seed 2 alone
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench import mergekit_evolve as peer  # noqa: E402
from bench.candidate_throughput import ensure_suite, num_layers, suite_tasks, toy_job  # noqa: E402
from bench.common import (  # noqa: E402
    format_table,
    machine,
    markdown_table,
    new_figure,
    save_figure,
    write_json,
)


def searches(layers: int) -> dict[str, dict[str, Any]]:
    """label -> (space, sampler maker, seeded, baselines) of each evomerge search."""
    per_layer = {"name": "parameter", "method": "ties", "per_model": True, "layer_groups": layers}
    per_model = {**per_layer, "layer_groups": 1}
    ta = {"name": "parameter", "method": "task_arithmetic", "per_model": False}
    ties = {"name": "parameter", "method": "ties", "per_model": False,
            "fixed": {"normalize": False}, "bounds": {"weight": {"low": 0.1, "high": 1.3}}}
    cma = {"name": "cmaes", "popsize": 8, "sigma0": 0.25, "start": "uniform"}
    from evomerge.merge.methods_spec import METHODS

    della = "della" if "della" in METHODS else "dare_ties"
    linear = {**per_model, "schedule": {"kind": "linear"}}
    return {
        "cmaes per-model": {"space": per_model, "sampler": cma, "seeded": True},
        "cmaes per-layer": {"space": per_layer, "sampler": cma, "seeded": True},
        "cmaes per-layer TA": {"space": {**per_layer, "method": "task_arithmetic"},
                               "sampler": cma, "seeded": True, "optional": True},
        "cmaes per-layer della": {"space": {**per_layer, "method": della}, "sampler": cma,
                                  "seeded": True, "optional": True},
        "cmaes linear TIES": {"space": linear, "sampler": cma, "seeded": True,
                              "optional": True},
        "nsga2 per-layer": {"space": per_layer, "seeded": True,
                            "sampler": {"name": "nsga2", "population_size": 8}},
        "random per-layer": {"space": per_layer, "sampler": {"name": "random"}, "seeded": True},
        "grid TA": {"space": ta, "sampler": {"name": "grid", "points": 11}, "trials": 11,
                    "seeded": False, "baselines": False},
        "grid TIES": {"space": ties, "sampler": {"name": "grid", "points": 5}, "trials": 25,
                      "seeded": False, "baselines": False},
        **dfs_searches(per_model, cma),
        **cost_searches({**per_layer, "method": "task_arithmetic"}, cma),
        **lever_searches({**per_layer, "method": "task_arithmetic"}),
    }


# -- cost rows (--rows cost, issue 18): samplers and fidelity on the per-layer TA space -------
COST_ROWS = ("cmaes per-layer TA", "cmaes per-layer TA sh 0.25", "cmaes per-layer TA auto",
             "cmaes per-layer TA center", "tpe per-layer TA", "random per-layer TA",
             "gp per-layer TA", "cmaes per-layer TA anchors subset",
             "cmaes per-layer TA random subset", "cmaes per-layer TA coarse",
             "cmaes per-layer TA adamerging", "cmaes per-layer TA random subset up front",
             "cmaes per-layer TA random subset 8 up front",
             "gp per-layer TA random subset up front",
             "gp per-layer TA random subset up front confirm 3", "mergekit-evolve")
AUTO = {"mode": "auto", "fractions": [0.1, 0.25, 0.5, 1.0]}  # the README's example


def cost_searches(ta: dict[str, Any], cma: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue-18 rows: one space (per-layer task arithmetic), one sampler or fidelity
    setting changed per row. ``new``: an option that may not exist yet (the row is skipped
    with a note when ``parse_job`` refuses it or the search fails)."""
    fine = {k: v for k, v in cma.items() if k != "sigma0"}  # coarse: fine sigma0 = half
    sh = {"fractions": [0.25, 1.0]}
    rows: dict[str, dict[str, Any]] = {
        "cmaes per-layer TA sh 0.25": {"sampler": cma, "fidelity": sh},
        "cmaes per-layer TA auto": {"sampler": cma, "fidelity": AUTO},
        "cmaes per-layer TA center": {"sampler": {**cma, "start": "center"}},
        "tpe per-layer TA": {"sampler": {"name": "tpe"}},
        "random per-layer TA": {"sampler": {"name": "random"}},
        "gp per-layer TA": {"sampler": {"name": "gp"}, "new": True},
        "cmaes per-layer TA anchors subset": {"sampler": cma, "new": True, "fidelity": {
            "subset": {"method": "anchors", "size": 16, "warmup": 8}}},  # 16 of 64 per task
        "cmaes per-layer TA random subset": {"sampler": cma, "new": True, "fidelity": {
            "subset": {"method": "random", "size": 16, "warmup": 8}}},
        # warmup 0: the subset drawn before the first trial, the baselines scored on it too
        "cmaes per-layer TA random subset up front": {"sampler": cma, "new": True, "fidelity": {
            "subset": {"method": "random", "size": 16, "warmup": 0}}},
        "cmaes per-layer TA random subset 8 up front": {"sampler": cma, "new": True, "fidelity": {
            "subset": {"method": "random", "size": 8, "warmup": 0}}},
        "gp per-layer TA random subset up front": {"sampler": {"name": "gp"}, "new": True,
                                                   "fidelity": {"subset": {
                                                       "method": "random", "size": 16,
                                                       "warmup": 0}}},
        # the option: the top 3 by estimate re-scored in full after the last trial, the best
        # of those the pick (its fitness is the full score, its examples include the 3)
        "gp per-layer TA random subset up front confirm 3": {
            "sampler": {"name": "gp"}, "new": True, "fidelity": {"subset": {
                "method": "random", "size": 16, "warmup": 0, "confirm": 3}}},
        "cmaes per-layer TA coarse": {"sampler": {**fine, "coarse": {"trials": 16}},
                                      "new": True},
        "cmaes per-layer TA adamerging": {"sampler": {**cma, "start": "adamerging"},
                                          "adamerging": {"granularity": "layer", "steps": 200},
                                          "new": True},
    }
    return {k: {"space": ta, "seeded": True, "optional": True, **v} for k, v in rows.items()}


# -- v4 lever rows (issue 18): subset size, anchors, sampler, space, each with confirm -------
def lever_label(sampler: str, space: str, method: str, size: int, confirm: int,
                warmup: int = 0) -> str:
    """e.g. ``gp per-model TA random subset 8 up front confirm 3``."""
    when = "up front" if warmup == 0 else f"warmup {warmup}"
    return f"{sampler} {space} TA {method} subset {size} {when} confirm {confirm}"


LEVERS = (  # (sampler, space, subset method, size, confirm, warmup)
    ("gp", "per-layer", "random", 8, 3, 0), ("gp", "per-layer", "random", 12, 3, 0),
    ("tpe", "per-layer", "random", 8, 3, 0), ("gp", "per-layer", "anchors", 8, 3, 3),
    ("gp", "per-model", "random", 8, 3, 0), ("gp", "per-model", "random", 16, 3, 0),
    ("gp", "per-model", "random", 8, 1, 0), ("gp", "per-model", "random", 4, 3, 0),
    ("tpe", "per-model", "random", 8, 3, 0), ("gp", "per-model", "anchors", 8, 3, 3),
    ("cmaes", "per-model", "random", 8, 3, 0), ("gp", "linear", "random", 8, 3, 0),
)


def lever_searches(ta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The v4 rows: one ``LEVERS`` combination each (all optional). ``per-model``: one weight
    per model (``layer_groups: 1``); ``linear``: a linear layer schedule (2 per model)."""
    spaces = {"per-layer": ta, "per-model": {**ta, "layer_groups": 1},
              "linear": {**ta, "layer_groups": 1, "schedule": {"kind": "linear"}}}
    samplers = {"gp": {"name": "gp"}, "tpe": {"name": "tpe"},
                "cmaes": {"name": "cmaes", "popsize": 8, "sigma0": 0.25, "start": "uniform"}}
    rows = {}
    for sampler, space, method, size, confirm, warmup in LEVERS:
        rows[lever_label(sampler, space, method, size, confirm, warmup)] = {
            "space": spaces[space], "sampler": samplers[sampler], "seeded": True,
            "optional": True, "new": True, "fidelity": {"subset": {
                "method": method, "size": size, "warmup": warmup, "confirm": confirm}}}
    rows["gp per-model TA"] = {"space": spaces["per-model"], "sampler": samplers["gp"],
                               "seeded": True, "optional": True}
    return rows


# -- DFS rows (--rows dfs): DFS alone and PS then DFS, next to PS alone and the references -----
DFS_ROWS = ("cmaes per-model", "cmaes dfs", "cmaes ps-then-dfs")


def dfs_space(first: str) -> dict[str, Any]:
    """The data-flow space of the bench: model A = ``first``, then the experts (filled in by
    :func:`run_one`), repeated twice, paths of at most 12 layers, A's first/last fixed."""
    return {"name": "dfs", "models": [first], "repeats": 2, "max_path_length": 12,
            "too_long": "truncate", "fix_first": True, "fix_last": True}


def dfs_searches(per_model: dict[str, Any], cma: dict[str, Any]) -> dict[str, dict[str, Any]]:
    dfs_cma = {**cma, "sigma0": 0.15}  # in [0, 1] units: an indicator flips at 1.5 sigma0
    return {
        "cmaes dfs": {"space": dfs_space("base"), "sampler": dfs_cma, "seeded": True,
                      "optional": True},
        "cmaes ps-then-dfs": {"space": per_model, "sampler": cma, "seeded": True,
                              "optional": True,
                              "then": {"space": dfs_space("ps"), "sampler": dfs_cma}},
    }


def with_experts(job: dict[str, Any], spec: dict[str, Any], evals: int) -> dict[str, Any]:
    """A DFS row's job: the experts after model A; PS+DFS runs ``evals`` PS evaluations (the
    same search as ``cmaes per-model`` of that seed), then ``evals`` DFS ones over its winner."""
    experts = list(job["models"]["experts"])
    for block in (job["search"], spec.get("then") or {}):
        space = block.get("space", {})
        if space.get("name") == "dfs":
            space["models"] = space["models"][:1] + experts
    if "then" in spec:
        job["search"]["then"] = {**spec["then"], "trials": evals}
    return job


def phase_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Phase 1 (ps) of a PS+DFS run, as ``read_trials`` rows, completed ones in order."""
    from evomerge.runs.results import open_run

    study, _ = open_run(run_dir, study_name="ps")
    rows = [{"value": t.values[0], "end": t.datetime_complete.timestamp(),
             "start": t.datetime_start.timestamp(), "recipe": t.user_attrs.get("recipe"),
             **t.user_attrs.get("timing", {})}
            for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    return sorted(rows, key=lambda r: r["end"])


def cumulative_examples(run_dir: Path, rows: list[dict[str, Any]], *,
                        study_name: str | None = None) -> tuple[list[int | None], bool]:
    """Examples the search had scored when each row (a completed trial) ended: every trial
    that ended by then counts, pruned and failed ones too, each over all its rungs
    (``evomerge.runs.cost``); and whether they are estimated (no ``scored/`` metrics)."""
    from evomerge.runs.cost import estimators, search_costs
    from evomerge.runs.results import open_run

    study, job = open_run(run_dir, study_name=study_name)
    trials = study.get_trials(deepcopy=False)
    costs = {c.number: c.cost for c in search_costs(trials, job, estimate=estimators(job)[0])}
    ended = sorted((t.datetime_complete.timestamp(), costs[t.number].examples)
                   for t in trials if t.datetime_complete is not None)
    out: list[int | None] = []
    for r in rows:
        xs = [n for end, n in ended if end <= r["end"]]
        out.append(None if any(n is None for n in xs) else sum(n or 0 for n in xs))
    return out, any(c.estimated for c in costs.values())


def candidate_s(rows: list[dict[str, Any]]) -> float | None:
    """Mean merge + evaluation seconds of a candidate (in its worker)."""
    times = [r["merge_s"] + r["eval_s"] for r in rows if "merge_s" in r]
    return statistics.mean(times) if times else None


def reference_scores(held: HeldOut, suite: Path) -> list[dict[str, Any]]:
    """Held-out accuracy of uniform task arithmetic and of each expert alone."""
    from evomerge.recipe import DFSRecipe

    tasks = suite_tasks(suite)
    sources = {"base": str(suite / "base"), **{t: str(suite / "experts" / t) for t in tasks}}
    uniform = {"method": "task_arithmetic", "sources": sources, "base_model": "base",
               "models": {t: {"weight": 1 / len(tasks)} for t in tasks},
               "parameters": {"lambda": 1.0}}
    rows = [{"method": "uniform TA", "test": held.recipe(uniform)}]
    for t in tasks:  # the expert's own path: exactly the expert model
        alone = DFSRecipe(sources={t: sources[t]}, layers=[(t, i) for i in range(
            num_layers(suite))], scales=[1.0] * num_layers(suite), embed_from=t)
        rows.append({"method": f"expert {t}", "test": held.recipe(alone.to_dict())})
    return rows


def run_evomerge(job_dict: dict[str, Any], *, reuse: bool = False) -> list[dict[str, Any]]:
    """Run one search in this process (Ray already started); trials in completion order.

    ``reuse``: read a finished search already in the run folder instead of running it again.
    """
    import shutil

    from bench.candidate_throughput import read_trials
    from evomerge.config import parse_job
    from evomerge.search.driver import run_search

    run_dir = Path(job_dict["run_dir"])
    if reuse and (run_dir / "job.yaml").exists():
        done = read_trials(run_dir)
        rows = [r for r in done if r["state"] == "COMPLETE"]
        finished = [r for r in done if r["state"] in ("COMPLETE", "PRUNED", "FAILED")]
        if rows and len(finished) >= job_dict["search"]["trials"]:  # pruned trials count
            return sorted(rows, key=lambda r: r["end"])
    shutil.rmtree(run_dir, ignore_errors=True)
    _no_grid_stop()
    run_search(parse_job(job_dict), progress=False)
    rows = [r for r in read_trials(run_dir) if r["state"] == "COMPLETE"]
    return sorted(rows, key=lambda r: r["end"])


def _no_grid_stop() -> None:
    """Workaround (evomerge bug, reported): optuna's GridSampler calls ``study.stop()`` in
    ``after_trial`` once the grid is used up, which raises outside ``study.optimize``; the
    driver's budget (``trials`` = grid size here) ends the search instead."""
    import optuna

    optuna.samplers.GridSampler.after_trial = lambda *a, **k: None  # type: ignore[method-assign]


def incumbents(values: list[float], every: int) -> list[tuple[int, int]]:
    """(evaluations so far, index of the best so far) at every ``every`` and at the end."""
    marks = sorted({*range(every, len(values) + 1, every), len(values)})
    return [(m, max(range(m), key=lambda i: (values[i], -i))) for m in marks if m > 0]


def curve(values: list[float]) -> list[float]:
    out, best = [], float("-inf")
    for v in values:
        best = max(best, v)
        out.append(best)
    return out


def evals_to(values: list[float], level: float) -> int | None:
    """Evaluations until the best so far reaches ``level`` (None if never)."""
    for i, v in enumerate(curve(values)):
        if v >= level - 1e-12:
            return i + 1
    return None


class HeldOut:
    """Scores recipes (or mergekit configs) on the test splits; cached by content."""

    def __init__(self, suite: Path) -> None:
        from evomerge.config import AccuracyEvalConfig, LoadConfig
        from evomerge.evaluators.base import build_evaluator
        from evomerge.merge.workspace import Workspace

        self.suite = suite
        tasks = suite_tasks(suite)
        sources = {"base": str(suite / "base"), **{t: str(suite / "experts" / t) for t in tasks}}
        self.ws = Workspace(sources, "base", load=LoadConfig())
        self.evals = [build_evaluator(AccuracyEvalConfig(
            name="accuracy", data=str(suite / "data" / t), batch_size=64), split="test")
            for t in tasks]
        self.cache: dict[str, float] = {}

    def fitness(self, recipe: dict[str, Any], limit: int) -> float:
        """The recipe's full fitness: mean exact match on the first ``limit`` validation
        examples per task (what a search's trial scores without a subset)."""
        from evomerge.config import AccuracyEvalConfig
        from evomerge.evaluators.base import build_evaluator
        from evomerge.recipe import Recipe

        if "val_evals" not in self.__dict__:
            self.val_evals = [build_evaluator(AccuracyEvalConfig(
                name="accuracy", data=str(self.suite / "data" / t), split="validation",
                limit=limit, batch_size=64)) for t in suite_tasks(self.suite)]
        key = "val:" + json.dumps(recipe, sort_keys=True)
        if key not in self.cache:
            model = self.ws.apply(Recipe.from_dict(recipe))
            vals = [v for ev in self.val_evals for k, v in ev.evaluate(
                model, self.ws.tokenizer).items() if not k.startswith("scored/")]
            self.cache[key] = sum(vals) / len(vals)
        return self.cache[key]

    def _score(self, model: Any, tok: Any) -> float:
        vals = [v for ev in self.evals for k, v in ev.evaluate(model, tok).items()
                if not k.startswith("scored/")]  # the cost counts are no score
        return sum(vals) / len(vals)

    def recipe(self, recipe: dict[str, Any]) -> float:
        key = json.dumps(recipe, sort_keys=True)
        if key not in self.cache:
            from evomerge.recipe import Recipe

            parsed = Recipe.from_dict(recipe)
            if parsed.kind == "dfs":  # a DFS path: its own engine (sources loaded once)
                from evomerge.engines import engine_for

                engines = self.__dict__.setdefault("dfs_engines", {})
                used = {parsed.embed_from, *(n for n, _ in parsed.layers)}  # what it loads
                sources = json.dumps({n: recipe["sources"][n] for n in sorted(used)})
                if sources not in engines:
                    engines[sources] = engine_for(parsed)
                self.cache[key] = self._score(*engines[sources].apply(parsed))
                return self.cache[key]
            model = self.ws.apply(parsed)
            self.cache[key] = self._score(model, self.ws.tokenizer)
        return self.cache[key]

    def mergekit(self, config_yaml: str) -> float:
        if config_yaml not in self.cache:
            import yaml
            from mergekit.config import MergeConfiguration
            from mergekit.merge import run_merge
            from mergekit.options import MergeOptions
            from transformers import AutoModelForCausalLM

            cfg = MergeConfiguration.model_validate(yaml.safe_load(config_yaml))
            with tempfile.TemporaryDirectory() as out:
                run_merge(cfg, out, options=MergeOptions(copy_tokenizer=False, quiet=True))
                model = AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
            self.cache[config_yaml] = self._score(model, self.ws.tokenizer)
        return self.cache[config_yaml]


def record(method: str, seed: int, values: list[float], tests: list[tuple[int, float]],
           seconds: float, examples: list[int | None] | None = None) -> dict[str, Any]:
    """One search's curve; ``examples[i]``: examples scored when value ``i`` came in."""
    final = max(values)
    to_95 = evals_to(values, 0.95 * final)
    return {"method": method, "seed": seed, "fitness": values, "held_out": tests,
            "evals": len(values), "final_fitness": final, "final_test": tests[-1][1],
            "evals_to_95": to_95, "seconds": seconds, "examples": examples,
            "examples_to_95": examples_at(examples, to_95),
            "final_examples": examples[-1] if examples else None}


def examples_at(examples: list[int | None] | None, evals: int | None) -> int | None:
    """Examples scored by the ``evals``-th evaluation (1-based)."""
    if not examples or evals is None:
        return None
    return examples[evals - 1]


def unavailable(job: dict[str, Any]) -> str | None:
    """Why ``parse_job`` refuses the job (an option not there yet), or None."""
    from evomerge.config import parse_job

    try:
        parse_job(copy.deepcopy(job))
    except Exception as err:  # pydantic's ValidationError or evomerge's KeyedValueError
        return str(err).splitlines()[0][:200]
    return None


def run_one(label: str, spec: dict[str, Any], seed: int, args: argparse.Namespace,
            held: HeldOut) -> dict[str, Any] | None:
    sampler = {**spec["sampler"], "seed": seed}
    job = toy_job(args.suite, args.work / f"{label.replace(' ', '_')}_{seed}",
                  evaluator="accuracy", limit=args.limit, workers=args.workers,
                  trials=spec.get("trials", args.evals), layer_groups=1, sampler=sampler,
                  space=copy.deepcopy(spec["space"]), baselines=spec.get("baselines", True))
    job = with_experts(job, copy.deepcopy(spec), args.evals)
    if args.fidelity:
        job["search"]["fidelity"] = {"fractions": args.fidelity}
    if "fidelity" in spec:  # the row's own setting wins over --fidelity
        job["search"]["fidelity"] = copy.deepcopy(spec["fidelity"])
        if "subset" in spec["fidelity"]:  # a random subset differs between seeds
            job["search"]["fidelity"]["subset"]["seed"] = seed
    if "adamerging" in spec:
        job["adamerging"] = {**spec["adamerging"], "seed": seed}
    if spec.get("new"):
        note = unavailable(job)
        if note:
            print(f"skipped {label}: option not available ({note})", file=sys.stderr)
            return None
        try:
            rows = run_evomerge(job, reuse=args.reuse)
        except Exception as err:  # a new option whose search is not wired yet
            print(f"skipped {label} seed {seed}: the search failed ({err!r})"[:400],
                  file=sys.stderr)
            return None
    else:
        rows = run_evomerge(job, reuse=args.reuse)
    confirmed = confirmations(Path(job["run_dir"])) if _confirms(spec) else None
    if confirmed is not None:  # the curve is the search's; the confirmations come after it
        rows = [r for r in rows if r["number"] not in confirmed["numbers"]]
    first = phase_rows(Path(job["run_dir"])) if "then" in spec else []
    seconds = rows[-1]["end"] - min(r["start"] for r in first + rows)
    values = [r["value"] for r in first + rows]  # PS+DFS: phase 1's evaluations, then 2's
    tests = [(m, held.recipe((first + rows)[i]["recipe"]))
             for m, i in incumbents(values, args.every)]
    run_dir = Path(job["run_dir"])
    if "then" in spec:  # phase 2's examples come after all of phase 1's
        ex1, est1 = cumulative_examples(run_dir, first, study_name="ps")
        ex2, est2 = cumulative_examples(run_dir, rows, study_name="dfs")
        total1 = cumulative_examples(run_dir, [{"end": float("inf")}], study_name="ps")[0][0]
        examples = ex1 + [None if n is None or total1 is None else total1 + n for n in ex2]
        estimated = est1 or est2
    else:
        examples, estimated = cumulative_examples(run_dir, rows)
    out = record(label, seed, values, tests, seconds, examples)
    out["examples_estimated"] = estimated
    out["candidate_s"] = candidate_s(rows)  # PS+DFS: a phase-2 (DFS) candidate
    if confirmed is not None:  # the pick is the option's: the best confirmed trial
        test = held.recipe(confirmed["recipe"])
        out.update(final_fitness=confirmed["value"], final_test=test,
                   final_examples=confirmed["examples"], estimate=max(values),
                   test_of_estimate=tests[-1][1])  # the held-out the best estimate had
        out["held_out"] = [*tests[:-1], (tests[-1][0], test)]
    if args.confirm and "subset" in (spec.get("fidelity") or {}):
        out["confirm"] = confirm_picks(rows, held, args.confirm, args.limit,
                                       peer_examples_per_candidate(args.suite, args.limit))
    return out


def _confirms(spec: dict[str, Any]) -> bool:
    return bool(((spec.get("fidelity") or {}).get("subset") or {}).get("confirm"))


def confirmations(run_dir: Path) -> dict[str, Any]:
    """A search with ``subset.confirm``: its confirmation trials (``numbers``), the pick
    (``recipe``; ``value``: its full fitness) by the run's own rule
    (``evomerge.runs.results.best_trials``) and the examples of the whole search with them."""
    from evomerge.runs.cost import run_cost
    from evomerge.runs.results import best_trials, open_run
    from evomerge.search.fidelity import CONFIRM_ATTR

    study, job = open_run(run_dir)
    best = best_trials(study, job)[0]
    return {"numbers": {t.number for t in study.get_trials(deepcopy=False)
                        if CONFIRM_ATTR in t.user_attrs},
            "recipe": best.user_attrs["recipe"], "value": best.values[0],
            "examples": run_cost(study, job).search.examples}


def confirm_picks(rows: list[dict[str, Any]], held: HeldOut, ks: list[int], limit: int,
                  per_candidate: int) -> list[dict[str, Any]]:
    """Measured after a subset search (no option yet): its top ``k`` trials by subset
    estimate re-scored on the whole fitness split, the best of those by the full score as the
    incumbent. Per k: that pick's full fitness and held-out, and the examples it adds
    (``k`` full evaluations); k = 1 is the search's own incumbent, rescored."""
    ranked, seen = [], set()
    for r in sorted(rows, key=lambda r: -r["value"]):  # distinct recipes, best estimate first
        key = json.dumps(r["recipe"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            ranked.append(r)
    out = []
    for k in sorted({1, *ks}):
        full = [held.fitness(r["recipe"], limit) for r in ranked[:k]]
        pick = max(range(len(full)), key=lambda i: (full[i], -i))
        out.append({"k": k, "estimate": ranked[pick]["value"], "full_fitness": full[pick],
                    "test": held.recipe(ranked[pick]["recipe"]),
                    "extra_examples": k * per_candidate})
    return out


def run_adamerging(args: argparse.Namespace, held: HeldOut, seed: int) -> dict[str, Any]:
    from evomerge.config import parse_job
    from evomerge.search.adamerging import run_adamerging as ada

    job = toy_job(args.suite, args.work / f"adamerging_{seed}", evaluator="accuracy",
                  limit=args.limit, workers=1, trials=1, layer_groups=1)
    job["adamerging"] = {"granularity": "layer", "steps": args.ada_steps, "seed": seed}
    t0 = time.time()
    result = ada(parse_job(job), progress=False)
    seconds = time.time() - t0
    saved = json.loads((Path(job["run_dir"]) / "adamerging" / "result.json").read_text())
    fit = {k: v for k, v in saved["metrics"]["fitness"].items() if not k.startswith("scored/")}
    value = sum(fit.values()) / len(fit)
    return record("adamerging", seed, [value], [(1, held.recipe(result.recipe.to_dict()))],
                  seconds)


def run_peer(args: argparse.Namespace, held: HeldOut, seed: int) -> dict[str, Any] | None:
    py = peer.ensure_peer_venv(args.peer_venv)
    tasks = peer.peer_tasks(args.suite / "tasks", args.work / "peer_tasks")
    cfg = peer.evolve_config(args.suite, list(suite_tasks(args.suite)), limit=args.limit,
                             layer_granularity=1)
    t0 = time.time()
    run_dir = args.work / f"mergekit_evolve_{seed}"
    log = run_dir / "candidates.jsonl"
    if args.reuse and log.exists() and len(log.read_text().splitlines()) >= args.evals:
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        res = {"rc": 0, "candidates": rows, "log_tail": ""}
    else:
        res = peer.run_peer(py, cfg, tasks, run_dir, fevals=args.evals, workers=1, seed=seed + 1,
                            timeout_s=args.peer_timeout)
    if not res["candidates"]:
        print(f"mergekit-evolve seed {seed} failed:\n{res['log_tail']}", file=sys.stderr)
        return None
    rows = res["candidates"]
    values = [float(r["score"]) for r in rows]
    tests = [(m, held.mergekit(rows[i]["config"])) for m, i in incumbents(values, args.every)]
    per = peer_examples_per_candidate(args.suite, args.limit)
    out = record("mergekit-evolve", seed, values, tests, time.time() - t0,
                 [per * (i + 1) for i in range(len(values))])
    out["examples_estimated"] = True  # from the peer's config, not counted by it
    out["rc"] = res["rc"]
    return out


def peer_examples_per_candidate(suite: Path, limit: int) -> int:
    """Examples mergekit-evolve scores per candidate: its lm-eval tasks (``toy_<task>`` of
    every expert task, on the validation split: ``peer.peer_tasks``) each on the first
    ``limit`` documents (lm-eval's ``limit``), no fidelity, no baselines."""
    n = 0
    for t in suite_tasks(suite):
        with open(suite / "data" / t / "validation.jsonl", encoding="utf-8") as f:
            n += min(limit, sum(1 for line in f if line.strip()))
    return n


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    peer_runs = [r for r in runs if r["method"] == "mergekit-evolve"]
    level = statistics.mean(r["final_fitness"] for r in peer_runs) if peer_runs else None
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        to_peer = [evals_to(r["fitness"], 0.95 * level) for r in rs] if level else []
        rows.append({
            "method": method, "seeds": len(rs), "evals": statistics.mean(r["evals"] for r in rs),
            "fitness": _mean(r["final_fitness"] for r in rs),
            "fitness_sd": _sd(r["final_fitness"] for r in rs),
            "test": _mean(r["final_test"] for r in rs),
            "test_sd": _sd(r["final_test"] for r in rs),
            "evals_to_95": _mean(r["evals_to_95"] for r in rs),
            "examples_to_95": _mean(r.get("examples_to_95") for r in rs),
            "examples_to_95_sd": _sd(r["examples_to_95"] for r in rs
                                     if r.get("examples_to_95") is not None),
            "examples": _mean(r.get("final_examples") for r in rs),
            "evals_to_95_of_peer": _mean(x for x in to_peer) if to_peer else None,
            "examples_to_95_of_peer": _mean(examples_at(r.get("examples"), x)
                                            for r, x in zip(rs, to_peer, strict=True))
            if to_peer else None,
            "reached_peer": f"{sum(x is not None for x in to_peer)}/{len(rs)}"
            if to_peer else None,
            "seconds": _mean(r["seconds"] for r in rs),
        })
    return with_ratios(rows)


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 18's ratio: examples to 95 % (of its own best; of the peer's best) over the
    peer's examples to 95 % of its own best (target <= 1/3)."""
    pk = next((r for r in rows if r["method"] == "mergekit-evolve"), None)
    base = pk and pk.get("examples_to_95")
    for r in rows:
        own, at_peer = r.get("examples_to_95"), r.get("examples_to_95_of_peer")
        r["x_peer"] = own / base if base and own is not None else None
        r["x_peer_at_peer"] = at_peer / base if base and at_peer is not None else None
    return rows


def _mean(xs: Any) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.mean(vals) if vals else None


def _sd(xs: Any) -> float | None:
    vals = list(xs)
    return statistics.stdev(vals) if len(vals) > 1 else 0.0


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["method"]: r for r in rows}
    grid = max((by[m]["test"] for m in ("grid TA", "grid TIES") if m in by), default=None)
    out: dict[str, Any] = {"grid_best_test": grid}
    searched = ("cmaes per-model", "cmaes per-layer", "cmaes per-layer TA")
    for m in searched:
        if m in by and grid is not None:
            out[f"{m} beats grid on test"] = by[m]["test"] > grid
    pk = by.get("mergekit-evolve")
    for m in searched:
        if pk and m in by and pk["evals_to_95"] and by[m]["evals_to_95"]:
            out[f"{m} evals_to_95 / peer"] = by[m]["evals_to_95"] / pk["evals_to_95"]
        if pk and m in by and pk.get("examples_to_95") and by[m].get("examples_to_95"):
            out[f"{m} examples_to_95 / peer"] = by[m]["examples_to_95"] / pk["examples_to_95"]
    return out


def plot(runs: list[dict[str, Any]], subtitle: str, name: str) -> Path:
    """Best fitness and held-out of the incumbent against evaluations (left) and against
    examples scored (right: what an evaluation costs on a real model)."""
    fig, (ax_fit, ax_fit_ex, ax_test, ax_test_ex) = new_figure(4, width=5.0)
    for i, method in enumerate(dict.fromkeys(r["method"] for r in runs)):
        rs = [r for r in runs if r["method"] == method]
        color = f"C{i}"
        if method == "adamerging":  # one point; its cost is gradient steps, not evaluations
            ax_fit.scatter([1], [_mean(r["final_fitness"] for r in rs)], color=color, label=method)
            ax_test.scatter([1], [_mean(r["final_test"] for r in rs)], color=color, label=method)
            continue
        n = min(r["evals"] for r in rs)
        curves = [curve(r["fitness"])[:n] for r in rs]
        cols = list(zip(*curves, strict=True))
        mean = [statistics.mean(c) for c in cols]
        ax_fit.plot(range(1, n + 1), mean, color=color, label=method)
        ax_fit.fill_between(range(1, n + 1), [min(c) for c in cols], [max(c) for c in cols],
                            color=color, alpha=0.15)
        marks = sorted({m for r in rs for m, _ in r["held_out"]})
        ys = [_mean(dict(map(tuple, r["held_out"])).get(m) for r in rs) for m in marks]
        ax_test.plot(marks, ys, marker="o", color=color, label=method)
        for r in rs:  # per seed: examples differ between seeds (pruning)
            ex = r.get("examples")
            if not ex or any(x is None for x in ex):
                continue
            ax_fit_ex.plot(ex, curve(r["fitness"]), color=color, alpha=0.6,
                           label=method if r is rs[0] else None)
            held_ex = [(ex[m - 1], v) for m, v in r["held_out"] if m <= len(ex)]
            ax_test_ex.plot([x for x, _ in held_ex], [v for _, v in held_ex], marker="o",
                            color=color, alpha=0.6, label=method if r is rs[0] else None)
    ax_fit.set(xlabel="evaluations", ylabel="best validation fitness (mean of seeds, min-max)")
    ax_fit_ex.set(xlabel="examples scored", ylabel="best validation fitness (each seed)")
    ax_test.set(xlabel="evaluations", ylabel="test accuracy of the incumbent (mean of seeds)")
    ax_test_ex.set(xlabel="examples scored", ylabel="test accuracy of the incumbent (each seed)")
    ax_test.legend(fontsize=7)
    return save_figure(fig, name, subtitle=subtitle)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", type=Path, default=Path("/tmp/toy_small"))
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_quality"))
    p.add_argument("--evals", type=int, default=40, help="evaluations per search")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--limit", type=int, default=64, help="validation examples per task")
    p.add_argument("--every", type=int, default=10, help="held-out scoring interval")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ada-steps", type=int, default=300)
    p.add_argument("--methods", nargs="+", help="only these (labels as in the table)")
    p.add_argument("--peer-venv", type=Path, default=peer.DEFAULT_VENV)
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--quick", action="store_true", help="16 evaluations, 2 seeds, no peer")
    p.add_argument("--reuse", action="store_true",
                   help="reuse finished searches (and mergekit-evolve logs) found in --work "
                   "(held-out is rescored)")
    p.add_argument("--peer-seeds", type=int, help="mergekit-evolve seeds (default: --seeds)")
    p.add_argument("--peer-timeout", type=float, default=1800, help="seconds one "
                   "mergekit-evolve search may run (a loaded machine needs more)")
    p.add_argument("--peer-first-seed", type=int, default=0, help="the first mergekit-evolve "
                   "seed (e.g. 2 with --peer-seeds 1: only seed 2, to --merge with 0-1)")
    p.add_argument("--confirm", type=int, nargs="+", metavar="K", help="subset rows: also "
                   "re-score the top K trials by subset estimate on the whole fitness split and "
                   "report the pick's full fitness and held-out (measured after the search)")
    p.add_argument("--name", default="search_quality", help="results/<name>.json and .png")
    p.add_argument("--rows", choices=["dfs", "cost"], help="dfs: DFS alone and PS+DFS next "
                   "to PS alone (cmaes per-model), uniform TA and the experts; no peer, no "
                   "AdaMerging. cost: issue 18's samplers and fidelity settings on the "
                   "per-layer TA space next to mergekit-evolve, table in examples scored")
    p.add_argument("--fidelity", type=float, nargs="+", help="search.fidelity fractions "
                   "for every evomerge search, e.g. 0.25 1.0 (default: none)")
    p.add_argument("--merge", nargs="+", metavar="NAME", help="no search: the table and "
                   "figure of the runs stored in results/<NAME>.json (several invocations' "
                   "rows, e.g. the peer's run apart), into results/<--name>.json")
    p.add_argument("--compare", help="also print the rows of results/<COMPARE>.json (earlier "
                   "runs, marked '(earlier)') under the new ones")
    args = p.parse_args(argv)
    if args.rows == "dfs":
        args.methods, args.skip_peer = list(DFS_ROWS), True
    if args.rows == "cost" and not args.methods:
        args.methods = list(COST_ROWS)
    if args.rows == "cost" and args.name == "search_quality":
        args.name = "search_quality_cost"
    if args.quick:
        args.evals, args.seeds, args.skip_peer, args.every = 16, 2, True, 4
    info = machine()
    if args.merge:  # the table of runs stored by earlier invocations (no search, no rescoring)
        runs, info["merged"] = merged_runs(args.merge, args.methods)
        return report(args, info, runs, summarize(runs))
    import ray
    import torch

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
    want = set(args.methods or [])
    runs: list[dict[str, Any]] = []
    for label, spec in searches(num_layers(args.suite)).items():
        if (want and label not in want) or (not want and spec.get("optional")):
            continue
        for seed in range(args.seeds if spec["seeded"] else 1):
            r = run_one(label, spec, seed, args, held)
            if r is None:  # a new option not available: the row is skipped
                break
            runs.append(r)
            _log(r)
    ray.shutdown()
    if not want or "adamerging" in want:
        for seed in range(args.seeds):
            runs.append(run_adamerging(args, held, seed))
            _log(runs[-1])
    if not args.skip_peer and (not want or "mergekit-evolve" in want):
        first = args.peer_first_seed
        for seed in range(first, first + (args.peer_seeds or args.seeds)):
            r = run_peer(args, held, seed)
            if r:
                runs.append(r)
                _log(r)
    rows = summarize(runs)
    if args.rows == "dfs":
        for r in rows:
            rs = [x for x in runs if x["method"] == r["method"]]
            r["candidate_s"] = _mean(x.get("candidate_s") for x in rs)
        rows += reference_scores(held, args.suite)
        print(format_table(rows, ["method", "seeds", "evals", "fitness", "test", "test_sd",
                                  "candidate_s", "seconds"]))
    return report(args, info, runs, rows)


def report(args: argparse.Namespace, info: dict[str, Any], runs: list[dict[str, Any]],
           rows: list[dict[str, Any]]) -> int:
    """Print the table, write results/<name>.json and .png."""
    if not runs:
        print("no runs (every row skipped): nothing written", file=sys.stderr)
        return 0
    cols = ["method", "seeds", "evals", "fitness", "fitness_sd", "test", "test_sd",
            "evals_to_95", "examples_to_95", "examples_to_95_sd", "evals_to_95_of_peer",
            "examples_to_95_of_peer", "seconds"]
    if args.rows == "cost":  # issue 18: the cost in examples scored, against the peer's
        cols = ["method", "seeds", "fitness", "fitness_sd", "test", "test_sd", "examples",
                "examples_to_95", "examples_to_95_sd", "examples_to_95_of_peer",
                "reached_peer", "x_peer", "x_peer_at_peer", "seconds"]
    print(format_table(rows + compared(args.compare), cols))
    if args.rows == "cost":
        print(markdown_table(rows, cols))
    confirm = confirm_rows(runs)
    if confirm:
        print(markdown_table(confirm, ["method", "k", "seeds", "extra_examples",
                                       "full_fitness", "full_fitness_sd", "test", "test_sd"]))
    goal = targets(rows)
    print(json.dumps(goal, indent=1))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path = write_json(args.name, settings=settings, info=info,
                      results={"summary": rows, "targets": goal, "runs": runs,
                               **({"confirm": confirm} if confirm else {})})
    try:  # the figure needs the bench extra (matplotlib); the JSON is written first
        png = plot(runs, f"toy suite small, {args.evals} evaluations, {args.seeds} seeds",
                   args.name)
    except ImportError as err:
        png = f"no figure ({err}; pip install -e .[bench])"
    print(f"wrote {path} and {png}", file=sys.stderr)
    return 0


def confirm_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per subset row and k of ``--confirm``: the picks' full fitness and held-out over seeds."""
    out = []
    for method in dict.fromkeys(r["method"] for r in runs if r.get("confirm")):
        picks = [c for r in runs if r["method"] == method for c in r.get("confirm") or []]
        for k in sorted({c["k"] for c in picks}):
            cs = [c for c in picks if c["k"] == k]
            full, test = [c["full_fitness"] for c in cs], [c["test"] for c in cs]
            out.append({"method": method, "k": k, "seeds": len(cs),
                        "extra_examples": cs[0]["extra_examples"],
                        "full_fitness": statistics.mean(full), "full_fitness_sd": _sd(full),
                        "test": statistics.mean(test), "test_sd": _sd(test)})
    return out


def merged_runs(names: list[str], methods: list[str] | None
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The runs stored in results/<NAME>.json files (the later file wins for a method and
    seed), only ``methods`` if given; and where each file came from (date, load)."""
    by: dict[tuple[str, int], dict[str, Any]] = {}
    sources = []
    for name in names:
        data = json.loads((Path(__file__).parent / "results" / f"{name}.json").read_text())
        m = data.get("machine", {})
        sources.append({"name": name, "date": m.get("date"), "loadavg": [
            m.get("loadavg_start"), m.get("loadavg_end")]})
        for r in data["results"]["runs"]:
            if not methods or r["method"] in methods:
                by[(r["method"], r["seed"])] = r
    order = {m: i for i, m in enumerate(methods or [])}
    runs = sorted(by.values(), key=lambda r: (order.get(r["method"], len(order)), r["seed"]))
    return runs, sources


def compared(name: str | None) -> list[dict[str, Any]]:
    """The summary rows of an earlier results file, labelled as earlier."""
    if not name:
        return []
    path = Path(__file__).parent / "results" / f"{name}.json"
    rows = json.loads(path.read_text())["results"]["summary"]
    return [{**r, "method": f"{r['method']} (earlier)"} for r in rows]


def _log(r: dict[str, Any]) -> None:
    ex = r.get("final_examples")
    cost = "" if ex is None else f", {ex} examples" + (
        " (estimated)" if r.get("examples_estimated") else " (scored/ metrics)")
    print(f"{r['method']} seed {r['seed']}: {r['evals']} evals{cost}, best "
          f"{r['final_fitness']:.3f}, test {r['final_test']:.3f}, {r['seconds']:.0f} s",
          file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
