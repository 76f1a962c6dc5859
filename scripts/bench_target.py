"""The product target on the default benchmark: does a 10 % subset (Grad-Match re-selecting, or
Cached-Grad-Match replaying a stored Grad-Match schedule) get within 1 point of full-data test
accuracy in at least 3x less wall time than full-data training, does selecting pay against
random subsets, and does replay beat re-selecting on total time?

    python scripts/bench_target.py                  # the product table: 10 % and 30 %, 20 epochs
    python scripts/bench_target.py --quick          # the same pipeline on a small setting (~1 min)
    python scripts/bench_target.py --variants 0.1:20 0.2:20 0.1:40  # other budgets

Default benchmark: MNIST-1D (20k train / 2k test, data seed 0), cnn1d, SGD lr 0.05, cosine, 20
epochs, seeds 0-2, one torch thread, runs sequential in this process. Per seed s and per variant
(fraction:epochs; default 0.1:E and 0.3:E with E = --epochs): full data (once per seed), the
random control of every Grad-Match strategy (`random`, and `randompb` for `gradmatchpb`), each
Grad-Match strategy (saving its selections), and a cached run that replays the Grad-Match file of
seed (s + 1) mod n (a schedule from an earlier run with another initialisation, as a real cache
would be). Finished runs (summary.json present) are reused.

Numbers come from one subsetsel.report per variant with full data as the reference and A = lowest
full-data final accuracy - 1 point: time and backprops to A, speedups against full data's time
to A (the fixed-accuracy speedup), and `vs full run` = full data's total select+train seconds
(all its epochs) / the method's seconds to A, the ratio the target asks for (>= 3). `select %` is
the share of select+train seconds spent selecting, `time / random` the method's time to A over
its random control's at the same fraction and setting (< 1: selecting pays; a cached run's
control is random at the fraction and interval of the file it replays). `total s` is the whole
run (select + train); for cached runs the one-off cost of the source run is not included (it is
the Grad-Match row's total). The last block answers the product question for the 10 % subset at
the full-data epochs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from exp_cached import _pm, _stat, _x, cli_command, run_fresh, wait_for_load  # noqa: E402  (scripts/)

from subsetsel.report import (  # noqa: E402
    Row,
    Stat,
    build_report,
    plot_report,
    random_control,
    read_run,
    vs_random_cell,
)
from subsetsel.train import TrainConfig  # noqa: E402

SPEEDUP_GOAL = 3.0
PRODUCT_FRACTION = 0.1
# --quick: the same pipeline on a setting small enough to check it end to end in about a minute
QUICK = {"root": Path("runs/target-quick"), "seeds": [0, 1], "epochs": 4, "select_every": 2,
         "train_size": 2000, "test_size": 500, "max_wait": 0.0}
FULL = {"root": Path("runs/target"), "seeds": [0, 1, 2], "epochs": 20, "select_every": 5,
        "train_size": None, "test_size": None, "max_wait": 900.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2000/500 examples, 4 epochs, select every 2, seeds 0 1, "
                        "root runs/target-quick, no waiting for a quiet machine (options given "
                        "explicitly still win)")
    p.add_argument("--root", type=Path, help="default runs/target")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2")
    p.add_argument("--epochs", type=int, help="full-data epochs (default 20)")
    p.add_argument("--variants", nargs="+",
                   help="subset budgets as fraction:epochs (default 0.1:E 0.3:E, E = --epochs)")
    p.add_argument("--gm", nargs="+", default=["gradmatch", "gradmatchpb"])
    p.add_argument("--select-every", type=int, help="default 5")
    p.add_argument("--train-size", type=int)
    p.add_argument("--test-size", type=int)
    p.add_argument("--max-load", type=float, default=2.5)
    p.add_argument("--max-wait", type=float, help="seconds to wait for a quiet machine "
                   "(default 900)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="A = lowest full-data final accuracy - this (the product target: 0.01)")
    p.add_argument("--plot", type=Path, help="accuracy vs time plot (subsetsel.report)")
    p.add_argument("--plot-variant", help="fraction:epochs to plot (default: the first)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.variants is None:
        args.variants = [f"{PRODUCT_FRACTION:g}:{args.epochs}", f"0.3:{args.epochs}"]
    return args


def controls(gm_strategies: list[str]) -> list[str]:
    """The random strategies to run: `random` (the product table's row) and the control of
    every Grad-Match strategy (subsetsel.report.random_control)."""
    wanted = ["random", *(random_control(gm) for gm in gm_strategies)]
    return [c for c in dict.fromkeys(wanted) if c is not None]


def variant_slug(fraction: float, epochs: int) -> str:
    return f"f{fraction:g}-e{epochs}"


def ensure(cfg: TrainConfig, out: Path, commands: list[str]) -> Path:
    """Run `cfg` into `out` unless a finished run is there."""
    commands.append(cli_command(cfg, out))
    if (out / "summary.json").exists():
        return out
    summary, load = run_fresh(cfg, out)
    print(f"  {out.parent.name:12s} {out.name:28s} acc {summary['final_acc']:.4f}  "
          f"{summary['elapsed_seconds']:6.1f} s (select {summary['select_seconds']:.2f} s)  "
          f"load {load:.2f}", flush=True)
    return out


def run_all(args: argparse.Namespace, commands: list[str]) -> dict[str, dict[str, list[Path]]]:
    """{variant: {method: [run dirs per seed]}}; 'full' under every variant."""
    base = TrainConfig(train_size=args.train_size, test_size=args.test_size, device="cpu",
                       select_every=args.select_every)
    root: Path = args.root
    dirs: dict[str, dict[str, list[Path]]] = {}
    variants = [(float(f), int(e)) for f, e in (v.split(":") for v in args.variants)]
    for seed in args.seeds:
        full = ensure(replace(base, strategy="full", fraction=1.0, epochs=args.epochs, seed=seed),
                      root / "full" / f"s{seed}", commands)
        for fraction, epochs in variants:
            slug = variant_slug(fraction, epochs)
            table = dirs.setdefault(slug, {})
            table.setdefault("full", []).append(full)
            sub = replace(base, fraction=fraction, epochs=epochs, seed=seed)
            for control in controls(args.gm):
                table.setdefault(control, []).append(ensure(
                    replace(sub, strategy=control), root / slug / f"{control}-s{seed}", commands))
            for gm in args.gm:
                sel = root / "selections" / f"{slug}-{gm}-s{seed}.h5"
                table.setdefault(gm, []).append(ensure(
                    replace(sub, strategy=gm, save_selections=str(sel)),
                    root / slug / f"{gm}-s{seed}", commands))
    for seed in args.seeds:  # every source file exists now
        other = args.seeds[(args.seeds.index(seed) + 1) % len(args.seeds)]
        for fraction, epochs in variants:
            slug = variant_slug(fraction, epochs)
            for gm in args.gm:
                sel = root / "selections" / f"{slug}-{gm}-s{other}.h5"
                cfg = replace(base, epochs=epochs, seed=seed, replay=str(sel))
                dirs[slug].setdefault(f"cached-{gm}", []).append(
                    ensure(cfg, root / slug / f"cached-{gm}-s{seed}", commands))
    return dirs


def rows_for(table: dict[str, list[Path]], tolerance: float = 0.01) -> list[dict[str, Any]]:
    """The report's numbers per method (one report over all of the variant's runs, full data
    the reference, A = lowest full final - `tolerance`), in `table` order."""
    runs = {p: read_run(p) for paths in table.values() for p in dict.fromkeys(paths)}
    report = build_report(list(runs.values()), tolerance=tolerance)
    by_path = {run.path: row for row in report.rows for run in row.group.runs}
    full_total = Stat.of(runs[p].elapsed_seconds for p in table["full"])
    assert full_total is not None
    out = []
    for name, paths in table.items():
        row = by_path[str(paths[0])]
        assert all(by_path[str(p)] is row for p in paths), f"{name}: seeds split into groups"
        method_runs = row.group.runs
        t = row.time_to_target
        out.append({
            "method": name, "label": row.label, "runs": len(method_runs), "target": row.target,
            "reached": row.reached,
            "final_acc": _stat(Stat.of(r.final_acc for r in method_runs)),
            "time_to_target": _stat(t),
            "backprops_to_target": _stat(row.backprops_to_target),
            "speedup_time": row.speedup_time, "speedup_backprops": row.speedup_backprops,
            "vs_full_run": None if t is None else full_total.mean / t.mean,
            "select_seconds": _stat(Stat.of(r.select_seconds for r in method_runs)),
            "select_share": _stat(row.select_share),
            "random_match": row.random.label if row.random is not None else None,
            "random_time_to_target": _stat(row.random_time_to_target),
            "time_vs_random": row.time_vs_random,
            "vs_random_status": row.vs_random_status,
            "vs_random_cell": _vs_random(row),
            "elapsed_seconds": _stat(Stat.of(r.elapsed_seconds for r in method_runs)),
            "total_backpropagated": _stat(Stat.of(r.total_backpropagated for r in method_runs)),
            "per_run_vs_full_run": [None if x is None else full_total.mean / x
                                    for x in row.times],
            "paths": [str(p) for p in paths],
        })
    return out


def _vs_random(row: Row) -> str:
    """The report's time/random cell; a random row (its own control) shows '-'."""
    return "-" if row.random is row.group else vs_random_cell(row)


