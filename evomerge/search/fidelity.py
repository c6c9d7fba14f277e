"""Multi-fidelity promotion: successive halving on the fraction of evaluation examples.

Single-objective studies use Optuna's ``SuccessiveHalvingPruner`` through ``trial.report`` /
``trial.should_prune``; rung ``r`` is reported at step ``reduction_factor ** r`` so every rung
is one of the pruner's promotion points. Multi-objective studies cannot use pruners, so
:func:`promote_multi` keeps a candidate when it is among the best ``1/reduction_factor`` of its
rung by Pareto dominance count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def rung_step(rung: int, reduction_factor: int) -> int:
    return int(reduction_factor**rung)


def dominates(a: Sequence[float], b: Sequence[float], signs: Sequence[int]) -> bool:
    """``a`` dominates ``b``; ``signs`` is +1 to maximise, -1 to minimise, per objective."""
    ge = all(s * x >= s * y for x, y, s in zip(a, b, signs, strict=True))
    gt = any(s * x > s * y for x, y, s in zip(a, b, signs, strict=True))
    return ge and gt


def promote_multi(
    values: Sequence[float],
    seen: Sequence[Sequence[float]],
    signs: Sequence[int],
    reduction_factor: int,
) -> bool:
    """Promote when fewer than ``len(seen) / reduction_factor`` earlier results dominate it."""
    if len(seen) < reduction_factor:
        return True
    beaten_by = sum(dominates(other, values, signs) for other in seen)
    return beaten_by < math.ceil(len(seen) / reduction_factor)
