"""A bounded replay buffer for one-pass training: FIFO or reservoir insertion, uniform or
error-prioritised sampling with importance weights.

Memory is preallocated once: `capacity` rows of inputs plus, per row, the label, the source index
and the last observed loss. Nothing grows after construction (`nbytes` is constant). Inputs are
tensors of `input_shape`, or (input_shape None) decoded items of a DataLoader source kept as
Python objects in `capacity` slots (then `nbytes` counts only the tensors).

Priorities (One Pass ImageNet's error-based priority): P_i = 1 - alpha * exp(-loss_i), floored at
`min_priority` so that no stored example becomes unreachable when alpha = 1. The buffer stores
losses, not priorities, so that a changing alpha (a decay schedule) applies to every row at once.

Sampling draws `b` rows independently with replacement from q_i = P_i / sum_j P_j (alpha = 0:
uniform). Importance weights w_i = 1 / (M * q_i), M = rows held, make mean(w * l) an unbiased
estimate of the buffer's mean loss: E_q[w * l] = sum_i q_i * l_i / (M * q_i) = (1/M) sum_i l_i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

INSERTIONS = ("fifo", "reservoir")
MIN_PRIORITY = 1e-3


def priority_from_loss(
    loss: torch.Tensor, alpha: float, min_priority: float = MIN_PRIORITY
) -> torch.Tensor:
    """P = max(1 - alpha * exp(-loss), min_priority), elementwise; loss >= 0 (cross-entropy).

    For cross-entropy exp(-loss) is the probability given to the true class, so P = 1 - alpha * p_y:
    P lies in [1 - alpha, 1] and well-learned examples get the lowest priority.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return (1.0 - alpha * torch.exp(-loss)).clamp_min(min_priority)


def importance_weights(probs: torch.Tensor, size: int) -> torch.Tensor:
    """w = 1 / (size * q) for rows drawn with probabilities q (B,) from `size` rows.

    With q uniform (1/size) every weight is exactly 1.
    """
    return 1.0 / (size * probs)


@dataclass
class ReplaySample:
    """Rows drawn from the buffer: slots int64 (b,) into the buffer's tensors, probs float32 (b,)
    the probability q of drawing each slot, weights float32 (b,) = 1 / (M * q)."""

    slots: torch.Tensor
    probs: torch.Tensor
    weights: torch.Tensor


