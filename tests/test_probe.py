"""The probe against scikit-learn and hand computations; weight-decay selection; reweighting rules."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from tests.conftest import synthetic_clusters
from vlaug.simulate import planted
from vlaug.zero_shot import zero_shot_logits
from vlaug.probe import (
    LinearProbe,
    ProbeConfig,
    calibrate_temperature,
    Rows,
    fit_probe,
    fit_reweighted,
    group_ids,
    probe_objective,
    sample_weights_from_groups,
    choose,
    fit_probes,
    select_weight_decay,
    update_group_weights,
    weight_decay_grid,
)


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


@pytest.mark.parametrize("seed", [0, 1])
def test_weak_weight_decays_end_at_the_minimiser(seed):
    """At weak weight decays on separable rows the objective is nearly flat along directions
    the rows do not pin down: the fit must still end at the minimiser (scikit-learn's lbfgs
    in float64 to a tight tolerance), which an absolute gradient test alone does not ensure."""
    import warnings

    x, y, _, _ = synthetic_clusters(n_per_class=30, d=64, n_classes=6, noise=0.8, seed=seed)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    rows = Rows.of(torch.tensor(x, dtype=torch.float32), torch.tensor(y), n_classes=6)
    for weight_decay in (1e-6, 1e-7):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn's own iteration cap, far above what it needs here
            sk = LogisticRegression(C=1 / (weight_decay * len(y)), tol=1e-12, max_iter=50_000).fit(x.astype(np.float64), y)
        assert sk.score(x, y) == 1.0  # separable: the case where the objective is nearly flat
        target = torch.tensor(sk.coef_.T, dtype=torch.float32)
        distance = lambda W: float((W - target).norm() / target.norm())  # noqa: E731
        W, b, info = fit_probe(rows, weight_decay, max_iter=200)
        assert distance(W) < 0.03 and info["iterations"] < 200, (weight_decay, distance(W), info)
        if weight_decay == 1e-7:  # the absolute test alone stops far from it (measured: 30 % to 35 %)
            assert distance(fit_probe(rows, weight_decay, max_iter=200, relative_tolerance=0)[0]) > 0.1


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
    # seed categories: within each training domain, rows ranked by loss into 4 groups
    labels = torch.tensor([0] * 8 + [1] * 4)
    row_losses = torch.tensor([8.0, 7, 6, 5, 4, 3, 2, 1, 0.1, 0.4, 0.3, 0.2])
    domains = torch.tensor([2] * 8 + [5] * 4)  # global domain indices: 2 and 5 of the cache's
    groups = group_ids(labels, row_losses, domains, "seed-category")
    assert groups[:8].tolist() == [3, 3, 2, 2, 1, 1, 0, 0]  # lowest losses -> category 0
    assert groups[8:].tolist() == [4, 7, 6, 5]
    w = sample_weights_from_groups(groups, torch.full((8,), 1 / 8))
    assert w.sum().item() == pytest.approx(1.0) and w[0].item() == pytest.approx(1 / 16)
    # no empty group, whatever the domains' global indices (one training domain: 4 groups)
    assert sorted(group_ids(labels, row_losses, torch.full((12,), 7), "seed-category").unique().tolist()) == [0, 1, 2, 3]
    assert group_ids(labels, row_losses, torch.tensor([0, 3] * 6), "groupdro").tolist() == [0, 1] * 4 + [2, 3] * 2
    assert group_ids(labels, row_losses, torch.full((12,), 9), "groupdro").tolist() == [0] * 8 + [1] * 4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reweighting_raises_a_planted_minority_pattern(seed):
    """From the selected probe: k-means seed categories give the rare pattern's cluster the
    weight of a quarter of the data (measured: 74-90 % -> 97-100 % on it, the whole set
    within a point); loss-rank seed categories move its weight, never lower its accuracy."""
    xt, yt, _ = planted(2000, seed)
    xv, yv, _ = planted(600, seed + 50)
    xs, ys, rare = planted(4000, seed + 100)
    best, _ = select_weight_decay(Rows.of(xt, yt), Rows.of(xv, yv), weight_decay_grid(8))
    acc = lambda W, b, m: ((xs[m] @ W + b).argmax(1) == ys[m]).float().mean().item()  # noqa: E731
    erm = acc(best["W"], best["b"], rare)
    targets = F.one_hot(yt, 2).float()
    W, b, info = fit_reweighted(xt, targets, yt, best["weight_decay"], "seed-category-kmeans", None, init=(best["W"], best["b"]))
    assert acc(W, b, rare) >= erm + 0.05 and acc(W, b, ~rare) >= acc(best["W"], best["b"], ~rare) - 0.02
    W, b, info = fit_reweighted(xt, targets, yt, best["weight_decay"], "seed-category", None, init=(best["W"], best["b"]))
    assert info["groups"] == 4 and max(info["group_weights"]) / min(info["group_weights"]) > 1.05  # not inert
    assert acc(W, b, rare) >= erm


def _noisy_few(seed, n_train=30, d=64, flip=0.3):
    """Few training rows, a third of their labels flipped, in many dimensions: too little
    regularisation fits the flips, too much underfits."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((3, d)) * 0.35

    def draw(n):
        y = rng.integers(0, 3, n)
        return ((means[y] + rng.standard_normal((n, d))) / 12).astype(np.float32), y

    xt, yt = draw(n_train)
    xv, yv = draw(600)
    flipped = rng.random(n_train) < flip
    yt[flipped] = (yt[flipped] + rng.integers(1, 3, flipped.sum())) % 3
    return xt, yt, xv, yv, *draw(2000)