def meets_target(r: dict[str, Any]) -> bool:
    """Every seed reaches A, and at >= SPEEDUP_GOAL less time than the whole full-data run."""
    return (r["reached"] == r["runs"] and r["vs_full_run"] is not None
            and r["vs_full_run"] >= SPEEDUP_GOAL)


def markdown(slug: str, rows: list[dict[str, Any]], full_epochs: int,
             tolerance: float = 0.01) -> str:
    full = next(r for r in rows if r["method"] == "full")
    lines = [
        f"**{slug}** (subset fraction:epochs; full data {full_epochs} epochs); "
        f"A = {100 * full['target']:.2f}"
        f" % (lowest full final - {_points(tolerance)}); full-data mean final "
        f"{100 * full['final_acc']['mean']:.2f} %",
        "",
        "| method | final acc % | time to A s | speedup (vs full to A) | speedup bp | vs full run "
        "| target met (>= 3x vs full run) | time / random | select s | select % | total s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = r["runs"]
        reach = (_pm(r["time_to_target"], 1, 2) if r["reached"] == n else
                 "not reached" if r["reached"] == 0 else f"{r['reached']}/{n} reached")
        met = "-" if r["method"] == "full" else ("yes" if meets_target(r) else "no")
        lines.append(
            f"| {r['method']} | {_pm(r['final_acc'], 100, 2)} | {reach} | {_x(r['speedup_time'])} "
            f"| {_x(r['speedup_backprops'])} | {_x(r['vs_full_run'])} | {met} "
            f"| {r['vs_random_cell']} | {_pm(r['select_seconds'], 1, 2)} "
            f"| {_pm(r['select_share'], 100, 1)} | {_pm(r['elapsed_seconds'], 1, 2)} |")
    by = {r["method"]: r for r in rows}
    for name in [m for m in by if m.startswith("cached-")]:
        gm = by[name[len("cached-"):]]
        ratio = gm["elapsed_seconds"]["mean"] / by[name]["elapsed_seconds"]["mean"]
        lines.append(f"\nre-selecting / replay total seconds ({name[7:]}): {ratio:.2f}x "
                     f"({gm['elapsed_seconds']['mean']:.2f} s vs "
                     f"{by[name]['elapsed_seconds']['mean']:.2f} s)")
    return "\n".join(lines)


def _points(tolerance: float) -> str:
    points = 100 * tolerance
    return f"{points:g} point" + ("" if points == 1 else "s")


def product_verdict(results: dict[str, list[dict[str, Any]]], full_epochs: int,
                    tolerance: float = 0.01) -> str:
    """The README's product-target row: does a 10 % subset, trained for the full-data epochs,
    get within 1 point (`tolerance`) of full data (reach A in every seed) at >= 3x less time than
    the whole full-data run?"""
    slug = variant_slug(PRODUCT_FRACTION, full_epochs)
    head = (f"product target ({100 * PRODUCT_FRACTION:g} % subset, {full_epochs} epochs, within "
            f"{_points(tolerance)} of full data at >= {SPEEDUP_GOAL:g}x less time than the full "
            "run)")
    if slug not in results:
        return f"{head}: not measured (no {slug} variant)"
    rows = [r for r in results[slug] if r["method"] != "full"]
    met = [r["method"] for r in rows if meets_target(r)]
    lines = [f"{head}: " + (f"MET by {', '.join(met)}" if met else "NOT MET")]
    for r in rows:
        reach = f"reaches A in {r['reached']}/{r['runs']} seeds"
        if r["vs_full_run"] is not None:
            reach += f", {r['vs_full_run']:.2f}x less time than the full run"
        final = _pm(r["final_acc"], 100, 2)
        share = _pm(r["select_share"], 100, 1)
        lines.append(f"  {r['method']}: final {final} % vs A {100 * r['target']:.2f} %; {reach}; "
                     f"time / random {r['vs_random_cell']}; selecting {share} % of its time")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    print("command: " + shlex.join(["python", *sys.argv]), flush=True)
    load, waited = wait_for_load(args.max_load, args.max_wait)
    print(f"load average {load:.2f} after waiting {waited:.0f} s; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    commands: list[str] = []
    dirs = run_all(args, commands)
    results = {}
    for slug, table in dirs.items():
        rows = rows_for(table, args.tolerance)
        results[slug] = rows
        print("\n" + markdown(slug, rows, args.epochs, args.tolerance) + "\n", flush=True)
    loads = [json.loads((p / "load.json").read_text())["loadavg_1min_at_start"]
             for table in dirs.values() for paths in table.values() for p in paths
             if (p / "load.json").exists()]
    print(product_verdict(results, args.epochs, args.tolerance) + "\n")
    print(f"loads at run start: {min(loads, default=0):.2f}-{max(loads, default=0):.2f}")
    args.root.mkdir(parents=True, exist_ok=True)
    (args.root / "target.json").write_text(json.dumps(
        {"results": results, "load_at_run_start": [min(loads, default=0), max(loads, default=0)]},
        indent=1))
    (args.root / "commands.txt").write_text("\n".join(dict.fromkeys(commands)) + "\n")
    if args.plot:
        if args.plot_variant:
            fraction, epochs = args.plot_variant.split(":")
            slug = variant_slug(float(fraction), int(epochs))
        else:
            slug = next(iter(dirs))
        shown = dirs[slug]
        runs = [read_run(p) for ps in shown.values() for p in dict.fromkeys(ps)]
        plot_report(build_report(runs, tolerance=args.tolerance), args.plot)
        print(f"plot: {args.plot} ({slug})")


if __name__ == "__main__":
    main()
