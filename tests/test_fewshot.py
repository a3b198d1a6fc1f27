"""Few-shot CLIP adaptation (issue 29): the seven baselines' defining behaviours, the shots
sweep, and few-shot validation."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import write_synthetic_cache
from vlaug import checkpoint
from vlaug.errors import UsageError
from vlaug.evaluate import ProbeRunConfig, _fit_every_seed, deploy, prepare, run_probe
from vlaug.methods import parse_method
from vlaug.probe import cache_logits, fit_probe
from vlaug.protocols import Splits
from vlaug.report import write_report
from vlaug.zero_shot import zero_shot_weights

FEW_SHOT = ["tip-adapter", "tip-adapter-f?epochs=5", "clip-adapter?epochs=20", "taskres?epochs=20", "cross-modal", "lp++",
            "clap"]


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("fewshot") / "feat", n_per_class=60, d=32, n_classes=4)


def _plan(feats, tmp_path, methods, **kw):
    config = ProbeRunConfig(features=str(feats), out=str(tmp_path / "r"), methods=tuple(methods), train_domains=("photo",),
                            seeds=kw.pop("seeds", 2), grid_size=4, max_iter=60, device="cpu", progress=False, **kw)
    return prepare(config)


def _proba(probe, data, rows):
    with torch.no_grad():
        return probe.predict_proba(data.x[torch.as_tensor(np.asarray(rows))].float())


def test_tip_adapter_with_alpha_zero_is_zero_shot_exactly(feats, tmp_path):
    plan = _plan(feats, tmp_path, ["zero-shot", "tip-adapter?alpha=0&beta=5"], shots=4)
    data, s = plan.data, plan.splits[0]
    zs, tip = plan.methods
    p_zs = _proba(deploy(zs, data, zs.fit(data, s, 0), s.val), data, s.test)
    fit = tip.fit(data, s, 0)
    assert fit.parts["cache"]["alpha"] == 0 and len(fit.parts["cache"]["keys"]) == len(s.train)
    assert torch.equal(_proba(deploy(tip, data, fit, s.val), data, s.test), p_zs)


def test_tip_adapter_with_the_prompts_as_keys_ranks_like_zero_shot(feats, tmp_path):
    """Keys = the class prompts (one per class, its own label): the cache term is a monotone
    function of each class's cosine, so the classifier is a rescaled zero-shot."""
    plan = _plan(feats, tmp_path, ["zero-shot"])
    data, rows = plan.data, plan.splits[0].test
    text = torch.nn.functional.normalize(data.text, dim=-1)
    x = data.x[torch.as_tensor(rows)].float()
    zs = x @ zero_shot_weights(data.text)
    for alpha, beta in [(1.0, 1.0), (3.0, 7.0), (50.0, 0.5)]:
        logits = zs + alpha * cache_logits(x, text, torch.eye(data.n_classes), beta)
        assert torch.equal(logits.argmax(1), zs.argmax(1))


def test_cross_modal_without_image_rows_is_the_text_classifier(feats, tmp_path):
    plan = _plan(feats, tmp_path, ["zero-shot", "cross-modal"])
    data, rows = plan.data, plan.splits[0].test
    method = plan.methods[1]
    train = method.training_rows(data, np.zeros(0, np.int64), 0)
    assert train.n_rows == data.n_classes  # the class prompts alone
    W, b, _ = fit_probe(train, 10.0, 200)  # a strong weight decay: W ∝ the centred prompts
    x = data.x[torch.as_tensor(rows)].float()
    assert torch.equal((x @ W + b).argmax(1), (x @ zero_shot_weights(data.text)).argmax(1))
    # with images, the prompts are C more rows of their classes
    assert method.training_rows(data, plan.splits[0].train, 0).n_rows == len(plan.splits[0].train) + data.n_classes


