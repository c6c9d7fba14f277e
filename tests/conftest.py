"""Shared fixtures: tiny Llama models saved as safetensors folders, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def make_tiny_llama(seed: int = 0, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.toy.tokenizer import make_tokenizer

    tok = make_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **{**TINY, **overrides},
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval(), tok


ARCHS = ("llama_gqa", "qwen2_tied", "gpt_neox")
"""Tiny architectures of :func:`make_tiny_arch`: Llama with grouped-query attention, Qwen2 with
tied embeddings (and q/k/v biases), GPT-NeoX (fused ``attention.query_key_value``)."""


def make_tiny_arch(arch: str, seed: int = 0):
    """A random tiny model of ``arch`` (one of :data:`ARCHS`) and the toy tokenizer."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch == "llama_gqa":
        return make_tiny_llama(seed=seed)
    from evomerge.toy.tokenizer import make_tokenizer

    tok = make_tokenizer()
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "qwen2_tied":
        cfg = Qwen2Config(**ids, **{**TINY, "tie_word_embeddings": True})
        cls = Qwen2ForCausalLM
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(**ids, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4, max_position_embeddings=64,
                            tie_word_embeddings=False)
        cls = GPTNeoXForCausalLM
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; one of {ARCHS}")
    torch.manual_seed(seed)
    return cls(cfg).eval(), tok


def save_family(root: Path, arch: str, names=("a", "b", "c"), scale: float = 0.02) -> dict:
    """``root/base`` (a random tiny ``arch``) and perturbed copies ``root/<name>``; returns
    name -> folder."""
    base, tok = make_tiny_arch(arch, seed=0)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    for i, name in enumerate(names, start=1):
        paths[name] = root / name
        m = perturbed(base, seed=i, scale=scale)
        if getattr(m.config, "tie_word_embeddings", False):
            m.tie_weights()
        m.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


def perturbed(model, seed: int, scale: float = 0.02):
    """A copy of ``model`` with a seeded random delta on every tensor (a fake fine-tune)."""
    import copy

    import torch

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folders ``base``, ``a``, ``b``, ``c``: a random tiny Llama and three perturbed copies."""
    root = tmp_path_factory.mktemp("tiny_models")
    base, tok = make_tiny_llama(seed=0)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    for i, name in enumerate(("a", "b", "c"), start=1):
        paths[name] = root / name
        m = perturbed(base, seed=i)
        m.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="session", params=ARCHS)
def arch_models(request, tmp_path_factory) -> tuple[str, dict[str, Path]]:
    """``(arch, {"base", "a", "b", "c": folder})`` for every tiny architecture in
    :data:`ARCHS` (tests using it run once per architecture)."""
    return request.param, save_family(tmp_path_factory.mktemp(request.param), request.param)


def pytest_collection_modifyitems(config, items):
    """The full lane holds every test; the fast lane (``-m "not slow"``) leaves out those that
    start a Ray cluster (the ``ray_local`` fixture here, or ``pytest.mark.slow`` on tests that
    run ``evomerge search`` in a subprocess)."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (``ray.init`` costs seconds and ~1 GB)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def search_suite(tmp_path_factory) -> dict:
    """The toy-suite layout (base/, experts/<task>/, data/<task>/{validation,test}.jsonl) with
    random tiny models: enough for search tests, built in about a second."""
    import json
    import random

    root = tmp_path_factory.mktemp("search_suite")
    base, tok = make_tiny_llama(seed=0)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    tasks = ["a", "b"]
    for i, task in enumerate(tasks, start=1):
        m = perturbed(base, seed=i, scale=0.05)
        m.save_pretrained(root / "experts" / task)
        tok.save_pretrained(root / "experts" / task)
        rng = random.Random(i)
        for split, n in (("validation", 600), ("test", 64)):
            rows = [
                {"prompt": f"{task}:" + "".join(rng.choices("abcdef", k=8)) + ">", "answer": "x"}
                for _ in range(n)
            ]
            path = root / "data" / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"dir": root, "expert_tasks": tasks}


class SubsetRun:
    """A ``search.fidelity.subset`` search on :func:`search_suite` (random sampler, held-out
    top 1) and the checks the subset tests share (``tests/test_subset_upfront.py``,
    ``tests/test_anchor_subsets.py``, ``tests/test_subset_confirm.py``)."""

    def __init__(self, suite: dict, run_dir: Path) -> None:
        self.suite, self.run_dir = suite, run_dir

    def job_dict(self, subset: dict, trials: int) -> dict:
        from tests.test_search import job_dict

        return job_dict(self.suite, self.run_dir, trials=trials, held_out_top_k=1,
                        sampler={"name": "random", "seed": 2}, fidelity={"subset": subset})

    def check_and_resume(self, study, job, data: dict, line: str, more: int) -> list:
        """The held-out pass scored in full (64 test examples), the summary's ``fitness
        subset:`` line; then ``--resume`` with ``more`` trials reuses the stored subset and
        completes them. Returns the trials the resumed run added."""
        from optuna.trial import TrialState

        from evomerge.config import parse_job
        from evomerge.runs.summary import run_summary
        from evomerge.search.anchors import SUBSET_ATTR
        from evomerge.search.driver import run_search

        task = self.suite["expert_tasks"][0]
        held = [v for k, v in study.user_attrs.items() if k.startswith("held_out:")]
        assert held and all(h["metrics"][f"scored/examples/entropy/{task}"] == 64 for h in held)
        assert line in " ".join(run_summary(study, job).split())
        trials = len(study.get_trials(deepcopy=False))
        search = {**data["search"], "trials": data["search"]["trials"] + more}
        again = run_search(parse_job({**data, "search": search}), resume=True, progress=False)
        assert again.user_attrs[SUBSET_ATTR] == study.user_attrs[SUBSET_ATTR]  # not drawn again
        new = [t for t in again.get_trials(deepcopy=False) if t.number >= trials]
        assert len([t for t in new if t.state == TrialState.COMPLETE]) == more
        return new


@pytest.fixture
def subset_run(search_suite, tmp_path) -> SubsetRun:
    """:class:`SubsetRun` in this test's ``tmp_path / "run"``."""
    return SubsetRun(search_suite, tmp_path / "run")
