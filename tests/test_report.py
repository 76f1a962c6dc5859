"""`subsetsel report`: the speedup/target math on synthetic logs, real tiny runs, and the CLI."""

from __future__ import annotations

import csv
import json
import math

import pytest
from click.testing import CliRunner

from subsetsel.cli import main
from subsetsel.onepass.stream import OnePassConfig, run_onepass
from subsetsel.report import (
    ReportError,
    RunDirError,
    Stat,
    build_report,
    first_reach,
    format_table,
    read_run,
    report_to_json,
    row_to_json,
)
from subsetsel.train import TrainConfig, read_log


# ---- synthetic run directories -------------------------------------------------------------------
def write_run(folder, accs, elapsed, *, backprops=None, select=None, kind="train", info=None,
              extra=None, **config):
    """A run directory with the given per-epoch test accuracies, cumulative seconds and
    cumulative backprops (default 100 per epoch)."""
    folder.mkdir(parents=True)
    n = len(accs)
    backprops = backprops or [100 * (i + 1) for i in range(n)]
    select = select or [0.0] * n
    cfg = (OnePassConfig(**config) if kind == "onepass" else TrainConfig(**config)).to_json()
    meta = {"config": cfg, "total_epochs": n, "dataset_size": 1000, **(info or {})}
    if kind == "onepass":
        meta["kind"] = "onepass"
    (folder / "config.json").write_text(json.dumps(meta))
    with open(folder / "log.jsonl", "w") as log:
        for i in range(n):
            record = {"epoch": i, "test_acc": accs[i], "elapsed_seconds": elapsed[i],
                      "select_seconds": select[i], "total_backpropagated": backprops[i],
                      **((extra or {}).get(i, {}))}
            log.write(json.dumps(record) + "\n")
    return folder


def load(*folders):
    return [read_run(f) for f in folders]


@pytest.fixture
def seeded_runs(tmp_path):
    """Two full-data seeds, two Grad-Match-like seeds, one random run that never gets there and
    a RandomPB method with one of two seeds reaching the target."""
    t = tmp_path
    return load(
        write_run(t / "full0", [0.60, 0.80, 0.88, 0.90], [10, 20, 30, 40], strategy="full", seed=0),
        write_run(t / "full1", [0.60, 0.87, 0.86, 0.88], [11, 22, 33, 44], strategy="full", seed=1),
        write_run(t / "gm0", [0.70, 0.87, 0.88], [2, 4, 6], backprops=[10, 20, 30],
                  select=[0.5, 0.5, 0.5], strategy="gradmatch", fraction=0.1, seed=0),
        write_run(t / "gm1", [0.80, 0.86, 0.875], [3, 6, 9], backprops=[10, 20, 30],
                  select=[1.0, 1.0, 1.0], strategy="gradmatch", fraction=0.1, seed=1),
        write_run(t / "rand0", [0.50, 0.60], [1, 2], strategy="random", fraction=0.1),
        write_run(t / "pb0", [0.90], [5], strategy="randompb", fraction=0.1, seed=0),
        write_run(t / "pb1", [0.80], [5], strategy="randompb", fraction=0.1, seed=1),
    )


# ---- the math ------------------------------------------------------------------------------------
def test_first_reach_is_the_first_epoch_at_or_above_the_target():
    records = [{"test_acc": a, "elapsed_seconds": s, "total_backpropagated": b}
               for a, s, b in [(0.5, 1.0, 10), (0.7, 2.0, 20), (0.9, 3.0, 30), (0.85, 4.0, 40)]]
    assert first_reach(records, 0.7, "elapsed_seconds") == 2.0  # equal counts as reached
    assert first_reach(records, 0.8, "elapsed_seconds") == 3.0  # no interpolation
    assert first_reach(records, 0.8, "total_backpropagated") == 30
    assert first_reach(records, 0.95, "elapsed_seconds") is None
    assert first_reach(records, 0.3, "elapsed_seconds") == 1.0
    # float rounding: 0.88 - 0.01 is not exactly 0.87, the slack absorbs it
    assert first_reach([{"test_acc": 0.87, "elapsed_seconds": 5.0}], 0.88 - 0.01 + 1e-12,
                       "elapsed_seconds") == 5.0
    assert first_reach([{"test_acc": 0.5}], 0.4, "total_backpropagated") is None  # key missing


