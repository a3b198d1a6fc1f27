"""The feature cache: the only package that reads or writes Parquet, one module per concern.

A cache is a directory (see DESIGN.md)::

    FEATURES/
      manifest.json             what produced it and what it holds
      images/part-*.parquet     one row per embedded image
      texts.parquet             one row per (prompt set, class)
      failed.parquet            one row per input that could not be embedded (only if any)

Every file is written to a temporary name in the same folder and renamed into place
(:mod:`~vlaug.cache.files`), so a reader never sees a half-written file. The manifest
(:mod:`~vlaug.cache.manifest`) lists the completed parts; a reader
(:mod:`~vlaug.cache.read`, :mod:`~vlaug.cache.stream`) reads exactly those, and a part on
disk that the manifest does not list is an unfinished write that is ignored. One process
writes at a time (:mod:`~vlaug.cache.lock`); torchrun ranks commit through rank files
(:mod:`~vlaug.cache.ranks`). :mod:`~vlaug.cache.budget` decides whether stages 2 and 3 hold
a cache in memory or stream it.
"""

from vlaug.cache.budget import (
    MemoryPlan,
    chunk_rows,
    embedding_bytes,
    in_memory_bytes,
    parse_memory_budget,
    plan_memory,
    resident_bytes,
)
from vlaug.cache.files import atomic_directory, atomic_write, check_output, read_json_object, write_json
from vlaug.cache.layout import (
    FAILED_NAME,
    FORMAT_VERSION,
    IMAGES_DIR,
    LOCK_NAME,
    MANIFEST_NAME,
    ROW_GROUP_ROWS,
    TEXTS_NAME,
    TMP_MARKER,
)
from vlaug.cache.lock import acquire_lock, check_unlocked, release_lock
from vlaug.cache.manifest import CacheManifest, is_cache, read_manifest, write_manifest
from vlaug.cache.ranks import merge_rank_commits, rank_file, write_rank_commit
from vlaug.cache.read import (
    FeatureCache,
    cache_info,
    check_complete,
    iter_ids,
    iter_metadata,
    read_cache,
    read_columns,
    read_failed,
    read_ids,
    read_metadata,
    read_text_templates,
    read_texts,
    unfinished_files,
)
from vlaug.cache.stream import iter_embeddings, read_embeddings, take_rows
from vlaug.cache.tables import read_table_columns
from vlaug.cache.write import image_schema, part_name, write_failed, write_part, write_predictions, write_texts
from vlaug.choices import CLASSES_PROMPT_SET, STORAGE_DTYPES

__all__ = [
    "CLASSES_PROMPT_SET", "FAILED_NAME", "FORMAT_VERSION", "IMAGES_DIR", "LOCK_NAME", "MANIFEST_NAME",
    "ROW_GROUP_ROWS", "STORAGE_DTYPES", "TEXTS_NAME", "TMP_MARKER",
    "CacheManifest", "FeatureCache", "MemoryPlan",
    "acquire_lock", "atomic_directory", "atomic_write", "cache_info", "check_complete", "check_output", "check_unlocked", "chunk_rows",
    "embedding_bytes", "image_schema", "in_memory_bytes", "is_cache", "iter_embeddings",
    "iter_ids", "iter_metadata", "merge_rank_commits", "parse_memory_budget", "part_name", "plan_memory", "rank_file", "read_embeddings", "resident_bytes",
    "read_cache", "read_columns", "read_failed", "read_ids", "read_json_object", "read_manifest", "read_metadata",
    "read_table_columns", "read_text_templates", "read_texts", "release_lock", "take_rows", "unfinished_files", "write_failed",
    "write_json", "write_manifest", "write_part", "write_predictions", "write_rank_commit", "write_texts",
]
