"""Exact-match accuracy on local JSONL, by batched greedy generation or by log-likelihood.

Rows are either ``{"prompt", "answer"}`` (greedy generation with a KV cache, left padding, cut
at the first stop string, exact match after ``normalize``) or ``{"prompt", "choices", "label"}``
(the choice with the highest summed log-likelihood after the prompt wins; ``label`` is the index
of the right choice, or its text). One file holds one kind of row.

>>> from evomerge.config import AccuracyEvalConfig
>>> cfg = AccuracyEvalConfig(name="accuracy", data="toy_suite/data/reverse")  # doctest: +SKIP
>>> AccuracyEvaluator(cfg).evaluate(model, tokenizer)  # doctest: +SKIP
{'accuracy/reverse': 0.97}
"""

from __future__ import annotations

from typing import Any

import torch

from evomerge.evaluators.base import default_label, effective_limit, read_jsonl, resolve_data
from evomerge.evaluators.rows import row_kind

NORMALIZERS = {
    "none": lambda s: s,
    "strip": lambda s: s.strip(),
    "lower_strip": lambda s: s.strip().lower(),
}


class AccuracyEvaluator:
    """``evaluate(model, tokenizer) -> {"accuracy/<label>": fraction correct}``."""

    name = "accuracy"

    def __init__(self, cfg: Any, *, split: str | None = None) -> None:
        self.cfg = cfg
        self.path = resolve_data(cfg.data, split or cfg.split)
        self.rows = read_jsonl(self.path, required=("prompt",))
        self.kind = row_kind(self.rows, self.path)
        self.num_examples = len(self.rows)
        self.metric = f"accuracy/{cfg.label or default_label(cfg.data)}"

    def evaluate(
        self, model: Any, tokenizer: Any, *, limit: int | None = None
    ) -> dict[str, float]:
        """Score the first ``limit`` rows (the smaller of ``limit`` and ``cfg.limit``)."""
        rows = self.rows[: effective_limit(len(self.rows), limit, self.cfg.limit)]
        bs = self.cfg.batch_size
        with torch.inference_mode():
            if self.kind == "generate":
                norm = NORMALIZERS[self.cfg.normalize]
                outs = generate(
                    model, tokenizer, [r["prompt"] for r in rows],
                    max_new_tokens=self.cfg.max_new_tokens, stop=self.cfg.stop, batch_size=bs,
                )
                hits = [norm(o) == norm(str(r["answer"])) for o, r in zip(outs, rows, strict=True)]
            else:
                picks = choose(model, tokenizer, rows, batch_size=bs)
                hits = [
                    pick == _label_index(r)
                    for pick, r in zip(picks, rows, strict=True)
                ]
        return {self.metric: sum(hits) / len(hits)}


def _label_index(row: dict[str, Any]) -> int:
    label = row["label"]
    return label if isinstance(label, int) else row["choices"].index(label)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


def _left_pad(seqs: list[list[int]], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    stop: tuple[str, ...] = ("\n",),
    batch_size: int = 32,
) -> list[str]:
    """Greedy continuations of ``prompts``, each cut at its first stop string (or EOS).

    Prompts are sorted by length so a batch pads little; the output keeps the input order.
    """
    if not prompts:
        return []
    enc = tokenizer(list(prompts))["input_ids"]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out: list[str] = [""] * len(enc)
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        texts = _greedy_batch(model, tokenizer, [enc[i] for i in idx], max_new_tokens, stop)
        for i, text in zip(idx, texts, strict=True):
            out[i] = text
    return out


def _cut(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _greedy_batch(
    model: Any, tokenizer: Any, seqs: list[list[int]], max_new: int, stop: tuple[str, ...]
) -> list[str]:
    from transformers import DynamicCache

    ids, mask = _left_pad(seqs, _pad_id(tokenizer), model.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    eos = tokenizer.eos_token_id
    tail = max((len(s) for s in stop), default=0)
    new = torch.empty((len(seqs), 0), dtype=torch.long, device=ids.device)
    done = torch.zeros(len(seqs), dtype=torch.bool, device=ids.device)
    step_ids = ids
    for _ in range(max_new):
        logits = model(
            input_ids=step_ids, attention_mask=mask, position_ids=pos,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        ).logits[:, -1]
        nxt = logits.argmax(-1)
        new = torch.cat([new, nxt[:, None]], dim=1)
        if eos is not None:
            done |= nxt == eos
        if tail:  # a stop string ends in the last ``tail`` tokens (each >= 1 character)
            texts = tokenizer.batch_decode(new[:, -tail:], skip_special_tokens=True)
            done |= torch.tensor([_cut(t, stop)[1] for t in texts], device=done.device)
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
    texts = []
    for row in new.tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        texts.append(_cut(tokenizer.decode(row, skip_special_tokens=True), stop)[0])
    return texts


def choose(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, batch_size: int = 32
) -> list[int]:
    """For each row, the index of the choice with the highest summed log-likelihood."""
    pairs: list[tuple[list[int], int]] = []  # (tokens, number of choice tokens at the end)
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        for choice in row["choices"]:
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
            if not cont:
                raise ValueError(f"choice {choice!r} of prompt {row['prompt']!r} has no tokens")
            pairs.append((prompt + cont, len(cont)))
    batches = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
    flat = torch.cat([_loglik(model, tokenizer, b) for b in batches]).tolist()
    picks, at = [], 0
    for row in rows:
        scores = flat[at : at + len(row["choices"])]
        picks.append(scores.index(max(scores)))  # the first of equal scores
        at += len(scores)
    return picks


def _loglik(model: Any, tokenizer: Any, pairs: list[tuple[list[int], int]]) -> torch.Tensor:
    ids, mask = _left_pad([p for p, _ in pairs], _pad_id(tokenizer), model.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    width = ids.shape[1] - 1
    keep = torch.arange(width, device=ids.device)[None, :] >= width - torch.tensor(
        [n for _, n in pairs], device=ids.device
    )[:, None]
    return (logp * keep).sum(-1).cpu()
