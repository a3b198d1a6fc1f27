"""The registry of stage-3 methods: :func:`register` adds a class under its name,
:func:`parse_method` turns a ``--method`` spec into a method object."""

from __future__ import annotations

from vlaug.errors import UsageError
from vlaug.methods.base import Method

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
    if cls.path_argument:  # NAME:PATH, a path that is not a head (cdga:GEN_FEATURES)
        if not head:
            raise UsageError(f"--method {text!r}: {name} needs {name}:{cls.path_argument}.")
        method = cls(text, "", cls.Options.parse(query, text, name))
        method.path = head
        return method
    if cls.head_kinds and not head:
        raise UsageError(f"--method {text!r}: {name} needs a head folder, e.g. {name}:runs/{name}1 (from vlaug train-box).")
    if head and not cls.head_kinds:
        raise UsageError(f"--method {text!r}: {name} takes no head folder.")
    return cls(text, head, cls.Options.parse(query, text, name))


def expand_method(text: str) -> list[tuple[str, dict]]:
    """The configurations a ``--method`` spec lists: an option given several comma-separated
    values (``gaussian?sigma=0.05,0.1``) makes one spec per combination, in the order given
    (the first option outermost), each with its ``{option: value}``; a spec without lists is
    itself, with ``{}``. Options whose value is text (e.g. the joint methods' ``lr`` grid,
    searched inside the method) keep their commas."""
    from dataclasses import fields
    from itertools import product
    from urllib.parse import parse_qsl

    body, _, query = text.partition("?")
    cls = REGISTRY.get(body.partition(":")[0])
    if cls is None or not query:
        return [(text, {})]
    kinds = {f.name: type(f.default) for f in fields(cls.Options)}
    pairs = parse_qsl(query, keep_blank_values=True)
    listed = [(k, [x.strip() for x in v.split(",")] if kinds.get(k) not in (None, str) else [v]) for k, v in pairs]
    for k, values in listed:
        if len(set(values)) < len(values):
            raise UsageError(f"--method {text!r}: {k} repeats a value; give each once.")
    if all(len(values) == 1 for _, values in listed):
        return [(text, {})]
    out = []
    for combo in product(*(values for _, values in listed)):
        spec = body + "?" + "&".join(f"{k}={v}" for (k, _), v in zip(listed, combo))
        out.append((spec, {k: v for (k, values), v in zip(listed, combo) if len(values) > 1}))
    return out


def markdown_table() -> str:
    """The method table of docs/probes.md, generated from the registry: each method's spec,
    its ``summary`` and its options with their defaults (``python -m vlaug.methods --docs
    docs/probes.md`` rewrites it there; a test checks the page holds it)."""
    from dataclasses import MISSING, fields

    rows = ["| method | what the probe trains on | options (default) |", "|---|---|---|"]
    for name, cls in REGISTRY.items():
        spec = f"`{name}:HEAD_DIR`" if cls.head_kinds else f"`{name}:{cls.path_argument}`" if cls.path_argument else f"`{name}`"
        options = ", ".join(f"`{f.name}` ({f.default if f.default is not MISSING else f.default_factory()!r})"
                            for f in fields(cls.Options))
        rows.append(f"| {spec} | {cls.summary} | {options} |")
    return "\n".join(rows) + "\n"
