"""Measure subsetsel's per-class NN-OMP solve on this CPU, fit a cost model, and project one
distributed Grad-Match round on ImageNet-1k (1.28M examples, 1000 classes, ResNet-50: D = 2048)
on 8 and 64 GPUs: factor memory per rank, exchange-to-owner volume, OMP time, selection forward,
all as a fraction of a training epoch. Every number printed is tagged:

  measured  timed here, in this process (min of --repeats)
  computed  arithmetic on measured numbers, on subsetsel's own formulas, or on the sizes
  assumed   an input we did not measure (GPU speed, bandwidth, ResNet-50 throughput); each is
            a command-line option, so the table can be recomputed with other assumptions

What is timed is exactly what `gradmatch` runs per class (default settings): the target
`_factor_sums` of the class's factors and `GradMatch._solve` on `LastLayerAtoms` (nonneg_omp in
the default pool mode, ceil(k/16) atoms per step, fewer at the end, then complete_to_budget), on
synthetic factors delta = softmax(z) - onehot(c) (n_c x C), e = relu(N(0, 1)) (n_c x D).

    python scripts/project_distributed.py [--repeats 2] [--worlds 8,64] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch
from scipy.optimize import nnls
from torch.utils._python_dispatch import TorchDispatchMode

from subsetsel.selection.base import budget
from subsetsel.selection.gradients import LastLayerAtoms
from subsetsel.selection.gradmatch import (
    OMP_STEPS,
    GradMatch,
    GradMatchPB,
    Shape,
    _factor_sums,
    _halvings,
    class_budgets,
)

# ImageNet-1k as the issue states it
N_CLASSES, PER_CLASS, EMB = 1000, 1281, 2048
FRACTION = 0.1


def problem(n: int, c_full: int, d: int, per_gradient: bool, seed: int = 0):
    """One class's factors (class 0): delta (1, n, c), emb (1, n, d), target, counts."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, n, c_full, generator=g) * 2.0
    delta = torch.softmax(z, 2)
    delta[..., 0] -= 1.0
    if per_gradient:
        delta = delta[..., :1].contiguous()
    emb = torch.relu(torch.randn(1, n, d, generator=g))
    return delta, emb


def solve_once(n: int, c_full: int, d: int, k: int, per_gradient: bool = False
               ) -> tuple[float, float, dict]:
    """(seconds of the target sum, seconds of GradMatch._solve, its last_info)."""
    delta, emb = problem(n, c_full, d, per_gradient)
    start = time.perf_counter()
    target = _factor_sums(delta, emb, True)
    t_target = time.perf_counter() - start
    atoms = LastLayerAtoms(delta, emb, torch.tensor([n]), target, True)
    strategy = GradMatch(fraction=FRACTION, per_gradient=per_gradient)
    start = time.perf_counter()
    strategy._solve(atoms, torch.tensor([k]), k)
    return t_target, time.perf_counter() - start, dict(strategy.last_info)


def bmm_gflops(c: int, d: int, n: int, calls: int) -> tuple[float, float]:
    """Measured fp32 (c x d)(d x n) bmm, the correlation product of one OMP step: (GFLOP/s,
    seconds), the best of `calls` (the machine is shared: the minimum is the uncontended
    speed)."""
    a, b = torch.randn(1, c, d), torch.randn(1, d, n)
    best = math.inf
    for _ in range(calls):
        start = time.perf_counter()
        torch.bmm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * c * d * n / best / 1e9, best


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.count += 1
        return func(*args, **(kwargs or {}))


def op_count(k: int) -> int:
    """aten ops dispatched by one default-mode solve with budget k (small C, D: the count
    depends on the steps, not on the sizes). On a GPU each is at least one kernel launch."""
    delta, emb = problem(PER_CLASS, 10, 64, False)
    atoms = LastLayerAtoms(delta, emb, torch.tensor([PER_CLASS]),
                           _factor_sums(delta, emb, True), True)
    with _CountOps() as mode:
        GradMatch(fraction=FRACTION)._solve(atoms, torch.tensor([k]), k)
    return mode.count


def gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB" if x >= 1e8 else f"{x / 1e6:,.2f} MB"


def secs(x: float) -> str:
    return f"{x:,.3f} s" if x < 10 else f"{x:,.1f} s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worlds", default="8,64")
    p.add_argument("--quick", action="store_true", help="skip the C = 1000 measurements")
    p.add_argument("--gpu-fp32-tflops", type=float, default=15.0,
                   help="assumed achieved fp32 matmul TFLOP/s of one GPU (A100: 19.5 peak)")
    p.add_argument("--launch-us", type=float, default=10.0,
                   help="assumed GPU seconds per dispatched op (launch-bound floor), in us")
    p.add_argument("--train-ips", type=float, default=16621 / 8,
                   help="assumed ResNet-50 training images/s per GPU (NVIDIA DGX A100, AMP, "
                        "8 GPUs: 16621 img/s)")
    p.add_argument("--eval-ratio", type=float, default=3.0,
                   help="assumed eval-forward / training throughput ratio (forward ~ 1/3 of "
                        "forward + backward)")
    p.add_argument("--nvlink-gbs", type=float, default=200.0,
                   help="assumed achieved GB/s into one GPU inside a node")
    p.add_argument("--ib-gbs", type=float, default=25.0,
                   help="assumed achieved GB/s into one GPU across nodes (200 Gb/s NIC per GPU)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem-gib", type=float, default=80.0,
                   help="assumed free memory per GPU (GiB) for subsetsel's placement rule")
    p.add_argument("--pb-batch", type=int, default=256,
                   help="per-rank batch size, the PB partition's batch (assumed)")
    args = p.parse_args()
    torch.set_num_threads(1)

    print("$ PYTHONPATH=$PWD python " + " ".join(shlex.quote(a) for a in sys.argv))
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    print(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {cpu}, "
          f"{os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}, 1 torch "
          f"thread; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()

    # ---- 1. measurements ------------------------------------------------------------------
    points = [  # (n_c, C, D, k_c, per_gradient)
        (320, 100, 512, 32, False), (1281, 100, 512, 129, False),
        (320, 100, 2048, 32, False), (1281, 100, 2048, 129, False),
        (1281, 100, 2048, 64, False), (1281, 100, 2048, 256, False),
        (1281, 1000, 2048, 129, True),
    ]
    if not args.quick:
        points += [(640, 1000, 1024, 64, False), (1281, 1000, 2048, 256, False),
                   (1281, 1000, 2048, 129, False)]
    gflops, t_bmm = bmm_gflops(N_CLASSES, EMB, PER_CLASS, 9)
    rows = []
    print("## Measured: one class's NN-OMP (GradMatch._solve, default pool mode), 1 CPU thread")
    print()
    print("| n_c | C | D | k_c | factor row c | atoms/step | OMP steps | target s | solve s | "
          "per-class s (target + solve) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, c_full, d, k, pg in points:
        best = (math.inf, math.inf, {})
        for _ in range(args.repeats):
            tt, ts, info = solve_once(n, c_full, d, k, pg)
            if tt + ts < best[0] + best[1]:
                best = (tt, ts, info)
        tt, ts, info = best
        c = 1 if pg else c_full
        rows.append((n, c, d, k, info["omp_steps"], tt, ts, pg))
        print(f"| {n} | {c_full} | {d} | {k} | {c}{' (--per-gradient)' if pg else ''} | "
              f"{info['picks_per_step']} | {info['omp_steps']} | {tt:.3f} | {ts:.3f} | "
              f"{tt + ts:.3f} |")
    print()

    # ---- 2. cost model --------------------------------------------------------------------
    # solve ~ a * S n c D (correlations of all atoms, fp32) + b * S k c D (residual update,
    # support products, fp64) + g * S (the step's small ops); S = OMP steps (18-25 by default:
    # ceil(k/16) atoms per step, tapered at the end, so S hardly depends on k); target ~ n c D
    feats = np.array([[s * n * c * d, s * k * c * d, s] for n, c, d, k, s, _, _, _ in rows])
    times = np.array([ts for *_, ts, _ in rows])
    coef, _ = nnls(feats / feats.max(0), times)
    coef = coef / feats.max(0)
    gflops2, t_bmm2 = bmm_gflops(N_CLASSES, EMB, PER_CLASS, 9)  # again: the best of both
    if t_bmm2 < t_bmm:
        gflops, t_bmm = gflops2, t_bmm2
    print("## Cost model (computed: non-negative least squares on the rows above)")
    print()
    print(f"solve seconds = {coef[0]:.3e} * S*n_c*c*D + {coef[1]:.3e} * S*k_c*c*D + "
          f"{coef[2]:.3e} * S   (S = OMP steps; c = C, or 1 with --per-gradient)")
    print()
    print("| n_c | c | D | k_c | S | measured s | model s | share of S*n*c*D term | "
          "share of S*k*c*D | share of per-step ops |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for f, (n, c, d, k, s, _, ts, _) in zip(feats, rows, strict=True):
        parts = f * coef
        tot = parts.sum()
        print(f"| {n} | {c} | {d} | {k} | {s} | {ts:.3f} | {tot:.3f} | "
              f"{parts[0] / tot:.0%} | {parts[1] / tot:.0%} | {parts[2] / tot:.0%} |")
    print()
    anchor = [r for r in rows if (r[0], r[1], r[2], r[3]) == (PER_CLASS, N_CLASSES, EMB, 129)]
    pg_row = [r for r in rows if r[7]][0]
    if anchor:
        n, c, d, k, s, tt, ts, _ = anchor[0]
        t_class = tt + ts
        share = (s + 2) * t_bmm / ts
        print(f"measured: one correlation product (1000 x 2048)(2048 x 1281) fp32 takes "
              f"{t_bmm * 1e3:.1f} ms ({gflops:.1f} GFLOP/s); the solve makes S + 2 = {s + 2} "
              f"of them: {share:.0%} of the measured ImageNet-size solve ({ts:.2f} s).")
    else:  # --quick: the model's prediction for the ImageNet class
        s = pg_row[4]
        t_class = float(np.array([s * PER_CLASS * N_CLASSES * EMB, s * 129 * N_CLASSES * EMB,
                                  s]) @ coef)
        print(f"computed (--quick): the model's ImageNet per-class solve: {t_class:.2f} s")
    t_class_pg = pg_row[5] + pg_row[6]
    ops = op_count(129)
    print(f"measured: one default solve with k_c = 129 dispatches {ops:,} aten ops")
    print()

    # ---- 3. projection ----------------------------------------------------------------------
    n_total = N_CLASSES * PER_CLASS
    labels = torch.arange(n_total) % N_CLASSES
    k_total = budget(FRACTION, n_total)
    budgets = class_budgets(k_total, torch.bincount(labels))
    ratio = args.gpu_fp32_tflops * 1e3 / gflops  # GPU / CPU-core throughput on the same bmm
    eval_ips = args.train_ips * args.eval_ratio
    room = 0.5 * args.gpu_mem_gib * 2**30  # memory_share 0.5 (the default)
    bytes_row = 4 * (N_CLASSES + EMB)  # delta (C) + e (D), float32
    bytes_row_pg = 4 * (1 + EMB)
    full_row = 4 * N_CLASSES * (EMB + 1)
    worlds = [int(w) for w in args.worlds.split(",")]
    table: list[tuple[str, str, list[str]]] = []

    def add(what: str, kind: str, values: list[str]) -> None:
        table.append((what, kind, values))

    add("examples / classes / budget k (10 %) / k_c", "computed",
        [f"{n_total:,} / {N_CLASSES} / {k_total:,} / {int(budgets.min())}-"
         f"{int(budgets.max())}"] * len(worlds))
    add("stored per example: delta (C) + e (D), fp32", "computed",
        [f"{bytes_row:,} B (the full row C(1+D) = {full_row / 1e6:.1f} MB is never stored)"]
        * len(worlds))
    vals: dict[str, list[str]] = {}
    for w in worlds:
        shard = math.ceil(n_total / w)
        classes = math.ceil(N_CLASSES / w)
        owned_rows = classes * PER_CLASS
        strategy = GradMatch(fraction=FRACTION)
        shape = Shape(n_total, labels, torch.arange(n_total), k_total, EMB, N_CLASSES,
                      args.pb_batch, w)
        factor_bytes = strategy._factor_bytes(shape)
        problems = strategy._problems(shape)  # _placement sizes groups for all classes
        group = next((g for g in sorted({problems, *_halvings(problems)}, reverse=True)
                      if factor_bytes + strategy._work_bytes(shape, g) <= room), 1)
        groups = math.ceil(classes / group)
        sent = shard * bytes_row
        wire = sent * (w - 1) / w
        total = n_total * bytes_row
        picks = k_total * 12  # int64 index + float32 weight per pick, all-gathered
        nodes = math.ceil(w / args.gpus_per_node)
        # one all_to_all: every rank sends its shard's other-owner rows over its own links at
        # once (classes are balanced over owners, so inbound equals outbound)
        if nodes == 1:
            t_x = wire / (args.nvlink_gbs * 1e9)
        else:  # the off-node share goes over the rank's network link, the rest over NVLink
            t_x = sent * (w - args.gpus_per_node) / w / (args.ib_gbs * 1e9)
        cpu_omp = classes * t_class
        gpu_omp = cpu_omp / ratio + groups * ops * args.launch_us * 1e-6
        fwd = shard / eval_ips
        epoch_full = shard / args.train_ips
        epoch_sub = FRACTION * epoch_full
        round_s = fwd + t_x + gpu_omp
        # PB: every rank materialises all m batch rows C(1+D) and all-reduces them
        m = math.ceil(n_total / args.pb_batch)
        pb_rows = m * full_row
        pb_work = GradMatchPB(fraction=FRACTION)._work_bytes(shape, 1)
        link = args.nvlink_gbs if nodes == 1 else args.ib_gbs
        pb_allreduce = 2.0 * (w - 1) / w * pb_rows / (link * 1e9)
        pb_flops = 2.0 * shard * N_CLASSES * EMB  # this rank's outer products into the rows
        v = {
            "ranks (nodes of --gpus-per-node)": f"{w} ({nodes})",
            "classes solved per rank": f"{classes}",
            "factor memory per rank: own shard (fp32)": f"{gb(factor_bytes)} ({shard:,} rows)",
            "factor memory per rank after the exchange": f"{gb(owned_rows * bytes_row)}",
            "peak during the exchange (~5 copies alive, read from dist.py)":
                f"~{gb(5 * shard * bytes_row)}",
            "OMP work memory (subsetsel's _work_bytes) for the classes solved at once":
                f"{gb(strategy._work_bytes(shape, min(group, classes)))} "
                f"({min(group, classes)} classes x {groups} batch(es))",
            "--per-gradient: factor memory per rank": f"{gb(shard * bytes_row_pg)}",
            "exchange sent per rank per round (incl. own share; sent_bytes)": gb(sent),
            "exchange over the wire per rank per round": gb(wire),
            "exchange total over all ranks per round": gb(total),
            "all_gather of picks, received per rank": gb(picks),
            "exchange time (one all_to_all, all links at once)": secs(t_x),
            "OMP per rank, CPU-core seconds": secs(cpu_omp),
            "OMP per rank, GPU seconds (compute / R + launch floor)": secs(gpu_omp),
            "OMP per rank, --per-gradient, CPU-core seconds": secs(classes * t_class_pg),
            "selection forward per rank (eval, its shard)": secs(fwd),
            "one round (forward + exchange + OMP, GPU)": secs(round_s),
            "one full-data epoch per rank": secs(epoch_full),
            "one 10 % subset epoch per rank": secs(epoch_sub),
            "round / full-data epoch": f"{round_s / epoch_full:.2f}",
            "round / subset epoch": f"{round_s / epoch_sub:.2f}",
            "OMP + exchange only / full-data epoch": f"{(gpu_omp + t_x) / epoch_full:.3f}",
            "PB (gradmatchpb): batch rows per rank, all-reduced per round":
                f"{gb(pb_rows)} ({m:,} batches x {full_row / 1e6:.1f} MB)",
            "PB: subsetsel's work estimate per rank vs 0.5 x GPU memory":
                f"{gb(pb_work)} vs {gb(room)}",
            "PB: ring all-reduce time of the batch rows": secs(pb_allreduce),
            "PB: outer products per rank, GPU seconds": secs(pb_flops / (args.gpu_fp32_tflops
                                                                        * 1e12)),
        }
        for key, val in v.items():
            vals.setdefault(key, []).append(val)
    kinds = {
        "ranks (nodes of --gpus-per-node)": "assumed",
        "exchange time (one all_to_all, all links at once)": "computed from assumed bandwidth",
        "OMP per rank, CPU-core seconds": "computed from measured",
        "OMP per rank, GPU seconds (compute / R + launch floor)":
            "computed from measured + assumed",
        "OMP per rank, --per-gradient, CPU-core seconds": "computed from measured",
        "selection forward per rank (eval, its shard)": "computed from assumed",
        "one round (forward + exchange + OMP, GPU)": "computed from measured + assumed",
        "one full-data epoch per rank": "computed from assumed",
        "one 10 % subset epoch per rank": "computed from assumed",
        "round / full-data epoch": "computed from measured + assumed",
        "round / subset epoch": "computed from measured + assumed",
        "OMP + exchange only / full-data epoch": "computed from measured + assumed",
        "PB: outer products per rank, GPU seconds": "computed from assumed",
        "PB: ring all-reduce time of the batch rows": "computed from assumed bandwidth",
        "PB: subsetsel's work estimate per rank vs 0.5 x GPU memory": "computed (+ assumed memory)",
    }
    for key, values in vals.items():
        add(key, kinds.get(key, "computed"), values)

    print("## Projection: ImageNet-1k, per-class gradmatch, fraction 0.1 (one selection round)")
    print()
    print("| quantity | kind | " + " | ".join(f"{w} GPUs" for w in worlds) + " |")
    print("|---|---|" + "---|" * len(worlds))
    for what, kind, values in table:
        print(f"| {what} | {kind} | " + " | ".join(values) + " |")
    print()
    print("Inputs:")
    print(f"- measured: ImageNet-size class (n_c {PER_CLASS}, C {N_CLASSES}, D {EMB}, k_c 129) "
          f"{t_class:.2f} s per class on one CPU core (target {'+'} solve); --per-gradient "
          f"{t_class_pg:.3f} s; fp32 bmm {gflops:.1f} GFLOP/s on one core; {ops:,} ops per solve")
    print(f"- assumed: GPU achieved fp32 matmul {args.gpu_fp32_tflops:g} TFLOP/s (A100 peak "
          f"19.5 TFLOP/s without TF32; torch leaves TF32 matmuls off by default), so R = "
          f"GPU / CPU-core = {ratio:,.0f}; {args.launch_us:g} us per op on the GPU, paid once "
          "per solve batch")
    print(f"- assumed: ResNet-50 training {args.train_ips:,.0f} img/s per GPU (NVIDIA "
          "DeepLearningExamples RN50 v1.5, DGX A100 8x A100 80GB, AMP: 16,621 img/s on 8 GPUs), "
          f"the same per GPU on 64; eval forward {args.eval_ratio:g}x that = {eval_ips:,.0f} "
          "img/s (their V100 numbers: AMP inference 3,382 img/s vs training 8,322/8 = 1,040, "
          "3.25x); data loading is not modelled")
    print(f"- assumed: {args.nvlink_gbs:g} GB/s into a GPU within a node, {args.ib_gbs:g} GB/s "
          f"across nodes, {args.gpus_per_node} GPUs per node, {args.gpu_mem_gib:g} GiB free per "
          f"GPU (memory_share 0.5), PB batch {args.pb_batch}")
    print(f"- default OMP mode: ceil(k_c/{OMP_STEPS}) atoms per step (pool 5x, 8 rounds), at "
          "most ceil((k_c - t)/4) once the budget nears (taper), so S ~ 18-25 steps whatever "
          "k_c; each step computes the correlations of all n_c atoms, one (n_c x D)(D x c) "
          "product: the S*n_c*c*D term dominates")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
