"""A small, seeded CPU training loop for the toy suite's tiny LlamaForCausalLM.

Each example is encoded as ``<s> prompt answer \\n``; the loss covers only ``answer \\n``. A
mixture of tasks is sampled by weight; ``trainable`` freezes every other parameter (the experts
fine-tune chosen layers only). Same seed, same thread count -> same weights.

>>> from evomerge.toy.tokenizer import make_tokenizer
>>> tok = make_tokenizer()
>>> model = make_model(tok, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
...                    num_attention_heads=2, num_key_value_heads=1)
>>> data = {"copy": encode_rows([{"prompt": "cpy:ab>", "answer": "ab"}], tok)}
>>> losses = train(model, data, {"copy": 1.0}, steps=2, batch_size=2, lr=1e-3)
>>> len(losses)
2
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

Encoded = tuple[Tensor, Tensor]  # (input_ids, labels), right-padded, labels -100 off-answer


def make_model(tokenizer: Any, *, seed: int = 0, **arch: Any) -> Any:
    """A freshly initialised LlamaForCausalLM sized for ``tokenizer`` (``arch``: config fields)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **{"max_position_embeddings": 64, **arch},
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def encode_rows(rows: Sequence[Mapping[str, str]], tokenizer: Any) -> Encoded:
    """Token ids of ``<s> prompt answer \\n`` and labels that are -100 outside ``answer \\n``."""
    if not rows:
        raise ValueError("encode_rows got no rows; give at least one {prompt, answer} row")
    prompts = tokenizer([r["prompt"] for r in rows])["input_ids"]
    seqs = tokenizer([r["prompt"] + r["answer"] + "\n" for r in rows])["input_ids"]
    starts = [len(p) for p in prompts]
    for row, p, full in zip(rows, prompts, seqs, strict=True):
        if full[: len(p)] != p:
            raise ValueError(f"prompt {row['prompt']!r} does not tokenize as a prefix")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, start : len(seq)] = ids[i, start : len(seq)]
    return ids, labels


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _pool(data: Mapping[str, Encoded], weights: Mapping[str, float]) -> tuple[Encoded, Tensor]:
    """All rows of the weighted tasks in one tensor, with a sampling probability per row."""
    unknown = set(weights) - set(data)
    if unknown:
        raise ValueError(f"mixture weights name tasks without data: {sorted(unknown)}")
    names = [t for t, w in weights.items() if w > 0]
    width = max(data[t][0].shape[1] for t in names)
    ids, labels, probs = [], [], []
    for t in names:
        x, y = data[t]
        pad = width - x.shape[1]
        ids.append(torch.nn.functional.pad(x, (0, pad), value=0))  # after the answer: unseen
        labels.append(torch.nn.functional.pad(y, (0, pad), value=-100))
        probs.append(torch.full((x.shape[0],), weights[t] / x.shape[0], dtype=torch.float64))
    return (torch.cat(ids), torch.cat(labels)), torch.cat(probs)


def train(
    model: Any,
    data: Mapping[str, Encoded],
    weights: Mapping[str, float],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    warmup: int = 20,
    trainable: Callable[[str], bool] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place with AdamW on the ``weights`` mixture; returns the step losses.
    ``on_step(steps_done, loss)`` is called after every step (progress)."""
    (ids, labels), probs = _pool(data, weights)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(trainable is None or trainable(name))
        if p.requires_grad:
            params.append(p)
    if not params:
        raise ValueError("trainable() froze every parameter; nothing to train")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        idx = torch.multinomial(probs, batch_size, replacement=True, generator=gen)
        y = labels[idx]
        width = int((y != -100).nonzero()[:, 1].max()) + 1
        x, y = ids[idx, :width], y[:, :width]
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return losses
