"""vlaug embed vs clip-retrieval inference on the same WebDataset shards and checkpoint (issue 31).

Run with vlaug's own interpreter (it needs numpy, PIL, pyarrow, open_clip, torch), with
clip-retrieval installed in a venv of its own (below) named by CLIP_RETRIEVAL (default
WORKDIR/venv/bin/clip-retrieval) and a work folder VLAUG_CR_DIR (default /tmp/vlaug-cr):

    python benchmarks/clip_retrieval_compare.py [prepare] [verify] [bench | bench-own]
        (no argument: prepare, verify, bench-own)

- prepare: 2000 JPEGs (256x256, 3 classes, smooth random content: the writer of
  benchmarks/shard_throughput.py) as 10 tar shards (KEY.jpg + KEY.cls) in
  WORKDIR/shards/{00000..00009}.tar, and open_clip ViT-B-32 with random weights (seed 0)
  saved as a plain state dict to WORKDIR/vitb32-random.pt.
- verify: runs each tool once, checks that each wrote 2000 embeddings and compares them
  key by key (cosine).
- bench: farm-bench -n RUNS --warmup 1, vlaug (A) against clip-retrieval (B), interleaved
  (the timing tool of vlaug's development machine, which gave the figures in
  docs/benchmarks.md).
- bench-own: the same without it: whole processes timed here with os.wait4, 1 warm-up pair
  then RUNS pairs in turn, median wall and pairwise ratio.
- table: re-print the table of the last farm-bench report (WORKDIR/farm-bench.txt).

clip-retrieval lives in its own venv (WORKDIR/venv: clip-retrieval 2.45.0, all_clip 1.3.0,
open_clip_torch 2.32.0, torch 2.14.1; `pip install clip-retrieval -c constraints.txt`
with torch==2.14.1/torchvision==0.29.1 pinned, then `pip install 'setuptools<81'`, since
clip-anytorch still does `from pkg_resources import packaging`). It loads the local checkpoint without any patch:
all_clip's load_open_clip splits --clip_model on '/', takes the first part as the model
name and joins the rest back as open_clip's `pretrained`, so
'open_clip:ViT-B-32//tmp/vlaug-cr/vitb32-random.pt' gives pretrained='/tmp/vlaug-cr/vitb32-random.pt',
a local file that open_clip.create_model_and_transforms loads (no network).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(os.environ.get("VLAUG_CR_DIR", "/tmp/vlaug-cr"))
SHARDS = ROOT / "shards"
CKPT = ROOT / "vitb32-random.pt"
PATTERN = str(SHARDS / "{00000..00009}.tar")
N_IMAGES = 2000
BATCH = 64
WORKERS = 1
RUNS = int(os.environ.get("RUNS", "3"))

CR_OUT = ROOT / "out"
V_OUT = ROOT / "vout"
CR_BIN = Path(os.environ.get("CLIP_RETRIEVAL", ROOT / "venv/bin/clip-retrieval"))

VLAUG_CMD = [sys.executable, "-m", "vlaug", "embed", PATTERN, "--out", str(V_OUT), "--overwrite", "--model", "ViT-B-32",
             "--pretrained", str(CKPT), "--device", "cpu", "--precision", "fp32", "--workers", str(WORKERS),
             "--batch-size", str(BATCH), "--no-progress", "--classes", str(ROOT / "classes.txt")]
# clip-retrieval refuses nothing about an existing output folder, but it would leave stale
# files: remove it first (rm -rf of a 1-file folder: negligible).
CR_CMD = ("rm -rf {out} && exec {bin} inference --input_dataset '{pattern}' --input_format webdataset "
          "--output_folder {out} --clip_model 'open_clip:ViT-B-32/{ckpt}' --enable_text False "
          "--enable_metadata False --batch_size {batch} --num_prepro_workers {workers} "
          "--write_batch_size 1000000 --use_jit False").format(
    out=CR_OUT, bin=CR_BIN, pattern=PATTERN, ckpt=CKPT, batch=BATCH, workers=WORKERS)


def prepare() -> None:
    import open_clip
    import torch

    ROOT.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from shard_throughput import write_sources  # the issue-31 benchmark's own data writer

    if not SHARDS.exists():
        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
            src = write_sources(Path(tmp), N_IMAGES, 256, 10)
            shutil.copytree(src["shards"], SHARDS)
            shutil.copy(Path(tmp) / "classes.txt", ROOT / "classes.txt")
    if not CKPT.exists():
        torch.manual_seed(0)
        model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
        torch.save(model.state_dict(), CKPT)
    print(f"shards: {sorted(p.name for p in SHARDS.glob('*.tar'))}, checkpoint: {CKPT} ({CKPT.stat().st_size/1e6:.0f} MB)")


def _run(cmd, shell=False) -> None:
    r = subprocess.run(cmd, shell=shell, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def verify() -> None:
    import numpy as np
    import pyarrow.parquet as pq

    if "--reuse" not in sys.argv:
        _run(VLAUG_CMD)
        _run(CR_CMD, shell=True)
    cr_emb = np.load(CR_OUT / "img_emb" / "img_emb_0.npy").astype(np.float32)
    cr_keys = [str(k) for k in pq.read_table(CR_OUT / "metadata" / "metadata_0.parquet").column("image_path").to_pylist()]
    v_emb, v_keys = _vlaug_embeddings(V_OUT)
    print(f"clip-retrieval: {cr_emb.shape[0]} embeddings (dim {cr_emb.shape[1]}), vlaug: {v_emb.shape[0]} (dim {v_emb.shape[1]})")
    idx = {k: i for i, k in enumerate(v_keys)}
    common = [k for k in cr_keys if k in idx]
    a = cr_emb[[cr_keys.index(k) for k in common]]
    b = v_emb[[idx[k] for k in common]]
    print(f"largest |difference| of a stored (float16) component: {np.abs(a - b).max():.2e}")
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    cos = (a * b).sum(1)
    print(f"{len(common)} keys in common; cosine clip-retrieval vs vlaug: min {cos.min():.6f}, "
          f"median {np.median(cos):.6f}, max {cos.max():.6f}")
    # how different are two unrelated images' embeddings (random weights: often very close)
    off = (a[:-1] * b[1:]).sum(1)
    print(f"for scale, cosine of different images (i vs i+1): median {np.median(off):.6f}, min {off.min():.6f}")


def _vlaug_embeddings(out: Path):
    """(embeddings, keys) from a vlaug cache: images/part-*.parquet, id 'SHARD.tar/KEY'."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.concat_tables([pq.read_table(p) for p in sorted((out / "images").glob("part-*.parquet"))])
    emb = np.asarray(t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                     dtype=np.float32).reshape(t.num_rows, -1)
    keys = [i.split("/", 1)[1] for i in t.column("id").to_pylist()]
    return emb, keys


