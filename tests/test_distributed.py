"""torchrun: two CPU processes (gloo) write exactly the rows of a single-process run, and
an interrupted torchrun resumes with another world size."""

import pytest
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.conftest import make_class_folder, tiny_config, write_image
from vlaug import cache
from vlaug.embed import embed_source

ARGS = ["--model", "vlaug-tiny", "--pretrained", "none", "--workers", "0", "--batch-size", "4", "--part-size", "8",
        "--dtype", "float32", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(source, out, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", "vlaug", "embed", str(source), "--out", str(out), *ARGS]


def _kill_everything_writing(out: Path) -> None:
    """SIGKILL every process whose command line names ``out`` (torchrun starts its workers
    in their own sessions, so a process-group kill does not reach them)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(out) in cmdline:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _rows(out):
    c = cache.read_cache(out)
    order = np.argsort(c.ids)
    return [c.ids[i] for i in order], c.embeddings[order], c.labels[order]


@pytest.mark.slow
def test_two_gloo_ranks_write_the_rows_of_one_process(tmp_path):
    source = make_class_folder(tmp_path / "src", classes=("a", "b", "c"), n=11)
    (source / "b" / "bad.png").write_bytes(b"not a png")
    r = subprocess.run(_torchrun(source, tmp_path / "dist"), capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("embedded 33, skipped 0 (already in cache), failed 1") == 1  # rank 0 alone reports
    manifest = cache.read_manifest(tmp_path / "dist")
    assert {p.split("-")[1] for p in manifest.parts} == {"r0", "r1"}
    assert manifest.complete and manifest.n_images == 33 and manifest.n_failed == 1
    assert [f["id"] for f in cache.read_failed(tmp_path / "dist")] == ["b/bad.png"]
    assert not list((tmp_path / "dist" / "images").glob("rank-*.json")) and not (tmp_path / "dist" / cache.LOCK_NAME).exists()
    embed_source(tiny_config(source, tmp_path / "single", part_size=8))
    ids, emb, labels = _rows(tmp_path / "dist")
    ref_ids, ref_emb, ref_labels = _rows(tmp_path / "single")
    assert ids == ref_ids and len(set(ids)) == 33
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(emb, ref_emb, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_interrupted_torchrun_resumes_in_one_process(tmp_path):
    source = make_class_folder(tmp_path / "src", classes=("a", "b", "c"), n=12)
    # rank 1 takes the odd pending inputs; a FIFO among them blocks it after it has committed parts
    (source / "c" / "009.png").unlink()
    os.mkfifo(source / "c" / "009.png")
    out = tmp_path / "feat"
    proc = subprocess.Popen(_torchrun(source, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 180
    rank_file = out / "images" / "rank-1.json"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if len(json.loads(rank_file.read_text())["parts"]) >= 1:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    else:
        _kill_everything_writing(out)
        raise AssertionError("rank 1 committed no part")
    time.sleep(0.5)
    _kill_everything_writing(out)  # torchrun and its workers, as a crash of the node would
    proc.communicate(timeout=60)
    assert list((out / "images").glob("rank-*.json"))  # commits not yet merged into the manifest
    (source / "c" / "009.png").unlink()
    write_image(source / "c" / "009.png", 209)
    r = subprocess.run([sys.executable, "-m", "vlaug", "embed", str(source), "--out", str(out), *ARGS],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "committed by the ranks of an interrupted torchrun" in r.stderr
    shutil.copytree(source, tmp_path / "src2", symlinks=False)
    embed_source(tiny_config(tmp_path / "src2", tmp_path / "reference", part_size=8))
    ids, emb, _ = _rows(out)
    ref_ids, ref_emb, _ = _rows(tmp_path / "reference")
    assert ids == ref_ids and len(set(ids)) == 36
    np.testing.assert_allclose(emb, ref_emb, rtol=0, atol=1e-6)
    assert not cache.unfinished_files(out) and cache.read_manifest(out).complete
