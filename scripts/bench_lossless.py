"""InfoBatch (lossless dynamic pruning) against full-data training and random at equal budget.

Per setting and seed (the `subsetsel train` defaults otherwise: cnn1d, SGD, cosine, 20 epochs,
batch 128, data seed 0; the training seed varies):
  full       every example every epoch;
  infobatch  --prune-ratio 0.5 --delta 0.875 (the defaults);
  random     a fresh uniform subset every epoch (--select-every 1), its fraction set to the
             infobatch run's measured backprop share of the same seed (examples backpropagated /
             the full run's): the same training budget, chosen at random.
Settings: `default` (MNIST-1D, 20,000 training examples) and `60k` (--train-size 60000).

Within a seed, full and infobatch run in alternating order (random last), after one
uncounted 1-epoch warm-up run per setting. Time is the engine's `elapsed_seconds` (training +
selection wall time; the test evaluation, done only after the last epoch here, is excluded)
and, less noisy on a shared machine, the training thread's CPU seconds (`time.thread_time`,
the whole fit). Torch uses one thread.
Target (issue 13): infobatch's mean final accuracy within one standard deviation (over seeds) of
full data's, at >= 1.4x less wall time. "Lossless" is judged one-sided (not below full's mean
minus one std); whether it also lies inside ±1 std is printed beside it.

    python scripts/bench_lossless.py [--seeds 0 1 2] [--settings default 60k] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from typing import Any

import torch

from subsetsel.data import load_dataset
from subsetsel.train import TrainConfig, Trainer

SETTINGS = {"default": None, "60k": 60000}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--prune-ratio", type=float, default=0.5)
    parser.add_argument("--delta", type=float, default=0.875)
    parser.add_argument("--lr-per-step", action="store_true",
                        help="Per-step learning rate by progress in epochs (all methods).")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json-out", help="Write every run's summary here as JSON.")
    parser.add_argument("--summarize", metavar="JSON",
                        help="Only print the means tables and verdicts of a --json-out file.")
    return parser.parse_args()


def fit(args: argparse.Namespace, data: Any, train_size: int | None, seed: int, strategy: str,
        **extra: Any) -> dict[str, Any]:
    config = TrainConfig(strategy=strategy, train_size=train_size, epochs=args.epochs, seed=seed,
                         eval_every=0, lr_per_step=args.lr_per_step, **extra)
    cpu = time.thread_time()
    summary = Trainer(config, dataset=data).fit()
    summary["cpu_seconds"] = time.thread_time() - cpu
    summary["method"] = strategy
    return summary


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(setting: str, runs: list[dict[str, Any]]) -> str:
    """Print the means table of one setting; return its verdict line.

    Lossless means infobatch's mean accuracy is not below full data's mean minus one standard
    deviation (over seeds); whether it also lies within ±1 std is printed too."""
    seeds = sorted({r["seed"] for r in runs})
    print(f"\nmeans ± std over seeds {seeds} ({setting}); time ratios are "
          "mean(full) / mean(method)\n")
    print("| method | final acc % | elapsed s | CPU s | backprop share | wall ratio | "
          "CPU ratio |")
    print("|---|---|---|---|---|---|---|")
    stats = {}
    for method in ("full", "infobatch", "random"):
        mine = [r for r in runs if r["method"] == method]
        acc = mean_std([100 * r["final_acc"] for r in mine])
        wall = mean_std([r["elapsed_seconds"] for r in mine])
        cpu = mean_std([r["cpu_seconds"] for r in mine])
        share = statistics.fmean(r["share"] for r in mine)
        stats[method] = (acc, wall, cpu)
        full_wall, full_cpu = stats["full"][1][0], stats["full"][2][0]
        print(f"| {method} | {acc[0]:.2f} ± {acc[1]:.2f} | {wall[0]:.1f} ± {wall[1]:.1f} | "
              f"{cpu[0]:.1f} ± {cpu[1]:.1f} | {share:.3f} | {full_wall / wall[0]:.2f}x | "
              f"{full_cpu / cpu[0]:.2f}x |")
    (fa, fs), (ia, _) = stats["full"][0], stats["infobatch"][0]
    wall_ratio = stats["full"][1][0] / stats["infobatch"][1][0]
    cpu_ratio = stats["full"][2][0] / stats["infobatch"][2][0]
    lossless = ia >= fa - fs
    inside = abs(ia - fa) <= fs
    return (f"{setting}: infobatch {ia:.2f} % vs full {fa:.2f} ± {fs:.2f} % "
            f"({'not below' if lossless else 'BELOW'} full - 1 std; "
            f"{'inside' if inside else 'outside'} ±1 std, {ia - fa:+.2f} points), "
            f"wall ratio {wall_ratio:.2f}x, CPU ratio {cpu_ratio:.2f}x "
            f"(target >= 1.4x wall); random at the same budget {stats['random'][0][0]:.2f} ± "
            f"{stats['random'][0][1]:.2f} %: target "
            f"{'met' if lossless and wall_ratio >= 1.4 else 'NOT met'}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    if args.summarize:  # the tables of an earlier run's --json-out
        with open(args.summarize) as f:
            saved = json.load(f)
        print("\n".join(summarize(setting, runs) for setting, runs in saved.items()))
        return
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} thread(s), load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    everything: dict[str, list[dict[str, Any]]] = {}
    verdicts = []
    for setting in args.settings:
        train_size = SETTINGS[setting]
        data = load_dataset("mnist1d", train_size=train_size)
        n = len(data)
        print(f"\n## {setting}: MNIST-1D, {n} training examples, {args.epochs} epochs\n")
        print("| seed | method | final acc % | elapsed s | CPU s | backprop share | "
              "wall ratio vs full | CPU ratio vs full |")
        print("|---|---|---|---|---|---|---|---|")
        runs: list[dict[str, Any]] = []
        warm = argparse.Namespace(**{**vars(args), "epochs": 1})
        fit(warm, data, train_size, 0, "full")  # warm-up (allocator, kernels): not counted
        for i, seed in enumerate(args.seeds):
            ib_params = {"prune_ratio": args.prune_ratio, "delta": args.delta}
            if i % 2 == 0:  # alternate which of full / infobatch runs first
                full = fit(args, data, train_size, seed, "full")
                ib = fit(args, data, train_size, seed, "infobatch", strategy_params=ib_params)
            else:
                ib = fit(args, data, train_size, seed, "infobatch", strategy_params=ib_params)
                full = fit(args, data, train_size, seed, "full")
            share = ib["total_backpropagated"] / full["total_backpropagated"]
            rnd = fit(args, data, train_size, seed, "random", fraction=round(share, 4),
                      select_every=1)
            for run in (full, ib, rnd):
                run["seed"], run["setting"] = seed, setting
                run["share"] = run["total_backpropagated"] / full["total_backpropagated"]
                run["wall_ratio"] = full["elapsed_seconds"] / run["elapsed_seconds"]
                run["cpu_ratio"] = full["cpu_seconds"] / run["cpu_seconds"]
                runs.append(run)
                print(f"| {seed} | {run['method']} | {100 * run['final_acc']:.2f} | "
                      f"{run['elapsed_seconds']:.1f} | {run['cpu_seconds']:.1f} | "
                      f"{run['share']:.3f} | {run['wall_ratio']:.2f}x | {run['cpu_ratio']:.2f}x |",
                      flush=True)
        everything[setting] = runs
        verdicts.append(summarize(setting, runs))
        if args.json_out:  # after every setting: a later failure keeps what was measured
            with open(args.json_out, "w") as f:
                json.dump(everything, f, indent=1, default=str)
    print("\n" + "\n".join(verdicts))
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
