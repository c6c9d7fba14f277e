"""How job-config errors read: the strict base model and one line per problem.

:class:`Strict` refuses an unknown key with the allowed keys and the closest match;
:func:`format_validation_error` names each problem by its dotted key (``evaluators.1.split``).
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class ConfigError(ValueError):
    """A job config that cannot be used; the message names the key and the fix."""


class Strict(BaseModel):
    """Base: frozen, and an unknown key is refused with the allowed keys listed."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = set(cls.model_fields) | {
                f.alias for f in cls.model_fields.values() if f.alias
            }
            for key in data:
                if key not in allowed:
                    close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    raise ValueError(
                        f"unknown key {key!r}.{hint} Allowed keys: {', '.join(sorted(allowed))}"
                    )
        return data


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each naming the dotted key."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not _is_union_tag(p))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "union_tag_invalid":
            ctx = e.get("ctx", {})
            tags = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
            from evomerge.registry import unknown_name_message

            msg = unknown_name_message("name", ctx.get("tag", ""), tags)
            loc = f"{loc}.name" if loc else "name"
        lines.append(f"{loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and part in _UNION_TAGS


_UNION_TAGS = {
    "entropy",
    "accuracy",
    "perplexity",
    "lm_eval",
    "cost",
    "parameter",
    "dfs",
    "cmaes",
    "nsga2",
    "tpe",
    "random",
    "grid",
}
