"""Box sampling speed: 40 samples inside each of 50,000 boxes in 512 dimensions.

  vlaug:     vlaug.augment.sample_boxes (one batched draw);
  reference: a Python loop drawing each box's samples separately (what a per-sample
             augmentation inside a Dataset's __getitem__ amounts to).
Reports seconds and the ratio reference / vlaug.

    python benchmarks/box_sampling.py [--n 50000] [--d 512] [--samples 40] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vlaug.augment import sample_boxes
from vlaug.devices import resolve_device


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--reference-rows", type=int, default=5_000, help="rows timed for the loop (then scaled to --n)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    args = p.parse_args(argv)
    dev = resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    lo = F.normalize(torch.randn(args.n, args.d, generator=g), dim=-1).to(dev)
    hi = F.normalize(lo + 0.1 * torch.randn(args.n, args.d, generator=g).to(dev), dim=-1)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sample_boxes(lo[:100], hi[:100], args.samples, torch.Generator(device=dev).manual_seed(0))  # warm-up
    best = float("inf")
    for _ in range(3):
        sync(); t0 = time.perf_counter()
        out = sample_boxes(lo, hi, args.samples, torch.Generator(device=dev).manual_seed(0))
        sync(); best = min(best, time.perf_counter() - t0)
    assert out.shape == (args.n, args.samples, args.d)
    m = min(args.reference_rows, args.n)
    gen = torch.Generator(device=dev).manual_seed(0)
    sync(); t0 = time.perf_counter()
    for i in range(m):
        u = torch.rand(args.samples, args.d, generator=gen, device=dev)
        F.normalize(lo[i] + u * (hi[i] - lo[i]), dim=-1)
    sync(); loop = (time.perf_counter() - t0) * args.n / m
    result = {"n": args.n, "d": args.d, "samples": args.samples, "device": str(dev), "vlaug_s": best,
              "reference_loop_s": loop, "ratio": loop / best, "reference_rows_timed": m}
    for k, v in result.items():
        print(f"{k:22} {v:.4g}" if isinstance(v, float) else f"{k:22} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
