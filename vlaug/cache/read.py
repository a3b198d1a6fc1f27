"""Reading a cache: whole (embeddings in memory) or its metadata only (for streaming)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlaug.cache.layout import FAILED_NAME, IMAGES_DIR, TEXTS_NAME, TMP_MARKER
from vlaug.cache.manifest import CacheManifest, read_manifest
from vlaug.cache.write import TEMPLATES_KEY, image_schema
from vlaug.choices import CLASSES_PROMPT_SET
from vlaug.errors import CacheError, IncompleteCacheError


@dataclass
class FeatureCache:
    """A cache read into memory. Arrays share the row order of the listed parts."""

    manifest: CacheManifest
    ids: list[str]
    paths: list[str]
    labels: np.ndarray  # (n,) int64; -1 for an unlabeled row (null in the cache)
    domains: np.ndarray  # (n,) str
    splits: np.ndarray  # (n,) str; "" where the cache's split is null
    embeddings: np.ndarray  # (n, d) float32, L2-normalised
    texts: dict[str, np.ndarray]  # prompt set -> (n_classes, d) float32

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    def __len__(self) -> int:
        return len(self.labels)


def _read_parquet(file: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(file, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise CacheError(f"cannot read {str(file)!r}: {e}. The file is damaged; re-run vlaug embed to rebuild it.") from None


def listed_part_files(path: Path, manifest: CacheManifest) -> list[Path]:
    files = [path / IMAGES_DIR / name for name in manifest.parts]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CacheError(
            f"cache {str(path)!r} lists parts {missing[:3]} that are missing from {IMAGES_DIR}/. "
            "Re-run the same vlaug embed command to re-embed them, or --overwrite."
        )
    return files


def embeddings_to_numpy(column: pa.ChunkedArray, embed_dim: int, where: str, keep_dtype: bool = False) -> np.ndarray:
    """(m, d) float32 embeddings of an ``embedding`` column (``keep_dtype``: in the stored
    precision, possibly a read-only view), checked for shape, nulls and NaN/Inf."""
    if not pa.types.is_fixed_size_list(column.type) or column.type.list_size != embed_dim:
        raise CacheError(
            f"{where}: column 'embedding' has type {column.type}; the manifest says "
            f"fixed_size_list<float>[{embed_dim}]."
        )
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if arr.null_count:
        raise CacheError(f"{where}: {arr.null_count} rows have a null embedding.")
    import torch  # converts half to float, and sums, several times faster than numpy

    values = arr.flatten().to_numpy(zero_copy_only=False)  # .values would ignore a slice offset
    if keep_dtype:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            if not bool(torch.isfinite(torch.from_numpy(values).sum(dtype=torch.float32))):
                bad = ~np.isfinite(values.reshape(len(arr), embed_dim)).all(axis=1)
                raise CacheError(f"{where}: {int(bad.sum())} rows have NaN or Inf in 'embedding'; the cache was edited or damaged.")
        return values.reshape(len(arr), embed_dim)
    if values.dtype == np.float16:  # read-only view; .float() makes the copy callers may write
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(values).float()
    else:  # float32 converts into a read-only view: copy it
        t = torch.from_numpy(values if values.flags.writeable else values.copy())
    out = t.numpy().reshape(len(arr), embed_dim)
    if not bool(torch.isfinite(t.sum())):  # a NaN or Inf anywhere makes the sum one (the cheap check)
        bad = ~np.isfinite(out).all(axis=1)
        raise CacheError(f"{where}: {int(bad.sum())} rows have NaN or Inf in 'embedding'; the cache was edited or damaged.")
    return out


def read_ids(path: str | os.PathLike, manifest: CacheManifest | None = None) -> list[str]:
    """The ids of every row in the listed parts (for resuming without loading embeddings)."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    ids: list[str] = []
    for f in listed_part_files(path, manifest):
        ids += _read_parquet(f, ["id"]).column("id").to_pylist()
    return ids


def read_texts(path: str | os.PathLike, manifest: CacheManifest) -> dict[str, np.ndarray]:
    file = Path(path) / TEXTS_NAME
    if not file.is_file():
        return {}
    table = _read_parquet(file)
    emb = embeddings_to_numpy(table.column("embedding"), manifest.embed_dim, str(file))
    names = table.column("prompt_set").to_pylist()
    labels = np.asarray(table.column("label").to_pylist())
    out = {}
    for name in dict.fromkeys(names):
        rows = np.flatnonzero(np.asarray(names) == name)
        order = rows[np.argsort(labels[rows], kind="stable")]
        if not np.array_equal(labels[order], np.arange(len(manifest.classes))):
            raise CacheError(
                f"{str(file)!r}: prompt set {name!r} has labels {sorted(set(labels[rows]))[:5]}...; expected one row "
                f"per class 0..{len(manifest.classes) - 1}."
            )
        out[name] = emb[order]
    return out


