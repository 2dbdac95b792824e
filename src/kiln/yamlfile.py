"""Config files as YAML: a mapping whose keys are each written once.

PyYAML keeps the last of two equal keys, so a second `train:` block silently dropped the first one's settings.
`load` refuses it, naming both lines, as it names the line of any other YAML error.
"""

from __future__ import annotations

from typing import Any

import yaml


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
