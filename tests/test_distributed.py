"""torch.distributed on the CPU (gloo, 2 processes): distributed Grad-Match equals one process,
N ranks with batch b step like one with batch N*b, a 2-rank CLI run's files, replay and resume,
and a dead rank ending the others in bounded time."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from subsetsel.cli import main
from subsetsel.data import load_dataset
from subsetsel.data.base import Batch
from subsetsel.data.sampler import epoch_order, shard
from subsetsel.engine.precision import Precision
from subsetsel.engine.schedule import StrategySchedule
from subsetsel.models import build_model
from subsetsel.online.base import StepBatch
from subsetsel.selection.base import Selection, create_strategy
from subsetsel.store import SelectionStore
from subsetsel.train import TrainConfig, Trainer, read_log

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target: Any, world: int = 2, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
    """Run target(rank, **kwargs) in `world` spawned processes joined by gloo; return what each
    rank returned (tensors come back as tensors), by rank (None for a rank that died)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world), "SUBSETSEL_DIST_TIMEOUT": "20"}
    procs = []
    for rank in range(world):
        p = ctx.Process(target=_entry, args=(target, rank, env, queue, kwargs))
        p.start()
        procs.append(p)
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(results) < world and time.monotonic() < deadline:
        try:
            rank, value = queue.get(timeout=1.0)
            results[rank] = value
        except Exception:  # noqa: BLE001 - queue.Empty: keep waiting
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
    return [results.get(rank) for rank in range(world)]


def _entry(target: Any, rank: int, env: dict[str, str], queue: Any, kwargs: dict) -> None:
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    os.environ.setdefault("SUBSETSEL_CACHE", str(ROOT / "tests" / ".cache"))
    try:
        queue.put((rank, _portable(target(rank, **kwargs))))
    except BaseException as err:  # noqa: BLE001 - reported to the test
        queue.put((rank, ("error", type(err).__name__, str(err))))


