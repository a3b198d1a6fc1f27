import numpy as np
import pytest

from vlaug.errors import UsageError
from vlaug.protocols import (check_domains, id_fractions, make_splits, parse_imbalance, stratified_split, training_pool,
                             training_rows, validation_mask)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stratified_split_is_disjoint_stratified_and_seeded(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, 200)
    rows = np.flatnonzero(rng.random(200) < 0.8)
    kept, held = stratified_split(rows, labels, 0.2, seed)
    assert len(np.intersect1d(kept, held)) == 0
    assert np.array_equal(np.sort(np.concatenate([kept, held])), rows)
    for c in range(5):
        n = (labels[rows] == c).sum()
        assert (labels[held] == c).sum() == min(n - 1, max(1, round(0.2 * n)))
    again = stratified_split(rows, labels, 0.2, seed)
    assert np.array_equal(again[1], held)
    assert not np.array_equal(stratified_split(rows, labels, 0.2, seed + 10)[1], held)


def test_singleton_classes_stay_in_training():
    kept, held = stratified_split(np.arange(3), np.array([0, 1, 1]), 0.5, 0)
    assert 0 in kept and len(held) == 1


def test_training_rows_follow_domains_splits_and_the_held_out_test_rows():
    domains = np.array(["a", "a", "b", "b"])
    fractions = np.array([0.5, 0.1, 0.7, 0.05])  # rows 1 and 3 are held-out test rows at test_fraction 0.2
    none = np.array([""] * 4)
    assert training_pool(domains, none, ["a"], fractions, 0.2).tolist() == [0]
    assert training_pool(domains, np.array(["train", "test", "train", "train"]), ["a"], fractions, 0.2).tolist() == [0]
    assert training_pool(domains, none, [], fractions, 0.2).tolist() == [0, 2]
    assert training_pool(domains, none, [], fractions, 0.01).tolist() == [0, 1, 2, 3]
    with pytest.raises(UsageError, match="'c' is not in the cache"):
        check_domains(["c"], ["a", "b"])
    assert check_domains([], ["a", "b"]) == ["a", "b"]


def _labels_domains(n_per=20, classes=5, domains=("a", "b", "c")):
    labels = np.array([c for _ in domains for c in range(classes) for _ in range(n_per)])
    doms = np.array([d for d in domains for _ in range(classes * n_per)])
    return labels, doms


def _fractions(n):
    return id_fractions(f"img{i}.jpg" for i in range(n))


def test_id_fractions_are_uniform_fixed_by_the_id_alone():
    f = id_fractions([f"domain/class/{i}.jpg" for i in range(20000)])
    assert f.min() >= 0 and f.max() < 1 and abs(f.mean() - 0.5) < 0.01
    assert abs((f < 0.2).mean() - 0.2) < 0.01
    # the same id gives the same number wherever it sits, and chunks read like one list
    assert id_fractions(["x", "y"]).tolist() == id_fractions([["y"], ["x"]])[::-1].tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shots, imbalance", [(None, None), (4, None), (None, (40.0, 3)), (6, (60.0, 2))])
def test_protocols_never_overlap_and_count_exactly(seed, shots, imbalance):
    labels, doms = _labels_domains()
    fractions = _fractions(len(labels))
    s = make_splits(labels, doms, np.array([""] * len(labels)), fractions=fractions, train_domains=["a"], seed=seed,
                    shots=shots, imbalance=imbalance)
    parts = [s.train, s.val, s.test_in, s.test_out]
    for i in range(4):
        for j in range(i + 1, 4):
            assert len(np.intersect1d(parts[i], parts[j])) == 0
    assert set(doms[s.train]) == set(doms[s.val]) == set(doms[s.test_in]) == {"a"}
    assert set(doms[s.test_out]) == {"b", "c"} and len(s.test_out) == 200
    # the test rows are the rows of domain a whose id hashes below 0.2, whatever the seed
    assert s.test_in.tolist() == np.flatnonzero((doms == "a") & (fractions < 0.2)).tolist()
    # the validation rows: those of the rest whose rescaled hash is below 0.2, whatever the seed
    rest = (doms == "a") & (fractions >= 0.2)
    # (and, for a class without one, its row of lowest hash)
    u = (fractions - 0.2) / 0.8
    ruled = np.flatnonzero(rest & (u < 0.2))
    without = [c for c in range(5) if not (labels[ruled] == c).any()]
    fallback = sorted(np.flatnonzero(rest & (labels == c))[np.argmin(u[rest & (labels == c)])] for c in without)
    assert s.val.tolist() == sorted(ruled.tolist() + fallback)
    counts = np.bincount(labels[s.train], minlength=5)
    expected = np.full(5, shots) if shots else np.bincount(labels[rest], minlength=5) - np.bincount(labels[s.val], minlength=5)
    if imbalance:
        assert len(s.reduced_classes) == round(imbalance[0] / 100 * 5)
        expected[s.reduced_classes] = imbalance[1]
    assert counts.tolist() == expected.tolist()


