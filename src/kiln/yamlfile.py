"""Config files as YAML: a mapping whose keys are each written once.

PyYAML keeps the last of two equal keys, so a second `train:` block silently dropped the first one's settings.
`load` refuses it, naming both lines, as it names the line of any other YAML error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kiln.errors import ConfigError


class _UniqueKeys(yaml.SafeLoader):
    """yaml.safe_load, with a mapping's repeated key a ConstructorError at the second one."""


def _mapping(loader: _UniqueKeys, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str | int | float | bool) and key in first:
            raise yaml.constructor.ConstructorError(
                None, None, f"'{key}' appears twice (first at line {first[key] + 1}); keep one and merge its keys",
                key_node.start_mark)
        if isinstance(key, str | int | float | bool):
            first[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load(text: str) -> Any:
    """The YAML document in `text` (yaml.YAMLError when it does not parse or repeats a key)."""
    return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 (a SafeLoader subclass)


def read(path: Path) -> dict[str, Any]:
    """A config file's mapping; an unreadable, malformed, empty or non-mapping file is one ConfigError line."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{at} malformed YAML: {getattr(e, 'problem', e)}") from None
    if data is None:  # an empty file (a redirect that failed, a save that did not happen) is no config of defaults
        raise ConfigError(f"{path}: empty; a config sets a section (model:, train:, ...) or starts from a preset "
                          "with `base: tiny` (kiln presets lists them)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (run, model, data, optim, train, parallel)")
    return data
