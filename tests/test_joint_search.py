"""The joint methods' search (issue 27, item 3): a grid of lr × weight decay, a budget and a
patience counted in optimiser steps, the configuration chosen on the validation accuracy of
what the method deploys, and a refit for the kept number of steps."""

from itertools import product

import numpy as np
import pytest
import torch

from vlaug import loop
from vlaug.errors import UsageError
from vlaug.evaluate import ProbeRunConfig, prepare
from vlaug.methods import joint, parse_method
from vlaug.probe import is_better
from vlaug.simulate import SimParams, shifted_domains, write_cache

KEYS = {"lr", "weight_decay", "batch_size", "steps", "max_steps", "stopped", "selected_step", "val_accuracy",
        "val_log_loss", "selected_on"}


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    # the shift benchmark's simulator, tiny: noisy enough that the configurations score differently
    root = tmp_path_factory.mktemp("joint")
    params = SimParams(d=32, n_classes=4, n_per_class=30)
    feats = write_cache(root / "feat", shifted_domains(params), params)
    return prepare(ProbeRunConfig(features=str(feats), out=str(root / "rep"), methods=("linear-adamw",),
                                  train_domains=("photo",), seeds=2, device="cpu", progress=False))


def _val_accuracy(data, fit, method, val) -> float:
    """The validation accuracy of the probe a run builds from ``fit``, computed here."""
    calibration = data.calibration(fit.W, fit.b, val) if method.ensemble else None
    probe = data.make_probe(fit.W, fit.b, method.ensemble, calibration, None)
    rows = torch.as_tensor(val)
    with torch.no_grad():
        return int((probe.predict_proba(data.x[rows].float()).argmax(1) == data.y[rows]).sum()) / len(val)


@pytest.mark.parametrize("spec", ["linear-adamw?lr=1e-3,3e-2&weight_decay=0,1&max_steps=150&patience=40",
                                  "linear-adamw?lr=1e-2,1e-1&weight_decay=0.01,3&max_steps=150&patience=40&ensemble=0.5"])
def test_the_grid_is_searched_and_the_best_deployed_configuration_chosen(plan, spec):
    method = parse_method(spec)
    data, splits = plan.data, plan.splits[0]
    val = np.asarray(splits.val)
    fit = method.fit(data, splits, 0)
    assert [(c["lr"], c["weight_decay"]) for c in fit.search] == list(product(method.options.lrs,
                                                                              method.options.weight_decays))
    best = None
    for c in fit.search:
        if best is None or is_better((c["val_accuracy"], c["val_log_loss"]), (best["val_accuracy"], best["val_log_loss"])):
            best = c
    chosen = fit.selection
    assert KEYS <= set(chosen) and chosen["max_steps"] == 150 and chosen["batch_size"] == 256
    assert {k: chosen[k] for k in best} == best  # the best by the deployed probe's validation accuracy, then log-loss
    # the recorded score is the deployed probe's (with its calibrated ensemble), recomputed here
    assert chosen["val_accuracy"] == pytest.approx(_val_accuracy(data, fit, method, val), abs=1e-12)
    assert len({(c["val_accuracy"], c["val_log_loss"]) for c in fit.search}) > 1  # the configurations differ


def test_stopped_at_the_cap_or_on_patience_counted_in_steps(plan):
    data, splits = plan.data, plan.splits[0]
    assert len(splits.train) < 256  # one epoch is a single minibatch
    capped = parse_method("linear-adamw?lr=1e-3&weight_decay=0&max_steps=7&val_every=2").fit(data, splits, 0)
    assert capped.selection["stopped"] == "cap" and capped.selection["steps"] == 7
    assert capped.selection["selected_step"] in (2, 4, 6, 7)  # validated every 2 steps and at the last
    many = parse_method("linear-adamw?lr=1e-4&weight_decay=0&max_steps=300&patience=1000").fit(data, splits, 0)
    assert many.selection["steps"] == 300  # a cache of few rows still trains its steps (300 one-batch epochs)
    patient = parse_method("linear-adamw?lr=3&weight_decay=0&max_steps=3000&patience=3&val_every=1").fit(data, splits, 0)
    s = patient.selection
    assert s["stopped"] == "patience" and s["steps"] < 3000 and s["steps"] - s["selected_step"] == 3


