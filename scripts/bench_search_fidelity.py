"""Search fidelity: does a grid search over a replayed subset rank configurations like the same
grid on the full data, at a fraction of the time?

Steps (each a `subsetsel` command, printed before it runs, timed by wall clock):
1. full-data search: `subsetsel search --full-data --sampler grid --param ...`
2. one selection file: `subsetsel select --strategy S --fraction F --save-selections ...`
   (S = gradmatchpb if registered, else randompb; override with --strategy; `select` is `train`
   without test evaluations: the file is what this run is for)
3. subset search: the same grid replaying that file, then `--retrain-best` on the full data.
Reports Spearman and Kendall rank correlations of the trials' accuracies between the two searches,
the full-data accuracy of the subset search's best configuration versus the full-data search's
best, and the total times (subset total = making the selection file + the subset search).

    python scripts/bench_search_fidelity.py --out bench/search-fidelity
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scipy import stats

DEFAULT_GRID = ["lr=0.01,0.1", "optimizer=sgd,adam", "weight_decay=0,5e-4"]
RUNNER = "import sys; from subsetsel.cli import main; sys.argv[0] = 'subsetsel'; main()"


CPU = {"total": 0.0}  # CPU seconds (user + sys) of the commands run so far


def subsetsel(args: list[str]) -> tuple[float, str]:
    """Run `subsetsel ARGS` in a fresh process; return (wall seconds, stdout). Its CPU seconds
    are added to CPU["last"] / CPU["total"]."""
    print(f"$ subsetsel {shlex.join(args)}", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    CPU["last"] = cpu
    CPU["total"] += cpu
    if done.returncode:
        sys.exit(f"command failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    print(f"  ({seconds:.1f} s wall, {cpu:.1f} s CPU)", flush=True)
    return seconds, done.stdout


def best_strategy() -> str:
    _, out = subsetsel(["list", "--json"])
    names = json.loads(out)["strategies"]
    return "gradmatchpb" if "gradmatchpb" in names else "randompb"


def load_trials(folder: Path, names: list[str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Params tuple -> results row (COMPLETE trials of a search's results.json)."""
    meta = json.loads((folder / "results.json").read_text())
    return {
        tuple(r[n] for n in names): r for r in meta["trials"] if r["state"] == "COMPLETE"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/search-fidelity", help="fresh output folder")
    parser.add_argument("--param", action="append", help=f"grid (default {DEFAULT_GRID})")
    parser.add_argument("--strategy", help="default: gradmatchpb if registered, else randompb")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--train-size", type=int)
    parser.add_argument("--test-size", type=int)
    parser.add_argument("--model", help="default: the dataset's default model")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP threads per process (--threads and OMP_NUM_THREADS); "
                             "on a shared machine 1 avoids oversubscribed OpenMP threads "
                             "stalling each other")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty: give a fresh --out (timings must not include resumes)")
    out.mkdir(parents=True, exist_ok=True)
    grid = args.param or DEFAULT_GRID
    names = [p.split("=", 1)[0].replace("-", "_") for p in grid]
    common = ["--dataset", args.dataset, "--epochs", str(args.epochs), "--seed", str(args.seed)]
    for flag, value in (("--train-size", args.train_size), ("--test-size", args.test_size),
                        ("--model", args.model)):
        if value is not None:
            common += [flag, str(value)]
    search = ["search", "--sampler", "grid", "--workers", str(args.workers), "--threads",
              str(args.threads), "--quiet"]
    for p in grid:
        search += ["--param", p]
    print(f"load average at start: {os.getloadavg()}, cpus: {os.cpu_count()}, threads per "
          f"process: {args.threads}", flush=True)
    strategy = args.strategy or best_strategy()

    full_s, _ = subsetsel([*search, "--full-data", *common, "--out", str(out / "full")])
    full_cpu = CPU["last"]
    sel = out / "selection.h5"
    select_s, _ = subsetsel(
        ["select", "--strategy", strategy, "--fraction", str(args.fraction), *common,
         "--threads", str(args.threads), "--save-selections", str(sel),
         "--out", str(out / "select-run"), "--quiet"]
    )
    subset_cpu = CPU["last"]
    subset_s, _ = subsetsel([*search, "--selections", str(sel), *common, "--out",
                             str(out / "subset")])
    subset_cpu += CPU["last"]
    retrain_s, _ = subsetsel([*search, "--selections", str(sel), *common, "--out",
                              str(out / "subset"), "--retrain-best"])
    retrain_cpu = CPU["last"]

    full, subset = load_trials(out / "full", names), load_trials(out / "subset", names)
    keys = sorted(full, key=lambda k: -full[k]["acc"])
    if set(keys) != set(subset):
        sys.exit(f"the two searches hold different configurations: {set(keys) ^ set(subset)}")
    full_acc = [full[k]["acc"] for k in keys]
    subset_acc = [subset[k]["acc"] for k in keys]
    spearman = stats.spearmanr(full_acc, subset_acc).statistic
    kendall = stats.kendalltau(full_acc, subset_acc).statistic
    meta = json.loads((out / "subset" / "results.json").read_text())
    retrained = meta["retrain_best"]
    best_subset_key = tuple(retrained["params"][n] for n in names)
    full_best = full[keys[0]]
    gap = 100 * (full_best["acc"] - retrained["final_acc"])
    subset_total = select_s + subset_s
    full_train = sum(r["train_seconds"] for r in full.values())
    subset_train = sum(r["train_seconds"] for r in subset.values())
    select_run = json.loads((out / "select-run" / "summary.json").read_text())

    print(f"\nsearch fidelity: {len(keys)} configurations, grid {' x '.join(grid)}; "
          f"subset = {strategy} {args.fraction:g} replayed")
    header = f"{'configuration':44s} {'full acc':>8s} {'subset acc':>10s} {'full s':>7s} " \
             f"{'subset s':>8s} {'speedup':>7s}"
    print(header)
    for k in keys:
        f, s = full[k], subset[k]
        label = " ".join(f"{n}={v:g}" if isinstance(v, float) else f"{n}={v}"
                         for n, v in zip(names, k, strict=True))
        print(f"{label:44s} {f['acc']:8.4f} {s['acc']:10.4f} {f['train_seconds']:7.1f} "
              f"{s['train_seconds']:8.1f} {f['train_seconds'] / s['train_seconds']:6.2f}x")
    print(f"rank correlation of accuracies: Spearman {spearman:.3f}, Kendall {kendall:.3f}")
    print(f"full-data search best: {full_best['acc']:.4f} ({keys[0]})")
    print(f"subset search best {best_subset_key}, retrained on full data: "
          f"{retrained['final_acc']:.4f} (the full-data search's trial of that configuration: "
          f"{full[best_subset_key]['acc']:.4f}); gap {gap:+.2f} points")
    print(f"wall time: full-data search {full_s:.1f} s; subset: selection file {select_s:.1f} s "
          f"+ search {subset_s:.1f} s = {subset_total:.1f} s -> {full_s / subset_total:.2f}x "
          f"less; with the retraining of the best ({retrain_s:.1f} s): "
          f"{full_s / (subset_total + retrain_s):.2f}x")
    print(f"CPU time: full-data search {full_cpu:.1f} s; subset (selection file + search) "
          f"{subset_cpu:.1f} s -> {full_cpu / subset_cpu:.2f}x less; with the retraining "
          f"({retrain_cpu:.1f} s): {full_cpu / (subset_cpu + retrain_cpu):.2f}x")
    print(f"sum of trial training seconds: full {full_train:.1f} s, subset {subset_train:.1f} s "
          f"({full_train / subset_train:.2f}x); selection run "
          f"{select_run['elapsed_seconds']:.1f} s (selecting {select_run['select_seconds']:.1f} s)")
    goal = gap <= 0.5 and full_s / subset_total >= 5
    print(f"goal (within 0.5 point at >= 5x less total time): {'met' if goal else 'missed'}")
    print(f"load average at end: {os.getloadavg()}")
    summary = {
        "grid": grid, "strategy": strategy, "fraction": args.fraction, "common": common,
        "spearman": spearman, "kendall": kendall, "full_best_acc": full_best["acc"],
        "full_best_params": list(keys[0]), "subset_best_params": list(best_subset_key),
        "retrained_acc": retrained["final_acc"], "gap_points": gap,
        "seconds": {"full_search": full_s, "selection_file": select_s, "subset_search": subset_s,
                    "retrain_best": retrain_s, "full_trials_train": full_train,
                    "subset_trials_train": subset_train},
        "cpu_seconds": {"full_search": full_cpu, "subset_total": subset_cpu,
                        "retrain_best": retrain_cpu},
        "threads": args.threads,
        "load_average_end": os.getloadavg(),
        "configurations": [
            {"params": list(k), "full_acc": full[k]["acc"], "subset_acc": subset[k]["acc"],
             "full_seconds": full[k]["train_seconds"], "subset_seconds": subset[k]["train_seconds"]}
            for k in keys
        ],
        "goal_met": goal,
    }
    (out / "fidelity.json").write_text(json.dumps(summary, indent=2))
    print(f"written: {out / 'fidelity.json'}")


if __name__ == "__main__":
    main()
