"""evomerge: search model-merge recipes with Optuna samplers and Ray workers.

Importing this package is cheap: torch, ray, transformers and lm_eval are imported only by the
modules that need them, so the entry points are imported from their modules:

- ``evomerge.config.load_job(path)``: a job YAML -> the checked ``JobConfig``;
- ``evomerge.search.driver.run_search(job)``: run (or ``resume=True``) a search to its budget,
  returning the Optuna study (``Search`` is the same loop for a caller that drives it);
- ``evomerge.runs.results.open_run(run_dir)``: a finished or running search as
  ``(study, job)``; ``results_frame`` (pandas, every trial), ``best_trials``;
- ``evomerge.runs.summary.run_summary(study, job)``: the summary ``evomerge search`` prints;
- ``evomerge.runs.export.export_run(run_dir, out, "hf")``: export the best trial (or
  ``trial=N``, ``pareto=True``) as a Hugging Face folder, ``"mergekit"`` or ``"recipe"`` YAML;
- ``evomerge.recipe.Recipe``: the frozen, JSON-serialisable merge recipe every step passes on;
  ``evomerge.runs.export.export_recipe(recipe, out, "hf")`` applies one.

>>> from evomerge.recipe import Recipe
>>> recipe = Recipe(method="linear", sources={"a": "models/a", "b": "models/b"},
...                 models={"a": {"weight": 0.5}, "b": {"weight": 0.5}})
>>> Recipe.from_yaml(recipe.to_yaml()) == recipe
True

A search and what it found (needs the job's models; ``evomerge search job.yaml`` does the same):

>>> from evomerge.config import load_job  # doctest: +SKIP
>>> from evomerge.search.driver import run_search  # doctest: +SKIP
>>> from evomerge.runs.summary import run_summary  # doctest: +SKIP
>>> from evomerge.runs.export import export_run  # doctest: +SKIP
>>> job = load_job("configs/quickstart.yaml")  # doctest: +SKIP
>>> study = run_search(job)  # doctest: +SKIP
>>> print(run_summary(study, job))  # doctest: +SKIP
>>> export_run("runs/quickstart", "merged", "hf")  # doctest: +SKIP
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
