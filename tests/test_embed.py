import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_class_folder, tiny_config, write_image
from vlaug import cache
from vlaug.embed import EmbedConfig, embed_source
from vlaug.errors import CacheMismatchError, EncoderError, IncompleteCacheError, SourceError, UsageError

DESIGN_KEYS = {
    "format_version", "vlaug_version", "model", "pretrained", "embed_dim", "dtype", "normalized", "classes",
    "domains", "templates", "prompt_sets", "n_images", "n_failed", "created", "parts",
}


def _by_id(c):
    order = np.argsort(c.ids)
    return [c.ids[i] for i in order], c.embeddings[order], c.labels[order]


def test_embed_class_folder(class_folder, tmp_path):
    out = tmp_path / "feat"
    result = embed_source(tiny_config(class_folder, out, part_size=5, prompt_sets=("sketch=a sketch of a {}.",)))
    assert (result.n_embedded, result.n_skipped, result.n_failed) == (12, 0, 0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert DESIGN_KEYS <= set(manifest)
    assert manifest["parts"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert manifest["n_images"] == 12 and manifest["complete"] and manifest["embed_dim"] == 64
    assert manifest["prompt_sets"] == {"sketch": ["a sketch of a {}."]}
    c = cache.read_cache(out)
    assert sorted(c.ids) == sorted(f"{k}/{i:03d}.png" for k in ("cat", "dog", "fox") for i in range(4))
    assert [c.classes[label] for label in c.labels] == [i.split("/")[0] for i in c.ids]
    np.testing.assert_allclose(np.linalg.norm(c.embeddings, axis=1), 1.0, atol=1e-5)
    assert set(c.texts) == {"classes", "sketch"} and c.texts["classes"].shape == (3, 64)
    assert not (out / "failed.parquet").exists()
    assert not cache.unfinished_files(out)


def test_manifest_source_gives_the_folder_run_embeddings(tmp_path):
    root = tmp_path / "src"
    for d in ("photo", "sketch"):
        for c in ("a", "b"):
            write_image(root / d / c / "0.png", seed=zlib.crc32(f"{d}/{c}".encode()) % 1000)
    embed_source(tiny_config(root, tmp_path / "folder"))
    rows = ["path,class,domain,split"] + [f"{d}/{c}/0.png,{c},{d},{'test' if d == 'sketch' else 'train'}"
                                         for d in ("photo", "sketch") for c in ("a", "b")]
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    embed_source(tiny_config(root / "m.csv", tmp_path / "manifest"))
    a, b = cache.read_cache(tmp_path / "folder"), cache.read_cache(tmp_path / "manifest")
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert a.domains.tolist() == b.domains.tolist() == ["photo", "photo", "sketch", "sketch"]
    assert b.splits.tolist() == ["train", "train", "test", "test"] and set(a.splits) == {""}


def test_workers_give_the_same_rows(class_folder, tmp_path):
    embed_source(tiny_config(class_folder, tmp_path / "w0", workers=0))
    embed_source(tiny_config(class_folder, tmp_path / "w2", workers=2))
    a, b = cache.read_cache(tmp_path / "w0"), cache.read_cache(tmp_path / "w2")
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.embeddings, b.embeddings)


def test_bad_files_are_recorded_and_the_rest_embedded(class_folder, tmp_path):
    good = (class_folder / "cat" / "000.png").read_bytes()
    (class_folder / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (class_folder / "dog" / "empty.jpg").write_bytes(b"")
    (class_folder / "dog" / "text.jpg").write_text("this is not an image")
    missing = tmp_path / "m.csv"
    missing.write_text(f"path,class\n{class_folder / 'cat' / '000.png'},cat\nnowhere.png,cat\n")

    out = tmp_path / "feat"
    result = embed_source(tiny_config(class_folder, out))
    assert (result.n_embedded, result.n_failed) == (12, 3)
    failed = {f["id"]: f["error"] for f in cache.read_failed(out)}
    assert set(failed) == {"cat/truncated.png", "dog/empty.jpg", "dog/text.jpg"}
    assert all("\n" not in e and e for e in failed.values())
    assert "truncated" in failed["cat/truncated.png"]
    assert len(cache.read_cache(out)) == 12
    assert json.loads((out / "manifest.json").read_text())["n_failed"] == 3

    result = embed_source(tiny_config(missing, tmp_path / "feat2"))
    assert result.n_failed == 1 and cache.read_failed(tmp_path / "feat2")[0]["id"] == "nowhere.png"


def test_rerun_is_a_no_op_and_fixed_files_are_retried(class_folder, tmp_path):
    out = tmp_path / "feat"
    (class_folder / "cat" / "bad.png").write_bytes(b"junk")
    embed_source(tiny_config(class_folder, out))
    again = embed_source(tiny_config(class_folder, out))
    assert (again.n_embedded, again.n_skipped, again.n_failed) == (0, 12, 1)
    write_image(class_folder / "cat" / "bad.png", 7)  # the user repairs the file
    fixed = embed_source(tiny_config(class_folder, out))
    assert (fixed.n_embedded, fixed.n_skipped, fixed.n_failed) == (1, 12, 0)
    assert len(cache.read_cache(out)) == 13 and not (out / "failed.parquet").exists()


def test_new_images_are_added_on_rerun(class_folder, tmp_path):
    out = tmp_path / "feat"
    embed_source(tiny_config(class_folder, out))
    write_image(class_folder / "fox" / "new.png", 99)
    result = embed_source(tiny_config(class_folder, out))
    assert (result.n_embedded, result.n_skipped) == (1, 12)
    assert "fox/new.png" in cache.read_cache(out).ids


def test_cache_of_other_settings_is_refused_then_overwritten(class_folder, tmp_path):
    out = tmp_path / "feat"
    embed_source(tiny_config(class_folder, out, templates="photo"))
    before = (out / "manifest.json").read_text()
    with pytest.raises(CacheMismatchError, match=r"templates: cache has \['a photo of a \{\}.'\].*--overwrite"):
        embed_source(tiny_config(class_folder, out, templates="simple"))
    with pytest.raises(CacheMismatchError, match="seed of the random weights"):
        embed_source(tiny_config(class_folder, out, templates="photo", seed=3))
    with pytest.raises(CacheMismatchError, match="model: cache has 'vlaug-tiny'"):
        embed_source(tiny_config(class_folder, out, templates="photo", model="vlaug-tiny-coca"))
    assert (out / "manifest.json").read_text() == before
    (out / "notes.txt").write_text("mine")
    result = embed_source(tiny_config(class_folder, out, templates="simple", overwrite=True))
    assert result.n_embedded == 12
    assert cache.read_manifest(out).templates[0] == "itap of a {}."
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only the cache's own files


def test_same_seed_same_features_float16(class_folder, tmp_path):
    embed_source(tiny_config(class_folder, tmp_path / "a", dtype="float16"))
    embed_source(tiny_config(class_folder, tmp_path / "b", dtype="float16"))
    for part in ("part-00000.parquet",):
        assert (tmp_path / "a" / "images" / part).read_bytes() == (tmp_path / "b" / "images" / part).read_bytes()


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(source="MISSING"), SourceError, "does not exist"),
        (dict(model="ViT-Q-99"), EncoderError, "unknown model"),
        (dict(model="ViT-B-32", pretrained="laion9b"), EncoderError, "unknown pretrained tag"),
        (dict(templates="nope"), UsageError, "preset"),
        (dict(prompt_sets=("painting",)), UsageError, "NAME=TEMPLATE"),
        (dict(out="FILE"), UsageError, "is a file"),
        (dict(out="BUSY"), UsageError, "not a vlaug cache"),
    ],
)
def test_bad_input_writes_nothing(class_folder, tmp_path, kw, error, match):
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "BUSY").mkdir()
    (tmp_path / "BUSY" / "thesis.tex").write_text("x")
    kw = {k: (str(tmp_path / v) if k in ("source", "out") else v) for k, v in kw.items()}
    config = tiny_config(class_folder, tmp_path / "feat")
    config = EmbedConfig(**{**config.__dict__, **kw})
    with pytest.raises(error, match=match) as info:
        embed_source(config)
    assert info.value.exit_code == 2
    assert not (tmp_path / "feat").exists()
    assert (tmp_path / "FILE").read_text() == "x" and os.listdir(tmp_path / "BUSY") == ["thesis.tex"]


