"""Optional dependencies: a feature that needs a package outside the core install imports it
through `require`, which names the extra to install instead of failing with ModuleNotFoundError.
The extras are in pyproject.toml: serve, plot, export, tensorboard (and dev, for the tests)."""

from __future__ import annotations

import importlib
from types import ModuleType

DISTRIBUTION = "climber-rec"  # the name on PyPI (pyproject.toml); the import name is `climber`


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; the message says how to get it."""


def require(module: str, extra: str, feature: str, package: str | None = None) -> ModuleType:
    """Import `module`, or raise MissingDependency naming the `package` it needs (default: the
    module's top level), the extra that installs it (pyproject.toml) and the feature."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(f"{feature} needs the {package or module.split('.')[0]} package, which is not "
                                f"installed: pip install '{DISTRIBUTION}[{extra}]' "
                                f"(in a clone: pip install -e '.[{extra}]')") from e


def pyplot(feature: str) -> ModuleType:
    """matplotlib.pyplot on the file-only Agg backend (no display needed), from the [plot] extra."""
    matplotlib = require("matplotlib", "plot", feature)
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "plot", feature)
