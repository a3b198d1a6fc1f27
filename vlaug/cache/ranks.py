"""torchrun rank commits.

Under torchrun each rank commits its parts to images/rank-R.json (parts, rows, failures);
rank 0 merges every rank file into manifest.json when all ranks are done, and at the start
of the next run (whatever its world size) if a distributed run was interrupted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq

from vlaug.cache.files import write_json
from vlaug.cache.layout import IMAGES_DIR
from vlaug.cache.manifest import CacheManifest, write_manifest


def rank_file(path: str | os.PathLike, rank: int) -> Path:
    return Path(path) / IMAGES_DIR / f"rank-{rank}.json"


def write_rank_commit(path: str | os.PathLike, rank: int, parts: list[str], failures: list[dict]) -> None:
    """Commit a rank's parts (rows are counted from the parts when rank 0 merges them)."""
    (Path(path) / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    write_json(rank_file(path, rank), {"rank": rank, "parts": parts, "failures": failures})


def merge_rank_commits(path: str | os.PathLike, manifest: CacheManifest) -> tuple[int, list[dict]]:
    """Move the parts of every rank file into ``manifest`` (and write it), then delete the
    rank files. Returns the number of parts merged and the ranks' failures."""
    path = Path(path)
    files = sorted((path / IMAGES_DIR).glob("rank-*.json")) if (path / IMAGES_DIR).is_dir() else []
    merged, failures = 0, []
    for f in files:
        try:
            commit = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # an unreadable rank file cannot have been committed (atomic writes)
        for part in commit.get("parts", []):
            file = path / IMAGES_DIR / part
            if part not in manifest.parts and file.is_file():
                manifest.parts.append(part)
                manifest.n_images += pq.read_metadata(file).num_rows
                merged += 1
        failures += commit.get("failures", [])
    if files:
        write_manifest(path, manifest)
        for f in files:
            f.unlink(missing_ok=True)
    return merged, failures
