"""The README.md model card of an exported Hugging Face folder.

It records what a reader needs to trust and reproduce the model: the source models, the method,
the recipe (and the equivalent mergekit config when there is one; when stock mergekit is known
not to run the models' architecture, the card says so instead of promising an equivalent), the
trial's scores and held-out scores, the study, the evomerge version and the date.

>>> from evomerge.recipe import Recipe
>>> r = Recipe(method="linear", sources={"a": "org/a", "b": "org/b"},
...            models={"a": {"weight": 0.5}, "b": {"weight": 0.5}})
>>> "| a | merged | `org/a` |" in model_card(r, title="demo")
True
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from evomerge import __version__
from evomerge.merge.reference import DARE
from evomerge.recipe import AnyRecipe, Recipe
from evomerge.runs.export_mergekit import DARE_NOTE, mergekit_caveat

RECIPE_FILE = "evomerge_recipe.yaml"


def model_card(
    recipe: AnyRecipe,
    *,
    title: str,
    metrics: Mapping[str, Any] | None = None,
    held_out: Mapping[str, Any] | None = None,
    study_name: str | None = None,
    trial: int | None = None,
    mergekit_yaml: str | None = None,
    mergekit_error: str | None = None,
    date: dt.datetime | None = None,
) -> str:
    """The Markdown card (with Hugging Face YAML front matter) for ``recipe``'s merged model."""
    date = date or dt.datetime.now(dt.timezone.utc)
    parts = [
        _front_matter(recipe),
        f"# {title}\n",
        f"A merge of {len(recipe.sources)} models made with "
        f"evomerge {__version__} on "
        f"{date:%Y-%m-%d %H:%M} UTC, {_summary(recipe)}.\n",
        _origin(study_name, trial),
        "## Source models\n",
        _sources(recipe),
        "## Method\n",
        _method(recipe),
        _scores("Scores", "the metrics the search measured for this recipe", metrics),
        _scores("Held-out scores", "re-measured after the search on the held-out split",
                held_out),
        "## Recipe\n",
        f"Re-create these weights with `evomerge merge {RECIPE_FILE} OUT/` "
        f"(the file is in this folder):\n",
        f"```yaml\n{recipe.to_yaml()}```\n",
        _mergekit(mergekit_yaml, mergekit_error,
                  mergekit_caveat(recipe) if mergekit_yaml else None),
        "## Use\n",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("PATH")\n'
        'tokenizer = AutoTokenizer.from_pretrained("PATH")\n```\n',
    ]
    return "\n".join(p for p in parts if p)


def _summary(recipe: AnyRecipe) -> str:
    if isinstance(recipe, Recipe):
        return f"method `{recipe.method}`"
    return f"a data-flow path of {len(recipe.layers)} layers"


def _front_matter(recipe: AnyRecipe) -> str:
    meta: dict[str, Any] = {"library_name": "transformers", "tags": ["merge", "evomerge"]}
    hub = [s for s in recipe.model_sources().values() if not Path(s).expanduser().exists()]
    if hub:
        meta["base_model"] = hub
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n"


def _origin(study_name: str | None, trial: int | None) -> str:
    if study_name is None and trial is None:
        return "Exported directly from a recipe (no search study).\n"
    where = f"study `{study_name}`" if study_name else "a study"
    which = f"trial {trial} of " if trial is not None else ""
    return f"The recipe is {which}{where}.\n"


def _sources(recipe: AnyRecipe) -> str:
    rows = ["| name | role | source |", "|---|---|---|"]
    for name, source in recipe.sources.items():
        shown = source if isinstance(source, str) else f"an inline {source.method} recipe"
        rows.append(f"| {name} | {_role(recipe, name)} | `{shown}` |")
    return "\n".join(rows) + "\n"


def _role(recipe: AnyRecipe, name: str) -> str:
    if isinstance(recipe, Recipe):
        if name == recipe.base_model:
            return "base"
        return "merged" if name in recipe.models else "unused"
    roles = [role for role, used in (("layers", any(n == name for n, _ in recipe.layers)),
                                     ("embeddings, norm, head", name == recipe.embed_from))
             if used]
    return " and ".join(roles) or "unused"


def _method(recipe: AnyRecipe) -> str:
    if not isinstance(recipe, Recipe):
        from evomerge.dfs.card import dfs_method

        return dfs_method(recipe)
    lines = [f"- method: `{recipe.method}`"]
    if recipe.base_model:
        lines.append(f"- base model: `{recipe.base_model}`")
    rule = ("the base model's" if recipe.non_layer == "base"
            else "the first layer group's coefficients")
    lines.append(f"- embeddings, final norm and head: {rule}")
    lines.append(f"- dtype: `{recipe.dtype or 'float32'}`")
    if recipe.method in DARE:
        lines.append(f"- DARE seed: {recipe.seed}")
        lines.append(f"\n{DARE_NOTE}")
    return "\n".join(lines) + "\n"


def _scores(heading: str, what: str, values: Mapping[str, Any] | None) -> str:
    if not values:
        return ""
    rows = [f"## {heading}\n", f"{what.capitalize()}:\n", "| metric | value |", "|---|---|"]
    rows += [f"| {k} | {_fmt(v)} |" for k, v in values.items()]
    return "\n".join(rows) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.6g}"
    return str(value)


def _mergekit(text: str | None, error: str | None, caveat: str | None = None) -> str:
    if text and caveat:
        return ("## mergekit\n\nNo runnable mergekit config: "
                f"{caveat}.\n\nThe merge written in mergekit's terms, for reference only:"
                f"\n\n```yaml\n{text}```\n")
    if text:
        return ("## mergekit\n\nThe same merge as a mergekit config (`mergekit-yaml config.yaml "
                f"OUT/`):\n\n```yaml\n{text}```\n")
    if error:
        return f"## mergekit\n\nNo mergekit config: {error}\n"
    return ""