class ReplayBuffer:
    """At most `capacity` examples (inputs, labels, source indices, last losses) on `device`.

    insertion: "fifo" keeps the most recent `capacity` examples offered; "reservoir" keeps a
    uniform random sample of all examples offered so far (Vitter's algorithm R, example by
    example, so a batch gives the same result as offering its rows one at a time).
    seed: fixes the reservoir's choices and the sampling (each has its own generator).
    """

    def __init__(
        self,
        capacity: int,
        input_shape: tuple[int, ...] | None,
        *,
        insertion: str = "fifo",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
        min_priority: float = MIN_PRIORITY,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        if insertion not in INSERTIONS:
            raise ValueError(f"insertion must be one of {', '.join(INSERTIONS)}, got {insertion!r}")
        self.capacity = int(capacity)
        self.insertion = insertion
        self.device = torch.device(device)
        self.min_priority = min_priority
        self.x: torch.Tensor | list[Any] = (
            [None] * self.capacity if input_shape is None
            else torch.zeros((self.capacity, *input_shape), dtype=dtype, device=self.device)
        )
        self.y = torch.zeros(self.capacity, dtype=torch.int64, device=self.device)
        self.index = torch.full((self.capacity,), -1, dtype=torch.int64, device=self.device)
        self.loss = torch.zeros(self.capacity, dtype=torch.float32, device=self.device)
        self.size = 0  # rows held
        self.seen = 0  # examples offered so far
        self._insert_gen = torch.Generator().manual_seed(seed * 1_000_003 + 11)
        self._sample_gen = torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + 13)

    def __len__(self) -> int:
        return self.size

    def _tensors(self) -> list[torch.Tensor]:
        rows = [self.y, self.index, self.loss]
        return rows if isinstance(self.x, list) else [self.x, *rows]

    @property
    def row_bytes(self) -> int:
        """Bytes per row: input (tensor inputs only), label, source index and loss."""
        return sum(t[0].nbytes for t in self._tensors())

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffer's tensors: capacity * row_bytes, fixed at construction."""
        return sum(t.nbytes for t in self._tensors())

    def inputs(self, slots: torch.Tensor) -> torch.Tensor | list[Any]:
        """The stored inputs of `slots` (a tensor, or a list of decoded items)."""
        if isinstance(self.x, list):
            return [self.x[s] for s in slots.tolist()]
        return self.x[slots]

    # ---- insertion ---------------------------------------------------------------------------
    def add(
        self, indices: torch.Tensor, x: torch.Tensor | list[Any], y: torch.Tensor,
        loss: torch.Tensor,
    ) -> torch.Tensor:
        """Offer a batch: source indices (B,), inputs (B, *input_shape) (or a list of B items),
        labels (B,), losses (B,).

        Returns the batch positions that were stored (int64, on the buffer's device).
        """
        b = int(indices.shape[0])
        if b == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.device)
        if self.insertion == "fifo":
            pos, slots = self._fifo_slots(b)
        else:
            pos, slots = self._reservoir_slots(b)
        self.seen += b
        self.size = min(self.capacity, self.size + b)
        if pos.numel():
            pos_d = pos.to(self.device)
            slots_d = slots.to(self.device)
            if isinstance(self.x, list):
                for p, s in zip(pos.tolist(), slots.tolist(), strict=True):
                    self.x[s] = x[p]
            else:
                self.x[slots_d] = x.to(self.device)[pos_d].to(self.x.dtype)
            self.y[slots_d] = y.to(self.device)[pos_d]
            self.index[slots_d] = indices.to(self.device)[pos_d]
            self.loss[slots_d] = loss.detach().to(self.device)[pos_d].float()
        return pos.to(self.device)

    def _fifo_slots(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the batch's last `capacity` rows survive; row t of the stream goes to t % cap."""
        keep = min(b, self.capacity)
        pos = torch.arange(b - keep, b)
        return pos, (self.seen + pos) % self.capacity

    def _reservoir_slots(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm R: the t-th example (0-based) fills slot t while t < capacity, then replaces
        slot j ~ U{0..t} when j < capacity. Of two rows of one batch that pick the same slot, the
        later one wins, exactly as if they were offered one at a time."""
        t = torch.arange(self.seen, self.seen + b, dtype=torch.float64)
        j = torch.floor(torch.rand(b, generator=self._insert_gen, dtype=torch.float64) * (t + 1))
        slots = torch.where(t < self.capacity, t, j).long()
        accepted = torch.nonzero(slots < self.capacity).squeeze(1)
        last: dict[int, int] = {}
        for p, s in zip(accepted.tolist(), slots[accepted].tolist(), strict=True):
            last[s] = p
        pos = torch.tensor(sorted(last.values()), dtype=torch.int64)
        return pos, slots[pos]

    # ---- sampling ----------------------------------------------------------------------------
    def priorities(self, alpha: float) -> torch.Tensor:
        """P = max(1 - alpha * exp(-loss), min_priority) for the rows held, float32 (M,)."""
        return priority_from_loss(self.loss[: self.size], alpha, self.min_priority)

    def sample(self, batch_size: int, alpha: float = 0.0) -> ReplaySample:
        """Draw `batch_size` slots independently with replacement, with probability q = P / sum P
        (alpha = 0: uniform, weights all 1)."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        m = self.size
        if alpha == 0.0:
            slots = torch.randint(
                m, (batch_size,), generator=self._sample_gen, device=self.device
            )
            probs = torch.full((batch_size,), 1.0 / m, device=self.device)
            return ReplaySample(slots, probs, torch.ones(batch_size, device=self.device))
        p = self.priorities(alpha)
        q = p / p.sum()
        slots = torch.multinomial(q, batch_size, replacement=True, generator=self._sample_gen)
        probs = q[slots]
        return ReplaySample(slots, probs, importance_weights(probs, m))

    def update_loss(self, slots: torch.Tensor, loss: torch.Tensor) -> None:
        """Refresh the stored losses of replayed slots (B,) with losses (B,). A slot drawn twice
        in one batch keeps the larger of its losses (deterministic on every device)."""
        self.loss.scatter_reduce_(
            0, slots.to(self.device), loss.detach().to(self.device).float(), reduce="amax",
            include_self=False,
        )

    def stats(self) -> dict[str, float | None]:
        """Summary numbers for logs: rows held, mean stored loss (None while empty)."""
        mean = float(self.loss[: self.size].mean()) if self.size else None
        return {"buffer_size": self.size, "buffer_mean_loss": mean}
