"""Stage-2 training speed: vlaug's loop against a straightforward reference loop.

For each head (box, dr-sa, dr-pool, lads) on a synthetic 50,000 x 512 cache with 100
classes, one process, same model, loss, optimiser and batch size:
  reference: a torch DataLoader over a TensorDataset (shuffle=True), the loop most
             research code writes;
  vlaug:     vlaug.loop.fit (tensors stay on the device, batches sliced from a seeded
             permutation; it also computes the validation loss, here on 0 rows).
Reports training samples per second and the ratio vlaug / reference.

    python benchmarks/train_heads.py [--n 50000] [--d 512] [--epochs 1] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vlaug.cache import CacheManifest, FeatureCache
from vlaug.devices import resolve_device
from vlaug.heads import make_head_config
from vlaug.loop import fit
from vlaug.train import build_training


def synthetic_cache(n: int, d: int, n_classes: int, seed: int = 0) -> FeatureCache:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, d)).astype(np.float32)
    labels = rng.integers(0, n_classes, n)
    x = centres[labels] + rng.standard_normal((n, d)).astype(np.float32) * 2
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    texts = {"classes": unit(centres), "photo": unit(centres + 0.1), "sketch": unit(centres - 0.1)}
    manifest = CacheManifest(model="synthetic", embed_dim=d, classes=[f"c{i}" for i in range(n_classes)])
    empty = np.array([""] * n)
    return FeatureCache(manifest, [str(i) for i in range(n)], [""] * n, labels, empty, empty, x, texts)


def reference_loop(module, loss_fn, x, y, epochs, batch_size, lr, weight_decay):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    module.train()
    for _ in range(epochs):
        for xb, yb in loader:
            loss, _ = loss_fn(module, xb, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()


def time_head(head: str, feats: FeatureCache, device: torch.device, epochs: int) -> dict:
    options = {"source": "photo", "targets": ("sketch",)} if head == "lads" else {}
    config = make_head_config(head, **options).bind(feats.manifest.embed_dim, len(feats.classes))
    batch_size, lr, weight_decay = config.BATCH_SIZE, 1e-3, 0.01  # vlaug train-box's defaults
    x = torch.as_tensor(feats.embeddings, device=device)
    y = torch.as_tensor(feats.labels, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {"head": head, "batch_size": batch_size}
    for name in ("reference", "vlaug"):
        torch.manual_seed(0)
        module, loss_fn = build_training(config, feats.texts, device)
        # warm-up step outside the timing
        loss_fn(module, x[:batch_size], y[:batch_size])[0].backward()
        sync()
        start = time.perf_counter()
        if name == "reference":
            reference_loop(module, loss_fn, x, y, epochs, batch_size, lr, weight_decay)
        else:
            fit(module, loss_fn, x_train=x, y_train=y, x_val=x[:0], y_val=y[:0], epochs=epochs, batch_size=batch_size,
                lr=lr, weight_decay=weight_decay, generator=torch.Generator().manual_seed(0))
        sync()
        out[f"{name}_samples_per_s"] = epochs * len(x) / (time.perf_counter() - start)
    out["ratio"] = out["vlaug_samples_per_s"] / out["reference_samples_per_s"]
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--heads", default="box,dr-sa,dr-pool,lads")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    feats = synthetic_cache(args.n, args.d, args.classes)
    rows = [time_head(h, feats, device, args.epochs) for h in args.heads.split(",")]
    print(f"{args.n} x {args.d}, {args.classes} classes, {args.epochs} epoch(s), device {device}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'head':8} {'batch':>5} {'reference/s':>12} {'vlaug/s':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['head']:8} {r['batch_size']:>5} {r['reference_samples_per_s']:>12.0f} "
              f"{r['vlaug_samples_per_s']:>10.0f} {r['ratio']:>6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
