"""Name -> lazy ``"module:attr"`` registries for the extension points.

A registry holds import strings (or cheap objects such as merge-method specs), so listing names
or validating a config imports nothing heavy. A duplicate name is an error; an unknown name lists
the known ones and suggests the closest; :meth:`Registry.unregister` removes a name (tests).

>>> r = Registry("merge method")
>>> r.register("linear", "evomerge.merge.merge_methods:linear")
>>> r.names()
['linear']
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Any


class UnknownNameError(ValueError):
    """Raised for a name that is not registered; the message lists the known names."""


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    """Format the standard "unknown X; did you mean Y; known: ..." message."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(known))}."


class Registry:
    """A mapping from names to lazily imported ``"module:attr"`` targets (or plain objects)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._targets: dict[str, Any] = {}

    def register(self, name: str, target: Any) -> None:
        """Register ``target``: a ``"module:attr"`` string, imported on :meth:`get`, or an
        object returned as it is."""
        if name in self._targets:
            where = self._targets[name]
            where = where if isinstance(where, str) else type(where).__name__
            raise ValueError(f"{self.kind} {name!r} is already registered ({where})")
        if isinstance(target, str) and ":" not in target:
            raise ValueError(f"target {target!r} must look like 'package.module:attr'")
        self._targets[name] = target

    def unregister(self, name: str) -> None:
        """Remove ``name`` (raise :class:`UnknownNameError` if it is not registered)."""
        del self._targets[self.check(name)]

    def names(self) -> list[str]:
        return sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._targets)

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def check(self, name: str) -> str:
        """Return ``name`` if registered, else raise :class:`UnknownNameError`."""
        if name not in self._targets:
            raise UnknownNameError(unknown_name_message(self.kind, name, self.names()))
        return name

    def get(self, name: str) -> Any:
        """Import and return the object registered under ``name``."""
        target = self._targets[self.check(name)]
        if not isinstance(target, str):
            return target
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)