def test_config_validation():
    with pytest.raises(UsageError, match="--batch-size 0"):
        EmbedConfig(batch_size=0)
    with pytest.raises(UsageError, match="--dtype"):
        EmbedConfig(dtype="int8")


# ----------------------------------------------------------------------------- interruption
# A FIFO in the source blocks the embed process at a known input (opening a FIFO waits for a
# writer), so the test interrupts it deterministically after the earlier parts are committed.


def _blocking_source(root: Path) -> Path:
    make_class_folder(root, classes=("a", "b", "c"), n=6)
    (root / "b" / "003.png").unlink()
    os.mkfifo(root / "b" / "003.png")
    return root


def _embed_command(source: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "vlaug", "embed", str(source), "--out", str(out), "--model", "vlaug-tiny",
           "--pretrained", "none", "--workers", "0", "--batch-size", "4", "--part-size", "4", "--dtype", "float32",
           "--no-progress"]


def _start_embed(source: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(_embed_command(source, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_parts(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if len(json.loads((out / "manifest.json").read_text())["parts"]) >= n:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("embed did not reach the blocking input")


def _unblock(source: Path) -> None:
    (source / "b" / "003.png").unlink()
    write_image(source / "b" / "003.png", seed=103)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, sig):
    source = _blocking_source(tmp_path / "src")
    out = tmp_path / "feat"
    proc = _start_embed(source, out)
    _wait_for_parts(out, 2, proc)  # rows 0-7 committed; blocked in row 9
    proc.send_signal(sig)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()  # a child deaf to the signal: fail, and leave no process behind
        raise
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert "Re-run the same command to resume" in stderr and "8 of 18 images" in stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    assert cache.read_manifest(out).parts == ["part-00000.parquet", "part-00001.parquet"]
    with pytest.raises(IncompleteCacheError, match="8 of 18 inputs embedded"):  # stages 2 and 3 refuse it
        cache.read_cache(out)

    _unblock(source)
    result = subprocess.run(_embed_command(source, out), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "embedded 10, skipped 8" in result.stdout

    reference = tmp_path / "reference"
    shutil.copytree(source, tmp_path / "src2")
    embed_source(tiny_config(tmp_path / "src2", reference, part_size=4))
    ids, emb, labels = _by_id(cache.read_cache(out))
    ref_ids, ref_emb, ref_labels = _by_id(cache.read_cache(reference))
    assert ids == ref_ids and len(ids) == len(set(ids)) == 18
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(emb, ref_emb)
    assert not cache.unfinished_files(out)
    assert cache.read_manifest(out).complete