def read_text_templates(path: str | os.PathLike, manifest: CacheManifest) -> dict[str, list[str]]:
    """Prompt set -> the templates its texts were encoded from: from ``texts.parquet``'s own
    metadata, else (a file written without it) from the manifest. Empty without texts."""
    import json

    file = Path(path) / TEXTS_NAME
    if not file.is_file():
        return {}
    try:
        meta = pq.read_schema(file).metadata or {}
    except (OSError, pa.ArrowException) as e:
        raise CacheError(f"cannot read {str(file)!r}: {e}. The file is damaged; re-run vlaug prompts or vlaug embed.") from None
    if TEMPLATES_KEY in meta:
        return json.loads(meta[TEMPLATES_KEY])
    return {CLASSES_PROMPT_SET: list(manifest.templates), **{k: list(v) for k, v in manifest.prompt_sets.items()}}


def read_failed(path: str | os.PathLike) -> list[dict]:
    file = Path(path) / FAILED_NAME
    if not file.is_file():
        return []
    return _read_parquet(file).to_pylist()


def check_complete(path: str | os.PathLike, manifest: CacheManifest, allow_incomplete: bool = False) -> None:
    """Refuse a cache whose embed run was interrupted (fewer rows than its source has
    inputs), unless ``allow_incomplete``.

    Raises:
        IncompleteCacheError: naming how much is missing and the two ways on.
    """
    missing = manifest.n_missing
    if missing and not allow_incomplete:
        raise IncompleteCacheError(
            f"cache {str(path)!r} is incomplete: {manifest.n_images} of {manifest.n_inputs} inputs embedded "
            f"({manifest.n_failed} failed, {missing} not reached; the embed run was interrupted). Re-run the same "
            "vlaug embed command to finish it, or pass --allow-incomplete to use it as it is."
        )


