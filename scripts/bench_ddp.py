"""1 vs N ranks under torch.distributed: epoch time, selection time and the bytes a selection
round sends, on whatever this machine has (gloo on CPUs, NCCL on GPUs: it runs unchanged).

For each world size W in `--worlds` the script starts W processes with torchrun's launcher
(`torch.distributed.launcher`), each training MNIST-1D (`--train-size`, cnn1d or `--model`) on
full data with per-rank batch 128 / W (so the global batch is the same), then timing per-class
`gradmatch` and `gradmatchpb` rounds (fraction 0.1) on the trained model. Rank 0 reports medians:
epoch train seconds, round seconds, and bytes sent per rank by the round's collectives (the
class-sharded exchange of gradient factors, the all-gather of picks; PB: the all-reduce of
batch sums and the broadcast).

    python scripts/bench_ddp.py [--worlds 1,2] [--train-size 20000] [--repeats 3] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import torch

    from subsetsel.selection.base import SelectionContext, create_strategy
    from subsetsel.train import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = TrainConfig(train_size=args.train_size, model=args.model, strategy="full",
                         fraction=1.0, epochs=10_000, batch_size=max(1, 128 // world),
                         device=args.device, eval_every=0, schedule="constant")
    trainer = Trainer(config)
    engine, group = trainer.engine, trainer.dist

    def sync() -> None:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        group.barrier()

    engine.run_period()  # warm-up
    epochs = [engine.run_period()["train_seconds"] for _ in range(args.repeats)]
    rounds: dict[str, list[float]] = {}
    sent: dict[str, int] = {}
    for name in ("gradmatch", "gradmatchpb"):
        strategy = create_strategy(name, fraction=0.1, seed=0)
        rounds[name] = []
        for rep in range(args.repeats):
            ctx = SelectionContext(model=trainer.model, dataset=trainer.dataset, epoch=1,
                                   round_index=rep + 1, batch_size=128, seed=0,
                                   device=trainer.device, precision=trainer.precision,
                                   dist=group)
            sync()
            start = time.perf_counter()
            strategy.select(ctx)
            sync()
            rounds[name].append(time.perf_counter() - start)
            sent[name] = int(strategy.last_info.get("sent_bytes", 0))
    if group.main:
        Path(args.out).write_text(json.dumps({
            "world": world, "device": str(trainer.device), "epoch": epochs, "rounds": rounds,
            "sent_bytes": sent,
        }))


def launch(world: int, args: argparse.Namespace, out: str) -> dict:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    argv = [str(Path(__file__).resolve()), "--worker", "--out", out,
            "--train-size", str(args.train_size), "--repeats", str(args.repeats),
            "--threads", str(args.threads), "--device", args.device, "--model", args.model]
    if world == 1:
        os.environ.pop("WORLD_SIZE", None)
        import subprocess

        subprocess.run([sys.executable, *argv], check=True)
    else:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world,
                              run_id=uuid.uuid4().hex, rdzv_backend="c10d",
                              rdzv_endpoint="127.0.0.1:0", max_restarts=0)
        elastic_launch(config, sys.executable)(*argv)
    return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--model", default="cnn1d")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"load average {os.getloadavg()[0]:.2f}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = [launch(int(w), args, f"{tmp}/w{w}.json") for w in args.worlds.split(",")]
    print(f"MNIST-1D {args.train_size} train, {args.model}, global batch 128, fraction 0.1, "
          f"medians of {args.repeats}")
    print("| ranks | device | epoch s | gradmatch round s | gradmatchpb round s | "
          "bytes sent per rank (gradmatch / pb) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        e = statistics.median(r["epoch"])
        gm, pb = (statistics.median(r["rounds"][n]) for n in ("gradmatch", "gradmatchpb"))
        print(f"| {r['world']} | {r['device']} | {e:.3f} | {gm:.3f} ({gm / e:.2f} ep) | "
              f"{pb:.3f} ({pb / e:.2f} ep) | {r['sent_bytes']['gradmatch']:,} / "
              f"{r['sent_bytes']['gradmatchpb']:,} |")


if __name__ == "__main__":
    main()
