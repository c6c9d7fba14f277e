"""Exact-match accuracy on local JSONL, by batched greedy generation or by log-likelihood.

Rows are either ``{"prompt", "answer"}`` (greedy generation with a KV cache, left padding, cut
at the first stop string, exact match after ``normalize``) or ``{"prompt", "choices", "label"}``
(the choice with the highest summed log-likelihood after the prompt wins; ``label`` is the index
of the right choice, or its text). One file holds one kind of row; ``field`` names the key
holding the prompt (default ``prompt``).

``chat_template: true`` renders each prompt as the user turn of the tokenizer's chat template
(after ``system``, if given) with the assistant header appended, the way an instruct model
expects; the default stop then is only the end of the turn (EOS), so a multi-line answer (a
pretty-printed JSON object) is not cut at its first newline. Without it the default stop is
``"\n"``. Generation is :mod:`evomerge.evaluators.generation`'s: the prompts' shared prefix is
computed once per batch, a sequence that has stopped leaves the batch, and with ``speculative``
(the default) each prompt's previous answer (from the last candidate this evaluator scored) is
verified in one forward pass instead of being generated token by token.

>>> from evomerge.config import AccuracyEvalConfig
>>> cfg = AccuracyEvalConfig(name="accuracy", data="toy_suite/data/reverse")  # doctest: +SKIP
>>> AccuracyEvaluator(cfg).evaluate(model, tokenizer)  # doctest: +SKIP
{'accuracy/reverse': 0.97, 'scored/examples/accuracy/reverse': 200.0, ...}
"""

from __future__ import annotations

from typing import Any

import torch

from evomerge.evaluators.base import (
    Subset,
    default_label,
    effective_limit,
    per_example_record,
    read_jsonl,
    resolve_data,
    scored,
    subset_of,
    weighted_mean,
)
from evomerge.evaluators.generation import Drafts, generate_ids, left_pad, pad_id
from evomerge.evaluators.rows import row_kind

NORMALIZERS = {
    "none": lambda s: s,
    "strip": lambda s: s.strip(),
    "lower_strip": lambda s: s.strip().lower(),
}


class AccuracyEvaluator:
    """``evaluate(model, tokenizer) -> {"accuracy/<label>": fraction correct, scored/...}``."""

    name = "accuracy"

    def __init__(self, cfg: Any, *, split: str | None = None) -> None:
        self.cfg = cfg
        self.path = resolve_data(cfg.data, split or cfg.split)
        self.rows = read_jsonl(self.path, required=(cfg.field,))
        self.kind = row_kind(self.rows, self.path)
        self.num_examples = effective_limit(len(self.rows), cfg.limit)
        self.label = f"accuracy/{cfg.label or default_label(cfg.data)}"
        self.metric = self.label
        default_stop = () if cfg.chat_template else ("\n",)
        self.stop: tuple[str, ...] = default_stop if cfg.stop is None else tuple(cfg.stop)
        self.drafts = Drafts() if cfg.speculative else None

    def evaluate(
        self, model: Any, tokenizer: Any, *, limit: int | None = None,
        subset: Subset | None = None, per_example: dict[str, Any] | None = None,
    ) -> dict[str, float]:
        """Score the first ``limit`` rows (the smaller of ``limit`` and ``cfg.limit``), or the
        rows ``subset[label]`` names (the metric: their weighted mean); ``per_example`` gets
        each scored row's 0/1 hit (see :mod:`evomerge.evaluators.base`)."""
        chosen = subset_of(subset, self.label, self.num_examples, limit)
        if chosen is None:
            rows = self.rows[: effective_limit(len(self.rows), limit, self.cfg.limit)]
            weights = [1.0] * len(rows)
        else:
            rows, weights = [self.rows[i] for i in chosen[0]], chosen[1]
        prompts = self.prompt_ids(tokenizer, rows)
        bs = self.cfg.batch_size
        with torch.inference_mode():
            if self.kind == "generate":
                norm = NORMALIZERS[self.cfg.normalize]
                outs = generate_ids(model, tokenizer, prompts, stop=self.stop, batch_size=bs,
                                    max_new_tokens=self.cfg.max_new_tokens, drafts=self.drafts)
                hits = [norm(text) == norm(str(r["answer"]))
                        for (text, _), r in zip(outs, rows, strict=True)]
                tokens = sum(n for _, n in outs)
            else:
                picks, tokens = choose_counted(model, tokenizer, rows, prompts, batch_size=bs)
                hits = [pick == _label_index(r) for pick, r in zip(picks, rows, strict=True)]
        if per_example is not None:
            per_example[self.label] = per_example_record([float(h) for h in hits])
        return {self.metric: weighted_mean([float(h) for h in hits], weights),
                **scored(self.label, examples=len(rows), tokens=tokens)}

    def prompt_ids(self, tokenizer: Any, rows: list[dict[str, Any]]) -> list[list[int]]:
        """The token ids of each row's prompt, rendered with the chat template if configured."""
        texts = [str(r[self.cfg.field]) for r in rows]
        if not self.cfg.chat_template:
            return list(tokenizer(texts)["input_ids"])
        check_chat_template(tokenizer, self.label)
        rendered = [chat_text(tokenizer, t, system=self.cfg.system) for t in texts]
        # the template writes any BOS itself: the tokenizer must not add another
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def check_chat_template(tokenizer: Any, label: str) -> None:
    """ValueError (one line, with the fix) if ``tokenizer`` has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        where = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"{label}: chat_template is true but the tokenizer of {where!r} has no chat "
            "template; set chat_template: false and put the rendered prompts in the data, or "
            "use a model whose tokenizer has one (chat_template.jinja or tokenizer_config.json)"
        )


def chat_text(tokenizer: Any, user: str, *, system: str | None = None) -> str:
    """``user`` as a user turn (after ``system``) in the chat template, ending with the
    assistant header (``add_generation_prompt=True``)."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": user})
    return str(tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True))