def test_steps_are_minibatches_not_epochs():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 4, generator=g), torch.randint(0, 2, (50,), generator=g)
    sizes = []

    def loss_fn(m, xb, yb):
        sizes.append(len(xb))
        return torch.nn.functional.cross_entropy(m(xb), yb), {}

    runs = loop.fit_steps(torch.nn.Linear(4, 2), loss_fn, x_train=x, y_train=y, batch_size=8, max_steps=20,
                          configs=[(1e-2, 0.0), (1e-3, 0.1)], generator=torch.Generator().manual_seed(0))
    assert len(sizes) == 20 and sizes[:7] == [8] * 6 + [2]  # one call per step for both configurations; 50 rows: 7 batches
    assert [(r.steps, r.stopped, r.selected_step) for r in runs] == [(20, "cap", 20)] * 2


@pytest.mark.parametrize("vectorize,fused", [(True, True), (False, True), (True, False)])
def test_the_stacked_adamw_is_torchs_adamw_per_configuration(vectorize, fused, monkeypatch):
    monkeypatch.setattr(loop, "FUSED_ADAMW", fused)  # torch's fused kernel, and the update operation by operation
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    configs = [(1e-2, 0.0), (3e-2, 0.5), (1e-3, 2.0)]
    torch.manual_seed(0)
    module = torch.nn.Linear(6, 3)
    start = {k: v.clone() for k, v in module.state_dict().items()}

    def loss_fn(m, xb, yb):
        return torch.nn.functional.cross_entropy(m(xb), yb), {}

    runs = loop.fit_steps(module, loss_fn, x_train=x, y_train=y, batch_size=16, max_steps=12, configs=configs,
                          generator=torch.Generator().manual_seed(1), vectorize=vectorize)
    assert all(torch.equal(module.state_dict()[k], start[k]) for k in start)  # the module itself is left as it was
    for (lr, wd), run in zip(configs, runs):
        reference = torch.nn.Linear(6, 3)
        reference.load_state_dict(start)
        opt = torch.optim.AdamW(reference.parameters(), lr=lr, weight_decay=wd)
        batches = loop._batches(40, 16, torch.Generator().manual_seed(1), x.device)
        for _ in range(12):
            idx = next(batches)
            opt.zero_grad()
            loss_fn(reference, x[idx], y[idx])[0].backward()
            opt.step()
        for name, p in reference.named_parameters():
            torch.testing.assert_close(run.state[name], p.detach(), rtol=1e-5, atol=1e-6)


def test_each_configuration_keeps_its_lowest_validation_loss_and_stops_on_its_own():
    x, y = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 2
    scripted = iter([[3.0, 5.0], [1.0, 4.0], [2.0, 3.0], [4.0, 6.0], [0.5]])  # config 0 stops at step 4 (patience 2)
    seen = []

    def val_loss(params):
        seen.append({k: v.detach().clone() for k, v in params.items()})
        return torch.tensor(next(scripted))

    runs = loop.fit_steps(torch.nn.Linear(4, 2), lambda m, xb, yb: (torch.nn.functional.cross_entropy(m(xb), yb), {}),
                          x_train=x, y_train=y, batch_size=32, max_steps=5, configs=[(0.1, 0.0), (0.1, 0.1)],
                          val_loss=val_loss, patience=2, generator=torch.Generator().manual_seed(0))
    assert [(r.steps, r.stopped, r.selected_step, r.val_loss) for r in runs] == [(4, "patience", 2, 1.0),
                                                                                  (5, "cap", 5, 0.5)]
    assert torch.equal(runs[0].state["weight"], seen[1]["weight"][0])  # step 2's weights of configuration 0
    assert torch.equal(runs[1].state["weight"], seen[4]["weight"][0])  # alone in the stack once 0 stopped


def test_a_loss_that_creeps_down_does_not_keep_a_configuration_training():
    x, y = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 2
    creeping = [1.0, 0.5, 0.499, 0.498, 0.497, 0.496, 0.495, 0.494]  # 0.2 % per check after the first drop

    def run(min_improvement, min_delta=0.0):
        losses = iter(creeping)
        (out,) = loop.fit_steps(torch.nn.Linear(4, 2), lambda m, xb, yb: (torch.nn.functional.cross_entropy(m(xb), yb), {}),
                                x_train=x, y_train=y, batch_size=32, max_steps=8, configs=[(0.1, 0.0)], patience=3,
                                val_loss=lambda params: torch.tensor([next(losses)]), min_improvement=min_improvement,
                                min_delta=min_delta, generator=torch.Generator().manual_seed(0))
        return out.steps, out.stopped, out.selected_step

    assert run(0.0) == (8, "cap", 8)  # every drop restarts the patience
    assert run(0.01) == (5, "patience", 5)  # drops under 1 % do not; the lowest loss is still the one kept
    assert run(0.0, min_delta=0.004) == (5, "patience", 5)  # nor, with min_delta, 0.003 in 3 steps


