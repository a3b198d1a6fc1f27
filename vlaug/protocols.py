"""Which rows train, validate and test: domains, splits, seeded stratified splits.

Pure numpy: takes the cache's label/domain/split arrays, returns row indices.

One held-out test split serves every stage. When the cache has a ``split`` column, its
``test`` rows are the test rows. When it has none, a row of a training domain is a test
row when the hash of its id falls below ``test_fraction`` (:func:`id_fractions`): fixed
by the row itself, independent of any seed and of the other rows (adding images to a
cache never moves an old row across the split), and the same for ``vlaug train-box`` and
``vlaug probe``.

The validation rows follow the same kind of rule (:func:`validation_mask`): the cache's
``val`` rows, else the rows of the training pool whose id hash falls in the next
``val_fraction`` of [0, 1), stratified by class. They are the same for every seed, and
``vlaug train-box`` never trains a head on them, so no selection a probe makes on them
was fitted on them too (issue 27). Seeds vary what they should: initialisation, sampled
augmentations, few-shot and imbalance draws.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from vlaug.errors import UsageError


def check_domains(requested: list[str] | tuple[str, ...], available: list[str], flag: str = "--train-domain") -> list[str]:
    """The requested domains (``flag`` names them in errors), or all of them when none is given."""
    missing = [d for d in requested if d not in available]
    if missing:
        raise UsageError(
            f"{flag} {missing[0]!r} is not in the cache; its domains are {available or ['(none)']}."
        )
    return list(requested) if requested else list(available)


def id_fractions(ids: Iterable[str] | Iterable[Iterable[str]]) -> np.ndarray:
    """A number in [0, 1) per row id (or per id of each chunk of ids), from a hash of the id
    alone: the row's place in the held-out test split."""
    out = []
    for item in ids:
        chunk = [item] if isinstance(item, str) else item
        out.append(np.fromiter((int.from_bytes(hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest(), "little")
                                for i in chunk), dtype=np.uint64))
    values = np.concatenate(out) if out else np.zeros(0, np.uint64)
    return (values >> np.uint64(11)).astype(np.float64) / float(2**53)


def test_mask(splits: np.ndarray, fractions: np.ndarray, test_fraction: float) -> np.ndarray:
    """The held-out test rows of a cache: its ``test`` rows when it has a split column, else
    the rows whose id fraction is below ``test_fraction``."""
    if (splits != "").any():
        return splits == "test"
    return fractions < test_fraction


def training_pool(domains: np.ndarray, splits: np.ndarray, train_domains: list[str] | tuple[str, ...],
                  fractions: np.ndarray, test_fraction: float) -> np.ndarray:
    """Indices of the rows of the training domains (all rows when none is given) that are
    neither test rows nor the cache's own ``val`` rows (split ``train`` when the cache has
    splits, else every row outside the held-out test split): training and validation rows."""
    keep = np.ones(len(domains), dtype=bool)
    if train_domains:
        keep &= np.isin(domains, list(train_domains))
    if (splits != "").any():
        keep &= splits == "train"
    else:
        keep &= ~test_mask(splits, fractions, test_fraction)
    return np.flatnonzero(keep)


def validation_mask(pool: np.ndarray, labels: np.ndarray, fractions: np.ndarray, splits: np.ndarray,
                    test_fraction: float, val_fraction: float) -> np.ndarray:
    """Which rows of ``pool`` (:func:`training_pool`) validate, by a rule of each row's id
    alone, the same for every seed and stage: the row's id hash, rescaled to [0, 1) over
    the pool (past ``test_fraction`` when the test rows are hashed too), below
    ``val_fraction``. Stratified: a class with at least 2 rows in the pool gets at least one
    validation row (its lowest hash) and keeps at least one training row (its highest), so
    a small class is never left out of either. Adding images to a cache moves no old row
    across, but for that fallback in a class of a few rows."""
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"--val-fraction {val_fraction}, must be in (0, 1).")
    u = fractions[pool]
    if not (splits != "").any():  # the pool's hashes lie in [test_fraction, 1)
        u = (u - test_fraction) / (1.0 - test_fraction)
    val = u < val_fraction
    if len(pool):
        lab = labels[pool]
        order = np.lexsort((u, lab))  # by class, then hash
        _, starts, counts = np.unique(lab[order], return_index=True, return_counts=True)
        for start, count in zip(starts, counts):
            if count < 2:
                continue
            mine = order[start:start + count]
            if not val[mine].any():
                val[mine[0]] = True
            if val[mine].all():
                val[mine[-1]] = False
    return val


def training_rows(domains: np.ndarray, splits: np.ndarray, labels: np.ndarray, train_domains: list[str] | tuple[str, ...],
                  fractions: np.ndarray, test_fraction: float, val_fraction: float) -> np.ndarray:
    """Indices of the rows a head may fit on: the training pool (:func:`training_pool`)
    without the validation rows every probe seed selects on (the cache's ``val`` rows, which
    are not in the pool, or :func:`validation_mask`'s)."""
    pool = training_pool(domains, splits, train_domains, fractions, test_fraction)
    if _cache_validates(domains, splits, train_domains):
        return pool
    return pool[~validation_mask(pool, labels, fractions, splits, test_fraction, val_fraction)]