def _label_index(row: dict[str, Any]) -> int:
    label = row["label"]
    return label if isinstance(label, int) else row["choices"].index(label)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    stop: tuple[str, ...] = ("\n",),
    batch_size: int = 32,
) -> list[str]:
    """Greedy continuations of ``prompts``, each cut at its first stop string (or EOS)."""
    if not prompts:
        return []
    seqs = list(tokenizer(list(prompts))["input_ids"])
    outs = generate_ids(model, tokenizer, seqs, max_new_tokens=max_new_tokens, stop=stop,
                        batch_size=batch_size)
    return [text for text, _ in outs]


def choose(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, batch_size: int = 32
) -> list[int]:
    """For each row, the index of the choice with the highest summed log-likelihood."""
    prompts = list(tokenizer([r["prompt"] for r in rows])["input_ids"])
    return choose_counted(model, tokenizer, rows, prompts, batch_size=batch_size)[0]


def choose_counted(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], prompts: list[list[int]], *,
    batch_size: int = 32,
) -> tuple[list[int], int]:
    """:func:`choose` on the given prompt token ids; also the number of choice tokens scored."""
    pairs: list[tuple[list[int], int]] = []  # (tokens, number of choice tokens at the end)
    for lineno, (row, prompt) in enumerate(zip(rows, prompts, strict=True), start=1):
        for choice in row["choices"]:
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
            if not cont:
                raise ValueError(f"row {lineno}: choice {choice!r} has no tokens; remove it")
            pairs.append((prompt + cont, len(cont)))
    batches = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
    flat = torch.cat([_loglik(model, tokenizer, b) for b in batches]).tolist()
    picks, at = [], 0
    for row in rows:
        scores = flat[at : at + len(row["choices"])]
        picks.append(scores.index(max(scores)))  # the first of equal scores
        at += len(scores)
    return picks, sum(n for _, n in pairs)


def _loglik(model: Any, tokenizer: Any, pairs: list[tuple[list[int], int]]) -> torch.Tensor:
    ids, mask = left_pad([p for p, _ in pairs], pad_id(tokenizer), model.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    width = ids.shape[1] - 1
    keep = torch.arange(width, device=ids.device)[None, :] >= width - torch.tensor(
        [n for _, n in pairs], device=ids.device
    )[:, None]
    return (logp * keep).sum(-1).cpu()
