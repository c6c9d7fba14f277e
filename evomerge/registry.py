"""Name -> lazy ``"module:attr"`` registries for the extension points.

A registry holds import strings, not objects, so listing names or validating a config imports
nothing heavy. A duplicate name is an error; an unknown name lists the known ones and suggests
the closest.

>>> r = Registry("merge method")
>>> r.register("linear", "evomerge.merge_methods:linear")
>>> r.names()
['linear']
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any


class UnknownNameError(ValueError):
    """Raised for a name that is not registered; the message lists the known names."""


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    """Format the standard "unknown X; did you mean Y; known: ..." message."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(known))}."


class Registry:
    """A mapping from names to lazily imported ``"module:attr"`` targets."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._targets: dict[str, str] = {}

    def register(self, name: str, target: str) -> None:
        if name in self._targets:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self._targets[name]})")
        if ":" not in target:
            raise ValueError(f"target {target!r} must look like 'package.module:attr'")
        self._targets[name] = target

    def names(self) -> list[str]:
        return sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def check(self, name: str) -> str:
        """Return ``name`` if registered, else raise :class:`UnknownNameError`."""
        if name not in self._targets:
            raise UnknownNameError(unknown_name_message(self.kind, name, self.names()))
        return name

    def get(self, name: str) -> Any:
        """Import and return the object registered under ``name``."""
        module_name, attr = self._targets[self.check(name)].split(":")
        return getattr(importlib.import_module(module_name), attr)
