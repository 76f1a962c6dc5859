"""Online sample selection on MNIST-1D, each method against the baseline that decides it.

Runs, per seed (each seed generates its own MNIST-1D data and initialisation), all for E epochs
of SGD (the `subsetsel train` defaults) on the full training set unless named otherwise:
  plain; plain for ceil(E/4 + 3/4) epochs (SB's backprop budget with its own full LR schedule);
  sb; random-keep 0.25 (accumulated, SB's control); stale-sb; sb-keep; random-keep 0.5 in the
  sb-keep window (not accumulated, sb-keep's control); is; is with --tau-th 0 (always on);
  is-uniform (IS's control).
Then data echoing with a simulated slow input, per seed, for E_echo epochs: read cost of R x the
plain step's wall time per batch (R in --ratios; the step is timed by a 2-epoch plain run just
before, so R holds under the machine's current load), echo factors in --factors (1 = the
control: the same prefetching reader, no repeats).

Compares at equal backpropagated examples, equal CPU time and equal wall time (accuracy of the
last epoch whose cumulative counter is within the smaller of the two runs' totals), prints
markdown tables with mean ± std over seeds, and the command that produced them.
CPU time (`cpu_seconds`, added to each record here) is the training thread's CPU time excluding
evaluation: on a shared machine it is far less noisy than wall time. Torch runs on one thread.

    python scripts/bench_online.py [--seeds 0 1 2] [--train-size 4000] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from subsetsel.data import load_dataset
from subsetsel.train import TrainConfig, Trainer

Run = list[dict[str, Any]]  # the per-epoch log records of one run


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--echo-epochs", type=int, default=6)
    parser.add_argument("--echo-seeds", type=int, nargs="+", default=None,
                        help="Seeds for the echoing runs (default: --seeds).")
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                        help="Read cost per batch as a multiple of the plain step time.")
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json-out", help="Write every run's log records here as JSON.")
    return parser.parse_args()


# ---- the runs --------------------------------------------------------------------------------
def selection_runs(epochs: int) -> dict[str, tuple[int, str, dict[str, Any]]]:
    """name -> (epochs, policy, policy params)."""
    short = math.ceil(epochs / 4 + 0.75)
    window = {"keep_start": 0.5, "keep_end": 0.9, "interrupt": 2}
    return {
        "plain": (epochs, "plain", {}),
        f"plain-{short}ep": (short, "plain", {}),
        "sb": (epochs, "sb", {}),
        "random-keep": (epochs, "random-keep", {"keep": 0.25}),
        "stale-sb": (epochs, "stale-sb", {}),
        "sb-keep": (epochs, "sb-keep", {}),
        "random-keep-window": (epochs, "random-keep",
                               {"keep": 0.5, "accumulate": False, **window}),
        "is": (epochs, "is", {}),
        "is-on": (epochs, "is", {"tau_th": 0.0}),
        "is-uniform": (epochs, "is-uniform", {}),
    }


def cli_command(args: argparse.Namespace, seed: int, epochs: int, policy: str,
                params: dict[str, Any], slow: float = 0.0) -> str:
    """The `subsetsel train` command equivalent to one run."""
    words = ["subsetsel", "train", "--train-size", str(args.train_size), "--test-size",
             str(args.test_size), "--strategy", "full", "--fraction", "1", "--epochs",
             str(epochs), "--seed", str(seed), "--policy", policy]
    for key, value in params.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if slow:
        words += ["--slow-input", f"{slow:.4f}"]
    return " ".join(words)


class CpuClock:
    """Adds `cpu_seconds` to each epoch record: cumulative CPU time of the training thread,
    evaluation excluded (with one torch thread all compute runs in this thread)."""

    def __init__(self, trainer: Trainer) -> None:
        self.eval_seconds = 0.0
        engine = trainer.engine
        evaluate = engine.evaluate

        def timed_evaluate(*args: Any, **kwargs: Any) -> tuple[float, float]:
            start = time.thread_time()
            try:
                return evaluate(*args, **kwargs)
            finally:
                self.eval_seconds += time.thread_time() - start

        engine.evaluate = timed_evaluate  # type: ignore[method-assign]
        engine.callbacks.append(self.record)
        self.start = time.thread_time()

    def record(self, engine: Any, record: dict[str, Any]) -> None:
        record["cpu_seconds"] = time.thread_time() - self.start - self.eval_seconds


def train(data: Any, seed: int, epochs: int, policy: str, params: dict[str, Any],
          slow: float = 0.0) -> Run:
    config = TrainConfig(strategy="full", fraction=1.0, epochs=epochs, seed=seed, device="cpu",
                         policy=policy, policy_params=dict(params), slow_input=slow)
    trainer = Trainer(config, dataset=data)
    CpuClock(trainer)
    trainer.fit()
    return trainer.history


# ---- comparisons -----------------------------------------------------------------------------
def at_budget(run: Run, key: str, budget: float) -> float | None:
    """Test accuracy at the last epoch whose cumulative `key` is within `budget`."""
    acc = None
    for record in run:
        if record[key] <= budget * (1 + 1e-9):
            acc = record["test_acc"]
    return acc


def equal_budget(a: Run, b: Run, key: str) -> tuple[float | None, float | None]:
    budget = min(a[-1][key], b[-1][key])
    return at_budget(a, key, budget), at_budget(b, key, budget)


def reach(run: Run, target: float, key: str) -> float | None:
    """Cumulative `key` when the run's test accuracy first reaches `target`."""
    for record in run:
        if record["test_acc"] >= target:
            return float(record[key])
    return None


