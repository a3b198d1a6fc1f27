"""A researcher's workflow around the cache, through the CLI: new prompts without
re-embedding, incomplete caches, sources and --append, unlabeled images and class order."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.conftest import make_class_folder, make_domain_folder, write_image
from vlaug import cache
from vlaug.cli import app
from vlaug.errors import IncompleteCacheError

runner = CliRunner()
TINY = ["--model", "vlaug-tiny", "--pretrained", "none", "--workers", "0", "--no-progress", "--batch-size", "4"]
FAST_PROBE = ["--seeds", "1", "--grid-size", "1", "--max-iter", "10", "--device", "cpu", "--no-progress"]


def _embed(src, out, *extra):
    r = runner.invoke(app, ["embed", str(src), "--out", str(out), *TINY, *extra])
    assert r.exit_code == 0, r.output
    return r


def _one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def _images_snapshot(out):
    return {f.name: f.read_bytes() for f in sorted((out / "images").iterdir())}


# ----------------------------------------------------------------------------- vlaug prompts


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    return make_domain_folder(root / "src", domains=("photo", "sketch"), classes=("cat", "dog"), n=4)


def test_prompts_adds_sets_without_touching_images_and_match_embed(domains, tmp_path):
    out, ref = tmp_path / "feat", tmp_path / "ref"
    _embed(domains, out)
    _embed(domains, ref, "--prompt-set", "photo=a photo of a {}.", "--prompt-set", "sketch=a sketch of a {}.")
    images = _images_snapshot(out)
    r = runner.invoke(app, ["prompts", str(out), "--prompt-set", "photo=a photo of a {}.",
                            "--prompt-set", "sketch=a sketch of a {}.", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "added photo, sketch" in r.stdout and "images untouched" in r.stdout
    assert _images_snapshot(out) == images
    got, want = cache.read_cache(out), cache.read_cache(ref)
    assert list(got.texts) == ["classes", "photo", "sketch"]
    for name in want.texts:  # the same text tower as embed's (same model, weights, seed)
        np.testing.assert_allclose(got.texts[name], want.texts[name], atol=1e-6)
    assert cache.read_manifest(out).prompt_sets == {"photo": ["a photo of a {}."], "sketch": ["a sketch of a {}."]}
    # the same again changes nothing; resuming embed keeps the cache's texts (no --templates needed)
    r = runner.invoke(app, ["prompts", str(out), "--prompt-set", "photo=a photo of a {}.", "--device", "cpu"])
    assert r.exit_code == 0 and "unchanged photo" in r.stdout
    r = _embed(domains, out)
    assert "embedded 0, skipped 16" in r.stdout
    np.testing.assert_array_equal(cache.read_cache(out).texts["sketch"], got.texts["sketch"])
    _embed(domains, out, "--prompt-set", "clipart=a clipart of a {}.")  # a new set on resume: encoded, the rest kept
    again = cache.read_cache(out)
    assert list(again.texts) == ["classes", "photo", "sketch", "clipart"]
    np.testing.assert_array_equal(again.texts["photo"], got.texts["photo"])
    assert _images_snapshot(out) == images
    # changing texts through embed is refused and points to vlaug prompts
    r = runner.invoke(app, ["embed", str(domains), "--out", str(out), *TINY, "--templates", "photo"])
    _one_line_error(r, "templates: cache has", "vlaug prompts")


def test_heads_refuse_a_cache_whose_prompt_sets_changed(domains, tmp_path):
    out = tmp_path / "feat"
    _embed(domains, out, "--prompt-set", "photo=a photo of a {}.", "--prompt-set", "sketch=a sketch of a {}.")
    common = ["--epochs", "2", "--device", "cpu", "--no-progress", "--train-domain", "photo"]
    r = runner.invoke(app, ["train-box", str(out), "--out", str(tmp_path / "lads"), "--head", "lads",
                            "--source-prompts", "photo", "--target-prompts", "sketch", *common])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train-box", str(out), "--out", str(tmp_path / "dr"), "--head", "dr-sa", *common])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "lads" / "config.json").read_text())
    assert config["cache"]["texts"] == {"classes": cache.read_manifest(out).templates, "photo": ["a photo of a {}."],
                                        "sketch": ["a sketch of a {}."]}
    assert json.loads((tmp_path / "dr" / "config.json").read_text())["cache"]["texts"] == {}

    r = runner.invoke(app, ["prompts", str(out), "--prompt-set", "sketch=a pencil sketch of a {}.", "--device", "cpu"])
    assert r.exit_code == 0 and "replaced sketch" in r.stdout
    probe = ["probe", str(out), "--train-domain", "photo", *FAST_PROBE]
    r = runner.invoke(app, [*probe, "--out", str(tmp_path / "rep"), "-m", f"lads:{tmp_path / 'lads'}"])
    _one_line_error(r, "prompt set 'sketch'", "changed since head", "a pencil sketch")
    assert not (tmp_path / "rep").exists()
    r = runner.invoke(app, [*probe, "--out", str(tmp_path / "rep"), "-m", f"dr:{tmp_path / 'dr'}"])  # uses no prompt
    assert r.exit_code == 0, r.output


def test_prompts_bad_input(domains, tmp_path):
    out = tmp_path / "feat"
    _embed(domains, out)
    before = (out / "manifest.json").read_text(), (out / "texts.parquet").read_bytes()
    cases = [
        (["prompts", str(out)], "nothing to change"),
        (["prompts", str(out), "--prompt-set", "x=no placeholder"], "has no '{}'"),
        (["prompts", str(out), "--prompt-set", "x=a {}", "--model", "vlaug-tiny-coca"], "same model"),
        (["prompts", str(out), "--prompt-set", "x=a {}", "--pretrained", "laion2b_s34b_b79k"], "Leave out --pretrained"),
        (["prompts", str(tmp_path / "nowhere"), "--prompt-set", "x=a {}"], "not a vlaug feature cache"),
    ]
    for args, needle in cases:
        _one_line_error(runner.invoke(app, args), needle)
    assert ((out / "manifest.json").read_text(), (out / "texts.parquet").read_bytes()) == before


def test_prompts_finds_a_moved_checkpoint_by_its_hash(tmp_path):
    import open_clip
    import torch

    import vlaug.encoders  # noqa: F401  (registers vlaug-tiny)

    src = make_class_folder(tmp_path / "src", n=2)
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("vlaug-tiny").state_dict(), weights)
    out = tmp_path / "feat"
    args = ["--model", "vlaug-tiny", "--pretrained", str(weights), "--workers", "0", "--no-progress"]
    r = runner.invoke(app, ["embed", str(src), "--out", str(out), *args])
    assert r.exit_code == 0, r.output
    moved = tmp_path / "elsewhere.pt"
    shutil.move(weights, moved)
    _one_line_error(runner.invoke(app, ["prompts", str(out), "--prompt-set", "x=a {}"]), "not there any more",
                    "--pretrained PATH")
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    torch.save(open_clip.create_model("vlaug-tiny").state_dict(), other)
    _one_line_error(runner.invoke(app, ["prompts", str(out), "--prompt-set", "x=a {}", "--pretrained", str(other)]),
                    "is not the checkpoint", "sha256")
    r = runner.invoke(app, ["prompts", str(out), "--prompt-set", "x=a {}", "--pretrained", str(moved), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "x" in cache.read_cache(out).texts


# ----------------------------------------------------------------------------- caches say what they hold


def _interrupt(out, keep_parts):
    """Make a finished cache look like one whose embed run stopped after ``keep_parts`` parts."""
    m = cache.read_manifest(out)
    dropped = m.parts[keep_parts:]
    m.parts = m.parts[:keep_parts]
    m.n_images = sum(pq.read_metadata(out / "images" / p).num_rows for p in m.parts)
    m.complete = False
    cache.write_manifest(out, m)
    for p in dropped:
        (out / "images" / p).unlink()


def test_incomplete_cache_is_refused_unless_allowed_and_the_report_says_so(tmp_path):
    src = make_class_folder(tmp_path / "src", classes=("ant", "bee", "cat", "dog"), n=6)
    out = tmp_path / "feat"
    _embed(src, out, "--part-size", "6")  # one part per class
    _interrupt(out, keep_parts=2)  # cat and dog never embedded
    with pytest.raises(IncompleteCacheError, match="12 of 24 inputs embedded"):
        cache.read_cache(out)
    assert len(cache.read_cache(out, allow_incomplete=True)) == 12
    r = runner.invoke(app, ["train-box", str(out), "--out", str(tmp_path / "box"), "--epochs", "2", "--no-progress"])
    _one_line_error(r, "is incomplete", "--allow-incomplete", "Re-run the same vlaug embed command")
    r = runner.invoke(app, ["probe", str(out), "--out", str(tmp_path / "rep"), "-m", "linear", *FAST_PROBE])
    _one_line_error(r, "is incomplete")
    assert not (tmp_path / "rep").exists() and not (tmp_path / "box").exists()

    r = runner.invoke(app, ["train-box", str(out), "--out", str(tmp_path / "box"), "--epochs", "2", "--no-progress",
                            "--device", "cpu", "--allow-incomplete"])
    assert r.exit_code == 0, r.output
    assert "2 of 4 classes have no training rows: cat, dog" in r.stderr
    info = runner.invoke(app, ["info", str(tmp_path / "box")]).stdout
    assert "WARNING      trained on an incomplete cache (--allow-incomplete), no training rows for cat, dog" in info
    assert "prompt sets  classes (7 templates)" in info
    r = runner.invoke(app, ["probe", str(out), "--out", str(tmp_path / "rep"), "-m", "linear", *FAST_PROBE,
                            "--allow-incomplete"])
    assert r.exit_code == 0, r.output
    assert "WARNING: INCOMPLETE CACHE" in r.stderr
    md = (tmp_path / "rep" / "report.md").read_text().splitlines()
    assert md[2].startswith("> **Warning: INCOMPLETE CACHE") and "12 of 24 inputs" in md[2]
    assert any("2 of 4 classes have no training rows (seed 0): cat, dog" in line for line in md[:8])
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["incomplete_cache"] is True and len(report["warnings"]) == 2
    r = runner.invoke(app, ["info", str(out)])
    assert "INCOMPLETE (12 of 24 inputs not reached)" in r.stdout and "--allow-incomplete" in r.stdout


def test_another_source_needs_append(tmp_path):
    a = make_class_folder(tmp_path / "a", classes=("cat", "dog"), n=2)
    b = make_class_folder(tmp_path / "b", classes=("dog",), n=3, suffix=".jpg")
    clash = make_class_folder(tmp_path / "c", classes=("cat",), n=1)  # cat/000.png, as in a
    out = tmp_path / "feat"
    _embed(a, out)
    before = (out / "manifest.json").read_text()
    r = runner.invoke(app, ["embed", str(b), "--out", str(out), *TINY])
    _one_line_error(r, f"cache holds images of {a.resolve()} (class layout)", f"this run reads {b.resolve()}", "--append")
    _one_line_error(runner.invoke(app, ["embed", str(clash), "--out", str(out), *TINY, "--append"]),
                    "already in", "'cat/000.png'")
    other = make_class_folder(tmp_path / "d", classes=("fox",), n=1)
    _one_line_error(runner.invoke(app, ["embed", str(other), "--out", str(out), *TINY, "--append"]), "classes ['fox']")
    write_image(tmp_path / "flat" / "x.png", 5)
    _one_line_error(runner.invoke(app, ["embed", str(tmp_path / "flat"), "--out", str(out), *TINY, "--append"]),
                    "has labels and", "has none")
    assert (out / "manifest.json").read_text() == before
    r = _embed(b, out, "--append")
    assert "embedded 3, skipped 0" in r.stdout
    m = cache.read_manifest(out)
    assert m.sources == [{"source": str(a.resolve()), "layout": "class"}, {"source": str(b.resolve()), "layout": "class"}]
    assert m.complete and m.n_inputs == 7 and m.classes == ["cat", "dog"]
    c = cache.read_cache(out)
    assert c.labels[[c.ids.index("dog/000.jpg")]].tolist() == [1]  # labels in the cache's class order
    assert "embedded 0, skipped 4" in _embed(a, out).stdout  # each recorded source resumes without --append
    write_image(b / "dog" / "new.jpg", 77)
    assert "embedded 1, skipped 3" in _embed(b, out).stdout
    c = cache.read_cache(out)
    assert c.labels[[c.ids.index("dog/new.jpg")]].tolist() == [1] and len(c) == 8
    info = runner.invoke(app, ["info", str(out)]).stdout
    assert f"source       {a.resolve()} (class layout)\nappended     {b.resolve()} (class layout)" in info


def test_embed_prints_what_it_found_and_stores_a_missing_split_as_null(domains, tmp_path):
    r = _embed(domains, tmp_path / "feat")
    assert f"source {domains.resolve()}: layout domain-class (detected); 16 images, 2 classes (cat, dog), " \
           "2 domains (photo, sketch)" in r.stderr
    split = pq.read_table(tmp_path / "feat" / "images", columns=["split"]).column("split")
    assert split.null_count == 16
    assert cache.read_cache(tmp_path / "feat").splits.tolist() == [""] * 16  # read back as no split


# ----------------------------------------------------------------------------- images without labels


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("labeled")
    src = make_domain_folder(root / "src", domains=("photo", "sketch"), classes=("cat", "dog", "fox"), n=4)
    _embed(src, root / "feat")
    r = runner.invoke(app, ["probe", str(root / "feat"), "--out", str(root / "rep"), "-m", "linear", *FAST_PROBE])
    assert r.exit_code == 0, r.output
    return root


def test_predict_on_unlabeled_images(probe_dir, tmp_path):
    for k in range(3):
        write_image(tmp_path / "new" / f"img{k}.png", 50 + k)
    manifest = tmp_path / "paths.csv"
    manifest.write_text("path\nnew/img0.png\nnew/img1.png\n")
    for src, n in ((tmp_path / "new", 3), (manifest, 2)):
        out = tmp_path / f"feat-{n}"
        r = _embed(src, out)
        assert "no labels" in r.stderr
        assert cache.read_manifest(out).classes == [] and not (out / "texts.parquet").exists()
        assert "classes      none: unlabeled images" in runner.invoke(app, ["info", str(out)]).stdout
        r = runner.invoke(app, ["predict", str(out), "--probe", str(probe_dir / "rep" / "probes" / "linear"),
                                "--out", str(tmp_path / f"pred-{n}.parquet"), "--device", "cpu"])
        assert r.exit_code == 0, r.output
        assert f"predicted {n} rows" in r.stdout and "the cache has no labels" in r.stdout and "agreement" not in r.stdout
        table = pq.read_table(tmp_path / f"pred-{n}.parquet")
        assert table.column_names == ["id", "path", "label", "class_name", "probabilities"]
        assert set(table.column("class_name").to_pylist()) <= {"cat", "dog", "fox"}
        assert table.column("path").to_pylist()[0] == str((tmp_path / "new" / "img0.png").resolve())
    r = runner.invoke(app, ["train-box", str(tmp_path / "feat-3"), "--out", str(tmp_path / "h"), "--no-progress"])
    _one_line_error(r, "has no labels", "vlaug predict")


def test_predict_maps_classes_by_name_and_refuses_another_class_set(probe_dir, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("fox\ncat\ndog\n")
    reordered = tmp_path / "reordered"
    _embed(probe_dir / "src", reordered, "--classes", str(classes))
    probe = str(probe_dir / "rep" / "probes" / "linear")
    preds = {}
    for name, feats in (("same", probe_dir / "feat"), ("reordered", reordered)):
        r = runner.invoke(app, ["predict", str(feats), "--probe", probe, "--out", str(tmp_path / f"{name}.parquet"),
                                "--device", "cpu"])
        assert r.exit_code == 0, r.output
        assert ("mapped by name" in r.stdout) == (name == "reordered")
        t = pq.read_table(tmp_path / f"{name}.parquet").to_pylist()
        preds[name] = {row["id"]: row for row in t}
    assert r.stdout.count("agreement with the cache's labels") == 1
    for i, row in preds["same"].items():
        other = preds["reordered"][i]
        assert other["class_name"] == row["class_name"]
        assert other["label"] == ["fox", "cat", "dog"].index(row["class_name"])
        np.testing.assert_allclose([other["probabilities"][k] for k in (1, 2, 0)], row["probabilities"], atol=1e-6)
    # a head (here: a box head) on a cache with its classes in another order: mapped by name, and the report says so
    head = tmp_path / "box"
    r = runner.invoke(app, ["train-box", str(probe_dir / "feat"), "--out", str(head), "--epochs", "2", "--device", "cpu",
                            "--no-progress", "--train-domain", "photo"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["probe", str(reordered), "--out", str(tmp_path / "rep"), "-m", f"box:{head}", "--train-domain",
                            "photo", *FAST_PROBE])
    assert r.exit_code == 0, r.output
    assert "lists the cache's classes in another order; they are mapped by name" in r.stderr
    assert "mapped by name" in (tmp_path / "rep" / "report.md").read_text().splitlines()[2]
    subset = make_class_folder(tmp_path / "subset", classes=("cat", "dog", "owl"), n=1)
    _embed(subset, tmp_path / "sub")
    r = runner.invoke(app, ["predict", str(tmp_path / "sub"), "--probe", probe, "--out", str(tmp_path / "x.parquet")])
    _one_line_error(r, "only in the head: ['fox']", "only in the cache: ['owl']")
    assert not (tmp_path / "x.parquet").exists()


# ----------------------------------------------------------------------------- messages


def test_small_budgets_are_shown_in_kib_and_mib(tmp_path):
    from tests.conftest import write_synthetic_cache
    from vlaug.cache.budget import format_size

    feats = write_synthetic_cache(tmp_path / "feat", n_per_class=10, d=32, n_classes=4)
    r = runner.invoke(app, ["train-box", str(feats), "--out", str(tmp_path / "box"), "--epochs", "1", "--device", "cpu",
                            "--no-progress", "--memory-budget", "2K"])
    assert r.exit_code == 0, r.output
    assert "in memory they would need about 30 KiB, more than --memory-budget 2K (2 KiB)" in r.stderr  # 3 x 80 x 32 x 4 B
    r = runner.invoke(app, ["probe", str(feats), "--out", str(tmp_path / "rep"), "-m", "mixup", *FAST_PROBE,
                            "--memory-budget", "2K"])
    need = cache.plan_memory(cache.read_manifest(feats), "2K", resident=True).need
    _one_line_error(r, f"about {format_size(need)}, more than --memory-budget 2K")
    assert "GiB" not in r.stderr and format_size(2048) == "2 KiB" and format_size(3 * 2**30 // 2) == "1.5 GiB"


def test_usage_lines_have_no_braces_and_flags_no_bool_metavar():
    for command, arg in (("embed", "SOURCE"), ("prompts", "FEATURES"), ("train-box", "FEATURES"), ("probe", "FEATURES"),
                         ("predict", "FEATURES"), ("info", "PATH")):
        r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0
        assert f"Usage: vlaug {command} [OPTIONS] {arg}" in r.stdout and "{" not in r.stdout.splitlines()[1]
        assert "<bool>" not in r.stdout
    assert "--append" in runner.invoke(app, ["embed", "--help"], env={"COLUMNS": "200"}).stdout


def test_xdomain_mix_with_one_training_domain_says_so(tmp_path):
    from tests.conftest import write_synthetic_cache

    feats = write_synthetic_cache(tmp_path / "feat", n_per_class=10, d=16, n_classes=3)
    for domains, warned in ((["photo"], True), (["photo", "sketch"], False)):
        out = tmp_path / f"rep{len(domains)}"
        args = ["probe", str(feats), "--out", str(out), "-m", "xdomain-mix", *FAST_PROBE]
        for d in domains:
            args += ["--train-domain", d]
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        line = "xdomain-mix: one training domain (photo), so it mixes rows of the same class within that domain"
        assert (line in r.stderr) == warned
        assert any(line in w for w in json.loads((out / "report.json").read_text())["warnings"]) == warned


def test_other_parquet_readers_read_images_not_the_cache_folder(tmp_path):
    """What the README says of other readers (pandas' read_parquet uses pyarrow's dataset reader)."""
    import pyarrow as pa

    from tests.conftest import write_synthetic_cache

    feats = write_synthetic_cache(tmp_path / "feat", n_per_class=5, d=8, n_classes=2)
    table = pq.read_table(feats / "images")
    assert table.num_rows == 20 and table.column_names[:6] == ["id", "path", "label", "class_name", "domain", "split"]
    with pytest.raises(pa.ArrowInvalid, match="manifest.json"):
        pq.read_table(feats)
