"""Fault injection: kills at random moments and inside writes, concurrent writers, hostile images."""

import pytest
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import make_class_folder, tiny_config, write_image
from vlaug import cache
from vlaug.embed import embed_source, load_image
from vlaug.encoders import load_encoder

ARGS = ["--model", "vlaug-tiny", "--pretrained", "none", "--workers", "0", "--batch-size", "4", "--part-size", "8",
        "--dtype", "float32", "--no-progress"]
ROOT = Path(__file__).resolve().parents[1]  # where ``python -m tests.fault_injection`` runs


def _command(source, out, fault: str | None = None):
    """``vlaug embed`` in a child process; with ``fault`` ("part:N" or "manifest:N") run by
    tests/fault_injection.py, which SIGKILLs it inside that write, between the temporary
    file and its rename."""
    runner = ["-m", "vlaug"] if fault is None else ["-m", "tests.fault_injection", fault]
    return [sys.executable, *runner, "embed", str(source), "--out", str(out), *ARGS]


def _parts(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["parts"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def _sorted_rows(out):
    c = cache.read_cache(out)
    order = np.argsort(c.ids)
    return [c.ids[i] for i in order], c.embeddings[order]


@pytest.mark.slow
def test_sigkill_at_random_moments_and_inside_writes(tmp_path):
    source = make_class_folder(tmp_path / "src", classes=tuple(f"c{i}" for i in range(5)), n=40, suffix=".png")
    out = tmp_path / "feat"
    rng = random.Random(0)
    kills = []
    # two kills inside a write, between the temporary file and its rename
    for fault in ("part:2", "manifest:3"):
        r = subprocess.run(_command(source, out, fault), cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert r.returncode == -signal.SIGKILL, r.stderr
        kills.append(fault)
        leftovers = list(out.glob(f"*{cache.TMP_MARKER}*")) + list((out / "images").glob(f"*{cache.TMP_MARKER}*"))
        assert leftovers, "the injected kill should leave a temporary file behind"
        cache.read_cache(out, allow_incomplete=True)  # whatever was committed is readable
    # then kills at random moments while parts are being committed
    while len(kills) < 6:
        proc = subprocess.Popen(_command(source, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        start_parts = max(_parts(out), 0)
        deadline = time.monotonic() + 120
        while _parts(out) <= start_parts and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
        if proc.poll() is not None:
            break  # it finished before the kill: nothing left to interrupt
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        kills.append(f"random after part {start_parts}")
        cache.read_cache(out, allow_incomplete=True)
    assert len(kills) >= 5, kills
    final = subprocess.run(_command(source, out), capture_output=True, text=True, timeout=180)
    assert final.returncode == 0, final.stderr
    reference = tmp_path / "reference"
    shutil.copytree(source, tmp_path / "src2")
    embed_source(tiny_config(tmp_path / "src2", reference, part_size=8))
    ids, emb = _sorted_rows(out)
    ref_ids, ref_emb = _sorted_rows(reference)
    assert ids == ref_ids and len(ids) == len(set(ids)) == 200
    np.testing.assert_array_equal(emb, ref_emb)
    assert not cache.unfinished_files(out)
    assert not (out / cache.LOCK_NAME).exists()
    assert cache.read_manifest(out).complete


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    source = make_class_folder(tmp_path / "src", classes=("a", "b"), n=6)
    (source / "b" / "002.png").unlink()
    os.mkfifo(source / "b" / "002.png")  # blocks the first writer at a known input
    out = tmp_path / "feat"
    first = subprocess.Popen(_command(source, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _parts(out) < 1 and time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    second = subprocess.run(_command(source, out), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert f"pid {first.pid}" in second.stderr and "is being written" in second.stderr
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert (out / cache.LOCK_NAME).exists()  # a crash leaves the lock behind ...
    (source / "b" / "002.png").unlink()
    write_image(source / "b" / "002.png", 5)
    third = subprocess.run(_command(source, out), capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr  # ... and the next run sees it is stale
    assert "took over a lock" in third.stderr
    assert len(cache.read_cache(out)) == 12 and not (out / cache.LOCK_NAME).exists()


def _hostile_zoo(root: Path) -> dict[str, str]:
    """Images that must embed ("ok") or be recorded as failures ("fail")."""
    d = root / "zoo"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "good.png")
    Image.fromarray(rgb).save(d / "good.jpg")
    full = (d / "good.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    png = (d / "good.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("plain text, not a JPEG")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16)).save(d / "sixteen.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    rgba = np.dstack([rgb, rng.integers(0, 255, (40, 40), dtype=np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    Image.fromarray(rgb[:1, :1]).save(d / "one_pixel.png")
    Image.new("L", (300, 300), 128).save(d / "bomb.png")  # a bomb once the test lowers PIL's pixel limit
    os.symlink(d / "loop_b.jpg", d / "loop_a.jpg")
    os.symlink(d / "loop_a.jpg", d / "loop_b.jpg")
    Image.fromarray(rgb).save(d / "ünïcödé name with spaces.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.fromarray(rgb[:, :20]).save(d / "exif_rotated.jpg", exif=exif.tobytes(), quality=95)
    return {
        "good.png": "ok", "good.jpg": "ok", "cmyk.jpg": "ok", "sixteen.png": "ok", "palette.png": "ok", "alpha.png": "ok",
        "one_pixel.png": "ok", "ünïcödé name with spaces.png": "ok", "exif_rotated.jpg": "ok",
        "truncated.jpg": "fail", "truncated.png": "fail", "zero.jpg": "fail", "text.jpg": "fail", "bomb.png": "fail",
        "loop_a.jpg": "fail", "loop_b.jpg": "fail",
    }


def test_hostile_images_embed_or_are_recorded(tmp_path, monkeypatch):
    expected = _hostile_zoo(tmp_path / "src")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # bomb.png has 90,000 pixels
    out = tmp_path / "feat"
    result = embed_source(tiny_config(tmp_path / "src", out))
    failed = {Path(f["id"]).name: f["error"] for f in cache.read_failed(out)}
    embedded = {Path(i).name for i in cache.read_cache(out).ids}
    assert failed.keys() == {k for k, v in expected.items() if v == "fail"}
    assert embedded == {k for k, v in expected.items() if v == "ok"}
    assert result.n_failed == len(failed) and all("\n" not in e for e in failed.values())
    assert "DecompressionBomb" in failed["bomb.png"]
    # EXIF orientation is applied: the stored image is 40 x 20, the decoded one 20 x 40
    img = load_image(str(tmp_path / "src" / "zoo" / "exif_rotated.jpg"))
    assert img.size == (40, 20)
    # transparency is composited on white: a fully transparent pixel decodes as white
    clear = np.zeros((4, 4, 4), dtype=np.uint8)
    Image.fromarray(clear, "RGBA").save(tmp_path / "clear.png")
    assert np.asarray(load_image(str(tmp_path / "clear.png"))).min() == 255


def test_embedding_of_a_cmyk_and_16_bit_image_is_finite(tmp_path):
    expected = _hostile_zoo(tmp_path / "src")
    enc = load_encoder("vlaug-tiny", "none", "cpu")
    for name in ("cmyk.jpg", "sixteen.png", "palette.png", "one_pixel.png"):
        assert expected[name] == "ok"
        x = enc.preprocess_uint8(load_image(str(tmp_path / "src" / "zoo" / name))).unsqueeze(0)
        assert np.isfinite(enc.encode_images(x).numpy()).all()
