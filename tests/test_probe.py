"""The probe against scikit-learn and hand computations; reweighting rules; protocols."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from tests.conftest import synthetic_clusters
from vlaug.errors import UsageError
from vlaug.probe import (
    Rows,
    fit_probe,
    group_ids,
    probe_objective,
    sample_weights_from_groups,
    select_weight_decay,
    update_group_weights,
    weight_decay_grid,
)
from vlaug.protocols import make_splits, parse_imbalance


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weight_decay", [1e-2, 1e-3, 1e-4])
def test_probe_matches_sklearn_within_half_a_point(seed, weight_decay):
    x, y, _, _ = synthetic_clusters(n_per_class=150, d=32, n_classes=6, noise=1.2, seed=seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    train, test = order[:600], order[600:]
    sk = LogisticRegression(C=1 / (weight_decay * len(train)), max_iter=2000, tol=1e-8).fit(x[train], y[train])
    W, b, _ = fit_probe(Rows.of(torch.tensor(x[train]), F.one_hot(torch.tensor(y[train]), 6).float()), weight_decay, max_iter=500)
    ours = ((torch.tensor(x[test]) @ W + b).argmax(1).numpy() == y[test]).mean()
    assert 0.3 < sk.score(x[test], y[test]) < 0.99  # a set where the regularisation matters
    assert abs(ours - sk.score(x[test], y[test])) <= 0.005
    np.testing.assert_allclose(W.numpy() - W.numpy().mean(1, keepdims=True),
                               sk.coef_.T - sk.coef_.T.mean(1, keepdims=True), atol=0.05 * np.abs(sk.coef_).max())


def test_soft_label_objective_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    W = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([0.0, 1.0])
    t = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    w = torch.tensor([0.5, 0.5])
    # row 1 logits (2, 1); row 2 logits (0, 2)
    lse1, lse2 = math.log(math.exp(2) + math.exp(1)), math.log(1 + math.exp(2))
    ce1 = -(0.25 * (2 - lse1) + 0.75 * (1 - lse1))
    ce2 = -(1.0 * (0 - lse2))
    expected = 0.5 * ce1 + 0.5 * ce2 + 0.5 * 0.1 * (4 + 1)
    assert probe_objective(x, W, b, t, w, 0.1).item() == pytest.approx(expected)
    anchor = torch.ones(2, 2)
    assert probe_objective(x, W, b, t, w, 0.1, anchor).item() == pytest.approx(0.5 * ce1 + 0.5 * ce2 + 0.05 * (1 + 1 + 1 + 0))


def test_seed_category_weights_follow_the_update_rule():
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    losses = torch.tensor([1.0, 2.0, 0.5, 0.0])
    expected = np.array([0.25 * math.exp(0.01 * v) for v in (1.0, 2.0, 0.5, 0.0)])
    np.testing.assert_allclose(update_group_weights(q, losses, 0.01).numpy(), expected / expected.sum(), rtol=1e-6)
    # seed categories: within each class, rows ranked by loss into 4 groups
    labels = torch.tensor([0] * 8 + [1] * 4)
    row_losses = torch.tensor([8.0, 7, 6, 5, 4, 3, 2, 1, 0.1, 0.4, 0.3, 0.2])
    groups = group_ids(labels, row_losses, None, "seed-category")
    assert groups[:8].tolist() == [3, 3, 2, 2, 1, 1, 0, 0]  # lowest losses -> category 0
    assert groups[8:].tolist() == [4, 7, 6, 5]
    w = sample_weights_from_groups(groups, torch.full((8,), 1 / 8))
    assert w.sum().item() == pytest.approx(1.0) and w[0].item() == pytest.approx(1 / 16)
    assert group_ids(labels, row_losses, torch.tensor([0, 1] * 6), "groupdro").tolist() == [0, 1] * 4 + [2, 3] * 2


def test_weight_decay_selection_prefers_validation_accuracy():
    x, y, _, _ = synthetic_clusters(n_per_class=60, d=16, n_classes=3, noise=1.0)
    xt, yt = torch.tensor(x), torch.tensor(y)
    best, search = select_weight_decay(Rows.of(xt[::2], F.one_hot(yt[::2], 3).float()), Rows.of(xt[1::2], yt[1::2]),
                                       weight_decay_grid(4))
    assert len(search) == 4 and [r["weight_decay"] for r in search] == weight_decay_grid(4)
    assert best["val_accuracy"] == max(r["val_accuracy"] for r in search)
    assert best["W"].shape == (16, 3)


def _labels_domains(n_per=20, classes=5, domains=("a", "b", "c")):
    labels = np.array([c for _ in domains for c in range(classes) for _ in range(n_per)])
    doms = np.array([d for d in domains for _ in range(classes * n_per)])
    return labels, doms


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shots, imbalance", [(None, None), (4, None), (None, (40.0, 3)), (6, (60.0, 2))])
def test_protocols_never_overlap_and_count_exactly(seed, shots, imbalance):
    labels, doms = _labels_domains()
    s = make_splits(labels, doms, np.array([""] * len(labels)), ["a"], seed, 0.2, 0.2, shots, imbalance)
    parts = [s.train, s.val, s.test_in, s.test_out]
    for i in range(4):
        for j in range(i + 1, 4):
            assert len(np.intersect1d(parts[i], parts[j])) == 0
    assert set(doms[s.train]) == set(doms[s.val]) == set(doms[s.test_in]) == {"a"}
    assert set(doms[s.test_out]) == {"b", "c"} and len(s.test_out) == 200
    counts = np.bincount(labels[s.train], minlength=5)
    expected = np.full(5, shots if shots else 20 - 4 - 3)  # 4 test, 3 val (20 % of the remaining 16) per class
    if imbalance:
        assert len(s.reduced_classes) == round(imbalance[0] / 100 * 5)
        expected[s.reduced_classes] = imbalance[1]
    assert counts.tolist() == expected.tolist()


def test_cache_splits_are_used():
    labels, doms = _labels_domains(n_per=10, domains=("a", "b"))
    splits = np.array((["train"] * 6 + ["val"] * 2 + ["test"] * 2) * 10)
    s = make_splits(labels, doms, splits, ["a"], 0)
    assert set(splits[s.train]) == {"train"} and set(splits[s.val]) == {"val"} and set(splits[s.test_in]) == {"test"}
    assert set(splits[s.test_out]) == {"test"} and set(doms[s.test_out]) == {"b"}


def test_protocol_errors():
    labels, doms = _labels_domains()
    with pytest.raises(UsageError, match="--shots 50"):
        make_splits(labels, doms, np.array([""] * len(labels)), ["a"], 0, shots=50, class_names=list("vwxyz"))
    for bad in ["120:3", "-1:3", "50", "50:0", "x:y"]:
        with pytest.raises(UsageError, match="--imbalance"):
            parse_imbalance(bad)
    assert parse_imbalance("50:10") == (50.0, 10)