def _nuisance(seed, n_train=900, d=8):
    """Classes apart along three dimensions under a large shared noise direction: only a
    weakly regularised probe learns to cancel the noise."""
    rng = np.random.default_rng(seed)
    means = np.zeros((3, d))
    means[np.arange(3), np.arange(3)] = 0.5
    u = np.zeros(d)
    u[:3] = 1 / np.sqrt(3)

    def draw(n):
        y = rng.integers(0, 3, n)
        x = means[y] + 3.0 * rng.standard_normal((n, 1)) * u + 0.1 * rng.standard_normal((n, d))
        return (x / 6).astype(np.float32), y

    xt, yt = draw(n_train)
    xv, yv = draw(600)
    return xt, yt, xv, yv, *draw(2000)


@pytest.mark.parametrize("make", [_noisy_few, _nuisance])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_decay_selection_finds_a_weight_decay_that_generalises(make, seed):
    """Against fits at every grid value made independently (cold starts, to convergence): the
    chosen weight decay scores within 2 points of the best of them, on data where the grid
    spans more than 10 points. A selection that ignored the validation rows would fail."""
    grid = weight_decay_grid(6)
    xt, yt, xv, yv = (torch.tensor(a) for a in make(seed)[:4])
    best, search = select_weight_decay(Rows.of(xt, yt), Rows.of(xv, yv), grid)
    assert [r["weight_decay"] for r in search] == grid
    acc = lambda W, b: ((xv @ W + b).argmax(1) == yv).float().mean().item()  # noqa: E731
    assert acc(best["W"], best["b"]) == pytest.approx(best["val_accuracy"])  # the weights it reports
    independent = [acc(*fit_probe(Rows.of(xt, yt), wd, 500)[:2]) for wd in grid]
    assert max(independent) - min(independent) > 0.1  # regularisation matters here
    assert independent[grid.index(best["weight_decay"])] >= max(independent) - 0.02


def _accuracy_then_log_loss(estimator, x, y):
    """vlaug's selection rule as a scikit-learn scorer: accuracy, ties to the lower log-loss."""
    from sklearn.metrics import log_loss

    return (estimator.predict(x) == y).mean() - 1e-6 * log_loss(y, estimator.predict_proba(x), labels=estimator.classes_)


