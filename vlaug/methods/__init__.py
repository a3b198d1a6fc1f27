"""Stage-3 methods, one object each, and their registry.

A method is a :class:`~vlaug.methods.base.Method` subclass decorated with
:func:`register`; adding one means adding that class to a module of this package (a new
module is found and imported on its own). ``--method`` specs are
``NAME[:HEAD_DIR][?key=value&...]``, e.g. ``linear``, ``box:runs/box1?n_aug=40&ensemble=0.7``,
``gaussian?sigma=0.2``; :func:`parse_method` turns one into a method object with typed,
checked options.
"""

from __future__ import annotations

import importlib
import pkgutil

from vlaug.choices import METHOD_MODULES
from vlaug.methods.base import EnsembleOptions, Fit, Method, Options, RunData
from vlaug.methods.registry import REGISTRY, parse_method, register



def _import_all() -> None:
    """Import the built-in methods in their listing order (choices.METHOD_MODULES), then any
    other module of this package: a new method's file is found on its own."""
    for name in METHOD_MODULES:
        importlib.import_module(f"{__name__}.{name}")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name not in (*METHOD_MODULES, "base", "registry", "batching") and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()

__all__ = ["REGISTRY", "EnsembleOptions", "Fit", "Method", "Options", "RunData", "parse_method", "register"]
