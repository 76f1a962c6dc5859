"""Cached-Grad-Match (seed 004) at small scale: replay Grad-Match selections under another
learning rate, optimizer or architecture, next to full data, Random, RandomPB and Grad-Match
re-selecting at the target setting.

    python scripts/exp_cached.py lr          # source lr 0.05 -> targets lr 0.005, 0.02, 0.2
    python scripts/exp_cached.py optimizer   # source SGD -> targets Adam, RMSprop (lr 1e-3)
    python scripts/exp_cached.py arch        # mlp <-> cnn1d, plus warm-start variants
    python scripts/exp_cached.py all --seeds 0 1 2 --root runs/cached

Every run is one `subsetsel train` run (in this process, one torch thread, sequentially), written
to ROOT/runs/<setting>/<method>-s<seed>; a finished run (summary.json present) is reused, so the
experiments share their runs (the default setting is the source of all three) and an interrupted
invocation resumes. Every Grad-Match run saves its selections (ROOT/selections/...); `cached`
runs replay the file made by the same training seed at the source setting, with the epochs of the
file (so rounds map one to one). At the source setting itself, `cached (other seed)` replays the
file of seed (s + 1) mod n: the same schedule with another initialisation and batch order.

Tables (markdown, via subsetsel.report): for each method against full data at that setting,
final accuracy (mean ± std over seeds); time and backprops to A = lowest full-data final accuracy
- 1 point (the report's default) and the speedups; then the same at A_m = the lower of the
method's and full data's lowest final accuracy ("a target both reach", the Grad-Match paper's
speedup at the method's own accuracy); at A_c = the lowest final accuracy of any run in the
table (one target every run reaches, so methods compare at one accuracy); total selection and
select + train seconds.
Equivalent CLI commands go to ROOT/commands.txt, tables to ROOT/<experiment>.md and .json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from subsetsel.report import (  # noqa: E402
    Row,
    Stat,
    build_report,
    read_run,
)
from subsetsel.run import run  # noqa: E402
from subsetsel.store import SelectionStore  # noqa: E402
from subsetsel.train import TrainConfig  # noqa: E402

_DEFAULT = TrainConfig()


# ---- what is run -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """The training setting a method runs under (what Cached-Grad-Match transfers across)."""

    model: str = "cnn1d"
    optimizer: str = "sgd"
    lr: float = 0.05

    @property
    def slug(self) -> str:
        return f"{self.model}-{self.optimizer}-lr{self.lr:g}"

    @property
    def title(self) -> str:
        opt = {"sgd": "SGD", "adam": "Adam", "rmsprop": "RMSprop"}.get(self.optimizer,
                                                                       self.optimizer)
        return f"{self.model}, {opt}, lr {self.lr:g}"


@dataclass(frozen=True)
class Method:
    """A row of a table. `source` set: replay the Grad-Match file (strategy, warm) made at
    `source` (Cached-Grad-Match); `seed_shift` 1: use the file of another training seed."""

    strategy: str
    warm: float = 0.0
    source: Setting | None = None
    seed_shift: int = 0

    @property
    def slug(self) -> str:
        name = self.strategy + ("-warm" if self.warm else "")
        if self.source is None:
            return name
        return f"cached-{name}-from-{self.source.slug}" + ("-xseed" if self.seed_shift else "")

    @property
    def label(self) -> str:
        name = self.strategy + ("-warm" if self.warm else "")
        if self.source is None:
            return name
        other = ", other seed" if self.seed_shift else ""
        return f"cached-{name} (from {self.source.title}{other})"


@dataclass
class Options:
    root: Path
    seeds: list[int]
    epochs: int
    fraction: float
    select_every: int
    warm: float
    gms: list[str]
    train_size: int | None
    test_size: int | None
    fresh: bool
    commands: list[str] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)


def config_for(setting: Setting, method: Method, seed: int, opt: Options) -> TrainConfig:
    """The TrainConfig of one run (selection files of Grad-Match runs under ROOT/selections)."""
    cfg = TrainConfig(
        train_size=opt.train_size, test_size=opt.test_size, model=setting.model,
        optimizer=setting.optimizer, lr=setting.lr, epochs=opt.epochs, seed=seed,
        fraction=opt.fraction, select_every=opt.select_every, device="cpu",
    )
    if method.source is not None:
        src = replace(method, source=None, seed_shift=0)
        src_seed = opt.seeds[(opt.seeds.index(seed) + method.seed_shift) % len(opt.seeds)]
        path = selection_path(method.source, src, src_seed, opt)
        return replace(cfg, replay=str(path), epochs=SelectionStore.open(path).metadata.epochs)
    cfg = replace(cfg, strategy=method.strategy, warm_start=method.warm)
    if method.strategy == "full":
        cfg = replace(cfg, fraction=1.0)
    if method.strategy in opt.gms:  # Grad-Match runs keep their selections (the cache)
        cfg = replace(cfg, save_selections=str(selection_path(setting, method, seed, opt)))
    return cfg


def selection_path(setting: Setting, method: Method, seed: int, opt: Options) -> Path:
    return opt.root / "selections" / f"{setting.slug}-{method.slug}-s{seed}.h5"


def run_dir(setting: Setting, method: Method, seed: int, opt: Options) -> Path:
    return opt.root / "runs" / setting.slug / f"{method.slug}-s{seed}"


def ensure_run(setting: Setting, method: Method, seed: int, opt: Options) -> Path:
    """Run (or reuse) one run; a cached run first makes sure its source file exists."""
    out = run_dir(setting, method, seed, opt)
    if method.source is not None:
        src_seed = opt.seeds[(opt.seeds.index(seed) + method.seed_shift) % len(opt.seeds)]
        ensure_run(method.source, replace(method, source=None, seed_shift=0), src_seed, opt)
    cfg = config_for(setting, method, seed, opt)
    opt.commands.append(cli_command(cfg, out))
    if (out / "summary.json").exists() and not opt.fresh:
        return out
    summary, load = run_fresh(cfg, out)
    opt.loads.append(load)
    print(f"  {setting.slug:24s} {method.slug:48s} s{seed}  acc {summary['final_acc']:.4f}  "
          f"{summary['elapsed_seconds']:6.1f} s (select {summary['select_seconds']:.2f} s)  "
          f"load {load:.2f}", flush=True)
    return out


def run_fresh(cfg: TrainConfig, out: Path) -> tuple[dict[str, Any], float]:
    """Run `cfg` into an emptied `out` (and a fresh selection file); record the 1-minute load
    average at the start in out/load.json. Returns (summary, load)."""
    if out.exists():
        shutil.rmtree(out)
    if cfg.save_selections:
        Path(cfg.save_selections).unlink(missing_ok=True)
        Path(cfg.save_selections).parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    summary = run(cfg, out)
    (out / "load.json").write_text(json.dumps({"loadavg_1min_at_start": load}))
    return summary, load


def cli_command(cfg: TrainConfig, out: Path) -> str:
    """The `subsetsel train` command line equivalent to `cfg`."""
    args = ["subsetsel", "train", "--quiet", "--device", cfg.device]
    if cfg.train_size is not None:
        args += ["--train-size", str(cfg.train_size)]
    if cfg.test_size is not None:
        args += ["--test-size", str(cfg.test_size)]
    if cfg.model is not None:
        args += ["--model", cfg.model]
    args += ["--optimizer", cfg.optimizer, "--lr", f"{cfg.lr:g}", "--epochs", str(cfg.epochs),
             "--seed", str(cfg.seed)]
    if cfg.replay:
        args += ["--replay", cfg.replay]
    else:
        args += ["--strategy", cfg.strategy]
        if cfg.strategy != "full":
            args += ["--fraction", f"{cfg.fraction:g}", "--select-every", str(cfg.select_every)]
        if cfg.warm_start:
            args += ["--warm-start", f"{cfg.warm_start:g}"]
        if cfg.save_selections:
            args += ["--save-selections", cfg.save_selections]
    args += ["--out", str(out)]
    return "OMP_NUM_THREADS=1 " + shlex.join(args)


# ---- the experiments ---------------------------------------------------------------------------
DEFAULT = Setting()


@dataclass
class Table:
    setting: Setting
    methods: list[Method]
    note: str = ""


def base_methods(opt: Options) -> list[Method]:
    return [Method("full"), Method("random"), Method("randompb")] + [Method(g) for g in opt.gms]


def experiment(name: str, opt: Options) -> tuple[list[Table], Setting]:
    """(tables, setting to plot) of experiment `name`."""
    cached = [Method(g, source=DEFAULT) for g in opt.gms]
    source_table = Table(
        DEFAULT, base_methods(opt) + [Method(g, source=DEFAULT, seed_shift=1) for g in opt.gms],
        "source setting: the Grad-Match rows are the source runs; the cached row replays another "
        "seed's file",
    )
    if name == "lr":
        targets = [Setting(lr=lr) for lr in (0.005, 0.02, 0.2)]
        return ([Table(t, base_methods(opt) + cached) for t in targets] + [source_table],
                targets[2])  # lr 0.2: where the methods differ most
    if name == "optimizer":
        targets = [Setting(optimizer="adam", lr=1e-3), Setting(optimizer="rmsprop", lr=1e-3)]
        return ([Table(t, base_methods(opt) + cached) for t in targets] + [source_table],
                targets[0])
    if name == "arch":
        tables = []
        for target, source in ((Setting(model="cnn1d"), Setting(model="mlp")),
                               (Setting(model="mlp"), Setting(model="cnn1d"))):
            methods = base_methods(opt) + [Method(g, source=source) for g in opt.gms]
            if opt.warm:
                methods += [Method("random", warm=opt.warm)]
                methods += [Method(g, warm=opt.warm) for g in opt.gms]
                methods += [Method(g, warm=opt.warm, source=source) for g in opt.gms]
            tables.append(Table(target, methods, f"selections made with {source.model}"))
        return tables, tables[0].setting
    raise SystemExit(f"unknown experiment {name!r}: lr, optimizer, arch or all")


# ---- tables ------------------------------------------------------------------------------------
def method_rows(table: Table, opt: Options) -> list[dict[str, Any]]:
    """One dict per method: the report's numbers at the default A, at A_m and at A_c."""
    full = [read_run(run_dir(table.setting, Method("full"), s, opt)) for s in opt.seeds]
    every = {m: [read_run(run_dir(table.setting, m, s, opt)) for s in opt.seeds]
             for m in table.methods}
    common = min(r.final_acc for runs in every.values() for r in runs)
    rows = []
    for method, runs in every.items():
        is_full = method.strategy == "full" and method.source is None
        both = full if is_full else full + runs
        default = _method_row(build_report(both), is_full=is_full)
        own = min(min(r.final_acc for r in runs), min(r.final_acc for r in full))
        at_own = _method_row(build_report(both, target=own), is_full=is_full)
        at_common = _method_row(build_report(both, target=common), is_full=is_full)
        rows.append({
            "method": method.label, "slug": method.slug, "runs": len(runs),
            "final_acc": _stat(Stat.of(r.final_acc for r in runs)),
            "target": default.target, "reached": default.reached,
            "time_to_target": _stat(default.time_to_target),
            "speedup_time": default.speedup_time,
            "speedup_backprops": default.speedup_backprops,
            "own_target": own, "own_time_to_target": _stat(at_own.time_to_target),
            "own_speedup_time": at_own.speedup_time,
            "own_speedup_backprops": at_own.speedup_backprops,
            "common_target": common, "common_time_to_target": _stat(at_common.time_to_target),
            "common_speedup_time": at_common.speedup_time,
            "common_speedup_backprops": at_common.speedup_backprops,
            "select_seconds": _stat(Stat.of(r.select_seconds for r in runs)),
            "elapsed_seconds": _stat(Stat.of(r.elapsed_seconds for r in runs)),
            "total_backpropagated": _stat(Stat.of(r.total_backpropagated for r in runs)),
            "paths": [r.path for r in runs],
        })
    return rows


