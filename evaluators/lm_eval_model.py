"""The lm-eval harness' ``HFLM``, extended for scoring many candidates of one search.

:func:`counting_lm_class` adds two things to lm-eval's Hugging Face model wrapper: it counts the
tokens each task generated or scored (the evaluation cost, ``tokens:*``), and it routes plain
greedy ``generate_until`` batches through :mod:`evomerge.evaluators.generation` (the shared
prefix computed once, the previous candidate's answers as drafts); sampling or other generation
arguments stay on lm-eval's own path. :func:`generate_like_hf` returns what ``model.generate``
would, so lm-eval post-processes it unchanged.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from typing import Any

from evomerge.evaluators.generation import Drafts, generate_tokens, pad_id


@functools.cache
def counting_lm_class() -> Any:
    """``HFLM`` that also counts, per task, the tokens it generated or scored (``tokens``)."""
    from lm_eval.models.huggingface import HFLM

    class CountingHFLM(HFLM):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.tokens: Counter[str] = Counter()
            self.drafts: Drafts | None = None  # set by the evaluator (``speculative``)

        def _count(self, requests: Any, texts: Sequence[str]) -> None:
            for req, text in zip(requests, texts, strict=True):
                self.tokens[req.task_name] += len(self.tok_encode(text, add_special_tokens=False))

        def _model_generate(self, context: Any, max_length: int, stop: list[str],
                            **kwargs: Any) -> Any:
            """Greedy requests on :mod:`evomerge.evaluators.generation` (see the module doc);
            anything else (sampling, other generation arguments) on lm-eval's own path."""
            mask = kwargs.pop("attention_mask", None)
            if self.drafts is None or mask is None or not is_greedy(kwargs):
                return super()._model_generate(context, max_length=max_length, stop=stop,
                                               attention_mask=mask, **kwargs)
            return generate_like_hf(self.model, self.tokenizer, context, mask,
                                    max_length - context.shape[1], tuple(stop), self.drafts)

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            out = super().generate_until(requests, disable_tqdm)
            self._count(requests, out)
            return out

        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            self._count(requests, [req.args[1] for req in requests])  # the continuations
            return super().loglikelihood(requests, disable_tqdm)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            self._count(requests, [req.args[0] for req in requests])
            return super().loglikelihood_rolling(requests, disable_tqdm)

    return CountingHFLM


def is_greedy(kwargs: dict[str, Any]) -> bool:
    """Whether lm-eval's remaining generation arguments ask for plain greedy decoding."""
    if set(kwargs) - {"do_sample", "temperature"}:
        return False
    return not kwargs.get("do_sample") and not kwargs.get("temperature")


def generate_like_hf(
    model: Any, tokenizer: Any, context: Any, mask: Any, max_new: int, stop: tuple[str, ...],
    drafts: Drafts,
) -> Any:
    """What ``model.generate`` returns for a left-padded greedy batch: the context, then each
    row's new tokens, padded with the pad token (lm-eval cuts it at the stop strings)."""
    import torch

    seqs = [row[m.bool()].tolist() for row, m in zip(context, mask, strict=True)]
    news = generate_tokens(model, tokenizer, seqs, max_new_tokens=max_new, stop=stop,
                           batch_size=len(seqs), drafts=drafts, special=True)
    width = max(len(n) for n in news)
    out = torch.full((len(seqs), context.shape[1] + width), pad_id(tokenizer),
                     dtype=context.dtype, device=context.device)
    out[:, : context.shape[1]] = context
    for row, new in enumerate(news):
        out[row, context.shape[1] : context.shape[1] + len(new)] = torch.tensor(new)
    return out
