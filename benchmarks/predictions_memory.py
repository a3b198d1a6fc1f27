"""What ``test_predictions.parquet`` costs on a DomainNet-size DomainBed run (issue 28):
peak memory and seconds of building the table and writing it, and the file's size.

    python benchmarks/predictions_memory.py [--methods 10] [--seeds 3] [--json FILE]

A cache of DomainNet's six domains and sizes (586,575 rows, 345 classes, d = 2: only ids,
domains and labels matter here) is written, then the predictions of a run of ``--methods``
methods x ``--seeds`` seeds x 6 test domains x 3 model selections (each predicting its
test domain's ``in`` rows, 80 %) go through vlaug's own ``_prediction_table`` and
``_write_predictions``, in a fresh process whose peak RSS (``ru_maxrss``) is reported,
less the peak before the table was built. Run it from two checkouts to compare versions.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# DomainNet (Peng et al., 2019) as DomainBed uses it: images per domain
DOMAINNET = {"clipart": 48_129, "infograph": 53_201, "painting": 75_759, "quickdraw": 172_500, "real": 175_327,
             "sketch": 70_386}
SELECTIONS = ("training-domain", "leave-one-domain-out", "oracle")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from vlaug import cache
    from vlaug.evaluate import _prediction_table
    from vlaug.report import _write_predictions

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache"
        domains = np.concatenate([np.full(n, d, dtype=object) for d, n in DOMAINNET.items()])
        n, classes = len(domains), [f"class{c}" for c in range(345)]
        labels = np.random.default_rng(0).integers(0, 345, n)
        rows = {"id": [f"{d}/class{y}/{i:07d}.jpg" for i, (d, y) in enumerate(zip(domains, labels))],
                "path": [""] * n, "label": labels.tolist(), "class_name": [classes[y] for y in labels],
                "domain": domains.tolist(), "split": [""] * n}
        cache.write_part(path, "part-00000.parquet", rows, np.zeros((n, 2), np.float32), "float32")
        cache.write_texts(path, {"classes": np.eye(345, 2, dtype=np.float32)}, classes)
        cache.write_manifest(path, cache.CacheManifest(model="x", pretrained="none", embed_dim=2, dtype="float32",
                                                       classes=classes, domains=sorted(DOMAINNET), templates=["{}"],
                                                       prompt_sets={}, parts=["part-00000.parquet"], n_images=n, seed=0,
                                                       complete=True))
        feats = cache.read_metadata(str(path))
        del rows

        class Data:  # what _prediction_table reads of RunData
            pass

        data = Data()
        data.feats = feats
        rng = np.random.default_rng(1)
        by_domain = {d: np.flatnonzero(feats.domains == d) for d in DOMAINNET}
        predictions = []
        for seed in range(args.seeds):
            for test, where in by_domain.items():
                test_in = np.sort(rng.choice(where, int(0.8 * len(where)), replace=False))
                for m in range(args.methods):
                    for role in SELECTIONS:
                        predictions.append((f"method{m}", seed, test_in, rng.integers(0, 345, len(test_in)).astype(np.int32),
                                            test, role))
        n_rows = sum(len(p[2]) for p in predictions)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        table = _prediction_table(predictions, data, str(path))
        built = time.perf_counter() - start
        out = Path(tmp) / "test_predictions.parquet"
        _write_predictions(out, table)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = {"rows": n_rows, "methods": args.methods, "seeds": args.seeds, "build_s": round(built, 1),
                  "build_and_write_s": round(seconds, 1), "peak_rss_above_start_mb": round((peak - before) / 1024),
                  "file_mb": round(out.stat().st_size / 2**20, 1)}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
