"""Non-negative OMP: subsetsel's solver modes against one pick per step and a textbook reference.

Modes (--modes, comma-separated, one row each; all run the same solver, `nonneg_omp`):
  1        one atom per step (textbook OMP: the picks of re-solving from scratch each step)
  default  the Grad-Match default: ceil(k / OMP_STEPS) atoms per step, pruned from a pool of
           OMP_POOL times as many top-correlated atoms (`subsetsel.selection.gradmatch`)
  top32    the previous default: ceil(k / 32) atoms per step, the top-correlated ones
  P[:POOL[:ROUNDS]]  P atoms per step (an int, or /S for ceil(k / S)), optional pool and rounds
Every row is compared with mode `1` on the same problem: time ratio (1 pick / mode, > 1 is
faster) and residual ratio (mode / 1 pick, <= 1.05 is the target). Repeats alternate the modes
and report medians.

Problems (--sizes NxDxK): rows a_i = mu + xi_i (mu ~ N(0, 0.25 I), xi_i ~ N(0, I)), target
b = sum_i a_i (the Grad-Match target: the full gradient), float32, lambda = --lam. With
--gradmatch-job the per-class problems of the default training job are added: the job
(`subsetsel train`, defaults: mnist1d, cnn1d, gradmatch, 20 epochs, select every 5) runs once in
this process, every round's batched per-class problem is recorded and re-solved here (lambda
0.5, the strategy's); its residual is the mean over the classes.
The reference (--reference sizes) is the straightforward algorithm the original Grad-Match code
follows: correlations A r, pick the best unchosen atom, re-solve the non-negative ridge least
squares on all chosen atoms from scratch (scipy.optimize.nnls on [A_S^T; sqrt(lam) I]).

    python scripts/bench_omp.py --threads 1 --repeats 3 --gradmatch-job
    python scripts/bench_omp.py --sizes 5000x500x500 --reference 5000x500x500 --modes 1,default
    python scripts/bench_omp.py --gradmatch-job --reference all,job    # every problem, slow
    python scripts/bench_omp.py --device cuda --sizes 50000x5130x5000 --modes 1,default
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls

from subsetsel.selection import gradmatch
from subsetsel.selection.gradients import LastLayerFactors
from subsetsel.selection.gradmatch import OMP_POOL, OMP_ROUNDS, OMP_TAPER, auto_picks_per_step
from subsetsel.selection.omp import DenseAtoms, nonneg_omp

Problem = tuple[str, Callable[[], Any], torch.Tensor, float]  # name, atoms factory, budgets, lam


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


def mode_kwargs(mode: str, k: int) -> dict[str, Any]:
    """nonneg_omp keywords for a --modes entry and the largest budget k."""
    if mode == "1":
        return {"picks_per_step": 1}
    if mode == "default":
        return {"picks_per_step": auto_picks_per_step(k), "pool": OMP_POOL, "rounds": OMP_ROUNDS,
                "taper": OMP_TAPER}
    if mode == "top32":
        return {"picks_per_step": max(1, math.ceil(k / 32))}
    parts = mode.split(":")
    picks = math.ceil(k / int(parts[0][1:])) if parts[0].startswith("/") else int(parts[0])
    out: dict[str, Any] = {"picks_per_step": max(1, picks)}
    if len(parts) > 1:
        out["pool"] = float(parts[1])
    if len(parts) > 2:
        out["rounds"] = int(parts[2])
    return out


def solve(problem: Problem, mode: str, device: torch.device):
    """(seconds, result) of one solve."""
    _, atoms_of, budgets, lam = problem
    atoms = atoms_of()
    sync(device)
    start = time.perf_counter()
    result = nonneg_omp(atoms, budgets, lam=lam, **mode_kwargs(mode, int(budgets.max())))
    sync(device)
    return time.perf_counter() - start, result


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


def reference_job(atoms: Any, budgets: torch.Tensor, lam: float) -> tuple[float, float]:
    """The reference on each class of a recorded Grad-Match round, one after another, on the
    dense gradient rows rebuilt from the factors: (total seconds, mean relative residual)."""
    c, d, f = atoms.c, atoms.dim_e, atoms._f  # rows [delta | e | bias flag]
    seconds, residuals = 0.0, []
    for p in range(atoms.batch):
        n = int(atoms.counts[p])
        rows = LastLayerFactors(f[p, :n, :c], f[p, :n, c : c + d], bool(atoms.bias)).rows()
        spent, idx, w = reference(rows, atoms.target[p], int(budgets[p]), lam)
        seconds += spent
        residuals.append(relative_residual(rows, atoms.target[p], idx, w))
    return seconds, sum(residuals) / len(residuals)


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    words = ("", "none", "job", "all")
    parts = [part for part in text.split(",") if part.strip().lower() not in words]
    return [tuple(int(v) for v in part.split("x")) for part in parts]  # type: ignore


def gradmatch_job_problems(device: torch.device) -> list[Problem]:
    """Run the default training job once and record each Grad-Match round's OMP problem."""
    from subsetsel.cli import main as cli

    recorded: list[Problem] = []
    solver = gradmatch.nonneg_omp

    def record(atoms: Any, budgets: torch.Tensor, **kwargs: Any):
        name = f"gradmatch job round {len(recorded)} ({int(budgets.numel())} classes)"
        recorded.append((name, lambda: atoms, budgets.clone(), float(kwargs["lam"])))
        return solver(atoms, budgets, **kwargs)

    gradmatch.nonneg_omp = record
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cli(["train", "--quiet", "--device", device.type, "--out", os.path.join(tmp, "run"),
                 "--save-selections", os.path.join(tmp, "sel.h5")], standalone_mode=False)
    finally:
        gradmatch.nonneg_omp = solver
    return recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000x500x500,5000x1000x500,20000x1000x1000",
                        help="comma-separated NxDxK random problems ('none': no random ones)")
    parser.add_argument("--reference", default="none",
                        help="also run with the reference: sizes (of --sizes), 'all' (every size), "
                        "'job' (the --gradmatch-job rounds, class by class), or 'none'")
    parser.add_argument("--gradmatch-job", action="store_true",
                        help="add the per-class problems of the default training job's rounds")
    parser.add_argument("--lam", type=float, default=0.0, help="ridge weight of random problems")
    parser.add_argument("--modes", default="1,top32,default",
                        help="comma-separated solver modes (see the module docstring)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = [m.strip() for m in args.modes.split(",")]
    if "1" not in modes:
        modes.insert(0, "1")
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    problems: list[Problem] = []
    ref_words = args.reference.lower().split(",")
    ref_sizes = set(parse_sizes(args.sizes if "all" in ref_words else args.reference))
    ref_job = "job" in ref_words
    dense = {}
    for n, d, k in parse_sizes(args.sizes):
        a, b = make_problem(n, d, args.seed, device)
        dense[f"{n}x{d}x{k}"] = (a, b, k)
        problems.append((f"{n}x{d}x{k}", lambda a=a, b=b: DenseAtoms(a, b),
                         torch.tensor([k]), args.lam))
    if args.gradmatch_job:
        problems += gradmatch_job_problems(device)
    print(f"{'problem':>38} {'mode':>8} {'picks':>5} {'steps':>5} | {'seconds':>8} "
          f"{'residual':>9} | {'1 pick/mode':>11} {'res/1 pick':>10}")
    for problem in problems:
        name, _, budgets, _ = problem
        k = int(budgets.max())
        solve(problem, "1", device)  # warm-up (kernels, allocator)
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        results = {}
        for _ in range(args.repeats):
            for mode in modes:
                seconds, results[mode] = solve(problem, mode, device)
                times[mode].append(seconds)
        median = {mode: sorted(v)[len(v) // 2] for mode, v in times.items()}
        residual = {mode: float(r.residual.double().mean()) for mode, r in results.items()}
        for mode in modes:
            ratio = (f"{residual[mode] / residual['1']:>10.3f}" if residual["1"] > 1e-6
                     else f"{'(0)':>10}")
            print(f"{name:>38} {mode:>8} {mode_kwargs(mode, k)['picks_per_step']:>5} "
                  f"{results[mode].objective.shape[1] - 1:>5} | {median[mode]:>8.3f} "
                  f"{residual[mode]:>9.5f} | {median['1'] / median[mode]:>10.1f}x {ratio}",
                  flush=True)
        if name in dense and tuple(int(v) for v in name.split("x")) in ref_sizes:
            a, b, k = dense[name]
            seconds, idx, w = reference(a, b, k, args.lam)
            ref_residual, steps = relative_residual(a, b, idx, w), len(idx)
        elif name not in dense and ref_job:
            seconds, ref_residual = reference_job(problem[1](), budgets, problem[3])
            steps = k
        else:
            continue
        faster = ", ".join(f"{mode} {seconds / median[mode]:.1f}x" for mode in modes)
        versus = ", ".join(f"{mode} {residual[mode] / ref_residual:.3f}" for mode in modes
                           if ref_residual > 1e-6)
        print(f"{name:>38} {'ref':>8} {1:>5} {steps:>5} | {seconds:>8.2f} {ref_residual:>9.5f} | "
              f"faster than ref: {faster}" + (f"; residual / ref: {versus}" if versus else ""),
              flush=True)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
