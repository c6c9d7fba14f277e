"""Rank fidelity: does the score on a cheap fraction of the examples rank candidates the way the
full score does?

Multi-fidelity search prunes on a subset score, so what matters is not how close the cheap score
is to the full one but whether it puts the candidates in the same order. Kendall's tau-b between
the cheap and the full scores of candidates scored at both measures that (1: same order, 0: no
relation). A run measures it for free on its promoted candidates, which carry a score per rung
(``user_attrs["rungs"]``): :func:`study_taus`. Those are the survivors of the cheap rung, a
range-restricted sample, so their tau tends to understate the tau over all candidates.

:class:`AutoFidelity` is the ``search.fidelity.mode: auto`` policy: score the first candidates
(warm-up probes) at every fraction, use the smallest fraction whose tau on them reaches the
threshold, and probe again now and then as the search moves.

>>> round(kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]), 4)
0.6667
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FULL = 1.0
Scores = Mapping[float, Sequence[float]]  # fraction -> objective values of one candidate


def tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either ranking corrected for); ``nan`` when one side is
    constant or fewer than 2 pairs. O(n^2): n is a few dozen candidates."""
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue  # tied in both: in neither denominator term
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else math.nan


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b: scipy's when scipy is installed, else :func:`tau_b` (same value)."""
    try:
        from scipy.stats import kendalltau
    except ImportError:
        return tau_b(x, y)
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan
    return float(kendalltau(list(x), list(y)).statistic)


@dataclass(frozen=True)
class FractionTau:
    """Tau of the score at ``fraction`` against the full score, per objective, over ``n``
    candidates scored at both (``nan``: not defined, e.g. all tied)."""

    fraction: float
    taus: tuple[float, ...]
    n: int

    @property
    def worst(self) -> float:
        """The lowest tau over the objectives (``nan`` if any is undefined)."""
        return math.nan if any(math.isnan(t) for t in self.taus) else min(self.taus)


def fraction_taus(candidates: Iterable[Scores], *, full: float = FULL) -> list[FractionTau]:
    """Tau of each cheaper fraction against ``full``, over the candidates scored at both;
    fractions in increasing order, only those with 2 or more such candidates."""
    cands = [c for c in candidates if full in c]
    fractions = sorted({f for c in cands for f in c if f < full})
    out = []
    for f in fractions:
        pairs = [(c[f], c[full]) for c in cands if f in c]
        if len(pairs) < 2:
            continue
        n_obj = len(pairs[0][1])
        taus = tuple(
            kendall_tau([p[0][k] for p in pairs], [p[1][k] for p in pairs]) for k in range(n_obj)
        )
        out.append(FractionTau(f, taus, len(pairs)))
    return out


def rung_scores(rungs: Sequence[Mapping[str, Any]]) -> dict[float, tuple[float, ...]]:
    """A trial's stored ``rungs`` (``[{fraction, values, metrics}]``) as fraction -> values."""
    return {float(r["fraction"]): tuple(r["values"]) for r in rungs if r.get("values")}


def study_taus(trials: Iterable[Any]) -> list[FractionTau]:
    """:func:`fraction_taus` over the trials that stored scores at several fractions (promoted
    candidates and auto-fidelity probes); trials are Optuna FrozenTrials."""
    scored = [rung_scores(t.user_attrs.get("rungs") or []) for t in trials]
    return fraction_taus(s for s in scored if len(s) > 1)


PROBE_ATTR = "fidelity_probe"  # trial user attr: scored at every fraction for AutoFidelity
STUDY_ATTR = "fidelity:auto"  # study user attr: {"fraction", "history"} of the policy


def stored_probes(trials: Iterable[Any]) -> list[dict[float, tuple[float, ...]]]:
    """The probes of a run, in trial order, to :meth:`AutoFidelity.replay` on resume: complete
    trials marked ``fidelity_probe`` with their rung scores."""
    done = sorted(
        (t for t in trials if t.user_attrs.get(PROBE_ATTR) and t.state.name == "COMPLETE"),
        key=lambda t: t.number,
    )
    return [rung_scores(t.user_attrs.get("rungs") or []) for t in done]


