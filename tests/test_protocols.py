import numpy as np
import pytest

from vlaug.errors import UsageError
from vlaug.protocols import check_domains, stratified_split, training_rows


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


def test_training_rows_follow_domains_and_splits():
    domains = np.array(["a", "a", "b", "b"])
    assert training_rows(domains, np.array([""] * 4), ["a"]).tolist() == [0, 1]
    assert training_rows(domains, np.array(["train", "test", "train", "train"]), ["a"]).tolist() == [0]
    assert training_rows(domains, np.array([""] * 4), []).tolist() == [0, 1, 2, 3]
    with pytest.raises(UsageError, match="'c' is not in the cache"):
        check_domains(["c"], ["a", "b"])
    assert check_domains([], ["a", "b"]) == ["a", "b"]
