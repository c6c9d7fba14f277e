"""The Pareto front of a two-objective run (``configs/smollm2_pareto.yaml``) as a PNG.

The points and the front are the dashboard's (``/jobs/{name}/pareto``: the same trial rows and
the same dominance test), so the plot and the service agree. Every COMPLETE trial is a dot, the
non-dominated ones are joined in order of x, baselines (uniform, defaults, each expert alone) and
the uniform task-arithmetic reference are labelled. With held-out scores stored, the front's
trials are also drawn at their held-out values (hollow) to show how far the front carries over.

    python bench/smollm2_pareto_plot.py /work/runs_smollm2/smollm2-pareto
    python bench/smollm2_pareto_plot.py RUN --out bench/results --name smollm2_pareto
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, new_figure, save_figure  # noqa: E402


def front_points(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """The dashboard's Pareto answer over the two objectives, the trial rows and the job."""
    from evomerge.runs.results import open_run
    from evomerge.service import views

    study, job = open_run(run_dir)
    if len(job.objectives) != 2:
        raise ValueError(f"{run_dir}: {len(job.objectives)} objective(s); the plot needs 2")
    rows = views.trial_rows(study, job)
    x, y = (f"objective:{o.label}" for o in job.objectives)
    out = views.pareto(rows, x, y, job.objectives[0].direction, job.objectives[1].direction)
    return out, rows, job


def plot(run_dir: Path, name: str, out_dir: Path) -> Path:
    out, rows, job = front_points(run_dir)
    by_trial = {r["trial"]: r for r in rows}
    fig, (ax,) = new_figure(width=6.5, height=5.0)
    pts = out["points"]
    ax.scatter([p["x"] for p in pts if p["dominated"]], [p["y"] for p in pts if p["dominated"]],
               s=18, color="0.6", label="trial (dominated)")
    front = [next(p for p in pts if p["trial"] == n) for n in out["front"]]
    ax.plot([p["x"] for p in front], [p["y"] for p in front], "o-", color="tab:red",
            label="Pareto front (fitness)")
    held = [(by_trial[p["trial"]].get(f"held_out:{out['x']}"),
             by_trial[p["trial"]].get(f"held_out:{out['y']}")) for p in front]
    held = [h for h in held if all(isinstance(v, int | float) for v in h)]
    if held:
        ax.scatter(*zip(*held, strict=True), facecolors="none", edgecolors="tab:red", s=60,
                   label="front, held-out")
    for p in pts:
        label = by_trial[p["trial"]].get("baseline")
        if label:
            ax.annotate(str(label), (p["x"], p["y"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    for r in rows:  # the reference merge(s): a row of their own
        if str(r.get("state")) == "REFERENCE" and isinstance(r.get(out["x"]), int | float):
            ax.scatter([r[out["x"]]], [r[out["y"]]], marker="*", s=90, color="tab:blue",
                       label=str(r["trial"]))
    ax.set_xlabel(out["x"].removeprefix("objective:"))
    ax.set_ylabel(out["y"].removeprefix("objective:"))
    ax.legend(fontsize=7)
    n = sum(1 for r in rows if r.get("state") == "COMPLETE")
    return save_figure(fig, name, subtitle=f"{job.name}, {n} complete trials",
                       out_dir=out_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--name", default="smollm2_pareto")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    print(plot(args.run_dir, args.name, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
