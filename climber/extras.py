"""Optional dependencies: a feature that needs a package outside the core install imports it
through `require`, which names the extra to install instead of failing with ModuleNotFoundError."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; the message says how to get it."""


def require(module: str, extra: str, feature: str, package: str | None = None) -> ModuleType:
    """Import `module`, or raise MissingDependency naming the `package` it needs (default: the
    module's top level), the extra that installs it (pyproject.toml) and the feature."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(f"{feature} needs the {package or module.split('.')[0]} package, which is not "
                                f"installed: pip install 'climber[{extra}]'") from e


def pyplot(feature: str) -> ModuleType:
    """matplotlib.pyplot on the file-only Agg backend (no display needed), from the [plot] extra."""
    matplotlib = require("matplotlib", "plot", feature)
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "plot", feature)
