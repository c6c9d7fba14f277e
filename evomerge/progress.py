"""The search progress bar: trials done/total, best value, evaluations per minute, ETA.

The best value is tracked from the values the driver tells, not read back from storage: a
storage read per trial would make the driver's cost grow with the study.
"""

from __future__ import annotations

import math
import time

import optuna


class Progress:
    def __init__(self, study: optuna.Study, *, total: int, initial: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.start = time.time()
        self.initial = initial
        self.failed = 0
        self.sign = 0
        if len(study.directions) == 1:
            self.sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
        self.best = -math.inf
        done = [t.values[0] for t in study.get_trials(deepcopy=False) if t.values]
        for v in done if self.sign else []:
            self.best = max(self.best, self.sign * v)
        self.bar = tqdm(
            total=total, initial=initial, desc=study.study_name, unit="trial",
            disable=not enabled, dynamic_ncols=True,
        )

    def update(self, *, values: list[float] | None = None, error: str | None = None) -> None:
        self.failed += error is not None
        if values and self.sign:
            self.best = max(self.best, self.sign * values[0])
        minutes = (time.time() - self.start) / 60
        rate = (self.bar.n + 1 - self.initial) / minutes if minutes > 0 else 0.0
        best = f"{self.sign * self.best:.4g}" if self.sign and self.best > -math.inf else "-"
        self.bar.set_postfix_str(f"best={best} evals/min={rate:.1f} failed={self.failed}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
