"""Non-negative OMP: subsetsel's solver against a textbook reference, on random gradient-like data.

The reference is the straightforward algorithm the original Grad-Match code follows: each step
computes the correlations A r, picks the best not-yet-chosen atom, then re-solves the
non-negative ridge least squares on all chosen atoms from scratch (scipy.optimize.nnls on
[A_S^T; sqrt(lam) I] w = [b; 0]). Ours: `subsetsel.selection.omp.nonneg_omp` (incremental
Lawson-Hanson with an updated inverse Gram matrix, batched, no per-step host sync).

Data: rows a_i = mu + xi_i (mu ~ N(0, 0.25 I), xi_i ~ N(0, I)), target b = sum_i a_i (the
Grad-Match target: the full gradient), float32. Prints seconds and the relative residual
||A_S^T w - b|| / ||b|| for both, and the speed ratio.

    python scripts/bench_omp.py --sizes 5000x500x500,20000x1000x1000 --reference 5000x500x500
    python scripts/bench_omp.py --device cuda --sizes 50000x5130x5000 --reference none \
        --picks 1,auto

--picks: atoms added per OMP step (comma-separated values, one row each); 'auto' is the
strategies' default, ceil(k / 32). The reference always adds one atom per step.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time

import numpy as np
import torch
from scipy.optimize import nnls

from subsetsel.selection.gradmatch import auto_picks_per_step
from subsetsel.selection.omp import DenseAtoms, nonneg_omp


def make_problem(n: int, d: int, seed: int, device: torch.device):
    gen = torch.Generator().manual_seed(seed)
    mu = 0.5 * torch.randn(d, generator=gen)
    a = torch.randn(n, d, generator=gen) + mu
    return a.to(device), a.sum(0, dtype=torch.float64).to(device)


def relative_residual(
    a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
) -> float:
    r = b.double() - w.double().to(a.device) @ a[idx.to(a.device)].double()
    return float(r.norm() / b.double().norm())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(a: torch.Tensor, b: torch.Tensor, k: int, lam: float, picks: int = 1):
    sync(a.device)
    start = time.perf_counter()
    result = nonneg_omp(DenseAtoms(a, b), k, lam=lam, picks_per_step=picks)
    sync(a.device)
    seconds = time.perf_counter() - start
    keep = result.slots[0] >= 0
    return seconds, result.slots[0][keep], result.weights[0][keep]


def reference(a: torch.Tensor, b: torch.Tensor, k: int, lam: float):
    """Textbook NN-OMP: full NNLS re-solve on the chosen atoms at every step."""
    sync(a.device)
    start = time.perf_counter()
    b64 = b.double().cpu().numpy()
    chosen: list[int] = []
    mask = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
    r = b.to(torch.float32)
    w = np.zeros(0)
    for _ in range(k):
        corr = (a @ r).masked_fill(mask, -math.inf)
        best, j = corr.max(0)
        if float(best) <= 0:
            break
        chosen.append(int(j))
        mask[j] = True
        a_s = a[chosen].double().cpu().numpy()
        m = np.vstack([a_s.T, math.sqrt(lam) * np.eye(len(chosen))])
        w = nnls(m, np.concatenate([b64, np.zeros(len(chosen))]), maxiter=50 * len(chosen))[0]
        r = (b.double() - torch.from_numpy(w).to(a.device) @ a[chosen].double()).float()
    sync(a.device)
    return time.perf_counter() - start, torch.tensor(chosen), torch.from_numpy(w)


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    if text.strip().lower() in ("", "none"):
        return []
    return [tuple(int(v) for v in part.split("x")) for part in text.split(",")]  # type: ignore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000x500x500,20000x1000x1000",
                        help="comma-separated NxDxK problems for our solver")
    parser.add_argument("--reference", default="5000x500x500",
                        help="sizes (subset of --sizes, or 'none') also run with the reference")
    parser.add_argument("--lam", type=float, default=0.0, help="ridge weight lambda")
    parser.add_argument("--picks", default="1",
                        help="atoms per OMP step, comma-separated; 'auto': ceil(k / 32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    ref_sizes = set(parse_sizes(args.reference))
    print(f"{'N':>7} {'d':>6} {'k':>6} {'picks':>5} | {'ours s':>9} {'ours res':>9} | "
          f"{'ref s':>9} {'ref res':>9} | {'speedup':>8}")
    for n, d, k in parse_sizes(args.sizes):
        a, b = make_problem(n, d, args.seed, device)
        ref = reference(a, b, k, args.lam) if (n, d, k) in ref_sizes else None
        for text in args.picks.split(","):
            picks = auto_picks_per_step(k) if text.strip() == "auto" else int(text)
            ours(a[: 4 * picks + 200], b, 2 * picks + 5, args.lam, picks)  # warm-up: kernels
            runs = [ours(a, b, k, args.lam, picks) for _ in range(args.repeats)]
            seconds = sorted(r[0] for r in runs)[len(runs) // 2]
            res = relative_residual(a, b, runs[0][1], runs[0][2])
            line = f"{n:>7} {d:>6} {k:>6} {picks:>5} | {seconds:>9.3f} {res:>9.5f} | "
            if ref is not None:
                ref_res = relative_residual(a, b, ref[1], ref[2])
                line += f"{ref[0]:>9.2f} {ref_res:>9.5f} | {ref[0] / seconds:>7.1f}x"
            else:
                line += f"{'-':>9} {'-':>9} | {'-':>8}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
