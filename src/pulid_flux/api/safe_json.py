"""The one JSON parser for what this server reads outside FastAPI's body handling (multipart
`complete` bodies, lifecycle headers, query values): bounded in nesting, and every failure is
a ValueError, so that hostile JSON is a 4xx and never a RecursionError's 500."""

from __future__ import annotations

import json
from typing import Any

DEFAULT_MAX_DEPTH = 32  # Settings.max_json_depth's default


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:  # iterative: the check itself must not recurse
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def loads(text: str | bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """``text`` is already bounded in size by its caller (body cap, the server's header limit)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError):
        raise ValueError("invalid JSON") from None
    if _depth(value) > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    return value