def test_speedup_at_equal_optimizer_steps(tmp_path):
    """`total_steps` in the logs gives a third speedup, at equal optimizer steps."""
    steps = {i: {"total_steps": 50 * (i + 1)} for i in range(4)}
    full = write_run(tmp_path / "full", [0.5, 0.8, 0.9, 0.92], [1, 2, 3, 4], strategy="full",
                     extra=steps)
    sb = write_run(tmp_path / "sb", [0.6, 0.91, 0.93], [1, 2, 3], strategy="full", policy="sb",
                   extra={i: {"total_steps": 20 * (i + 1)} for i in range(3)})
    report = build_report(load(full, sb))
    row = next(r for r in report.rows if not r.is_reference)
    # A = 0.92 - 0.01 = 0.91: full reaches it at epoch 3 (200 steps), sb at epoch 1 (40 steps)
    assert row.steps_to_target.mean == 40.0 and row.speedup_steps == pytest.approx(5.0)
    assert row_to_json(row)["speedup_steps"] == pytest.approx(5.0)


def test_stat_mean_and_sample_std():
    s = Stat.of([30.0, 22.0])
    assert s.mean == 26.0 and s.n == 2 and s.std == pytest.approx(math.sqrt(32))
    assert Stat.of([5.0]).std == 0.0
    assert Stat.of([1.0, None]) is None and Stat.of([]) is None


def test_default_target_speedups_over_seeds(seeded_runs):
    report = build_report(seeded_runs)
    rows = {row.label: row for row in report.rows}
    assert [row.label for row in report.rows] == ["full", "gradmatch-f0.1", "random-f0.1",
                                                  "randompb-f0.1"]  # reference first
    full, gm, rand, pb = (rows[k] for k in ("full", "gradmatch-f0.1", "random-f0.1",
                                            "randompb-f0.1"))
    # A = min(final 0.90, final 0.88) - 0.01 = 0.87, for every method
    assert all(row.target == pytest.approx(0.87) for row in report.rows)
    assert full.is_reference and gm.reference is full.group
    # reference: seed 0 reaches 0.87 at epoch 2 (30 s, 300 bp), seed 1 at epoch 1 (22 s, 200 bp)
    assert full.times == [30.0, 22.0] and full.backprops == [300.0, 200.0]
    assert full.time_to_target.mean == 26.0 and full.backprops_to_target.mean == 250.0
    assert full.speedup_time == 1.0 and full.speedup_backprops == 1.0
    # Grad-Match: 4 s / 20 bp and 9 s / 30 bp -> means 6.5 s and 25 bp
    assert gm.times == [4.0, 9.0] and gm.backprops == [20.0, 30.0]
    assert gm.speedup_time == pytest.approx(26.0 / 6.5)
    assert gm.speedup_backprops == pytest.approx(250.0 / 25.0)
    # never reaching, and reaching in one seed of two: no time, no speedup
    assert rand.reached == 0 and rand.time_to_target is None and rand.speedup_time is None
    assert pb.reached == 1 and pb.times == [5.0, None] and pb.speedup_time is None
    assert report.warnings == []

    j = {m["method"]: m for m in report_to_json(report)["methods"]}
    assert j["gradmatch-f0.1"]["final_acc"]["mean"] == pytest.approx(0.8775)
    assert j["gradmatch-f0.1"]["select_seconds"] == {"mean": 2.25, "std": pytest.approx(
        math.sqrt(1.125)), "n": 2}  # 1.5 s and 3.0 s
    assert j["gradmatch-f0.1"]["elapsed_seconds"]["mean"] == 7.5
    assert j["full"]["best_acc"]["mean"] == pytest.approx(0.89)
    assert [r["seed"] for r in j["full"]["per_run"]] == [0, 1]

    text = format_table(report)
    assert "A = 87.00 %" in text and "lowest final accuracy of full (2 runs) 88.00 %" in text
    gm_line = next(line for line in text.splitlines() if line.startswith("gradmatch"))
    assert "4.00x" in gm_line and "10.00x" in gm_line and "87.75 ± 0.35" in gm_line
    assert "not reached" in next(line for line in text.splitlines() if line.startswith("random-"))
    assert "1/2 reached" in next(line for line in text.splitlines() if line.startswith("randompb"))


def test_tolerance_and_explicit_target(seeded_runs):
    # tolerance 0: A = 0.88; seed 1 of the reference reaches it only at its last epoch (44 s)
    report = build_report(seeded_runs, tolerance=0.0)
    full = report.rows[0]
    assert full.target == pytest.approx(0.88) and full.times == [30.0, 44.0]
    gm = next(r for r in report.rows if r.label == "gradmatch-f0.1")
    assert gm.times == [6.0, None] and gm.speedup_time is None
    # explicit target: same A for all; the reference misses 0.95, so no speedups, and a warning
    report = build_report(seeded_runs, target=0.95)
    assert all(r.target == 0.95 and r.speedup_time is None for r in report.rows)
    assert any("does not reach the target" in w for w in report.warnings)
    report = build_report(seeded_runs, target=0.7)
    gm = next(r for r in report.rows if r.label == "gradmatch-f0.1")
    assert report.rows[0].times == [20.0, 22.0] and gm.times == [2.0, 3.0]
    assert gm.speedup_time == pytest.approx(21.0 / 2.5)
    with pytest.raises(ReportError, match="fraction in"):
        build_report(seeded_runs, target=90)
    with pytest.raises(ReportError, match="tolerance"):
        build_report(seeded_runs, tolerance=-0.1)


