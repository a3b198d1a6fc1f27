"""Writing rows: image parts, texts, failures and predictions (Parquet, atomically)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlaug.cache.files import atomic_write
from vlaug.cache.layout import FAILED_NAME, IMAGES_DIR, ROW_GROUP_ROWS, TEXTS_NAME


def arrow_dtype(dtype: str) -> pa.DataType:
    """The Arrow type of a storage dtype name (``float16``, ``float32``)."""
    return pa.from_numpy_dtype(np.dtype(dtype))


def image_schema(embed_dim: int, dtype: str) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("path", pa.string()),
            ("label", pa.int32()),
            ("class_name", pa.string()),
            ("domain", pa.string()),
            ("split", pa.string()),
            ("embedding", pa.list_(arrow_dtype(dtype), embed_dim)),
        ]
    )


def _write_table(table: pa.Table, file: Path, **kwargs) -> None:
    """``pq.write_table`` without dictionary encoding for vector columns (embeddings,
    probabilities): a dictionary-encoded embedding column takes 4-5x longer to decode and
    2x longer to write, for a 6 % smaller file."""
    scalar = [f.name for f in table.schema if not pa.types.is_fixed_size_list(f.type)]
    pq.write_table(table, file, use_dictionary=scalar, **kwargs)


def _embedding_array(embeddings: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    n, d = embeddings.shape
    flat = np.ascontiguousarray(embeddings, dtype=np.dtype(dtype)).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=arrow_dtype(dtype)), d)


def part_name(index: int, rank: int | None = None) -> str:
    """``part-00012.parquet``, or ``part-r3-00012.parquet`` for torchrun rank 3."""
    return f"part-{index:05d}.parquet" if rank is None else f"part-r{rank}-{index:05d}.parquet"


def write_part(path: str | os.PathLike, name: str, rows: dict, embeddings: np.ndarray, dtype: str) -> None:
    """Write one part of image rows atomically to ``images/NAME``.

    Args:
        rows: lists ``id``, ``path``, ``label``, ``class_name``, ``domain``, ``split`` (and any more
            string columns, written after the embedding: readers select the standard ones).
        embeddings: (n, d) L2-normalised embeddings, stored as ``dtype``.
    """
    folder = Path(path) / IMAGES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    schema = image_schema(embeddings.shape[1], dtype)
    arrays = [pa.array(rows[name_], type=schema.field(name_).type) for name_ in schema.names[:-1]]
    table = pa.Table.from_arrays(arrays + [_embedding_array(embeddings, dtype)], schema=schema)
    for extra in [k for k in rows if k not in schema.names]:  # more string columns (a generated set's provenance)
        table = table.append_column(extra, pa.array(rows[extra], pa.string()))
    atomic_write(folder / name, lambda tmp: _write_table(table, tmp, row_group_size=max(1, min(len(table), ROW_GROUP_ROWS))))


TEMPLATES_KEY = b"vlaug.templates"  # texts.parquet metadata: JSON {prompt set: templates it was encoded from}


def write_texts(path: str | os.PathLike, texts: dict[str, np.ndarray], classes: list[str],
                templates: dict[str, list[str]] | None = None) -> None:
    """Write ``texts.parquet``: one row per (prompt set, class); ``texts[name]`` is (n_classes, d).

    ``templates`` (prompt set -> the templates its rows were encoded from) is stored in the
    file's own metadata, so the file says what it holds even if the manifest is older.
    """
    prompt_set, label, class_name, chunks = [], [], [], []
    for name, emb in texts.items():
        prompt_set += [name] * len(classes)
        label += list(range(len(classes)))
        class_name += list(classes)
        chunks.append(np.asarray(emb, dtype=np.float32))
    d = chunks[0].shape[1]
    table = pa.table(
        {
            "prompt_set": pa.array(prompt_set, pa.string()),
            "label": pa.array(label, pa.int32()),
            "class_name": pa.array(class_name, pa.string()),
            "embedding": _embedding_array(np.concatenate(chunks), "float32"),
        }
    )
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), d)
    if templates is not None:
        import json

        table = table.replace_schema_metadata({TEMPLATES_KEY: json.dumps({k: templates[k] for k in texts if k in templates})})
    atomic_write(Path(path) / TEXTS_NAME, lambda tmp: _write_table(table, tmp))


def write_failed(path: str | os.PathLike, failures: list[dict]) -> None:
    """Write ``failed.parquet`` (columns id, path, error), or remove it when there is no failure."""
    file = Path(path) / FAILED_NAME
    if not failures:
        file.unlink(missing_ok=True)
        return
    table = pa.table({k: pa.array([f[k] for f in failures], pa.string()) for k in ("id", "path", "error")})
    atomic_write(file, lambda tmp: _write_table(table, tmp))


def write_predictions(path: str | os.PathLike, ids: list[str], labels: np.ndarray, classes: list[str],
                      probabilities: np.ndarray, paths: list[str] | None = None) -> None:
    """Write a predictions Parquet file atomically: id, path, label, class_name, probabilities[C]."""
    labels = np.asarray(labels, dtype=np.int32)
    table = pa.table({
        "id": pa.array(ids, pa.string()),
        **({"path": pa.array(paths, pa.string())} if paths is not None else {}),
        "label": pa.array(labels, pa.int32()),
        "class_name": pa.array([classes[i] for i in labels], pa.string()),
        "probabilities": _embedding_array(np.asarray(probabilities, np.float32), "float32"),
    })
    atomic_write(Path(path), lambda tmp: _write_table(table, tmp))
