"""Ranking-preserving fitness subsets (``search.fidelity.subset``): score later candidates on a
few examples of the fitness split, chosen from warm-up candidates' per-example scores.

A search spends its budget telling candidates apart, so a subset is good when the estimate on
it orders candidates like the full score does. ``anchors`` follows tinyBenchmarks (Polo et al.,
2024): each example is a point whose coordinates are the warm-up candidates' scores on it;
k-medoids groups examples that the candidates get right or wrong together, and each medoid
stands for its cluster, weighted by the cluster's size, so the weighted mean estimates the full
mean (not only its order). A greedy subset that maximises Kendall tau on the warm-up candidates
was not chosen: with 8-16 warm-up candidates it fits their few pairs and says nothing about the
level of the score. ``random`` (seeded, weight 1) is the baseline it is compared with; with
``warmup: 0`` it is drawn before the first trial from the fitness split sizes the workers
report (:func:`fitness_examples`), and every trial, the baselines too, is scored on it.

Metrics are ratios of sums over examples: ``sum(s_i v_i) / sum(s_i)`` with ``v_i`` a
candidate's score on example ``i`` and ``s_i`` its size (1 for accuracy and lm-eval, the tokens
scored for entropy). A subset ``S`` with weights ``w`` estimates it by
``sum_S(w s v) / sum_S(w s)`` (:func:`estimate`).

>>> import numpy as np
>>> scores = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0.]])
>>> idx, w = select_subset(scores, size=2, method="anchors", seed=0)
>>> len(idx), float(sum(w))
(2, 4.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evomerge.search.rank_fidelity import kendall_tau

SUBSET_ATTR = "fidelity:subset"  # study user attr: the chosen subset per label and its taus
WARMUP_ATTR = "subset_warmup"  # trial user attr: scored in full with per-example scores
PER_EXAMPLE_ATTR = "per_example"  # trial user attr: label -> {"values", "sizes"}
ON_SUBSET_ATTR = "fitness_subset"  # trial user attr: scored on the subset (the method)
RANDOM_DRAWS = 10  # random subsets the stored tau of ``random`` is averaged over
# evaluators that score a weighted subset of examples; cost reads none (unaffected)
SUBSET_EVALUATORS = ("accuracy", "entropy", "lm_eval", "cost")


def kmedoids(points: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> np.ndarray:
    """Cluster labels (``0..k-1``) of ``points`` (n x d) by k-medoids: k-means++ seeds, then
    alternate assignment to the nearest medoid and the medoid update within each cluster."""
    n = len(points)
    medoids = [int(rng.integers(n))]
    near = ((points - points[medoids[0]]) ** 2).sum(1)
    while len(medoids) < k:
        free = np.setdiff1d(np.arange(n), medoids)
        p = near[free]
        nxt = int(rng.choice(free, p=p / p.sum())) if p.sum() > 0 else int(rng.choice(free))
        medoids.append(nxt)
        near = np.minimum(near, ((points - points[nxt]) ** 2).sum(1))
    labels = np.zeros(n, dtype=int)
    for _ in range(iters):
        dist = ((points[:, None, :] - points[None, medoids, :]) ** 2).sum(-1)
        labels = dist.argmin(1)
        new = list(medoids)
        for c in range(k):
            members = np.flatnonzero(labels == c)
            if len(members):
                sub = np.sqrt(((points[members, None] - points[None, members]) ** 2).sum(-1))
                new[c] = int(members[sub.sum(1).argmin()])
        if new == medoids:
            break
        medoids = new
    return labels


def select_subset(
    scores: np.ndarray, *, size: int, method: str, seed: int = 0,
    sizes: Sequence[float] | None = None,
) -> tuple[list[int], list[float]]:
    """``(indices, weights)`` of ``size`` examples (columns of ``scores``, candidates x
    examples). ``anchors``: the medoid of each k-medoids cluster (its first example if all tie)
    with weight ``sum of its cluster's sizes / its own size``; where fewer clusters than
    ``size`` are not empty (many examples score alike), more members of the largest clusters are
    drawn and share its weight. ``random``: a seeded draw, weight 1. Sorted by index."""
    scores = np.asarray(scores, dtype=float)
    n = scores.shape[1]
    s = np.ones(n) if sizes is None else np.asarray(sizes, dtype=float)
    rng = np.random.default_rng(seed)
    if size >= n:
        return list(range(n)), [1.0] * n
    if method == "random":
        return sorted(int(i) for i in rng.choice(n, size=size, replace=False)), [1.0] * size
    if method != "anchors":
        raise ValueError(f"method must be 'anchors' or 'random', got {method!r}")
    labels = kmedoids(scores.T, size, rng)
    clusters = [np.flatnonzero(labels == c) for c in range(size)]
    reps = {c: [int(_medoid(scores.T, m))] for c, m in enumerate(clusters) if len(m)}
    while sum(map(len, reps.values())) < size:  # split the mass of the largest clusters
        c = max(reps, key=lambda c: (s[clusters[c]].sum() / len(reps[c]), -c))
        free = np.setdiff1d(clusters[c], reps[c])
        if not len(free):
            break
        reps[c].append(int(rng.choice(free)))
    out = sorted(
        (i, float(s[clusters[c]].sum() / len(r) / s[i])) for c, r in reps.items() for i in r
    )
    return [i for i, _ in out], [w for _, w in out]


def _medoid(points: np.ndarray, members: np.ndarray) -> int:
    sub = np.sqrt(((points[members, None] - points[None, members]) ** 2).sum(-1))
    return int(members[sub.sum(1).argmin()])


def estimate(
    values: Sequence[float], indices: Sequence[int], weights: Sequence[float],
    sizes: Sequence[float] | None = None,
) -> float:
    """``sum_S(w s v) / sum_S(w s)``: the subset's estimate of the full ratio metric."""
    v = np.asarray(values, dtype=float)[list(indices)]
    w = np.asarray(weights, dtype=float)
    s = np.ones(len(v)) if sizes is None else np.asarray(sizes, dtype=float)[list(indices)]
    return float((w * s * v).sum() / (w * s).sum())


