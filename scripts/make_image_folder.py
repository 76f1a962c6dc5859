"""Write a small ImageFolder (PNG files) from scikit-learn's digits, offline.

    python scripts/make_image_folder.py data/digits-folder [--size 32] [--val 0.2] [--seed 0]

Layout: PATH/train/<class>/<n>.png and PATH/val/<class>/<n>.png, one folder per digit, RGB
images of SIZE x SIZE pixels (the 8x8 digits enlarged, with a seeded colour tint per image so
the three channels differ). Then: `subsetsel train --dataset folder:PATH`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def make_image_folder(root: Path, size: int = 32, val: float = 0.2, seed: int = 0,
                      limit: int | None = None) -> tuple[int, int]:
    """Write the folder; return (train images, val images). `limit`: at most this many
    images in all (for tests)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))[: limit or None]
    n_val = int(round(val * len(order)))
    counts = [0, 0]
    for rank, i in enumerate(order):
        split = "val" if rank < n_val else "train"
        gray = (digits.images[i] / 16.0 * 255).astype(np.uint8)
        tint = rng.uniform(0.6, 1.0, size=3)
        rgb = np.stack([gray * t for t in tint], axis=-1).astype(np.uint8)
        image = Image.fromarray(rgb).resize((size, size), Image.NEAREST)
        folder = root / split / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.png")
        counts[split == "val"] += 1
    return counts[0], counts[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--val", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    train, val = make_image_folder(args.root, args.size, args.val, args.seed, args.limit)
    print(f"wrote {train} train and {val} val images under {args.root}")


if __name__ == "__main__":
    main()
