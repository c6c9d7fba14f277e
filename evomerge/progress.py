"""The search progress bar: trials done/total, best value, evaluations per minute, ETA."""

from __future__ import annotations

import time

import optuna


class Progress:
    def __init__(self, study: optuna.Study, *, total: int, initial: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.study = study
        self.start = time.time()
        self.initial = initial
        self.failed = 0
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=study.study_name,
            unit="trial",
            disable=not enabled,
            dynamic_ncols=True,
        )

    def update(self, *, error: str | None = None) -> None:
        self.failed += error is not None
        minutes = (time.time() - self.start) / 60
        rate = (self.bar.n + 1 - self.initial) / minutes if minutes > 0 else 0.0
        self.bar.set_postfix_str(f"best={self._best()} evals/min={rate:.1f} failed={self.failed}")
        self.bar.update(1)

    def _best(self) -> str:
        try:
            if len(self.study.directions) == 1:
                return f"{self.study.best_value:.4g}"
            return f"front:{len(self.study.best_trials)}"
        except ValueError:
            return "-"

    def close(self) -> None:
        self.bar.close()
