"""vlaug probe and vlaug predict end to end on a synthetic cache."""

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.conftest import write_synthetic_cache
from vlaug.cli import app
from vlaug.heads import make_head_config
from vlaug.train import TrainConfig, train_head

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    feats = write_synthetic_cache(root / "feat", n_per_class=25, d=32, n_classes=4)
    for head, kw in [("box", {}), ("dr-sa", {}), ("lads", {"source": "photo", "targets": ("sketch",)})]:
        train_head(TrainConfig(features=str(feats), out=str(root / head), head=make_head_config(head, **kw), epochs=5,
                               progress=False, device="cpu", train_domains=("photo",)))
    return root, feats


ALL_METHODS = ["zero-shot", "linear", "linear-zs?wise=0.3", "box:{root}/box?n_aug=3&ensemble=0.5", "dr:{root}/dr-sa",
               "lads:{root}/lads", "gaussian?sigma=0.2", "mixup", "xdomain-mix", "batchformer?max_steps=30",
               "latentdr-sa?max_steps=30", "latentdr-pool?max_steps=30"]


def _probe(root, feats, out, methods, *extra):
    args = ["probe", str(feats), "--out", str(out), "--train-domain", "photo", "--seeds", "2", "--grid-size", "3",
            "--max-iter", "40", "--device", "cpu", "--no-progress", *extra]
    for m in methods:
        args += ["-m", m.format(root=root)]
    return runner.invoke(app, args)


def test_every_method_end_to_end_and_the_report_schema(setup, tmp_path):
    root, feats = setup
    out = tmp_path / "report"
    r = _probe(root, feats, out, ALL_METHODS)
    assert r.exit_code == 0, r.output
    assert "| Method | In-domain | Out-of-domain | Extended | Balanced |" in r.stdout
    report = json.loads((out / "report.json").read_text())
    methods = [m.format(root=root) for m in ALL_METHODS]
    assert [s["method"] for s in report["summary"]] == methods
    assert len(report["results"]) == 2 * len(methods)
    for row in report["results"]:
        assert set(row) >= {"method", "seed", "in_domain", "out_of_domain", "extended", "balanced_accuracy", "per_domain"}
        for key in ("in_domain", "out_of_domain", "extended", "balanced_accuracy"):
            assert 0.0 <= row[key] <= 1.0
        assert set(row["per_domain"]) == {"photo", "sketch"}
    for s in report["summary"]:
        for key in ("in_domain", "out_of_domain", "extended", "balanced_accuracy"):
            assert set(s[key]) == {"mean", "std"}
    assert report["model"] == "synthetic" and report["pretrained"] == "none"
    assert report["protocol"]["seeds"] == [0, 1] and report["protocol"]["train_domains"] == ["photo"]
    assert report["config"]["grid_size"] == 3
    assert {p.name for p in out.glob("*.png")} >= {"accuracy.png", "embeddings.png"}
    assert any(p.name.startswith("box_volume_") for p in out.glob("*.png"))
    md = (out / "report.md").read_text()
    assert "## Top-1 accuracy (%)" in md and "## Per domain (%)" in md and "alignment" in md
    assert len(report["probe_dirs"]) == len(methods)
    # zero-shot on separable clusters whose centres are the class prompts is near perfect in domain
    zs = next(s for s in report["summary"] if s["method"] == "zero-shot")
    assert zs["in_domain"]["mean"] > 0.9
    lin = next(s for s in report["summary"] if s["method"] == "linear")
    assert lin["in_domain"]["mean"] > 0.9


def test_same_seed_gives_identical_report_numbers(setup, tmp_path):
    root, feats = setup
    methods = ["linear", "box:{root}/box", "mixup"]
    assert _probe(root, feats, tmp_path / "a", methods).exit_code == 0
    assert _probe(root, feats, tmp_path / "b", methods).exit_code == 0
    a, b = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("a", "b"))
    assert a["results"] == b["results"] and a["summary"] == b["summary"]


