"""Shared pieces of the benchmark scripts: the machine record, the table, JSON and PNG output.

Every benchmark prints a table, writes ``bench/results/<script>.json`` (machine, date, versions,
settings, results) and, where a picture helps, ``bench/results/<script>.png``.

>>> rows = [{"k": 2, "s": 0.5}]
>>> print(format_table(rows, ["k", "s"]))
k  s
-  ---
2  0.5
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("evomerge", "torch", "transformers", "optuna", "ray", "mergekit", "numpy")


def machine() -> dict[str, Any]:
    """Where and when this ran: CPU, cores, memory, load, GPU, Python and package versions."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "versions": versions(),
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    info["gpu"] = _gpu()
    return info


def versions(packages: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor()
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def timed(fn: Callable[[], Any], *, sync: Callable[[], None] | None = None) -> float:
    """Seconds one call of ``fn`` takes (``sync`` runs before both clock reads, e.g. CUDA)."""
    if sync:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table (also valid Markdown-ish), floats to 4 significant digits."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [_line(list(columns), widths), "  ".join("-" * w for w in widths)]
    lines += [_line(row, widths) for row in cells]
    return "\n".join(lines)


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_json(name: str, *, settings: dict[str, Any], results: Any,
               info: dict[str, Any] | None = None, out_dir: Path = RESULTS) -> Path:
    """Write ``out_dir/<name>.json`` with the machine record, settings and results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "machine": info or machine(), "settings": settings,
              "results": results}
    record["machine"]["loadavg_end"] = list(os.getloadavg())
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def new_figure(ncols: int = 1, *, width: float = 6.0, height: float = 4.0) -> tuple[Any, Any]:
    """A matplotlib (Agg) figure with ``ncols`` axes side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig: Any, name: str, *, subtitle: str = "", out_dir: Path = RESULTS) -> Path:
    """Save ``fig`` as ``out_dir/<name>.png`` with the machine and date in the title."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{_cpu_model()} x{os.cpu_count()}, {_dt.date.today().isoformat()}"
    fig.suptitle(f"{name}: {subtitle}\n{stamp}" if subtitle else f"{name}\n{stamp}", fontsize=9)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
