"""The engine's data paths against plain PyTorch and against the code before the DataLoader change.

1. DataLoader path: CIFAR-shaped data (10 000 random uint8 32x32x3 images in a map-style Dataset
   that returns PIL images, torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip +
   ToTensor + Normalize, `--workers` worker processes, batch 128, smallcnn). Full-data epochs of
   the engine (`TorchData` + `Trainer`) alternate with epochs of a bare
   `for x, y in DataLoader(dataset, shuffle=True, ...)` loop with the same model, transforms and
   batches (mean cross-entropy, SGD). Target: engine / bare <= 1.10.
2. Tensor fast path: full-data epochs of `subsetsel train`'s Trainer on MNIST-1D (20 000, cnn1d)
   in this tree and in the tree of `--before` (a git revision, extracted with `git archive`),
   alternating in two worker processes. Target: within 5 %.

    python scripts/bench_loader.py [--workers 2] [--repeats 5] [--before 9764ca9] [--skip-before]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parent.parent


class FakeCifar(Dataset):
    """10 000 random 32x32x3 images as PIL, labels in `targets` (like torchvision's CIFAR10)."""

    def __init__(self, n: int = 10_000, transform: T.Compose | None = None) -> None:
        rng = np.random.default_rng(0)
        self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        self.targets = rng.integers(0, 10, size=n).tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        image = Image.fromarray(self.data[i])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[i]


def transforms() -> tuple[T.Compose, T.Compose]:
    norm = [T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))]
    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *norm]), \
        T.Compose(norm)


def dataloader_path(args: argparse.Namespace) -> None:
    from subsetsel.data import TorchData
    from subsetsel.models import build_model
    from subsetsel.train import TrainConfig, Trainer

    train_tf, eval_tf = transforms()
    data = TorchData(FakeCifar(), train_transform=train_tf, eval_transform=eval_tf,
                     num_classes=10, name="fakecifar", num_workers=args.workers)
    config = TrainConfig(dataset="fakecifar", model="smallcnn", strategy="full", fraction=1.0,
                         epochs=10_000, batch_size=128, device="cpu", eval_every=0,
                         schedule="constant")
    engine = Trainer(config, dataset=data).engine
    torch.manual_seed(0)
    model = build_model("smallcnn", (3, 32, 32), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    bare_loader = DataLoader(FakeCifar(transform=train_tf), batch_size=128, shuffle=True,
                             num_workers=args.workers, persistent_workers=args.workers > 0)

    def bare_epoch() -> float:
        start = time.perf_counter()
        model.train()
        for x, y in bare_loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start

    bare_epoch()
    engine.run_period()  # warm-up: workers start, caches fill
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bare_epoch())
        ours.append(engine.run_period()["train_seconds"])
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"DataLoader path, {args.workers} workers, 10 000 CIFAR-shaped images, smallcnn, "
          f"batch 128, {args.repeats} alternating epochs")
    print(f"  bare loop  median {b:.3f} s/epoch  ({', '.join(f'{v:.3f}' for v in bare)})")
    print(f"  engine     median {o:.3f} s/epoch  ({', '.join(f'{v:.3f}' for v in ours)})")
    print(f"  ratio engine / bare = {o / b:.3f}  (target <= 1.10)", flush=True)
    data.close()


WORKER = """
import sys, time, torch
torch.set_num_threads(1)
from subsetsel.train import TrainConfig, Trainer
config = TrainConfig(strategy="full", fraction=1.0, epochs=10_000, device="cpu", eval_every=0,
                     schedule="constant")
trainer = Trainer(config)
step = getattr(trainer, "engine", None)
def epoch(e):
    if step is not None:
        step.period = e
        return step.run_period()["train_seconds"]
    return trainer._run_epoch(e)["train_seconds"]
epoch(0)
for line in sys.stdin:
    e = int(line)
    print(epoch(e), flush=True)
"""


def tensor_path(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        before.mkdir()
        archive = subprocess.run(["git", "archive", args.before], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        procs = {}
        for label, tree in (("now", ROOT), ("before", before)):
            env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
            procs[label] = subprocess.Popen([sys.executable, "-c", WORKER], cwd=tmp, env=env,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            text=True)
        spent: dict[str, list[float]] = {label: [] for label in procs}
        for e in range(1, args.repeats + 1):
            for label, proc in procs.items():  # one at a time: they never share the CPU
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(f"{e}\n")
                proc.stdin.flush()
                spent[label].append(float(proc.stdout.readline()))
        for proc in procs.values():
            proc.kill()
    now, old = statistics.median(spent["now"]), statistics.median(spent["before"])
    print(f"tensor path, MNIST-1D 20 000, cnn1d, one thread, {args.repeats} alternating epochs")
    print(f"  before ({args.before})  median {old:.3f} s/epoch  "
          f"({', '.join(f'{v:.3f}' for v in spent['before'])})")
    print(f"  now               median {now:.3f} s/epoch  "
          f"({', '.join(f'{v:.3f}' for v in spent['now'])})")
    print(f"  ratio now / before = {now / old:.3f}  (target within 5 %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before", default="9764ca9", help="git revision of the old code")
    parser.add_argument("--skip-before", action="store_true")
    parser.add_argument("--skip-dataloader", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"torch {torch.__version__}, threads {args.threads}, load average "
          f"{os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
          flush=True)
    if not args.skip_dataloader:
        dataloader_path(args)
    if not args.skip_before:
        tensor_path(args)


if __name__ == "__main__":
    main()
