"""train-box and probe on caches larger than their memory budget: peak resident memory and time per row.

For each size (default 250k, 500k, 1M, 2M rows of 512-d float16, 100 classes) this writes a
synthetic cache part by part (so writing it needs little memory), then runs

    vlaug train-box CACHE --head box --epochs 1 --memory-budget 512M --device cpu
    vlaug probe CACHE --method linear --seeds 1 --grid-size 1 --max-iter 10 --memory-budget 512M --device cpu

each in a child process, and reads the child's peak resident set size from the kernel
(``os.wait4``). Time should grow linearly with the rows and peak memory stay flat. The
probe runs one weight decay for 10 L-BFGS iterations (then the refit on train + val, the
test pass and the plots): streamed, each evaluation of its objective reads the cache, so
the default 8 x 200-iteration search is ~50x longer on this scale.

    python benchmarks/larger_than_memory.py [--sizes 250000,500000,1000000,2000000] [--budget 512M]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vlaug import cache


def write_cache(path: Path, n: int, d: int = 512, n_classes: int = 100, part_rows: int = 65_536, seed: int = 0,
                noise: float = 3.0) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, d)).astype(np.float32)
    classes = [f"c{i}" for i in range(n_classes)]
    manifest = cache.CacheManifest(model="synthetic", pretrained="none", embed_dim=d, dtype="float16", classes=classes,
                                   templates=["a photo of a {}."], seed=0)
    for k, start in enumerate(range(0, n, part_rows)):
        m = min(part_rows, n - start)
        y = rng.integers(0, n_classes, m)
        x = centres[y] + noise * rng.standard_normal((m, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        rows = {"id": [str(start + i) for i in range(m)], "path": [""] * m, "label": y.tolist(),
                "class_name": [classes[c] for c in y], "domain": [""] * m, "split": [""] * m}
        name = cache.part_name(k)
        cache.write_part(path, name, rows, x, "float16")
        manifest.parts.append(name)
        manifest.n_images += m
    cache.write_texts(path, {"classes": centres / np.linalg.norm(centres, axis=1, keepdims=True)}, classes)
    manifest.complete = True
    cache.write_manifest(path, manifest)


# A small launcher process runs each command and reports its peak resident memory:
# measured directly on a child of this process, ru_maxrss would include the pages the child
# inherited from this process at fork, before its exec (GBs inside run_all.py).
LAUNCHER = """
import resource, subprocess, sys, time
start = time.perf_counter()
with open(sys.argv[1], "w") as log:
    rc = subprocess.call(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=log)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, rc)
"""


def run_child(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MiB (ru_maxrss is in KiB on Linux) and exit code of a command."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "stderr.log"
        out = subprocess.run([sys.executable, "-c", LAUNCHER, str(log), *cmd], capture_output=True, text=True, check=True)
        seconds, peak, rc = out.stdout.split()
        if int(rc):
            sys.stderr.write(log.read_text()[-2000:])
    return float(seconds), float(peak), int(rc)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="250000,500000,1000000,2000000")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--budget", default="512M")
    p.add_argument("--workdir", help="where to write the caches (default: a temporary folder)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="vlaug-ltm-"))
    rows = []
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            feats = root / f"cache-{n}"
            t0 = time.perf_counter()
            write_cache(feats, n, args.d)
            write_s = time.perf_counter() - t0
            disk = sum(f.stat().st_size for f in feats.rglob("*") if f.is_file())
            common = ["--memory-budget", args.budget, "--device", "cpu", "--no-progress"]
            seconds, peak, rc = run_child([sys.executable, "-m", "vlaug", "train-box", str(feats), "--out",
                                           str(root / f"head-{n}"), "--head", "box", "--epochs", "1", *common])
            p_seconds, p_peak, p_rc = run_child([sys.executable, "-m", "vlaug", "probe", str(feats), "--out",
                                                 str(root / f"report-{n}"), "--method", "linear", "--seeds", "1",
                                                 "--grid-size", "1", "--max-iter", "10", *common])
            report = root / f"report-{n}" / "report.json"
            passes = json.loads(report.read_text())["protocol"]["passes_over_cache"] if report.is_file() else None
            row = {"rows": n, "cache_gib": disk / 2**30, "write_s": write_s, "train_box_s": seconds,
                   "us_per_row": 1e6 * seconds / n, "peak_rss_mib": peak, "exit_code": rc,
                   "probe_s": p_seconds, "probe_us_per_row": 1e6 * p_seconds / n, "probe_peak_rss_mib": p_peak,
                   "probe_exit_code": p_rc, "probe_passes": passes,
                   "probe_us_per_row_pass": 1e6 * p_seconds / n / passes if passes else None}
            rows.append(row)
            print(json.dumps(row))
            shutil.rmtree(feats, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