@pytest.mark.parametrize("make", [_noisy_few, _nuisance])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_agrees_with_scikit_learn_logistic_regression_cv(make, seed):
    """The same grid (C = 1 / (weight decay · n)), the same validation rows and the same
    rule: the chosen C within one grid step, test accuracy within half a point."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import PredefinedSplit

    xt, yt, xv, yv, xs, ys = make(seed)
    grid = weight_decay_grid(8)
    best, _ = select_weight_decay(Rows.of(torch.tensor(xt), torch.tensor(yt)), Rows.of(torch.tensor(xv), torch.tensor(yv)), grid)
    cs = [1 / (wd * len(xt)) for wd in grid]
    fold = np.r_[np.full(len(xt), -1), np.zeros(len(xv))]  # train on xt, validate on xv, as vlaug does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = LogisticRegressionCV(Cs=cs, cv=PredefinedSplit(fold), scoring=_accuracy_then_log_loss, refit=False,
                                  max_iter=5000, tol=1e-8).fit(np.concatenate([xt, xv]), np.concatenate([yt, yv]))
    assert abs(grid.index(best["weight_decay"]) - cs.index(sk.C_[0])) <= 1
    ours = ((torch.tensor(xs) @ best["W"] + best["b"]).argmax(1).numpy() == ys).mean()
    assert abs(ours - sk.score(xs, ys)) <= 0.005


def test_temperature_scaling_finds_the_log_loss_minimum():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 5, generator=g) * 3
    labels = torch.distributions.Categorical(logits=logits / 2.5).sample()  # calibrated at T = 2.5
    t = calibrate_temperature(logits, labels)
    grid = np.exp(np.linspace(np.log(0.1), np.log(100), 4001))
    losses = [float(F.cross_entropy(logits / v, labels)) for v in grid]
    assert t == pytest.approx(grid[int(np.argmin(losses))], rel=2e-3)
    assert 1.5 < t < 4
    assert calibrate_temperature(10 * logits, labels) == pytest.approx(10 * t, rel=1e-4)  # scale-free


def test_an_ensemble_weight_means_the_same_mix_whatever_the_probe_scale():
    """A probe's logit scale depends on its weight decay; once calibrated, the ensemble's
    probabilities do not (uncalibrated, the same λ gives another mix)."""
    x, y, _, centres = synthetic_clusters(n_per_class=60, d=16, n_classes=3, noise=1.0)
    x, y, text = torch.tensor(x), torch.tensor(y), torch.tensor(centres)
    W, b, _ = fit_probe(Rows.of(x[::2], y[::2]), 1e-3, max_iter=100)
    mixes = {}
    for scale in (0.2, 1.0, 5.0):
        for calibrated in (True, False):
            logit_scale = 1 / calibrate_temperature(x[1::2] @ (scale * W) + scale * b, y[1::2]) if calibrated else 1.0
            zs_t = calibrate_temperature(zero_shot_logits(x[1::2], text, 1.0), y[1::2]) if calibrated else 0.01
            probe = LinearProbe(ProbeConfig(16, 3, ensemble=0.5, temperature=zs_t, logit_scale=logit_scale))
            with torch.no_grad():
                probe.linear.weight.copy_((scale * W).T)
                probe.linear.bias.copy_(scale * b)
                probe.text.copy_(text)
            mixes[scale, calibrated] = probe.predict_proba(x)
    torch.testing.assert_close(mixes[0.2, True], mixes[5.0, True], atol=1e-4, rtol=1e-4)
    assert (mixes[0.2, False] - mixes[5.0, False]).abs().max() > 0.1


def test_library_probe_fit_save_load_predict_on_tensors(tmp_path):
    """The README's probe example: fit, save, load and predict on plain tensors."""
    import vlaug
    from vlaug.probe import weight_decay_grid

    x, y, _, _ = synthetic_clusters(n_per_class=40, d=32, n_classes=4, seed=3)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    val = torch.arange(len(x)) % 5 == 0
    probe = vlaug.fit_linear_probe(x[~val], y[~val], x[val], y[val], grid_size=3, max_iter=50)
    p = probe.predict_proba(x)
    assert p.shape == (160, 4) and torch.allclose(p.sum(1), torch.ones(160))
    assert (p.argmax(1) == y).float().mean() > 0.9 and probe.selection_["weight_decay"] in weight_decay_grid(3)
    vlaug.save_probe(tmp_path / "probe", probe, ["a", "b", "c", "d"])
    again = vlaug.load_probe(tmp_path / "probe")
    assert again.classes_ == ["a", "b", "c", "d"]
    torch.testing.assert_close(again.predict_proba(x), p)
    with pytest.raises(ValueError, match="3 class names for a probe of 4 classes"):
        vlaug.save_probe(tmp_path / "p2", probe, ["a", "b", "c"])