@dataclass(frozen=True)
class Plan:
    """What to do with the next candidate: score it at ``rungs`` in turn (successive halving
    may stop it after any rung), or, for a ``probe``, at every rung and never prune it."""

    rungs: tuple[float, ...]
    probe: bool


class AutoFidelity:
    """Choose the cheap rung from measured rank fidelity (``search.fidelity.mode: auto``).

    The first ``warmup`` candidates are probes, scored at every fraction; once ``warmup`` probes
    are observed, the cheap rung is the smallest fraction whose tau against the full score (on
    the last ``window`` probes, every objective) is at least ``threshold``, or the full score
    alone if none is. After every ``recheck_every`` non-probe candidates, one more probe is
    planned and the choice is made again on the window, so it moves up when candidates become
    harder to tell apart as the search converges (and down when they are easy again).

    Ask :meth:`plan` for each new candidate; :meth:`observe` each probe's scores when it
    finishes. Candidates asked while the warm-up probes are still running are probes too (at
    most one per busy worker more than ``warmup``).

    >>> auto = AutoFidelity((0.25, 1.0), warmup=3)
    >>> auto.plan()
    Plan(rungs=(0.25, 1.0), probe=True)
    >>> for s in (0.1, 0.5, 0.9):
    ...     auto.observe({0.25: [s], 1.0: [s + 0.01]})
    >>> auto.fraction, auto.plan()
    (0.25, Plan(rungs=(0.25, 1.0), probe=False))
    """

    def __init__(
        self,
        fractions: Sequence[float],
        *,
        threshold: float = 0.8,
        warmup: int = 8,
        recheck_every: int = 16,
        window: int | None = None,
    ) -> None:
        f = tuple(float(x) for x in fractions)
        if len(f) < 2 or list(f) != sorted(set(f)) or f[-1] != FULL or f[0] <= 0:
            raise ValueError(
                f"fractions must increase within (0, 1], end at 1.0 and hold a cheaper one, "
                f"got {f}"
            )
        if warmup < 3 or recheck_every < 1 or not -1 <= threshold <= 1:
            raise ValueError(
                f"need warmup >= 3, recheck_every >= 1, -1 <= threshold <= 1; got {warmup}, "
                f"{recheck_every}, {threshold}"
            )
        self.fractions, self.threshold = f, threshold
        self.warmup, self.recheck_every = warmup, recheck_every
        self.window = window or warmup
        self.probes: list[dict[float, tuple[float, ...]]] = []
        self.chosen: float | None = None  # None: warming up
        self.since_probe = 0  # non-probe candidates planned since the last probe
        self.history: list[dict[str, Any]] = []  # one entry per decision (stored by the loop)

    @property
    def fraction(self) -> float:
        """The cheap rung in use (the full fraction while warming up)."""
        return FULL if self.chosen is None else self.chosen

    def plan(self) -> Plan:
        if self.chosen is None or self.since_probe >= self.recheck_every:
            self.since_probe = 0
            return Plan(self.fractions, probe=True)
        self.since_probe += 1
        return Plan((self.chosen, FULL) if self.chosen < FULL else (FULL,), probe=False)

    def observe(self, scores: Mapping[float, Sequence[float] | float]) -> None:
        """A probe's scores: fraction -> objective value(s); the full fraction is required."""
        probe = {
            float(f): (v,) if isinstance(v, int | float) else tuple(v) for f, v in scores.items()
        }
        if FULL not in probe:
            raise ValueError(f"a probe needs its full score (fraction 1.0), got {sorted(probe)}")
        self.probes.append(probe)
        if len(self.probes) >= self.warmup:
            self._decide()

    def _decide(self) -> None:
        taus = fraction_taus(self.probes[-self.window :])
        passing = [t.fraction for t in taus if t.worst >= self.threshold]
        self.chosen = min(passing, default=FULL)
        self.history.append(
            {
                "probes": len(self.probes),
                "fraction": self.chosen,
                "taus": {str(t.fraction): {"tau": list(t.taus), "n": t.n} for t in taus},
            }
        )

    @classmethod
    def replay(cls, probes: Iterable[Scores], **kwargs: Any) -> AutoFidelity:
        """The policy after the stored probes (a resumed run): ``probes`` in trial order."""
        auto = cls(**kwargs)
        for p in probes:
            auto.observe(p)
        return auto
