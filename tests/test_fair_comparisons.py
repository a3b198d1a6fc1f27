"""Comparisons on equal terms (issue 27): every method is selected on the validation
accuracy of exactly what it deploys, and records that number."""

import numpy as np
import pytest
import torch

from tests.conftest import write_synthetic_cache
from vlaug.evaluate import ProbeRunConfig, _fit_every_seed, deploy, prepare
from vlaug.heads import make_head_config
from vlaug.train import TrainConfig, train_head


@pytest.fixture(scope="module")
def cache_and_heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("fair")
    feats = write_synthetic_cache(root / "feat", n_per_class=25, d=32, n_classes=4)
    for head, kw in [("box", {}), ("dr-sa", {}), ("lads", {"source": "photo", "targets": ("sketch",)})]:
        train_head(TrainConfig(features=str(feats), out=str(root / head), head=make_head_config(head, **kw), epochs=5,
                               progress=False, device="cpu", train_domains=("photo",)))
    return root, feats


# every kind of deployed model: the fit itself, a WiSE mix, fixed ensembles, a gate, GDA, augmented rows, joint methods
METHODS = ["zero-shot", "linear", "linear-zs", "linear-zs?wise=0.3&ensemble=0.4", "linear?ensemble=0.5",
           "box:{root}/box?n_aug=2&ensemble=0.3", "dr:{root}/dr-sa", "lads:{root}/lads", "gaussian", "mixup",
           "xdomain-mix", "gda", "gda?ensemble=0.5", "text-anchor?solver=gda", "adaptive", "adaptive?solver=logistic",
           "adaptive?prompt_shift=false&ensemble=0.2", "linear-adamw?max_steps=60", "batchformer?max_steps=30&ensemble=0.5",
           # few-shot adapters (issue 29): a cache model, a bottleneck, trained and closed-form linear ones
           "tip-adapter", "tip-adapter-f?epochs=3", "clip-adapter?epochs=5", "taskres?epochs=5", "cross-modal", "lp++", "clap"]


def _accuracy(probe, data, rows) -> float:
    """The probe's accuracy on cache rows ``rows``, computed here."""
    rows = torch.as_tensor(np.asarray(rows))
    with torch.no_grad():
        return int((probe.predict_proba(data.x[rows].float()).argmax(1) == data.y[rows]).sum()) / len(rows)


@pytest.mark.parametrize("reweight", ["none", "groupdro"])
def test_val_accuracy_is_the_deployed_probes_and_the_best_candidates(cache_and_heads, tmp_path, reweight):
    """For every method, the recorded ``val_accuracy`` is the accuracy on the validation rows
    of the probe the run deploys for that seed (mix, ensemble, calibration and gate included,
    before the refit on train + val), and no candidate of its search scored better."""
    root, feats = cache_and_heads
    methods = [m.format(root=root) for m in METHODS]
    if reweight != "none":
        methods = [m for m in methods if m.split("?")[0] in ("linear-zs", "box:" + str(root / "box"))]
    config = ProbeRunConfig(features=str(feats), out=str(tmp_path / "r"), methods=tuple(methods), train_domains=("photo",),
                            seeds=2, grid_size=4, max_iter=60, device="cpu", progress=False, reweight=reweight)
    plan = prepare(config)
    results, first_fits, _ = _fit_every_seed(plan, progress=False)
    val = plan.splits[0].val
    for method in plan.methods:
        fit = first_fits[method.text]
        recorded = fit.selection["val_accuracy"]
        probe = deploy(method, plan.data, fit, val)
        assert recorded == pytest.approx(_accuracy(probe, plan.data, val), abs=1e-9), method.text
        for candidate in fit.search:
            assert candidate["val_accuracy"] <= recorded + 1e-12, (method.text, candidate)
    assert {r["method"] for r in results if "val_accuracy" in r["selection"]} == set(methods)


