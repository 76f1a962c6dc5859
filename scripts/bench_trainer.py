"""Trainer overhead: subsetsel's Trainer epoch vs a bare PyTorch loop on the same model and batches.

Both run in one process, alternating, on the same data tensors; we report the median seconds per
full-data epoch of each and their ratio (target: Trainer / bare <= 1.10).

    python scripts/bench_trainer.py [--dataset mnist1d] [--model NAME] [--repeats 5]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from subsetsel.data import load_dataset
from subsetsel.models import build_model, default_model
from subsetsel.optim import build_optimizer
from subsetsel.train import TrainConfig, Trainer, resolve_device


def bare_epoch(model, optimizer, x, y, batch_size: int, generator: torch.Generator) -> float:
    """One textbook epoch: shuffle, gather by index, forward, mean CE, backward, step."""
    device = x.device
    start = time.perf_counter()
    order = torch.randperm(y.numel(), generator=generator).to(device)
    model.train()
    for i in range(0, order.numel(), batch_size):
        idx = order[i : i + batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    device = resolve_device(args.device)
    data = load_dataset(args.dataset, seed=0, device=device)
    model_name = args.model or default_model(args.dataset)
    config = TrainConfig(
        dataset=args.dataset, model=model_name, strategy="full", fraction=1.0,
        epochs=10_000, batch_size=args.batch_size, device=str(device), schedule="constant",
    )
    trainer = Trainer(config, dataset=data)
    torch.manual_seed(0)
    model = build_model(model_name, data.input_shape, data.num_classes).to(device)
    optimizer = build_optimizer("sgd", model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)
    bare_epoch(model, optimizer, data.x_train, data.y_train, args.batch_size, generator)  # warm-up
    engine = trainer.engine

    def our_epoch(epoch: int) -> float:
        engine.period = epoch
        return engine.run_period()["train_seconds"]

    our_epoch(0)
    bare, ours = [], []
    for epoch in range(1, args.repeats + 1):
        bare.append(bare_epoch(model, optimizer, data.x_train, data.y_train, args.batch_size,
                               generator))
        ours.append(our_epoch(epoch))
    b, t = statistics.median(bare), statistics.median(ours)
    print(f"device {device}, dataset {args.dataset} (N={len(data)}), model {model_name}, "
          f"batch {args.batch_size}, {args.repeats} alternating epochs")
    print(f"bare loop  median {b:.3f} s/epoch  (all: {', '.join(f'{v:.3f}' for v in bare)})")
    print(f"Trainer    median {t:.3f} s/epoch  (all: {', '.join(f'{v:.3f}' for v in ours)})")
    print(f"ratio Trainer/bare = {t / b:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