def test_without_reference_a_target_is_needed(tmp_path):
    runs = load(write_run(tmp_path / "a", [0.5, 0.8], [1, 2], strategy="random"))
    with pytest.raises(ReportError, match="no full-data reference"):
        build_report(runs)
    report = build_report(runs, target=0.6)
    assert report.rows[0].times == [2.0] and report.rows[0].reference is None
    assert report.rows[0].speedup_time is None
    assert "(--target)" in format_table(report)


def test_reference_override(seeded_runs):
    report = build_report(seeded_runs, reference_paths=[seeded_runs[2].path])  # gm0's group
    gm = report.rows[0]
    assert gm.label == "gradmatch-f0.1" and gm.is_reference
    assert gm.target == pytest.approx(0.865)  # min(0.88, 0.875) - 0.01
    full = next(r for r in report.rows if r.label == "full")
    assert full.times == [30.0, 22.0] and full.speedup_time == pytest.approx(6.5 / 26.0)


# ---- labels, groups and references --------------------------------------------------------------
def test_labels_group_seeds_and_disambiguate(tmp_path):
    t = tmp_path
    runs = load(
        write_run(t / "f", [0.9], [1], strategy="full", fraction=0.1, seed=0),
        write_run(t / "f1", [0.9], [1], strategy="full", fraction=1.0, seed=1, device="cpu",
                  data_seed=3),
        write_run(t / "r0", [0.9], [1], strategy="random", fraction=0.25, lr=0.1, seed=0),
        write_run(t / "r1", [0.9], [1], strategy="random", fraction=0.25, lr=0.01, seed=0),
        write_run(t / "w", [0.9], [1], strategy="random", fraction=0.25, warm_start=0.5),
        write_run(t / "sb", [0.9], [1], strategy="full", policy="selective_backprop"),
        write_run(t / "c", [0.9], [1], replay=str(t / "gone.h5"), strategy="random"),
        write_run(t / "o", [0.9], [1], kind="onepass", storage=0.05, replay_steps=2,
                  priority="error", info={"method": "error"}),
        write_run(t / "n", [0.9], [1], kind="onepass", replay_steps=0, info={"method": "naive"}),
    )
    report = build_report(runs)
    labels = [row.label for row in report.rows]
    assert labels == ["full", "random-f0.25 [lr=0.1]", "random-f0.25 [lr=0.01]",
                      "random-warm-f0.25", "full+selective_backprop", "cached-gone",
                      "onepass-error-m0.05-k2", "onepass-naive"]
    assert len(report.rows[0].group.runs) == 2  # fraction of `full`, seeds, device: no
    assert not report.rows[4].is_reference  # a non-plain policy is not the reference


def test_several_references_are_matched_on_what_differs(tmp_path):
    t = tmp_path
    runs = load(
        write_run(t / "fa", [0.5, 0.9], [10, 20], strategy="full", lr=0.1),
        write_run(t / "fb", [0.9, 0.9], [10, 20], strategy="full", lr=0.01),
        write_run(t / "ga", [0.9], [4], strategy="gradmatch", lr=0.1),
        write_run(t / "gb", [0.9], [4], strategy="gradmatch", lr=0.01),
    )
    report = build_report(runs)
    rows = {r.label: r for r in report.rows}
    assert rows["gradmatch-f0.1 [lr=0.1]"].reference.label == "full [lr=0.1]"
    assert rows["gradmatch-f0.1 [lr=0.1]"].speedup_time == pytest.approx(20 / 4)
    assert rows["gradmatch-f0.1 [lr=0.01]"].speedup_time == pytest.approx(10 / 4)
    assert "reference" in format_table(report).splitlines()[3]
    orphan = load(write_run(t / "gc", [0.9], [4], strategy="gradmatch", lr=0.5))
    with pytest.raises(ReportError, match="0 reference groups match"):
        build_report(runs + orphan)


# ---- reading -------------------------------------------------------------------------------------
def test_log_reading_errors(tmp_path):
    run = write_run(tmp_path / "a", [0.5, 0.6], [1, 2], strategy="full")
    with open(run / "log.jsonl", "a") as log:
        log.write('{"epoch": 2, "test_a')  # a write in progress: skipped
    assert len(read_run(run).records) == 2
    (run / "log.jsonl").write_text('{"epoch": 0, "test_acc": 0.5, "elapsed_seconds": 1}\nxx\n')
    with pytest.raises(RunDirError, match="line 2 is not valid JSON"):
        read_run(run)
    (run / "log.jsonl").write_text('{"epoch": 0, "elapsed_seconds": 1}\n')
    with pytest.raises(RunDirError, match="lacks numeric test_acc"):
        read_run(run)
    (run / "log.jsonl").write_text("")
    with pytest.raises(RunDirError, match="empty log"):
        read_run(run)
    with pytest.raises(RunDirError, match="no such run directory"):
        read_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="no log.jsonl"):
        read_run(tmp_path / "empty")


