"""Which rows train, validate and test: domains, splits, seeded stratified splits.

Pure numpy: takes the cache's label/domain/split arrays, returns row indices.
"""

from __future__ import annotations

import numpy as np

from vlaug.errors import UsageError


def check_domains(requested: list[str] | tuple[str, ...], available: list[str]) -> list[str]:
    """The requested training domains, or all of them when none is given."""
    missing = [d for d in requested if d not in available]
    if missing:
        raise UsageError(
            f"--train-domain {missing[0]!r} is not in the cache; its domains are {available or ['(none)']}."
        )
    return list(requested) if requested else list(available)


def training_rows(domains: np.ndarray, splits: np.ndarray, train_domains: list[str] | tuple[str, ...]) -> np.ndarray:
    """Indices of rows in the training domains (all rows when none is given) that are
    training rows: split ``train`` when the cache has splits, else every row."""
    keep = np.ones(len(domains), dtype=bool)
    if train_domains:
        keep &= np.isin(domains, list(train_domains))
    if (splits != "").any():
        keep &= splits == "train"
    return np.flatnonzero(keep)


def stratified_split(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (kept, held out) with ``fraction`` of each class held out.

    Each class with at least 2 rows gives round(fraction · n) rows, at least 1, and keeps
    at least 1. Same seed -> same split. Both outputs are sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"fraction == {fraction}, must be in [0, 1).")
    rng = np.random.default_rng(seed)
    held = []
    if fraction > 0:
        for c in np.unique(labels[indices]):
            rows = indices[labels[indices] == c]
            if len(rows) < 2:
                continue
            n = min(len(rows) - 1, max(1, int(round(fraction * len(rows)))))
            held.append(rng.permutation(rows)[:n])
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=indices.dtype)
    kept = np.setdiff1d(indices, held)
    return kept, held
