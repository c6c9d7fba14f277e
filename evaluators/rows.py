"""The row kinds of the accuracy evaluator's JSONL, and whether a saved tokenizer has a chat
template, checked without torch (preflight uses them).

>>> row_kind([{"prompt": "2+2=", "answer": "4"}], "d.jsonl")
'generate'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def row_kind(rows: list[dict[str, Any]], path: Any) -> str:
    """``"generate"`` ({prompt, answer} rows) or ``"choices"`` ({prompt, choices, label});
    ValueError naming ``path`` and the first row that does not fit the first row's kind."""
    kind = "choices" if "choices" in rows[0] else "generate"
    need = ("choices", "label") if kind == "choices" else ("answer",)
    for lineno, row in enumerate(rows, start=1):
        missing = [k for k in need if k not in row]
        if missing:
            raise ValueError(
                f"{path}: row {lineno} lacks {missing}; every row must be {{prompt, answer}} "
                f"or every row {{prompt, choices, label}} (row 1 is {kind!r})"
            )
        if kind == "choices":
            _check_choices(row, path, lineno)
    return kind


def _check_choices(row: dict[str, Any], path: Any, lineno: int) -> None:
    choices, label = row["choices"], row["label"]
    if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
        raise ValueError(f"{path}: row {lineno}: 'choices' must be a non-empty list of strings")
    ok = (isinstance(label, int) and 0 <= label < len(choices)) or label in choices
    if isinstance(label, bool) or not ok:
        raise ValueError(
            f"{path}: row {lineno}: label {label!r} is neither an index into the "
            f"{len(choices)} choices nor one of them"
        )


def has_chat_template(folder: str | Path) -> bool:
    """Whether the tokenizer saved in ``folder`` has a chat template, read without transformers
    (``chat_template.jinja``/``.json``, or ``chat_template`` in ``tokenizer_config.json``): a
    preflight check for ``chat_template: true``."""
    folder = Path(folder)
    if any((folder / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (ValueError, AttributeError):
        return False