def full_score(values: Sequence[float], sizes: Sequence[float] | None = None) -> float:
    n = len(values)
    return estimate(values, range(n), [1.0] * n, sizes)


def loo_estimates(
    scores: np.ndarray, *, size: int, method: str, seed: int = 0,
    sizes: Sequence[float] | None = None,
) -> list[float]:
    """Each candidate's (row's) estimate on a subset chosen from the *other* rows: what a new
    candidate gets, measured on the warm-up without scoring it twice."""
    scores = np.asarray(scores, dtype=float)
    out = []
    for j in range(len(scores)):
        rest = np.delete(scores, j, axis=0)
        idx, w = select_subset(rest, size=size, method=method, seed=seed, sizes=sizes)
        out.append(estimate(scores[j], idx, w, sizes))
    return out


# -- the loop's policy -------------------------------------------------------------------------
class SubsetPolicy:
    """The first ``warmup`` candidates are scored in full with per-example scores; then a
    subset per label is chosen and every later candidate is scored on it. Replayed on resume
    from the study (the stored subset, else the stored warm-up trials).

    ``objective_values(metrics) -> values`` turns metrics into the study's objective values
    (for the leave-one-out tau of the objective shown in the summary)."""

    def __init__(self, cfg: Any, objective_values: Any) -> None:
        self.cfg, self.values_of = cfg, objective_values
        self.warm: list[tuple[int, dict[str, Any], dict[str, float]]] = []
        self.state: dict[str, Any] | None = None

    @classmethod
    def from_study(cls, cfg: Any, objective_values: Any, trials: Sequence[Any],
                   stored: Any) -> SubsetPolicy:
        policy = cls(cfg, objective_values)
        if isinstance(stored, dict) and stored.get("labels"):
            policy.state = stored
            return policy
        for t in sorted(trials, key=lambda t: t.number):
            if t.user_attrs.get(WARMUP_ATTR) and t.state.name == "COMPLETE":
                policy.observe(t.number, t.user_attrs.get(PER_EXAMPLE_ATTR) or {},
                               t.user_attrs.get("metrics") or {})
        return policy

    @property
    def subset(self) -> dict[str, dict[str, list[Any]]] | None:
        """label -> {"indices", "weights"} once chosen (what the evaluators take)."""
        if self.state is None:
            return None
        return {k: {"indices": v["indices"], "weights": v["weights"]}
                for k, v in self.state["labels"].items()}

    def observe(self, number: int, per_example: Mapping[str, Any],
                metrics: Mapping[str, float]) -> bool:
        """A finished warm-up candidate; True when this one completed the warm-up (the
        subset is chosen: store :attr:`state`)."""
        if self.state is not None or not per_example:
            return False
        self.warm.append((number, dict(per_example), dict(metrics)))
        if len(self.warm) < self.cfg.warmup:
            return False
        self.state = self._choose()
        return True

    def up_front(self, workers: Sequence[Mapping[str, Any]] | None) -> dict[str, Any] | None:
        """``warmup: 0`` with no subset stored yet: the subset drawn now, before the first trial
        (:meth:`draw_up_front`), from the fitness examples the first worker reports
        (``workers``: the pool's ``info``), for the loop to store; None otherwise."""
        if self.state is not None or self.cfg.warmup:
            return None
        examples = (workers or [{}])[0].get("fitness_examples")
        if not examples:
            raise RuntimeError("search.fidelity.subset.warmup is 0 but the workers report "
                               "no fitness examples to draw the subset from; set warmup "
                               "(e.g. 8) or use accuracy, entropy or lm_eval evaluators")
        return self.draw_up_front(examples)

    def draw_up_front(self, examples: Mapping[str, int]) -> dict[str, Any]:
        """``warmup: 0`` (``random`` only): draw the subset of every label from its number of
        fitness examples (``examples``: label -> n, what the workers' evaluators report)
        before any trial, so every trial, the baselines too, is scored on it; the same draw
        as :meth:`_choose` makes with this seed after a warm-up."""
        cfg = self.cfg
        labels = {}
        for label, n in sorted(examples.items()):
            idx, wts = select_subset(np.zeros((1, int(n))), size=cfg.size, method=cfg.method,
                                     seed=cfg.seed)
            labels[label] = {"indices": idx, "weights": wts, "examples": int(n)}
        self.state = {"method": cfg.method, "size": cfg.size, "seed": cfg.seed, "warmup": [],
                      "labels": labels, "tau": {}}
        return self.state

    def _choose(self) -> dict[str, Any]:
        cfg = self.cfg
        labels: dict[str, Any] = {}
        anchors: dict[str, list[float]] = {}
        draws: list[dict[str, list[float]]] = [{} for _ in range(RANDOM_DRAWS)]
        for label in self.warm[0][1]:
            mat = np.array([w[1][label]["values"] for w in self.warm], dtype=float)
            sizes = self.warm[0][1][label].get("sizes")
            idx, wts = select_subset(mat, size=cfg.size, method=cfg.method, seed=cfg.seed,
                                     sizes=sizes)
            labels[label] = {"indices": idx, "weights": wts, "examples": mat.shape[1]}
            anchors[label] = loo_estimates(mat, size=cfg.size, method="anchors",
                                           seed=cfg.seed, sizes=sizes)
            for d, est in enumerate(draws):
                est[label] = loo_estimates(mat, size=cfg.size, method="random",
                                           seed=cfg.seed + d, sizes=sizes)
        random_taus = np.array([self._tau(est) for est in draws], dtype=float)
        return {"method": cfg.method, "size": cfg.size, "seed": cfg.seed,
                "warmup": [w[0] for w in self.warm], "labels": labels,
                "tau": {"anchors": self._tau(anchors),
                        "random": [float(x) for x in np.nanmean(random_taus, axis=0)]}}

    def _tau(self, est: dict[str, list[float]]) -> list[float]:
        """Kendall tau, per objective, of the objective on the estimates ``est`` (label ->
        one per warm-up candidate) against the full objective, over the warm-up candidates."""
        full, cheap = [], []
        for j, (_, _, metrics) in enumerate(self.warm):
            full.append(self.values_of(metrics))
            cheap.append(self.values_of({**metrics, **{k: v[j] for k, v in est.items()}}))
        return [kendall_tau([c[k] for c in cheap], [f[k] for f in full])
                for k in range(len(full[0]))]


