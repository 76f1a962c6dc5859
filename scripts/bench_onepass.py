"""One Pass ImageNet's table, reproduced in shape on MNIST-1D: accuracy / storage / compute.

Runs, per seed (each seed also generates its own MNIST-1D data set and initialisation):
  - multi-epoch reference: `subsetsel train --strategy full` for E epochs (compute 100 %), and
    for each matched budget k+1 epochs (the "multi-epoch, 100 % storage" column);
  - naive one pass (k = 0, no buffer);
  - uniform and error-prioritised replay at each storage share and each k;
  - an ablation at one (storage, k): FIFO vs reservoir, alpha, alpha decay, no importance weights.
Prints mean ± std over seeds as markdown tables, and the equivalent CLI commands.

    python scripts/bench_onepass.py [--seeds 0 1 2] [--train-size 20000] [--ks 1 3 5 8]
    python scripts/bench_onepass.py --from-json results.json   # re-print saved tables
    python scripts/bench_onepass.py --overhead                 # replay step vs plain step
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

import torch

from subsetsel.data import load_dataset
from subsetsel.data.base import Batch
from subsetsel.onepass.stream import OnePassConfig, OnePassTrainer
from subsetsel.online.base import StepBatch
from subsetsel.train import TrainConfig, Trainer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--storages", type=float, nargs="+", default=[0.01, 0.05, 0.10])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5, 8])
    parser.add_argument("--reference-epochs", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=OnePassConfig.alpha)
    parser.add_argument("--ablation-storage", type=float, default=0.05)
    parser.add_argument("--ablation-k", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json-out", help="Write every run's numbers here as JSON.")
    parser.add_argument("--from-json", help="Print the tables of a saved --json-out, run nothing.")
    parser.add_argument("--overhead", action="store_true",
                        help="Only time a replay step against a plain step.")
    return parser.parse_args()


def reference(data: Any, seed: int, epochs: int) -> dict[str, Any]:
    config = TrainConfig(strategy="full", fraction=1.0, epochs=epochs, seed=seed, device="cpu")
    start = time.perf_counter()
    summary = Trainer(config, dataset=data).fit()
    return {"acc": summary["final_acc"], "seconds": time.perf_counter() - start}


_CACHE: dict[str, dict[str, Any]] = {}


def onepass(data: Any, seed: int, reference_epochs: int, **kw: Any) -> dict[str, Any]:
    """One one-pass run (a configuration already run for this seed is not run again)."""
    config = OnePassConfig(seed=seed, device="cpu", log_every=1.0,
                           reference_epochs=reference_epochs, **kw)
    key = json.dumps(config.to_json(), sort_keys=True)
    if key not in _CACHE:
        _CACHE[key] = _run_onepass(config, data)
    return _CACHE[key]


def _run_onepass(config: OnePassConfig, data: Any) -> dict[str, Any]:
    start = time.perf_counter()
    s = OnePassTrainer(config, dataset=data).fit()
    return {"acc": s["final_acc"], "storage_pct": s["storage_pct"],
            "compute_pct": s["compute_pct"], "seconds": time.perf_counter() - start}


def fmt(values: list[float]) -> str:
    """Accuracy in % as mean ± std over seeds."""
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.1f}"
    return f"{statistics.mean(pct):.1f} ± {statistics.stdev(pct):.1f}"


def ablation_variants(alpha: float) -> dict[str, dict[str, Any]]:
    """Name -> OnePassConfig fields of the ablation rows."""
    return {
        "uniform, fifo": {"priority": "uniform", "alpha": alpha},
        "uniform, reservoir": {"priority": "uniform", "alpha": alpha, "insertion": "reservoir"},
        "error a=0.5": {"priority": "error", "alpha": 0.5},
        f"error a={alpha:g}": {"priority": "error", "alpha": alpha},
        "error a=1.0": {"priority": "error", "alpha": 1.0},
        f"error a={alpha:g}, cosine decay": {
            "priority": "error", "alpha": alpha, "alpha_decay": "cosine"},
        f"error a={alpha:g}, no IS weights": {
            "priority": "error", "alpha": alpha, "importance_weights": False},
    }


def run_all(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every run of the benchmark: name -> one result per seed."""
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    e_ref = args.reference_epochs
    wall = time.perf_counter()
    for seed in args.seeds:
        data = load_dataset("mnist1d", seed=seed, train_size=args.train_size,
                            test_size=args.test_size)
        for epochs in sorted({e_ref, *(k + 1 for k in args.ks)}):
            results[f"multi-epoch {epochs}"].append(reference(data, seed, epochs))
        results["naive"].append(onepass(data, seed, e_ref, replay_steps=0))
        for storage in args.storages:
            for k in args.ks:
                for priority in ("uniform", "error"):
                    run = onepass(data, seed, e_ref, storage=storage, replay_steps=k,
                                  priority=priority, alpha=args.alpha)
                    results[f"{priority} m={storage:g} k={k}"].append(run)
        for name, kw in ablation_variants(args.alpha).items():
            results[f"ablation {name}"].append(onepass(
                data, seed, e_ref, storage=args.ablation_storage, replay_steps=args.ablation_k,
                **kw))
        print(f"seed {seed} done after {time.perf_counter() - wall:.0f} s", flush=True)
    seconds = sum(r["seconds"] for runs in results.values() for r in runs)
    print(f"total wall time {time.perf_counter() - wall:.0f} s (runs {seconds:.0f} s)")
    return results


