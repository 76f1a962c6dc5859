"""Cost of one Grad-Match round (gradient forward + OMP) relative to one full-data training epoch,
for three model/data setups, on both data paths, with and without channels_last / bf16 autocast.

Setups:
  mnist1d  MNIST-1D, 20 000 train examples, cnn1d (the default benchmark)
  img28    4 000 random 28x28x1 uint8 images ("crop" augmentation), smallcnn
  img32    2 000 random 32x32x3 uint8 images ("crop-flip"), resnet18 (CIFAR stem)
(the images are random: this measures time, not accuracy). Each setup trains `--warmup`
full-data epochs, then alternates full-data epochs (the reference, `train_seconds`) with
`gradmatch` and `gradmatchpb` rounds (`--fraction`, default 0.1; the OMP work grows with the
budget) on the same model, and prints medians, the ratio round / epoch (the target of the next
issue is <= 0.25) and where the round's time goes (gradient forward vs OMP). `--chunks` also
times the selection forward alone per chunk size.

    python scripts/bench_selection.py [--setups mnist1d,img28,img32] [--loaders tensor,dataloader]
        [--precisions fp32,cl,amp,cl+amp] [--repeats 3] [--threads 1] [--workers 1]
        [--fraction 0.1] [--chunks 128,256,512,1024]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

import numpy as np
import torch

from subsetsel.data import load_dataset
from subsetsel.data.arrays import Arrays
from subsetsel.data.base import TrainData
from subsetsel.engine.precision import Precision
from subsetsel.selection.base import SelectionContext, create_strategy
from subsetsel.selection.gradients import collect_factors
from subsetsel.train import TrainConfig, Trainer

SETUPS = {"mnist1d": "cnn1d", "img28": "smallcnn", "img32": "resnet18"}
PRECISIONS = {"fp32": (False, False), "cl": (True, False), "amp": (False, True),
              "cl+amp": (True, True)}


def random_images(name: str, n: int, shape: tuple[int, ...], augmentation: str) -> Arrays:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, size=n)
    return Arrays(name, x, y, x[:500], y[:500], 10, augmentation)


def setup_data(setup: str, loader: str, workers: int) -> TrainData:
    if setup == "mnist1d":
        return load_dataset("mnist1d", loader=loader, workers=workers)
    arrays = (random_images("img28", 4000, (1, 28, 28), "crop") if setup == "img28"
              else random_images("img32", 2000, (3, 32, 32), "crop-flip"))
    return arrays.tensors() if loader == "tensor" else arrays.torch_data(workers)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(setup: str, loader: str, precision: str, args: argparse.Namespace) -> None:
    channels_last, amp = PRECISIONS[precision]
    data = setup_data(setup, loader, args.workers)
    config = TrainConfig(dataset=setup, model=SETUPS[setup], strategy="full", fraction=1.0,
                         epochs=10_000, batch_size=128, device=args.device, seed=0,
                         channels_last=channels_last, amp=amp, eval_every=0)
    trainer = Trainer(config, dataset=data)
    engine, device = trainer.engine, trainer.device

    def epoch() -> float:
        return engine.run_period()["train_seconds"]

    for _ in range(args.warmup):
        epoch()
    strategies = {name: create_strategy(name, fraction=args.fraction, seed=0)
                  for name in ("gradmatch", "gradmatchpb")}
    times: dict[str, list[float]] = {"epoch": [], **{name: [] for name in strategies}}
    infos: dict[str, dict] = {}
    for rep in range(args.repeats):
        times["epoch"].append(epoch())
        for name, strategy in strategies.items():
            ctx = SelectionContext(model=trainer.model, dataset=trainer.dataset, epoch=1,
                                   round_index=rep + 1, batch_size=128, seed=0, device=device,
                                   precision=trainer.precision)
            sync(device)
            start = time.perf_counter()
            strategy.select(ctx)
            sync(device)
            times[name].append(time.perf_counter() - start)
            infos[name] = dict(strategy.last_info)
    e = statistics.median(times["epoch"])
    cells = [f"{setup:7s} {loader:10s} {precision:6s} epoch {e:6.3f} s"]
    for name in strategies:
        r = statistics.median(times[name])
        info = infos[name]
        cells.append(f"{name} {r:6.3f} s = {r / e:4.2f} ep (grad {info['gradient_seconds']:.3f}"
                     f" + omp {info['omp_seconds']:.3f})")
    print(" | ".join(cells), flush=True)
    if args.chunks:
        model = trainer.model
        for chunk in args.chunks:
            spent = []
            for _ in range(args.repeats):
                sync(device)
                start = time.perf_counter()
                collect_factors(model, trainer.dataset.eval_batches(chunk=chunk), len(data),
                                precision=Precision(device, amp, channels_last))
                sync(device)
                spent.append(time.perf_counter() - start)
            print(f"    selection forward, chunk {chunk:5d}: {statistics.median(spent):.3f} s",
                  flush=True)
    data.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default="mnist1d,img28,img32")
    parser.add_argument("--loaders", default="tensor,dataloader")
    parser.add_argument("--precisions", default="fp32,cl,amp,cl+amp")
    parser.add_argument("--warmup", type=int, default=2, help="full-data epochs trained first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--fraction", type=float, default=0.1, help="subset size of the rounds")
    parser.add_argument("--chunks", default="", help="e.g. 128,256,512,1024")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    args.chunks = [int(c) for c in args.chunks.split(",") if c]
    if args.threads:
        torch.set_num_threads(args.threads)
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for setup in args.setups.split(","):
        for loader in args.loaders.split(","):
            for precision in args.precisions.split(","):
                if precision in ("cl", "cl+amp") and setup == "mnist1d":
                    continue  # channels_last applies to 2-D convolutions only
                bench(setup, loader, precision, args)


if __name__ == "__main__":
    main()
