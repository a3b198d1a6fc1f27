"""Embedding throughput: how close `vlaug embed` gets to the model's own speed.

On the same model, images and batch size, in one process:
  (a) ceiling: the model's forward pass alone on already-decoded, preprocessed tensors;
  (b) naive:   open, decode, preprocess and encode batch by batch in one thread;
  (c) vlaug:   vlaug.embed_source (DataLoader workers decode while the model runs; writes the cache).
Reports images/s and the ratios c/a (target >= 0.9: decoding hidden behind the model) and c/b.

    python benchmarks/embed_throughput.py [--model ViT-B-32] [--n-images 192] [--batch-size 32]

Random weights (pretrained none): the speed of a forward pass does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlaug.embed import EmbedConfig, embed_source, load_image
from vlaug.encoders import load_encoder


def make_images(root: Path, n: int, size: int, n_classes: int = 4) -> list[Path]:
    """Photo-like JPEGs (smooth gradients plus noise) in class folders."""
    rng = np.random.default_rng(0)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        c0, c1 = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
        img = c0 * xx[..., None] + c1 * yy[..., None] + rng.normal(0, 20, (size, size, 3))
        path = root / f"class{i % n_classes}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return sorted(paths)


def time_ceiling(encoder, tensors: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(tensors), batch_size):
        encoder.encode_images(tensors[i : i + batch_size])
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    return len(tensors) / (time.perf_counter() - start)


def time_naive(encoder, paths: list[Path], batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        batch = torch.stack([encoder.preprocess(load_image(str(p))) for p in paths[i : i + batch_size]])
        encoder.encode_images(batch).cpu()
    return len(paths) / (time.perf_counter() - start)


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "images", args.n_images, args.image_size)
        encoder = load_encoder(args.model, "none", args.device, args.precision, seed=0)
        tensors = torch.stack([encoder.preprocess(load_image(str(p))) for p in paths])
        if encoder.device.type == "cuda":
            tensors = tensors.pin_memory()
        time_ceiling(encoder, tensors[: args.batch_size], args.batch_size)  # warm-up
        results = {"a_ceiling": [], "b_naive": [], "c_vlaug": []}
        for r in range(args.repeats):
            results["a_ceiling"].append(time_ceiling(encoder, tensors, args.batch_size))
            results["b_naive"].append(time_naive(encoder, paths, args.batch_size))
            res = embed_source(
                EmbedConfig(
                    source=str(tmp / "images"), out=str(tmp / f"cache{r}"), model=args.model, pretrained="none",
                    device=args.device, precision=args.precision, batch_size=args.batch_size, workers=args.workers,
                    progress=False,
                ),
                log=lambda msg: None,
            )
            results["c_vlaug"].append(res.images_per_s)
        best = {k: max(v) for k, v in results.items()}
        return {
            "model": args.model,
            "device": str(encoder.device),
            "device_name": torch.cuda.get_device_name() if encoder.device.type == "cuda" else platform.processor() or platform.machine(),
            "precision": encoder.precision,
            "batch_size": args.batch_size,
            "n_images": args.n_images,
            "image_size": args.image_size,
            "workers": args.workers,
            "torch_threads": torch.get_num_threads(),
            "images_per_s": best,
            "c_over_a": best["c_vlaug"] / best["a_ceiling"],
            "c_over_b": best["c_vlaug"] / best["b_naive"],
            "all_runs": results,
        }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--n-images", type=int, default=192)
    p.add_argument("--image-size", type=int, default=384, help="side of the generated JPEGs before preprocessing")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--workers", type=int, default=-1)
    p.add_argument("--repeats", type=int, default=2, help="best of N for each variant")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    out = run(args)
    ips = out["images_per_s"]
    print(f"{out['model']} on {out['device']} ({out['device_name']}), {out['precision']}, batch {out['batch_size']}, "
          f"{out['n_images']} images of {out['image_size']} px, {out['torch_threads']} torch threads")
    print(f"(a) model alone   {ips['a_ceiling']:8.1f} images/s")
    print(f"(b) naive loop    {ips['b_naive']:8.1f} images/s")
    print(f"(c) vlaug embed   {ips['c_vlaug']:8.1f} images/s")
    print(f"c/a = {out['c_over_a']:.3f}   c/b = {out['c_over_b']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
