"""``manifest.json``: what produced a cache and what it holds."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from vlaug._version import __version__
from vlaug.cache.files import read_json_object, write_json
from vlaug.cache.layout import FORMAT_VERSION, MANIFEST_NAME
from vlaug.choices import STORAGE_DTYPES
from vlaug.errors import CacheError


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class CacheManifest:
    """The contents of ``manifest.json``: what produced the cache and what it holds."""

    model: str = ""  # open_clip model name (or hf-hub:/local-dir: identifier)
    pretrained: str = ""  # tag, checkpoint file path, or "none" for random weights
    embed_dim: int = 0
    dtype: str = "float16"  # storage dtype of the image embeddings
    normalized: bool = True  # image and text embeddings are L2-normalised
    classes: list[str] = field(default_factory=list)  # ordered; `label` indexes it
    domains: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)  # templates of the `classes` prompt set
    prompt_sets: dict[str, list[str]] = field(default_factory=dict)  # other named prompt sets
    n_images: int = 0  # rows in the listed parts
    n_failed: int = 0  # rows in failed.parquet
    created: str = field(default_factory=_now)
    parts: list[str] = field(default_factory=list)  # completed parts, relative to images/
    format_version: int = FORMAT_VERSION
    vlaug_version: str = __version__
    # Provenance beyond the DESIGN.md keys; optional for caches written by other tools.
    seed: int | None = None  # seeds the random weights when pretrained == "none"
    pretrained_sha256: str | None = None  # when pretrained is a local checkpoint file
    source: str = ""  # folder or manifest the images came from
    layout: str = ""
    n_inputs: int | None = None  # inputs in the source; complete when n_images + n_failed == n_inputs
    complete: bool = False  # the last embed run finished every input
    updated: str = field(default_factory=_now)
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as they were

    sources: list[dict] = field(default_factory=list)  # every source embedded into it: {"source", "layout"}

    REQUIRED = ("model", "embed_dim", "dtype", "classes", "parts")

    @property
    def n_missing(self) -> int:
        """Inputs of the source neither embedded nor failed: > 0 when an embed run was
        interrupted. 0 for a cache that does not record its inputs (written by another tool)."""
        if self.complete or self.n_inputs is None:
            return 0
        return max(0, self.n_inputs - self.n_images - self.n_failed)

    @property
    def source_identities(self) -> list[dict]:
        """The sources embedded into this cache (older manifests record only one)."""
        if self.sources:
            return list(self.sources)
        return [{"source": self.source, "layout": self.layout}] if self.source else []

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        return {**d, **extra}

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> "CacheManifest":
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise CacheError(f"{where} lacks the keys {missing}; it was not written by vlaug embed or is damaged.")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["extra"] = {k: v for k, v in d.items() if k not in known}
        m = cls(**kwargs)
        if m.format_version > FORMAT_VERSION:
            raise CacheError(
                f"{where} has format_version {m.format_version}; this vlaug ({__version__}) reads up to "
                f"{FORMAT_VERSION}. Upgrade vlaug."
            )
        if m.dtype not in STORAGE_DTYPES:
            raise CacheError(f"{where} has dtype {m.dtype!r}; expected one of {sorted(STORAGE_DTYPES)}.")
        if not isinstance(m.embed_dim, int) or m.embed_dim <= 0:
            raise CacheError(f"{where} has embed_dim {m.embed_dim!r}; expected a positive integer.")
        return m


def is_cache(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(path: str | os.PathLike) -> CacheManifest:
    """Read ``manifest.json`` of a cache directory.

    Raises:
        CacheError: no manifest, or one that is not valid JSON or lacks required keys.
    """
    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        raise CacheError(f"{str(path)!r} is not a vlaug feature cache (no {MANIFEST_NAME}). Run vlaug embed first.")
    d = read_json_object(file, CacheError, "; the cache is damaged. Re-run vlaug embed with --overwrite.")
    return CacheManifest.from_dict(d, where=str(file))


def write_manifest(path: str | os.PathLike, manifest: CacheManifest) -> None:
    manifest.updated = _now()
    write_json(Path(path) / MANIFEST_NAME, manifest.to_dict())
