"""Box size against alpha: does `vlaug train-box --head box` learn boxes whose size follows
--alpha, and not the size of the cache?

For each dimension d and training-set size n, a CLIP-like cache is simulated (class
prompts share a direction: prompt-prompt cosine about 0.75; images share a modality-gap
direction; image-to-own-prompt cosine about 0.3), a box head is trained with vlaug's
defaults (100 epochs, batch 512, AdamW 1e-3) for each alpha, and its `stats.json` is read:
mean corner inner product (1: a point; -1: antipodal corners), mean log-volume, and the
zero-shot accuracy of the points and of 5 uniform samples per box.

    python benchmarks/box_size.py [--alphas 0.1,0.3,0.5,0.7,0.9] [--sizes 400,4000] [--dims 64,256]
                                  [--classes 10] [--epochs 100] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlaug import cache  # noqa: E402
from vlaug.heads import make_head_config  # noqa: E402
from vlaug.simulate import clip_like  # noqa: E402
from vlaug.train import TrainConfig, train_head  # noqa: E402


def write_cache(path: Path, n: int, d: int, n_classes: int) -> Path:
    x, y, text = clip_like(n, d, n_classes)
    classes = [f"class{c}" for c in range(n_classes)]
    rows = {"id": [f"img{i}" for i in range(n)], "path": [""] * n, "label": y.tolist(),
            "class_name": [classes[c] for c in y], "domain": [""] * n, "split": [""] * n}
    cache.write_part(path, "part-00000.parquet", rows, x, "float32")
    cache.write_texts(path, {"classes": text}, classes)
    cache.write_manifest(path, cache.CacheManifest(model="simulated", pretrained="none", embed_dim=d, dtype="float32",
                                                   classes=classes, parts=["part-00000.parquet"], n_images=n, seed=0,
                                                   complete=True))
    return path


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--alphas", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--sizes", default="400,4000", help="rows in the cache (80 %% are fitted on, the rest held out)")
    p.add_argument("--dims", default="64,256")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="two alphas, one small size and dimension, 10 epochs")
    p.add_argument("--json")
    args = p.parse_args(argv)
    alphas = [0.3, 0.7] if args.quick else [float(a) for a in args.alphas.split(",")]
    sizes = [400] if args.quick else [int(s) for s in args.sizes.split(",")]
    dims = [32] if args.quick else [int(s) for s in args.dims.split(",")]
    epochs = 10 if args.quick else args.epochs
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlaug-box-size-") as tmp:
        for d in dims:
            for n in sizes:
                feats = write_cache(Path(tmp) / f"c{d}_{n}", n, d, args.classes)
                for alpha in alphas:
                    start = time.perf_counter()
                    out = Path(tmp) / f"h{d}_{n}_{alpha}"
                    result = train_head(TrainConfig(features=str(feats), out=str(out), head=make_head_config("box", alpha=alpha),
                                                    epochs=epochs, device=args.device, progress=False), log=lambda m: None)
                    stats = json.loads((out / "stats.json").read_text())
                    acc = stats["zero_shot_accuracy"]
                    rows.append({"d": d, "n": n, "n_train": result.n_train, "alpha": alpha,
                                 "corner_inner_product": stats["mean_corner_inner_product"],
                                 "mean_log_volume": stats["mean_log_volume"], "points_accuracy": acc["points"],
                                 "samples_accuracy": acc["samples"], "selected_epoch": result.selected_epoch,
                                 "epochs": len(result.history), "seconds": time.perf_counter() - start})
                    r = rows[-1]
                    print(f"d={d:4} n={n:6} alpha={alpha:.1f}: corner inner product {r['corner_inner_product']:+.3f}, "
                          f"log-volume {r['mean_log_volume']:9.1f}, zero-shot points {100 * r['points_accuracy']:.1f} % "
                          f"samples {100 * r['samples_accuracy']:.1f} %, kept epoch {r['selected_epoch']}/{r['epochs']}, "
                          f"{r['seconds']:.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


def markdown(rows: list[dict]) -> list[str]:
    """The section of docs/benchmarks.md: corner inner product (box-sample accuracy) per alpha."""
    alphas = sorted({r["alpha"] for r in rows})
    lines = ["| d | rows | " + " | ".join(f"α = {a:g}" for a in alphas) + " |", "|---|---|" + "---|" * len(alphas)]
    for d in sorted({r["d"] for r in rows}):
        for n in sorted({r["n"] for r in rows}):
            cells = {r["alpha"]: r for r in rows if r["d"] == d and r["n"] == n}
            lines.append(f"| {d} | {n:,} | " + " | ".join(
                f"{cells[a]['corner_inner_product']:+.2f} ({100 * cells[a]['samples_accuracy']:.0f} %)" for a in alphas) + " |")
    return lines


if __name__ == "__main__":
    main()
