"""Turn run directories into fixed-accuracy speedup tables, CSV/JSON and accuracy plots.

A run directory (written by `subsetsel train --out` or `subsetsel onepass --out`) holds
config.json and log.jsonl (one JSON record per logged epoch). The rules, in short:

- Method label: `full`; `<strategy>[-warm]-f<fraction>`; `cached-<source strategy>...` for replayed
  runs; `+<policy>` for a non-plain policy; `onepass-<priority>-m<storage>-k<steps>` (or
  `onepass-naive`). Runs whose settings differ only in seeds, device or file paths form one group
  (their mean ± sample std is reported); groups that would share a label get a `[field=value]`
  suffix naming what differs.
- Reference: the groups given by `reference=` or else every group of full-data runs (strategy
  `full`, plain policy, not replayed). With several reference groups, each method uses the one
  that matches its training settings on the fields in which the references differ (e.g. `lr`).
- Target accuracy A: `target` if given, else (lowest final test accuracy over the reference's
  runs) - `tolerance`, so that every reference run reaches it.
- Time to A of a run: `elapsed_seconds` (cumulative select + train seconds, evaluation excluded)
  of the first logged epoch with test_acc >= A (1e-9 slack for float rounding), no interpolation;
  backprops to A: `total_backpropagated` of that epoch. A group's time to A is the mean over its
  runs, defined only when every run reaches A.
- Speedup = reference mean time to A / method mean time to A (ratio of means); the same with
  backprops gives a speedup that does not depend on machine load.
- Does selecting pay: select share = select seconds / elapsed seconds per run (mean ± std over
  runs); time vs random = method mean time to A / mean time to A of its random control (the
  group whose settings are the method's with the strategy swapped for `random`, or `randompb`
  for per-batch strategies; see `random_control`), defined only when both reach A in every run.
- Logs are read strictly: NaN/Infinity tokens and epochs that do not increase are refused.

Accuracies are fractions in [0, 1] throughout (the table prints percent).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subsetsel.errors import NonFiniteError, first_line

ACC_SLACK = 1e-9  # accuracy >= A - ACC_SLACK counts as reaching A
DEFAULT_TOLERANCE = 0.01
# settings that never distinguish methods: seeds of one method differ only in these
IGNORED_FIELDS = frozenset(
    {"seed", "data_seed", "device", "data_root", "save_selections", "replay"}
)
# settings of the training itself (not of the method); references are matched on these
TRAINING_FIELDS = (
    "dataset", "train_size", "test_size", "model", "epochs", "batch_size", "optimizer", "lr",
    "momentum", "nesterov", "weight_decay", "schedule", "slow_input",
)
# strategy settings a replayed run ignores (the selection file decides)
_REPLAY_UNUSED = ("strategy", "fraction", "select_every", "warm_start", "strategy_params")
_REQUIRED = ("epoch", "test_acc", "elapsed_seconds")


class RunDirError(Exception):
    """A run directory is missing, incomplete or unreadable (one-line message)."""


class ReportError(ValueError):
    """The runs given cannot produce the report asked for (no or ambiguous reference)."""


# ---- reading -----------------------------------------------------------------------------------
@dataclass
class Run:
    """One run directory: its config.json (`info`) and log records, oldest first."""

    path: str
    info: dict[str, Any]
    records: list[dict[str, Any]]
    replay_source: dict[str, Any] | None = None  # strategy/fraction/warm_start/model of a replay

    @property
    def config(self) -> dict[str, Any]:
        return self.info.get("config", {})

    @property
    def kind(self) -> str:
        """'onepass' for `subsetsel onepass` runs, else 'train'."""
        return str(self.info.get("kind", "train"))

    @property
    def replayed(self) -> bool:
        return self.kind == "train" and bool(self.config.get("replay"))

    @property
    def seed(self) -> int | None:
        return self.config.get("seed")

    @property
    def accuracies(self) -> list[float]:
        return [float(r["test_acc"]) for r in self.evaluated]

    @property
    def evaluated(self) -> list[dict[str, Any]]:
        """The records of epochs that were evaluated (all but `--eval-every` gaps)."""
        return [r for r in self.records if r["test_acc"] is not None]

    @property
    def final_acc(self) -> float:
        """Accuracy at the last evaluated epoch."""
        return float(self.evaluated[-1]["test_acc"])

    @property
    def best_acc(self) -> float:
        return max(self.accuracies)

    @property
    def select_seconds(self) -> float:
        """Total seconds spent selecting subsets."""
        return sum(float(r.get("select_seconds", 0.0)) for r in self.records)

    @property
    def elapsed_seconds(self) -> float:
        """Total select + train seconds."""
        return float(self.records[-1]["elapsed_seconds"])

    @property
    def select_share(self) -> float | None:
        """Fraction of the select + train seconds spent selecting, in [0, 1] (None when the run
        logged no time at all)."""
        elapsed = self.elapsed_seconds
        return self.select_seconds / elapsed if elapsed > 0 else None

    @property
    def total_backpropagated(self) -> int | None:
        return self.records[-1].get("total_backpropagated")

    @property
    def storage_pct(self) -> float | None:
        """Largest replay-buffer size as % of the training set (one-pass runs)."""
        values = [r["storage_pct"] for r in self.records if "storage_pct" in r]
        return max(values) if values else None

    @property
    def compute_pct(self) -> float | None:
        """Backprops as % of the reference multi-epoch run's (one-pass runs)."""
        return self.records[-1].get("compute_pct")

    @property
    def complete(self) -> bool:
        """Whether the log covers the whole planned run."""
        if self.kind == "onepass":
            return float(self.records[-1].get("stream_fraction", 1.0)) >= 1.0 - 1e-9
        total = self.info.get("total_epochs")
        return total is None or len(self.records) >= int(total)