def _cache_validates(domains: np.ndarray, splits: np.ndarray, train_domains) -> bool:
    """Whether the cache's split column holds ``val`` rows in the training domains (then they validate)."""
    in_train = np.isin(domains, list(train_domains)) if len(train_domains) else np.ones(len(domains), bool)
    return bool((in_train & (splits == "val")).any())


def stratified_split(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (kept, held out) with ``fraction`` of each class held out.

    Each class with at least 2 rows gives round(fraction · n) rows, at least 1, and keeps
    at least 1. Same seed -> same split. Both outputs are sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"fraction == {fraction}, must be in [0, 1).")
    rng = np.random.default_rng(seed)
    out = np.zeros(len(indices), dtype=bool)  # held-out positions in indices
    if fraction > 0:
        lab = labels[indices]
        order = np.argsort(lab, kind="stable")  # each class's positions, in the order of indices
        _, starts, counts = np.unique(lab[order], return_index=True, return_counts=True)
        for start, count in zip(starts, counts):
            if count < 2:
                continue
            n = min(count - 1, max(1, int(round(fraction * count))))
            out[rng.permutation(order[start:start + count])[:n]] = True
    if len(indices) > 1 and not (indices[1:] > indices[:-1]).all():  # not sorted and unique already
        return np.unique(indices[~out]), np.unique(indices[out])
    return indices[~out], indices[out]


def parse_imbalance(spec: str | None) -> tuple[float, int] | None:
    """``X:N`` -> (X % of classes, N images each); None passes through."""
    if not spec:
        return None
    try:
        pct, n = spec.split(":")
        pct, n = float(pct), int(n)
    except ValueError:
        raise UsageError(f"--imbalance {spec!r} must look like X:N, e.g. 50:10 (50 % of classes keep 10 images).") from None
    if not 0.0 <= pct <= 100.0:
        raise UsageError(f"--imbalance {spec!r}: X == {pct:g}, must be in 0-100.")
    if n < 1:
        raise UsageError(f"--imbalance {spec!r}: N == {n}, must be >= 1.")
    return pct, n


@dataclass
class Splits:
    """Row indices of one seed's protocol; the four parts never share a row."""

    train: np.ndarray
    val: np.ndarray
    test_in: np.ndarray  # held-out rows of the training domains
    test_out: np.ndarray  # rows of every other domain
    reduced_classes: list[int] = field(default_factory=list)  # classes cut by --imbalance

    @property
    def test(self) -> np.ndarray:
        return np.concatenate([self.test_in, self.test_out])

    def sizes(self) -> dict:
        return {"train": int(len(self.train)), "val": int(len(self.val)), "test_in": int(len(self.test_in)),
                "test_out": int(len(self.test_out))}


def make_splits(
    labels: np.ndarray,
    domains: np.ndarray,
    splits: np.ndarray,
    *,
    fractions: np.ndarray,
    train_domains: list[str],
    seed: int,
    test_fraction: float = 0.2,
    val_fraction: float = 0.2,
    shots: int | None = None,
    imbalance: tuple[float, int] | None = None,
    class_names: list[str] | None = None,
    val_shots: int | str | None = None,
) -> Splits:
    """One seed's protocol (LARE's Table 1 columns, Figure 4 few-shot, Table 3 imbalance).

    Training domains' rows are split into train / val / in-domain test: by the cache's
    ``split`` column when it has one (``val`` rows, else ``val_fraction`` of the ``train``
    rows by :func:`validation_mask`), else the held-out test rows are fixed by the hash of
    their id (``fractions`` from :func:`id_fractions`, below ``test_fraction``) and
    :func:`validation_mask` picks ``val_fraction`` of the rest, stratified; neither depends
    on the seed. Every row of the other domains is out-of-domain test (only its ``test``
    rows when the cache has splits). Then ``shots`` keeps K training rows per class, and
    ``imbalance`` = (X, N) cuts X % of the classes, both drawn with the seed.

    Few-shot validation (issue 29): with ``shots``, the validation rows are few-shot too:
    ``val_shots`` per class (None: min(K, FEW_SHOT_VAL)) drawn with the seed from those
    validation rows, or all of them with ``val_shots="all"``. Every draw is a prefix of one
    seeded permutation per class (training and validation each their own), so the same seed
    gives nested sets: the 2-shot rows hold the 1-shot rows, and so on.
    """
    names = class_names or [str(c) for c in range(int(labels.max()) + 1)]
    in_train_domain = np.isin(domains, train_domains) if len(train_domains) else np.ones(len(labels), bool)
    pool = training_pool(domains, splits, train_domains, fractions, test_fraction)
    if (splits != "").any():
        val = np.flatnonzero(in_train_domain & (splits == "val"))
        test_in = np.flatnonzero(in_train_domain & (splits == "test"))
        test_out = np.flatnonzero(~in_train_domain & (splits == "test"))
    else:
        val = np.zeros(0, np.int64)
        test_in = np.flatnonzero(in_train_domain & test_mask(splits, fractions, test_fraction))
        test_out = np.flatnonzero(~in_train_domain)
    if not len(val):
        held_val = validation_mask(pool, labels, fractions, splits, test_fraction, val_fraction)
        pool, val = pool[~held_val], pool[held_val]
    rng = np.random.default_rng([seed, 7])
    train = pool if shots is None else _keep_shots(pool, labels, shots, rng, names)
    if shots is not None and val_shots != "all":
        k = min(shots, FEW_SHOT_VAL) if val_shots is None else int(val_shots)
        # the default takes what a class has when it holds fewer; a --val-shots the user gave must be met
        val = _keep_shots(val, labels, k, np.random.default_rng([seed, 8]), names, "--val-shots", "validation rows",
                          at_most=val_shots is None)
    reduced: list[int] = []
    if imbalance is not None:
        train, reduced = _cut_classes(train, labels, imbalance, rng, names)
    return Splits(np.sort(train), np.sort(val), np.sort(test_in), np.sort(test_out), reduced)