def _labels(column, path: Path, manifest: CacheManifest) -> np.ndarray:
    """The label column as int64, -1 where it is null (an unlabeled row), checked against the classes."""
    labels = np.asarray(pc.fill_null(column, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    if len(labels) and (labels.min() < -1 or labels.max() >= len(manifest.classes)):
        raise CacheError(
            f"cache {str(path)!r} has labels outside 0..{len(manifest.classes) - 1} (the manifest's classes)."
        )
    return labels


def _strings(column) -> np.ndarray:
    """A string column as a numpy ``str`` array, "" where it is null."""
    return np.asarray(pc.fill_null(column, "").to_pylist(), dtype=str)


def read_cache(path: str | os.PathLike, allow_incomplete: bool = False) -> FeatureCache:
    """Read a whole cache into memory.

    Args:
        allow_incomplete: read a cache whose embed run was interrupted (else refused).

    Returns:
        a :class:`FeatureCache` with float32 embeddings in the order of the listed parts.

    Raises:
        IncompleteCacheError: the embed run was interrupted (without ``allow_incomplete``).
        CacheError: missing manifest or part, wrong embedding length, NaN/Inf, labels
            outside the class list, duplicate ids.
    """
    path = Path(path)
    manifest = read_manifest(path)
    check_complete(path, manifest, allow_incomplete)
    schema = image_schema(manifest.embed_dim, manifest.dtype)
    tables = []
    for f in listed_part_files(path, manifest):
        t = _read_parquet(f)
        missing = [c for c in schema.names if c not in t.column_names]
        if missing:
            raise CacheError(f"{str(f)!r} lacks the columns {missing}; it is not a vlaug image part.")
        t = t.select(schema.names)
        emb = embeddings_to_numpy(t.column("embedding"), manifest.embed_dim, str(f))
        tables.append((t, emb))
    d = manifest.embed_dim
    if tables:
        meta = pa.concat_tables([t.drop(["embedding"]) for t, _ in tables], promote_options="permissive")
        embeddings = np.concatenate([e for _, e in tables])
    else:
        meta = pa.table({n: pa.array([], schema.field(n).type) for n in schema.names[:-1]})
        embeddings = np.zeros((0, d), np.float32)
    ids = meta.column("id").to_pylist()
    labels = _labels(meta.column("label"), path, manifest)
    if len(set(ids)) != len(ids):
        raise CacheError(f"cache {str(path)!r} has duplicate ids across its parts; it was edited or damaged.")
    return FeatureCache(
        manifest=manifest,
        ids=ids,
        paths=meta.column("path").to_pylist(),
        labels=labels,
        domains=_strings(meta.column("domain")),
        splits=_strings(meta.column("split")),
        embeddings=embeddings,
        texts=read_texts(path, manifest),
    )


def iter_metadata(path: str | os.PathLike, columns: Iterable[str]) -> Iterable[pa.Table]:
    """The listed parts, one table at a time, with only ``columns`` (no embeddings)."""
    path = Path(path)
    manifest = read_manifest(path)
    for f in listed_part_files(path, manifest):
        yield _read_parquet(f, list(columns))


def iter_ids(path: str | os.PathLike) -> Iterable[list[str]]:
    """The ids of the listed parts, a list per part (in row order)."""
    for table in iter_metadata(path, ["id"]):
        yield table.column("id").to_pylist()


def read_metadata(path: str | os.PathLike, allow_incomplete: bool = False) -> FeatureCache:
    """A cache without its embeddings, ids or paths (labels, domains, splits and texts), for
    streaming the embeddings from disk with :func:`iter_embeddings`. Refuses an incomplete
    cache like :func:`read_cache`."""
    manifest = read_manifest(path)
    check_complete(path, manifest, allow_incomplete)
    cols = read_columns(path, ["label", "domain", "split"])
    labels = cols["label"].astype(np.int64)
    if len(labels) and (labels.min() < -1 or labels.max() >= len(manifest.classes)):
        raise CacheError(f"cache {str(path)!r} has labels outside 0..{len(manifest.classes) - 1} (the manifest's classes).")
    return FeatureCache(manifest, [], [], labels, cols["domain"].astype(str), cols["split"].astype(str),
                        np.zeros((0, manifest.embed_dim), np.float32), read_texts(path, manifest))


def read_columns(path: str | os.PathLike, columns: list[str]) -> dict[str, np.ndarray]:
    """Metadata columns of the listed parts as numpy arrays (no embedding, no ids).

    String columns come back as fixed-width ``str`` arrays built from their dictionary
    (no Python object per row: a 2M-row cache would otherwise hold ~100 MB of them), with
    "" for null; a null label is -1 (an unlabeled row).
    """
    path = Path(path)
    manifest = read_manifest(path)
    chunks: dict[str, list] = {c: [] for c in columns}
    for f in listed_part_files(path, manifest):
        t = _read_parquet(f, columns)
        for c in columns:
            col = t.column(c)
            if col.null_count:
                col = pc.fill_null(col, "" if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) else -1)
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                enc = col.dictionary_encode().combine_chunks()
                values = np.asarray(enc.dictionary.to_pylist(), dtype=str)
                chunks[c].append(values[enc.indices.to_numpy(zero_copy_only=False)] if len(values) else np.zeros(len(col), str))
            else:
                chunks[c].append(col.to_numpy(zero_copy_only=False))
    return {c: (np.concatenate(v) if v else np.zeros(0)) for c, v in chunks.items()}


def unfinished_files(path: str | os.PathLike, manifest: CacheManifest | None = None) -> list[Path]:
    """Files left by an interrupted write: parts the manifest does not list, and temporaries."""
    path = Path(path)
    listed = set((manifest or read_manifest(path)).parts)
    stray = [f for f in path.glob(f"*{TMP_MARKER}*") if f.is_file()]
    images = path / IMAGES_DIR
    if images.is_dir():
        stray += [f for f in sorted(images.iterdir()) if f.is_file() and f.name not in listed]
    return stray


def cache_info(path: str | os.PathLike) -> dict:
    """What ``vlaug info`` shows: the manifest, row counts per domain/class/split,
    prompt sets, failures and unfinished files. Reads no embedding."""
    path = Path(path)
    manifest = read_manifest(path)
    counts = {"domain": {}, "class_name": {}, "split": {}}
    n_rows = 0
    for table in iter_metadata(path, list(counts)):
        n_rows += len(table)
        for col, acc in counts.items():
            for value, n in zip(*np.unique(_strings(table.column(col)), return_counts=True)):
                acc[str(value)] = acc.get(str(value), 0) + int(n)
    prompt_sets = {}
    texts_file = path / TEXTS_NAME
    if texts_file.is_file():
        names = _read_parquet(texts_file, ["prompt_set"]).column("prompt_set").to_pylist()
        templates = {CLASSES_PROMPT_SET: manifest.templates, **manifest.prompt_sets}
        prompt_sets = {n: len(templates.get(n, [])) for n in dict.fromkeys(names)}
    return {
        "path": str(path),
        "manifest": manifest.to_dict(),
        "n_rows": n_rows,
        "per_domain": counts["domain"],
        "per_class": {c: counts["class_name"].get(c, 0) for c in manifest.classes},
        "per_split": counts["split"],
        "prompt_sets": prompt_sets,
        "failures": read_failed(path),
        "unfinished": [str(f.relative_to(path)) for f in unfinished_files(path, manifest)],
    }
