"""Each training example's most recent training loss, recorded from the training forward.

A strategy that wants losses (`Strategy.wants_losses`) gets a `LossRecord`; the engine (or
`SubsetLoader.record`) scatters every step's per-example losses into it by dataset index, and
calls `flush` at the end of the epoch. Recording is a device-side `index_put_` (no host sync);
it happens only in the epochs the strategy asks for.

Under torch.distributed every rank records the examples of its own shard. `flush` combines the
ranks with one all-reduce of a (2, N) float32 tensor (sum of the losses recorded this epoch, and
how many ranks recorded each example): an example recorded on any rank gets the mean of its
recorded losses, the others keep their previous value. Afterwards every rank holds the same
vector, so a draw seeded alike (`round_generator`) gives the same Selection everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from subsetsel.engine.dist import Dist


class LossRecord:
    """values: float32 (N,) on `device`, the latest recorded loss of each example; NaN for an
    example never recorded."""

    def __init__(self, n: int, device: torch.device | str, dist: Dist | None = None) -> None:
        self.values = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
        self.dist = dist or Dist.local()
        # under torch.distributed: which examples this rank recorded since the last flush
        self._mine: torch.Tensor | None = (
            torch.zeros(n, dtype=torch.bool, device=device) if self.dist.active else None)
        self.recorded = 0  # examples recorded since the last flush (this rank), host count

    def __len__(self) -> int:
        return int(self.values.numel())

    def record(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Store `losses` (B,) as the latest losses of examples `indices` (B,) (int64 dataset
        positions). Detached and cast to float32; a device-side scatter."""
        idx = indices.reshape(-1).to(self.values.device, non_blocking=True)
        val = losses.detach().reshape(-1).to(self.values.device, torch.float32)
        if idx.numel() != val.numel():
            raise ValueError(f"{val.numel()} losses for {idx.numel()} indices: record() takes "
                             "one loss per example (reduction='none')")
        self.values.index_put_((idx,), val)
        if self._mine is not None:
            self._mine.index_fill_(0, idx, True)
        self.recorded += int(idx.numel())

    def flush(self) -> None:
        """End of an epoch's recording: under torch.distributed, combine the ranks (see the
        module docstring; every rank must call it). In one process nothing happens."""
        self.recorded = 0
        if self._mine is None:
            return
        mine = self._mine
        both = torch.stack([torch.where(mine, self.values, torch.zeros_like(self.values)),
                            mine.float()])
        self.dist.all_reduce(both)
        got = both[1] > 0
        self.values = torch.where(got, both[0] / both[1].clamp_min(1.0), self.values)
        mine.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = torch.as_tensor(state["values"], dtype=torch.float32)
        if values.numel() != self.values.numel():
            raise ValueError(f"the saved loss record holds {values.numel()} examples, the data "
                             f"{self.values.numel()}")
        self.values = values.to(self.values.device)


__all__ = ["LossRecord"]