def _two_loop(pairs, g, M):
    """The textbook L-BFGS two-loop recursion (Nocedal & Wright, Alg. 7.4), pairs oldest
    first, from the initial matrix γM, γ = sᵀy / yᵀMy of the newest pair."""
    q, alphas = g.clone(), []
    for s, y in reversed(pairs):
        alpha = (s @ q) / (y @ s)
        q -= alpha * y
        alphas.append(alpha)
    s, y = pairs[-1]
    r = (s @ y) / (y @ M @ y) * (M @ q)
    for (s, y), alpha in zip(pairs, reversed(alphas)):
        r += s * (alpha - (y @ r) / (y @ s))
    return r


@pytest.mark.parametrize("preconditioned", [False, True])
def test_compact_inverse_hessian_equals_the_two_loop_recursion(preconditioned):
    """The batched compact form gives the two-loop recursion's H·g for every problem, whatever
    how many of its m slots hold a pair (empty slots first, as fit_probes stores them), from
    γI or from γM with a preconditioner M of each problem's own."""
    from vlaug.probe import _inverse_hessian_times

    g = torch.Generator().manual_seed(0)
    n, m = 12, 4
    S, Y, MY = (torch.zeros(3, m, n, dtype=torch.float64) for _ in range(3))
    grads, Mgrads, expected = [], [], []
    valid = torch.zeros(3, m, dtype=torch.bool)
    for k, stored in enumerate((4, 2, 1)):
        A = torch.randn(n, n, generator=g, dtype=torch.float64)
        A = A @ A.T + 0.5 * torch.eye(n, dtype=torch.float64)  # SPD: every pair has sᵀy > 0
        M = torch.eye(n, dtype=torch.float64)
        if preconditioned:
            B = torch.randn(n, n, generator=g, dtype=torch.float64)
            M = B @ B.T + 0.1 * torch.eye(n, dtype=torch.float64)
        pairs = [(s, A @ s) for s in torch.randn(stored, n, generator=g, dtype=torch.float64)]
        for i, (s, y) in enumerate(pairs):
            S[k, m - stored + i], Y[k, m - stored + i], MY[k, m - stored + i] = s, y, M @ y
            valid[k, m - stored + i] = True
        grads.append(torch.randn(n, generator=g, dtype=torch.float64))
        Mgrads.append(M @ grads[-1])
        expected.append(_two_loop(pairs, grads[-1], M))
    got = _inverse_hessian_times(S, Y, MY, valid, torch.stack(grads), torch.stack(Mgrads))
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-9, atol=1e-9)


def test_preconditioner_is_the_inverse_hessian_at_uniform_predictions():
    """_preconditioners(gram) inverts the objective's Hessian at W = 0, b = 0 (every class
    1/C) where the Hessian is Σ ⊗ (I/C − 11ᵀ/C²) + λD: on the directions that change the
    logits' differences it equals that inverse (checked on a Hessian-vector product by
    autograd), for float32 rows whose moments the first evaluation gathers."""
    import vlaug.probe as probe_module

    g = torch.Generator().manual_seed(1)
    n, d, c, wd = 400, 6, 3, 1e-2
    x = torch.randn(n, d, generator=g) + 0.5  # a common mean: the bias couples with W
    y = torch.randint(0, c, (n,), generator=g)
    rows = Rows.of(x, y, n_classes=c)
    gram = torch.zeros(1, d + 2, d + 2, dtype=torch.float64)
    probe_module._objectives(rows, torch.zeros(1, d + 1, c), torch.tensor([wd]), None, gram=gram)
    assert gram[0, -1, -1] == n
    M = probe_module._preconditioners(gram[0], [wd], c)[0].double()
    v = torch.randn(d + 1, c, generator=g, dtype=torch.float64)
    v = v - v.mean(1, keepdim=True)  # logit differences only (the Hessian is singular along 1 on the data term)
    theta = torch.zeros(d + 1, c, dtype=torch.float64, requires_grad=True)
    xd = x.double()

    def objective(th):
        return probe_objective(xd, th[:d], th[d], y, torch.full((n,), 1.0 / n, dtype=torch.float64), wd)

    Hv = torch.autograd.functional.hvp(objective, theta, M @ v)[1]
    assert (Hv - v).abs().max() <= 1e-3 * v.abs().max() + 1e-5


