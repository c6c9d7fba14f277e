"""Shared fixtures of the DFS engine tests: a family of tiny models (base + a, b, c) per
architecture, and a :class:`~evomerge.dfs.engine.DFSEngine` loaded over it.

Import the fixtures into a test module (``from tests.dfs_fixtures import engine, family``);
they are module-scoped and parametrised over :data:`ARCHS2`.
"""

from __future__ import annotations

import pytest
import torch

from evomerge.dfs.engine import DFSEngine
from tests.conftest import save_family

ARCHS2 = ("llama_gqa", "qwen2_tied")
PROMPTS = ["rev:abc>", "hello world", "x", "rev:qrstu>cba"]


@pytest.fixture(scope="module", params=ARCHS2)
def family(request, tmp_path_factory) -> tuple[str, dict[str, str]]:
    paths = save_family(tmp_path_factory.mktemp(request.param), request.param, scale=0.05)
    return request.param, {n: str(p) for n, p in paths.items()}


@pytest.fixture(scope="module")
def engine(family) -> DFSEngine:
    torch.set_num_threads(1)
    return DFSEngine(family[1])
