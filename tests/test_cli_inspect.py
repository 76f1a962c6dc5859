"""`subsetsel inspect`: text and JSON reports, one-line errors, class balance from the config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from subsetsel.cli.inspect_cmd import inspect_command
from subsetsel.selection.base import Selection
from subsetsel.store import SelectionMetadata, SelectionStore

N = 50


def _meta(**overrides) -> SelectionMetadata:
    values = dict(
        dataset="mnist1d",
        dataset_size=N,
        fingerprint="f00d",
        num_classes=10,
        strategy="random",
        strategy_params={"fraction": 0.2},
        model="mlp",
        seed=1,
        epochs=6,
        config={"dataset": "mnist1d", "seed": 1},
    )
    values.update(overrides)
    return SelectionMetadata(**values)


def _write(
    path: Path, meta: SelectionMetadata | None = None, *, finish: bool = True
) -> SelectionStore:
    """Rounds at epochs 0 and 3 of 6; `finish=False` is a run killed after its second round."""
    store = SelectionStore.create(path, meta or _meta())
    store.append(Selection(torch.arange(10), torch.full((10,), 0.5), epoch=0, seconds=0.25))
    store.append(Selection(torch.arange(5, 15), torch.linspace(0, 2, 10), epoch=3))
    if finish:
        store.finish()
    return store


def test_text_report(tmp_path: Path) -> None:
    path = tmp_path / "sel.h5"
    _write(path)
    result = CliRunner().invoke(inspect_command, [str(path)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "mnist1d" in out and "N=50" in out and "random" in out and "fraction=0.2" in out
    assert "epochs=6" in out and "format 2" in out and "incomplete" not in out
    assert "% of N" in out and "jaccard" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert rows[0][:5] == ["0", "0", "10", "20.0", "0.25"]
    assert rows[0][-2:] == ["-", "-"]
    # round 1 = 5..14 vs 0..9: 5 shared, union 15
    assert rows[1][:3] == ["1", "3", "10"] and rows[1][-2:] == ["0.333", "0.500"]


def test_json_report(tmp_path: Path) -> None:
    path = tmp_path / "sel.h5"
    _write(path)
    result = CliRunner().invoke(inspect_command, [str(path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["metadata"]["strategy_params"] == {"fraction": 0.2}
    assert [r["epoch"] for r in summary["rounds"]] == [0, 3]
    assert summary["rounds"][1]["weight_max"] == pytest.approx(2.0)
    assert summary["rounds"][1]["jaccard_prev"] == pytest.approx(1 / 3)
    assert summary["complete"] is True and summary["span"] == 6 and summary["warnings"] == []


def test_incomplete_file_is_reported(tmp_path: Path) -> None:
    """A killed run's file says so, in the text report and in --json (select_every 2)."""
    from subsetsel.cli import main

    path = tmp_path / "killed.h5"
    _write(path, _meta(strategy_params={"fraction": 0.2, "select_every": 2}), finish=False)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "  rounds    2\n  incomplete: rounds up to epoch 3 of 6 (" in result.output
    assert "cover epochs 0-4" in result.output
    result = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["complete"] is False and summary["span"] == 5
    assert summary["warnings"][0].startswith("incomplete: rounds up to epoch 3 of 6")


def test_incomplete_file_without_rounds(tmp_path: Path) -> None:
    from subsetsel.cli import main

    path = tmp_path / "early.h5"
    SelectionStore.create(path, _meta())
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "incomplete: no rounds of 6 epochs" in result.output


def test_bare_name_is_looked_up_in_selections(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write(Path("selections/mine.h5"))
    result = CliRunner().invoke(inspect_command, ["mine", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["path"] == str(Path("selections/mine.h5"))


def _assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for needle in needles:
        assert needle in lines[0]


def test_corrupt_file_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    path.write_text("not hdf5 at all\n")
    _assert_one_line_error(CliRunner().invoke(inspect_command, [str(path)]), str(path))


def test_truncated_file_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.h5"
    _write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_one_line_error(CliRunner().invoke(inspect_command, [str(path)]), str(path))


def test_missing_file_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.h5"
    result = CliRunner().invoke(inspect_command, [str(path)])
    _assert_one_line_error(result, "no such selection file")


def test_class_balance_loads_the_configured_dataset(tmp_path: Path) -> None:
    from subsetsel.data import load_dataset

    data = load_dataset("digits", seed=0)
    meta = _meta(
        dataset="digits",
        dataset_size=len(data),
        fingerprint=data.fingerprint(),
        config={"dataset": "digits", "seed": 0, "data_root": None},
    )
    path = tmp_path / "digits.h5"
    _write(path, meta)
    result = CliRunner().invoke(inspect_command, [str(path), "--class-balance", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)["rounds"][0]
    expected = torch.bincount(data.y_train[:10], minlength=10).tolist()
    assert row["class_counts"] == expected and row["classes"] == sum(c > 0 for c in expected)
    text = CliRunner().invoke(inspect_command, [str(path), "--class-balance"])
    assert text.exit_code == 0 and "classes" in text.output

    bad = tmp_path / "other.h5"
    _write(bad, _meta(dataset="digits", dataset_size=len(data), config=meta.config))
    result = CliRunner().invoke(inspect_command, [str(bad), "--class-balance"])
    _assert_one_line_error(result, "f00d", data.fingerprint())


def test_registered_in_main_group() -> None:
    from subsetsel.cli import main

    assert main.commands["inspect"] is inspect_command
