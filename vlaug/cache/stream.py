"""Streaming a cache larger than memory: embeddings chunk by chunk, decoded ahead in a thread."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlaug.cache.manifest import CacheManifest, read_manifest
from vlaug.cache.read import embeddings_to_numpy, listed_part_files
from vlaug.errors import CacheError


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead: Parquet
    decoding (which releases the GIL) overlaps the caller's work, in bounded memory.
    Exceptions reach the caller; a caller that stops early stops the thread."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry) -> bool:  # False once the caller has stopped (never blocks for good)
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as e:  # handed to the caller
            put((done, e))

    thread = threading.Thread(target=run, name="vlaug-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def iter_embeddings(path: str | os.PathLike, batch_rows: int = 65536, keep_dtype: bool = False):
    """Yield (first row index, (m, d) float32 embeddings) over the listed parts, in order,
    at most ``batch_rows`` rows (and at most a row group) at a time, checked like
    :func:`read_cache` (``keep_dtype``: in the stored precision, possibly read-only views).
    A background thread decodes up to two batches ahead: a pyarrow
    dataset scanner would decode faster, but runs ahead without bound when the caller is
    slower than the disk (2 GB resident on a 2M-row cache). Parts are read a row group at
    a time: pre-buffering (pyarrow's default) would first read a part's whole column.
    """
    path = Path(path)
    manifest = read_manifest(path)

    def batches():
        for f in listed_part_files(path, manifest):
            try:
                for batch in pq.ParquetFile(f, pre_buffer=False).iter_batches(batch_size=batch_rows, columns=["embedding"], use_threads=False):
                    yield embeddings_to_numpy(pa.chunked_array([batch.column(0)]), manifest.embed_dim, str(f), keep_dtype)
            except (OSError, pa.ArrowException) as e:
                raise CacheError(f"cannot read {str(f)!r}: {e}. The file is damaged; re-run vlaug embed to rebuild it.") from None

    start = 0
    for emb in prefetch(batches()):
        yield start, emb
        start += len(emb)


def read_embeddings(path: str | os.PathLike, manifest: CacheManifest | None = None, batch_rows: int = 16384) -> np.ndarray:
    """Every listed row's embedding, (n, d), in the cache's stored precision (float16 stays
    float16: half the memory of float32), read ``batch_rows`` at a time (:func:`iter_embeddings`)
    into one preallocated array, so that the peak is the array plus a few batches."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    try:
        n = sum(pq.ParquetFile(f).metadata.num_rows for f in listed_part_files(path, manifest))
    except (OSError, pa.ArrowException) as e:
        raise CacheError(f"cannot read a part of {str(path)!r}: {e}. The file is damaged; re-run vlaug embed to rebuild it.") from None
    out = np.empty((n, manifest.embed_dim), np.dtype(manifest.dtype))
    for start, emb in iter_embeddings(path, batch_rows, keep_dtype=True):
        out[start:start + len(emb)] = emb
    pa.default_memory_pool().release_unused()  # what the reader's allocator kept goes back to the system
    return out


def take_rows(chunks: Iterable[tuple[int, np.ndarray]], rows: np.ndarray) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """The embeddings of ``rows`` (global row indices, any order, no repeats) out of
    ``(first row, embeddings)`` chunks such as :func:`iter_embeddings` yields: one
    ``(positions in rows, (m, d) embeddings)`` per chunk that holds any of them."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    for start, emb in chunks:
        lo, hi = np.searchsorted(ordered, [start, start + len(emb)])
        if hi > lo:
            yield order[lo:hi], emb[ordered[lo:hi] - start]
