"""Data echoing (Choi et al. 2019): reuse what a slow input pipeline has already produced.

Pure cores (usable from any training loop):
  `echo_counts(factor, n, generator)`  int64 (n,) repeats: floor(e), +1 with prob. e - floor(e)
  `ShuffleBuffer(capacity, batch_size, generator)`  mixes echoed examples before batching
  `echo_stream(raw_batches, factor, mode, ...)`      the echoed stream of training batches
  `prefetch(iterator, depth)`                         read ahead in a background thread

Modes: "example-before-aug" repeats each example read, shuffles, batches, then augments (each
copy gets its own augmentation); "example-after-aug" augments each read batch, then repeats its
examples (identical copies), shuffles and batches; "batch" augments each read batch and yields
it k times in a row (k drawn per batch), without a shuffle buffer.

Policy "echo": an epoch is one pass of fresh reads over the current subset, so an echoed epoch takes
about e times the optimizer steps of a plain one (the LR schedule still advances per epoch). The
repeat counts of the whole epoch are fixed by its seed, so its number of steps is known before it
starts. Reads run `prefetch` batches ahead in a background thread, so a simulated slow input
(`--slow-input`, a sleep per batch read) overlaps with training as in a real pipeline; compare
against `--policy echo --echo 1` (the same reader, no repeats).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch

from subsetsel.data.base import Batch, EpochReader
from subsetsel.online.base import EpochPlan, Policy, PolicyContext, StepBatch, register_policy

ECHO_MODES = ("example-before-aug", "example-after-aug", "batch")
T = TypeVar("T")


def echo_counts(factor: float, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """int64 (n,) on the CPU: floor(factor) for every item, plus one with probability
    factor - floor(factor) (so the expected count is `factor`)."""
    if factor < 1.0:
        raise ValueError(f"--echo must be >= 1, got {factor}")
    whole = math.floor(factor)
    counts = torch.full((n,), whole, dtype=torch.int64)
    if factor > whole:
        counts += (torch.rand(n, generator=generator) < factor - whole).long()
    return counts


class ShuffleBuffer:
    """Holds at least `capacity` examples before emitting; each emitted batch of `batch_size` is
    drawn uniformly without replacement from everything held. Every example added is emitted
    exactly once (the remainder by `flush`)."""

    def __init__(self, capacity: int, batch_size: int, generator: torch.Generator) -> None:
        self.capacity = max(capacity, batch_size)
        self.batch_size = batch_size
        self.generator = generator  # CPU
        self.held: Batch | None = None

    def __len__(self) -> int:
        return 0 if self.held is None else len(self.held)

    def add(self, batch: Batch) -> Iterator[Batch]:
        """Add examples; yield batches while the buffer holds at least `capacity`."""
        self.held = batch if self.held is None else Batch.cat([self.held, batch])
        while len(self) >= self.capacity:
            yield self._draw(self.batch_size)

    def flush(self) -> Iterator[Batch]:
        """Emit everything left, shuffled, in batches (the last one may be smaller)."""
        while len(self):
            yield self._draw(min(self.batch_size, len(self)))

    def _draw(self, count: int) -> Batch:
        assert self.held is not None
        order = torch.randperm(len(self.held), generator=self.generator)
        device = self.held.indices.device
        out = self.held.take(order[:count].to(device))
        rest = self.held.take(order[count:].to(device))
        self.held = rest if len(rest) else None
        return out


def repeat_examples(batch: Batch, counts: torch.Tensor) -> Batch:
    """The batch with example i repeated counts[i] times (copies adjacent)."""
    rows = torch.repeat_interleave(torch.arange(len(batch)), counts)
    return batch.take(rows.to(batch.indices.device))


def echo_stream(
    raw_batches: Iterable[Batch],
    factor: float,
    mode: str,
    batch_size: int,
    buffer_size: int,
    count_generator: torch.Generator,
    shuffle_generator: torch.Generator,
    augment: Callable[[Batch], Batch] = lambda b: b,
) -> Iterator[Batch]:
    """Training batches from un-augmented `raw_batches` with echoing `factor` in `mode`.

    Repeat counts are drawn with `count_generator` in read order, `echo_counts(factor, B)` per
    raw batch in the example modes and `echo_counts(factor, 1)` per batch in "batch" mode.
    """
    if mode not in ECHO_MODES:
        raise ValueError(f"unknown --echo-mode {mode!r}; valid: {', '.join(ECHO_MODES)}")
    if mode == "batch":
        for raw in raw_batches:
            batch = augment(raw)
            for _ in range(int(echo_counts(factor, 1, count_generator)[0])):
                yield batch
        return
    buffer = ShuffleBuffer(buffer_size, batch_size, shuffle_generator)
    before = mode == "example-before-aug"
    for raw in raw_batches:
        batch = raw if before else augment(raw)
        echoed = repeat_examples(batch, echo_counts(factor, len(batch), count_generator))
        for out in buffer.add(echoed):
            yield augment(out) if before else out
    for out in buffer.flush():
        yield augment(out) if before else out


def prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """Iterate `items` with up to `depth` of them produced ahead by a background thread (depth
    0: in the caller's thread). Exceptions in the producer re-raise in the consumer."""
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message: tuple[str, Any]) -> bool:
        """Hand a message over unless the consumer has stopped; False once it has."""
        while not stop.is_set():
            try:
                slots.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put(("error", err))

    worker = threading.Thread(target=produce, name="subsetsel-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "done":
                break
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join(timeout=5.0)


@register_policy
@dataclass
class Echo(Policy):
    """Data echoing (see module doc).

    echo: factor e >= 1 (fractional allowed); echo_mode: one of ECHO_MODES; shuffle_buffer:
    examples held by the shuffle buffer in the example modes (0: 8 x the batch size);
    prefetch: batches read ahead in a background thread (0: read in the training thread).
    """

    name: ClassVar[str] = "echo"
    echo: float = 2.0
    echo_mode: str = field(default="example-before-aug", metadata={"choices": ECHO_MODES})
    shuffle_buffer: int = 0
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.echo < 1.0:
            raise ValueError(f"--echo must be >= 1, got {self.echo}")
        if self.echo_mode not in ECHO_MODES:
            raise ValueError(
                f"unknown --echo-mode {self.echo_mode!r}; valid: {', '.join(ECHO_MODES)}"
            )
        if self.shuffle_buffer < 0:
            raise ValueError(f"--shuffle-buffer must be >= 0, got {self.shuffle_buffer}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")
        self._yielded = 0
        self._reader: EpochReader | None = None

    def plan(self, reader: EpochReader, ctx: PolicyContext) -> EpochPlan:
        b = ctx.batch_size
        self._reader, self._yielded = reader, 0
        count_generator = ctx.shared_generator(salt=61)  # same counts, same steps on all ranks
        steps = planned_steps(self.echo, self.echo_mode, len(reader), b,
                              _clone(count_generator))
        stream = echo_stream(
            prefetch(reader.raw_batches(b), self.prefetch),
            self.echo,
            self.echo_mode,
            b,
            self.shuffle_buffer or 8 * b,
            count_generator=count_generator,
            shuffle_generator=ctx.cpu_generator(salt=67),
            augment=reader.augment,
        )
        return EpochPlan(steps, self._counted(stream))

    def _counted(self, stream: Iterator[Batch]) -> Iterator[StepBatch]:
        for batch in stream:
            self._yielded += len(batch)
            yield StepBatch(batch)

    def end_epoch(self) -> dict[str, Any]:
        fresh = self._reader.fresh if self._reader is not None else 0
        return {"echoed_per_fresh": self._yielded / max(1, fresh)}


def planned_steps(factor: float, mode: str, n: int, batch_size: int,
                  count_generator: torch.Generator) -> int:
    """Optimizer steps `echo_stream` yields for n examples read in batches of `batch_size`,
    drawing the repeat counts from (a copy of) the generator it will use."""
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    if mode == "batch":
        return sum(int(echo_counts(factor, 1, count_generator)[0]) for _ in sizes)
    total = sum(int(echo_counts(factor, size, count_generator).sum()) for size in sizes)
    return -(-total // batch_size)


def _clone(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy
