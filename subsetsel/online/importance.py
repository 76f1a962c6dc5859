"""Importance sampling of mini-batches (Katharopoulos & Fleuret, ICML 2018).

Pure cores (usable from any training loop):
  `importance_scores(logits, y, kind, embeddings)`  per-example scores (B,): "gnorm" =
      ||softmax(z) - onehot(y)||_2 (default), "loss", or "gradnorm" = the exact norm of the
      per-example gradient of the last linear layer (weight and bias)
  `sampling_probabilities(scores, weights)`  p ∝ weight * score (uniform if all scores are 0)
  `resample(p, b, generator)`               b rows drawn with replacement from p
  `is_weights(p)`                           1 / (B * p), so mean(w * l) estimates mean(l) unbiasedly
  `tau_estimate(scores)`                    τ = 1 / sqrt(1 - ||p - u||² / ||p||²) = sqrt(B * Σ p²)
  `tau_threshold(B, b, backward_cost)`      (B + (1 + c) b) / ((1 + c) b); c = 2 gives (B+3b)/(3b)
  `TauSwitch`                               EMA of τ (momentum 0.9), on while it exceeds τ_th

Policy "is" (trainer shell). Each step belongs to one batch of b examples of the shuffled pass
over the subset (so an epoch has the same number of steps as plain training):
  on:  read a presample of B = round(presample * b) examples (the step's own b plus B - b drawn
       uniformly without replacement from the rest of the subset), score them in one no-grad
       eval-mode forward, resample b with replacement with p ∝ score, and take one step on
       mean(w * l) with w = 1 / (B p) (times the selection weight over its presample mean).
  off: take one plain step on the step's own b examples (no extra read, no extra forward); the
       training forward's logits give the b scores for τ.
  τ is updated after every step from that step's scores (B of them when on, b when off) and
  the switch is re-checked before the next step. The log gets `is_on_fraction` and `is_tau`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from subsetsel.online.base import Batch, Policy, register_policy
from subsetsel.online.selective_backprop import policy_generator
from subsetsel.selection.base import round_generator

if TYPE_CHECKING:
    from subsetsel.train import BatchSource, Trainer

SCORES = ("gnorm", "loss", "gradnorm")


# ---- pure cores ------------------------------------------------------------------------------
def importance_scores(
    logits: torch.Tensor,
    y: torch.Tensor,
    kind: str = "gnorm",
    embeddings: torch.Tensor | None = None,
) -> torch.Tensor:
    """float (B,) non-negative scores from logits (B, C) and labels (B,).

    "gnorm": ||softmax(z) - onehot(y)||_2, the norm of dL/dz (an upper bound, up to a constant,
    of the full gradient norm); "loss": cross-entropy; "gradnorm": the exact per-example norm
    of the gradient w.r.t. the last linear layer's weight and bias, ||dL/dz|| * sqrt(||e||² + 1),
    which needs that layer's inputs `embeddings` (B, D).
    """
    logits = logits.detach().float()
    if kind == "loss":
        return F.cross_entropy(logits, y, reduction="none")
    residual = torch.softmax(logits, dim=1)
    residual[torch.arange(y.numel(), device=y.device), y] -= 1.0
    norms = residual.norm(dim=1)
    if kind == "gnorm":
        return norms
    if kind == "gradnorm":
        if embeddings is None:
            raise ValueError("score 'gradnorm' needs the last layer's inputs (embeddings)")
        e = embeddings.detach().float().reshape(embeddings.shape[0], -1)
        return norms * (e.pow(2).sum(dim=1) + 1.0).sqrt()
    raise ValueError(f"unknown --score {kind!r}; valid: {', '.join(SCORES)}")


def sampling_probabilities(
    scores: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """float (B,) summing to 1, proportional to weights * scores (uniform when all are 0)."""
    mass = scores.float().clamp_min(0.0)
    if weights is not None:
        mass = mass * weights.float()
    total = mass.sum()
    uniform = torch.full_like(mass, 1.0 / mass.numel())
    return torch.where(total > 0, mass / total.clamp_min(1e-30), uniform)


def resample(p: torch.Tensor, b: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """int64 (b,) rows drawn with replacement with probabilities p (B,)."""
    return torch.multinomial(p, b, replacement=True, generator=generator)


def is_weights(p: torch.Tensor) -> torch.Tensor:
    """float (B,) unbiasing weights 1 / (B * p): for rows j ~ p, E[mean_j w_j l_j] = mean_i l_i."""
    return 1.0 / (p.numel() * p.clamp_min(1e-30))


def tau_estimate(scores: torch.Tensor) -> float:
    """τ = 1 / sqrt(1 - ||p - u||² / ||p||²) for p = scores / Σ scores, u = 1/B.

    Computed as the equal, stable sqrt(B * Σ p²) (>= 1, = 1 for uniform scores); 1 if all are 0.
    """
    s = scores.detach().double().clamp_min(0.0)
    total = float(s.sum())
    if total <= 0.0:
        return 1.0
    p = s / total
    return math.sqrt(s.numel() * float(p.pow(2).sum()))


def tau_threshold(presample_size: int, batch_size: int, backward_cost: float = 2.0) -> float:
    """τ above which importance sampling pays for its extra forward pass: B forwards plus b
    forward+backward must cost at most τ forward+backward of b, i.e. (B + (1+c) b) / ((1+c) b)
    with c = backward / forward time (2 gives the paper's (B + 3b) / (3b))."""
    c = 1.0 + backward_cost
    return (presample_size + c * batch_size) / (c * batch_size)


@dataclass
class TauSwitch:
    """EMA of τ (first observation taken as is) and the on/off decision against `threshold`."""

    threshold: float
    momentum: float = 0.9
    tau: float | None = None

    @property
    def on(self) -> bool:
        return self.tau is not None and self.tau > self.threshold

    def update(self, tau: float) -> None:
        self.tau = tau if self.tau is None else self.momentum * self.tau + (1 - self.momentum) * tau


@contextmanager
def capture_last_input(model: nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """Collect the inputs (B, D) of the model's last nn.Linear during forwards in the block."""
    captured: list[torch.Tensor] = []
    if not enabled:
        yield captured
        return
    from subsetsel.models import last_linear

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured.append(inputs[0].detach())

    handle = last_linear(model).register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def presample_positions(
    start: int, stop: int, n: int, size: int, generator: torch.Generator
) -> torch.Tensor:
    """int64 (min(size, n),) positions: the own block [start, stop) first, then size - (stop -
    start) others drawn uniformly without replacement from [0, n) outside the block."""
    own = torch.arange(start, stop)
    width = stop - start
    extra = min(size, n) - width
    if extra <= 0:
        return own
    others = torch.randperm(n - width, generator=generator)[:extra]
    return torch.cat([own, others + (others >= start).long() * width])


# ---- policy ----------------------------------------------------------------------------------
@register_policy
@dataclass
class ImportanceSampling(Policy):
    """Presample B = presample * b, resample b ∝ score, weight 1/(B p); τ switch (see module doc).

    presample: B / b (> 1); score: gnorm, loss or gradnorm; tau_th: switch threshold (None:
    `tau_threshold(B, b)`; 0: always on); tau_momentum: EMA momentum of τ.
    """

    name: ClassVar[str] = "is"
    presample: float = 3.0
    score: str = "gnorm"
    tau_th: float | None = None
    tau_momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.presample <= 1.0:
            raise ValueError(f"--presample must be > 1, got {self.presample}")
        if self.score not in SCORES:
            raise ValueError(f"unknown --score {self.score!r}; valid: {', '.join(SCORES)}")
        if self.tau_th is not None and self.tau_th < 0:
            raise ValueError(f"--tau-th must be >= 0, got {self.tau_th}")
        if not 0.0 <= self.tau_momentum < 1.0:
            raise ValueError(f"tau_momentum must be in [0, 1), got {self.tau_momentum}")
        self.switch: TauSwitch | None = None
        self._own = 0
        self._counts = [0, 0]  # steps on, steps

    def presample_size(self, batch_size: int) -> int:
        return max(batch_size + 1, round(self.presample * batch_size))

    def begin_epoch(self, trainer: Trainer, epoch: int) -> None:
        b = trainer.config.batch_size
        if self.switch is None:
            threshold = self.tau_th
            if threshold is None:
                threshold = tau_threshold(self.presample_size(b), b)
            self.switch = TauSwitch(threshold, self.tau_momentum)
        self._generator = policy_generator(trainer, epoch, salt=47)
        self._order_generator = round_generator(trainer.config.seed, epoch, salt=53)
        self._counts = [0, 0]

    def use_presample(self) -> bool:
        """Whether the next step reads and scores a presample (the switch is on)."""
        return self.switch is not None and (self.switch.on or self.switch.threshold == 0)

    def batches(self, source: BatchSource) -> Iterator[Batch]:
        n, b = source.indices.numel(), source.batch_size
        big = self.presample_size(b)
        device = source.indices.device
        for start in range(0, n, b):
            stop = min(start + b, n)
            self._own = stop - start
            if self.use_presample():
                positions = presample_positions(start, stop, n, big, self._order_generator)
            else:
                positions = torch.arange(start, stop)
            positions = positions.to(device)
            raw = source.read(source.indices[positions], source.weights[positions])
            yield source.augment(raw)

    def step(self, trainer: Trainer, batch: Batch) -> None:
        assert self.switch is not None
        self._counts[1] += 1
        gradnorm = self.score == "gradnorm"
        if len(batch) <= self._own:  # off: a plain step on the own batch
            with capture_last_input(trainer.model, gradnorm) as inputs:
                trainer.train_on(batch)
            scores = importance_scores(
                trainer.last_logits, batch.y, self.score, inputs[-1] if inputs else None
            )
            self.switch.update(tau_estimate(scores))
            return
        self._counts[0] += 1
        with capture_last_input(trainer.model, gradnorm) as inputs:
            logits, _ = trainer.score(batch.x, batch.y)
        scores = importance_scores(logits, batch.y, self.score, inputs[-1] if inputs else None)
        self.switch.update(tau_estimate(scores))
        p = sampling_probabilities(scores, batch.w)
        rows = resample(p, self._own, self._generator)
        trainer.train_on(self._weighted(batch, p, rows), normalize=False)

    @staticmethod
    def _weighted(batch: Batch, p: torch.Tensor, rows: torch.Tensor) -> Batch:
        """The resampled rows with weights w_sel / mean(w_sel) / (B p): mean(w * l) is then an
        unbiased estimate of the presample's selection-weighted mean loss."""
        chosen = batch.take(rows)
        scale = batch.w.float().mean().clamp_min(1e-12)
        chosen.w = chosen.w.float() / scale * is_weights(p)[rows]
        return chosen

    def end_epoch(self, trainer: Trainer) -> dict[str, Any]:
        on, steps = self._counts
        tau = self.switch.tau if self.switch is not None else None
        return {"is_on_fraction": on / max(1, steps), "is_tau": tau}

    def state_dict(self) -> dict[str, Any]:
        if self.switch is None:
            return {}
        return {"tau": self.switch.tau, "threshold": self.switch.threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.switch = TauSwitch(state["threshold"], self.tau_momentum, state["tau"])
