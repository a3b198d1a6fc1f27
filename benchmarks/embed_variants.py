"""Which model-side settings pay for `vlaug embed`: the image tower's forward pass alone
(the ceiling (a) of embed_throughput.py) under each variant, as a ratio to the default.

Variants: the default (eager, the precision `auto` picks), channels-last memory format,
`torch.compile` (first call excluded: its compile time is reported separately), and
batch sizes. On a GPU, also fp16 and bf16 autocast against fp32.

    python benchmarks/embed_variants.py [--model ViT-B-32] [--device auto] [--n 128]

Random weights (pretrained none): speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vlaug.encoders import load_encoder


def images_per_s(encoder, x: torch.Tensor, batch_size: int, repeats: int = 2) -> float:
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(x), batch_size):
            encoder.encode_images(x[i : i + batch_size])
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, len(x) / (time.perf_counter() - start))
    return best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, default=128, help="images per timed pass")
    p.add_argument("--batch-size", type=int, default=64, help="vlaug embed's default")
    p.add_argument("--batch-sizes", default="16,32,128")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on a CPU)")
    p.add_argument("--json")
    args = p.parse_args(argv)

    enc = load_encoder(args.model, "none", args.device, "auto", seed=0)
    size = enc.model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    x = torch.randint(0, 256, (args.n, 3, size, size), dtype=torch.uint8)
    if enc.device.type == "cuda":
        x = x.pin_memory()
    bs = args.batch_size
    images_per_s(enc, x[:bs], bs, 1)  # warm-up
    rows = [{"variant": f"default ({enc.precision}, eager, batch {bs})", "images_per_s": images_per_s(enc, x, bs)}]
    for b in [int(v) for v in args.batch_sizes.split(",") if v]:
        images_per_s(enc, x[:b], b, 1)
        rows.append({"variant": f"batch {b}", "images_per_s": images_per_s(enc, x, b)})
    if enc.device.type == "cuda":
        for precision in ("fp32", "fp16", "bf16"):
            if precision == enc.precision:
                continue
            other = load_encoder(args.model, "none", args.device, precision, seed=0)
            images_per_s(other, x[:bs], bs, 1)
            rows.append({"variant": f"precision {precision}", "images_per_s": images_per_s(other, x, bs)})
            del other
    enc.model = enc.model.to(memory_format=torch.channels_last)
    images_per_s(enc, x[:bs], bs, 1)
    rows.append({"variant": "channels-last", "images_per_s": images_per_s(enc, x, bs)})
    enc.model = enc.model.to(memory_format=torch.contiguous_format)
    compile_s = None
    if not args.no_compile:
        eager = enc.model.encode_image
        enc.model.encode_image = torch.compile(eager)
        start = time.perf_counter()
        images_per_s(enc, x[:bs], bs, 1)  # compiles
        compile_s = time.perf_counter() - start
        rows.append({"variant": "torch.compile (after compiling)", "images_per_s": images_per_s(enc, x, bs)})
        enc.model.encode_image = eager
    base = rows[0]["images_per_s"]
    for r in rows:
        r["ratio"] = r["images_per_s"] / base
    out = {"model": args.model, "device": str(enc.device), "n": args.n, "image_size": size, "threads": torch.get_num_threads(),
           "rows": rows, "compile_s": compile_s}
    for r in rows:
        print(f"{r['variant']:<40} {r['images_per_s']:8.1f} images/s   {r['ratio']:.2f}x")
    if compile_s is not None:
        print(f"torch.compile took {compile_s:.0f} s to compile")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
