"""CDGA (issue 30): `vlaug generate` on tiny random-weight diffusers pipelines saved as local
folders, the manifest `vlaug embed GEN_DIR` reads, resuming after a kill, and the cdga
probe method's split hygiene."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import make_domain_folder, tiny_config, write_synthetic_cache
from tests.tiny_diffusion import image_variation_pipeline, img2img_pipeline
from vlaug import cache
from vlaug.cli import app
from vlaug.embed import embed_source
from vlaug.errors import UsageError
from vlaug.evaluate import ProbeRunConfig, prepare
from vlaug.generate import GenerateConfig, generate

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cdga")
    src = make_domain_folder(root / "src", domains=("photo", "sketch", "painting"), classes=("cat", "dog"), n=3)
    return root, src, img2img_pipeline(root / "pg"), image_variation_pipeline(root / "ig")


def _config(src, out, model, variant, **kw):
    return GenerateConfig(source=str(src), out=str(out), model=str(model), variant=variant, size=32, device="cpu",
                          progress=False, **{"steps": 2, **kw})


@pytest.mark.parametrize("variant", ["prompt", "image"])
def test_generate_writes_images_and_a_manifest_embed_reads(setup, tmp_path, variant):
    root, src, pg, ig = setup
    out = tmp_path / "gen"
    summary = generate(_config(src, out, pg if variant == "prompt" else ig, variant, train_domains=("photo", "sketch")),
                       log=lambda m: None)
    assert summary["planned"] == summary["generated"] == summary["in_manifest"] == 12  # 6 + 6 images, one each way
    m = pq.read_table(out / "generated.parquet").to_pydict()
    assert sorted(set(m["domain"])) == ["photo→sketch", "sketch→photo"]
    assert all(s.split("/")[0] == d for s, d in zip(m["source_id"], m["source_domain"]))  # the source's own ids
    assert all(f"{a}→{b}" == d for a, b, d in zip(m["source_domain"], m["target_domain"], m["domain"]))
    if variant == "image":  # guided by an image of the target domain, of the same class
        assert all(g.split("/")[0] == t and g.split("/")[1] == c for g, t, c in zip(m["guide_id"], m["target_domain"], m["class"]))
        assert all(p == "" for p in m["prompt"])
    else:
        assert m["prompt"][0] == f"a {m['target_domain'][0]} of a {m['class'][0]}." and not any(m["guide_id"])
    assert all(s is not None and s >= 0 for s in m["seconds"])
    with Image.open(out / m["path"][0]) as im:
        assert im.size == (32, 32)
    again = generate(_config(src, out, pg if variant == "prompt" else ig, variant, train_domains=("photo", "sketch")),
                     log=lambda m: None)
    assert again["generated"] == 0 and again["in_manifest"] == 12  # resumed: nothing left to make
    embed_source(tiny_config(out, tmp_path / "feats"))  # the folder itself: its manifest is found
    cols = cache.read_columns(tmp_path / "feats", ["source_id", "source_domain", "target_domain", "guide_id", "domain"])
    assert sorted(cols["source_id"].tolist()) == sorted(m["source_id"])
    assert set(cols["domain"].tolist()) == {"photo→sketch", "sketch→photo"}


def test_a_rerun_after_a_kill_makes_the_same_images(setup, tmp_path):
    root, src, pg, _ = setup
    whole = tmp_path / "whole"
    generate(_config(src, whole, pg, "prompt", batch_size=1, steps=30), log=lambda m: None)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vlaug", "generate", str(src), "--out", str(out), "--model", str(pg), "--steps", "30",
           "--size", "32", "--device", "cpu", "--batch-size", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    progress = out / "progress.jsonl"
    while time.monotonic() < deadline and (not progress.is_file() or len(progress.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    made = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert 3 <= len(made) < 36 and not list(out.rglob("*.tmp")) and not (out / "generated.parquet").exists()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = (pq.read_table(d / "generated.parquet").to_pydict() for d in (whole, out))
    assert a["path"] == b["path"] and a["seed"] == b["seed"] and len(a["path"]) == 36  # 18 images, each towards 2 domains
    for rel in a["path"]:
        with Image.open(whole / rel) as x, Image.open(out / rel) as y:
            assert np.array_equal(np.asarray(x), np.asarray(y)), rel


def test_bad_input_gets_one_line(setup, tmp_path, monkeypatch):
    root, src, pg, ig = setup
    runner = CliRunner()
    base = ["generate", str(src), "--out", str(tmp_path / "g"), "--steps", "2", "--size", "32", "--device", "cpu", "--no-progress"]
    r = runner.invoke(app, [*base, "--model", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "local diffusers folder" in r.output and not (tmp_path / "g").exists()
    r = runner.invoke(app, [*base, "--model", str(ig), "--variant", "image", "--target-domain", "watercolor"])
    assert r.exit_code == 2 and "--variant prompt" in r.output
    r = runner.invoke(app, [*base, "--model", str(pg), "--size", "30"])
    assert r.exit_code == 2 and "multiple of 8" in r.output
    assert runner.invoke(app, [*base, "--model", str(pg), "--limit", "1"]).exit_code == 0
    r = runner.invoke(app, [*base, "--model", str(pg), "--limit", "1", "--strength", "0.5"])  # other settings: refused
    assert r.exit_code == 2 and "strength" in r.output
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as without the extra
    r = runner.invoke(app, ["generate", str(src), "--out", str(tmp_path / "h"), "--model", str(pg), "--size", "32"])
    assert r.exit_code == 2 and 'pip install -e ".[generate]"' in r.output and not (tmp_path / "h").exists()


def _generated_cache(path, main, rows, targets, guides=None):
    """A generated set's cache written directly: one row per main-cache row of ``rows``, with
    its provenance, an embedding far from every class (so a row that leaks shows)."""
    ids = [i for chunk in cache.iter_ids(main) for i in chunk]
    feats = cache.read_metadata(main)
    n, d = len(rows), feats.manifest.embed_dim
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    doms = feats.domains[rows]
    out = {"id": [f"gen/{i}" for i in range(n)], "path": [f"/g/{i}.png" for i in range(n)],
           "label": feats.labels[rows].tolist(), "class_name": [feats.classes[c] for c in feats.labels[rows]],
           "domain": [f"{a}→{b}" for a, b in zip(doms, targets)], "split": [""] * n,
           "source_id": [ids[r] for r in rows], "source_domain": doms.tolist(), "target_domain": list(targets),
           "guide_id": list(guides) if guides is not None else [""] * n}
    cache.write_part(path, "part-00000.parquet", out, x, "float32")
    m = cache.CacheManifest(model=feats.manifest.model, pretrained=feats.manifest.pretrained, embed_dim=d, dtype="float32",
                            classes=feats.classes, domains=sorted(set(out["domain"])), templates=["a photo of a {}."],
                            prompt_sets={}, parts=["part-00000.parquet"], n_images=n, seed=0, complete=True)
    cache.write_texts(path, {"classes": np.eye(len(feats.classes), d, dtype=np.float32)}, feats.classes)
    cache.write_manifest(path, m)
    return path


def test_cdga_uses_only_rows_made_from_this_fits_training_rows(tmp_path):
    main = write_synthetic_cache(tmp_path / "main", n_per_class=20, d=16, n_classes=3, domains=("photo", "sketch", "art"))
    config = ProbeRunConfig(features=str(main), out=str(tmp_path / "r"), methods=("linear",), train_domains=("photo", "sketch"),
                            seeds=2, grid_size=3, max_iter=60, device="cpu", progress=False)
    s = prepare(config).splits[0]
    every = np.arange(len(cache.read_metadata(main).labels))
    doms = cache.read_metadata(main).domains
    other = {"photo": "sketch", "sketch": "photo", "art": "photo"}
    targets = [other[d] for d in doms[every]]
    targets[int(s.train[0])] = "watercolor"  # towards a domain named by text only
    gen = _generated_cache(tmp_path / "gen", main, every, targets)
    plan = prepare(ProbeRunConfig(**{**config.__dict__, "methods": ("linear", f"cdga:{gen}")}))
    method = plan.methods[1]
    for seed, split in enumerate(plan.splits):
        use, left_out = method.allowed(plan.data, split.train)
        sources = set(use.tolist())  # the generated set's row k was made from main row k
        assert sources <= set(split.train.tolist()) - {int(s.train[0])}
        assert not sources & (set(split.val.tolist()) | set(split.test.tolist()))
        assert len(use) == len(split.train) - 1
        assert left_out["source not a training row"] == len(every) - len(split.train)
        assert left_out["target domain not a training domain"] == 1
        sample = np.asarray(split.train)[::2].copy()  # a sampled search fits on a subset, its rows numbered anew
        on_subset = method.allowed(plan.data.subset(sample), np.arange(len(sample)))
        assert np.array_equal(on_subset[0], method.allowed(plan.data, sample)[0])
    with_text = prepare(ProbeRunConfig(**{**config.__dict__, "methods": (f"cdga:{gen}?text_targets=true",)})).methods[0]
    assert len(with_text.allowed(plan.data, s.train)[0]) == len(s.train)
    # the leaked rows would change the probe: the fit uses exactly the allowed ones
    fit = method.fit(plan.data, plan.splits[0], 0)
    assert fit.selection["n_generated"] == len(plan.splits[0].train) - 1
    assert method.training_rows(plan.data, plan.splits[0].train, 0).n_rows == 2 * len(plan.splits[0].train) - 1


def test_cdga_guides_must_be_training_rows_and_the_model_the_caches(tmp_path):
    main = write_synthetic_cache(tmp_path / "main", n_per_class=20, d=16, n_classes=3, domains=("photo", "sketch"))
    config = ProbeRunConfig(features=str(main), out=str(tmp_path / "r"), methods=("linear",), train_domains=("photo", "sketch"),
                            seeds=1, grid_size=3, max_iter=60, device="cpu", progress=False)
    s = prepare(config).splits[0]
    ids = [i for chunk in cache.iter_ids(main) for i in chunk]
    rows = s.train[:6]
    doms = cache.read_metadata(main).domains
    guides = [ids[int(s.test[0])]] + [ids[int(r)] for r in s.train[6:11]]  # the first guided by a test row
    gen = _generated_cache(tmp_path / "gen", main, rows, ["sketch" if d == "photo" else "photo" for d in doms[rows]], guides)
    plan = prepare(ProbeRunConfig(**{**config.__dict__, "methods": (f"cdga:{gen}",)}))
    use, left_out = plan.methods[0].allowed(plan.data, s.train)
    assert left_out["guide not a training row"] == 1 and len(use) == 5 and 0 not in use
    other = write_synthetic_cache(tmp_path / "other", model="another", n_per_class=5, d=16, n_classes=3)
    with pytest.raises(UsageError, match="embed the generated folder with the cache's --model"):
        prepare(ProbeRunConfig(**{**config.__dict__, "methods": (f"cdga:{other}",)}))
    with pytest.raises(UsageError, match="cdga:GEN_FEATURES"):
        prepare(ProbeRunConfig(**{**config.__dict__, "methods": ("cdga",)}))
    report_all = prepare(ProbeRunConfig(**{**config.__dict__, "methods": ("all",)}))
    assert any(w.startswith("cdga skipped") for w in report_all.warnings)


def test_generate_embed_probe_from_the_command_line(setup, tmp_path):
    """The README's recipe on the tiny pipeline: generate → embed → probe -m cdga:..."""
    root, src, pg, _ = setup
    runner = CliRunner()
    for args in (["generate", str(src), "--out", str(tmp_path / "gen"), "--model", str(pg), "--steps", "2", "--size", "32",
                  "--device", "cpu", "--no-progress"],
                 ["embed", str(src), "--out", str(tmp_path / "feats"), "--model", "vlaug-tiny", "--pretrained", "none",
                  "--workers", "0", "--no-progress"],
                 ["embed", str(tmp_path / "gen"), "--out", str(tmp_path / "gfeats"), "--model", "vlaug-tiny", "--pretrained",
                  "none", "--workers", "0", "--no-progress"],
                 ["probe", str(tmp_path / "feats"), "--out", str(tmp_path / "rep"), "--train-domain", "photo",
                  "--train-domain", "sketch", "-m", "linear", "-m", f"cdga:{tmp_path / 'gfeats'}", "--seeds", "1",
                  "--grid-size", "2", "--device", "cpu", "--no-progress"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, (args[0], r.output)
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    chosen = next(x["selection"] for x in report["results"] if x["method"].startswith("cdga"))
    # 6 photo + 6 sketch + 6 painting sources, each towards the two others: 36 generated rows, of which those
    # made from this seed's photo and sketch training rows, towards photo or sketch, are used
    assert chosen["n_generated"] > 0 and chosen["n_generated"] + sum(chosen["generated_left_out"].values()) == 36
    assert chosen["generated_left_out"]["target domain not a training domain"] > 0
