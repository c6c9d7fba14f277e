"""The evaluator protocol, JSONL data loading and construction from config."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Evaluator(Protocol):
    """Maps an in-memory model to metrics. Batched, no grad, deterministic.

    Metric names are namespaced: ``accuracy/reverse``, ``lm_eval/toy_add/exact_match``.
    ``limit`` caps the number of examples (used by multi-fidelity search).

    Evaluation cost: beside its metrics every result carries, for each ``<label>`` the
    evaluator names metrics with (``accuracy/reverse``, ``lm_eval/toy_add``, ``cost``), the
    counts ``scored/examples/<label>`` (examples scored in this call: the limited number under
    a ``limit``) and ``scored/tokens/<label>`` (tokens generated, or for likelihood scoring the
    tokens whose predictions were scored), as floats (:func:`scored`). Sum
    ``scored/examples/*`` over a trial's results for its cost; the ``scored/`` prefix never
    matches a quality metric's pattern (``accuracy/*``).
    """

    name: str

    def evaluate(
        self, model: Any, tokenizer: Any, *, limit: int | None = None
    ) -> dict[str, float]: ...


# -- per-example scores and weighted subsets (search.fidelity.subset) ---------------------------
# Evaluators whose metric is a mean over examples also take ``subset`` (label -> {"indices",
# "weights"}: score only those examples of the split, the metric being the weighted mean, and
# ``scored/examples/<label>`` their number) and ``per_example`` (a dict they fill with label ->
# {"values": [score of each example scored], "sizes": [its weight in the mean], absent when all
# are 1}). The per-example vectors never enter the returned metrics. See
# :mod:`evomerge.search.anchors`.
Subset = Mapping[str, Mapping[str, Sequence[Any]]]


def subset_of(
    subset: Subset | None, label: str, n: int, limit: int | None
) -> tuple[list[int], list[float]] | None:
    """The ``(indices, weights)`` ``subset`` gives ``label`` (None: score the first ``n``);
    ValueError for an index outside the ``n`` examples or a limit given as well."""
    if subset is None or label not in subset:
        return None
    if limit is not None:
        raise ValueError(f"{label}: give a limit or a subset, not both")
    idx = [int(i) for i in subset[label]["indices"]]
    weights = [float(w) for w in subset[label]["weights"]]
    if len(idx) != len(weights) or not idx:
        raise ValueError(f"{label}: subset needs as many weights as indices (>= 1), got "
                         f"{len(idx)} and {len(weights)}")
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ValueError(f"{label}: subset index {bad[0]} is outside the {n} examples of the "
                         "split (was it chosen on another data file?)")
    return idx, weights


def weighted_mean(
    values: Sequence[float], weights: Sequence[float], sizes: Sequence[float] | None = None
) -> float:
    """``sum(w s v) / sum(w s)`` (``s`` = 1 when ``sizes`` is None)."""
    s = sizes if sizes is not None else [1.0] * len(values)
    num = sum(w * z * v for w, z, v in zip(weights, s, values, strict=True))
    return num / sum(w * z for w, z in zip(weights, s, strict=True))


def per_example_record(values: Sequence[float], sizes: Sequence[float] | None = None) -> dict:
    """The compact per-example record of one label (values rounded to 6 digits)."""
    out: dict[str, list[float]] = {"values": [round(float(v), 6) for v in values]}
    if sizes is not None:
        out["sizes"] = [float(x) for x in sizes]
    return out


SCORED_EXAMPLES = "scored/examples/"
SCORED_TOKENS = "scored/tokens/"


def scored(label: str, *, examples: int, tokens: int) -> dict[str, float]:
    """The cost counts of one evaluator result (see :class:`Evaluator`).

    >>> scored("accuracy/add", examples=16, tokens=40)
    {'scored/examples/accuracy/add': 16.0, 'scored/tokens/accuracy/add': 40.0}
    """
    return {f"{SCORED_EXAMPLES}{label}": float(examples), f"{SCORED_TOKENS}{label}": float(tokens)}


def is_scored(metric: str) -> bool:
    """True for a cost count (``scored/...``), False for a quality metric."""
    return metric.startswith("scored/")


def resolve_data(data: str, split: str) -> Path:
    """A folder means ``{data}/{split}.jsonl``; a file is used as it is."""
    p = Path(data)
    path = p / f"{split}.jsonl" if p.is_dir() else p
    if not path.is_file():
        raise FileNotFoundError(
            f"evaluation data {str(path)!r} does not exist (data={data!r}, split={split!r})"
        )
    return path


def default_label(data: str) -> str:
    p = Path(data)
    return p.name if p.is_dir() or not p.suffix else p.stem


def read_jsonl(path: str | Path, *, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Read a JSONL file; errors name the file and the 1-based line."""
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(
                    f"{path}:{lineno}: missing key(s) {missing}; row has {sorted(row)}"
                )
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: the dataset is empty")
    return rows


def effective_limit(n: int, *limits: int | None) -> int:
    """The smallest of ``n`` and the given limits; a limit below 1 is an error."""
    caps = [x for x in limits if x is not None]
    if any(x < 1 for x in caps):
        raise ValueError(f"limit must be >= 1, got {min(caps)}")
    return min([n, *caps])


def build_evaluator(cfg: Any, *, split: str | None = None) -> Evaluator:
    """Instantiate the evaluator registered under ``cfg.name``.

    ``split`` overrides the config's split (the held-out pass uses ``held_out_split``).
    """
    from evomerge.registries import EVALUATORS

    cls = EVALUATORS.get(cfg.name)
    return cls(cfg, split=split)  # type: ignore[no-any-return]
