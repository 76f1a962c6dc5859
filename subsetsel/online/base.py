"""Per-batch training policies: the hook through which online selection enters the trainer.

A policy sees every mini-batch the trainer draws from the current subset and decides what is
trained on. The default `Plain` policy trains on each batch as it comes. Online methods
(Selective-Backprop, importance sampling, data echoing) subclass `Policy` in their own module and
register a name, exactly like selection strategies.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from subsetsel.registry import Registry, create_dataclass

if TYPE_CHECKING:
    from subsetsel.train import BatchSource, Trainer


@dataclass
class Batch:
    """A mini-batch on the training device.

    indices: int64 (B,) positions in the training set; x: inputs (B, *input_shape), augmented;
    y: int64 (B,) labels; w: float32 (B,) selection weights.
    """

    indices: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def take(self, rows: torch.Tensor) -> Batch:
        """The sub-batch at positions `rows` (int64 or bool tensor on the batch's device)."""
        return Batch(self.indices[rows], self.x[rows], self.y[rows], self.w[rows])

    @staticmethod
    def cat(batches: list[Batch]) -> Batch:
        return Batch(*(torch.cat([getattr(b, f.name) for b in batches]) for f in fields(Batch)))


@dataclass
class Policy:
    """Base policy: subclasses are dataclasses whose fields are their parameters."""

    name: ClassVar[str] = "plain"

    def begin_epoch(self, trainer: Trainer, epoch: int) -> None:
        """Called before the first batch of each epoch."""

    def batches(self, source: BatchSource) -> Iterator[Batch]:
        """The epoch's stream of batches (data echoing replaces this)."""
        return iter(source)

    def step(self, trainer: Trainer, batch: Batch) -> None:
        """Train on one incoming batch (online selection replaces this)."""
        trainer.train_on(batch)

    def end_epoch(self, trainer: Trainer) -> dict[str, Any]:
        """Flush anything pending; return extra fields for the epoch's log line."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State a resumed run needs (tensors allowed)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`."""

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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
