"""Head checkpoints: the only safetensors / checkpoint-JSON code.

A checkpoint is a directory::

    HEAD_DIR/
      model.safetensors   weights only (no pickle is ever loaded)
      config.json         head kind, every hyperparameter, the cache it was trained on,
                          training history, selected epoch, vlaug version
      stats.json          (box heads) per-class box volumes and per-dimension side lengths

It rebuilds itself from ``config.json`` alone. The directory is written under a
temporary name and renamed into place, so a crash never leaves a half-written head.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlaug._version import __version__
from vlaug.cache import CacheManifest, atomic_directory, check_output, read_json_object
from vlaug.errors import CacheMismatchError, CheckpointError
from vlaug.heads import HEADS
from vlaug.probe import LinearProbe, ProbeConfig

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
STATS_NAME = "stats.json"

# kind -> (config class, module class): the stage-2 heads, and the stage-3 probes saved by vlaug probe
HEAD_KINDS = {**HEADS, "probe": (ProbeConfig, LinearProbe)}
CONFIG_KEYS = {"format_version", "vlaug_version", "kind", "head", "training", "cache", "history", "selected_epoch"}
CACHE_KEYS = ("model", "pretrained", "embed_dim", "classes")


@dataclass
class Checkpoint:
    kind: str  # box | dr-sa | dr-pool | lads | probe
    module: torch.nn.Module  # in eval mode, on the CPU
    config: dict  # the whole config.json
    path: str = ""

    @property
    def cache(self) -> dict:
        return self.config["cache"]


def _config_from_dict(cls, d: dict, where: str):
    """Build a frozen config dataclass, naming any unknown key or wrongly typed field."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: 'head' must be a JSON object, got {type(d).__name__}.")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise CheckpointError(f"{where}: unknown head field(s) {unknown}; expected only {sorted(known)}.")
    for name, value in d.items():
        f = known[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        expected = type(default)
        ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if expected is tuple and isinstance(value, list):
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            raise CheckpointError(f"{where}: field {name!r} is {value!r} ({type(value).__name__}); expected {expected.__name__}.")
    try:
        return cls(**d)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def build_head(kind: str, head_config: dict, where: str = "head config") -> torch.nn.Module:
    if kind not in HEAD_KINDS:
        raise CheckpointError(f"{where}: unknown head kind {kind!r}; expected one of {sorted(HEAD_KINDS)}.")
    config_cls, module_cls = HEAD_KINDS[kind]
    config = _config_from_dict(config_cls, head_config, where)
    try:
        return module_cls(config)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def cache_identity(manifest: CacheManifest, texts: dict[str, list[str]] | None = None) -> dict:
    """What a head remembers of the cache it was trained on; ``texts``: the prompt sets it
    used, each with the templates its text embeddings were encoded from."""
    identity = {"model": manifest.model, "pretrained": manifest.pretrained, "embed_dim": manifest.embed_dim,
                "classes": list(manifest.classes), "seed": manifest.seed if manifest.pretrained == "none" else None}
    if texts is not None:
        identity["texts"] = {name: list(t) for name, t in texts.items()}
    return identity


def save_head(
    path: str | os.PathLike,
    kind: str,
    module: torch.nn.Module,
    config: dict,
    stats: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``stats.json``) atomically as a directory.

    Args:
        config: ``training``, ``cache``, ``history``, ``selected_epoch`` (the head's own
            config is taken from ``module.config``).

    Raises:
        UsageError: ``path`` exists and ``overwrite`` is False, or it is not a head.
    """
    path = check_output(path, overwrite, is_head, "vlaug head")
    full = {
        "format_version": FORMAT_VERSION,
        "vlaug_version": __version__,
        "kind": kind,
        "head": module.config.to_dict(),
        **config,
    }
    unknown = set(full) - CONFIG_KEYS
    if unknown:
        raise ValueError(f"unknown checkpoint config keys {sorted(unknown)}")
    with atomic_directory(path) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"kind": kind, "vlaug_version": __version__})
        (tmp / CONFIG_NAME).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
        if stats is not None:
            (tmp / STATS_NAME).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return path


def save_probe(path: str | os.PathLike, probe: LinearProbe, classes: list[str], *, model: str = "", pretrained: str = "",
               overwrite: bool = False) -> Path:
    """Save a :class:`~vlaug.probe.LinearProbe` in the format ``vlaug probe`` writes, so that
    :func:`load_probe` and ``vlaug predict`` (with ``model`` / ``pretrained`` of the cache
    its embeddings came from) can use it.

    Raises:
        UsageError: ``path`` exists and ``overwrite`` is False; ValueError: ``classes``
            does not match the probe's number of classes.
    """
    if len(classes) != probe.config.n_classes:
        raise ValueError(f"{len(classes)} class names for a probe of {probe.config.n_classes} classes.")
    cache = {"model": model, "pretrained": pretrained, "embed_dim": probe.config.embed_dim, "classes": list(classes),
             "seed": None, "texts": {}}
    return save_head(path, "probe", probe.cpu(), {"training": {"method": "library"}, "cache": cache, "history": [],
                                                    "selected_epoch": 0}, overwrite=overwrite)


def load_probe(path: str | os.PathLike) -> LinearProbe:
    """A probe saved by :func:`save_probe` or by ``vlaug probe`` (``REPORT_DIR/probes/METHOD``),
    on the CPU in eval mode; its class names are in ``classes_``.

    Raises:
        CheckpointError: not a probe, or a damaged one.
    """
    ckpt = load_head(path)
    if ckpt.kind != "probe":
        raise CheckpointError(f"{str(path)!r} is a {ckpt.kind} head, not a probe.")
    ckpt.module.classes_ = list(ckpt.cache["classes"])
    return ckpt.module


def is_head(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file() and (Path(path) / WEIGHTS_NAME).is_file()


def read_head_config(path: str | os.PathLike) -> dict:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{str(path)!r} is not a vlaug head (no {CONFIG_NAME}). Train one with vlaug train-box.")
    config = read_json_object(file, CheckpointError, ".")
    unknown = sorted(set(config) - CONFIG_KEYS)
    missing = sorted({"kind", "head", "cache"} - set(config))
    if unknown or missing:
        raise CheckpointError(f"{str(file)!r}: unknown keys {unknown}, missing keys {missing}; expected {sorted(CONFIG_KEYS)}.")
    if config.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(f"{str(file)!r} has format_version {config['format_version']}; upgrade vlaug.")
    cache = config["cache"]
    if not isinstance(cache, dict) or any(k not in cache for k in CACHE_KEYS):
        raise CheckpointError(f"{str(file)!r}: 'cache' must hold {list(CACHE_KEYS)}.")
    return config


def read_head_stats(path: str | os.PathLike) -> dict | None:
    """``stats.json`` of a box head, or None."""
    file = Path(path) / STATS_NAME
    if not file.is_file():
        return None
    return read_json_object(file, CheckpointError, ".")


def load_head(path: str | os.PathLike) -> Checkpoint:
    """Rebuild a head from its directory: config.json, then the safetensors weights.

    Raises:
        CheckpointError: missing files, unknown keys or wrongly typed fields (named),
            weights that do not fit the config.
    """
    path = Path(path)
    config = read_head_config(path)
    module = build_head(config["kind"], config["head"], where=str(path / CONFIG_NAME))
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{str(path)!r} lacks {WEIGHTS_NAME}; the head is incomplete. Train it again.")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {str(weights)!r}: {e}. The file is damaged; train the head again.") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{str(weights)!r} does not fit its config.json: {str(e).splitlines()[0]}") from None
    return Checkpoint(config["kind"], module.eval(), config, str(path))


def _show(names: list[str]) -> str:
    return f"{names[:5]}{'...' if len(names) > 5 else ''}"


def check_head_matches_cache(head_cache: dict, manifest: CacheManifest, head_path: str = "head", cache_path: str = "cache",
                             text_templates: dict[str, list[str]] | None = None) -> list[int] | None:
    """Refuse a head trained on a cache of another model, dimension or class set, or whose
    prompt sets changed since (when ``text_templates``, the cache's
    :func:`vlaug.cache.read_text_templates`, is given), naming both sides.

    Returns:
        None when the classes are in the same order; else, for each class of the head, the
        index of the class of that name in the cache (the same names in another order).

    Raises:
        CacheMismatchError: naming the differences.
    """
    ours = cache_identity(manifest)
    diffs = []
    for key in ("model", "pretrained", "embed_dim"):
        if head_cache.get(key) != ours[key]:
            diffs.append(f"{key}: head has {head_cache.get(key)!r}, cache has {ours[key]!r}")
    theirs, mine = list(head_cache.get("classes", [])), ours["classes"]
    order = None
    if mine and theirs != mine:  # an unlabeled cache (no classes) takes any head
        only_head = [c for c in theirs if c not in set(mine)]
        only_cache = [c for c in mine if c not in set(theirs)]
        if only_head or only_cache or len(theirs) != len(mine):
            diffs.append(f"classes: head has {len(theirs)}, cache has {len(mine)}; only in the head: {_show(only_head)}, "
                         f"only in the cache: {_show(only_cache)}")
        else:
            index = {c: i for i, c in enumerate(mine)}
            order = [index[c] for c in theirs]
    if diffs:
        raise CacheMismatchError(
            f"head {head_path!r} was trained on another cache than {cache_path!r} ({'; '.join(diffs)}). "
            "Train a head on this cache with vlaug train-box, or use the cache the head was trained on."
        )
    if text_templates is not None:
        for name, used in (head_cache.get("texts") or {}).items():
            now = text_templates.get(name)
            if now is None:
                raise CacheMismatchError(
                    f"head {head_path!r} used prompt set {name!r}, which the cache {cache_path!r} no longer has. Add it "
                    f"back with vlaug prompts {cache_path} --prompt-set \"{name}=...\", or train the head again."
                )
            if list(now) != list(used):
                raise CacheMismatchError(
                    f"prompt set {name!r} of the cache {cache_path!r} changed since head {head_path!r} was trained "
                    f"(head used {_show(list(used))}, cache has {_show(list(now))}). Train the head again on this "
                    f"cache, or restore the set with vlaug prompts."
                )
    return order
