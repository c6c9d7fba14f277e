"""Evaluators over plain texts (entropy, perplexity): data loading and right-padded batches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from evomerge.evaluators.base import default_label, effective_limit, read_jsonl, resolve_data


def encode_right_padded(
    tokenizer: Any, texts: list[str], *, max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize ``texts`` with right padding (real tokens keep positions 0..n-1)."""
    enc = tokenizer(
        texts,
        padding=True,
        padding_side="right",
        truncation=max_length is not None,
        max_length=max_length,
        return_tensors="pt",
    )
    return enc["input_ids"], enc["attention_mask"]


def model_max_length(model: Any) -> int | None:
    """The longest input the model's position embeddings allow, if the config says."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def load_texts(path: Path, field: str) -> list[str]:
    """The ``field`` of every row; rows without it but with ``prompt`` and ``answer`` (the toy
    data) give ``prompt + answer`` when ``field`` is ``text``. Errors name the file and line."""
    rows = read_jsonl(path)
    texts = []
    for lineno, row in enumerate(rows, start=1):
        if field in row:
            value = row[field]
        elif field == "text" and "prompt" in row and "answer" in row:
            value = f"{row['prompt']}{row['answer']}"
        else:
            raise ValueError(
                f"{path}: row {lineno} has no {field!r} (keys: {sorted(row)}); set the "
                f"evaluator's 'field' to the key holding the text"
            )
        if not isinstance(value, str) or not value:
            raise ValueError(f"{path}: row {lineno}: {field!r} must be a non-empty string")
        texts.append(value)
    return texts


class TextEvaluator:
    """Shared part of the text evaluators: the texts of one split and their batches.

    Subclasses set ``name`` (the metric prefix) and implement ``evaluate``. ``num_examples``
    is what a full evaluation scores (the split, capped by ``cfg.limit``): the worker's
    fidelity fractions are fractions of it.
    """

    name = "text"

    def __init__(self, cfg: Any, *, split: str | None = None) -> None:
        self.cfg = cfg
        self.path = resolve_data(cfg.data, split or cfg.split)
        self.texts = load_texts(self.path, cfg.field)
        self.num_examples = effective_limit(len(self.texts), cfg.limit)
        self.label = f"{self.name}/{cfg.label or default_label(cfg.data)}"
        self.metric = self.label

    def count(self, limit: int | None) -> int:
        """Texts scored under ``limit`` (the smaller of ``limit`` and ``cfg.limit``)."""
        return effective_limit(len(self.texts), limit, self.cfg.limit)

    def batches(
        self, model: Any, tokenizer: Any, *, limit: int | None, max_length: int | None,
        texts: list[str] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Right-padded ``(ids, mask)`` on the model's device, ``cfg.batch_size`` texts each,
        over the first ``limit`` texts (the smaller of ``limit`` and ``cfg.limit``), or over
        ``texts`` when given."""
        texts = self.texts[: self.count(limit)] if texts is None else texts
        bs = self.cfg.batch_size
        for lo in range(0, len(texts), bs):
            ids, mask = encode_right_padded(tokenizer, texts[lo : lo + bs], max_length=max_length)
            yield ids.to(model.device), mask.to(model.device)
