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

Policy "is" (a batch-stream transform). Each step belongs to one batch of b examples of the shuffled
pass over the subset (so an epoch has the same number of steps as plain training):
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from subsetsel.data.base import Batch, EpochReader
from subsetsel.models import capture_last_input  # noqa: F401  (a pure core for your own loop)
from subsetsel.online.base import (
    EpochPlan,
    Policy,
    PolicyContext,
    StepBatch,
    StepOut,
    register_policy,
)

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
    score: str = field(default="gnorm", metadata={"choices": SCORES})
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
        self._mean_over_ranks: Callable[[float], float] = float
        self._counts = [0, 0]  # steps on, steps

    def presample_size(self, batch_size: int) -> int:
        return max(batch_size + 1, round(self.presample * batch_size))

    def use_presample(self) -> bool:
        """Whether the next step reads and scores a presample (the switch is on)."""
        return self.switch is not None and (self.switch.on or self.switch.threshold == 0)

    @property
    def wants_embeddings(self) -> bool:  # type: ignore[override]
        return self.score == "gradnorm"

    def plan(self, reader: EpochReader, ctx: PolicyContext) -> EpochPlan:
        b = ctx.batch_size
        if self.switch is None:
            threshold = self.tau_th
            if threshold is None:
                threshold = tau_threshold(self.presample_size(b), b)
            self.switch = TauSwitch(threshold, self.tau_momentum)
        self._counts = [0, 0]
        self._mean_over_ranks = ctx.mean_over_ranks  # one switch for all ranks (same steps)
        owns: list[int] = []
        reads = reader.read(self._reads(reader, b, owns, ctx.cpu_generator(salt=53)))
        return EpochPlan(reader.num_batches(b), self._steps(reads, owns, ctx))

    def _reads(self, reader: EpochReader, b: int, owns: list[int],
               generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per step: the own block of b positions of the order, plus B - b others when on
        (decided when the read is planned; a DataLoader plans a few steps ahead)."""
        n, big = len(reader), self.presample_size(b)
        for start in range(0, n, b):
            stop = min(start + b, n)
            owns.append(stop - start)
            if self.use_presample():
                positions = presample_positions(start, stop, n, big, generator)
            else:
                positions = torch.arange(start, stop)
            positions = positions.to(reader.indices.device)
            yield reader.indices[positions], reader.weights[positions]

    def _steps(self, reads: Iterator[Batch], owns: list[int], ctx: PolicyContext
               ) -> Iterator[StepBatch]:
        generator = ctx.generator(salt=47)
        for batch in reads:
            own = owns.pop(0)
            self._counts[1] += 1
            if len(batch) <= own:  # off: a plain step; `observe` updates tau from its logits
                yield StepBatch(batch, tag="plain")
                continue
            self._counts[0] += 1
            yield self._resampled(batch, own, generator, ctx)

    def _resampled(self, batch: Batch, own: int, generator: torch.Generator,
                   ctx: PolicyContext) -> StepBatch:
        """Score the presample, update tau, draw `own` rows with p ∝ score, weight 1/(B p)."""
        assert self.switch is not None
        scored = ctx.score(batch.x, batch.y, embeddings=self.wants_embeddings)
        scores = importance_scores(scored.logits, batch.y, self.score, scored.embeddings)
        self.switch.update(self._mean_over_ranks(tau_estimate(scores)))
        p = sampling_probabilities(scores, batch.w)
        rows = resample(p, own, generator)
        return StepBatch(self._weighted(batch, p, rows), mean_loss=True)

    def observe(self, step: StepBatch, out: StepOut) -> None:
        if step.tag == "plain" and self.switch is not None:
            scores = importance_scores(out.logits, step.batch.y, self.score, out.embeddings)
            self.switch.update(self._mean_over_ranks(tau_estimate(scores)))

    @staticmethod
    def _weighted(batch: Batch, p: torch.Tensor, rows: torch.Tensor) -> Batch:
        """The resampled rows with weights w_sel / mean(w_sel) / (B p): mean(w * l) is then an
        unbiased estimate of the presample's selection-weighted mean loss."""
        chosen = batch.take(rows)
        scale = batch.w.float().mean().clamp_min(1e-12)
        chosen.w = chosen.w.float() / scale * is_weights(p)[rows]
        return chosen

    def end_epoch(self) -> dict[str, Any]:
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