def read_run(path: str | Path, replay_cache: dict[str, Any] | None = None) -> Run:
    """Read a run directory; raise RunDirError naming the problem."""
    folder = Path(path)
    if not folder.is_dir():
        raise RunDirError(f"{folder}: no such run directory")
    config_path, log_path = folder / "config.json", folder / "log.jsonl"
    if not log_path.is_file():
        raise RunDirError(f"{folder}: no log.jsonl, not a subsetsel run directory")
    if not config_path.is_file():
        raise RunDirError(f"{folder}: no config.json, not a subsetsel run directory")
    try:
        info = strict_json(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{config_path}: unreadable ({first_line(err)})") from None
    except NonFiniteError as err:
        raise RunDirError(f"{config_path}: not strict JSON ({err})") from None
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise RunDirError(f"{config_path}: has no 'config' object")
    records = read_records(log_path)
    run = Run(str(folder), info, records)
    if run.replayed:
        cache = {} if replay_cache is None else replay_cache
        source = str(run.config["replay"])
        if source not in cache:
            cache[source] = _replay_source(source)
        run.replay_source = cache[source]
    return run


def strict_json(text: str) -> Any:
    """`json.loads` that refuses what strict JSON has no words for: the NaN, Infinity and
    -Infinity tokens (Python's json module accepts them by default) and numbers too large for a
    float (1e999 would become inf). Raises NonFiniteError naming the token."""

    def constant(token: str) -> float:
        raise NonFiniteError(f"{token} is not a JSON number")

    def number(token: str) -> float:
        value = float(token)
        if not math.isfinite(value):
            raise NonFiniteError(f"{token} overflows a float")
        return value

    return json.loads(text, parse_constant=constant, parse_float=number)


def read_records(log_path: Path) -> list[dict[str, Any]]:
    """The records of a log.jsonl. A last line without a newline that does not parse is a write
    in progress and is skipped; any other bad line (not JSON, NaN/Infinity tokens, not an object,
    missing numbers, an epoch not above the previous line's) raises RunDirError naming the file
    and line."""
    try:
        text = log_path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise RunDirError(f"{log_path}: unreadable ({first_line(err)})") from None
    lines = text.split("\n")
    records: list[dict[str, Any]] = []
    previous: tuple[int, float] | None = None  # (line number, epoch) of the last record
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = strict_json(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: still being written
                continue
            raise RunDirError(f"{log_path}: line {number} is not valid JSON") from None
        except NonFiniteError as err:
            raise RunDirError(f"{log_path}: line {number} is not strict JSON ({err})") from None
        if not isinstance(record, dict):
            raise RunDirError(f"{log_path}: line {number} is not a JSON object")
        missing = [k for k in _REQUIRED if not _is_number(record.get(k))]
        if missing == ["test_acc"] and record.get("test_acc", 0) is None:
            missing = []  # an epoch without evaluation (--eval-every, `subsetsel select`)
        if missing:
            raise RunDirError(f"{log_path}: line {number} lacks numeric {', '.join(missing)}")
        if previous is not None and not record["epoch"] > previous[1]:
            raise RunDirError(
                f"{log_path}: line {number} logs epoch {_num(record['epoch'])} after epoch "
                f"{_num(previous[1])} (line {previous[0]}); epochs must increase (two runs "
                "writing one folder?)"
            )
        previous = (number, record["epoch"])
        records.append(record)
    if not records:
        raise RunDirError(f"{log_path}: no epoch records (empty log)")
    if all(r["test_acc"] is None for r in records):
        raise RunDirError(f"{log_path}: no epoch was evaluated yet")
    return records


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _replay_source(path: str) -> dict[str, Any] | None:
    """Strategy, fraction, warm start, model and selection interval of a replayed selection file
    (None if gone)."""
    from subsetsel.store import SelectionFileError, SelectionStore

    try:
        meta = SelectionStore.open(path).metadata
    except (SelectionFileError, OSError):
        return None
    return {
        "strategy": meta.strategy,
        "fraction": meta.config.get("fraction"),
        "warm_start": meta.strategy_params.get("warm_start", meta.config.get("warm_start", 0.0)),
        "model": meta.model,
        "select_every": meta.strategy_params.get("select_every",
                                                 meta.config.get("select_every")),
    }


# ---- labels and groups -------------------------------------------------------------------------
def is_full_data(run: Run) -> bool:
    """A plain full-data `subsetsel train` run: the default reference."""
    c = run.config
    return (run.kind == "train" and not run.replayed and c.get("strategy") == "full"
            and c.get("policy", "plain") == "plain")


def base_label(run: Run) -> str:
    """The method's short name (see the module docstring)."""
    c = run.config
    if run.kind == "onepass":
        method = str(run.info.get("method", c.get("priority", "onepass")))
        if method == "naive" or c.get("replay_steps") == 0:
            return "onepass-naive"
        return f"onepass-{method}-m{_num(c.get('storage'))}-k{c.get('replay_steps')}"
    if run.replayed:
        src = run.replay_source
        if src is None:
            label = f"cached-{Path(str(c['replay'])).stem}"
        else:
            label = "cached-" + _strategy_label(src["strategy"], src["fraction"],
                                                src["warm_start"])
    else:
        label = _strategy_label(c.get("strategy", "?"), c.get("fraction"), c.get("warm_start"))
    policy = c.get("policy", "plain")
    return label if policy == "plain" else f"{label}+{policy}"


def _strategy_label(strategy: str, fraction: Any, warm_start: Any) -> str:
    if strategy == "full":
        return "full"
    warm = "-warm" if warm_start else ""
    frac = f"-f{_num(fraction)}" if fraction is not None else ""
    return f"{strategy}{warm}{frac}"


def identity(run: Run) -> dict[str, Any]:
    """Flat settings that define the method and its training (seed, device, paths left out).
    Runs with equal identity are seeds of one method."""
    c = dict(run.config)
    if run.kind == "onepass":
        c["epochs"] = c.get("reference_epochs")  # the multi-epoch run it is compared with
    if run.replayed:
        for key in _REPLAY_UNUSED:
            c.pop(key, None)
        src = run.replay_source or {"file": Path(str(run.config["replay"])).stem}
        c.update({f"replay_{k}": v for k, v in src.items()})
    if c.get("strategy") == "full" and not c.get("warm_start"):
        for key in ("fraction", "select_every", "strategy_params"):
            c.pop(key, None)
    flat = _flatten({k: v for k, v in c.items() if k not in IGNORED_FIELDS})
    flat["kind"] = run.kind
    return flat


@dataclass
class Group:
    """Runs of one method (same identity), in input order."""

    label: str
    runs: list[Run]
    identity: dict[str, Any]

    @property
    def training(self) -> dict[str, Any]:
        return {k: self.identity.get(k) for k in TRAINING_FIELDS}


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Group runs by identity (input order kept); make labels unique by a `[field=value]` suffix
    listing the settings that differ between groups sharing a base label."""
    groups: list[Group] = []
    for run in runs:
        ident = identity(run)
        for g in groups:
            if g.identity == ident:
                g.runs.append(run)
                break
        else:
            groups.append(Group(base_label(run), [run], ident))
    by_label: dict[str, list[Group]] = {}
    for g in groups:
        by_label.setdefault(g.label, []).append(g)
    for same in by_label.values():
        if len(same) < 2:
            continue
        keys = sorted({k for g in same for k in g.identity})
        differ = [k for k in keys if len({_text(g.identity.get(k)) for g in same}) > 1]
        for g in same:
            g.label += " [" + ",".join(f"{k}={_text(g.identity.get(k))}" for k in differ) + "]"
    return groups


def match_references(groups: Sequence[Group], references: Sequence[Group]) -> dict[str, Group]:
    """For every group's label, its reference group: the only one, or the one agreeing with it on
    the training fields in which the references differ. Raises ReportError if none or several."""
    if len(references) == 1:
        return {g.label: references[0] for g in groups}
    keys = [k for k in TRAINING_FIELDS
            if len({_text(r.identity.get(k)) for r in references}) > 1]
    if not keys:
        names = ", ".join(r.label for r in references)
        raise ReportError(f"references {names} differ in no training setting; pass one --reference")
    chosen: dict[str, Group] = {}
    for g in groups:
        if any(g is r for r in references):
            chosen[g.label] = g
            continue
        hits = [r for r in references
                if all(_text(r.identity.get(k)) == _text(g.identity.get(k)) for k in keys)]
        if len(hits) != 1:
            wanted = ",".join(f"{k}={_text(g.identity.get(k))}" for k in keys)
            raise ReportError(
                f"{len(hits)} reference groups match {g.label} ({wanted}); pass --reference DIR"
            )
        chosen[g.label] = hits[0]
    return chosen


# per-batch strategies pick whole mini-batches: their random control picks random mini-batches
RANDOM_CONTROLS = {"gradmatchpb": "randompb", "randompb": "randompb"}
DEFAULT_RANDOM_CONTROL = "random"


def random_control(strategy: str) -> str | None:
    """The random strategy a subset strategy is judged against: `randompb` for the per-batch
    strategies (`gradmatchpb`, `randompb`), `random` for every other one, None for `full`."""
    if strategy == "full":
        return None
    return RANDOM_CONTROLS.get(strategy, DEFAULT_RANDOM_CONTROL)


def _random_twin(ident: dict[str, Any]) -> dict[str, str] | None:
    """The (comparable) identity of the random-subset control of a method: its identity with the
    strategy swapped for its random control (a replayed run: for the control of the strategy
    that made the file, at that file's fraction, warm start and selection interval). Strategy
    options are left out (random has none to match). None when there is no control (full data,
    one-pass, a replay whose file is gone)."""
    if ident.get("kind") != "train":
        return None
    twin = {k: v for k, v in ident.items() if not _is_strategy_option(k)}
    if "replay_strategy" in ident:
        control = random_control(str(ident["replay_strategy"]))
        for key in [k for k in twin if k.startswith("replay_")]:
            twin.pop(key)
        twin.update({"fraction": ident.get("replay_fraction"),
                     "warm_start": ident.get("replay_warm_start"),
                     "select_every": ident.get("replay_select_every")})
    elif "replay_file" in ident or "strategy" not in ident:
        return None
    else:
        control = random_control(str(ident["strategy"]))
    if control is None:
        return None
    twin["strategy"] = control
    return _comparable(twin)


def _is_strategy_option(key: str) -> bool:
    return key == "strategy_params" or key.startswith("strategy_params.")


def _comparable(ident: dict[str, Any]) -> dict[str, str]:
    return {k: _text(v) for k, v in ident.items() if not _is_strategy_option(k)}


def match_random(groups: Sequence[Group]) -> dict[int, Group]:
    """{id(group): its random control group} for every group whose control is among `groups`:
    the group of plain (not replayed) runs whose settings equal the method's with the strategy
    swapped (see `_random_twin`). A random group is its own control. When several groups would
    match (they differ only in strategy options), none is chosen."""
    comparable = [(g, _comparable(g.identity)) for g in groups]
    matches: dict[int, Group] = {}
    for g in groups:
        twin = _random_twin(g.identity)
        if twin is None:
            continue
        hits = [h for h, ident in comparable if ident == twin]
        if len(hits) == 1:
            matches[id(g)] = hits[0]
    return matches


# ---- the math ----------------------------------------------------------------------------------
def first_reach(records: Sequence[dict[str, Any]], target: float, key: str) -> float | None:
    """`record[key]` of the first record with test_acc >= target (ACC_SLACK allowed), or None
    when no record reaches it or that record lacks `key`."""
    for r in records:
        if r["test_acc"] is not None and float(r["test_acc"]) >= target - ACC_SLACK:
            value = r.get(key)
            return None if value is None else float(value)
    return None


def default_target(reference: Group, tolerance: float) -> float:
    """Lowest final accuracy over the reference's runs minus `tolerance` (all of them reach it)."""
    return min(run.final_acc for run in reference.runs) - tolerance


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (0 for one value) of n values."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat | None:
        """None if there are no values or any is None."""
        vals = list(values)
        if not vals or any(v is None for v in vals):
            return None
        floats = [float(v) for v in vals]  # type: ignore[arg-type]
        std = statistics.stdev(floats) if len(floats) > 1 else 0.0
        return cls(statistics.fmean(floats), std, len(floats))


@dataclass
class Row:
    """One method group's line of the report."""

    group: Group
    reference: Group | None
    target: float | None
    times: list[float | None]  # per run: seconds to the target (None: not reached)
    backprops: list[float | None]  # per run: examples backpropagated to the target
    time_to_target: Stat | None  # over runs; None unless every run reaches the target
    backprops_to_target: Stat | None
    speedup_time: float | None = None
    speedup_backprops: float | None = None
    steps_to_target: Stat | None = None  # optimizer steps to the target
    speedup_steps: float | None = None
    select_share: Stat | None = None  # select seconds / select+train seconds, over runs
    random: Group | None = None  # the random control group (same settings, strategy swapped)
    random_times: list[float | None] = field(default_factory=list)  # its runs' seconds to target
    random_time_to_target: Stat | None = None
    time_vs_random: float | None = None  # method mean time to A / random mean time to A

    @property
    def label(self) -> str:
        return self.group.label

    @property
    def is_reference(self) -> bool:
        return self.reference is self.group

    @property
    def reached(self) -> int:
        return sum(t is not None for t in self.times)

    @property
    def random_reached(self) -> int | None:
        """How many runs of the random control reach this row's target (None: no control)."""
        return None if self.random is None else sum(t is not None for t in self.random_times)

    @property
    def vs_random_status(self) -> str:
        """Why `time_vs_random` is (un)defined: 'ratio', 'no random runs', 'method does not
        reach A' (some run of the method misses A) or 'random does not reach A' (some run of the
        control misses it)."""
        if self.random is None:
            return "no random runs"
        if self.time_to_target is None:
            return "method does not reach A"
        if self.random_time_to_target is None:
            return "random does not reach A"
        return "ratio"


@dataclass
class Report:
    rows: list[Row]
    tolerance: float
    explicit_target: float | None
    warnings: list[str] = field(default_factory=list)

    @property
    def targets(self) -> list[tuple[Group | None, float | None]]:
        """(reference, target) pairs, in row order, without repeats."""
        seen: list[tuple[Group | None, float | None]] = []
        for row in self.rows:
            pair = (row.reference, row.target)
            if not any(p[0] is pair[0] and p[1] == pair[1] for p in seen):
                seen.append(pair)
        return seen


def build_report(
    runs: Sequence[Run],
    *,
    reference_paths: Sequence[str] = (),
    target: float | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Report:
    """Group `runs`, pick references and targets, and compute times to target and speedups.

    `reference_paths` (paths of runs among `runs`) overrides the full-data detection. Raises
    ReportError when no reference exists and no explicit `target` is given, or references are
    ambiguous.
    """
    if target is not None and not 0.0 < target <= 1.0:
        raise ReportError(
            f"--target is a test accuracy, a fraction in (0, 1] such as 0.9; got {target:g}"
        )
    if not 0.0 <= tolerance < 1.0:
        raise ReportError(f"--tolerance must be in [0, 1) (0.01 = 1 point); got {tolerance:g}")
    groups = group_runs(runs)
    wanted = {_key(p) for p in reference_paths}
    if wanted:
        references = [g for g in groups if any(_key(r.path) in wanted for r in g.runs)]
    else:
        references = [g for g in groups if all(is_full_data(r) for r in g.runs)]
    if not references and target is None:
        raise ReportError(
            "no full-data reference among the runs (strategy full, plain policy, not replayed); "
            "add one, pass --reference DIR, or give --target A for times without speedups"
        )
    refs = match_references(groups, references) if references else {}
    is_ref = [any(g is r for r in references) for g in groups]
    order = [g for g, ref in zip(groups, is_ref, strict=True) if ref] + [
        g for g, ref in zip(groups, is_ref, strict=True) if not ref]
    report = Report([], tolerance, target)
    for g in order:
        ref = refs.get(g.label)
        goal = target if target is not None else default_target(ref, tolerance)  # type: ignore[arg-type]
        times = [first_reach(r.records, goal, "elapsed_seconds") for r in g.runs]
        bps = [first_reach(r.records, goal, "total_backpropagated") if t is not None else None
               for r, t in zip(g.runs, times, strict=True)]
        steps = [first_reach(r.records, goal, "total_steps") if t is not None else None
                 for r, t in zip(g.runs, times, strict=True)]
        row = Row(g, ref, goal, times, bps, Stat.of(times), Stat.of(bps))
        row.steps_to_target = Stat.of(steps)
        row.select_share = Stat.of(r.select_share for r in g.runs)
        report.rows.append(row)
    controls = match_random(groups)
    for row in report.rows:
        row.random = controls.get(id(row.group))
        if row.random is None or row.target is None:
            continue
        row.random_times = [first_reach(r.records, row.target, "elapsed_seconds")
                            for r in row.random.runs]
        row.random_time_to_target = Stat.of(row.random_times)
        row.time_vs_random = _ratio(row.time_to_target, row.random_time_to_target)
    by_group = {id(row.group): row for row in report.rows}
    for row in report.rows:
        if row.reference is None:
            continue
        ref_row = by_group[id(row.reference)]
        row.speedup_time = _ratio(ref_row.time_to_target, row.time_to_target)
        row.speedup_backprops = _ratio(ref_row.backprops_to_target, row.backprops_to_target)
        row.speedup_steps = _ratio(ref_row.steps_to_target, row.steps_to_target)
    report.warnings = _warnings(report)
    return report


def _ratio(ref: Stat | None, method: Stat | None) -> float | None:
    if ref is None or method is None or method.mean <= 0:
        return None
    return ref.mean / method.mean


def _warnings(report: Report) -> list[str]:
    notes: list[str] = []
    for row in report.rows:
        for run in row.group.runs:
            if not run.complete:
                notes.append(f"{run.path}: incomplete run ({len(run.records)} records logged)")
        if row.reference is not None and not row.is_reference:
            for key in ("dataset", "train_size", "test_size"):
                ours, theirs = row.group.identity.get(key), row.reference.identity.get(key)
                if _text(ours) != _text(theirs):
                    notes.append(f"{row.label}: {key} {_text(ours)} differs from reference "
                                 f"{row.reference.label} ({_text(theirs)}); accuracies may not "
                                 "be comparable")
        if row.is_reference and row.time_to_target is None:
            notes.append(f"reference {row.label} does not reach the target in every run: "
                         "no speedups against it")
    return notes


# ---- outputs -----------------------------------------------------------------------------------
def row_to_json(row: Row) -> dict[str, Any]:
    """Machine-readable form of a row (accuracies as fractions, seconds, example counts)."""
    runs = row.group.runs
    return {
        "method": row.label,
        "reference": row.reference.label if row.reference is not None else None,
        "is_reference": row.is_reference,
        "runs": len(runs),
        "target": row.target,
        "reached": row.reached,
        "final_acc": _stat_json(Stat.of(r.final_acc for r in runs)),
        "best_acc": _stat_json(Stat.of(r.best_acc for r in runs)),
        "time_to_target": _stat_json(row.time_to_target),
        "backprops_to_target": _stat_json(row.backprops_to_target),
        "speedup_time": row.speedup_time,
        "speedup_backprops": row.speedup_backprops,
        "steps_to_target": _stat_json(row.steps_to_target),
        "speedup_steps": row.speedup_steps,
        "select_seconds": _stat_json(Stat.of(r.select_seconds for r in runs)),
        "elapsed_seconds": _stat_json(Stat.of(r.elapsed_seconds for r in runs)),
        "select_share": _stat_json(row.select_share),
        "random_match": row.random.label if row.random is not None else None,
        "random_reached": row.random_reached,
        "random_time_to_target": _stat_json(row.random_time_to_target),
        "time_vs_random": row.time_vs_random,
        "vs_random_status": row.vs_random_status,
        "total_backpropagated": _stat_json(Stat.of(r.total_backpropagated for r in runs)),
        "storage_pct": _stat_json(Stat.of(r.storage_pct for r in runs)),
        "compute_pct": _stat_json(Stat.of(r.compute_pct for r in runs)),
        "per_run": [
            {"path": r.path, "seed": r.seed, "final_acc": r.final_acc, "best_acc": r.best_acc,
             "time_to_target": t, "backprops_to_target": b, "select_seconds": r.select_seconds,
             "elapsed_seconds": r.elapsed_seconds, "select_share": r.select_share,
             "epochs_logged": len(r.records),
             "complete": r.complete}
            for r, t, b in zip(runs, row.times, row.backprops, strict=True)
        ],
        "settings": row.group.identity,
    }


def report_to_json(report: Report) -> dict[str, Any]:
    return {
        "target_rule": target_rule(report),
        "tolerance": report.tolerance,
        "explicit_target": report.explicit_target,
        "methods": [row_to_json(row) for row in report.rows],
        "warnings": report.warnings,
    }


CSV_COLUMNS = (
    "method", "reference", "runs", "target", "reached", "final_acc_mean", "final_acc_std",
    "best_acc_mean", "best_acc_std", "time_to_target_mean", "time_to_target_std",
    "backprops_to_target_mean", "steps_to_target_mean", "speedup_time", "speedup_backprops",
    "speedup_steps", "select_seconds_mean",
    "select_seconds_std", "elapsed_seconds_mean", "elapsed_seconds_std", "storage_pct_mean",
    "compute_pct_mean", "paths", "select_share_mean", "select_share_std", "random_match",
    "random_time_to_target_mean", "time_vs_random", "vs_random_status",
)


def write_csv(report: Report, path: str | Path) -> None:
    """One row per method; empty cells for undefined values; accuracies as fractions."""
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for row in report.rows:
            j = row_to_json(row)
            flat: dict[str, Any] = {
                "method": j["method"], "reference": j["reference"], "runs": j["runs"],
                "target": j["target"], "reached": j["reached"],
                "speedup_time": j["speedup_time"], "speedup_backprops": j["speedup_backprops"],
                "speedup_steps": j["speedup_steps"],
                "paths": ";".join(r.path for r in row.group.runs),
                "random_match": j["random_match"], "time_vs_random": j["time_vs_random"],
                "vs_random_status": j["vs_random_status"],
            }
            for key in ("final_acc", "best_acc", "time_to_target", "backprops_to_target",
                        "steps_to_target", "select_seconds", "elapsed_seconds", "storage_pct",
                        "compute_pct", "select_share", "random_time_to_target"):
                stat = j[key] or {}
                flat[f"{key}_mean"] = stat.get("mean")
                flat[f"{key}_std"] = stat.get("std")
            writer.writerow(["" if flat.get(c) is None else flat[c] for c in CSV_COLUMNS])


def target_rule(report: Report) -> str:
    """One sentence per target: what A is and where it came from."""
    if report.explicit_target is not None:
        return f"A = {_pct(report.explicit_target)} % (--target)"
    parts = []
    for ref, goal in report.targets:
        assert ref is not None and goal is not None
        lowest = min(r.final_acc for r in ref.runs)
        parts.append(
            f"A = {_pct(goal)} % = lowest final accuracy of {ref.label} ({len(ref.runs)} runs) "
            f"{_pct(lowest)} % - tolerance {100 * report.tolerance:.2f} points"
        )
    return "; ".join(parts)


def format_table(report: Report) -> str:
    """The human-readable report: target rule, one line per method, warnings excluded."""
    onepass = any(r.storage_pct is not None for row in report.rows for r in row.group.runs)
    several_targets = len({row.target for row in report.rows}) > 1
    several_refs = len({id(row.reference) for row in report.rows}) > 1
    vs_random = any(row.random is not None for row in report.rows)
    header = ["method", "runs"]
    if several_refs:
        header.append("reference")
    if several_targets:
        header.append("A %")
    header += ["final acc %", "best acc %", "time to A s", "speedup", "backprops to A",
               "speedup bp", "speedup steps"]
    if vs_random:
        header.append("time/random")
    header += ["select s", "select %", "elapsed s"]
    if onepass:
        header += ["storage %", "compute %"]
    lines = []
    for row in report.rows:
        runs = row.group.runs
        cells = [row.label + (" (ref)" if row.is_reference else ""), str(len(runs))]
        if several_refs:
            cells.append(row.reference.label if row.reference is not None else "-")
        if several_targets:
            cells.append(_pct(row.target) if row.target is not None else "-")
        cells += [
            _fmt(Stat.of(r.final_acc for r in runs), 100, 2),
            _fmt(Stat.of(r.best_acc for r in runs), 100, 2),
            _reach_cell(row, row.time_to_target, 1, 2),
            _x(row.speedup_time),
            _reach_cell(row, row.backprops_to_target, 1, 0),
            _x(row.speedup_backprops),
            _x(row.speedup_steps),
        ]
        if vs_random:
            cells.append(vs_random_cell(row))
        cells += [
            _fmt(Stat.of(r.select_seconds for r in runs), 1, 2),
            _fmt(row.select_share, 100, 1),
            _fmt(Stat.of(r.elapsed_seconds for r in runs), 1, 2),
        ]
        if onepass:
            cells += [_fmt(Stat.of(r.storage_pct for r in runs), 1, 2),
                      _fmt(Stat.of(r.compute_pct for r in runs), 1, 2)]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    table = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                  enumerate(zip(cells, widths, strict=True)))
        for cells in [header, *lines]
    ]
    intro = [
        f"target: {target_rule(report)}",
        "time to A: select+train seconds at the first logged epoch with test accuracy >= A; "
        "speedup = reference time to A / method time to A (means over runs); "
        "select % = select s / elapsed s"
        + ("; time/random = method time to A / time to A of random subsets at the same settings "
           "(< 1: selecting pays)" if vs_random else ""),
        "",
    ]
    return "\n".join(intro + table)


def plot_report(report: Report, path: str | Path) -> None:
    """PNG (or any matplotlib format by extension) with two panels: test accuracy against
    select+train seconds and against examples backpropagated; one line per run, one colour per
    method, references dashed, targets dotted. Uses the Agg canvas (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_time, ax_bp = fig.subplots(1, 2, sharey=True)
    colors = [f"C{i % 10}" for i in range(len(report.rows))]
    for row, color in zip(report.rows, colors, strict=True):
        style = "--" if row.is_reference else "-"
        for i, run in enumerate(row.group.runs):
            label = _legend(row) if i == 0 else None
            records = run.evaluated
            acc = [100 * float(r["test_acc"]) for r in records]
            ax_time.plot([r["elapsed_seconds"] for r in records], acc, style, color=color,
                         marker=".", markersize=4, linewidth=1.4, alpha=0.85, label=label)
            bps = [r.get("total_backpropagated") for r in records]
            if all(b is not None for b in bps):
                ax_bp.plot(bps, acc, style, color=color, marker=".", markersize=4,
                           linewidth=1.4, alpha=0.85)
    for _, goal in report.targets:
        if goal is not None:
            for ax in (ax_time, ax_bp):
                ax.axhline(100 * goal, color="0.4", linestyle=":", linewidth=1)
            ax_time.annotate(f"A = {_pct(goal)} %", (0, 100 * goal), xycoords=("axes fraction",
                             "data"), xytext=(3, 3), textcoords="offset points", fontsize=8,
                             color="0.3")
    ax_time.set_xlabel("select + train seconds")
    ax_bp.set_xlabel("examples backpropagated")
    ax_time.set_ylabel("test accuracy (%)")
    ax_time.set_title("accuracy vs wall time")
    ax_bp.set_title("accuracy vs backprops")
    for ax in (ax_time, ax_bp):
        ax.grid(alpha=0.3)
    ax_time.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=110)


def vs_random_cell(row: Row) -> str:
    """The text cell for `time_vs_random`: the ratio ('0.80'), '-' when there is no random
    control or the method itself misses A, 'random never reaches A' / 'random k/n reach A' when
    the control misses it."""
    status = row.vs_random_status
    if status == "ratio" and row.time_vs_random is not None:
        return f"{row.time_vs_random:.2f}"
    if status == "random does not reach A":
        k, n = row.random_reached, len(row.random_times)
        return "random never reaches A" if k == 0 else f"random {k}/{n} reach A"
    return "-"


# ---- formatting helpers ------------------------------------------------------------------------
def _legend(row: Row) -> str:
    """Plot legend entry: label, runs, share of time selecting, time vs random when defined."""
    parts = [f"n={len(row.group.runs)}"]
    if row.select_share is not None and round(100 * row.select_share.mean) > 0:
        parts.append(f"select {100 * row.select_share.mean:.0f} %")  # left out when it rounds to 0
    cell = vs_random_cell(row)
    if row.random is not None and row.random is not row.group and cell != "-":
        parts.append(f"{cell}x random's time to A" if row.time_vs_random is not None else cell)
    return f"{row.label} ({', '.join(parts)})"


def _reach_cell(row: Row, stat: Stat | None, scale: float, digits: int) -> str:
    n = len(row.times)
    if row.reached == 0:
        return "not reached"
    if row.reached < n:
        return f"{row.reached}/{n} reached"
    return _fmt(stat, scale, digits)


def _fmt(stat: Stat | None, scale: float, digits: int) -> str:
    if stat is None:
        return "-"
    text = f"{stat.mean * scale:,.{digits}f}"
    return text if stat.n < 2 else f"{text} ± {stat.std * scale:,.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _pct(acc: float) -> str:
    return f"{100 * acc:.2f}"


def _stat_json(stat: Stat | None) -> dict[str, float] | None:
    return None if stat is None else {"mean": stat.mean, "std": stat.std, "n": stat.n}


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _key(path: str | Path) -> str:
    return str(Path(path).resolve())


__all__ = [
    "Group", "Report", "ReportError", "Row", "Run", "RunDirError", "Stat", "base_label",
    "build_report", "default_target", "first_reach", "format_table", "group_runs", "identity",
    "is_full_data", "match_random", "match_references", "plot_report", "random_control",
    "read_records", "read_run", "report_to_json", "strict_json", "vs_random_cell", "write_csv",
]