def test_linear_zs_selects_on_the_wise_mix(cache_and_heads, tmp_path):
    """linear-zs deploys (1 − λ)·zero-shot + λ·W: its weight decay is the one whose mix scores
    best on the validation rows, which the unmixed fit's scores need not agree with."""
    from vlaug.methods import parse_method
    from vlaug.probe import fit_probe
    from vlaug.zero_shot import zero_shot_weights

    root, feats = cache_and_heads
    config = ProbeRunConfig(features=str(feats), out=str(tmp_path / "r"), methods=("linear-zs?wise=0.3",),
                            train_domains=("photo",), seeds=1, grid_size=5, max_iter=60, device="cpu", progress=False)
    plan = prepare(config)
    data, splits = plan.data, plan.splits[0]
    method = parse_method("linear-zs?wise=0.3")
    fit = method.fit(data, splits, 0)
    anchor = zero_shot_weights(data.text)
    for candidate in fit.search:  # each candidate's score is its mix's, recomputed by hand
        wd = candidate["weight_decay"]
        W, b, _ = fit_probe(method.training_rows(data, np.asarray(splits.train), 0), wd, 60,
                            init=(anchor, torch.zeros(data.n_classes)), regularize_towards=anchor)
        mixed = data.make_probe(0.7 * anchor + 0.3 * W, 0.3 * b)
        assert candidate["val_accuracy"] == pytest.approx(_accuracy(mixed, data, splits.val), abs=0.02), wd
    best = max(fit.search, key=lambda c: (c["val_accuracy"], -c["val_log_loss"]))
    assert fit.selection["weight_decay"] == best["weight_decay"]


def test_converged_only_when_the_gradient_test_passed():
    """``converged``: the largest gradient entry passed the tolerance; a fit that stopped
    because its loss or step stopped moving is ``stalled``; one that ran out of iterations is
    neither (issue 27, item 7)."""
    from vlaug.probe import Rows, fit_probe

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(200, 8, generator=g), dim=1)
    y = torch.randint(0, 3, (200,), generator=g)
    rows = Rows.of(x, y, n_classes=3)
    _, _, info = fit_probe(rows, 1e-2, 200)
    assert info["converged"] and not info["stalled"]
    _, _, info = fit_probe(rows, 1e-2, 500, tolerance_grad=1e-30)  # no float32 gradient gets there
    assert not info["converged"] and info["stalled"] and info["iterations"] < 500
    _, _, info = fit_probe(rows, 1e-6, 3)  # stopped at its cap
    assert not info["converged"] and not info["stalled"] and info["iterations"] == 3


@pytest.mark.parametrize("method", ["xdomain-mix", "mixup"])
def test_pairs_span_the_whole_training_set_of_a_cache_sorted_by_domain(tmp_path, monkeypatch, method):
    """Mixup and xdomain-mix pair rows across the whole training set, not within the blocks a
    resident cache is read in: on a cache sorted by domain, whose blocks each hold one domain,
    xdomain-mix still mixes across domains (issue 27, item 6)."""
    from vlaug import augment
    from vlaug.methods import base, parse_method

    feats = write_synthetic_cache(tmp_path / "feat", n_per_class=20, d=16, n_classes=3, domains=("photo", "art"))
    config = ProbeRunConfig(features=str(feats), out=str(tmp_path / "r"), methods=(method,), seeds=1, device="cpu",
                            progress=False)
    plan = prepare(config)
    data, train = plan.data, np.asarray(plan.splits[0].train)
    by_domain = train[np.argsort(data.dom[train].numpy(), kind="stable")]
    assert data.dom[by_domain[0]] != data.dom[by_domain[-1]]
    monkeypatch.setattr(base, "STREAM_ROWS", 16)  # blocks of 16 rows: most of them hold one domain
    seen = []
    for name in ("cross_domain_mix", "latent_mixup"):
        real = getattr(augment, name)
        monkeypatch.setattr(augment, name, lambda x, *a, _real=real, **k: seen.append(len(x)) or _real(x, *a, **k))
    rows = parse_method(method).training_rows(data, np.sort(by_domain), 0)
    assert seen == [len(train)]  # one draw over every training row
    assert rows.n_rows == 2 * len(train)
    if method == "xdomain-mix":  # its partners: the same class, another domain
        partners = augment.cross_domain_partners(data.y[data.rows(train)], data.dom[data.rows(train)], 1,
                                                 torch.Generator().manual_seed(0))[0]
        dom = data.dom[data.rows(train)]
        assert bool((dom[partners] != dom).all())