def test_few_shot_and_imbalance_protocols(setup, tmp_path):
    root, feats = setup
    r = _probe(root, feats, tmp_path / "fs", ["linear"], "--shots", "3")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "fs" / "report.json").read_text())
    assert all(s["train"] == 12 for s in report["protocol"]["splits"])
    assert all(s["val"] <= 4 * 3 for s in report["protocol"]["splits"])  # few-shot validation: min(K, 4) per class
    r = _probe(root, feats, tmp_path / "im", ["zero-shot", "linear"], "--imbalance", "50:2", "--reweight", "seed-category")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "im" / "report.json").read_text())
    assert all(len(s["reduced_classes"]) == 2 for s in report["protocol"]["splits"])
    assert "reduced_classes" in report["summary"][1] and "Reduced classes" in r.stdout
    linear = [x for x in report["results"] if x["method"] == "linear"]
    assert linear and all(x["selection"]["reweight"]["scheme"] == "seed-category" for x in linear)
    assert not any("reweight" in x["selection"] for x in report["results"] if x["method"] == "zero-shot")
    # the report says which methods the reweighting applied to
    assert ("reweight: seed-category, applied to `linear`; not to `zero-shot` (no probe rows to reweight)"
            in (tmp_path / "im" / "report.md").read_text())


@pytest.mark.parametrize(
    "methods, extra, match",
    [
        (["nope"], [], "unknown method 'nope'"),
        (["box"], [], "needs a head folder"),
        (["linear?n_aug=3"], [], "unknown option 'n_aug'"),
        (["linear?ensemble=2"], [], "ensemble == 2.0"),
        (["box:{root}/dr-sa"], [], "is a dr-sa head"),
        (["linear"], ["--shots", "100"], "--shots 100"),
        (["linear"], ["--imbalance", "101:2"], "must be in 0-100"),
        (["linear"], ["--train-domain", "clipart"], "'clipart' is not in the cache"),
        (["linear"], ["--selection-rows", "5"], "--selection-rows 5"),
    ],
)
def test_bad_input_exits_2_and_writes_no_report(setup, tmp_path, methods, extra, match):
    root, feats = setup
    r = _probe(root, feats, tmp_path / "rep", methods, *extra)
    assert r.exit_code == 2, r.output
    assert match in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "rep").exists()


def test_head_of_another_cache_is_refused(setup, tmp_path):
    root, _ = setup
    other = write_synthetic_cache(tmp_path / "other", n_per_class=25, d=32, n_classes=5)
    r = _probe(root, other, tmp_path / "rep", ["box:{root}/box"])
    assert r.exit_code == 2 and "was trained on another cache" in r.stderr and "classes: head has 4" in r.stderr
    assert not (tmp_path / "rep").exists()


