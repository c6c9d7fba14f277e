"""Reading YAML files safely: plain YAML only (no tags), a key given twice refused, and every
problem reported on one line as ``FILE:LINE:COLUMN: what; the fix``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from evomerge.strict import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}; keep one of them", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """Parse YAML safely; :class:`ConfigError` names the file, line and column on one line."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_error(path, err)) from None


def _yaml_error(path: Path, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    if "could not determine a constructor for the tag" in problem:
        tag = problem.rpartition("tag ")[2]
        return (
            f"{where}: the tag {tag} is not allowed (job configs are plain YAML: mappings, "
            "lists, strings, numbers); remove the tag"
        )
    if isinstance(err, yaml.constructor.ConstructorError):
        return f"{where}: {problem}"
    context = getattr(err, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return f"{where}: YAML syntax error: {detail}; fix the YAML there"