@pytest.mark.parametrize("labels, end", [("clean", "weak"), ("random", "strong")])
def test_the_search_goes_past_an_end_of_the_grid_it_chose(labels, end):
    """When the best weight decay is an end of the grid, the search goes on past it a decade
    at a time (each value fitted from the method's start, as the grid's) until the best is
    interior or 3 decades were added, and says so (issue 27, item 5)."""
    from vlaug.methods.linear import GRID_EXTENSION_DECADES, extend_grid
    from vlaug.probe import Rows, select_weight_decay
    from vlaug.runs import MethodSettings

    g = torch.Generator().manual_seed(1)
    centres = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.nn.functional.normalize(centres[y] + 0.05 * torch.randn(300, 8, generator=g), dim=1)
    if labels == "random":  # nothing to learn but the prior: the strongest weight decay fits the validation rows best
        x = torch.nn.functional.normalize(torch.randn(300, 8, generator=g), dim=1)
        y = torch.cat([torch.tensor([0, 0, 0, 1, 2]).repeat(40), torch.zeros(100, dtype=torch.long)])
    train, val = Rows.of(x[:200], y[:200], n_classes=3), Rows.of(x[200:], y[200:], n_classes=3)
    grid = [1e-2, 1e-3]
    best, search = select_weight_decay(train, val, grid, 100)
    assert best["weight_decay"] == (1e-3 if end == "weak" else 1e-2)
    settings = MethodSettings(grid=tuple(grid), max_iter=100)
    best, search, info = extend_grid(train, val, best, search, settings, None)
    added = [c["weight_decay"] for c in search if c.get("extension")]
    assert info["grid_extended"] and added and len(added) <= GRID_EXTENSION_DECADES
    factor = 0.1 if end == "weak" else 10.0
    start = grid[1] if end == "weak" else grid[0]
    assert added == pytest.approx([start * factor ** (k + 1) for k in range(len(added))])
    assert info["grid"] == pytest.approx([min(grid + added), max(grid + added)])
    # it stopped because the best is interior, or at the bound
    interior = best["weight_decay"] != added[-1]
    assert interior or len(added) == GRID_EXTENSION_DECADES
    assert best["val_accuracy"] == max(c["val_accuracy"] for c in search)
    # an interior choice is left alone
    mid, mid_search = select_weight_decay(train, val, [1e-1, best["weight_decay"], best["weight_decay"] / 100], 100) \
        if end == "weak" else select_weight_decay(train, val, [best["weight_decay"] * 100, best["weight_decay"], 1e-6], 100)
    if mid["weight_decay"] == best["weight_decay"]:
        assert extend_grid(train, val, mid, mid_search, settings, None)[2]["grid_extended"] is False


def test_a_value_past_the_grid_needs_a_higher_accuracy_not_only_a_lower_log_loss():
    """On validation rows the probe already separates, every weaker decade lowers the
    log-loss; the extension takes a value past the grid only for a higher accuracy, so it
    stops after one decade instead of running to its bound, and the value it tried is a real
    fit at that weight decay (fitted, not left at the grid's weights)."""
    from vlaug.methods.linear import extend_grid
    from vlaug.probe import Rows, fit_probe, select_weight_decay
    from vlaug.runs import MethodSettings

    g = torch.Generator().manual_seed(3)
    centres = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.nn.functional.normalize(centres[y] + 0.05 * torch.randn(300, 8, generator=g), dim=1)
    train, val = Rows.of(x[:200], y[:200], n_classes=3), Rows.of(x[200:], y[200:], n_classes=3)
    grid = [1e-3, 1e-5]
    best, search = select_weight_decay(train, val, grid, 200)
    assert best["weight_decay"] == 1e-5 and best["val_accuracy"] == 1.0  # the weak end, every validation row right
    best, search, info = extend_grid(train, val, best, search, MethodSettings(grid=tuple(grid), max_iter=200), None)
    tried = [c for c in search if c.get("extension")]
    assert [c["weight_decay"] for c in tried] == pytest.approx([1e-6])  # one decade, not taken
    assert tried[0]["val_log_loss"] < search[1]["val_log_loss"]  # though its log-loss is lower
    assert best["weight_decay"] == 1e-5 and info == {"grid_extended": True, "grid": pytest.approx([1e-6, 1e-3])}
    W, _, _ = fit_probe(train, 1e-6, 200)
    assert tried[0]["iterations"] > 0 and W.norm() > 1.05 * best["W"].norm()


