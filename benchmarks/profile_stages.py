"""Where the time goes in stages 2 and 3: an operator profile of each hot loop.

  train-box: one epoch of `vlaug.loop.fit` on the box head (in memory);
  probe:     `vlaug.probe.fit_probe`, one weight decay, in memory;
  streamed:  one pass of the probe's objective over a cache read from disk (what every
             L-BFGS evaluation costs when the cache is larger than --memory-budget): its
             parts (decoding Parquet, half -> float and checks, row selection, the probe's
             forward + backward) timed one after the other, and the real pass, where a
             background thread decodes while the probe computes.

The first two use torch.profiler: each operator's self time as a share of the wall time;
"outside torch operators" is the rest (Python, the optimiser's bookkeeping, data movement
that is not an operator).

    python benchmarks/profile_stages.py [--n 50000] [--stream-rows 250000] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import larger_than_memory  # noqa: E402

from vlaug import cache  # noqa: E402
from vlaug.cache.read import embeddings_to_numpy  # noqa: E402
from vlaug.devices import resolve_device  # noqa: E402
from vlaug.heads import BoxConfig, BoxHead, box_loss  # noqa: E402
from vlaug.probe import Rows, fit_probe, probe_objective  # noqa: E402
from vlaug.loop import fit  # noqa: E402


def profile(fn, top: int = 6) -> dict:
    """Run ``fn`` under torch.profiler; the ``top`` operators by self time, as shares of the wall time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        fn()
    wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    in_ops = sum(e.self_cpu_time_total for e in events) / 1e6
    rows = [{"op": e.key, "share": e.self_cpu_time_total / 1e6 / wall, "calls": e.count} for e in events[:top]]
    rows.append({"op": "other torch operators", "share": (in_ops - sum(r["share"] for r in rows) * wall) / wall, "calls": None})
    rows.append({"op": "outside torch operators", "share": max(0.0, wall - in_ops) / wall, "calls": None})
    return {"wall_s": wall, "ops": rows}


def synthetic(n: int, d: int, c: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    y = torch.randint(c, (n,), generator=g)
    x = F.normalize(centres[y] + 0.08 * torch.randn(n, d, generator=g), dim=-1)
    return x.to(device), y.to(device), centres.to(device)


def streamed_pass(path: Path, rows: np.ndarray, labels: torch.Tensor, n_classes: int, chunk_rows: int) -> dict:
    """One pass of the probe's objective over a cache on disk: each part timed alone, in
    sequence (decode, convert, select, compute), then the real pass, whose reader decodes
    in a background thread while the probe computes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = cache.read_manifest(path)
    d = manifest.embed_dim
    W = torch.zeros(d, n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    w = 1.0 / len(rows)
    parts = {}

    start = time.perf_counter()
    batches = [batch.column(0) for p in manifest.parts
               for batch in pq.ParquetFile(path / cache.IMAGES_DIR / p).iter_batches(batch_size=chunk_rows, columns=["embedding"])]
    parts["read + decode Parquet"] = time.perf_counter() - start

    start = time.perf_counter()
    chunks, first = [], 0
    for col in batches:
        emb = embeddings_to_numpy(pa.chunked_array([col]), d, str(path))
        chunks.append((first, emb))
        first += len(emb)
    parts["half -> float and finiteness check"] = time.perf_counter() - start
    del batches

    start = time.perf_counter()
    selected = list(cache.take_rows(chunks, rows))
    parts["select the training rows"] = time.perf_counter() - start
    del chunks

    def objective(blocks):
        for pos, emb in blocks:
            x = torch.as_tensor(emb)
            probe_objective(x, W, b, labels[rows[pos]], torch.full((len(x),), w), 0.0).backward()

    start = time.perf_counter()
    objective(selected)
    parts["probe forward + backward"] = time.perf_counter() - start
    del selected

    start = time.perf_counter()
    objective(cache.take_rows(cache.iter_embeddings(path, chunk_rows), rows))
    return {"rows": int(manifest.n_images), "train_rows": int(len(rows)), "pass_s": time.perf_counter() - start,
            "parts": parts}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50000, help="rows for train-box and the in-memory probe")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--stream-rows", type=int, default=250000)
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    args = p.parse_args(argv)
    dev = resolve_device(args.device)
    x, y, text = synthetic(args.n, args.d, args.classes, dev)
    torch.manual_seed(0)

    head = BoxHead(BoxConfig().bind(args.d, args.classes)).to(dev)
    loss = lambda m, xb, yb: box_loss(*m(xb), text, yb)  # noqa: E731
    split = int(0.8 * args.n)
    fit(head, loss, x_train=x[:2048], y_train=y[:2048], x_val=x[:0], y_val=y[:0], epochs=1, batch_size=512)  # warm-up
    box = profile(lambda: fit(head, loss, x_train=x[:split], y_train=y[:split], x_val=x[split:], y_val=y[split:],
                              epochs=1, batch_size=512, generator=torch.Generator().manual_seed(0)))

    rows = Rows.of(x[:split], y[:split], n_classes=args.classes)
    fit_probe(Rows.of(x[:1000], y[:1000], n_classes=args.classes), 1e-3, max_iter=10)  # warm-up
    probe = profile(lambda: fit_probe(rows, 1e-3, max_iter=50))

    root = Path(tempfile.mkdtemp(prefix="vlaug-profile-"))
    try:
        larger_than_memory.write_cache(root / "cache", args.stream_rows, args.d, args.classes)
        labels = torch.as_tensor(cache.read_columns(root / "cache", ["label"])["label"].astype(np.int64))
        train_rows = np.sort(np.random.default_rng(0).choice(args.stream_rows, int(0.64 * args.stream_rows), replace=False))
        streamed = streamed_pass(root / "cache", train_rows, labels, args.classes, chunk_rows=32768)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"device": str(dev), "n": args.n, "d": args.d, "classes": args.classes, "threads": torch.get_num_threads(),
              "train_box": box, "probe": probe, "streamed": streamed}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
