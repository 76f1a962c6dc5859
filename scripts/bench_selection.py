"""Cost of one Grad-Match round (gradients + OMP) relative to one full-data training epoch.

Default benchmark: MNIST-1D (20 000 train examples), its default model (cnn1d), batch size 128,
fraction 0.1. A Trainer with strategy `full` trains `--warmup` epochs (so the model is not at its
random initialisation) and its per-epoch `train_seconds` are the reference; then `gradmatch` and
`gradmatchpb` rounds are timed on that model, alternating with further full-data epochs so both
see the same machine load. Reports medians and the ratio round / epoch (target <= 0.25).

    python scripts/bench_selection.py [--repeats 5] [--threads 1] [--train-size N]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch

from subsetsel.selection.base import SelectionContext, create_strategy
from subsetsel.train import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2, help="full-data epochs trained first")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    config = TrainConfig(dataset=args.dataset, train_size=args.train_size, model=args.model,
                         strategy="full", fraction=1.0, epochs=args.warmup + args.repeats,
                         batch_size=args.batch_size, device=args.device, seed=0)
    trainer = Trainer(config)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device "
          f"{trainer.device}, dataset {args.dataset} ({len(trainer.dataset)} train), model "
          f"{config.model}, batch {args.batch_size}, fraction {args.fraction}")
    for epoch in range(args.warmup):
        trainer._run_epoch(epoch)
    strategies = {name: create_strategy(name, fraction=args.fraction, seed=0)
                  for name in ("gradmatch", "gradmatchpb")}
    strategies["gradmatch-pergrad"] = create_strategy(
        "gradmatch", fraction=args.fraction, seed=0, per_gradient=True
    )
    strategies["gradmatch-1pick"] = create_strategy(
        "gradmatch", fraction=args.fraction, seed=0, picks_per_step=1
    )
    times: dict[str, list[float]] = {"epoch": [], **{name: [] for name in strategies}}
    infos: dict[str, dict] = {}
    for rep in range(args.repeats):
        times["epoch"].append(trainer._run_epoch(args.warmup + rep)["train_seconds"])
        for name, strategy in strategies.items():
            ctx = SelectionContext(model=trainer.model, dataset=trainer.dataset,
                                   epoch=args.warmup + rep, round_index=rep + 1,
                                   batch_size=args.batch_size, seed=0, device=trainer.device)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            start = time.perf_counter()
            selection = strategy.select(ctx)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            times[name].append(time.perf_counter() - start)
            infos[name] = {**strategy.last_info, "size": len(selection)}
    epoch = statistics.median(times["epoch"])
    print(f"full-data epoch (train_seconds): median {epoch:.3f} s  "
          f"[{', '.join(f'{t:.3f}' for t in times['epoch'])}]")
    for name in strategies:
        med = statistics.median(times[name])
        info = infos[name]
        res = info["residual"]
        print(f"{name:17s} round: median {med:.3f} s = {med / epoch:.2f} epochs  "
              f"[{', '.join(f'{t:.3f}' for t in times[name])}]  (last: gradients "
              f"{info['gradient_seconds']:.3f} s, OMP {info['omp_seconds']:.3f} s in "
              f"{info['omp_steps']} steps of <= {info['picks_per_step']} picks, "
              f"{info['size']} examples, filled {info['filled']}, relative residual "
              f"{min(res):.3f}-{max(res):.3f})")


if __name__ == "__main__":
    main()
