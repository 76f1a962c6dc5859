"""Per-batch training policies: transforms of the batch stream between the reader and the step.

A policy turns an epoch's reader into a plan: the number of optimizer steps it will take
(known before the epoch starts, so that every rank of a distributed run steps alike) and the
stream of step batches (which examples are backpropagated, with what weights). It never calls
into the trainer: what it may use is in `PolicyContext` (a scorer for no-grad forwards, the
epoch and sizes), and after every step the engine hands it the step's per-example losses
(`observe`). The default `Policy` trains on each batch as it comes. Online methods
(Selective-Backprop, importance sampling, data echoing, replay) subclass it in their own module
and register a name, exactly like selection strategies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from subsetsel.data.base import Batch, EpochReader
from subsetsel.registry import Registry, create_dataclass
from subsetsel.selection.base import round_generator


@dataclass
class Scored:
    """A no-grad eval-mode forward: logits (B, C) float32, per-example cross-entropy losses (B,),
    and the last linear layer's inputs (B, D) when asked for."""

    logits: torch.Tensor
    losses: torch.Tensor
    embeddings: torch.Tensor | None = None


@dataclass
class StepBatch:
    """One optimizer step's batch. mean_loss: the step's loss is mean(w * l) (an unbiased
    estimate, importance sampling and prioritised replay) instead of sum(w * l) / sum(w).
    tag: the policy's own note about the batch, handed back in `observe`."""

    batch: Batch
    mean_loss: bool = False
    tag: Any = None


@dataclass
class StepOut:
    """What the engine tells a policy after a step: the per-example losses (B,) and logits
    (B, C) of the training forward (before the update, detached), and the last linear layer's
    inputs when the policy wants them."""

    losses: torch.Tensor
    logits: torch.Tensor
    embeddings: torch.Tensor | None = None


class EpochPlan:
    """`steps` step batches, known before the first one is drawn."""

    def __init__(self, steps: int, batches: Iterator[StepBatch]) -> None:
        self.steps = steps
        self.batches = batches

    def __iter__(self) -> Iterator[StepBatch]:
        return self.batches


@dataclass
class PolicyContext:
    """What a policy may look at.

    epoch, epochs: this period and their number (epochs of a run; log periods of one pass).
    batch_size: the run's mini-batch size; dataset_size: training examples N.
    score(x, y, embeddings=False): a counted no-grad eval-mode forward (`Scored`).
    image_inputs: whether inputs are (C, H, W) images.
    rank: this process's rank under torch.distributed (0 alone); `generator` mixes it in so that
    ranks draw differently, `shared_generator` does not (for draws that fix step counts).
    mean_over_ranks(value): the mean of a per-rank float over all ranks (one all-reduce; the
    value itself alone), for decisions every rank must take alike.
    """

    epoch: int
    epochs: int
    seed: int
    batch_size: int
    dataset_size: int
    device: torch.device
    score: Callable[..., Scored]
    image_inputs: bool = False
    rank: int = 0
    mean_over_ranks: Callable[[float], float] = float

    def generator(self, salt: int) -> torch.Generator:
        """A generator on the device seeded by (seed, epoch, salt, rank): resumes draw the
        same."""
        base = self.cpu_generator(salt)
        seed = int(torch.randint(2**62, (1,), generator=base))
        return torch.Generator(device=self.device).manual_seed(seed)

    def cpu_generator(self, salt: int) -> torch.Generator:
        """A CPU generator seeded by (seed, epoch, salt, rank)."""
        return round_generator(self.seed, self.epoch, salt + 1_000 * self.rank)

    def shared_generator(self, salt: int) -> torch.Generator:
        """A CPU generator seeded by (seed, epoch, salt): the same on every rank."""
        return round_generator(self.seed, self.epoch, salt)


@dataclass
class Policy:
    """Base policy (also "plain"): one step per batch of the run's batch size. Subclasses are
    dataclasses whose fields are their parameters (CLI options, provenance)."""

    name: ClassVar[str] = "plain"
    wants_embeddings: ClassVar[bool] = False

    def plan(self, reader: EpochReader, ctx: PolicyContext) -> EpochPlan:
        """The epoch's steps over `reader`."""
        size = ctx.batch_size
        return EpochPlan(reader.num_batches(size), (StepBatch(b) for b in reader.batches(size)))

    def observe(self, step: StepBatch, out: StepOut) -> None:
        """Called after each step with its losses."""

    def end_epoch(self) -> dict[str, Any]:
        """Extra fields for the epoch's log line."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State a resumed run needs (tensors allowed)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`."""

    def check(self, ctx: PolicyContext) -> None:
        """Refuse (ValueError) settings that cannot work with this data, before training."""

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def split(batch: Batch, size: int) -> Iterator[Batch]:
    """Consecutive sub-batches of at most `size` rows."""
    for start in range(0, len(batch), size):
        yield batch.take(slice(start, start + size))


def _load_builtin_policies() -> None:
    import subsetsel.online  # noqa: F401  (registers the built-in policies)


POLICIES: Registry[type[Policy]] = Registry("policy", _load_builtin_policies)
POLICIES.add("plain", Policy)


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy creatable by its `name`."""
    POLICIES.add(cls.name, cls)
    return cls


def policy_names() -> list[str]:
    return POLICIES.names()


def create_policy(name: str, **params: Any) -> Policy:
    """Build a registered policy; parameters it does not declare are ignored."""
    return create_dataclass(POLICIES.get(name), params)
