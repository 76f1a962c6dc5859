"""torch.distributed for subsetsel: process-group start-up from torchrun's environment, the few
collectives the engine and the strategies use, and rank-0-only file writing.

Launch with torchrun (`torchrun --nproc-per-node N -m subsetsel train ...`, or
`subsetsel train --nproc N` on one machine, which starts torchrun's own launcher). The backend is
NCCL on CUDA and gloo on the CPU. Every collective has the group's timeout
(`SUBSETSEL_DIST_TIMEOUT` seconds, default 120): a rank that dies makes the others fail with a
one-line `DistributedError` within that time instead of hanging. `Dist.local()` (one process)
makes every operation a no-op, so the same code runs in both settings.
"""

from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist

DEFAULT_TIMEOUT = 120.0  # seconds


class DistributedError(RuntimeError):
    """A collective failed: another rank died, timed out or lost contact (one line)."""


@dataclass
class Dist:
    """This process's place in the group: rank, world size, its device.

    `sent_bytes` counts the payload this rank handed to the collectives below (a measure of the
    communication of a selection round)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sent_bytes: int = 0

    @classmethod
    def local(cls, device: torch.device | None = None) -> Dist:
        return cls(0, 1, device or torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this rank writes files (rank 0)."""
        return self.rank == 0

    # ---- collectives (no-ops in one process) -------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns the tensor."""
        if self.active:
            self.sent_bytes += tensor.numel() * tensor.element_size()
            _guard(torch_dist.all_reduce, tensor)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        if not self.active:
            return [obj]
        self.sent_bytes += len(pickle.dumps(obj))
        out: list[Any] = [None] * self.world
        _guard(torch_dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` of rank `src` on every rank."""
        if not self.active:
            return obj
        if self.rank == src:
            self.sent_bytes += len(pickle.dumps(obj))
        box = [obj]
        _guard(torch_dist.broadcast_object_list, box, src=src)
        return box[0]

    def gather_rows(self, rows: list[torch.Tensor], dim: int) -> torch.Tensor:
        """Rank r sends rows[o] (m_o x dim float32) to rank o, for every o; returns on every rank
        the rows sent to it by all ranks, concatenated in rank order (a personalised exchange:
        an `all_gather` of the row counts, then one `all_to_all_single` with uneven splits, which
        gloo and NCCL both support; every link carries its share at once, nothing is padded)."""
        sends = [r.to(self.device, torch.float32).reshape(-1, dim) for r in rows]
        counts = torch.tensor([s.shape[0] for s in sends], device=self.device)
        table = [torch.zeros_like(counts) for _ in range(self.world)]
        _guard(torch_dist.all_gather, table, counts)  # table[r][o]: rows rank r sends to o
        into = [int(t[self.rank]) for t in table]
        received = torch.empty(sum(into), dim, device=self.device)
        payload = torch.cat(sends)
        self.sent_bytes += payload.numel() * 4
        _guard(torch_dist.all_to_all_single, received, payload, into,
               [int(c) for c in counts])
        return received

    def barrier(self) -> None:
        if self.active:
            _guard(torch_dist.barrier)


def _guard(op: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a collective; a failure (a peer died, a timeout) becomes one DistributedError line."""
    try:
        return op(*args, **kwargs)
    except (RuntimeError, ValueError) as err:  # DistBackendError is a RuntimeError
        text = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise DistributedError(
            f"rank {torch_dist.get_rank()} of {torch_dist.get_world_size()}: a collective "
            f"failed ({text[:200]}); another rank has probably stopped. The checkpoint of the "
            "last finished epoch is valid: --resume continues from it"
        ) from None


def launched() -> bool:
    """Whether this process was started by torchrun (or any launcher setting its variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> Dist:
    """Join the group torchrun described in the environment (once), or stay local.

    The device becomes cuda:LOCAL_RANK when `device` is CUDA (one GPU per process)."""
    if not launched():
        return Dist.local(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        timeout = float(os.environ.get("SUBSETSEL_DIST_TIMEOUT", DEFAULT_TIMEOUT))
        torch_dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout),
        )
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), device)


def current(device: torch.device | None = None) -> Dist:
    """The group this process already belongs to (a user's own DDP script), else local."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        device = device or torch.device("cpu")
        return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), device)
    return Dist.local(device)


def shutdown() -> None:
    """Leave the group after a run that finished normally."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