def _portable(value: Any) -> Any:
    """Tensors as numpy arrays (a queue passes tensors by shared memory, gone with the rank)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)):
        return type(value)(_portable(v) for v in value)
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    return value


def _tensor(value: Any) -> Any:
    return None if value is None else torch.as_tensor(value)


# ---- selection ---------------------------------------------------------------------------------
def _data():
    return load_dataset("mnist1d", train_size=600, test_size=100)


def _select(name: str, dist: Any) -> Selection:
    data = _data()
    torch.manual_seed(0)
    model = build_model("cnn1d", data.input_shape, data.num_classes)
    schedule = StrategySchedule(create_strategy(name, fraction=0.2, seed=0), 1, model, data, 32,
                                0, torch.device("cpu"), Precision(), dist=dist)
    return schedule.selection_for(0)


def _select_on_ranks(rank: int) -> dict:
    from subsetsel.engine import dist

    group = dist.init(torch.device("cpu"))
    out = {}
    for name in ("gradmatch", "gradmatchpb"):
        sel = _select(name, group)
        out[name] = (sel.indices, sel.weights, sel.batch_ids)
    return out


def test_distributed_gradmatch_equals_one_process():
    ranks = run_ranks(_select_on_ranks)
    for result in ranks:
        assert isinstance(result, dict), result
    for name in ("gradmatch", "gradmatchpb"):
        alone = _select(name, None)
        for result in ranks:
            indices, weights, batch_ids = (_tensor(v) for v in result[name])
            assert torch.equal(indices, alone.indices), name
            torch.testing.assert_close(weights, alone.weights, rtol=1e-5, atol=0)
            if name == "gradmatchpb":
                assert torch.equal(batch_ids, alone.batch_ids)


# ---- the first step ----------------------------------------------------------------------------
def _config(batch_size: int) -> TrainConfig:
    return TrainConfig(dataset="mnist1d", train_size=600, test_size=100, model="mlp",
                       strategy="full", fraction=1.0, batch_size=batch_size, device="cpu",
                       optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, epochs=1)


def _first_step(trainer: Trainer, rank: int, world: int, batch_size: int) -> list[torch.Tensor]:
    data = trainer.dataset
    weights = torch.linspace(0.2, 3.0, len(data))
    order = shard(epoch_order(Selection(torch.arange(len(data)), weights), 0, 0), rank, world)
    idx, w = order.indices[:batch_size], order.weights[:batch_size]
    batch = Batch(idx, data.x_train[idx], data.y_train[idx], w)
    trainer.engine.step(StepBatch(batch))
    return [p.detach().clone() for p in trainer.model.parameters()]


def _step_on_ranks(rank: int) -> list[torch.Tensor]:
    return _first_step(Trainer(_config(16)), rank, 2, 16)


def test_two_ranks_of_batch_b_step_like_one_of_batch_2b():
    ranks = run_ranks(_step_on_ranks)
    alone = _first_step(Trainer(_config(32)), 0, 1, 32)
    for params in ranks:
        assert isinstance(params, list), params
        for a, b in zip(params, alone, strict=True):
            torch.testing.assert_close(_tensor(a), b, rtol=1e-5, atol=1e-6)


# ---- SubsetLoader and importance sampling under DDP --------------------------------------------
def _loader_epochs() -> tuple[list, list]:
    """Two epochs of a Grad-Match SubsetLoader: each epoch's selection and this rank's batches."""
    from subsetsel import SubsetLoader

    data = _data()
    torch.manual_seed(0)
    model = build_model("cnn1d", data.input_shape, data.num_classes)
    loader = SubsetLoader(data, model=model, strategy="gradmatch", fraction=0.2,
                          select_every=1, epochs=2, batch_size=16)
    selections, batches = [], []
    for _ in range(2):
        batches.append([(torch.as_tensor(y).clone(), w.clone()) for _, y, w in loader])
        sel = loader.selection
        selections.append((sel.indices, sel.weights))
    return selections, batches


def _loader_and_is_on_ranks(rank: int) -> dict:
    from subsetsel.engine import dist

    dist.init(torch.device("cpu"))
    selections, batches = _loader_epochs()
    config = _config(16)
    config.policy, config.epochs = "is", 2
    config.policy_params = {"tau_th": 1.0}
    trainer = Trainer(config)
    trainer.fit()
    return {"selections": selections, "batches": batches,
            "is": [(r["is_on_fraction"], r["is_tau"]) for r in trainer.engine.history]}


def test_subset_loader_and_importance_sampling_under_two_ranks():
    ranks = run_ranks(_loader_and_is_on_ranks)
    for result in ranks:
        assert isinstance(result, dict), result
    alone, _ = _loader_epochs()
    for result in ranks:  # every rank holds the one-process selection
        for (indices, weights), sel in zip(result["selections"], alone, strict=True):
            assert torch.equal(_tensor(indices), sel[0])
            torch.testing.assert_close(_tensor(weights), sel[1], rtol=1e-5, atol=0)
    for epoch in range(2):  # the same number of batches; together the ranks cover the subset
        counts = [len(result["batches"][epoch]) for result in ranks]
        assert counts[0] == counts[1] == -(-len(alone[epoch][0]) // 32)
        weight = sum(float(_tensor(w).sum()) for r in ranks for _, w in r["batches"][epoch])
        assert weight == pytest.approx(float(alone[epoch][1].sum()), rel=1e-5)
    # importance sampling switches on and off on every rank alike (one tau for all ranks)
    assert ranks[0]["is"] == ranks[1]["is"]
    assert any(on > 0 for on, _ in ranks[0]["is"])


# ---- a dead rank -------------------------------------------------------------------------------
def _die_on_rank_1(rank: int) -> tuple:
    def die(record: dict) -> None:
        if rank == 1 and record["epoch"] == 0:
            os._exit(3)

    config = _config(32)
    config.epochs = 5
    trainer = Trainer(config, callbacks=[die])
    start = time.monotonic()
    try:
        trainer.fit()
        return ("finished", time.monotonic() - start)
    except Exception as err:  # noqa: BLE001
        return (type(err).__name__, str(err), time.monotonic() - start)


def test_a_dead_rank_ends_the_other_with_one_line_in_bounded_time():
    survivor, _ = run_ranks(_die_on_rank_1, timeout=90)
    assert survivor is not None and survivor[0] == "DistributedError", survivor
    message, seconds = survivor[1], survivor[2]
    assert "\n" not in message and "--resume" in message
    assert seconds < 60  # the collective timeout is 20 s


# ---- the CLI -----------------------------------------------------------------------------------
CLI = [sys.executable, "-m", "subsetsel", "train", "--nproc", "2", "--train-size", "600",
       "--test-size", "100", "--model", "mlp", "--epochs", "4", "--select-every", "1",
       "--batch-size", "32", "--quiet"]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_rank_train_writes_one_set_of_files_that_replay_alone(in_tmp):
    result = _cli([*CLI, "--out", "ddp", "--save-selections", "ddp"], in_tmp)
    assert result.returncode == 0, result.stderr
    log = read_log(in_tmp / "ddp")
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    assert all(r["backpropagated"] == 60 for r in log)  # both ranks' examples counted
    summary = json.loads((in_tmp / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert sorted(p.name for p in (in_tmp / "selections").iterdir()) == ["ddp.h5"]
    store = SelectionStore.open(in_tmp / "selections" / "ddp.h5")
    assert store.complete and [r.epoch for r in store.rounds] == [0, 1, 2, 3]
    replay = CliRunner().invoke(main, ["train", "--train-size", "600", "--test-size", "100",
                                       "--replay", "ddp", "--quiet", "--out", "alone"])
    assert replay.exit_code == 0, replay.output
    assert [r["subset_size"] for r in read_log(in_tmp / "alone")] == [60] * 4


def test_a_killed_two_rank_run_resumes_to_the_uninterrupted_result(in_tmp):
    straight = _cli([*CLI, "--out", "a", "--save-selections", "a"], in_tmp)
    assert straight.returncode == 0, straight.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    slow = [*CLI, "--out", "b", "--save-selections", "b", "--slow-input", "0.05"]
    proc = subprocess.Popen(slow, cwd=in_tmp, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = in_tmp / "b" / "log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks at once
    proc.wait()
    done = len(read_log(in_tmp / "b"))
    assert 1 <= done < 4
    resumed = _cli([sys.executable, "-m", "subsetsel", "train", "--nproc", "2", "--resume", "b",
                    "--quiet"], in_tmp)
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_log(in_tmp / "a"), read_log(in_tmp / "b")
    assert [r["test_acc"] for r in a] == [r["test_acc"] for r in b]
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b])
    sa, sb = (SelectionStore.open(in_tmp / "selections" / f"{n}.h5") for n in "ab")
    assert sb.complete
    assert [r.indices.tolist() for r in sa.rounds] == [r.indices.tolist() for r in sb.rounds]
