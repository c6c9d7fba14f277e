"""py-spy on this very process, summarised as inclusive and self sample shares per function.

>>> with PySpy(Path("/tmp/run.raw")) as spy:   # doctest: +SKIP
...     work()
>>> spy.summary()["inclusive"][:3]              # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


class PySpy:
    """``py-spy record --pid <this process> --format raw`` while the block runs."""

    def __init__(self, out: Path, *, rate: int = 50) -> None:
        if shutil.which("py-spy") is None:
            raise RuntimeError("py-spy is not installed; pip install py-spy, or drop --profile")
        self.out, self.rate = out, rate
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> PySpy:
        self.proc = subprocess.Popen(
            ["py-spy", "record", "--pid", str(os.getpid()), "--rate", str(self.rate),
             "--format", "raw", "--nonblocking", "-o", str(self.out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # attach before the work starts
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def summary(self, top: int = 25) -> dict[str, Any]:
        """Top functions by inclusive and by self share of the samples (``file:function``)."""
        return summarise(self.out.read_text() if self.out.exists() else "", top=top)


def summarise(raw: str, *, top: int = 25) -> dict[str, Any]:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_name(f) for f in stack.split(";")]
        for f in set(frames):
            inclusive[f] += n
        own[frames[-1]] += n
    share = (lambda c: [(f, round(100 * v / total, 1)) for f, v in c.most_common(top)]) \
        if total else (lambda c: [])
    return {"samples": total, "inclusive_pct": share(inclusive), "self_pct": share(own)}


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    parts = Path(m["file"]).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else m["file"]
    return f"{short}:{m['func']}"
