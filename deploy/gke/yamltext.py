"""YAML text for a Kubernetes manifest, standard library only: block mappings and lists, and
every string that YAML could read as anything else (a number, a boolean, null, a flag, a
value with `: ` or `#`) double-quoted the JSON way, which YAML reads back unchanged.
"""

import json
import re

# Plain (unquoted): a letter, '_' or '/' first; ':' only inside and never before a space.
_PLAIN = re.compile(r"[A-Za-z_/]([A-Za-z0-9_./=@-]|:(?=[^\s]))*")
# What YAML 1.1 (PyYAML, and Kubernetes' go-yaml in its 1.1 mode) reads as booleans or null.
_RESERVED = {"true", "false", "yes", "no", "on", "off", "y", "n", "null", "~"}


def scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if value is None:
        return "null"
    if not isinstance(value, str):
        raise TypeError(f"no YAML form for {type(value).__name__}: {value!r}")
    if _PLAIN.fullmatch(value) and value.lower() not in _RESERVED:
        return value
    return json.dumps(value, ensure_ascii=False)


def _inline(value) -> str | None:
    """The one-line form of a scalar, an empty mapping or list, or a list of numbers."""
    if isinstance(value, dict | list) and not value:
        return "{}" if isinstance(value, dict) else "[]"
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return "[" + ", ".join(scalar(v) for v in value) + "]"
    if isinstance(value, dict | list):
        return None
    return scalar(value)


def _block(value, indent: int) -> list[str]:
    pad = " " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            head = f"{pad}{scalar(key)}:"
            one = _inline(item)
            if one is not None:
                lines.append(f"{head} {one}")
            else:
                lines.append(head)
                lines += _block(item, indent + 2)
    else:
        for item in value:
            one = _inline(item)
            if one is not None:
                lines.append(f"{pad}- {one}")
            else:  # the item's first line after the dash, the rest under it
                inner = _block(item, indent + 2)
                lines.append(f"{pad}- {inner[0][indent + 2:]}")
                lines += inner[1:]
    return lines


def dump(document: dict) -> str:
    """One YAML document for a mapping of mappings, lists, strings, numbers and booleans."""
    return "\n".join(_block(document, 0)) + "\n"