def report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> None:
    """Print the markdown tables."""
    from scipy.stats import binomtest, ttest_1samp

    e_ref = args.reference_epochs
    acc = {name: [r["acc"] for r in runs] for name, runs in results.items()}
    best = max(args.ks)
    print("\n## Headline (mean ± std over seeds)\n")
    print("| method | accuracy (%) | storage (%) | compute (%) |")
    print("|---|---|---|---|")
    print(f"| multi-epoch ({e_ref} epochs) | {fmt(acc[f'multi-epoch {e_ref}'])} | 100 | 100 |")
    naive = results["naive"][0]
    print(f"| one pass, naive | {fmt(acc['naive'])} | {naive['storage_pct']:.0f} "
          f"| {naive['compute_pct']:.1f} |")
    top = max(args.storages)
    for priority in ("uniform", "error"):
        run = results[f"{priority} m={top:g} k={best}"][0]
        cell = fmt(acc[f"{priority} m={top:g} k={best}"])
        print(f"| one pass, {priority} replay (k={best}) | {cell} | {run['storage_pct']:.0f} "
              f"| {run['compute_pct']:.1f} |")

    print("\n## Accuracy (%) by compute and storage (mean ± std over seeds)\n")
    heads = " | ".join(f"{p} {100 * m:g} %" for p in ("uniform", "error") for m in args.storages)
    print(f"| k | effective epochs | compute (%) | {heads} | multi-epoch, 100 % storage |")
    print("|---" * (4 + 2 * len(args.storages)) + "|")
    notes: list[str] = []
    for k in args.ks:
        cells = " | ".join(fmt(acc[f"{p} m={m:g} k={k}"])
                           for p in ("uniform", "error") for m in args.storages)
        computes = [results[f"uniform m={m:g} k={k}"][0]["compute_pct"] for m in args.storages]
        if max(computes) - min(computes) > 0.05:  # buffers smaller than a batch replay less
            notes.append(f"k={k}: compute by storage {[round(c, 1) for c in computes]} %")
        print(f"| {k} | {k + 1} | {computes[-1]:.1f} | {cells} | "
              f"{fmt(acc[f'multi-epoch {k + 1}'])} |")
    for note in notes:
        print(f"\nnote: {note}")

    print(f"\n## Error priority minus uniform, in accuracy points (mean over "
          f"{len(args.seeds)} paired seeds)\n")
    print("| storage | " + " | ".join(f"k={k}" for k in args.ks) + " |")
    print("|---" * (1 + len(args.ks)) + "|")
    diffs = []
    for m in args.storages:
        row = []
        for k in args.ks:
            d = [100 * (e - u) for e, u in zip(acc[f"error m={m:g} k={k}"],
                                                acc[f"uniform m={m:g} k={k}"], strict=True)]
            diffs += d
            row.append(f"{statistics.mean(d):+.2f}")
        print(f"| {100 * m:g} % | " + " | ".join(row) + " |")
    wins = sum(d > 0 for d in diffs)
    print(f"\nall {len(diffs)} pairs: mean {statistics.mean(diffs):+.2f} points "
          f"(std {statistics.stdev(diffs):.2f}); error better in {wins}, worse in "
          f"{sum(d < 0 for d in diffs)}, tied in {sum(d == 0 for d in diffs)}; "
          f"t-test p = {ttest_1samp(diffs, 0).pvalue:.2f}, sign test p = "
          f"{binomtest(wins, sum(d != 0 for d in diffs)).pvalue:.2f}")

    print(f"\n## Ablation at storage {100 * args.ablation_storage:g} %, k = {args.ablation_k}\n")
    print("| variant | accuracy (%) |")
    print("|---|---|")
    for name in ablation_variants(args.alpha):
        print(f"| {name} | {fmt(acc[f'ablation {name}'])} |")

    print("\nCLI equivalents (one seed):")
    print(f"  subsetsel train --strategy full --fraction 1 --epochs {e_ref} --seed 0 --quiet")
    print("  subsetsel onepass --replay-steps 0 --seed 0 --quiet")
    print(f"  subsetsel onepass --storage {top:g} --replay-steps {best} --priority uniform "
          "--seed 0 --quiet")
    print(f"  subsetsel onepass --storage {top:g} --replay-steps {best} --priority error "
          f"--alpha {args.alpha:g} --seed 0 --quiet")


