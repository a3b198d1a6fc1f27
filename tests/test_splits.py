"""One held-out test split for every stage: heads and probes never see a test row or a
test domain, and a head that did is refused."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.conftest import write_synthetic_cache
from vlaug import cache
from vlaug.cli import app
from vlaug.protocols import id_fractions

runner = CliRunner()
COMMON = ["--device", "cpu", "--no-progress"]


def _copy_with_noise_on(src, dst, rows):
    """The cache ``src`` written again to ``dst`` with the embeddings of ``rows`` replaced by noise."""
    feats = cache.read_cache(src)
    x = feats.embeddings.copy()
    noise = np.random.default_rng(0).standard_normal((len(rows), x.shape[1])).astype(np.float32)
    x[rows] = noise / np.linalg.norm(noise, axis=1, keepdims=True)
    columns = {"id": feats.ids, "path": feats.paths, "label": feats.labels.tolist(), "domain": feats.domains.tolist(),
               "class_name": [feats.classes[c] for c in feats.labels], "split": feats.splits.tolist()}
    cache.write_part(dst, "part-00000.parquet", columns, x, "float32")
    cache.write_texts(dst, feats.texts, feats.classes)
    cache.write_manifest(dst, feats.manifest)
    return dst


def _train_and_probe(feats, root):
    r = runner.invoke(app, ["train-box", str(feats), "--out", str(root / "box"), "--epochs", "4", "--train-domain", "photo",
                            *COMMON])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["probe", str(feats), "--out", str(root / "rep"), "--train-domain", "photo", "--seeds", "2",
                            "--grid-size", "2", "--max-iter", "20", "-m", "linear", "-m", f"box:{root / 'box'}", *COMMON])
    assert r.exit_code == 0, r.output
    report = json.loads((root / "rep" / "report.json").read_text())
    weights = [load_file(str(root / "rep" / d / "model.safetensors")) for d in report["probe_dirs"].values()]
    return load_file(str(root / "box" / "model.safetensors")), report, weights


def test_no_test_row_or_test_domain_reaches_a_head_or_a_probe(tmp_path):
    clean = write_synthetic_cache(tmp_path / "clean", n_per_class=25, d=16, n_classes=3)
    feats = cache.read_cache(clean)
    test = np.flatnonzero((feats.domains != "photo") | (id_fractions(feats.ids) < 0.2))
    assert 0 < (feats.domains[test] == "photo").sum() < (feats.domains == "photo").sum()
    noisy = _copy_with_noise_on(clean, tmp_path / "noisy", test)
    head_a, report_a, probes_a = _train_and_probe(clean, tmp_path / "a")
    head_b, report_b, probes_b = _train_and_probe(noisy, tmp_path / "b")
    # replacing every test row (in domain and out of domain) by noise changes nothing that was fitted
    assert all(np.array_equal(head_a[k].numpy(), head_b[k].numpy()) for k in head_a)
    for a, b in zip(probes_a, probes_b, strict=True):
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert [r["selection"] for r in report_a["results"]] == [r["selection"] for r in report_b["results"]]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "method"} for r in rows]  # noqa: E731
    assert strip(report_a["feature_geometry"]) == strip(report_b["feature_geometry"])
    assert report_a["results"] != report_b["results"]  # ... while the test rows themselves did change
    sizes = report_a["protocol"]["splits"]
    assert sizes[0]["test_in"] == sizes[1]["test_in"] == (feats.domains[test] == "photo").sum()  # fixed across seeds
    assert "held-out test rows" in (tmp_path / "a" / "rep" / "report.md").read_text()


@pytest.mark.parametrize("train_args, match", [
    ([], "include this probe's out-of-domain test domains ['sketch']"),
    (["--train-domain", "photo", "--test-fraction", "0.1"], "train it with vlaug train-box --test-fraction 0.2 "
                                                              "--probe-val-fraction 0.2"),
    (["--train-domain", "photo", "--probe-val-fraction", "0.1"], "of this probe's validation rows"),
    (["--train-domain", "photo", "--test-fraction", "0.05", "--probe-val-fraction", "0.05"],
     "of this probe's held-out test rows"),
])
def test_a_head_that_saw_test_rows_is_refused(tmp_path, train_args, match):
    feats = write_synthetic_cache(tmp_path / "feat", n_per_class=25, d=16, n_classes=3)
    r = runner.invoke(app, ["train-box", str(feats), "--out", str(tmp_path / "box"), "--epochs", "2", *train_args, *COMMON])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["probe", str(feats), "--out", str(tmp_path / "rep"), "--train-domain", "photo", "--seeds", "1",
                            "-m", f"box:{tmp_path / 'box'}", *COMMON])
    assert r.exit_code == 2 and match in r.stderr and r.stderr.count("\n") == 1, r.output
    assert not (tmp_path / "rep").exists()
    config = json.loads((tmp_path / "box" / "config.json").read_text())
    del config["training"]["test_fraction"]  # as an older vlaug wrote it
    (tmp_path / "box" / "config.json").write_text(json.dumps(config))
    r = runner.invoke(app, ["probe", str(feats), "--out", str(tmp_path / "rep"), "--train-domain", "photo", "--seeds", "1",
                            "-m", f"box:{tmp_path / 'box'}", *COMMON])
    assert r.exit_code == 2 and "did not hold out the probe's test rows" in r.stderr


def test_no_validation_row_reaches_a_head(tmp_path):
    """The rows any probe seed validates on are fixed by their ids and held out by
    train-box: replacing every one of them by noise leaves the head (weights, history, kept
    epoch) unchanged, and the probe accepts it (issue 27, item 4). The probe's own selections
    do read those rows: that is what they are for."""
    from vlaug.evaluate import ProbeRunConfig, prepare

    clean = write_synthetic_cache(tmp_path / "clean", n_per_class=25, d=16, n_classes=3)
    config = ProbeRunConfig(features=str(clean), out=str(tmp_path / "never"), methods=("linear",), seeds=3,
                            train_domains=("photo",), device="cpu", progress=False)
    vals = [s.val for s in prepare(config).splits]
    assert all(np.array_equal(vals[0], v) for v in vals) and len(vals[0])
    noisy = _copy_with_noise_on(clean, tmp_path / "noisy", vals[0])
    heads = []
    for name, feats in (("a", clean), ("b", noisy)):
        out = tmp_path / name / "box"
        r = runner.invoke(app, ["train-box", str(feats), "--out", str(out), "--epochs", "4", "--train-domain", "photo",
                                *COMMON])
        assert r.exit_code == 0, r.output
        heads.append((load_file(str(out / "model.safetensors")), json.loads((out / "config.json").read_text())))
    (a, config_a), (b, config_b) = heads
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert config_a["history"] == config_b["history"] and config_a["selected_epoch"] == config_b["selected_epoch"]
    r = runner.invoke(app, ["probe", str(noisy), "--out", str(tmp_path / "rep"), "--train-domain", "photo", "--seeds", "3",
                            "--grid-size", "2", "--max-iter", "20", "-m", f"box:{tmp_path / 'b' / 'box'}", *COMMON])
    assert r.exit_code == 0, r.output
