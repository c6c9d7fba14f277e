"""Greedy batched generation for the evaluators, built for scoring many similar candidates.

One batch of prompts is generated greedily with a KV cache, and three things keep it cheap:

- **the shared prompt prefix is computed once**: the longest token prefix every prompt of the
  batch starts with (a chat template's system turn, a task's instruction) runs at batch size 1
  and its cache rows are repeated for the batch; the rest of each prompt follows it, left-padded
  (the padding sits between the prefix and the prompt's own tokens, masked out);
- **drafts are verified in one pass** (:class:`Drafts`): the answer the previous candidate gave to
  the same prompt is appended to the prompt, one forward pass scores every position, and the
  longest prefix of the draft that greedy decoding would have produced is kept, plus the next
  greedy token, so an unchanged answer costs one pass instead of one step per token; a rejected
  draft's cache entries are masked out and decoding goes on from the first differing token;
- **a sequence leaves the batch at its end**: at EOS (any of the tokenizer's and the generation
  config's EOS ids) or once its decoded text contains a stop string; the loop ends when none is
  left.

The result is greedy decoding's: the same tokens as generating each prompt alone, up to the
float rounding that any change of batch shape brings (a near-tie between two tokens can flip,
as between batch sizes of plain ``generate``); ``tests/test_generation.py`` checks equality on
models with sharp logits, and the README gives the measured agreement on a real model.

>>> outs = generate_ids(model, tokenizer, [tokenizer("2+2=")["input_ids"]], max_new_tokens=4,
...                     stop=("\\n",))  # doctest: +SKIP
[('4', 2)]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_DRAFT = 32
"""Drafts longer than this are cut: verifying a long wrong draft costs its length per row."""


@dataclass
class Drafts:
    """The last answer (token ids, up to the one that ended it) given to each prompt.

    One lives in each evaluator; a search's consecutive candidates answer most prompts alike,
    so the previous answer is a draft that is usually accepted whole. ``hits``/``drafted`` count
    the drafted rows whose whole draft was accepted, for the cost report.
    """

    answers: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    max_len: int = MAX_DRAFT
    drafted: int = 0
    hits: int = 0

    def get(self, prompt: Sequence[int]) -> list[int]:
        return list(self.answers.get(tuple(prompt), ()))[: self.max_len]

    def put(self, prompt: Sequence[int], answer: list[int]) -> None:
        self.answers[tuple(prompt)] = list(answer[: self.max_len])


def pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every token id that ends a sequence: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    cfg = getattr(model, "generation_config", None)
    extra = getattr(cfg, "eos_token_id", None)
    if extra is not None:
        ids.update(int(i) for i in (extra if isinstance(extra, (list, tuple)) else [extra]))
    return frozenset(ids)


def left_pad(seqs: list[list[int]], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def cut(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to its first stop string, and whether one was found."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def answer_text(tokenizer: Any, new: list[int], stop: tuple[str, ...],
                ends: frozenset[int] = frozenset()) -> str:
    """The decoded answer, cut at its first EOS token and then at its first stop string."""
    ends = ends or frozenset([tokenizer.eos_token_id])
    first = next((k for k, t in enumerate(new) if t in ends), None)
    if first is not None:
        new = new[:first]
    return cut(tokenizer.decode(new, skip_special_tokens=True), stop)[0]


def common_prefix(seqs: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving each at least one token of its own."""
    if len(seqs) < 2:
        return 0
    limit = min(len(s) for s in seqs) - 1
    first = seqs[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return n


def generate_ids(model: Any, tokenizer: Any, seqs: list[list[int]], *, stop: tuple[str, ...],
                 **options: Any) -> list[tuple[str, int]]:
    """``(text cut at its first stop string, tokens generated)`` for each prompt's token ids;
    ``options`` are :func:`generate_tokens`'s (``max_new_tokens``, ``batch_size``, ``drafts``).

    The tokens generated run up to and including the one that completed a stop string or was
    EOS (at most ``max_new_tokens``). Prompts are sorted by length so a batch pads little; the
    output keeps the input order. With ``drafts``, each prompt's previous answer is verified
    first and the new answer stored.
    """
    ends = eos_ids(model, tokenizer)
    news = generate_tokens(model, tokenizer, seqs, stop=stop, **options)
    return [(answer_text(tokenizer, new, stop, ends), len(new)) for new in news]


def generate_tokens(
    model: Any,
    tokenizer: Any,
    seqs: list[list[int]],
    *,
    max_new_tokens: int,
    stop: tuple[str, ...],
    batch_size: int = 32,
    drafts: Drafts | None = None,
    special: bool = False,
) -> list[list[int]]:
    """The new token ids of each prompt, up to and including the one that ended it
    (``special``: see :func:`greedy_batch`)."""
    with torch.inference_mode():  # lm-eval calls in without a no-grad guard
        return _generate_tokens(model, tokenizer, seqs, max_new_tokens, stop, batch_size,
                                drafts, special)


def _generate_tokens(
    model: Any, tokenizer: Any, seqs: list[list[int]], max_new_tokens: int,
    stop: tuple[str, ...], batch_size: int, drafts: Drafts | None, special: bool,
) -> list[list[int]]:
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[list[int]] = [[] for _ in seqs]
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        batch = [list(seqs[i]) for i in idx]
        guesses = [drafts.get(s) for s in batch] if drafts is not None else None
        news = greedy_batch(model, tokenizer, batch, max_new_tokens, stop, guesses,
                            special=special)
        for i, seq, new in zip(idx, batch, news, strict=True):
            out[i] = new
            if drafts is not None:
                drafts.put(seq, new)
        if drafts is not None and guesses is not None:
            drafted = [(g, n) for g, n in zip(guesses, news, strict=True) if g]
            drafts.drafted += len(drafted)
            drafts.hits += sum(n == g for g, n in drafted)
    return out


class _End:
    """Where a sequence's new tokens end: at an EOS id or where a stop string completes."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], ends: frozenset[int],
                 max_new: int, special: bool) -> None:
        self.tokenizer, self.stop, self.ends, self.max_new = tokenizer, stop, ends, max_new
        self.special = special

    def __call__(self, new: list[int], checked: int) -> int | None:
        """The number of tokens to keep if ``new`` has ended (tokens before ``checked`` are known
        not to), else None."""
        for k in range(checked + 1, len(new) + 1):
            if new[k - 1] in self.ends:
                return k
            if any(self.stop):
                text = self.tokenizer.decode(new[:k], skip_special_tokens=not self.special)
                if cut(text, self.stop)[1]:
                    return k
            if k >= self.max_new:
                return k
        return None


def _forward(model: Any, **kw: Any) -> torch.Tensor:
    with warnings.catch_warnings():  # transformers 5.x renames it `cache`; the dfs path
        # model and older versions take `past_key_values` only
        warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
        return model(use_cache=True, **kw).logits  # type: ignore[no-any-return]


def greedy_batch(
    model: Any, tokenizer: Any, seqs: list[list[int]], max_new: int, stop: tuple[str, ...],
    guesses: list[list[int]] | None = None, *, special: bool = False,
) -> list[list[int]]:
    """The new token ids of each sequence, up to the one that ended it (see the module doc).

    Stop strings are looked for in the text decoded without special tokens (a special token
    decodes to "" inside a stop string), or with them if ``special`` (as lm-eval's stopping
    criteria do, so a stop string may be a special token's text)."""
    from transformers import DynamicCache

    device = model.device
    end = _End(tokenizer, stop, eos_ids(model, tokenizer), max_new, special)
    guesses = [g[:max_new] for g in guesses] if guesses else [[] for _ in seqs]
    cache = DynamicCache()
    shared = common_prefix(seqs)
    if shared:
        prefix = torch.tensor([seqs[0][:shared]], device=device)
        _forward(model, input_ids=prefix, position_ids=torch.arange(shared, device=device)[None],
                 past_key_values=cache, logits_to_keep=1)
        cache.batch_repeat_interleave(len(seqs))
    rows = [s[shared:] + g for s, g in zip(seqs, guesses, strict=True)]
    ids, own = left_pad(rows, pad_id(tokenizer), device)
    mask = torch.cat([torch.ones((len(seqs), shared), dtype=torch.long, device=device), own], 1)
    pos = (shared + own.cumsum(-1) - 1).clamp(min=shared)
    keep = max(len(g) for g in guesses) + 1
    preds = _forward(model, input_ids=ids, attention_mask=mask, position_ids=pos,
                     past_key_values=cache, logits_to_keep=keep).argmax(-1).tolist()
    new: list[list[int]] = []
    for row, g in enumerate(guesses):
        p = preds[row][keep - 1 - len(g):]  # the greedy token after the prompt, then after each
        # draft token
        took = next((j for j, t in enumerate(g) if p[j] != t), len(g))
        new.append(g[:took] + [p[took]])
        if took < len(g):  # the rejected draft tokens stay in the cache, masked out
            mask[row, mask.shape[1] - (len(g) - took):] = 0
    next_pos = [len(s) + len(n) - 1 for s, n in zip(seqs, new, strict=True)]
    alive: list[int] = []
    for i, n in enumerate(new):
        stop_at = end(n, 0)
        if stop_at is None:
            alive.append(i)
        else:
            new[i] = n[:stop_at]
    if len(alive) < len(seqs) and alive:
        mask = _select(cache, mask, alive)
    while alive:
        step = torch.tensor([[new[i][-1]] for i in alive], device=device)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        at = torch.tensor([[next_pos[i]] for i in alive], device=device)
        logits = _forward(model, input_ids=step, attention_mask=mask, position_ids=at,
                          past_key_values=cache, logits_to_keep=1)[:, -1]
        still = []
        for row, (i, token) in enumerate(zip(alive, logits.argmax(-1).tolist(), strict=True)):
            new[i].append(token)
            next_pos[i] += 1
            stop_at = end(new[i], len(new[i]) - 1)
            if stop_at is None:
                still.append(row)
            else:
                new[i] = new[i][:stop_at]
        if len(still) < len(alive) and still:
            mask = _select(cache, mask, still)
        alive = [alive[row] for row in still]
    return new


def _select(cache: Any, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Keep only ``rows`` of the batch: in the cache and in the mask."""
    index = torch.tensor(rows, device=mask.device)
    cache.batch_select_indices(index)
    return mask[index]