def _method_row(report: Any, *, is_full: bool) -> Row:
    return report.rows[0] if is_full else report.rows[-1]


def _stat(stat: Stat | None) -> dict[str, float] | None:
    return None if stat is None else {"mean": stat.mean, "std": stat.std, "n": stat.n}


def markdown(table: Table, rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    lines = [
        f"**{table.setting.title}**" + (f" ({table.note})" if table.note else "")
        + f": A = {100 * first['target']:.2f} % (lowest full-data final - 1 point), "
        f"A_c = {100 * first['common_target']:.2f} % (lowest final accuracy of any run here)",
        "",
        "| method | final acc % | speedup @A | bp @A | A_m % | speedup @A_m | bp @A_m "
        "| speedup @A_c | bp @A_c | select s | select+train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = r["runs"]
        if r["reached"] == n:
            at_a = (_x(r["speedup_time"]), _x(r["speedup_backprops"]))
        else:
            miss = "not reached" if r["reached"] == 0 else f"{r['reached']}/{n} reached"
            at_a = (miss, "-")
        lines.append(
            f"| {r['method']} | {_pm(r['final_acc'], 100, 2)} | {at_a[0]} | {at_a[1]} "
            f"| {100 * r['own_target']:.2f} | {_x(r['own_speedup_time'])} "
            f"| {_x(r['own_speedup_backprops'])} | {_x(r['common_speedup_time'])} "
            f"| {_x(r['common_speedup_backprops'])} "
            f"| {_pm(r['select_seconds'], 1, 2)} | {_pm(r['elapsed_seconds'], 1, 1)} |"
        )
    return "\n".join(lines)


def _pm(stat: dict[str, float] | None, scale: float, digits: int) -> str:
    if stat is None:
        return "-"
    text = f"{stat['mean'] * scale:.{digits}f}"
    return text if stat["n"] < 2 else f"{text} ± {stat['std'] * scale:.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def plot(table: Table, opt: Options, path: Path, gm: str) -> None:
    """Accuracy vs select+train seconds and vs examples backpropagated (log x) for every run of
    one table, Grad-Match strategy `gm` only (no other-seed replays); the default A and A_c
    dotted. Targets come from subsetsel.report; the y range is zoomed to where runs end."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = [m for m in table.methods if not m.seed_shift
               and (m.strategy == gm or m.strategy not in opt.gms)]
    groups = [(m, [read_run(run_dir(table.setting, m, s, opt)) for s in opt.seeds])
              for m in methods]
    target = build_report([r for _, runs in groups for r in runs]).rows[0].target
    finals = [r.final_acc for _, runs in groups for r in runs]
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_b = fig.subplots(1, 2, sharey=True)
    for k, (method, runs) in enumerate(groups):
        style = "--" if method.strategy == "full" else "-"
        for i, r in enumerate(runs):
            acc = [100 * a for a in r.accuracies]
            kw = {"color": f"C{k % 10}", "linewidth": 1.2, "alpha": 0.8,
                  "label": method.label if i == 0 else None}
            ax_t.plot([x["elapsed_seconds"] for x in r.records], acc, style, **kw)
            kw["label"] = None
            ax_b.plot([x["total_backpropagated"] for x in r.records], acc, style, **kw)
    for ax in (ax_t, ax_b):
        ax.axhline(100 * target, color="0.3", linestyle=":", linewidth=1)
        ax.axhline(100 * min(finals), color="0.6", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    ax_t.set_ylim(100 * min(finals) - 8, 100 * max(finals) + 1)
    ax_t.set_xlabel("select + train seconds (log)")
    ax_b.set_xlabel("examples backpropagated (log)")
    ax_t.set_ylabel("test accuracy (%)")
    fig.suptitle(f"{table.setting.title}: dotted: A = {100 * target:.2f} % and the lowest final "
                 f"accuracy shown, {100 * min(finals):.2f} %", fontsize=10)
    fig.legend(fontsize=7, loc="outside right upper")
    fig.savefig(path, dpi=90)


# ---- main --------------------------------------------------------------------------------------
def wait_for_load(max_load: float, max_wait_s: float) -> tuple[float, float]:
    """Sleep 60 s at a time while the 1-minute load average exceeds `max_load`, at most
    `max_wait_s`; return (load when starting, seconds waited)."""
    waited = 0.0
    load = os.getloadavg()[0]
    while load > max_load and waited < max_wait_s:
        print(f"load average {load:.2f} > {max_load}: waiting 60 s", flush=True)
        time.sleep(60)
        waited += 60
        load = os.getloadavg()[0]
    return load, waited


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=["lr", "optimizer", "arch", "all"])
    p.add_argument("--root", type=Path, default=Path("runs/cached"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=_DEFAULT.epochs)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--select-every", type=int, default=_DEFAULT.select_every)
    p.add_argument("--warm", type=float, default=0.5, help="kappa of the warm variants (arch); "
                   "0: none")
    p.add_argument("--gm", nargs="+", default=["gradmatch", "gradmatchpb"],
                   help="Grad-Match strategies to run and replay (randompb for smoke tests)")
    p.add_argument("--train-size", type=int, help="default: the dataset default (20000)")
    p.add_argument("--test-size", type=int, help="default: the dataset default (2000)")
    p.add_argument("--max-load", type=float, default=2.5)
    p.add_argument("--max-wait", type=float, default=900, help="seconds to wait for the load")
    p.add_argument("--plot-dir", type=Path, help="write <experiment>.png here (default ROOT)")
    p.add_argument("--fresh", action="store_true", help="re-run finished runs")
    p.add_argument("--plot-gm", help="Grad-Match strategy shown in the plots (default: first)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    opt = Options(args.root, args.seeds, args.epochs, args.fraction, args.select_every, args.warm,
                  args.gm, args.train_size, args.test_size, args.fresh)
    print("command: " + shlex.join(["python", *sys.argv]), flush=True)
    names = ["lr", "optimizer", "arch"] if args.experiment == "all" else [args.experiment]
    load, waited = wait_for_load(args.max_load, args.max_wait)
    print(f"load average {load:.2f} after waiting {waited:.0f} s; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    opt.root.mkdir(parents=True, exist_ok=True)
    for name in names:
        tables, shown = experiment(name, opt)
        for seed in opt.seeds:  # seeds outermost: each seed's runs finish before the next
            for table in tables:
                for method in table.methods:
                    ensure_run(table.setting, method, seed, opt)
        out: list[str] = []
        data = []
        for table in tables:
            rows = method_rows(table, opt)
            out.append(markdown(table, rows))
            data.append({"setting": table.setting.slug, "note": table.note, "rows": rows})
        text = "\n\n".join(out)
        print(f"\n## {name}\n\n{text}\n", flush=True)
        (opt.root / f"{name}.md").write_text(text + "\n")
        loads = [json.loads((Path(r) / "load.json").read_text())["loadavg_1min_at_start"]
                 for d in data for row in d["rows"] for r in row["paths"]
                 if (Path(r) / "load.json").exists()]
        (opt.root / f"{name}.json").write_text(json.dumps(
            {"tables": data, "load_at_run_start": {"min": min(loads, default=None),
                                                    "max": max(loads, default=None)}},
            indent=1))
        plot_dir = args.plot_dir or opt.root
        plot_dir.mkdir(parents=True, exist_ok=True)
        shown_table = next(t for t in tables if t.setting == shown)
        plot(shown_table, opt, plot_dir / f"cached_{name}.png", args.plot_gm or opt.gms[0])
        print(f"plot: {plot_dir / f'cached_{name}.png'} ({shown.title}); loads at run start "
              f"{min(loads, default=0):.2f}-{max(loads, default=0):.2f}", flush=True)
    (opt.root / "commands.txt").write_text("\n".join(dict.fromkeys(opt.commands)) + "\n")
    print(f"commands: {opt.root / 'commands.txt'}")


__all__ = ["Method", "Setting", "config_for", "main"]

if __name__ == "__main__":
    main()