def test_a_batched_search_records_the_values_it_tried_past_the_grid(tmp_path):
    """A search run in the batch (several seeds and methods together) is extended in fit()
    like a search run alone, and its record lists every value tried, past the grid too."""
    feats = write_synthetic_cache(tmp_path / "feat", n_per_class=40, d=16, n_classes=3)
    config = ProbeRunConfig(features=str(feats), out=str(tmp_path / "r"), methods=("linear", "linear-zs"), seeds=2,
                            train_domains=("photo",), grid_size=3, max_iter=60, device="cpu", progress=False)
    plan = prepare(config)
    results, _, _ = _fit_every_seed(plan, progress=False)
    for r in results:
        sel = r["selection"]
        assert "grid_extended" in sel
        tried = sorted({c["weight_decay"] for c in _first_fits_search(plan, r)})
        assert sel["grid"] == pytest.approx([tried[0], tried[-1]])
        assert any(c.get("extension") for c in _first_fits_search(plan, r)) == sel["grid_extended"]
    assert any(r["selection"]["grid_extended"] for r in results)  # (separable clusters: the weakest value is best)


def test_seeds_with_the_same_training_rows_fit_the_values_past_the_grid_once(tmp_path, monkeypatch):
    """A cache's fixed split gives every seed the same training rows: the batch fits their grid
    once (one weight column), and the values past the grid's end are fitted for the first
    seed and reused by the others, with the same records."""
    import vlaug.methods.batching as batching
    import vlaug.methods.linear as linear

    feats = write_synthetic_cache(tmp_path / "feat", n_per_class=40, d=16, n_classes=3)
    config = ProbeRunConfig(features=str(feats), out=str(tmp_path / "r"), methods=("linear", "linear-zs"), seeds=3,
                            train_domains=("photo",), grid_size=3, max_iter=60, device="cpu", progress=False)
    plan = prepare(config)
    assert all(np.array_equal(s.train, plan.splits[0].train) for s in plan.splits)
    single, batched = [], []
    fit_probe, fit_probes = linear.fit_probe, batching.fit_probes
    monkeypatch.setattr(linear, "fit_probe", lambda *a, **k: single.append(a[1]) or fit_probe(*a, **k))
    monkeypatch.setattr(batching, "fit_probes", lambda *a, **k: batched.append(len(a[1])) or fit_probes(*a, **k))
    results, _, _ = _fit_every_seed(plan, progress=False)
    fitted = list(single)  # (the searches below fit again)
    assert batched == [2 * 3]  # two methods x one set of rows x the grid, not x 3 seeds
    tried = {r["method"]: [c["weight_decay"] for c in _first_fits_search(plan, r) if c.get("extension")]
             for r in results if r["seed"] == 0}
    assert any(tried.values())  # (separable clusters: the weakest value is best, the search goes past it)
    assert sorted(fitted) == pytest.approx(sorted(v for values in tried.values() for v in values))  # once, not per seed
    for r in results:
        first = next(f for f in results if f["method"] == r["method"] and f["seed"] == 0)
        assert r["selection"] == first["selection"]


def _first_fits_search(plan, result):
    """The search a result's method recorded for its seed (fitted again: the fits are deterministic)."""
    from vlaug.methods import parse_method
    from vlaug.methods.batching import ProbeSolver

    method = parse_method(result["method"])
    method.bind(plan.data.feats, plan.train_domains)
    fits = method.fit_seeds(plan.data, plan.splits, ProbeSolver(plan.data, plan.splits))
    return fits[result["seed"]].search
