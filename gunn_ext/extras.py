"""Optional packages, imported only by the features that need them.

``pip install .`` gives the layer, the benchmarks and the training CLI. The
heavier packages some features need come with an extra of ``pyproject.toml``
(``pip install ".[train]"``); a feature whose package is missing raises
:class:`MissingExtra`, whose message is one line naming the feature, the
package and the extra to install. Installing the package alone adds it to an
existing install without rebuilding gunn_ext.
"""
from __future__ import annotations

import importlib
from types import ModuleType

#: import name -> the distribution that provides it
DISTRIBUTIONS = {
    "matplotlib": "matplotlib",
    "sklearn": "scikit-learn",
    "PIL": "pillow",
    "triton": "triton",
}


class MissingExtra(ImportError):
    """An optional package that a feature needs is not installed."""


def install_hint(extra: str, distribution: str | None = None) -> str:
    """The commands that install ``distribution`` (or all of ``extra``) into an existing install."""
    extra_command = f'pip install ".[{extra}]" in the gunn_ext source folder'
    if distribution is None:
        return extra_command
    return f"pip install {distribution} (or the '{extra}' extra: {extra_command})"


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``import module``, or :class:`MissingExtra` naming ``feature`` and ``extra``.

    ``module`` is an import name from :data:`DISTRIBUTIONS` (or a submodule of
    one). A package that is installed but fails to import raises its own error.
    """
    top = module.split(".")[0]
    if top not in DISTRIBUTIONS:
        raise ValueError(f"module must be one of the optional packages {sorted(DISTRIBUTIONS)} "
                         f"(or a submodule), got {module!r}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != top:
            raise
        raise MissingExtra(f"{feature} needs {DISTRIBUTIONS[top]}, which is not installed: "
                           f"{install_hint(extra, DISTRIBUTIONS[top])}") from None