def table(report: str) -> str:
    """images/s of each (N_IMAGES / median wall) and the A/B wall ratio from farm-bench's report."""
    import re

    num = r"\s+([0-9.]+)"
    rows = {m.group(1): [float(m.group(i)) for i in (2, 3, 4)]
            for m in (re.match(r"^(A wall s|B wall s|A/B wall)" + num * 3 + r"\s*$", line) for line in report.splitlines())
            if m}
    a, b, r = rows["A wall s"], rows["B wall s"], rows["A/B wall"]
    return "\n".join([
        "| tool | median wall s (min-max) | images/s |",
        "|---|---|---|",
        f"| vlaug embed | {a[1]:.1f} ({a[0]:.1f}-{a[2]:.1f}) | {N_IMAGES / a[1]:.2f} |",
        f"| clip-retrieval inference | {b[1]:.1f} ({b[0]:.1f}-{b[2]:.1f}) | {N_IMAGES / b[1]:.2f} |",
        f"vlaug/clip-retrieval wall ratio, pair by pair: median {r[1]:.3f} (min {r[0]:.3f}, max {r[2]:.3f}) "
        f"= vlaug {1 / r[1]:.2f}x as fast ({1 / r[2]:.2f}-{1 / r[0]:.2f}x); goal 1.5x: {'met' if 1 / r[1] >= 1.5 else 'NOT met'}",
    ])


def bench() -> None:
    cmd = ["farm-bench", "-n", str(RUNS), "--warmup", "1", "--timeout", "3000",
           "--vs", f"sh -c \"{CR_CMD}\"", "--", *VLAUG_CMD]
    print("$", " ".join(cmd[:8]), "...", flush=True)
    report = subprocess.run(cmd, capture_output=True, text=True).stdout
    (ROOT / "farm-bench.txt").write_text(report)
    print(report)
    print(table(report))


def _timed(cmd, shell=False) -> tuple[float, float]:
    """(wall s, user+sys s) of one whole process and its waited-for children."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, shell=shell, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status:
        raise SystemExit(f"failed (status {status}): {cmd}")
    return wall, usage.ru_utime + usage.ru_stime


def bench_own() -> None:
    import statistics

    v, c = [], []
    for i in range(RUNS + 1):  # the first pair is a warm-up
        tv, tc = _timed(VLAUG_CMD), _timed(CR_CMD, shell=True)
        print(f"{'warm-up' if i == 0 else f'pair {i}'}: vlaug {tv[0]:.1f} s, clip-retrieval {tc[0]:.1f} s", flush=True)
        if i:
            v.append(tv[0])
            c.append(tc[0])
    r = sorted(a / b for a, b in zip(v, c))
    print("| tool | median wall s (min-max) | images/s |\n|---|---|---|")
    print(f"| vlaug embed | {statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f}) | {N_IMAGES / statistics.median(v):.2f} |")
    print(f"| clip-retrieval inference | {statistics.median(c):.1f} ({min(c):.1f}-{max(c):.1f}) | {N_IMAGES / statistics.median(c):.2f} |")
    print(f"vlaug/clip-retrieval wall ratio, pair by pair: median {statistics.median(r):.3f} ({r[0]:.3f}-{r[-1]:.3f})")


if __name__ == "__main__":
    steps = [a for a in sys.argv[1:] if not a.startswith("--")] or ["prepare", "verify", "bench-own"]
    if steps == ["table"]:  # re-print the table of the last farm-bench report
        print(table((ROOT / "farm-bench.txt").read_text()))
        raise SystemExit
    for s in steps:
        {"prepare": prepare, "verify": verify, "bench": bench, "bench-own": bench_own}[s]()
