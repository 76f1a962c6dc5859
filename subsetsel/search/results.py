"""Results: the reference run, the results table (printed, CSV, JSON) and the retraining of the
best configuration on the full data."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subsetsel.atomic import atomic_open
from subsetsel.search.bookkeeping import (
    is_counted,
    is_failed,
    latest_failures,
    session_of,
    trial_result,
)
from subsetsel.search.space import Param, fmt
from subsetsel.search.study import SearchError, SearchSettings

if TYPE_CHECKING:
    import optuna

    from subsetsel.data import Dataset


@dataclass
class Reference:
    """A full-data run used as the speed and accuracy reference."""

    run_dir: str
    elapsed_seconds: float
    final_acc: float | None

    @classmethod
    def load(cls, run_dir: str | Path, dataset_size: int | None = None) -> Reference:
        """Read a finished plain full-data run (strategy full, no replay, plain policy, no warm
        start; the fraction is unused then). dataset_size: refuse a run on a training set of
        another size. Raises SearchError (one line)."""
        path = Path(run_dir) / "summary.json"
        if not path.exists():
            raise SearchError(f"--reference {run_dir}: no summary.json (not a finished run)")
        try:
            summary = json.loads(path.read_text())
            seconds = float(summary["elapsed_seconds"])
            config = summary.get("config") or _run_config(Path(run_dir))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise SearchError(f"--reference {path}: unreadable summary ({err})") from None
        if not seconds > 0:
            raise SearchError(f"--reference {path}: elapsed_seconds is {seconds}, not > 0")
        problem = _not_full_data(config)
        if problem:
            raise SearchError(f"--reference {run_dir} is not a full-data run ({problem})")
        size = _run_dataset_size(Path(run_dir))
        if dataset_size is not None and size is not None and size != dataset_size:
            raise SearchError(
                f"--reference {run_dir} trained on {size} examples, this search on "
                f"{dataset_size}: not comparable"
            )
        return cls(str(run_dir), seconds, summary.get("final_acc"))


def _run_config(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / "config.json").read_text())["config"])


def _run_dataset_size(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / "config.json").read_text())["dataset_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _not_full_data(config: dict[str, Any]) -> str | None:
    """Why a run config does not train on every example every epoch (None: it does)."""
    if config.get("replay"):
        return f"it replays {config['replay']}"
    if config.get("strategy") != "full":
        return f"strategy {config.get('strategy')!r}, not 'full'"
    if config.get("policy", "plain") != "plain":
        return f"policy {config.get('policy')!r}, not 'plain'"
    if config.get("warm_start") and config.get("fraction", 1) != 1:
        return f"warm start {config['warm_start']} with fraction {config['fraction']}"
    return None


def results(
    study: optuna.Study, space: Sequence[Param], reference: Reference | None = None
) -> list[dict[str, Any]]:
    """One row per COMPLETE / PRUNED trial, and per configuration whose latest attempt failed
    (and was not done since); best accuracy first: trial, state, the searched parameters, acc
    (final test accuracy), best_acc, train_seconds (select + train; eval excluded), speedup
    (reference seconds / train_seconds, or None), epochs, run_dir, error."""
    trials = study.get_trials(deepcopy=False)
    shown = [t for t in trials if is_counted(t)] + latest_failures(trials)
    rows = []
    for t in shown:
        result = trial_result(t)
        seconds = result.get("elapsed_seconds")
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name}
        row.update({p.name: t.params.get(p.name) for p in space})
        row.update(
            acc=result.get("final_acc", t.value),
            best_acc=result.get("best_acc"),
            train_seconds=seconds,
            speedup=(
                reference.elapsed_seconds / seconds if reference and seconds else None
            ),
            epochs=result.get("epochs_run"),
            run_dir=t.user_attrs.get("run_dir"),
            error=t.user_attrs.get("error") or t.user_attrs.get("diverged"),
        )
        rows.append(row)
    rows.sort(key=lambda r: (r["acc"] is None, -(r["acc"] or 0.0), r["trial"]))
    return rows


def failure_summary(study: optuna.Study, session: str = "") -> str | None:
    """One line when the study has no COMPLETE / PRUNED trial but failed ones: how many failed
    and the message of the first (of `session`'s failures when it has any); else None."""
    trials = study.get_trials(deepcopy=False)
    if any(is_counted(t) for t in trials):
        return None
    failed = sorted((t for t in trials if is_failed(t)), key=lambda t: t.number)
    if not failed:
        return None
    mine = [t for t in failed if session and session_of(t) == session]
    first = (mine or failed)[0]
    return (f"every trial failed ({len(mine or failed)}); first, trial {first.number}: "
            f"{first.user_attrs['error']}")


def speedup_note(reference: Reference | None) -> str:
    if reference is None:
        return "speedup: no --reference given"
    return (
        f"speedup = reference training seconds ({reference.elapsed_seconds:.1f} s, "
        f"{reference.run_dir}) / trial training seconds (select + train time, eval excluded; "
        "the one-time cost of making the selection file is not in the trial's time)"
    )


def format_table(rows: Sequence[dict[str, Any]], space: Sequence[Param]) -> str:
    """Fixed-width text table of `results` rows."""
    columns = ["trial", "state", *(p.name for p in space), "acc", "best_acc", "train_s", "speedup"]
    cells = []
    for r in rows:
        values = {**r, "train_s": r["train_seconds"]}
        cells.append([_cell(c, values.get(c)) for c in columns])
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column in ("acc", "best_acc"):
        return f"{value:.4f}"
    if column == "train_s":
        return f"{value:.1f}"
    if column == "speedup":
        return f"{value:.2f}x"
    return fmt(value)


def write_results(
    out_dir: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any]
) -> tuple[Path, Path]:
    """`<out>/results.csv` (rows) and `<out>/results.json` (meta + rows), written atomically."""
    csv_path, json_path = out_dir / "results.csv", out_dir / "results.json"
    columns = list(rows[0]) if rows else ["trial", "state", "acc"]
    with atomic_open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    with atomic_open(json_path, "w") as f:
        json.dump({**meta, "trials": list(rows)}, f, indent=2)
    return csv_path, json_path


def retrain_best(
    settings: SearchSettings, params: dict[str, Any], out_dir: Path,
    dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Train `params` on the full data in `out_dir` (resumed if interrupted, reused if done).
    dataset: the data of `settings.base`, already loaded."""
    from subsetsel.run import run

    config = dataclasses.replace(settings.trial_config(params), replay=None, strategy="full")
    summary_path = out_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("config") == config.to_json():
            return summary
        raise SearchError(f"{out_dir} holds another run; remove it to retrain the best config")
    return run(config, out_dir, resume=(out_dir / "checkpoint.pt").exists(), dataset=dataset)
