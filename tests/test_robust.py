"""The text-side methods (vlaug.methods.robust) and their arithmetic, checked by hand on tiny
inputs: GDA against scikit-learn's shrinkage LDA, text-anchored and prompt-shifted rows, the
input-adaptive gate stored in the probe, and ``--method all``."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from tests.conftest import write_synthetic_cache
from vlaug import augment, choices
from vlaug.cache import read_metadata
from vlaug.checkpoint import load_probe, save_probe
from vlaug.cli import app
from vlaug.discriminant import ClassStatistics, gda_weights, mahalanobis, shrunk_inverses
from vlaug.errors import UsageError
from vlaug import cli
from vlaug.methods import REGISTRY, parse_method
from vlaug.metrics import pareto_front
from vlaug.probe import LinearProbe, ProbeConfig

runner = CliRunner()


def _tiny(n=40, d=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    x = torch.randn(n, d, generator=g) + 2 * F.one_hot(y, d).float()
    return x, y


def test_class_statistics_and_gda_by_hand():
    x, y = _tiny()
    stats = ClassStatistics.of([(x[:15], y[:15]), (x[15:], y[15:])], 3, x.shape[1])  # two blocks
    xd, yd = x.double(), y
    means = torch.stack([xd[yd == k].mean(0) for k in range(3)])
    resid = xd - means[yd]
    cov = resid.T @ resid / len(x)
    assert torch.allclose(stats.means, means, atol=1e-5) and torch.allclose(stats.covariance(), cov, atol=1e-5)
    alpha = 0.3
    shrunk = (1 - alpha) * cov + alpha * torch.trace(cov) / cov.shape[0] * torch.eye(cov.shape[0], dtype=cov.dtype)
    precision = shrunk_inverses(stats.covariance(), [alpha])[0]
    assert torch.allclose(precision, torch.linalg.inv(shrunk), atol=1e-6)
    W, b = gda_weights(stats, precision)
    priors = torch.bincount(y, minlength=3).double() / len(y)
    assert torch.allclose(W, torch.linalg.solve(shrunk, means.T), atol=1e-6)
    assert torch.allclose(b, -0.5 * torch.einsum("cd,dc->c", means, W) + priors.log(), atol=1e-6)


def test_gda_matches_scikit_learn_shrinkage_lda():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x, y = _tiny(n=60, d=8, c=4, seed=3)
    stats = ClassStatistics.of([(x, y)], 4, 8)
    for alpha in (0.1, 0.6):
        W, b = gda_weights(stats, shrunk_inverses(stats.covariance(), [alpha])[0])
        lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=alpha).fit(x.numpy().astype(np.float64), y.numpy())
        np.testing.assert_allclose((x.double() @ W + b).numpy(), lda.decision_function(x.numpy().astype(np.float64)),
                                   rtol=1e-5, atol=1e-5)


def test_soft_targets_split_a_row_between_classes():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    stats = ClassStatistics.of([(x, t)], 2, 2)
    assert stats.counts.tolist() == [1.5, 1.5]
    assert torch.allclose(stats.means, torch.tensor([[1.0, 1 / 3], [1 / 3, 1.0]], dtype=torch.float64))


def test_mahalanobis_is_the_distance_to_the_nearest_mean():
    means = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    precision = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    x = torch.tensor([[1.0, 1.0], [3.0, 0.0], [2.0, -0.5]])
    expect = torch.tensor([min(1 + 4, 9 + 4), min(9, 1), min(4 + 1, 4 + 1)], dtype=torch.float32)
    assert torch.allclose(mahalanobis(x, means, precision), expect)


def test_text_anchored_rows_move_towards_their_class_prompt():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    text = torch.randn(3, 4, generator=g) * 3  # not unit: the prompts are normalised first
    labels = torch.tensor([0, 1, 2, 0, 1])
    out = augment.toward_prompts(x, labels, text, 0.5, torch.Generator().manual_seed(1))
    t = F.normalize(text, dim=-1)[labels]
    assert torch.allclose(out.norm(dim=1), torch.ones(5))
    for i in range(5):  # out ∝ x + u·t with 0 <= u <= 0.5
        a = torch.stack([x[i], t[i]], 1)
        coef = torch.linalg.lstsq(a, out[i][:, None]).solution.squeeze()
        assert torch.allclose(a @ coef, out[i], atol=1e-5)
        assert coef[0] > 0 and 0 <= coef[1] / coef[0] <= 0.5 + 1e-5
    same = augment.toward_prompts(x, labels, text, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(out, same)


@pytest.fixture
def cache(tmp_path):
    return write_synthetic_cache(tmp_path / "feats", n_per_class=30, d=16, n_classes=3, domains=("photo", "sketch", "art"),
                                 prompt_sets=("photo", "sketch", "art"))


def _bound(spec, path, train_domains=("photo",)):
    method = parse_method(spec)
    note = method.bind(read_metadata(str(path)), list(train_domains))
    return method, note


def test_prompt_shift_sets_and_rows_by_hand(cache):
    method, note = _bound("prompt-shift?n_aug=2&scale=0.5", cache)
    assert note is None and (method.source, method.targets) == ("photo", ["sketch", "art"])
    assert method.extra_rows() == 4 and method.prompt_sets() == ["photo", "sketch", "art"]
    mixed, _ = _bound("prompt-shift?ensemble=0.5", cache)  # mixes in zero-shot: the class prompts too
    assert mixed.prompt_sets() == ["classes", "photo", "sketch", "art"]
    feats = read_metadata(str(cache))

    class Data:  # what augment reads of a run
        device = torch.device("cpu")
        n_classes = 3

    Data.feats = feats
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    y = torch.tensor([0, 1, 2, 1])
    rows, t = method.augment(Data, x, y, None, torch.Generator().manual_seed(2))
    assert rows.shape == (2 * 2 * 4, 16) and torch.equal(t.argmax(1), y.repeat(4))
    unit = lambda n: F.normalize(torch.as_tensor(feats.texts[n]), dim=-1)  # noqa: E731
    deltas = [unit(k) - unit("photo") for k in ("sketch", "art")]
    for r in range(2):  # repeat r, target k, row i: rows ∝ x_i + u·Δ_k[y_i], 0 <= u <= 2·scale
        for k in range(2):
            for i in range(4):
                out = rows[(r * 2 + k) * 4 + i]
                a = torch.stack([x[i], deltas[k][y[i]]], 1)
                coef = torch.linalg.lstsq(a, out[:, None]).solution.squeeze()
                assert torch.allclose(a @ coef, out, atol=1e-5) and 0 <= coef[1] / coef[0] <= 1.0 + 1e-5


def test_prompt_shift_needs_target_prompt_sets(tmp_path, cache):
    method, _ = _bound("prompt-shift?source=sketch&targets=art", cache)
    assert (method.source, method.targets) == ("sketch", ["art"])
    with pytest.raises(UsageError, match="no prompt set 'cartoon'.*vlaug prompts"):
        _bound("prompt-shift?targets=cartoon", cache)
    bare = write_synthetic_cache(tmp_path / "bare", n_per_class=10, d=8, n_classes=2, domains=("photo", "sketch"),
                                 prompt_sets=("photo",))
    with pytest.raises(UsageError, match="no target-domain prompt set.*vlaug prompts FEATURES --prompt-set"):
        _bound("prompt-shift", bare)
    adaptive, note = _bound("adaptive", bare)  # goes on without shifts, and says so
    assert adaptive.targets == [] and adaptive.extra_rows() == 0 and "runs without prompt shifts" in note
    result = runner.invoke(app, ["probe", str(bare), "--out", str(tmp_path / "r"), "-m", "prompt-shift", "--no-progress",
                                 "--device", "cpu"])
    assert result.exit_code == 2 and "vlaug prompts" in result.output and not (tmp_path / "r").exists()


def test_gate_weight_and_probabilities_by_hand(tmp_path):
    d, c = 3, 2
    config = ProbeConfig(d, c, ensemble=0.1, temperature=0.5, logit_scale=2.0, gate_max=0.9, gate_center=4.0, gate_width=0.5)
    probe = LinearProbe(config)
    with torch.no_grad():
        probe.linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        probe.linear.bias.zero_()
        probe.text.copy_(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
        probe.gate_means.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        probe.gate_precision.copy_(torch.eye(3))
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    d2 = torch.tensor([0.0, 10.0])  # nearest mean: itself; (0,0,3): 1 + 9
    lam = 0.1 + 0.8 * torch.sigmoid((d2 - 4.0) / 0.5)
    p = (x @ probe.linear.weight.T * 2.0).softmax(1)
    zs = (F.normalize(x, dim=-1) @ probe.text.T / 0.5).softmax(1)
    expect = (1 - lam[:, None]) * p + lam[:, None] * zs
    assert torch.allclose(probe.predict_proba(x), expect, atol=1e-6)
    plain = LinearProbe(ProbeConfig(d, c, ensemble=0, logit_scale=2.0))  # an integer 0: the probe alone, unscaled
    plain.linear.load_state_dict(probe.linear.state_dict())
    assert torch.allclose(plain.predict_proba(x), (x @ probe.linear.weight.T).softmax(1), atol=1e-6)
    assert probe.zero_shot_weight(x)[0].item() == pytest.approx(0.1, abs=1e-3)
    assert probe.zero_shot_weight(x)[1].item() == pytest.approx(0.9, abs=1e-3)
    save_probe(tmp_path / "p", probe, ["a", "b"])
    again = load_probe(tmp_path / "p")
    assert again.config == config and torch.allclose(again.predict_proba(x), expect, atol=1e-6)


def test_adaptive_end_to_end_keeps_the_gate_in_its_saved_probe(tmp_path, cache):
    out = tmp_path / "r"
    result = runner.invoke(app, ["probe", str(cache), "--out", str(out), "--train-domain", "photo", "--seeds", "2",
                                 "-m", "gda", "-m", "adaptive", "-m", "text-anchor", "-m", "prompt-shift?solver=gda",
                                 "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    sel = {m["method"]: m["selection_seed0"] for m in report["methods"]}
    assert sel["gda"]["shrinkage"] in (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert len(sel["gda"]["search"]) == 11 and "weight_decay" not in sel["gda"]
    gate = sel["adaptive"]["gate"]
    n_val = report["protocol"]["splits"][0]["val"]  # the gate is half open past the 99th percentile: one row of 13
    assert gate["max"] == 0.65 and gate["quantile"] == 0.99 and gate["val_rows_past_center"] * n_val <= 1 + 1e-6
    assert "calibration" in sel["adaptive"] and "shrinkage" in sel["prompt-shift?solver=gda"]
    probe = load_probe(out / "probes" / "adaptive")
    assert probe.config.gate_max == 0.65 and probe.config.gate_center == pytest.approx(gate["center"])
    assert float(probe.gate_precision.abs().sum()) > 0
    texts = json.loads((out / "probes" / "adaptive" / "config.json").read_text())["cache"]["texts"]
    assert set(texts) == {"classes", "photo", "sketch", "art"}
    assert report["plots"]["tradeoff"] == "tradeoff.png" and (out / "tradeoff.png").stat().st_size > 10_000
    assert "tradeoff.png" in (out / "report.md").read_text()


def test_pareto_front_by_hand():
    points = [(90, 30), (50, 55), (88, 50), (88, 50), (60, 40), (90, 29)]
    assert pareto_front(points) == [0, 1, 2, 3]  # (60, 40) and (90, 29) are beaten; ties are kept


def test_reweighting_is_refused_for_gda(tmp_path, cache):
    result = runner.invoke(app, ["probe", str(cache), "--out", str(tmp_path / "r"), "-m", "gda", "--reweight", "groupdro",
                                 "--no-progress"])
    assert result.exit_code == 2 and "solver=logistic" in result.output


def _plan(cache, tmp_path, methods, **kwargs):
    from vlaug.evaluate import ProbeRunConfig, prepare

    return prepare(ProbeRunConfig(features=str(cache), out=str(tmp_path / "x"), methods=tuple(methods),
                                  train_domains=("photo",), seeds=1, device="cpu", **kwargs))


def test_method_all_leaves_out_what_reweighting_or_streaming_cannot_run(tmp_path, cache):
    gda = {n for n, cls in REGISTRY.items() if getattr(cls(n), "solver", "logistic") == "gda"}
    assert gda == {"gda", "adaptive"}
    plan = _plan(cache, tmp_path, ["all"], reweight="groupdro")
    names = [m.text for m in plan.methods]
    assert not gda & set(names) and "linear" in names and "prompt-shift" in names
    assert sum("skipped: it fits GDA" in w for w in plan.warnings) == 2
    with pytest.raises(UsageError, match="gda: it fits GDA"):  # named by the user: refused, not skipped
        _plan(cache, tmp_path, ["all", "gda"], reweight="groupdro")
    plan = _plan(cache, tmp_path, ["all"], memory_budget="1K")
    not_streaming = {n for n, cls in REGISTRY.items() if not cls.streams and not cls.head_kinds}
    assert plan.memory.streamed and not_streaming and not not_streaming & {m.text for m in plan.methods}
    assert sum("cache is streamed from disk" in w for w in plan.warnings) == len(not_streaming)
    with pytest.raises(UsageError, match=sorted(not_streaming)[0]):
        _plan(cache, tmp_path, ["all", sorted(not_streaming)[0]], memory_budget="1K")


def test_method_all_with_a_method_by_name_runs_it_once(tmp_path, cache):
    every = [m.text for m in _plan(cache, tmp_path, ["all"]).methods]
    assert [m.text for m in _plan(cache, tmp_path, ["all", "linear"]).methods] == every
    texts = [m.text for m in _plan(cache, tmp_path, ["all", "linear?ensemble=0", "all"]).methods]
    assert texts == [t for t in every if t != "linear"] + ["linear?ensemble=0"]  # the defaults, written out
    assert [m.text for m in _plan(cache, tmp_path, ["linear", "all"]).methods] == ["linear"] + [t for t in every if t != "linear"]
    with pytest.raises(UsageError, match="given twice"):
        _plan(cache, tmp_path, ["linear", "linear"])


def test_a_method_by_name_refuses_several_matching_heads(tmp_path, cache):
    import shutil

    heads = tmp_path / "heads"
    result = runner.invoke(app, ["train-box", str(cache), "--out", str(heads / "box"), "--head", "box", "--train-domain",
                                 "photo", "--epochs", "1", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert [m.text for m in _plan(cache, tmp_path, ["box"], heads=str(heads)).methods] == [f"box:{heads / 'box'}"]
    texts = [m.text for m in _plan(cache, tmp_path, ["all", f"box:{tmp_path}/heads/../heads/box"], heads=str(heads)).methods]
    assert [t for t in texts if t.startswith("box")] == [f"box:{tmp_path}/heads/../heads/box"]
    shutil.copytree(heads / "box", heads / "box-wide")
    with pytest.raises(UsageError, match=r"holds 2 box heads.*--method box:"):
        _plan(cache, tmp_path, ["box"], heads=str(heads))
    texts = [m.text for m in _plan(cache, tmp_path, ["all"], heads=str(heads)).methods]  # all: each of them
    assert f"box:{heads / 'box'}" in texts and f"box:{heads / 'box-wide'}" in texts


def test_the_gate_model_ignores_classes_without_rows(tmp_path, cache):
    from vlaug.methods.robust import _gate_model

    data = _plan(cache, tmp_path, ["adaptive"]).data
    rows = np.flatnonzero(data.y.numpy() != 2)
    means, precision = _gate_model(data, rows)
    assert torch.equal(means[2], means[0]) and torch.isfinite(precision).all()
    x = data.x[torch.as_tensor(rows)].float()
    assert torch.allclose(mahalanobis(x, means, precision), mahalanobis(x, means[:2], precision))


def test_prompt_shift_before_bind_says_so():
    method = parse_method("prompt-shift")
    with pytest.raises(RuntimeError, match="call bind"):
        method.extra_rows()


@pytest.mark.slow  # every joint method trains to convergence: ~30 s on 2 cores
def test_method_all_runs_every_registered_method_and_skips_missing_heads(tmp_path, cache):
    heads = tmp_path / "heads"
    result = runner.invoke(app, ["train-box", str(cache), "--out", str(heads / "box"), "--head", "box", "--train-domain",
                                 "photo", "--epochs", "2", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "r"
    result = runner.invoke(app, ["probe", str(cache), "--out", str(out), "--train-domain", "photo", "--seeds", "1",
                                 "-m", "all", "-m", "linear?ensemble=0.5", "--heads", str(heads), "--no-progress",
                                 "--device", "cpu"] + [])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    names = [m["name"] for m in report["methods"]]
    assert names == [n for n in REGISTRY if n not in ("dr", "lads", "cdga")] + ["linear"]
    assert any(m["method"] == f"box:{heads / 'box'}" for m in report["methods"])
    assert any("dr skipped: no dr-sa or dr-pool head" in w for w in report["warnings"])
    assert any("lads skipped" in w for w in report["warnings"])
    assert any("cdga skipped: it needs cdga:GEN_FEATURES" in w for w in report["warnings"])


def test_cli_help_lists_every_registered_method():
    builtin = choices.builtin_methods()  # read off the source, without importing vlaug.methods
    assert [m.split(":")[0] for m in builtin] == [n for n in REGISTRY if REGISTRY[n].__module__.startswith("vlaug.")]
    assert all((":" in m) == bool(REGISTRY[m.split(":")[0]].head_kinds or REGISTRY[m.split(":")[0]].path_argument)
               for m in builtin)
    assert all(m in cli.METHODS_HELP for m in builtin)


def test_text_side_methods_stream_and_gda_equals_its_in_memory_fit(tmp_path):
    feats = write_synthetic_cache(tmp_path / "feat", n_per_class=50, d=16, n_classes=3, domains=("photo", "sketch", "art"),
                                  prompt_sets=("photo", "sketch", "art"))  # 450 rows: chunks of a few dozen
    methods = ["gda", "adaptive", "text-anchor", "prompt-shift"]
    reports = {}
    for name, extra in [("mem", []), ("disk", ["--memory-budget", "1K"]), ("disk2", ["--memory-budget", "1K"])]:
        r = runner.invoke(app, ["probe", str(feats), "--out", str(tmp_path / name), "--train-domain", "photo", "--seeds", "2",
                                "--no-progress", "--device", "cpu", *[a for m in methods for a in ("-m", m)], *extra])
        assert r.exit_code == 0, r.output
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    mem, disk = reports["mem"], reports["disk"]
    assert disk["protocol"]["streamed"] and not mem["protocol"]["streamed"]
    assert disk["results"] == reports["disk2"]["results"]  # streamed extras are drawn per chunk, reproducibly
    for a, b in zip(mem["results"], disk["results"]):
        if a["method"] == "gda":  # sums over the rows: the same fit, whatever the chunks
            assert a["selection"]["shrinkage"] == b["selection"]["shrinkage"]
            assert a["in_domain"] == b["in_domain"] and a["out_of_domain"] == b["out_of_domain"]
        if a["method"] == "adaptive":  # the gate's model is computed from the same rows either way
            assert a["selection"]["gate"]["center"] == pytest.approx(b["selection"]["gate"]["center"], rel=1e-4)


def test_adaptive_gate_is_calibrated_on_validation_rows_by_hand(tmp_path, cache):
    from vlaug.cache import read_cache
    from vlaug.evaluate import ProbeRunConfig, prepare

    out = tmp_path / "r"
    result = runner.invoke(app, ["probe", str(cache), "--out", str(out), "--train-domain", "photo", "--seeds", "1",
                                 "-m", "adaptive?quantile=0.9&zero_shot_max=0.7", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    gate = json.loads((out / "report.json").read_text())["methods"][0]["selection_seed0"]["gate"]
    split = prepare(ProbeRunConfig(features=str(cache), out=str(tmp_path / "x"), methods=("adaptive",),
                                   train_domains=("photo",), seeds=1, device="cpu")).splits[0]
    feats = read_cache(str(cache))
    x, y = np.asarray(feats.embeddings, dtype=np.float64), np.asarray(feats.labels)
    train, val = np.asarray(split.train), np.asarray(split.val)
    means = np.stack([x[train][y[train] == k].mean(0) for k in range(3)])
    resid = x[train] - means[y[train]]
    cov = resid.T @ resid / len(train)
    shrunk = 0.5 * cov + 0.5 * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    diff = x[val][:, None, :] - means[None]
    d2 = np.einsum("ncd,de,nce->nc", diff, np.linalg.inv(shrunk), diff).min(1)
    center = np.quantile(d2, 0.9)
    assert gate["center"] == pytest.approx(center, rel=1e-3)
    assert gate["width"] == pytest.approx((center - np.median(d2)) / 4, rel=1e-2)
    assert gate["max"] == 0.7 and gate["val_rows_past_center"] == pytest.approx((d2 > center).mean(), abs=1 / len(val))
    # the saved probe (refitted on train + val) keeps the gate calibrated with it: the model of the training rows
    report = json.loads((out / "report.json").read_text())
    probe = load_probe(out / next(iter(report["probe_dirs"].values())))
    assert np.allclose(probe.gate_means.numpy(), means, atol=1e-5)
    assert np.allclose(probe.gate_precision.numpy(), np.linalg.inv(shrunk), rtol=1e-3, atol=1e-3 * np.abs(np.linalg.inv(shrunk)).max())