def test_predict_with_a_saved_probe(setup, tmp_path):
    root, feats = setup
    assert _probe(root, feats, tmp_path / "rep", ["linear", "box:{root}/box?ensemble=0.5"]).exit_code == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    probe_dir = tmp_path / "rep" / report["probe_dirs"]["linear"]
    out = tmp_path / "pred.parquet"
    r = runner.invoke(app, ["predict", str(feats), "--probe", str(probe_dir), "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    assert table.column_names == ["id", "path", "label", "class_name", "probabilities"]
    assert table.num_rows == 200
    assert table.column("path").to_pylist()[:2] == ["/x/0.jpg", "/x/1.jpg"]
    probs = table.column("probabilities").to_pylist()
    assert all(abs(sum(p) - 1) < 1e-4 for p in probs)
    assert "agreement with the cache's labels" in r.stdout
    other = write_synthetic_cache(tmp_path / "other", model="another-model", n_per_class=5, d=32, n_classes=4)
    r = runner.invoke(app, ["predict", str(other), "--probe", str(probe_dir), "--out", str(tmp_path / "p2.parquet")])
    assert r.exit_code == 2 and "model: head has 'synthetic', cache has 'another-model'" in r.stderr
    assert not (tmp_path / "p2.parquet").exists()
    r = runner.invoke(app, ["predict", str(feats), "--probe", str(root / "box"), "--out", str(tmp_path / "p3.parquet")])
    assert r.exit_code == 2 and "not a probe" in r.stderr




def _saved_probe(report_dir, method):
    from safetensors.torch import load_file

    report = json.loads((report_dir / "report.json").read_text())
    return report, load_file(str(report_dir / report["probe_dirs"][method] / "model.safetensors"))


def test_streamed_probe_equals_the_in_memory_probe(tmp_path):
    feats = write_synthetic_cache(tmp_path / "feat", n_per_class=75, d=32, n_classes=4)  # 600 rows: 3 chunks of 256
    methods = ["zero-shot", "linear", "linear-zs"]
    for name, extra in [("mem", []), ("disk", ["--memory-budget", "1K"])]:
        r = _probe(tmp_path, feats, tmp_path / name, methods, "--class-weight", *extra)
        assert r.exit_code == 0, r.output
    (mem, w_mem), (disk, w_disk) = _saved_probe(tmp_path / "mem", "linear"), _saved_probe(tmp_path / "disk", "linear")
    assert mem["protocol"]["streamed"] is False and disk["protocol"]["streamed"] is True
    assert "streaming 600 rows from disk, 256 at a time" in r.stderr
    for a, b in zip(mem["results"], disk["results"]):
        assert a["selection"].get("weight_decay") == b["selection"].get("weight_decay")
        # L-BFGS may stop one or two evaluations apart when float sums are taken in another order
        assert abs((a["selection"].get("iterations") or 0) - (b["selection"].get("iterations") or 0)) <= 2
        for key in ("in_domain", "out_of_domain", "balanced_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1 / 150)  # at most one test row of 150 differs
    # the same fit up to the order of float sums: compare at the scale of the weights (a bias near
    # zero differs by 1e-4 in relative terms; measured: 2e-7 to 1e-4 of the largest weight)
    for k in w_mem:
        scale = w_mem["linear.weight"].abs().max()
        assert (w_mem[k] - w_disk[k]).abs().max() <= 1e-3 * scale, k


@pytest.mark.slow
def test_streamed_augmenting_methods_are_reproducible_and_whole_set_methods_refused(setup, tmp_path):
    root, feats = setup
    methods = ["box:{root}/box?n_aug=3", "dr:{root}/dr-sa", "lads:{root}/lads", "gaussian"]
    for name in ("a", "b"):
        r = _probe(root, feats, tmp_path / name, methods, "--memory-budget", "1K")
        assert r.exit_code == 0, r.output
    a, b = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("a", "b"))
    assert a["protocol"]["streamed"] and a["results"] == b["results"]
    assert [g["method"] for g in a["feature_geometry"]] == [m.format(root=root) for m in methods]
    for method, extra in [("mixup", []), ("batchformer", []), ("linear", ["--reweight", "groupdro"])]:
        r = _probe(root, feats, tmp_path / "c", [method], "--memory-budget", "1K", *extra)
        assert r.exit_code == 2 and "needs the whole cache in memory" in r.stderr and "--memory-budget" in r.stderr
        assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("method", ["linear", "linear-zs"])
def test_large_training_sets_select_on_a_sample_then_refit_on_every_row(tmp_path, method):
    """Above --selection-rows training rows, the weight decay is the one a search on the
    seeded sample alone chooses, and the probe is then fitted on every training row,
    warm-started from the sample's: the same weights as those steps done by hand."""
    import numpy as np
    import torch

    from vlaug.evaluate import ProbeRunConfig, prepare
    from vlaug.methods import parse_method
    from vlaug.methods.linear import _selection_sample, extend_grid
    from vlaug.probe import Rows, fit_probe, select_weight_decay, validation_scores, weight_decay_grid
    from vlaug.zero_shot import zero_shot_weights

    feats = write_synthetic_cache(tmp_path / "feat", n_per_class=100, d=16, n_classes=4)
    config = ProbeRunConfig(features=str(feats), out=str(tmp_path / "rep"), methods=(method,), seeds=1, grid_size=4,
                            max_iter=60, selection_rows=150, device="cpu")
    plan = prepare(config)
    data, splits = plan.data, plan.splits[0]
    fit = parse_method(method).fit(data, splits, 0)
    sub_train, sub_val = _selection_sample(np.asarray(splits.train), np.asarray(splits.val), 150, 0)
    assert len(sub_train) == 150 and len(splits.train) > 150 and set(sub_train) <= set(splits.train)
    assert fit.selection["selected_on"] == {"train_rows": 150, "val_rows": len(sub_val)}
    assert fit.selection["n_train_rows"] == len(splits.train)
    x, y = data.x.float(), data.y
    anchor = zero_shot_weights(data.text) if method == "linear-zs" else None
    init = (anchor, torch.zeros(4)) if anchor is not None else None
    val_rows = Rows.of(x[sub_val], y[sub_val])

    def wise_mix(thetas, grid):  # linear-zs deploys the mix, and is selected on it (issue 27)
        mixed = thetas.clone()
        mixed[:, :-1] = 0.5 * anchor + 0.5 * thetas[:, :-1]
        mixed[:, -1] = 0.5 * thetas[:, -1]
        return validation_scores(val_rows, mixed)

    sample_rows, scorer = Rows.of(x[sub_train], y[sub_train], n_classes=4), wise_mix if anchor is not None else None
    best, search = select_weight_decay(sample_rows, val_rows, weight_decay_grid(4), 60, init, anchor, scorer)
    best, _, _ = extend_grid(sample_rows, val_rows, best, search, data.settings, anchor, scorer, init=init)  # past an end
    assert fit.selection["weight_decay"] == best["weight_decay"]
    W, b, _ = fit_probe(Rows.of(x[splits.train], y[splits.train], n_classes=4), best["weight_decay"], 60,
                        init=(best["W"], best["b"]), regularize_towards=anchor, tolerance_grad=1e-4)
    if anchor is not None:  # linear-zs keeps the WiSE mix of the fitted weights and the zero-shot ones
        W, b = 0.5 * anchor + 0.5 * W, 0.5 * b
    torch.testing.assert_close(fit.W, W, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fit.b, b, atol=1e-5, rtol=1e-4)
    # the refit on train + val rows (the saved probe) starts from this seed's fit on the training rows
    probe_method = parse_method(method)
    first = probe_method.fit(data, splits, 0)
    both = np.concatenate([splits.train, splits.val])
    refit = probe_method.refit(data, both, 0, first.selection)
    start = probe_method._fitted[0]
    W2, b2, _ = fit_probe(Rows.of(x[both], y[both], n_classes=4), best["weight_decay"], 60, init=start,
                          regularize_towards=anchor)
    if anchor is not None:
        W2, b2 = 0.5 * anchor + 0.5 * W2, 0.5 * b2
    torch.testing.assert_close(refit.W, W2, atol=1e-5, rtol=1e-4)
    # without a limit (or under it) the search uses every row and records no sample
    whole = parse_method(method).fit(prepare(ProbeRunConfig(**{**config.__dict__, "selection_rows": 0})).data, splits, 0)
    assert "selected_on" not in whole.selection


def test_float16_cache_stays_resident_in_float16_and_fits_as_float32(tmp_path):
    """A float16 cache is held once, in float16 (the path a GPU run takes, here with
    device="cpu"), under a budget its float32 copies would not fit; the probe fitted on it
    equals the probe fitted on the same values as float32 rows."""
    import numpy as np
    import torch

    from vlaug import cache
    from vlaug.evaluate import ProbeRunConfig, prepare
    from vlaug.methods import parse_method
    from vlaug.methods.linear import extend_grid
    from vlaug.probe import Rows, select_weight_decay, weight_decay_grid

    feats = write_synthetic_cache(tmp_path / "f32", n_per_class=60, d=32, n_classes=4)
    half = tmp_path / "f16"
    whole = cache.read_cache(feats)
    rows = {"id": whole.ids, "path": whole.paths, "label": whole.labels.tolist(),
            "class_name": [whole.classes[c] for c in whole.labels], "domain": whole.domains.tolist(),
            "split": whole.splits.tolist()}
    cache.write_part(half, "part-00000.parquet", rows, whole.embeddings, "float16")
    cache.write_texts(half, whole.texts, whole.classes)
    m = whole.manifest
    m.dtype = "float16"
    cache.write_manifest(half, m)
    # the rule: the stored bytes once, plus per-row metadata and working memory; a 2M x 512
    # float16 cache fits 3 GiB that way (it needed 12 GiB as three float32 copies)
    from dataclasses import replace

    from vlaug.cache.budget import PROBE_BYTES_PER_ROW, PROBE_WORKING_BYTES

    n, d = m.n_images, m.embed_dim
    assert cache.resident_bytes(m) == n * d * 2 + PROBE_BYTES_PER_ROW * n + PROBE_WORKING_BYTES
    big = replace(m, n_images=2_000_000, embed_dim=512)
    assert cache.resident_bytes(big) < 3 * 2**30 < cache.in_memory_bytes(big)
    budget = str(cache.resident_bytes(m))
    plan = prepare(ProbeRunConfig(features=str(half), out=str(tmp_path / "rep"), methods=("linear",), seeds=1,
                                  grid_size=4, max_iter=60, device="cpu", memory_budget=budget))
    assert not plan.memory.streamed and plan.data.x.dtype == torch.float16
    splits = plan.splits[0]
    fit = parse_method("linear").fit(plan.data, splits, 0)
    x = plan.data.x.float()  # the same values, as float32 rows
    y = plan.data.y
    train, val = Rows.of(x[splits.train], y[splits.train], n_classes=4), Rows.of(x[splits.val], y[splits.val])
    best, search = select_weight_decay(train, val, weight_decay_grid(4), 60)
    best, _, _ = extend_grid(train, val, best, search, plan.data.settings, None)  # past an end of the grid, as the method
    assert fit.selection["weight_decay"] == best["weight_decay"]
    torch.testing.assert_close(fit.W, best["W"], atol=1e-5, rtol=1e-4)
    assert np.allclose(x.numpy(), whole.embeddings, atol=1e-3)  # float16 rounding of the float32 originals


@pytest.mark.parametrize(("selection_rows", "budget", "seeds", "patterns"),
                         [(0, "auto", 3, False), (150, "auto", 3, False), (0, "1K", 3, False), (150, "1K", 3, False),
                          (0, "auto", 1, False), (0, "auto", 3, True), (150, "auto", 3, True)])
def test_methods_and_seeds_fitted_together_equal_each_fitted_alone(tmp_path, monkeypatch, selection_rows, budget, seeds,
                                                                    patterns):
    """The probe methods of a run fit their seeds' weight-decay searches as one batch (the
    union of the seeds' rows of the cache, a weight column per seed; each method's built
    extras under its own problems), and after searches on samples their refits on every
    row as one batch per method, in memory or streamed: the same weight decays, accuracies
    and saved probes as each method and seed fitted alone, and streamed, fewer reads of the
    cache. With ``patterns``, the union's rows that only some seeds hold are blocks of their
    own (large caches: PATTERN_ROWS made small here), evaluated under those seeds' problems.
    Seeds with the same training rows share one column and its fits (and the fits past the
    grid's ends): the same results as each seed fitted alone."""
    import vlaug.methods.batching as batching
    import vlaug.methods.linear as linear

    if patterns:
        monkeypatch.setattr(batching, "PATTERN_ROWS", 8)
        split = batching.membership_blocks
        owners = []
        monkeypatch.setattr(batching, "membership_blocks",
                            lambda *a: owners.append([b[4].tolist() for b in split(*a) if len(b) > 4]) or split(*a))

    feats = write_synthetic_cache(tmp_path / "feat", n_per_class=100, d=16, n_classes=4)
    methods = ["linear", "linear-zs", "gaussian?n_aug=2"] + (["mixup"] if budget == "auto" else [])
    if seeds == 1:  # one weight column: the methods share it
        methods = ["linear", "linear-zs"]
    batches = []
    fit_probes = linear.fit_probes
    counted = lambda *a, **k: batches.append(len(k.get("columns") or [])) or fit_probes(*a, **k)  # noqa: E731
    for module in (linear, batching):  # the seeds' refits (linear), the run's searches (batching)
        monkeypatch.setattr(module, "fit_probes", counted)
    for name in ("together", "alone"):
        if name == "alone":  # nothing batched: every method and seed searched, and refitted, on its own
            monkeypatch.setattr(batching, "UNION_LIMIT", 0.0)
            monkeypatch.setattr(linear, "GRID_FITS_VALUES", 0)  # nor the grid's fits shared by seeds with the same rows
            monkeypatch.setattr(linear.ProbeMethod, "batch_values", lambda *a: None)
        args = ["probe", str(feats), "--out", str(tmp_path / name), "--train-domain", "photo", "--seeds", str(seeds),
                "--grid-size", "4", "--max-iter", "60", "--selection-rows", str(selection_rows), "--device", "cpu",
                "--no-progress", "--memory-budget", budget] + (["--shots", "50"] if patterns else [])
        # (the seeds share their validation rows; with --shots their training rows differ: rows that 1 or 2 seeds hold)
        r = runner.invoke(app, args + [a for m in methods for a in ("-m", m)])
        assert r.exit_code == 0, r.output
        if name == "together" and not selection_rows:  # one search: every method x seed x weight decay
            batched = len(methods) if budget == "auto" or seeds == 1 else 2  # streamed, gaussian's draws follow its own reads
            # linear and linear-zs fit the cache's rows: seeds with the same training rows (without --shots, the
            # cache's fixed split) share one set of fits; a method's extras differ by seed
            distinct = seeds if patterns else 1
            assert batches == [(2 * distinct + (batched - 2) * seeds) * 4]
        elif name == "together":  # the refits of the two methods without extras, each one batch of 3 seeds
            assert batches == [3, 3]
        else:
            assert len(batches) == (1 if not selection_rows else 2)  # alone: no batch
        if name == "together" and patterns:
            assert owners and all(len(o) >= 3 for o in owners), owners  # blocks of the rows of 1 or 2 of the 3 seeds
    together, alone = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("together", "alone"))
    assert together["protocol"]["streamed"] == (budget == "1K")
    if budget == "1K":
        assert together["protocol"]["passes_over_cache"] < alone["protocol"]["passes_over_cache"]
    n_test = together["protocol"]["splits"][0]["test_in"]
    for a, b in zip(together["results"], alone["results"]):
        assert (a["method"], a["seed"]) == (b["method"], b["seed"])
        assert a["selection"]["weight_decay"] == b["selection"]["weight_decay"]
        assert a["selection"]["val_log_loss"] == pytest.approx(b["selection"]["val_log_loss"], rel=1e-2)
        assert a["in_domain"] == pytest.approx(b["in_domain"], abs=1 / n_test)
    for method in methods:
        w_together, w_alone = _saved_probe(tmp_path / "together", method)[1], _saved_probe(tmp_path / "alone", method)[1]
        scale = w_alone["linear.weight"].abs().max()
        for k in w_alone:
            assert (w_together[k] - w_alone[k]).abs().max() <= 2e-3 * scale, (method, k)


def test_batches_keep_their_optimiser_state_within_the_limit_and_searches_match_their_rows(tmp_path, monkeypatch):
    """search_together batches methods only while their problems' optimiser state fits
    BATCH_STATE_VALUES (the rest batch their own seeds, or fit one seed at a time), and a
    search given to a method is used only for the training rows it was made for."""
    import numpy as np
    import torch

    import vlaug.methods.batching as batching
    import vlaug.methods.linear as linear
    from vlaug.evaluate import ProbeRunConfig, prepare
    from vlaug.methods import parse_method

    feats = write_synthetic_cache(tmp_path / "feat", n_per_class=40, d=16, n_classes=4)
    batches = []
    fit_probes = linear.fit_probes
    counted = lambda *a, **k: batches.append(len(k.get("columns") or [])) or fit_probes(*a, **k)  # noqa: E731
    for module in (linear, batching):
        monkeypatch.setattr(module, "fit_probes", counted)
    per_problem = 36 * 17 * 4  # (3 x history + 6) x (d + 1) x C
    # problems: 2 methods x 4 weight decays x one set of rows (the 3 seeds' training rows are the same: one column, one
    # set of fits); at 3, one seed at a time, and each method fits its grid once for the 3 seeds (ProbeMethod._search;
    # no weight columns: 0)
    for limit, expected in ((8, [8]), (4, [4, 4]), (3, [0, 0])):
        batches.clear()
        monkeypatch.setattr(batching, "BATCH_STATE_VALUES", limit * per_problem)
        r = runner.invoke(app, ["probe", str(feats), "--out", str(tmp_path / f"r{limit}"), "--seeds", "3", "--grid-size",
                                "4", "--max-iter", "40", "--device", "cpu", "--no-progress", "-m", "linear", "-m", "linear-zs"])
        assert r.exit_code == 0, r.output
        assert batches == expected, limit
    reports = [json.loads((tmp_path / f"r{n}" / "report.json").read_text())["results"] for n in (8, 4, 3)]
    for a, b in zip(reports[0], reports[2]):
        assert a["selection"]["weight_decay"] == b["selection"]["weight_decay"]
    # a search made for other rows (another run's splits) is not taken
    monkeypatch.setattr(batching, "BATCH_STATE_VALUES", 8 * per_problem)
    plan = prepare(ProbeRunConfig(features=str(feats), out=str(tmp_path / "x"), methods=("linear",), seeds=2, grid_size=4,
                                  max_iter=40, device="cpu"))
    other = prepare(ProbeRunConfig(features=str(feats), out=str(tmp_path / "x"), methods=("linear",), seeds=2, grid_size=4,
                                   max_iter=40, device="cpu", val_fraction=0.4))
    method = parse_method("linear")
    searched = batching.ProbeSolver(plan.data, plan.splits).search_together([method])[method.text]
    assert set(searched) == {0, 1}
    stale = method.fit(other.data, other.splits[0], 0, searched[0])
    fresh = parse_method("linear").fit(other.data, other.splits[0], 0)
    assert stale.selection["n_train_rows"] == len(other.splits[0].train) != len(plan.splits[0].train)
    torch.testing.assert_close(stale.W, fresh.W)
    assert np.isclose(stale.selection["val_accuracy"], fresh.selection["val_accuracy"])