# With --shots K, the validation rows per class when --val-shots is not given: min(K, 4) (issue 29: a
# few-shot user does not hold a large labelled validation set; 4 keeps the 1- and 2-shot sets honest while
# leaving the selection some rows at 8 and 16 shots)
FEW_SHOT_VAL = 4


def _keep_shots(pool: np.ndarray, labels: np.ndarray, shots: int, rng: np.random.Generator, names: list[str],
                flag: str = "--shots", what: str = "training rows (after validation)", at_most: bool = False) -> np.ndarray:
    """K rows per class of ``pool``, drawn with ``rng`` (a prefix of one permutation per class:
    a larger K keeps the rows of a smaller one); ``at_most``: a class with fewer keeps them all."""
    keep = []
    for c in np.unique(labels[pool]):
        rows = pool[labels[pool] == c]
        if len(rows) < shots and not at_most:
            raise UsageError(
                f"{flag} {shots}: class {names[c]!r} has only {len(rows)} {what}; pass a smaller value."
            )
        keep.append(rng.permutation(rows)[:shots])
    return np.sort(np.concatenate(keep))


def _cut_classes(train: np.ndarray, labels: np.ndarray, imbalance: tuple[float, int], rng: np.random.Generator,
                 names: list[str]) -> tuple[np.ndarray, list[int]]:
    """X % of the classes present (drawn with ``rng``) cut to N training rows each."""
    pct, n_keep = imbalance
    present = np.unique(labels[train])
    n_cut = int(round(pct / 100 * len(present)))
    reduced = sorted(int(c) for c in rng.permutation(present)[:n_cut])
    keep = []
    for c in present:
        rows = train[labels[train] == c]
        if c in reduced:
            if len(rows) < n_keep:
                raise UsageError(
                    f"--imbalance: class {names[c]!r} has only {len(rows)} training rows, fewer than N = {n_keep}."
                )
            rows = rng.permutation(rows)[:n_keep]
        keep.append(rows)
    return np.sort(np.concatenate(keep)), reduced


# ----------------------------------------------------------------------------- DomainBed

HOLDOUT_FRACTION = 0.2  # DomainBed's holdout_fraction: each domain's `out` part


def in_out_splits(labels: np.ndarray, domains: np.ndarray, splits: np.ndarray, domain_names: list[str], seed: int,
                  holdout_fraction: float = HOLDOUT_FRACTION) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each domain's ``(in, out)`` rows for one seed (DomainBed's trial): ``holdout_fraction``
    of each class of the domain held out (:func:`stratified_split`, drawn with the seed and
    the domain's place in ``domain_names``), or, when the cache has a ``split`` column, its
    ``train`` rows as ``in`` and its ``val`` rows as ``out`` (the same for every seed; any
    other split value is refused)."""
    out = {}
    has_splits = bool((splits != "").any())
    if has_splits:
        other = sorted(set(np.unique(splits).tolist()) - {"train", "val"})
        if other:
            raise UsageError(f"--protocol leave-one-domain-out reads the cache's split column as DomainBed's in/out parts "
                             f"(train rows: in, val rows: out); it also holds {other}. Embed a manifest whose split column "
                             "holds only train and val, or one without a split column (the probe then draws them per seed).")
    for k, d in enumerate(domain_names):
        rows = np.flatnonzero(domains == d)
        if has_splits:
            out[d] = (rows[splits[rows] == "train"], rows[splits[rows] == "val"])
        else:
            out[d] = stratified_split(rows, labels, holdout_fraction, [seed, 0xD0, k])
        if not len(out[d][0]) or not len(out[d][1]):
            raise UsageError(f"domain {d!r} has {len(out[d][0])} in and {len(out[d][1])} out rows for seed {seed}; "
                             "every domain needs both (give it more rows, or leave it out of the cache).")
    return out
