"""The `Selection` a strategy returns, the context it selects in, and the strategy registry."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from subsetsel.registry import Registry, create_dataclass

if TYPE_CHECKING:
    from torch import nn

    from subsetsel.data.base import TrainData
    from subsetsel.engine.dist import Dist
    from subsetsel.engine.precision import Precision
    from subsetsel.selection.losses import LossRecord


@dataclass(frozen=True)
class Selection:
    """One round's weighted subset of the training set.

    indices: int64 (k,) positions in the training set, unique, on the CPU.
    weights: float32 (k,) non-negative weights, one per index.
    epoch: the first epoch (0-based) this subset is trained on.
    seconds: wall seconds spent choosing it (0 for replayed or trivial selections).
    batch_ids: int64 (m,) ids of the chosen mini-batches of a fixed partition (PB strategies only).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    epoch: int = 0
    seconds: float = 0.0
    batch_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        indices = torch.as_tensor(self.indices, dtype=torch.int64).detach().cpu().reshape(-1)
        weights = torch.as_tensor(self.weights, dtype=torch.float32).detach().cpu().reshape(-1)
        if indices.numel() != weights.numel():
            raise ValueError(f"{indices.numel()} indices but {weights.numel()} weights")
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "weights", weights)
        if self.batch_ids is not None:
            batch_ids = torch.as_tensor(self.batch_ids, dtype=torch.int64).cpu().reshape(-1)
            object.__setattr__(self, "batch_ids", batch_ids)

    def __len__(self) -> int:
        return int(self.indices.numel())

    @classmethod
    def full(cls, n: int, epoch: int = 0) -> Selection:
        """Every example with weight 1."""
        return cls(torch.arange(n), torch.ones(n), epoch=epoch)


def budget(fraction: float, n: int) -> int:
    """Subset size k for a fraction of n examples: round(fraction * n), at least 1, at most n."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, min(n, int(round(fraction * n))))


def round_generator(seed: int, round_index: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, round, salt), so a resumed run draws the same."""
    return torch.Generator().manual_seed((seed * 1_000_003 + round_index * 7919 + salt) % 2**63)


@dataclass
class SelectionContext:
    """What a strategy may look at when it selects.

    model: the network being trained (a strategy may run it in eval mode; the schedule restores
    its mode afterwards).
    dataset: the training data (`TrainData`: its eval view is what selection forwards read).
    epoch: the epoch the new subset starts at; round_index counts selections made so far.
    batch_size: the trainer's mini-batch size (PB strategies partition by it).
    precision: autocast / memory-format settings for the selection forward (None: float32).
    dist: the torch.distributed group selecting together (None: this process alone); every
    rank must return the same Selection.
    """

    model: nn.Module
    dataset: TrainData
    epoch: int
    round_index: int
    batch_size: int
    seed: int
    device: torch.device
    precision: Precision | None = None
    dist: Dist | None = None
    epochs: int | None = None  # the run's length (None: open-ended)
    losses: LossRecord | None = None  # recent training losses (strategies that want them)


@dataclass
class Strategy:
    """Base of all selection strategies: subclass, set `name`, implement `select`.

    Subclasses are dataclasses; their fields are the strategy's parameters (stored in selection
    files as provenance). `fraction` is the budget as a share of the training set.
    """

    fraction: float = 1.0
    seed: int = 0
    name: ClassVar[str] = ""
    # schedule settings the strategy decides itself (setting name -> value), and why; a run
    # that asks for another value is refused (see `fixed_settings`)
    fixed: ClassVar[dict[str, Any]] = {}
    fixed_reason: ClassVar[str] = ""
    # train on this strategy's selections (and their replays) with the step loss mean(w * l)
    # instead of sum(w * l) / sum(w): weights that rescale the gradient (InfoBatch's 1/(1-r))
    mean_loss: ClassVar[bool] = False

    def __post_init__(self) -> None:
        budget(self.fraction, 1)  # validates the fraction

    def select(self, ctx: SelectionContext) -> Selection:
        raise NotImplementedError

    def wants_losses(self, epoch: int, epochs: int | None) -> bool:
        """Whether the training losses of `epoch` should be recorded for this strategy
        (`SelectionContext.losses`); recording costs nothing when this is False."""
        return False

    def params(self) -> dict[str, Any]:
        """The strategy's parameters as plain JSON-able values."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _load_builtin_strategies() -> None:
    import subsetsel.selection  # noqa: F401  (its __init__ imports every strategy module)


STRATEGIES: Registry[type[Strategy]] = Registry("strategy", _load_builtin_strategies)


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy creatable by its `name`."""
    STRATEGIES.add(cls.name, cls)
    return cls


def strategy_names() -> list[str]:
    return STRATEGIES.names()


def create_strategy(name: str, **params: Any) -> Strategy:
    """Build a registered strategy; parameters it does not declare are ignored."""
    return create_dataclass(STRATEGIES.get(name), params)


def fixed_settings(strategy: str, given: dict[str, Any],
                   defaults: dict[str, Any]) -> dict[str, Any]:
    """The schedule settings (`select_every`, `fraction`, `warm_start`, ...) to run `strategy`
    with: `given` with the strategy's fixed ones (`Strategy.fixed`) put in. A given value that
    is neither the fixed one nor its entry in `defaults` (a setting missing there counts as
    asked for) is a one-line ValueError naming the option."""
    cls = STRATEGIES.get(strategy) if strategy in STRATEGIES else None
    if cls is None or not cls.fixed:
        return dict(given)
    out = dict(given)
    for key, value in cls.fixed.items():
        if key not in given:
            continue
        if given[key] != value and given[key] != defaults.get(key, value):
            raise ValueError(f"--{key.replace('_', '-')} {given[key]} does not apply to "
                             f"--strategy {strategy}: {cls.fixed_reason}")
        out[key] = value
    return out


def strategy_mean_loss(name: str) -> bool:
    """Whether selections made by strategy `name` train with mean(w * l) (`Strategy.mean_loss`);
    False for a name not registered here."""
    return name in STRATEGIES and STRATEGIES.get(name).mean_loss


def whole_batches(k: int, batches: int, batch_size: int, n: int, fraction: float,
                  name: str) -> int:
    """Batches a per-batch strategy picks for a budget of k examples: ceil(k / batch_size), at
    most `batches`. A fraction below 1 that would pick every batch (so train on all n examples
    under a subset's name) is refused with a one-line ValueError."""
    m = min(batches, -(-k // batch_size))
    if m >= batches and fraction < 1.0:
        raise ValueError(
            f"--strategy {name} picks whole batches of {batch_size}: --fraction {fraction:g} of "
            f"{n} examples needs all {batches} batch(es), i.e. the full data; use a smaller "
            "--batch-size or --fraction 1"
        )
    return m


def fixed_partition(n: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Split range(n) once into seeded random mini-batches of `batch_size` (last may be smaller)."""
    perm = torch.randperm(n, generator=round_generator(seed, 0, salt=17))
    return list(perm.split(batch_size))


__all__ = [
    "Selection",
    "SelectionContext",
    "Strategy",
    "budget",
    "create_strategy",
    "fixed_partition",
    "fixed_settings",
    "whole_batches",
    "register_strategy",
    "round_generator",
    "strategy_mean_loss",
    "strategy_names",
]
