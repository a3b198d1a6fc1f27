"""Embedding from shards (issue 31): images/s from WebDataset tar shards and from Parquet
files holding the image bytes, against the same images as files, and peak memory as the
number of shards grows.

    python benchmarks/shard_throughput.py [--images 2000] [--size 256] [--repeats 3] [--json FILE]

1. Writes ``--images`` JPEG images (``--size`` pixels, random content, 3 classes) as a class
   folder, as 10 tar shards (``KEY.jpg`` + ``KEY.cls``, img2dataset's layout) and as 10
   Parquet files (a ``jpg`` column and a ``label``).
2. Times ``vlaug embed`` on each, whole processes in turn (files, shards, parquet, files, ...),
   the same model (``vlaug-tiny``, random weights: the model is small, so decoding and reading
   dominate, which is what differs between the sources), ``--workers`` as given; prints the
   median images/s of each and the ratios to files.
3. Peak resident memory (the embed process's, from the kernel's accounting of the child,
   ``--workers 0`` so that the decoding happens in it) for 10 and 100 shards of the same size
   (100 images each): flat when reading a shard costs no memory that stays (the records of
   the images themselves, a few hundred bytes each, do grow with them).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = ("ant", "bee", "cat")


def _jpeg(rng, size: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)).resize((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_sources(root: Path, n: int, size: int, n_shards: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    files, shards, parquet = root / "files", root / f"shards{n_shards}", root / f"parquet{n_shards}"
    for d in (shards, parquet):
        d.mkdir(parents=True)
    items = [(CLASSES[i % 3], f"{i:07d}", _jpeg(rng, size)) for i in range(n)]
    for c, key, data in items:
        (files / c).mkdir(parents=True, exist_ok=True)
        (files / c / f"{key}.jpg").write_bytes(data)
    per = -(-n // n_shards)
    for s in range(n_shards):
        part = items[s * per:(s + 1) * per]
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for c, key, data in part:
                for name, blob in ((f"{key}.jpg", data), (f"{key}.cls", str(CLASSES.index(c)).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
        pq.write_table(pa.table({"key": [k for _, k, _ in part], "jpg": [d for _, _, d in part],
                                 "class": [c for c, _, _ in part]}), parquet / f"{s:05d}.parquet", row_group_size=256)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return {"files": files, "shards": shards, "parquet": parquet}


def embed(source: Path, out: Path, classes: Path, workers: int) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one ``vlaug embed`` process."""
    cmd = [sys.executable, "-m", "vlaug", "embed", str(source), "--out", str(out), "--model", "vlaug-tiny", "--pretrained",
           "none", "--workers", str(workers), "--batch-size", "64", "--no-progress", "--overwrite"]
    if "files" not in source.name:
        cmd += ["--classes", str(classes)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # this process's own accounting (its peak, not the largest child's so far)
    seconds = time.perf_counter() - start
    if status:
        raise SystemExit(f"vlaug embed {source} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    out = {"images": args.images, "size": args.size, "workers": args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sources = write_sources(root, args.images, args.size, 10)
        times = {k: [] for k in sources}
        for _ in range(args.repeats):
            for kind, source in sources.items():
                times[kind].append(embed(source, root / f"out-{kind}", root / "classes.txt", args.workers)[0])
        out["images_per_s"] = {k: args.images / statistics.median(v) for k, v in times.items()}
        out["ratio_to_files"] = {k: out["images_per_s"][k] / out["images_per_s"]["files"] for k in sources}
        memory = {}
        for n_shards in (10, 100):
            many = write_sources(root / f"m{n_shards}", 100 * n_shards, 64, n_shards)
            # --workers 0: the decoding in the measured process itself
            memory[n_shards] = embed(many["shards"], root / f"mem{n_shards}", root / f"m{n_shards}" / "classes.txt", 0)[1]
        out["peak_rss_mb_by_shards"] = memory
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
