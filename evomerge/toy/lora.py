"""Seeded LoRA fine-tuning of a chat model on ``{prompt, answer}`` rows, merged into full weights.

``prompt`` is already the chat-templated text (it ends with the assistant header), so the
training sequence is ``prompt answer <eos>`` and the loss covers ``answer <eos>`` only: the
expert learns to answer the way it is asked at evaluation time. The adapter (peft, rank
``rank`` on every attention and MLP projection) is merged into the weights afterwards, so an
expert is a plain model of the base's architecture, as merging needs.

>>> expert = lora_finetune(base, tokenizer, rows, steps=60)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.toy.train import lr_at

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def encode_chat_rows(
    rows: Sequence[Mapping[str, str]], tokenizer: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids of ``prompt answer <eos>`` and labels (-100 outside ``answer <eos>``)."""
    if not rows:
        raise ValueError("encode_chat_rows got no rows; give at least one {prompt, answer} row")
    eos = tokenizer.eos_token_id
    seqs, starts = [], []
    for r in rows:
        prompt = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
        seqs.append(prompt + answer + [eos])
        starts.append(len(prompt))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), eos, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, start : len(seq)] = ids[i, start : len(seq)]
    return ids, labels


def lora_finetune(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, str]],
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    rank: int = 8,
    warmup: int = 5,
    seed: int = 0,
    progress: Any = None,
) -> Any:
    """A copy of ``model`` LoRA-tuned on ``rows`` with the adapter merged in (``model`` kept).

    ``progress`` is called with each step's loss (a tqdm bar's ``update`` wrapper, say).
    """
    import copy

    from peft import LoraConfig, get_peft_model

    ids, labels = encode_chat_rows(rows, tokenizer)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(TARGETS))
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    peft_model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        idx = torch.randint(0, ids.shape[0], (batch_size,), generator=gen)
        y = labels[idx]
        width = int((y != -100).nonzero()[:, 1].max()) + 1
        loss = peft_model(input_ids=ids[idx, :width], labels=y[:, :width]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if progress is not None:
            progress(loss.item())
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged.eval()
