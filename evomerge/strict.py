"""How job-config errors read: the strict base model, strict scalar types and one line per job.

:class:`Strict` refuses an unknown key with the allowed keys and the closest match, and any
NaN or infinity. ``Int``, ``Float`` and ``Bool`` take only what YAML writes for them: ``true``
is not an integer, ``"7"`` is not a number (a float field still takes ``3``).
:func:`format_validation_error` reports the first problem by its dotted key
(``evaluators.1.split``) on one line, with ``(+N more)`` when there are several.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]


class ConfigError(ValueError):
    """A job config that cannot be used; the message names the key and the fix, on one line."""


class MachineError(ConfigError):
    """A problem of this machine, not of the job (no GPU, offline, too few CPUs): it refuses a
    search whose workers run here, and is a note for ``validate`` or a cluster."""


class KeyedValueError(ValueError):
    """Raised by a model validator about one of the model's keys: the error's dotted key is
    the model's own plus ``key`` (``search.space`` + ``bounds.density.high``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class Strict(BaseModel):
    """Base: frozen, no NaN/inf, and an unknown key is refused with the allowed keys listed."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False
    )

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
    """The first problem as ``dotted.key: what is wrong; the fix``, plus ``(+N more)``."""
    problems = err.errors()
    first = _problem(problems[0])
    return first + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")


def _problem(e: Any) -> str:
    loc = ".".join(str(p) for p in e["loc"] if not _is_union_tag(p))
    msg = e["msg"].removeprefix("Value error, ")
    kind, value = e["type"], e.get("input")
    cause = e.get("ctx", {}).get("error")
    if isinstance(cause, KeyedValueError):
        loc = f"{loc}.{cause.key}" if loc else cause.key
    if kind == "union_tag_invalid":
        ctx = e.get("ctx", {})
        tags = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
        from evomerge.registry import unknown_name_message

        msg = unknown_name_message("name", ctx.get("tag", ""), tags)
        loc = f"{loc}.name" if loc else "name"
    elif kind == "union_tag_not_found":
        msg = "has no 'name'; add one, e.g. name: accuracy"
    elif kind in _TYPE_FIXES:
        want, fix = _TYPE_FIXES[kind]
        msg = f"expected {want}, got {_show(value)}; {fix}"
    elif kind == "finite_number":
        msg = f"expected a finite number, got {_show(value)}; write a number such as 0.5"
    elif kind == "too_short":
        ctx = e.get("ctx", {})
        msg = (
            f"needs at least {ctx.get('min_length', 1)} item(s), got "
            f"{ctx.get('actual_length', 0)}; add one"
        )
    elif kind == "missing":
        msg = "is required; add it"
    elif kind in ("dict_type", "model_type", "model_attributes_type"):
        msg = f"expected a mapping (key: value lines), got {_show(value)}"
    elif kind in ("tuple_type", "list_type"):
        msg = f"expected a list, got {_show(value)}; write [a, b] or one '- item' per line"
    elif not kind.startswith("value_error") and value is not None:
        msg = f"{msg}, got {_show(value)}"
    return f"{loc or '(top level)'}: {msg}"


_TYPE_FIXES = {
    "int_type": ("an integer", "write a whole number such as 32, without quotes"),
    "int_from_float": ("an integer", "write a whole number such as 32"),
    "float_type": ("a number", "write a number such as 0.5, without quotes"),
    "bool_type": ("true or false", "write true or false, without quotes"),
    "string_type": ("a string", "write text, in quotes if YAML would read it otherwise"),
}


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, with its kind when that is the problem."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if value is None:
        return "null"
    if isinstance(value, dict | list | tuple):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return repr(value)


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
    "gp",
}