def test_clap_at_infinite_constraint_keeps_the_zero_shot_weights(feats, tmp_path):
    plan = _plan(feats, tmp_path, ["clap?constraint=inf", "clap"], shots=4)
    data, s = plan.data, plan.splits[0]
    data.text = data.text + 0.8 * torch.roll(data.text, 1, 0)  # prompts that zero-shot gets wrong: CLAP has rows to learn from
    held, free = (m.fit(data, s, 0) for m in plan.methods)
    assert torch.equal(held.W, zero_shot_weights(data.text)) and not held.b.any()
    assert not torch.allclose(free.W, held.W)  # at the default constraint the rows move it
    assert free.selection["iterations"] > 0


def test_lp_plus_plus_blends_text_and_needs_no_validation(feats, tmp_path):
    plan = _plan(feats, tmp_path, ["lp++"], shots=4)
    data, s = plan.data, plan.splits[0]
    method = plan.methods[0]
    fit = method.fit(data, s, 0)
    no_val = method.fit(data, Splits(s.train, s.val[:0], s.test_in, s.test_out), 0)
    assert torch.equal(fit.W, no_val.W)  # no validation search: the rows alone decide
    assert fit.selection["alpha_mean"] > 0 and fit.selection["lr_w"] > 0


def test_trained_adapters_keep_their_best_validation_epoch(feats, tmp_path):
    plan = _plan(feats, tmp_path, ["clip-adapter?epochs=15", "taskres?epochs=15", "tip-adapter-f?epochs=6"], shots=4)
    data, s = plan.data, plan.splits[0]
    for method in plan.methods:
        fit = method.fit(data, s, 0)
        sel = fit.selection
        assert 1 <= sel["selected_epoch"] <= sel["epochs"], method.text
        refit = method.refit(data, np.concatenate([s.train, s.val]), 0, sel)
        assert refit.selection["selected_epoch"] == sel["selected_epoch"]
    clip = plan.methods[0].fit(data, s, 0)
    assert clip.parts["adapter"]["down"].shape == (32 // 4, 32) and clip.parts["adapter"]["ratio"] == 0.2


def test_probes_with_a_cache_or_an_adapter_save_and_load(feats, tmp_path):
    plan = _plan(feats, tmp_path, ["tip-adapter", "clip-adapter?epochs=5"], shots=3)
    data, s = plan.data, plan.splits[0]
    for method in plan.methods:
        probe = deploy(method, data, method.fit(data, s, 0), s.val).cpu()
        checkpoint.save_probe(tmp_path / method.name, probe, data.feats.classes)
        loaded = checkpoint.load_probe(tmp_path / method.name)
        assert torch.allclose(_proba(loaded, data, s.test), _proba(probe, data, s.test), atol=1e-6), method.text


def test_no_method_reads_a_test_label(feats, tmp_path):
    """Poisoned labels on every test row (in and out of domain): every fit is the same."""
    plan = _plan(feats, tmp_path, ["zero-shot", "linear", *FEW_SHOT], shots=3)
    data, s = plan.data, plan.splits[0]
    clean = {m.text: m.fit(data, s, 0) for m in plan.methods}
    test = torch.as_tensor(s.test)
    data.y[test] = (data.y[test] + 1) % data.n_classes
    for m in plan.methods:
        fit = m.fit(data, s, 0)
        assert torch.equal(fit.W, clean[m.text].W) and torch.equal(fit.b, clean[m.text].b), m.text
        for part, values in (fit.parts or {}).items():
            for key, value in values.items():
                assert torch.equal(value, clean[m.text].parts[part][key]) if torch.is_tensor(value) else \
                    value == clean[m.text].parts[part][key], (m.text, part, key)


def test_val_accuracy_is_the_deployed_classifiers(feats, tmp_path):
    plan = _plan(feats, tmp_path, FEW_SHOT, shots=4)
    _, first_fits, _ = _fit_every_seed(plan, progress=False)
    val = plan.splits[0].val
    for method in plan.methods:
        fit = first_fits[method.text]
        probe = deploy(method, plan.data, fit, val)
        hits = (_proba(probe, plan.data, val).argmax(1) == plan.data.y[torch.as_tensor(val)]).double().mean()
        assert fit.selection["val_accuracy"] == pytest.approx(float(hits), abs=1e-9), method.text


def test_few_shot_validation_and_nested_draws(feats, tmp_path):
    classes = 4
    by_k = {k: _plan(feats, tmp_path, ["zero-shot"], shots=k, seeds=3).splits for k in (1, 2, 8)}
    for seed in range(3):
        assert set(by_k[1][seed].train) <= set(by_k[2][seed].train) <= set(by_k[8][seed].train)
        assert set(by_k[1][seed].val) <= set(by_k[2][seed].val) <= set(by_k[8][seed].val)
    assert [len(by_k[k][0].val) for k in (1, 2, 8)] == [1 * classes, 2 * classes, 4 * classes]  # min(K, 4) per class
    assert len(by_k[8][0].train) == 8 * classes
    assert by_k[2][0].train.tolist() != by_k[2][1].train.tolist()  # each seed its own draw
    every = _plan(feats, tmp_path, ["zero-shot"], shots=2, val_shots="all").splits[0].val
    wide = _plan(feats, tmp_path, ["zero-shot"], shots=2, val_shots=6).splits[0].val
    assert len(wide) == 6 * classes and set(wide) < set(every) and len(every) > len(wide)
    with pytest.raises(UsageError, match="--val-shots"):
        ProbeRunConfig(features=str(feats), out=str(tmp_path / "x"), val_shots=4)
    with pytest.raises(UsageError, match="--val-shots 50"):
        _plan(feats, tmp_path, ["zero-shot"], shots=2, val_shots=50)


def test_shots_sweep_in_one_report(feats, tmp_path):
    config = ProbeRunConfig(features=str(feats), out=str(tmp_path / "r"), methods=("zero-shot", "linear", "tip-adapter"),
                            train_domains=("photo",), seeds=2, shots=(4, 1, 2), grid_size=3, max_iter=60, device="cpu",
                            progress=False)
    assert config.shots == (1, 2, 4)
    report = write_report(tmp_path / "r", run_probe(config, log=lambda m: None))
    assert [r["shots"] for r in report["shots_sweep"]["per_shots"]] == [1, 2, 4]
    assert sorted({(r["method"], r["seed"], r["shots"]) for r in report["results"]}) == sorted(
        (m, s, k) for m in config.methods for s in range(2) for k in (1, 2, 4))
    for run, k in zip(report["shots_sweep"]["per_shots"], (1, 2, 4)):
        assert all(sp["train"] == 4 * k and sp["val"] == 4 * min(k, 4) for sp in run["splits"])
    md = (tmp_path / "r" / "report.md").read_text()
    for k in (1, 2, 4):
        assert f"## Top-1 accuracy (%), {k}-shot" in md
    assert (tmp_path / "r" / "shots.png").stat().st_size > 0 and report["plots"]["shots"] == "shots.png"
    import pyarrow.parquet as pq

    preds = pq.read_table(tmp_path / "r" / "test_predictions.parquet").to_pydict()
    assert sorted(set(preds["shots"])) == [1, 2, 4]
    saved = json.loads((tmp_path / "r" / "probes" / "tip-adapter" / "config.json").read_text())
    assert saved["head"]["n_keys"] == 4 * 4 + 4 * 4  # the largest K's probe, refitted on its train + val rows


def test_every_few_shot_method_records_its_choice(feats, tmp_path):
    config = ProbeRunConfig(features=str(feats), out=str(tmp_path / "r"), methods=tuple(FEW_SHOT), train_domains=("photo",),
                            seeds=1, shots=2, grid_size=3, max_iter=60, device="cpu", progress=False)
    report = write_report(tmp_path / "r", run_probe(config, log=lambda m: None))
    chosen = {r["method"]: r["selection"] for r in report["results"]}
    assert {"alpha", "beta"} <= set(chosen["tip-adapter"])
    assert {"alpha", "beta", "selected_epoch"} <= set(chosen["tip-adapter-f?epochs=5"])
    assert {"selected_epoch", "ratio"} <= set(chosen["clip-adapter?epochs=20"])
    assert {"selected_epoch", "alpha"} <= set(chosen["taskres?epochs=20"])
    assert "weight_decay" in chosen["cross-modal"]
    assert {"alpha_mean", "iterations"} <= set(chosen["lp++"]) and {"lambda_mean", "constraint"} <= set(chosen["clap"])
    assert all(r["shots"] == 2 for r in report["results"])
    assert report["protocol"]["val_shots"] == 2
    assert "validation: 2 rows per class" in (tmp_path / "r" / "report.md").read_text()


def test_tip_adapter_refuses_a_cache_model_beyond_few_shot(monkeypatch, feats, tmp_path):
    from vlaug.methods import fewshot

    monkeypatch.setattr(fewshot, "MAX_KEYS", 10)
    with pytest.raises(UsageError, match="--shots"):  # refused before any training
        _plan(feats, tmp_path, ["linear", "tip-adapter"])
    plan = _plan(feats, tmp_path, ["all"])  # under -m all: left out, with the reason
    assert "tip-adapter" not in [m.name for m in plan.methods] and "linear" in [m.name for m in plan.methods]
    assert any(w.startswith("tip-adapter skipped") and "--shots" in w for w in plan.warnings)
    plan = _plan(feats, tmp_path, ["tip-adapter"], shots=1)  # 4 keys + 4 validation rows: fits
    monkeypatch.setattr(fewshot, "MAX_KEYS", 3)
    with pytest.raises(UsageError, match="--shots"):
        plan.methods[0].fit(plan.data, plan.splits[0], 0)
    assert parse_method("tip-adapter?alpha=1&beta=2").options.alpha == 1
    with pytest.raises(UsageError, match="give both"):
        parse_method("tip-adapter?alpha=1")


def test_the_readme_sweep_from_the_command_line(feats, tmp_path):
    from typer.testing import CliRunner

    from vlaug.cli import app

    methods = [a for m in ("zero-shot", "linear", "tip-adapter", "tip-adapter-f", "clip-adapter", "taskres", "cross-modal",
                           "lp++", "clap") for a in ("-m", m)]
    out = tmp_path / "few-shot"
    r = CliRunner().invoke(app, ["probe", str(feats), "--out", str(out), "--train-domain", "photo", "--shots", "1,2,4,8,16",
                                 "--seeds", "1", "--grid-size", "2", "--max-iter", "20", "--device", "cpu", "--no-progress",
                                 *methods])
    assert r.exit_code == 0, r.output
    assert "16-shot:" in r.output and (out / "shots.png").is_file()
    for bad, fix in ((["--shots", "1,x"], "comma-separated"), (["--shots", "2", "--val-shots", "many"], "'all'"),
                     (["--shots", "2,2"], "once"), (["--val-shots", "3"], "belongs to --shots")):
        r = CliRunner().invoke(app, ["probe", str(feats), "--out", str(tmp_path / "bad"), "-m", "zero-shot", *bad])
        assert r.exit_code == 2 and fix in r.output, (bad, r.output)
        assert not (tmp_path / "bad").exists()


def test_a_streamed_cache_gives_the_same_numbers(feats, tmp_path):
    """The few-shot methods read their rows off a cache streamed from disk as from memory."""
    reports = []
    for budget in ("auto", "1K"):
        config = ProbeRunConfig(features=str(feats), out=str(tmp_path / budget), methods=tuple(FEW_SHOT),
                                train_domains=("photo",), seeds=1, shots=3, grid_size=3, max_iter=60, device="cpu",
                                progress=False, memory_budget=budget)
        reports.append(run_probe(config, log=lambda m: None).report)
    assert [r["protocol"]["streamed"] for r in reports] == [False, True]
    for a, b in zip(*(r["results"] for r in reports)):
        assert a["method"] == b["method"]
        assert a["in_domain"] == pytest.approx(b["in_domain"], abs=1e-9) and \
            a["out_of_domain"] == pytest.approx(b["out_of_domain"], abs=1e-9), a["method"]


def test_cross_modals_refits_after_sampled_searches_keep_its_prompt_rows(feats, tmp_path):
    """After searches on samples (--selection-rows), the seeds' refits on every training row
    are one batch over the cache's rows for a method that fits those alone; cross-modal's rows
    hold its class prompts too, so it refits on its own rows."""
    from vlaug.methods.batching import ProbeSolver

    plan = _plan(feats, tmp_path, ["cross-modal"], selection_rows=100)
    method = plan.methods[0]
    assert len(plan.splits[0].train) > 100  # the searches ran on samples
    fits = method.fit_seeds(plan.data, plan.splits, ProbeSolver(plan.data, plan.splits))
    for seed, (split, fit) in enumerate(zip(plan.splits, fits)):
        alone = parse_method("cross-modal").fit(plan.data, split, seed)
        assert fit.selection["n_train_rows"] == len(split.train) + plan.data.n_classes
        assert fit.selection["weight_decay"] == alone.selection["weight_decay"]
        # (the batched refit on the cache's rows alone was 0.3 % away: four prompt rows among 159)
        assert (fit.W - alone.W).norm() <= 1e-4 * alone.W.norm()


@pytest.mark.parametrize("scheme", ["groupdro", "seed-category"])
def test_cross_modal_reweights_its_prompt_rows_as_rows_without_a_domain(feats, tmp_path, scheme):
    """--reweight groups rows by training domain; cross-modal's prompt rows have none (as a
    method's extras): the groups cover every row (groupdro crashed on the extra rows,
    seed-category left their groups uninitialised: fits of the same data differed)."""
    plan = _plan(feats, tmp_path, ["cross-modal"], reweight=scheme, seeds=1)
    method, split = plan.methods[0], plan.splits[0]
    first, again = method.fit(plan.data, split, 0), parse_method("cross-modal").fit(plan.data, split, 0)
    assert first.selection["reweight"]["scheme"] == scheme
    assert torch.equal(first.W, again.W) and first.selection["reweight"] == again.selection["reweight"]


def test_the_domainbed_report_does_not_call_an_adapters_fixed_options_chosen(tmp_path):
    """report.md's line of what each selection chose lists what was searched (a listed
    option's value, the epoch), not the options an adapter only records (its lr)."""
    from vlaug.report import format_markdown

    domains = ("clipart", "painting", "photo", "sketch")
    cache = write_synthetic_cache(tmp_path / "feat", n_per_class=12, d=16, n_classes=3, domains=domains, prompt_sets=())
    config = ProbeRunConfig(features=str(cache), out=str(tmp_path / "r"), methods=("clip-adapter?epochs=3&ratio=0.2,0.6",),
                            seeds=1, device="cpu", progress=False, protocol="leave-one-domain-out", selection="all",
                            test_domains=("photo",))
    md = format_markdown(run_probe(config).report)
    line = next(x for x in md.splitlines() if x.startswith("- `clip-adapter"))
    chose = line.split("test domain photo: ")[1]
    assert "ratio=" in chose and "selected_epoch=" in chose and "lr=" not in chose and "weight_decay=" not in chose


def test_an_adapter_refitted_for_leave_one_domain_out_trains_for_the_mean_of_its_folds_epochs(tmp_path):
    from vlaug import domainbed
    from vlaug.evaluate import _fit_all, _lodo_model

    domains = ("clipart", "painting", "photo", "sketch")
    cache = write_synthetic_cache(tmp_path / "feat", n_per_class=12, d=16, n_classes=3, domains=domains, prompt_sets=())
    plan = prepare(ProbeRunConfig(features=str(cache), out=str(tmp_path / "r"), methods=("clip-adapter?epochs=6",), seeds=1,
                                  device="cpu", progress=False, protocol="leave-one-domain-out",
                                  selection="leave-one-domain-out", test_domains=("photo",)))
    fits = _fit_all(plan, False)
    folds = [i for i, t in enumerate(plan.tasks) if t.role == domainbed.LODO]
    epochs = [fits[i, plan.methods[0].text].selection["selected_epoch"] for i in folds]
    _, fit, _, chosen = _lodo_model(plan.data, plan.methods, fits, [plan.tasks[i] for i in folds], folds, len(plan.tasks))
    assert len(folds) == 3 and chosen["selected_epoch"] == int(round(np.mean(epochs)))
    assert "epochs" not in chosen  # fold 0's own record of its training is not the refit's