def test_small_problems_run_on_one_thread_and_the_count_is_restored():
    from vlaug.devices import SMALL_PROBLEM, threads_for

    before = torch.get_num_threads()
    with threads_for(SMALL_PROBLEM - 1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with threads_for(SMALL_PROBLEM, threads=before):
        assert torch.get_num_threads() == before
    with threads_for(SMALL_PROBLEM - 1, "cuda"):  # a GPU problem keeps the host's threads
        assert torch.get_num_threads() == before


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize(("columns", "patterns"), [(None, False), ([1, 0, 2, 1], False), ([1, 0, 2, 1], True)])
@pytest.mark.parametrize(("p", "skinny"), [(4, True), (4, False), (1, True)])
def test_batched_objective_and_gradient_equal_autograd_on_each_problem(soft, columns, patterns, p, skinny, monkeypatch):
    """_objectives evaluates P problems (each its own W, b and weight decay) in one pass, with
    closed-form gradients, in pieces; each equals probe_objective and its autograd gradient.
    With weight columns (the training sets of several seeds), each problem sees its column's
    weights, zero on rows outside its set; with ``patterns``, the rows are split into blocks
    by the sets that hold them (vlaug.methods.batching.membership_blocks), each evaluated
    under those sets' problems only: the same losses and gradients. Either order of the
    logits' product (``skinny``: (Wᵀ·xᵀ)ᵀ, below SKINNY_LOGITS columns), and one problem alone
    (its stacked weights a transposed view, its gradient sums row-major all the same)."""
    import vlaug.methods.batching as batching
    import vlaug.probe as probe_module

    g = torch.Generator().manual_seed(0)
    n, d, c = 700, 5, 3
    monkeypatch.setattr(probe_module, "SKINNY_LOGITS", 10**6 if skinny else 0)
    columns = None if columns is None else columns[:p]
    x = torch.randn(n, d, generator=g).half()  # float16 rows are converted piece by piece
    labels = torch.randint(0, c, (n,), generator=g)
    targets = torch.softmax(torch.randn(n, c, generator=g), 1) if soft else labels
    w = torch.rand(n, generator=g) if columns is None else torch.rand(n, 3, generator=g) * (torch.rand(n, 3, generator=g) < 0.7)
    index = torch.randperm(n, generator=g)[:600]
    blocks = [(x, targets[index], w[index], index)]
    if patterns:
        monkeypatch.setattr(batching, "PATTERN_ROWS", 20)
        blocks = batching.membership_blocks(x, targets[index], w[index], index)
        owners = [b[4].tolist() for b in blocks if len(b) > 4]
        assert len(owners) >= 5 and [0, 1, 2] not in owners  # the rows of every set but some: their own blocks
        assert sorted(torch.cat([b[3] for b in blocks]).tolist()) == sorted(index.tolist())
    rows = Rows(lambda: blocks, d, c, 600, columns=1 if columns is None else 3)
    theta = torch.randn(p, d + 1, c, generator=g, dtype=torch.float64).float()
    wd = torch.tensor([0.0, 1e-3, 0.1, 1.0])[-p:]
    anchor = torch.randn(d, c, generator=g)
    monkeypatch.setattr(probe_module, "PIECE_VALUES", 256 * max(c * p, d))  # several pieces of 256 rows
    loss, grad = probe_module._objectives(rows, theta, wd, anchor, columns=None if columns is None else torch.tensor(columns))
    for k in range(p):
        W, b = theta[k, :d].clone().requires_grad_(True), theta[k, d].clone().requires_grad_(True)
        wk = w[index] if columns is None else w[index, columns[k]]
        expected = probe_objective(x[index].float(), W, b, targets[index], wk, float(wd[k]), anchor)
        expected.backward()
        assert loss[k].item() == pytest.approx(expected.item(), rel=1e-5)
        torch.testing.assert_close(grad[k, :d], W.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad[k, d], b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooled", [False, True])
def test_seeds_in_weight_columns_select_and_fit_as_separate_searches(pooled, monkeypatch):
    """Three overlapping training sets (three seeds' splits of the same rows) as one set of
    rows with a weight column each: one batched fit of every set x weight decay chooses, per
    set, the weight decay its own search chooses, with the same weights up to the order of
    float sums. ``pooled``: too many preconditioners for PRECONDITIONER_VALUES, one per
    weight decay from every column's rows: the same choices, weights within 1 % (another
    path to the same minimum)."""
    import vlaug.probe as probe_module

    if pooled:
        monkeypatch.setattr(probe_module, "PRECONDITIONER_VALUES", 17**2 * 6)  # 6 of the 18 (column, weight decay) pairs
    made = []
    preconditioners = probe_module._preconditioners
    monkeypatch.setattr(probe_module, "_preconditioners", lambda *a: made.append(len(a[1])) or preconditioners(*a))
    xs, ys, _, _ = synthetic_clusters(n_per_class=225, d=16, n_classes=4, noise=1.5, seed=0)
    x, y = torch.tensor(xs), torch.tensor(ys)
    rng = np.random.default_rng(0)
    trains, vals = [], []
    for _ in range(3):
        order = rng.permutation(len(x))
        trains.append(np.sort(order[:600]))
        vals.append(np.sort(order[600:]))
    union = np.unique(np.concatenate(trains))
    weights = torch.zeros(len(union), 3)
    for j, t in enumerate(trains):
        weights[np.searchsorted(union, t), j] = 1.0 / len(t)
    index = torch.as_tensor(union)
    rows = Rows(lambda: [(x, y[index], weights, index)], 16, 4, len(union), columns=3)
    grid = weight_decay_grid(6)
    fits = fit_probes(rows, grid * 3, columns=[j for j in range(3) for _ in grid])
    assert made == ([6] if pooled else [6, 6, 6])  # per weight decay, or per column and weight decay
    together = [choose(fits[6 * j:6 * (j + 1)], grid, Rows.of(x[v], y[v], n_classes=4)) for j, v in enumerate(vals)]
    for (best, search), t, v in zip(together, trains, vals):
        alone, alone_search = select_weight_decay(Rows.of(x[t], y[t], n_classes=4), Rows.of(x[v], y[v], n_classes=4), grid)
        assert best["weight_decay"] == alone["weight_decay"]
        assert [r["val_accuracy"] for r in search] == pytest.approx([r["val_accuracy"] for r in alone_search], abs=1 / 300)
        scale = alone["W"].abs().max()
        assert (best["W"] - alone["W"]).abs().max() <= (1e-2 if pooled else 1e-3) * scale
    with pytest.raises(ValueError, match="one column per problem"):
        fit_probe(rows, 1e-3)


@pytest.mark.parametrize("batched", [True, False])
def test_preconditioners_apply_to_each_problem_batched_or_grouped(batched, monkeypatch):
    """_apply multiplies each problem's vector by its own preconditioner, in one batched
    product or (matrices too large to gather) one product per preconditioner."""
    import vlaug.probe as probe_module

    g = torch.Generator().manual_seed(2)
    d1, c = 5, 3
    M = torch.randn(3, d1, d1, generator=g)
    which = torch.tensor([2, 0, 2, 1, 0])
    v = torch.randn(5, d1 * c, generator=g)
    if not batched:
        monkeypatch.setattr(probe_module, "PIECE_VALUES", d1 * d1)
    got = probe_module._apply(M, which, v)
    assert got.shape == v.shape
    for k in range(5):
        torch.testing.assert_close(got[k].view(d1, c), M[which[k]] @ v[k].view(d1, c))


@pytest.mark.parametrize("tolerance_grad", [1e-5, 0.0])
def test_fits_at_float32_precision_end_their_line_search_at_once(tolerance_grad, monkeypatch):
    """A problem of a batch that reaches its minimum as far as float32 goes (its loss
    computed beside other problems differs by a few units in the last place from its loss
    alone: no step passes the Armijo test) stops its line search once the decrease it
    predicts is below the loss's resolution (LOSS_RESOLUTION), not after halving its step
    30 times, a pass over the rows each. Every
    problem ends at the float64 minimum's loss (scikit-learn's, tol 1e-12); with no
    gradient tolerance (0: never reached) too."""
    import vlaug.probe as probe_module

    x, y, _, _ = synthetic_clusters(n_per_class=100, d=16, n_classes=4, noise=1.0, seed=0)
    n, grid = len(x), weight_decay_grid(8)
    rows = Rows.of(torch.tensor(x), F.one_hot(torch.tensor(y), 4).float())
    passes = []
    real = probe_module._objectives
    monkeypatch.setattr(probe_module, "_objectives", lambda *a, **k: passes.append(1) or real(*a, **k))
    fits = fit_probes(rows, grid, max_iter=300, tolerance_grad=tolerance_grad)
    iterations = max(info["iterations"] for *_, info in fits)
    # stopped before the cap: by the gradient test (converged) or by float32's resolution (stalled, never converged)
    assert all(info["converged"] != info["stalled"] for *_, info in fits) and iterations < 300
    if tolerance_grad == 0:
        assert not any(info["converged"] for *_, info in fits)
    assert len(passes) <= iterations + 12  # the first pass, and a few backtracking ones

    x64, w = torch.tensor(x, dtype=torch.float64), torch.full((n,), 1.0 / n, dtype=torch.float64)

    def loss(W, b, weight_decay):
        W, b = torch.as_tensor(W).double(), torch.as_tensor(b).double()
        return float(probe_objective(x64, W, b, torch.tensor(y), w, weight_decay))

    for weight_decay, (W, b, _) in zip(grid, fits):
        sk = LogisticRegression(C=1 / (weight_decay * n), tol=1e-12, max_iter=10_000).fit(x, y)
        assert loss(W, b, weight_decay) <= loss(sk.coef_.T, sk.intercept_, weight_decay) * (1 + 1e-6), weight_decay


def test_preconditioner_inverse_through_cholesky_and_its_fallback():
    """The preconditioners' inverse goes through a Cholesky factor for a positive definite
    matrix (the same inverse as linalg.inv) and falls back to the general inverse where the
    factor fails (a matrix that is not positive definite), instead of raising."""
    from vlaug.probe import _spd_inverse

    g = torch.Generator().manual_seed(0)
    A = torch.randn(40, 40, generator=g, dtype=torch.float64)
    spd = A @ A.T / 40 + 1e-6 * torch.eye(40, dtype=torch.float64)
    torch.testing.assert_close(_spd_inverse(spd), torch.linalg.inv(spd), rtol=1e-6, atol=1e-6)
    indefinite = torch.diag(torch.tensor([2.0, -4.0], dtype=torch.float64))
    torch.testing.assert_close(_spd_inverse(indefinite), torch.diag(torch.tensor([0.5, -0.25], dtype=torch.float64)))


def test_a_second_fit_on_the_same_rows_reuses_their_moments(monkeypatch):
    """The preconditioners' second moments are gathered in a fit's first pass and kept with
    the rows: a second fit on the same rows (the grid's extension past its weak end) does not
    gather them again, and ends where a fit on fresh rows ends."""
    import vlaug.probe as probe_module

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(300, 16, generator=g) + 0.3, dim=1)
    y = torch.randint(0, 3, (300,), generator=g)
    rows = Rows.of(x, y, n_classes=3)
    gathered = []
    add = probe_module._add_moments
    monkeypatch.setattr(probe_module, "_add_moments", lambda *a: gathered.append(1) or add(*a))
    fit_probe(rows, 1e-3, 100)
    first = len(gathered)
    W, b, _ = fit_probe(rows, 1e-5, 100)
    assert first >= 1 and len(gathered) == first  # the second fit read none
    W_fresh, b_fresh, _ = fit_probe(Rows.of(x, y, n_classes=3), 1e-5, 100)
    assert len(gathered) == 2 * first
    torch.testing.assert_close(W, W_fresh)
    torch.testing.assert_close(b, b_fresh)
