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

Goal (issue 26): train-box's peak stays under the budget plus 1 GiB (the interpreter with
PyTorch loaded, the metadata and what the budget does not count), 1,536 MiB at 512M; each
size's line says whether it does.

    python benchmarks/larger_than_memory.py [--sizes 250000,500000,1000000,2000000] [--budget 512M]
    python benchmarks/larger_than_memory.py --sizes 2000000 --commands train-box --workdir /tmp/ltm --keep-caches
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
from vlaug.errors import CacheError

# train-box's goal: peak resident memory under --memory-budget plus this
TRAIN_BOX_GOAL_OVER_BUDGET = 2**30


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


def has_cache(path: Path, n: int, d: int) -> bool:
    """Whether ``path`` holds a complete cache of ``n`` rows of dimension ``d`` (one to reuse)."""
    try:
        manifest = cache.read_manifest(path)
    except CacheError:
        return False
    return manifest.complete and manifest.n_images == n and manifest.embed_dim == d


def measure_train_box(feats: Path, out: Path, budget: str) -> dict:
    """train-box's time and peak memory on ``feats``, against the goal for ``budget``."""
    seconds, peak, rc = run_child([sys.executable, "-m", "vlaug", "train-box", str(feats), "--out", str(out), "--head", "box",
                                   "--epochs", "1", "--memory-budget", budget, "--device", "cpu", "--no-progress",
                                   "--overwrite"])
    goal = (cache.parse_memory_budget(budget) + TRAIN_BOX_GOAL_OVER_BUDGET) / 2**20
    return {"train_box_s": seconds, "peak_rss_mib": peak, "exit_code": rc, "train_box_goal_mib": goal,
            "train_box_within_goal": peak < goal}


def measure_probe(feats: Path, out: Path, budget: str) -> dict:
    """probe's time, peak memory and reads of the cache on ``feats``."""
    seconds, peak, rc = run_child([sys.executable, "-m", "vlaug", "probe", str(feats), "--out", str(out), "--method", "linear",
                                   "--seeds", "1", "--grid-size", "1", "--max-iter", "10", "--memory-budget", budget,
                                   "--device", "cpu", "--no-progress"])
    report = out / "report.json"
    passes = json.loads(report.read_text())["protocol"]["passes_over_cache"] if report.is_file() else None
    return {"probe_s": seconds, "probe_peak_rss_mib": peak, "probe_exit_code": rc, "probe_passes": passes}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="250000,500000,1000000,2000000")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--budget", default="512M")
    p.add_argument("--commands", default="train-box,probe", help="which of train-box,probe to measure")
    p.add_argument("--workdir", help="where to write the caches (default: a temporary folder)")
    p.add_argument("--keep-caches", action="store_true",
                   help="keep the caches in --workdir, and reuse those already written there")
    p.add_argument("--json")
    args = p.parse_args(argv)
    commands = args.commands.split(",")
    if unknown := set(commands) - {"train-box", "probe"}:
        p.error(f"--commands: unknown {sorted(unknown)}; use train-box and/or probe")
    if args.keep_caches and not args.workdir:
        p.error("--keep-caches needs --workdir")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="vlaug-ltm-"))
    rows = []
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            feats = root / f"cache-{n}"
            t0 = time.perf_counter()
            reused = args.keep_caches and has_cache(feats, n, args.d)
            if not reused:
                shutil.rmtree(feats, ignore_errors=True)
                write_cache(feats, n, args.d)
            row = {"rows": n, "cache_gib": sum(f.stat().st_size for f in feats.rglob("*") if f.is_file()) / 2**30,
                   "write_s": None if reused else time.perf_counter() - t0}
            if "train-box" in commands:
                row.update(measure_train_box(feats, root / f"head-{n}", args.budget))
                row["us_per_row"] = 1e6 * row["train_box_s"] / n
            if "probe" in commands:
                row.update(measure_probe(feats, root / f"report-{n}", args.budget))
                row["probe_us_per_row"] = 1e6 * row["probe_s"] / n
                row["probe_us_per_row_pass"] = row["probe_us_per_row"] / row["probe_passes"] if row["probe_passes"] else None
            rows.append(row)
            print(json.dumps(row))
            if "train-box" in commands:
                print(f"train-box on {n:,} rows under --memory-budget {args.budget}: peak {row['peak_rss_mib']:,.0f} MiB, "
                      f"goal under {row['train_box_goal_mib']:,.0f} MiB: {'met' if row['train_box_within_goal'] else 'MISSED'}",
                      file=sys.stderr)
            if not args.keep_caches:
                shutil.rmtree(feats, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
