"""The memory-budget policy: hold a cache in memory when it fits ``--memory-budget``, else
stream it from disk. :func:`plan_memory` is the one place that decides and explains it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from vlaug.cache.manifest import CacheManifest
from vlaug.errors import UsageError


def format_size(n: int) -> str:
    """Bytes in the largest binary unit that keeps a number >= 1: ``1.50 GiB``, ``20.0 KiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def embedding_bytes(manifest: CacheManifest) -> int:
    """Memory the embeddings take once read as float32."""
    return manifest.n_images * manifest.embed_dim * 4


def parse_memory_budget(value: str) -> int:
    """``auto`` (a quarter of the RAM), or a size such as ``1.5G``, ``800M``, ``2000000000``."""
    if value == "auto":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
        except (ValueError, OSError, AttributeError):
            return 4 * 2**30
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = value.strip().upper().removesuffix("B")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(float(text))
    except ValueError:
        raise UsageError(f"--memory-budget {value!r}; use auto or a size such as 1.5G or 800M.") from None


def in_memory_bytes(manifest: CacheManifest) -> int:
    """What stage 2 needs to hold a cache in memory: about three float32 copies of its
    embeddings at their peak (the cache, the training rows and the validation rows)."""
    return 3 * embedding_bytes(manifest)


# stage 3's working memory beside the resident embeddings: the objective's float32 pieces and
# logits (vlaug.probe.PIECE_VALUES), the optimiser's state, the geometry sample, the allocator
PROBE_WORKING_BYTES = 384 * 2**20
PROBE_BYTES_PER_ROW = 48  # labels, domains, row indices and weights (int64 / float32)


def resident_bytes(manifest: CacheManifest) -> int:
    """What stage 3 needs to hold a cache in memory: its embeddings once, in their stored
    precision (float16: half of float32; rows are converted to float32 piece by piece inside
    the objective and are never copied whole), plus per-row metadata and working memory."""
    stored = manifest.n_images * manifest.embed_dim * np.dtype(manifest.dtype).itemsize
    return stored + PROBE_BYTES_PER_ROW * manifest.n_images + PROBE_WORKING_BYTES


def chunk_rows(budget: int, embed_dim: int, expansion: int = 1) -> int:
    """Rows to read from disk at a time when streaming under ``budget`` bytes: the reader
    holds about four chunks (one being decoded, two read ahead, one in use) at several
    bytes per value, and a chunk may grow ``expansion``-fold (augmentations) once read."""
    return int(np.clip(budget // 64 // (embed_dim * 4 * expansion), 256, 65536))


@dataclass(frozen=True)
class MemoryPlan:
    """Whether a cache is held in memory or streamed under a memory budget, and why."""

    budget: int  # bytes
    budget_text: str  # as the user gave it (``auto``, ``1.5G``, ...)
    need: int  # bytes the cache needs in memory (:func:`in_memory_bytes`)
    n_rows: int
    embed_dim: int

    @property
    def streamed(self) -> bool:
        return self.need > self.budget

    def chunk_rows(self, expansion: int = 1) -> int:
        """Rows to read from disk at a time (see :func:`chunk_rows`)."""
        return chunk_rows(self.budget, self.embed_dim, expansion)

    def streaming_note(self, chunk_rows: int, consequence: str = "") -> str:
        """The line a stage prints when it streams ``chunk_rows`` rows at a time."""
        return (f"streaming {self.n_rows} rows from disk, {chunk_rows} at a time: in memory they would need about "
                f"{format_size(self.need)}, more than --memory-budget {self.budget_text} ({format_size(self.budget)})"
                + (f"; {consequence}" if consequence else ""))

    def refusal(self, what: str, instead: str) -> str:
        """The message refusing ``what`` (which needs every row at once) on a streamed cache."""
        return (f"{what} needs the whole cache in memory (about {format_size(self.need)}, more than --memory-budget "
                f"{self.budget_text}); raise --memory-budget or {instead}.")


def plan_memory(manifest: CacheManifest, memory_budget: str, budget: int | None = None,
                resident: bool = False) -> MemoryPlan:
    """Decide whether ``manifest``'s cache is streamed under ``memory_budget`` (the option as
    given; ``budget``: its bytes when already parsed, so that it is parsed once).
    ``resident``: the stage holds the embeddings once in their stored precision
    (:func:`resident_bytes`, stage 3), else as float32 copies (:func:`in_memory_bytes`)."""
    budget = parse_memory_budget(memory_budget) if budget is None else budget
    need = resident_bytes(manifest) if resident else in_memory_bytes(manifest)
    return MemoryPlan(budget, memory_budget, need, manifest.n_images, manifest.embed_dim)
