"""Merge throughput: one candidate ``Workspace.apply`` vs a plain tensor copy and vs mergekit.

A ~100M-parameter Llama with random weights is the base; experts are the base plus seeded noise,
saved once as safetensors folders. For each method (task_arithmetic, ties, dare_ties,
breadcrumbs_ties, della, sce) with per-layer coefficients and K experts, it times:

- ``Workspace.apply`` per candidate (median over ``--reps``, fresh coefficients every time, the
  recipe seed fixed as in a search), after one warm-up apply (``first_s``) that compiles the
  fused kernels and builds the Workspace caches (entry ranks for TIES and breadcrumbs, DARE
  levels, DELLA codes; sce has no fused path and runs its reference kernel, vectorised);
- *bytes moved*, the least a candidate must touch: read K task vectors and the base, write one
  model, in the model dtype: ``(K + 2) * params * itemsize``; GB/s = bytes / time;
- a plain ``dst.copy_(src)`` over tensors with the model's shapes moving the same bytes (read +
  write), in the same process and thread setting; ratio = merge GB/s / copy GB/s;
- mergekit 0.1.5 on the same merge: ``run_merge`` from the safetensors folders to a temporary
  output folder (the I/O a per-candidate mergekit search pays; files are in the page cache), and
  its in-memory ``merge_state_dicts`` on preloaded state dicts.

    python bench/merge_bandwidth.py                 # CPU, K = 2: ~9 minutes on 2 busy cores
    python bench/merge_bandwidth.py --size 10m --compile-min-numel 0   # quick: ~4 minutes
    python bench/merge_bandwidth.py --ks 2 4 8      # the full table (~45 minutes there)
    python bench/merge_bandwidth.py --device cuda --ks 2 4 8 --reps 10
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import (  # noqa: E402
    format_table,
    machine,
    median,
    new_figure,
    save_figure,
    timed,
    write_json,
)
from bench.merge_models import build_models, mergekit_config, mergekit_params  # noqa: E402
from evomerge.config import LoadConfig  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402

NAME = "merge_bandwidth"
METHODS = ("task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della", "sce")
COLUMNS = ["method", "K", "apply_s", "first_s", "GB", "GB_per_s", "copy_GB_per_s", "ratio",
           "target", "mk_io_s", "mk_mem_s", "speedup_io", "speedup_mem"]
TARGET = {"task_arithmetic": 0.7, "ties": 0.4, "dare_ties": 0.4, "breadcrumbs_ties": 0.4,
          "della": 0.4, "sce": None}
"""Bandwidth targets of the fused (pointwise) paths; None: no fused path (reference kernel)."""

# Per-model parameters besides ``weight`` (low, high of the per-layer draw) and global ones (a
# scalar draw) of each method. Hook for more methods (e.g. nuslerp, registered in
# evomerge/merge/methods_more.py): add its name to METHODS, its TARGET and its entries here.
MODEL_PARAMS: dict[str, dict[str, tuple[float, float]]] = {
    "task_arithmetic": {},
    "ties": {"density": (0.3, 0.9)},
    "dare_ties": {"density": (0.3, 0.9)},
    "breadcrumbs_ties": {"density": (0.6, 0.95), "gamma": (0.005, 0.05)},
    "della": {"density": (0.3, 0.7), "epsilon": (0.05, 0.15)},
    "sce": {},
}
GLOBAL_PARAMS: dict[str, dict[str, tuple[float, float]]] = {"sce": {"select_topk": (0.2, 0.8)}}


def make_recipe(method: str, paths: dict[str, str], k: int, layers: int, seed: int) -> Recipe:
    """Per-layer weights (and densities) drawn from ``seed``: every candidate differs. The
    recipe's own ``seed`` (DARE masks) stays 0, as in a search, where it is fixed per study."""
    gen = torch.Generator().manual_seed(seed)

    def draw(low: float, high: float) -> tuple[float, ...]:
        noise = torch.rand(layers, generator=gen)
        return tuple(round(low + (high - low) * float(x), 4) for x in noise)

    from evomerge.merge.methods_spec import METHODS as SPECS

    experts = [f"e{i}" for i in range(k)]
    models: dict[str, dict] = {}
    for e in experts:
        models[e] = {"weight": draw(0.2, 1.0)} if "weight" in SPECS[method].model_params else {}
        for key, (low, high) in MODEL_PARAMS[method].items():
            models[e][key] = draw(low, high)
    parameters = {key: draw(low, high)[0] for key, (low, high) in
                  GLOBAL_PARAMS.get(method, {}).items()}
    sources = {"base": paths["base"], **{e: paths[e] for e in experts}}
    return Recipe(method=method, sources=sources, base_model="base", models=models,
                  parameters=parameters)