def fmt(values: list[float | None], scale: float = 1.0, digits: int = 3) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "-"
    missing = len(values) - len(vals)
    mean = statistics.fmean(vals)
    text = f"{mean:.{digits}f}"
    if len(vals) > 1:
        text += f" ± {statistics.stdev(vals):.{digits}f}"
    return text + (f" ({missing} n/a)" if missing else "")


def step_seconds(run: Run) -> tuple[float, float]:
    """(wall, CPU) seconds per optimizer step of a plain run, its first epoch excluded."""
    first = run[0] if len(run) > 1 else {"cpu_seconds": 0.0, "total_steps": 0,
                                           "elapsed_seconds": 0.0}
    steps = run[-1]["total_steps"] - first["total_steps"]
    return ((run[-1]["elapsed_seconds"] - first["elapsed_seconds"]) / steps,
            (run[-1]["cpu_seconds"] - first["cpu_seconds"]) / steps)


# ---- main ------------------------------------------------------------------------------------
def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    echo_seeds = args.echo_seeds or args.seeds
    print(f"$ python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"torch {torch.__version__}, {args.threads} thread(s), "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n", flush=True)
    runs_spec = selection_runs(args.epochs)
    results: dict[str, dict[int, Run]] = {name: {} for name in runs_spec}
    echo: dict[tuple[float, float], dict[int, Run]] = {}
    steps: dict[int, tuple[float, float]] = {}
    started = time.perf_counter()
    for seed in sorted(set(args.seeds) | set(echo_seeds)):
        data = load_dataset("mnist1d", seed=seed, train_size=args.train_size,
                            test_size=args.test_size, device="cpu")
        if seed in args.seeds:
            for name, (epochs, policy, params) in runs_spec.items():
                run = train(data, seed, epochs, policy, params)
                results[name][seed] = run
                print(f"seed {seed} {name:20s} acc {run[-1]['test_acc']:.3f} "
                      f"backprop {run[-1]['total_backpropagated']:7d} "
                      f"{run[-1]['elapsed_seconds']:6.1f} s wall "
                      f"{run[-1]['cpu_seconds']:6.1f} s cpu", flush=True)
        if seed in echo_seeds:
            steps[seed] = step_seconds(train(data, seed, 2, "plain", {}))
            print(f"seed {seed} plain step {1000 * steps[seed][0]:.1f} ms wall, "
                  f"{1000 * steps[seed][1]:.1f} ms CPU", flush=True)
            for ratio in args.ratios:
                slow = ratio * steps[seed][0]
                for factor in args.factors:
                    run = train(data, seed, args.echo_epochs, "echo", {"echo": factor}, slow)
                    echo.setdefault((ratio, factor), {})[seed] = run
                    print(f"seed {seed} echo R={ratio:g} e={factor:g} acc "
                          f"{run[-1]['test_acc']:.3f} {run[-1]['elapsed_seconds']:6.1f} s",
                          flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s\n")
    report(args, results, echo, steps)
    if args.json_out:
        payload = {
            "argv": sys.argv, "selection": {k: {str(s): r for s, r in v.items()}
                                            for k, v in results.items()},
            "echo": {f"R{r:g}-e{e:g}": {str(s): run for s, run in v.items()}
                     for (r, e), v in echo.items()},
            "step_seconds": steps,
        }
        with open(args.json_out, "w") as out:
            json.dump(payload, out)


def report(args: argparse.Namespace, results: dict[str, dict[int, Run]],
           echo: dict[tuple[float, float], dict[int, Run]],
           steps: dict[int, tuple[float, float]]) -> None:
    n = args.train_size
    seeds = args.seeds

    def per_seed(name: str, fn: Callable[[Run], float | None]) -> list[float | None]:
        return [fn(results[name][s]) for s in seeds if s in results[name]]

    print(f"### Runs ({len(seeds)} seeds, MNIST-1D {n} train / {args.test_size} test, cnn1d)\n")
    print("| run | final acc | backprops (x N) | forwards (x N) | fresh (x N) | steps | "
          "CPU s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in results:
        print(f"| {name} | {fmt(per_seed(name, lambda r: r[-1]['test_acc']))} | "
              f"{fmt(per_seed(name, lambda r: r[-1]['total_backpropagated'] / n), digits=2)} | "
              f"{fmt(per_seed(name, lambda r: r[-1]['total_forwarded'] / n), digits=2)} | "
              f"{fmt(per_seed(name, lambda r: r[-1]['total_fresh'] / n), digits=2)} | "
              f"{fmt(per_seed(name, lambda r: r[-1]['total_steps']), digits=0)} | "
              f"{fmt(per_seed(name, lambda r: r[-1]['cpu_seconds']), digits=2)} | "
              f"{fmt(per_seed(name, lambda r: r[-1]['elapsed_seconds']), digits=1)} |")
    extras = [("sb", "sb_selected_fraction"), ("stale-sb", "sb_reused_fraction"),
              ("is", "is_on_fraction"), ("is", "is_tau")]
    for name, key in extras:
        values = [[r.get(key) for r in results[name][s]] for s in seeds if s in results[name]]
        if values:
            means = [statistics.fmean(v[i] for v in values if v[i] is not None)
                     if any(v[i] is not None for v in values) else None
                     for i in range(len(values[0]))]
            shown = ", ".join("-" if m is None else f"{m:.2f}" for m in means)
            print(f"\n{name} `{key}` by epoch (mean over seeds): {shown}")

    pairs = [("sb", "random-keep"), ("sb", "plain"), ("stale-sb", "random-keep"),
             ("stale-sb", "sb"), ("sb-keep", "random-keep-window"), ("sb-keep", "plain"),
             ("is", "plain"), ("is", "is-uniform"), ("is-on", "is-uniform"),
             ("is-on", "plain")]
    short = next(k for k in results if k.startswith("plain-") and k.endswith("ep"))
    pairs.insert(2, ("sb", short))
    print("\n### Method vs baseline at equal budgets (test accuracy, mean ± std over seeds)\n")
    print("| method | baseline | equal backprops: method | baseline | "
          "equal CPU time: method | baseline | equal wall time: method | baseline |")
    print("|---|---|---|---|---|---|---|---|")
    for a, b in pairs:
        cells = []
        for key in ("total_backpropagated", "cpu_seconds", "elapsed_seconds"):
            got = [equal_budget(results[a][s], results[b][s], key) for s in seeds
                   if s in results[a] and s in results[b]]
            cells += [fmt([g[0] for g in got]), fmt([g[1] for g in got])]
        print(f"| {a} | {b} | " + " | ".join(cells) + " |")

    if not echo:
        return
    ratios = sorted({r for r, _ in echo})
    factors = sorted({e for _, e in echo})
    print(f"\n### Data echoing with a slow input ({args.echo_epochs} epochs of fresh reads; "
          f"plain step {fmt([w for w, _ in steps.values()], scale=1000, digits=1)} ms wall, "
          f"{fmt([c for _, c in steps.values()], scale=1000, digits=1)} ms CPU)\n")
    print("Read cost per batch = R x the plain step's wall time; reads are prefetched (2 batches) "
          "in a background thread. Target = the lowest best accuracy among the factors at that "
          "R. Times are wall seconds (the simulated reads are sleeps).\n")
    print("| R | echo | final acc | wall s | acc at equal wall time vs e=1 | "
          "target | fresh (x N) to target | wall s to target |")
    print("|---|---|---|---|---|---|---|---|")
    for ratio in ratios:
        group = {e: echo[(ratio, e)] for e in factors if (ratio, e) in echo}
        seeds_here = sorted(set.intersection(*(set(v) for v in group.values())))
        targets = {s: min(max(r["test_acc"] for r in group[e][s]) for e in group)
                   for s in seeds_here}
        base = group.get(1.0)
        for e, runs in group.items():
            here = [runs[s] for s in seeds_here]
            equal = [equal_budget(runs[s], base[s], "elapsed_seconds") if base else (None, None)
                     for s in seeds_here]
            fresh = [reach(runs[s], targets[s], "total_fresh") for s in seeds_here]
            seconds = [reach(runs[s], targets[s], "elapsed_seconds") for s in seeds_here]
            print(f"| {ratio:g} | {e:g} | {fmt([r[-1]['test_acc'] for r in here])} | "
                  f"{fmt([r[-1]['elapsed_seconds'] for r in here], digits=1)} | "
                  f"{fmt([q[0] for q in equal])} vs {fmt([q[1] for q in equal])} | "
                  f"{fmt([targets[s] for s in seeds_here])} | {fmt(fresh, 1 / n, 2)} | "
                  f"{fmt(seconds, digits=1)} |")

    print("\n### Equivalent commands (seed 0)\n")
    for name, (epochs, policy, params) in selection_runs(args.epochs).items():
        print(f"    {cli_command(args, seeds[0], epochs, policy, params)}  # {name}")
    if steps:
        seed = min(steps)
        for ratio in ratios:
            for e in factors:
                slow = ratio * steps[seed][0]
                print(f"    {cli_command(args, seed, args.echo_epochs, 'echo', {'echo': e}, slow)}")


if __name__ == "__main__":
    main()
