"""Re-create the bundled demo images in data/shapes/ (5 shapes x 3 domains x 20 images).

    python data/generate.py [--out data/shapes] [--n-per-class 20] [--seed 0]
"""

import argparse
from pathlib import Path

from vlaug.demo_data import generate

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent / "shapes"))
    p.add_argument("--n-per-class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    n = generate(args.out, args.n_per_class, args.seed)
    print(f"wrote {n} images to {args.out}")
