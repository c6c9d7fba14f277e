"""AdaMerging (Yang et al., ICLR 2024): learn merge coefficients by test-time entropy minimisation.

``theta(lambda) = theta_0 + sum_k lambda_k tau_k`` with one lambda per expert (task-wise) or per
expert and decoder layer (layer-wise; embeddings, final norm and head share layer 0's value, the
recipe's ``non_layer: first`` rule), initialised at ``cfg.init`` and kept in [0, 1] by clamping
after each Adam step. The loss is the mean Shannon entropy of the merged model's predictions on
unlabeled prompts -- by default at the positions that predict the merged model's own greedy
answer, the analogue of the paper's entropy of the predicted class -- computed through
``torch.func.functional_call`` on one live model (no model copy per step).

AdaMerging++ (``cfg.ties``) first trims each task vector to its top ``density`` by magnitude and
keeps, at every step, only entries agreeing with the elected sign of ``sum_k lambda_k tau_k``
(TIES without the disjoint mean) -- exactly what the ``ties`` merge method does with
``normalize: false``, so the returned Recipe reproduces the learned weights.

Entropy rewards confidence, not correctness: a labeled metric is tracked beside it.

>>> from evomerge.config import AdaMergingConfig
>>> res = adamerge("base/", {"a": "a/", "b": "b/"}, cfg=AdaMergingConfig(steps=100),
...                unlabeled=["rev:abc>", "srt:312>"])  # doctest: +SKIP
>>> res.recipe.method, res.lambdas["a"][:2]  # doctest: +SKIP
('task_arithmetic', (0.31, 0.29))
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from evomerge.config import AdaMergingConfig, LoadConfig
from evomerge.evaluators.entropy import (
    Positions,
    forward_with,
    mean_entropy,
    right_pad,
    scored_batch,
)
from evomerge.merge.coefficients import layer_group, layer_index
from evomerge.recipe import Recipe


@dataclass(frozen=True)
class TaskVectors:
    """The base's parameters, the stacked task vectors ``(K, *shape)`` and each tensor's group."""

    experts: tuple[str, ...]
    base: dict[str, Tensor]
    deltas: dict[str, Tensor]
    group: dict[str, int]
    groups: int
    consensus: bool


@dataclass
class AdaMergingResult:
    """Learned coefficients, the Recipe that reproduces them, and the per-step log."""

    recipe: Recipe
    lambdas: dict[str, tuple[float, ...]]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    model: Any = field(default=None, repr=False)  # the base model, now holding theta(lambda)
    tokenizer: Any = field(default=None, repr=False)


def task_vectors(
    base: Mapping[str, Tensor],
    experts: Mapping[str, Mapping[str, Tensor]],
    *,
    num_layers: int,
    layer_wise: bool,
    ties: bool = False,
    density: float = 1.0,
) -> TaskVectors:
    """``tau_k = theta_k - theta_0`` in float32 for every floating tensor of ``base``, TIES-
    trimmed to ``density`` per tensor and expert if ``ties`` (the merge engine's own trimming)."""
    from evomerge.merge.merge_methods import sparsify

    groups = num_layers if layer_wise else 1
    names = [n for n, t in base.items() if t.is_floating_point()]
    deltas, group = {}, {}
    for name in names:
        stacked = torch.stack([experts[e][name].float() for e in experts]) - base[name].float()
        if ties:
            sparsify("ties", stacked, density=[density] * len(experts))
        deltas[name] = stacked
        layer = layer_index(name)
        group[name] = 0 if layer is None else layer_group(layer, groups, num_layers)
    base32 = {n: base[n].float() for n in names}
    return TaskVectors(tuple(experts), base32, deltas, group, groups, ties)


def merged_params(tv: TaskVectors, lambdas: Tensor) -> dict[str, Tensor]:
    """``theta(lambda)`` for ``lambdas`` of shape ``(K, groups)``; differentiable in lambdas.

    With ``tv.consensus`` an entry of ``lambda_k tau_k`` counts only if its sign agrees with the
    sign of the sum over experts (ties go to +); the mask itself carries no gradient.
    """
    out = {}
    for name, delta in tv.deltas.items():
        lam = lambdas[:, tv.group[name]].reshape(-1, *([1] * (delta.dim() - 1)))
        weighted = lam * delta
        if tv.consensus:
            with torch.no_grad():
                majority = (weighted.sum(0) >= 0).float() * 2 - 1
                keep = weighted.sign() == majority
            weighted = weighted * keep
        out[name] = tv.base[name] + weighted.sum(0)
    return out


def to_recipe(
    tv: TaskVectors, lambdas: Tensor, sources: Mapping[str, str], *, density: float
) -> Recipe:
    """The Recipe the merge engine applies to reproduce ``merged_params(tv, lambdas)``."""
    models: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(tv.experts):
        values = [float(x) for x in lambdas[k].tolist()]
        weight: float | tuple[float, ...] = values[0] if tv.groups == 1 else tuple(values)
        models[name] = {"weight": weight, **({"density": density} if tv.consensus else {})}
    return Recipe(
        method="ties" if tv.consensus else "task_arithmetic",
        sources=dict(sources),
        base_model="base",
        models=models,
        parameters={"normalize": False, "lambda": 1.0},
        non_layer="first",
    )


def teacher_forced_match(
    model: Any, params: Mapping[str, Tensor], tokenizer: Any, rows: Sequence[Mapping[str, Any]]
) -> float:
    """Fraction of labeled rows whose answer tokens are all the argmax given the gold prefix."""
    seqs, spans = [], []
    for row in rows:
        p = tokenizer(row["prompt"])["input_ids"]
        a = tokenizer(str(row["answer"]), add_special_tokens=False)["input_ids"]
        seqs.append(p + a)
        spans.append((len(p), len(p) + len(a)))
    ids = right_pad(seqs, int(tokenizer.pad_token_id))
    with torch.no_grad():
        logits = forward_with(model, params)(input_ids=ids.to(model.device)).logits
    pred = logits.argmax(-1).cpu()
    hits = [bool((pred[i, lo - 1 : hi - 1] == ids[i, lo:hi]).all()) for i, (lo, hi) in
            enumerate(spans)]
    return sum(hits) / len(hits)


# -- the optimisation loop ---------------------------------------------------------------------
def load_models(
    base: str, experts: Mapping[str, str], device: str = "cpu"
) -> tuple[Any, Any, dict[str, dict[str, Tensor]]]:
    """The base model (float32, eval, frozen), its tokenizer and each expert's parameters,
    checked to share the base's architecture and tensor shapes."""
    from evomerge.merge.loading import check_compatible, load_model, load_tokenizer

    load = LoadConfig(dtype="float32", device=device)
    model = load_model("base", base, load=load).requires_grad_(False)
    params = {}
    for name, path in experts.items():
        other = load_model(name, path, load=load)
        check_compatible("base", model, name, other)
        params[name] = {n: p.detach() for n, p in other.named_parameters()}
    return model, load_tokenizer("base", base, load=load), params


def _batches(n: int, size: int, seed: int):
    """Endless mini-batches of row indices: shuffled epochs from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=gen)
        for lo in range(0, n - min(size, n) + 1, min(size, n)):
            yield perm[lo : lo + size]


def adamerge(
    base: str,
    experts: Mapping[str, str],
    *,
    cfg: AdaMergingConfig,
    unlabeled: list[str],
    labeled: Sequence[Mapping[str, Any]] | None = None,
    positions: Positions = "answer",
    device: str = "cpu",
    eval_every: int = 10,
    progress: bool = True,
) -> AdaMergingResult:
    """Learn AdaMerging coefficients for ``experts`` (name -> path) merged into ``base``.

    The loss is the entropy of the merged model's predictions on ``unlabeled`` prompts at
    ``positions`` (see :func:`scored_batch`): ``answer`` (default) scores the model's own greedy
    answer, regenerated each step; ``last`` only the answer's first token (2-3x faster);
    ``prompt`` every prompt token, as the ``entropy`` evaluator (on the toy suite this rewards
    guessing the random input and costs accuracy). ``labeled`` rows ``{prompt, answer}`` give the
    teacher-forced exact match logged every ``eval_every`` steps. ``result.model`` is the base
    model holding the merged weights.
    """
    if not unlabeled:
        raise ValueError("unlabeled is empty; AdaMerging needs prompts to adapt on")
    if "base" in experts:
        raise ValueError("'base' is reserved for the base model; rename that expert")
    t0 = time.perf_counter()
    model, tok, loaded = load_models(base, experts, device)
    tv = task_vectors(
        {n: p.detach() for n, p in model.named_parameters()}, loaded,
        num_layers=model.config.num_hidden_layers, layer_wise=cfg.granularity == "layer",
        ties=cfg.ties, density=cfg.density,
    )
    del loaded
    lambdas = torch.full((len(experts), tv.groups), cfg.init, device=model.device)
    history = _optimise(model, tok, tv, lambdas, cfg, unlabeled, labeled or [],
                        positions=positions, eval_every=eval_every, progress=progress)
    with torch.no_grad():
        model.load_state_dict(merged_params(tv, lambdas), strict=False)
    return AdaMergingResult(
        recipe=to_recipe(tv, lambdas, {"base": base, **experts}, density=cfg.density),
        lambdas={e: tuple(lambdas[k].tolist()) for k, e in enumerate(tv.experts)},
        history=history, seconds=time.perf_counter() - t0, model=model, tokenizer=tok,
    )


def _optimise(
    model: Any, tok: Any, tv: TaskVectors, lambdas: Tensor, cfg: AdaMergingConfig,
    unlabeled: list[str], labeled: Sequence[Mapping[str, Any]], *, positions: Positions,
    eval_every: int, progress: bool,
) -> list[dict[str, float]]:
    """Adam on ``lambdas`` in place, clamped to [0, 1] after every step; returns the log."""
    from tqdm.auto import tqdm

    lambdas.requires_grad_(True)
    opt = torch.optim.Adam([lambdas], lr=cfg.lr)
    batches = _batches(len(unlabeled), cfg.batch_size, cfg.seed)
    history: list[dict[str, float]] = []
    bar = tqdm(range(cfg.steps), desc="adamerging", disable=not progress)
    for step in bar:
        params = merged_params(tv, lambdas)
        ids, pick = scored_batch(model, params, tok, [unlabeled[i] for i in next(batches)],
                                 positions)
        loss = mean_entropy(model, params, ids.to(model.device), pick.to(model.device))
        record = {"step": float(step + 1), "entropy": loss.item()}
        if labeled and (step % eval_every == 0 or step == cfg.steps - 1):
            record["val_tf_match"] = teacher_forced_match(model, params, tok, labeled)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            lambdas.clamp_(0.0, 1.0)
        history.append(record)
        bar.set_postfix(entropy=f"{record['entropy']:.4f}", **_last_val(history))
    lambdas.requires_grad_(False)
    return history


def _last_val(history: list[dict[str, float]]) -> dict[str, str]:
    val = [h["val_tf_match"] for h in history if "val_tf_match" in h]
    return {"val": f"{val[-1]:.3f}"} if val else {}


# -- the `evomerge adamerge JOB.yaml` entry point ----------------------------------------------
def job_data(job: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """Unlabeled prompts (entropy evaluators' data, else accuracy evaluators' prompts) and
    labeled ``{prompt, answer}`` rows (accuracy evaluators' data), on each evaluator's split."""
    from evomerge.evaluators.base import read_jsonl, resolve_data
    from evomerge.evaluators.text import load_texts

    unlabeled: list[str] = []
    labeled: list[dict[str, Any]] = []
    for ev in job.evaluators:
        if ev.name == "entropy":
            unlabeled += load_texts(resolve_data(ev.data, ev.split), ev.field)
        elif ev.name == "accuracy":
            rows = read_jsonl(resolve_data(ev.data, ev.split), required=("prompt",))
            labeled += [r for r in rows if "answer" in r]
    if not unlabeled:
        unlabeled = [r["prompt"] for r in labeled]
    if not unlabeled:
        raise ValueError(
            "adamerging needs unlabeled prompts: add an 'entropy' (or 'accuracy') evaluator "
            "whose data holds them"
        )
    return unlabeled, labeled


def adamerge_job(job: Any, *, progress: bool = True, labeled: bool = True) -> AdaMergingResult:
    """AdaMerging as ``job.adamerging`` says (its defaults where the job has none) on the job's
    fitness data; ``labeled=False`` skips the labeled metric's log (faster)."""
    if job.models.base is None:
        raise ValueError("adamerging merges task vectors: set models.base")
    cfg = job.adamerging or AdaMergingConfig.model_validate({})
    torch.set_num_threads(job.resources.torch_threads)
    unlabeled, rows = job_data(job)
    experts = {name: m.path for name, m in job.models.experts.items()}
    return adamerge(
        job.models.base.path, experts, cfg=cfg, unlabeled=unlabeled,
        labeled=rows[:256] if labeled else None, device=job.load.device, progress=progress,
    )


def run_adamerging(job: Any, *, progress: bool = True) -> AdaMergingResult:
    """Run AdaMerging as ``job.adamerging`` says, score the result with the job's evaluators
    (fitness and held-out splits) and write ``<run_dir>/adamerging/{recipe.yaml, result.json}``.
    """
    import json
    import sys

    from evomerge.evaluators.base import build_evaluator
    from evomerge.search.worker import has_held_out

    cfg = job.adamerging or AdaMergingConfig.model_validate({})
    result = adamerge_job(job, progress=progress)
    metrics: dict[str, dict[str, float]] = {"fitness": {}, "held_out": {}}
    for ev_cfg in job.evaluators:
        held_out = "test" if ev_cfg.name == "lm_eval" else (
            ev_cfg.held_out_split if has_held_out(ev_cfg) else None)
        for part, split in (("fitness", None), ("held_out", held_out)):
            if part == "fitness" or split is not None:
                ev = build_evaluator(ev_cfg, split=split)
                metrics[part].update(ev.evaluate(result.model, result.tokenizer))
    out = job.resolved_run_dir / "adamerging"
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(result.recipe.to_yaml())
    summary = {"lambdas": result.lambdas, "metrics": metrics, "seconds": result.seconds,
               "config": cfg.model_dump(), "history": result.history}
    (out / "result.json").write_text(json.dumps(summary, indent=1))
    for part, scores in metrics.items():
        for key, value in scores.items():
            print(f"{part} {key}: {value:.4f}", file=sys.stderr)
    print(f"adamerging: wrote {out / 'recipe.yaml'} and {out / 'result.json'}", file=sys.stderr)
    return result