def test_refit_trains_the_chosen_configuration_for_the_kept_steps(plan, monkeypatch):
    data, splits = plan.data, plan.splits[0]
    method = parse_method("linear-adamw?lr=1e-3,1e-2&weight_decay=0,1&max_steps=120&patience=30")
    fit = method.fit(data, splits, 0)
    calls = []
    original = loop.fit_steps

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(joint.loop, "fit_steps", recording)
    rows = np.concatenate([splits.train, splits.val])
    refit = method.refit(data, rows, 0, fit.selection)
    (call,) = calls
    s = fit.selection
    assert call["configs"] == [(s["lr"], s["weight_decay"])] and call["max_steps"] == s["selected_step"]
    assert call["val_loss"] is None and len(call["x_train"]) == len(rows)
    assert refit.selection == s and refit.W.shape == fit.W.shape and not torch.equal(refit.W, fit.W)


@pytest.mark.parametrize("name", ["batchformer", "latentdr-sa", "latentdr-pool"])
def test_every_joint_method_searches_its_grid_reproducibly(plan, name):
    data, splits = plan.data, plan.splits[0]
    spec = f"{name}?lr=1e-3,1e-2&weight_decay=0.01&max_steps=12&patience=6&val_every=3&batch_size=16"
    fits = [parse_method(spec).fit(data, splits, seed) for seed in (0, 0, 1)]
    assert len(fits[0].search) == 2 and KEYS <= set(fits[0].selection)
    assert torch.equal(fits[0].W, fits[1].W) and not torch.equal(fits[0].W, fits[2].W)  # same seed, same numbers
    assert fits[0].W.shape == (data.embed_dim, data.n_classes)


@pytest.mark.parametrize("spec, match", [
    ("linear-adamw?lr=1e-3,x", "'x' is not a number"),
    ("linear-adamw?lr=0", "lr == 0.0 must be > 0"),
    ("batchformer?weight_decay=1,-1", "weight_decay == -1.0 must be >= 0"),
    ("linear-adamw?lr=1e-3,1e-3", "repeats a value"),
    ("linear-adamw?max_steps=0", "max_steps == 0, must be >= 1"),
    ("latentdr-sa?patience=0", "patience == 0, must be >= 1"),
    ("latentdr-pool?val_every=0", "val_every == 0, must be >= 1"),
    ("linear-adamw?min_improvement=1", "min_improvement == 1.0 must be in"),
    ("linear-adamw?min_delta=-0.1", "min_delta == -0.1 >= 0"),
    ("linear-adamw?epochs=10", "unknown option 'epochs'"),
])
def test_bad_options_are_one_line_naming_the_value(spec, match):
    with pytest.raises(UsageError, match=match) as e:
        parse_method(spec)
    assert "\n" not in str(e.value)


def test_seeds_stacked_train_as_they_would_alone(monkeypatch, tmp_path):
    """Seeds (or DomainBed's folds) trained as one stack (an accelerator's path, forced here
    on the CPU) get each its own rows, batches, start and validation: a linear classifier
    comes out the same as trained alone, and every seed keeps its own search."""
    from tests.conftest import write_synthetic_cache
    from vlaug.evaluate import ProbeRunConfig, prepare
    from vlaug.methods import Method, joint
    from vlaug.methods.batching import ProbeSolver

    feats = write_synthetic_cache(tmp_path / "feat", n_per_class=25, d=16, n_classes=3,
                                  domains=("clipart", "painting", "photo", "sketch"), prompt_sets=())
    config = ProbeRunConfig(features=str(feats), out=str(tmp_path / "r"), methods=("linear-adamw?max_steps=120&val_every=5",),
                            seeds=2, device="cpu", progress=False, protocol="leave-one-domain-out")
    plan = prepare(config)
    method = plan.methods[0]
    monkeypatch.setattr(joint, "STACK_DEVICES", ("cpu",))
    calls = []
    real = joint.loop.fit_steps
    monkeypatch.setattr(joint.loop, "fit_steps", lambda *a, **k: calls.append(len(k["configs"])) or real(*a, **k))
    stacked = method.fit_seeds(plan.data, plan.splits, ProbeSolver(plan.data, plan.splits))
    assert calls == [len(plan.splits) * len(method.options.configs())]  # one loop for every task
    alone = Method.fit_seeds(method, plan.data, plan.splits, None)
    assert len(stacked) == len(alone) == 8  # 2 seeds x 4 test domains
    for a, b in zip(stacked, alone):
        assert [(e["lr"], e["weight_decay"], e["steps"], e["selected_step"]) for e in a.search] == \
            [(e["lr"], e["weight_decay"], e["steps"], e["selected_step"]) for e in b.search]
        assert torch.allclose(a.W, b.W, atol=1e-5) and a.selection["val_accuracy"] == b.selection["val_accuracy"]
