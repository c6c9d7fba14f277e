"""A character-level tokenizer built with ``tokenizers``, wrapped as a real HF fast tokenizer."""

from __future__ import annotations

import string

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = string.digits + string.ascii_lowercase + " +-*=:>|,.?\n"


def make_tokenizer(*, padding_side: str = "left"):  # -> PreTrainedTokenizerFast
    """One token per character of :data:`CHARS`, plus pad/bos/eos/unk.

    ``padding_side`` is set in the constructor so ``save_pretrained`` keeps it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    bos = vocab["<s>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side=padding_side,
    )