def test_cache_splits_are_used():
    labels, doms = _labels_domains(n_per=10, domains=("a", "b"))
    splits = np.array((["train"] * 6 + ["val"] * 2 + ["test"] * 2) * 10)
    s = make_splits(labels, doms, splits, fractions=_fractions(len(labels)), train_domains=["a"], seed=0)
    assert set(splits[s.train]) == {"train"} and set(splits[s.val]) == {"val"} and set(splits[s.test_in]) == {"test"}
    assert set(splits[s.test_out]) == {"test"} and set(doms[s.test_out]) == {"b"}


def test_protocol_errors():
    labels, doms = _labels_domains()
    with pytest.raises(UsageError, match="--shots 50"):
        make_splits(labels, doms, np.array([""] * len(labels)), fractions=_fractions(len(labels)), train_domains=["a"], seed=0, shots=50,
                    class_names=list("vwxyz"))
    for bad in ["120:3", "-1:3", "50", "50:0", "x:y"]:
        with pytest.raises(UsageError, match="--imbalance"):
            parse_imbalance(bad)
    assert parse_imbalance("50:10") == (50.0, 10)


def test_validation_rows_are_fixed_by_the_ids_stratified_and_kept_from_heads():
    """The validation rows depend on the row ids alone: the same for every seed, stable when
    rows are added, at least one per class of 2+ rows and never a whole class; the rows a
    head may fit on (training_rows) are the pool without them (issue 27, item 4)."""
    labels, doms = _labels_domains()
    fractions, none = _fractions(len(labels)), np.array([""] * len(labels))
    vals = {tuple(make_splits(labels, doms, none, fractions=fractions, train_domains=["a"], seed=seed).val)
            for seed in range(4)}
    assert len(vals) == 1
    val = np.array(vals.pop())
    head_rows = training_rows(doms, none, labels, ["a"], fractions, 0.2, 0.2)
    assert len(np.intersect1d(head_rows, val)) == 0
    pool = training_pool(doms, none, ["a"], fractions, 0.2)
    assert sorted(np.concatenate([head_rows, val]).tolist()) == pool.tolist()
    # adding rows moves no old row (but the fallback row of a class that had no row below the fraction)
    more_labels, more_doms = np.concatenate([labels, labels[:50]]), np.concatenate([doms, np.array(["a"] * 50)])
    more = id_fractions([f"img{i}.jpg" for i in range(len(more_labels))])
    grown = make_splits(more_labels, more_doms, np.array([""] * len(more_labels)), fractions=more, train_domains=["a"],
                        seed=0).val
    ruled = val[(fractions[val] - 0.2) / 0.8 < 0.2]  # all but the rows a class of no such row falls back on
    assert len(ruled) >= len(val) - 5 and set(ruled.tolist()) <= set(grown.tolist())
    # a class of two rows whose hashes both fall past the fraction still validates on one and trains on the other
    small = validation_mask(np.arange(4), np.array([0, 0, 1, 1]), np.array([0.9, 0.95, 0.01, 0.02]), np.array([""] * 4),
                            0.0, 0.2)
    assert small.tolist() == [True, False, True, False]
    # the cache's own val rows validate: heads may then fit on every train row
    splits = np.array((["train"] * 6 + ["val"] * 2 + ["test"] * 2) * 30)
    assert training_rows(doms, splits, labels, ["a"], fractions, 0.2, 0.2).tolist() == \
        training_pool(doms, splits, ["a"], fractions, 0.2).tolist()