# ---- real tiny runs ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """Full data (2 seeds), random 30 % saving its selections, and a replay of them."""
    from subsetsel.run import run

    root = tmp_path_factory.mktemp("runs")
    base = dict(dataset="mnist1d", train_size=400, test_size=200, model="mlp", epochs=3,
                batch_size=64, lr=0.1, device="cpu")
    for seed in (0, 1):
        run(TrainConfig(**base, strategy="full", seed=seed), root / f"full-s{seed}")
    run(TrainConfig(**base, strategy="random", fraction=0.3, select_every=1,
                    save_selections=str(root / "rand.h5")), root / "rand")
    run(TrainConfig(**base, replay=str(root / "rand.h5"), seed=1), root / "cached")
    onepass = {k: v for k, v in base.items() if k != "epochs"}
    run_onepass(OnePassConfig(**onepass, storage=0.1, replay_steps=2, reference_epochs=3,
                              log_every=0.5), root / "onepass")
    return root


def test_report_on_real_runs(real_runs):
    dirs = [real_runs / n for n in ("rand", "cached", "full-s0", "full-s1")]
    report = build_report(load(*dirs))
    rows = {row.label: row for row in report.rows}
    assert list(rows) == ["full", "random-f0.3", "cached-random-f0.3"]
    logs = {d.name: read_log(d) for d in dirs}
    target = min(logs["full-s0"][-1]["test_acc"], logs["full-s1"][-1]["test_acc"]) - 0.01
    assert rows["full"].target == pytest.approx(target)
    for name, label in (("rand", "random-f0.3"), ("cached", "cached-random-f0.3")):
        log, row = logs[name], rows[label]
        first = next((r for r in log if r["test_acc"] >= target - 1e-9), None)
        assert row.times == [None if first is None else first["elapsed_seconds"]]
        j = row_json = report_to_json(report)["methods"][list(rows).index(label)]
        assert row_json["final_acc"]["mean"] == log[-1]["test_acc"]
        assert j["select_seconds"]["mean"] == pytest.approx(sum(r["select_seconds"] for r in log))
        assert j["total_backpropagated"]["mean"] == log[-1]["total_backpropagated"] == 3 * 120
    full_times = [next(r["elapsed_seconds"] for r in logs[n] if r["test_acc"] >= target - 1e-9)
                  for n in ("full-s0", "full-s1")]
    assert rows["full"].time_to_target.mean == pytest.approx(sum(full_times) / 2)
    assert rows["random-f0.3"].group.identity["select_every"] == 1


def test_report_on_a_real_onepass_run(real_runs):
    report = build_report(load(real_runs / "full-s0", real_runs / "onepass"))
    row = report.rows[1]
    assert row.label == "onepass-uniform-m0.1-k2" and row.reference is report.rows[0].group
    log = read_log(real_runs / "onepass")
    assert len(log) == 2 and log[-1]["stream_fraction"] == 1.0
    j = report_to_json(report)["methods"][1]
    assert j["storage_pct"]["mean"] == pytest.approx(10.0)  # 40 of 400 examples held
    backprops = log[-1]["total_backpropagated"]
    assert j["compute_pct"]["mean"] == pytest.approx(100 * backprops / (3 * 400))
    assert j["per_run"][0]["complete"]
    text = format_table(report)
    assert "storage %" in text.splitlines()[3] and "compute %" in text.splitlines()[3]


# ---- the command ---------------------------------------------------------------------------------
def _invoke(args):
    return CliRunner().invoke(main, args)


def _assert_one_line_error(result, code, text):
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and text in errors[0], result.output


