"""Where users plug in (model adapters, rewards): a registered name or a dotted path `package.module:attr`."""

from __future__ import annotations

import importlib
from typing import Any


def resolve_plugin(name: str, registry: dict[str, Any], kind: str, example: str) -> Any:
    """The registered entry `name`, or the object a dotted path names; a clear error otherwise."""
    if name in registry:
        return registry[name]
    if ":" in name or "." in name:
        module_name, _, attr = name.replace(":", ".").rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"{kind} {name!r}: cannot import it ({error})") from error
    raise ValueError(f"{kind} {name!r} is unknown; registered: {sorted(registry)} (or give a dotted path {example!r})")
