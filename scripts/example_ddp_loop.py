"""Your own DistributedDataParallel training loop on subsetsel's weighted subsets (SubsetLoader).

    torchrun --nproc-per-node 2 scripts/example_ddp_loop.py          # 2 ranks (gloo on CPUs)
    torchrun --nproc-per-node 8 scripts/example_ddp_loop.py          # 8 GPUs (NCCL)
    python scripts/example_ddp_loop.py                               # the same loop, 1 process

Each rank: builds the same model (same seed), wraps it in DDP, and iterates its shard of the
current weighted subset; per-class Grad-Match runs on all ranks together every `--select-every`
epochs; rank 0 alone writes the selection file and prints. The data is a small synthetic
10-class problem (a map-style torch Dataset of (input, label) pairs, like yours).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from subsetsel import SubsetLoader


class Blobs(torch.utils.data.Dataset):
    """(input, label) pairs: 10 Gaussian clusters in 32 dimensions (the same on every rank)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(1234)  # the class centres: shared by train and test
        centres = torch.randn(10, 32, generator=g) * 0.4
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, 10, (n,), generator=g)
        self.x = centres[self.targets] + torch.randn(n, 32, generator=g)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.targets[i])


@torch.no_grad()
def evaluate(net: nn.Module, data: Blobs, rank: int, world: int, device: torch.device) -> float:
    """Test accuracy over all ranks: rank r scores examples r, r + world, ..."""
    net.eval()
    x, y = data.x[rank::world].to(device), data.targets[rank::world].to(device)
    counts = torch.tensor([(net(x).argmax(1) == y).sum().item(), len(y)], device=device,
                          dtype=torch.float64)
    net.train()
    if world > 1:
        dist.all_reduce(counts)
    return float(counts[0] / counts[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--select-every", type=int, default=2)
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--save-selections", default=None, help="e.g. runs/ddp_example.h5")
    args = p.parse_args()

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1:  # started by torchrun: NCCL on GPUs, gloo on CPUs
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else (
        torch.device("cpu"))
    if cuda:
        torch.cuda.set_device(device)

    train_set, test_set = Blobs(args.train_size, seed=1), Blobs(1000, seed=2)
    torch.manual_seed(0)  # the same initial model on every rank
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    model = DistributedDataParallel(net, device_ids=[device.index] if cuda else None) if (
        world > 1) else net
    # model=net: Grad-Match reads the network itself (its last nn.Linear), not the DDP wrapper
    loader = SubsetLoader(
        train_set, model=net, strategy="gradmatch", fraction=args.fraction,
        select_every=args.select_every, epochs=args.epochs, batch_size=args.batch_size,
        num_workers=0, num_classes=10, name="blobs", device=device,
        save_selections=args.save_selections,  # rank 0 alone writes it
    )  # distributed=None: follows the process group initialised above
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        steps = 0
        for inputs, targets, weights in loader:  # this rank's shard of the weighted subset
            losses = F.cross_entropy(model(inputs), targets, reduction="none")
            loss = loader.global_loss(losses, weights)  # sum(w*l)/sum(w) over all ranks
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients
            optimizer.step()
            steps += 1
        acc = evaluate(net, test_set, rank, world, device)
        if rank == 0:
            print(f"epoch {epoch}: subset {len(loader.selection)} examples, {steps} steps of "
                  f"{args.batch_size} x {world} ranks, selection {loader.last_select_seconds:.3f}"
                  f" s, test accuracy {acc:.4f}", flush=True)
    if rank == 0:
        print(f"{world} rank(s), {time.perf_counter() - start:.1f} s, selection seconds "
              f"{loader.select_seconds:.2f}" + (f", selections in {loader.store.path}"
                                                if loader.store is not None else ""))
    loader.close()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