def test_cli_json_csv_and_plot(real_runs, tmp_path):
    dirs = [str(real_runs / n) for n in ("full-s0", "full-s1", "rand", "cached")]
    result = _invoke(["report", *dirs, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [m["method"] for m in data["methods"]] == ["full", "random-f0.3",
                                                      "cached-random-f0.3"]
    assert data["methods"][0]["runs"] == 2 and data["methods"][0]["speedup_time"] == 1.0
    assert "lowest final accuracy of full (2 runs)" in data["target_rule"]

    csv_path, png = tmp_path / "r.csv", tmp_path / "r.png"
    result = _invoke(["report", *dirs, dirs[0] + "/", "--csv", str(csv_path), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "full (ref)" in result.output and "speedup bp" in result.output
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["full", "random-f0.3", "cached-random-f0.3"]
    assert rows[0]["runs"] == "2" and float(rows[0]["speedup_time"]) == 1.0  # dir given twice
    assert float(rows[1]["final_acc_mean"]) == read_log(real_runs / "rand")[-1]["test_acc"]

    from matplotlib.image import imread

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    pixels = imread(png)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 1000 and pixels.std() > 0.05


def test_cli_reference_and_target_options(real_runs):
    result = _invoke(["report", str(real_runs / "rand"), "--target", "0.05"])
    assert result.exit_code == 0, result.output
    assert "A = 5.00 % (--target)" in result.output
    result = _invoke(["report", str(real_runs / "cached"), "--reference", str(real_runs / "rand"),
                      "--json"])
    assert result.exit_code == 0, result.output
    methods = json.loads(result.stdout)["methods"]
    assert methods[0]["method"] == "random-f0.3" and methods[0]["is_reference"]


def test_cli_bad_inputs(real_runs, tmp_path):
    _assert_one_line_error(_invoke(["report", str(tmp_path / "none")]), 1, "no such run")
    (tmp_path / "empty").mkdir()
    _assert_one_line_error(_invoke(["report", str(tmp_path / "empty")]), 1, "no log.jsonl")
    bad = write_run(tmp_path / "bad", [0.5], [1], strategy="full")
    (bad / "log.jsonl").write_text("{not json\n")
    _assert_one_line_error(_invoke(["report", str(bad)]), 1, "line 1 is not valid JSON")
    (bad / "log.jsonl").write_text("")
    _assert_one_line_error(_invoke(["report", str(bad)]), 1, "empty log")
    rand = str(real_runs / "rand")
    _assert_one_line_error(_invoke(["report", rand]), 2, "no full-data reference")
    _assert_one_line_error(_invoke(["report", rand, "--target", "90"]), 2, "fraction in (0, 1]")
    full = str(real_runs / "full-s0")
    _assert_one_line_error(_invoke(["report", full, "--plot", str(tmp_path / "p.xyz")]), 2,
                           "not supported")
    _assert_one_line_error(_invoke(["report", full, "--csv", str(tmp_path / "no" / "r.csv")]), 1,
                           "No such file")
    _assert_one_line_error(_invoke(["report"]), 2, "Missing argument")


def test_cli_warns_about_incomplete_runs(tmp_path):
    run = write_run(tmp_path / "a", [0.5, 0.9], [1, 2], strategy="full")
    meta = json.loads((run / "config.json").read_text())
    meta["total_epochs"] = 5
    (run / "config.json").write_text(json.dumps(meta))
    result = _invoke(["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "incomplete run (2 records logged)" in result.stderr


def test_runs_with_unevaluated_epochs(tmp_path):
    """--eval-every leaves test_acc null on some epochs: final = last evaluated, plots work."""
    full = write_run(tmp_path / "full", [0.5, 0.8, 0.9, 0.92], [1, 2, 3, 4], strategy="full")
    gaps = {0: {"test_acc": None}, 2: {"test_acc": None}}
    cut = write_run(tmp_path / "cut", [0.0, 0.91, 0.0], [1, 2, 3], strategy="random",
                    fraction=0.1, extra=gaps)
    report = build_report(load(full, cut))
    row = next(r for r in report.rows if not r.is_reference)
    assert load(cut)[0].final_acc == 0.91 and row.times == [2.0]
    result = CliRunner().invoke(main, ["report", str(full), str(cut), "--plot",
                                       str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").stat().st_size > 1000
    never = write_run(tmp_path / "never", [0.0], [1], strategy="random",
                      extra={0: {"test_acc": None}})
    with pytest.raises(RunDirError, match="no epoch was evaluated"):
        load(never)


# ---- strict logs ---------------------------------------------------------------------------------
def _log_lines(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


def test_interleaved_or_repeated_epochs_are_refused(tmp_path):
    """Two runs writing one folder interleave their epochs (0, 1, 0, 2, 1, 2): refused."""
    run = write_run(tmp_path / "a", [0.5, 0.6], [1, 2], strategy="full")
    rec = [{"epoch": e, "test_acc": 0.5, "elapsed_seconds": s}
           for e, s in [(0, 1), (1, 2), (0, 1.5), (2, 3), (1, 3), (2, 4)]]
    (run / "log.jsonl").write_text(_log_lines(*rec))
    with pytest.raises(RunDirError, match=r"line 3 logs epoch 0 after epoch 1 \(line 2\)"):
        read_run(run)
    (run / "log.jsonl").write_text(_log_lines(rec[0], rec[0]))  # a repeated epoch
    with pytest.raises(RunDirError, match="line 2 logs epoch 0 after epoch 0"):
        read_run(run)
    (run / "log.jsonl").write_text(_log_lines(rec[0], {**rec[0], "epoch": True}))
    with pytest.raises(RunDirError, match="line 2 lacks numeric epoch"):  # a bool is no epoch
        read_run(run)
    # blank lines and a write in progress do not count; increasing gaps (resume) are fine
    (run / "log.jsonl").write_text(_log_lines(rec[0]) + "\n" + _log_lines(rec[3])
                                   + '{"epoch": 1, "te')
    assert [r["epoch"] for r in read_run(run).records] == [0, 2]
    (run / "log.jsonl").write_text(_log_lines(*rec))
    result = _invoke(["report", str(run)])
    _assert_one_line_error(result, 1, f"{run / 'log.jsonl'}: line 3 logs epoch 0 after epoch 1")
    assert "two runs writing one folder" in result.output


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_strict_json_lines_are_refused(tmp_path, token):
    run = write_run(tmp_path / "a", [0.5, 0.6], [1, 2], strategy="full")
    good = '{"epoch": 0, "test_acc": 0.5, "elapsed_seconds": 1}\n'
    bad = '{"epoch": 1, "test_acc": 0.6, "elapsed_seconds": 2, "train_loss": ' + token + "}"
    assert not math.isfinite(json.loads(bad)["train_loss"])  # Python's json takes it
    for text in (good + bad + "\n", good + bad):  # even as a last line without a newline
        (run / "log.jsonl").write_text(text)
        with pytest.raises(RunDirError, match=f"line 2 is not strict JSON.*{token}"):
            read_run(run)
    result = _invoke(["report", str(run)])
    _assert_one_line_error(result, 1, f"{run / 'log.jsonl'}: line 2 is not strict JSON")
    (run / "log.jsonl").write_text(good)
    meta = (run / "config.json").read_text().replace('"lr": 0.05', f'"lr": {token}')
    (run / "config.json").write_text(meta)
    _assert_one_line_error(_invoke(["report", str(run)]), 1, "config.json: not strict JSON")


# ---- does selection pay: share of time selecting, time vs random --------------------------------
def test_random_control_of_each_strategy():
    from subsetsel.report import random_control

    assert random_control("gradmatch") == "random" and random_control("random") == "random"
    assert random_control("gradmatchpb") == "randompb" and random_control("randompb") == "randompb"
    assert random_control("full") is None


@pytest.fixture
def vs_random_runs(tmp_path):
    """Full data (A = 0.92 - 0.01 = 0.91, reached at 40 s) and methods with and without their
    random controls among the runs."""
    t = tmp_path
    sub = dict(fraction=0.1)
    return load(
        write_run(t / "full", [0.6, 0.8, 0.9, 0.92], [10, 20, 30, 40], strategy="full"),
        # random 10 %: 4 s and 3 s to A (mean 3.5)
        write_run(t / "r0", [0.7, 0.91], [2, 4], strategy="random", seed=0, **sub),
        write_run(t / "r1", [0.91], [3], strategy="random", seed=1, **sub),
        # gradmatch 10 %: 2 s and 3 s to A (mean 2.5); select 1/2 and 1/3 of the time
        write_run(t / "g0", [0.92], [2], select=[1.0], strategy="gradmatch", seed=0, **sub),
        write_run(t / "g1", [0.5, 0.95], [1, 3], select=[0.5, 0.5], strategy="gradmatch",
                  seed=1, **sub),
        # per-batch: gradmatchpb's control is randompb, which never reaches A
        write_run(t / "pb", [0.93], [1], select=[0.25], strategy="gradmatchpb", **sub),
        write_run(t / "rpb", [0.5], [1], strategy="randompb", **sub),
        # 30 %: no random 30 % run
        write_run(t / "g30", [0.95], [5], strategy="gradmatch", fraction=0.3),
        # 20 %: random reaches A in one seed of two
        write_run(t / "g20", [0.95], [5], strategy="gradmatch", fraction=0.2),
        write_run(t / "r20a", [0.95], [1], strategy="random", fraction=0.2, seed=0),
        write_run(t / "r20b", [0.5], [1], strategy="random", fraction=0.2, seed=1),
        # another schedule (select every epoch): random 10 % above selects every 5, no match
        write_run(t / "g1x", [0.95], [5], strategy="gradmatch", select_every=1, **sub),
    )


def test_time_vs_random_and_select_share(vs_random_runs):
    report = build_report(vs_random_runs)
    rows = {row.label: row for row in report.rows}
    full, rand, gm = rows["full"], rows["random-f0.1"], rows["gradmatch-f0.1 [select_every=5]"]
    assert full.target == pytest.approx(0.91) and rand.times == [4.0, 3.0]
    assert gm.random is rand.group and gm.times == [2.0, 3.0]
    assert gm.time_vs_random == pytest.approx(2.5 / 3.5) and gm.vs_random_status == "ratio"
    assert gm.random_time_to_target.mean == 3.5 and gm.random_reached == 2
    assert gm.select_share.mean == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert gm.select_share.std == pytest.approx(math.sqrt(2) * (1 / 2 - 1 / 3) / 2)
    assert rand.random is rand.group and rand.time_vs_random == 1.0  # its own control
    assert rand.select_share.mean == 0.0
    # full data has no random control; gradmatch every epoch has none among the runs
    assert full.random is None and full.vs_random_status == "no random runs"
    assert rows["gradmatch-f0.1 [select_every=1]"].random is None
    assert rows["gradmatch-f0.3"].random is None and rows["gradmatch-f0.3"].time_vs_random is None
    # gradmatchpb is judged against randompb (never reaching A), not against random
    pb = rows["gradmatchpb-f0.1"]
    assert pb.random is rows["randompb-f0.1"].group and pb.time_to_target.mean == 1.0
    assert pb.time_vs_random is None and pb.vs_random_status == "random does not reach A"
    assert pb.random_reached == 0 and pb.select_share.mean == 0.25
    # randompb itself misses A: "-" however its control does
    assert rows["randompb-f0.1"].vs_random_status == "method does not reach A"
    g20 = rows["gradmatch-f0.2"]
    assert g20.random_reached == 1 and g20.time_vs_random is None

    text = format_table(report)
    lines = {line.split("  ")[0].strip(): line for line in text.splitlines()[4:]}
    header = text.splitlines()[3]
    assert "time/random" in header and "select %" in header and "time/random =" in text
    assert "0.71" in lines["gradmatch-f0.1 [select_every=5]"]
    assert "41.7 ± 11.8" in lines["gradmatch-f0.1 [select_every=5]"]  # select %
    assert "random never reaches A" in lines["gradmatchpb-f0.1"]
    assert "random 1/2 reach A" in lines["gradmatch-f0.2"]
    assert "random" not in lines["randompb-f0.1"].split("randompb-f0.1")[1]
    column = header.index("time/random") + len("time/random")  # cells are right-aligned
    assert lines["random-f0.1"][:column].endswith(" 1.00")
    assert lines["gradmatchpb-f0.1"][:column].endswith(" random never reaches A")
    assert lines["full (ref)"][:column].endswith(" -")

    j = {m["method"]: m for m in report_to_json(report)["methods"]}
    g = j["gradmatch-f0.1 [select_every=5]"]
    assert g["random_match"] == "random-f0.1" and g["time_vs_random"] == pytest.approx(2.5 / 3.5)
    assert g["random_time_to_target"]["mean"] == 3.5 and g["vs_random_status"] == "ratio"
    assert g["select_share"]["n"] == 2 and g["per_run"][1]["select_share"] == pytest.approx(1 / 3)
    assert j["gradmatchpb-f0.1"]["random_match"] == "randompb-f0.1"
    assert j["gradmatchpb-f0.1"]["random_reached"] == 0
    assert j["full"]["random_match"] is None and j["full"]["vs_random_status"] == "no random runs"


def test_no_time_vs_random_column_without_controls(seeded_runs):
    """Only random runs without a method sharing their settings: the column still shows when a
    random row is its own control; with no random runs at all it is left out."""
    header = format_table(build_report(seeded_runs)).splitlines()[3]
    assert "time/random" in header and "select %" in header
    no_random = [r for r in seeded_runs if r.config["strategy"] not in ("random", "randompb")]
    header = format_table(build_report(no_random)).splitlines()[3]
    assert "time/random" not in header and "select %" in header


def test_cli_csv_json_and_plot_carry_the_new_columns(vs_random_runs, tmp_path):
    dirs = [r.path for r in vs_random_runs]
    csv_path, png = tmp_path / "r.csv", tmp_path / "r.png"
    result = _invoke(["report", *dirs, "--csv", str(csv_path), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "random never reaches A" in result.output
    with open(csv_path) as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    g = rows["gradmatch-f0.1 [select_every=5]"]
    assert float(g["time_vs_random"]) == pytest.approx(2.5 / 3.5)
    assert float(g["select_share_mean"]) == pytest.approx(5 / 12)
    assert g["random_match"] == "random-f0.1" and float(g["random_time_to_target_mean"]) == 3.5
    assert rows["gradmatchpb-f0.1"]["time_vs_random"] == ""
    assert rows["gradmatchpb-f0.1"]["vs_random_status"] == "random does not reach A"
    assert rows["full"]["random_match"] == "" and rows["full"]["select_share_mean"] == "0.0"
    result = _invoke(["report", *dirs, "--json"])
    methods = {m["method"]: m for m in json.loads(result.stdout)["methods"]}
    assert methods["gradmatch-f0.2"]["random_reached"] == 1
    assert png.stat().st_size > 20_000

    from subsetsel.report import _legend

    legends = {row.label: _legend(row) for row in build_report(vs_random_runs).rows}
    assert legends["gradmatch-f0.1 [select_every=5]"] == (
        "gradmatch-f0.1 [select_every=5] (n=2, select 42 %, 0.71x random's time to A)")
    assert legends["full"] == "full (n=1)" and legends["random-f0.1"] == "random-f0.1 (n=2)"
    assert legends["gradmatchpb-f0.1"] == ("gradmatchpb-f0.1 (n=1, select 25 %, random never "
                                           "reaches A)")
    assert legends["randompb-f0.1"] == "randompb-f0.1 (n=1)"


def test_replayed_runs_are_matched_with_random_at_the_file_settings(real_runs):
    """cached-random-f0.3 replays a random 30 % file (select every epoch): its control is the
    random 30 % run with that schedule and the replay's own training settings."""
    report = build_report(load(*(real_runs / n for n in ("full-s0", "full-s1", "rand",
                                                          "cached"))))
    rows = {row.label: row for row in report.rows}
    cached = rows["cached-random-f0.3"]
    assert cached.group.identity["replay_select_every"] == 1
    assert cached.random is rows["random-f0.3"].group
    assert cached.random_times == rows["random-f0.3"].times
    if cached.time_to_target is not None and rows["random-f0.3"].time_to_target is not None:
        assert cached.time_vs_random == pytest.approx(
            cached.time_to_target.mean / rows["random-f0.3"].time_to_target.mean)
    assert rows["full"].random is None


# ---- scripts/bench_target.py ---------------------------------------------------------------------
SCRIPTS = __import__("pathlib").Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture
def bench_target(monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module("bench_target")


def test_bench_target_defaults_are_the_product_table(bench_target):
    args = bench_target.parse_args([])
    assert args.variants == ["0.1:20", "0.3:20"] and args.seeds == [0, 1, 2]
    assert args.epochs == 20 and args.select_every == 5 and args.train_size is None
    assert args.tolerance == 0.01 and str(args.root) == "runs/target"
    assert bench_target.controls(args.gm) == ["random", "randompb"]
    quick = bench_target.parse_args(["--quick", "--seeds", "3"])
    assert quick.seeds == [3] and quick.epochs == 4 and quick.variants == ["0.1:4", "0.3:4"]
    assert quick.train_size == 2000 and quick.max_wait == 0 and str(quick.root) != "runs/target"
    assert bench_target.controls(["gradmatch"]) == ["random"]


def test_bench_target_end_to_end(bench_target, tmp_path, capsys):
    """One invocation runs full, random/randompb, Grad-Match and replays per variant and seed
    and prints the product table with the time-vs-random and select-share columns."""
    root = tmp_path / "target"
    argv = ["--root", str(root), "--seeds", "0", "1", "--epochs", "2", "--train-size", "300",
            "--test-size", "100", "--select-every", "1", "--tolerance", "0.6", "--max-wait", "0"]
    bench_target.main(argv)
    out = capsys.readouterr().out
    assert "| time / random |" in out and "| select % |" in out
    assert "product target (10 % subset, 2 epochs, within 60 points of full data" in out
    results = json.loads((root / "target.json").read_text())["results"]
    assert list(results) == ["f0.1-e2", "f0.3-e2"]
    for slug, fraction in (("f0.1-e2", "0.1"), ("f0.3-e2", "0.3")):
        rows = {r["method"]: r for r in results[slug]}
        assert list(rows) == ["full", "random", "randompb", "gradmatch", "gradmatchpb",
                              "cached-gradmatch", "cached-gradmatchpb"]
        assert all(r["runs"] == 2 for r in rows.values())
        assert rows["gradmatch"]["random_match"] == f"random-f{fraction}"
        assert rows["cached-gradmatch"]["random_match"] == f"random-f{fraction}"
        assert rows["gradmatchpb"]["random_match"] == f"randompb-f{fraction}"
        assert rows["full"]["random_match"] is None
        assert 0 < rows["gradmatch"]["select_share"]["mean"] < 1
        assert rows["cached-gradmatch"]["select_share"]["mean"] < 0.1  # replay: no selection
        for r in rows.values():  # A is below every accuracy: every method has its ratio
            if r["method"] != "full":
                assert r["vs_random_cell"] == ("-" if r["method"].startswith("random") else
                                               f"{r['time_vs_random']:.2f}")
            if r["time_vs_random"] is not None:
                assert r["time_vs_random"] == pytest.approx(
                    r["time_to_target"]["mean"] / r["random_time_to_target"]["mean"])
    commands = (root / "commands.txt").read_text().splitlines()
    assert len(commands) == 2 + 2 * 2 * 6  # full per seed; 6 methods per variant and seed
    bench_target.main(argv)  # finished runs are reused
    again = capsys.readouterr().out
    assert " s (select " in out and " s (select " not in again and "product target" in again
    assert json.loads((root / "target.json").read_text())["results"] == results
