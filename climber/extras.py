"""Optional dependencies: a feature that needs a package outside the core install imports it
through `require`, which names the extra to install instead of failing with ModuleNotFoundError."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; the message says how to get it."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module`, or raise MissingDependency naming `extra` (pyproject.toml) and the feature."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(f"{feature} needs the {module.split('.')[0]} package ({e.name or module} is not "
                                f"installed): pip install 'climber[{extra}]'") from e
