"""A worker reports its memory with every trial and gives the C heap's free pages back."""

from __future__ import annotations

import os

import pytest

from evomerge.search.worker import current_rss_mb, peak_rss_mb, trim_heap
from tests.test_scored_counts import recipe, worker  # noqa: F401  (the module fixture)


def test_trial_result_reports_memory(worker, tiny_models):  # noqa: F811
    out = worker.evaluate(recipe(tiny_models))
    assert 0 < out["rss_mb"] <= out["peak_rss_mb"]
    assert out["peak_rss_mb"] == pytest.approx(peak_rss_mb(), rel=0.05)


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="glibc malloc_trim is Linux's")
def test_trim_heap_returns_freed_heap_pages():
    """~300 MB freed in pieces between live blocks stays resident until the heap is trimmed
    (glibc only shrinks the top of its heap by itself)."""
    blocks, pins = [], []
    for _ in range(5_000):  # each under the mmap threshold, a live block after it
        blocks.append(bytearray(60_000))
        pins.append(bytearray(1_024))  # over pymalloc's 512 bytes: from the C heap
    blocks[-1][0] = 1
    before = current_rss_mb()
    del blocks
    held = current_rss_mb()
    trim_heap()
    after = current_rss_mb()
    assert before - held < 100  # freed, but still the process's pages
    assert held - after > 200  # back to the system
    assert len(pins) == 5_000
