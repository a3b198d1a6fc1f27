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

from vlaug.errors import UsageError
from vlaug.methods.base import EnsembleOptions, Fit, Method, Options, RunData

REGISTRY: dict[str, type[Method]] = {}  # name -> method class, in registration order


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to ``--method`` under ``cls.name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice ({REGISTRY[cls.name].__name__}, {cls.__name__}).")
    REGISTRY[cls.name] = cls
    return cls


def parse_method(text: str) -> Method:
    """Parse ``NAME[:HEAD_DIR][?k=v&...]``; unknown names and options, bad values and a
    missing or superfluous head folder are UsageErrors."""
    body, _, query = text.partition("?")
    name, _, head = body.partition(":")
    if name not in REGISTRY:
        raise UsageError(f"--method {text!r}: unknown method {name!r}; known: {', '.join(REGISTRY)}.")
    cls = REGISTRY[name]
    if cls.head_kinds and not head:
        raise UsageError(f"--method {text!r}: {name} needs a head folder, e.g. {name}:runs/{name}1 (from vlaug train-box).")
    if head and not cls.head_kinds:
        raise UsageError(f"--method {text!r}: {name} takes no head folder.")
    return cls(text, head, cls.Options.parse(query, text, name))


def _import_all() -> None:
    """Import the built-in methods in their listing order, then any other module here."""
    for name in ("zero_shot", "linear", "augmenting", "joint"):
        importlib.import_module(f"{__name__}.{name}")
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()

__all__ = ["REGISTRY", "EnsembleOptions", "Fit", "Method", "Options", "RunData", "parse_method", "register"]
