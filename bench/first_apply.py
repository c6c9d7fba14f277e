"""First apply against later applies on the trained SmolLM2 suite, with the compile split out.

Each method runs in one fresh process (``torch.compile``'s on-disk cache as the machine has
it): a Workspace over the suite's base and 3 experts, ``--applies`` recipes (per-expert weights
and densities over 2 layer groups, one seed), then a **second** Workspace in the same process
and the same recipes again. The second Workspace's first apply finds the fused kernels
compiled, so ``first - first_compiled`` is the one-off compile (per process, whatever the model
size) and ``first_compiled / later`` is what the merge itself pays the first time (caches
built: trimming bounds, DELLA ranks; DARE has nothing to build).

    python bench/first_apply.py --suite /work/smollm2_suite --methods ties dare_ties della
    python bench/first_apply.py --suite /work/smollm2_suite --methods dare_ties della \
        --cache-bytes 0 --name first_apply_cache_off     # every cache off

Writes ``bench/results/{--name}.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, median, write_json  # noqa: E402

POINTS = [(0.5, 1.0), (0.3, 0.8), (0.6, 0.7), (0.45, 0.9), (0.35, 0.6)]


def run_case(suite: Path, method: str, applies: int, tie_order: str,
             cache_bytes: int | None = None) -> dict[str, Any]:
    import torch

    from evomerge.config import LoadConfig
    from evomerge.merge.workspace import Workspace
    from evomerge.recipe import Recipe

    torch.set_num_threads(1)
    experts = sorted(p.name for p in (suite / "experts").iterdir() if p.is_dir())
    src = {"base": str(suite / "base"), **{e: str(suite / "experts" / e) for e in experts}}

    def recipe(d: float, w: float) -> Recipe:
        return Recipe(method=method, sources=src, base_model="base",
                      models={e: {"weight": [w, w], "density": [d, d + 0.1]} for e in experts},
                      parameters={"normalize": True}, seed=0)

    out: dict[str, Any] = {"method": method, "tie_order": tie_order, "cache_bytes": cache_bytes}
    load = LoadConfig.model_validate({"tie_order": tie_order, "merge_cache_bytes": cache_bytes})
    for run in ("cold", "compiled"):
        ws = Workspace(src, "base", load=load)
        times = []
        for d, w in POINTS[: applies + 1]:
            t = time.perf_counter()
            ws.apply(recipe(d, w))
            times.append(time.perf_counter() - t)
        out[run] = times
        del ws
    later = median(out["cold"][1:] + out["compiled"][1:])
    out.update(first_s=out["cold"][0], first_compiled_s=out["compiled"][0], later_s=later,
               compile_s=out["cold"][0] - out["compiled"][0],
               first_over_later=out["cold"][0] / later,
               compiled_first_over_later=out["compiled"][0] / later)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", type=Path, default=Path("smollm2_suite"))
    p.add_argument("--methods", nargs="+", default=["ties", "dare_ties", "della"])
    p.add_argument("--applies", type=int, default=3, help="later applies per Workspace")
    p.add_argument("--tie-order", default="index", choices=["index", "mergekit"])
    p.add_argument("--cache-bytes", type=int, help="load.merge_cache_bytes (0: no cache)")
    p.add_argument("--name", default="first_apply")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        spec = json.loads(args.case)
        print("RESULT " + json.dumps(run_case(Path(spec["suite"]), spec["method"],
                                              spec["applies"], spec["tie_order"],
                                              spec["cache_bytes"])), flush=True)
        return
    rows = []
    for method in args.methods:
        spec = {"suite": str(args.suite.resolve()), "method": method, "applies": args.applies,
                "tie_order": args.tie_order, "cache_bytes": args.cache_bytes}
        print(f"{method}: a fresh process ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(spec)],
                              capture_output=True, text=True, check=True)
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        rows.append(json.loads(line.removeprefix("RESULT ")))
    cols = ["method", "tie_order", "cache_bytes", "first_s", "compile_s", "first_compiled_s",
            "later_s",
            "first_over_later", "compiled_first_over_later"]
    print(format_table(rows, cols))
    print("wrote", write_json(args.name, settings=vars(args), results=rows))


if __name__ == "__main__":
    main()