def subset_line(state: Any) -> str | None:
    """The summary's ``fitness subset:`` text, from the study attribute."""
    if not isinstance(state, dict) or not state.get("labels"):
        return None
    labels = state["labels"]
    sizes = sorted({len(v["indices"]) for v in labels.values()})
    total = sorted({v["examples"] for v in labels.values()})
    taus = state.get("tau", {})

    def fmt(ts: Sequence[float]) -> str:
        return "/".join("-" if math.isnan(t) else f"{t:.2f}" for t in ts)

    head = (f"fitness subset: {state['method']}, {'/'.join(map(str, sizes))} of "
            f"{'/'.join(map(str, total))} examples per label ({len(labels)} labels), ")
    if not state["warmup"]:
        return head + "drawn before the first trial (no warm-up: every trial scored on it)"
    return head + (f"chosen from {len(state['warmup'])} warm-up trials scored in full; "
                   f"leave-one-out Kendall tau of the objective on them: anchors "
                   f"{fmt(taus.get('anchors', []))}, random {fmt(taus.get('random', []))}")


def fitness_examples(evaluators: Sequence[Any]) -> dict[str, int]:
    """label -> examples a full fitness evaluation scores, per subset label: one per lm-eval
    task (``lm_eval/<task>``), one per data evaluator (``accuracy/<label>``, ...); evaluators
    without examples (``cost``) have none. What ``warmup: 0`` draws its subset from."""
    from evomerge.evaluators.base import effective_limit

    out: dict[str, int] = {}
    for ev in evaluators:
        tasks = getattr(ev, "task_dict", None)
        if tasks is not None:  # lm_eval: its subset labels are its tasks
            for task, t in tasks["tasks"].items():
                out[f"lm_eval/{task}"] = effective_limit(len(t.eval_docs), ev.cfg.limit)
        elif isinstance(getattr(ev, "label", None), str) and ev.num_examples is not None:
            out[ev.label] = int(ev.num_examples)
    return out