def _advance(stream: Any, trainer: OnePassTrainer, kind: str) -> None:
    """Take the steps of the one-pass stream up to and including the next one of `kind`."""
    while True:
        step = next(stream)
        trainer.policy.observe(step, trainer.engine.step(step))
        if step.tag[0] == kind:
            return


def overhead(args: argparse.Namespace, rounds: int = 7, steps: int = 100) -> None:
    """Median seconds of a replay step (sample, gather, step, refresh) vs a plain step on a
    fixed batch, alternating in one process."""
    data = load_dataset("mnist1d", seed=0, train_size=args.train_size, test_size=args.test_size)
    for priority in ("uniform", "error"):
        config = OnePassConfig(storage=max(args.storages), replay_steps=1, priority=priority,
                               alpha=args.alpha, device="cpu")
        trainer = OnePassTrainer(config, dataset=data)
        engine, policy = trainer.engine, trainer.policy
        stream = iter(policy.plan(trainer.feed.open(0).reader, engine.context()))
        while len(trainer.buffer) < trainer.buffer.capacity:
            _advance(stream, trainer, "incoming")
        x, y = data.x_train[: config.batch_size], data.y_train[: config.batch_size]
        fixed = StepBatch(Batch(torch.arange(len(y)), x, y, torch.ones(len(y))), mean_loss=True)
        plain, replay = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(steps):
                engine.step(fixed)
            plain.append((time.perf_counter() - start) / steps)
            start = time.perf_counter()
            for _ in range(steps):
                _advance(stream, trainer, "replay")
            replay.append((time.perf_counter() - start) / steps)
        p, r = statistics.median(plain), statistics.median(replay)
        print(f"{priority}: plain step {1e3 * p:.3f} ms, replay step {1e3 * r:.3f} ms, "
              f"ratio {r / p:.3f} (buffer {len(trainer.buffer)} rows)")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        keep = {"from_json", "json_out", "overhead"}
        args = argparse.Namespace(**{**saved["args"], **{k: getattr(args, k) for k in keep}})
        results = saved["results"]
        print(f"(tables re-rendered from {args.from_json})")
    print(f"torch {torch.__version__}, {args.threads} thread(s), train {args.train_size}, "
          f"test {args.test_size}, seeds {args.seeds}")
    if args.overhead:
        overhead(args)
        return
    if not args.from_json:
        results = run_all(args)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump({"args": vars(args), "results": results}, f, indent=1)
    report(args, results)


if __name__ == "__main__":
    main()