def sync_for(device: str):
    return torch.cuda.synchronize if device.startswith("cuda") else None


def copy_job(shapes: list[torch.Size], copies: int, dtype: torch.dtype,
             device: str) -> tuple[Callable[[], None], int]:
    """A function doing ``copies`` passes of per-tensor ``dst.copy_(src)`` over ``shapes``,
    and the bytes it moves (read + write)."""
    numel = sum(s.numel() for s in shapes)
    src = torch.randn(copies * numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    pairs, offset = [], 0
    for _ in range(copies):
        for s in shapes:
            n = s.numel()
            pairs.append((dst[offset:offset + n].view(s), src[offset:offset + n].view(s)))
            offset += n

    def run() -> None:
        for d, s in pairs:
            d.copy_(s)

    run()
    return run, 2 * src.numel() * src.element_size()


def bench_workspace(method: str, paths: dict[str, str], k: int, args, layers: int) -> dict:
    """Median apply time, with the copy of the same bytes timed right after each apply (so
    both see the same machine load)."""
    from evomerge.merge.workspace import Workspace

    sources = {"base": paths["base"], **{f"e{i}": paths[f"e{i}"] for i in range(k)}}
    ws = Workspace(sources, "base", load=LoadConfig(dtype=args.dtype, device=args.device))
    sync = sync_for(args.device)
    first = timed(partial(ws.apply, make_recipe(method, paths, k, layers, 0)), sync=sync)
    params = list(ws.model.parameters())
    numel = sum(p.numel() for p in params)
    moved = (k + 2) * numel * params[0].element_size()
    copies = (k + 3) // 2  # (k + 2) / 2 models read and as many written: (k + 2) models moved
    copy, copy_bytes = copy_job([p.shape for p in params], copies, params[0].dtype, args.device)
    times, copy_times = [], []
    for rep in range(1, args.reps + 1):
        recipe = make_recipe(method, paths, k, layers, rep)
        times.append(timed(partial(ws.apply, recipe), sync=sync))
        copy_times.append(timed(copy, sync=sync))
    del ws, params, copy
    gc.collect()
    out = {"apply_s": median(times), "apply_all_s": times, "first_s": first, "params": numel,
           "bytes": moved, "GB": moved / 1e9, "copy_s": median(copy_times),
           "copy_bytes": copy_bytes}
    out["GB_per_s"] = moved / 1e9 / out["apply_s"]
    out["copy_GB_per_s"] = copy_bytes / 1e9 / out["copy_s"]
    out["ratio"] = out["GB_per_s"] / out["copy_GB_per_s"]
    return out


def bench_mergekit(method: str, paths: dict[str, str], k: int, args, layers: int) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.merge_methods.api import merge_state_dicts
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    out: dict = {}
    io_times = []
    for rep in range(1, args.mergekit_reps + 1):
        recipe = make_recipe(method, paths, k, layers, rep)
        config = MergeConfiguration.model_validate(mergekit_config(recipe, args.dtype))
        options = MergeOptions(device=args.device, quiet=True, write_model_card=False,
                               random_seed=rep)
        with tempfile.TemporaryDirectory(prefix="mk_out_") as tmp:
            io_times.append(timed(partial(run_merge, config, tmp, options)))
    out["mk_io_s"], out["mk_io_all_s"] = median(io_times), io_times
    names = ["base", *(f"e{i}" for i in range(k))]
    dtype = getattr(torch, args.dtype)
    sds = {n: {key: t.to(args.device, dtype)
               for key, t in load_file(str(Path(paths[n]) / "model.safetensors")).items()}
           for n in names}
    mem_times = []
    for rep in range(1, args.mergekit_reps + 1):
        recipe = make_recipe(method, paths, k, layers, rep)
        params = {**mergekit_params(recipe, list(sds["base"]), layers), **recipe.parameters}
        merge = partial(merge_state_dicts, sds, method, parameters=params, base="base")
        mem_times.append(timed(merge, sync=sync_for(args.device)))
    out["mk_mem_s"], out["mk_mem_all_s"] = median(mem_times), mem_times
    del sds
    gc.collect()
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--ks", type=int, nargs="+", default=[2], help="experts (full run: 2 4 8)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--reps", type=int, default=3, help="timed Workspace.apply calls")
    p.add_argument("--mergekit-reps", type=int, default=1, help="timed mergekit runs (0: skip)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared box)")
    p.add_argument("--size", default="100m", choices=["100m", "10m"], help="model size")
    p.add_argument("--compile-min-numel", type=int, default=None,
                   help="compile the fused kernels for tensors this large (default: the "
                        "Workspace's own threshold; 0 compiles every tensor of the 10m model)")
    p.add_argument("--models-dir", help="keep the saved models here (default: a temp dir)")
    p.add_argument("--out", default=NAME, help="name of the JSON/PNG in bench/results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.compile_min_numel is not None:
        from evomerge.merge import kernels

        kernels.COMPILE_MIN_NUMEL = args.compile_min_numel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    info = machine()
    root = Path(args.models_dir or tempfile.mkdtemp(prefix="evomerge_bench_"))
    try:
        paths, model_info = build_models(root, max(args.ks), size=args.size, dtype=args.dtype)
        rows = run_all(args, paths, model_info["num_hidden_layers"])
    finally:
        if not args.models_dir:
            shutil.rmtree(root, ignore_errors=True)
    print(format_table(rows, COLUMNS))
    settings = {**vars(args), "torch_threads": torch.get_num_threads(), "model": model_info,
                "bytes_moved": "(K + 2) * params * itemsize: read K task vectors + base, "
                               "write one model",
                "copy": "per-tensor dst.copy_(src), model shapes, same bytes (read + write)",
                "mergekit_io": "run_merge from safetensors folders (page cache) to a temp dir",
                "mergekit_mem": "mergekit.merge_methods.api.merge_state_dicts on loaded dicts"}
    print("wrote", write_json(args.out, settings=settings, results=rows, info=info))
    try:
        print("wrote", plot(rows, args))
    except ModuleNotFoundError as err:  # matplotlib is optional: the JSON holds the results
        print(f"no plot ({err})")


def run_all(args: argparse.Namespace, paths: dict[str, str], layers: int) -> list[dict]:
    rows = []
    for k in args.ks:
        for method in args.methods:
            row = {"method": method, "K": k, "target": TARGET[method]}
            row.update(bench_workspace(method, paths, k, args, layers))
            if args.mergekit_reps:
                row.update(bench_mergekit(method, paths, k, args, layers))
                row["speedup_io"] = row["mk_io_s"] / row["apply_s"]
                row["speedup_mem"] = row["mk_mem_s"] / row["apply_s"]
            print(format_table([row], COLUMNS), flush=True)
            rows.append(row)
            gc.collect()
    return rows


def plot(rows: list[dict], args: argparse.Namespace) -> Path:
    fig, (ax1, ax2) = new_figure(2)
    for method in args.methods:
        sel = [r for r in rows if r["method"] == method]
        ks = [r["K"] for r in sel]
        ax1.plot(ks, [r["ratio"] for r in sel], marker="o", label=method)
        ax2.plot(ks, [r["apply_s"] for r in sel], marker="o", label=f"evomerge {method}")
        if args.mergekit_reps:
            ax2.plot(ks, [r["mk_io_s"] for r in sel], ls="--", marker="x",
                     label=f"mergekit+I/O {method}")
    for method, target in TARGET.items():
        if method in args.methods and target is not None:
            ax1.axhline(target, ls=":", color="grey")
    ax1.set(xlabel="experts K", ylabel="merge GB/s / copy GB/s", title="bandwidth ratio")
    ax2.set(xlabel="experts K", ylabel="seconds per candidate", yscale="log",
            title="time per candidate")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=6)
    subtitle = f"{args.device} {args.dtype}, {args.threads} thread(s)"
    return save_figure(fig, args.out, subtitle=subtitle)


if __name__ == "__main__":
    main()
