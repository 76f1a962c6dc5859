"""Grad-Match strategies: a weighted subset whose last-layer gradient sum matches the full one.

``gradmatch`` (per class): one non-negative OMP problem per class c, matching the sum of the
class's gradient rows with budget k_c, all classes solved together as one padded batch.
``gradmatchpb`` (per batch): atoms are the mean gradient rows of the mini-batches of a fixed,
seeded partition (the trainer's batch size); OMP picks ceil(k / batch_size) batches, every sample
of a chosen batch gets its batch's weight.

With ``valid=True`` the target is the gradient of a held-out validation split instead: a fixed,
seeded, stratified ``valid_fraction`` of the training set (the same every round), whose examples
are never selected. Per class the target is the class's validation gradient sum scaled by
n_c / m_c (train over validation count), per batch it is (number of batches / validation size)
times the validation gradient sum, so weights keep the scale they have without ``valid``.

See docs/gradmatch.md for the choices (tolerance, budget fill, first round, memory).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from subsetsel import memory
from subsetsel.engine.dist import Dist
from subsetsel.errors import DivergenceError
from subsetsel.selection.base import (
    Selection,
    SelectionContext,
    Strategy,
    budget,
    fixed_partition,
    register_strategy,
    round_generator,
    whole_batches,
)
from subsetsel.selection.gradients import (
    CHUNK,
    LastLayerAtoms,
    LastLayerFactors,
    check_memory,
    collect_factors,
    final_linear,
)
from subsetsel.selection.omp import DenseAtoms, capacity, complete_to_budget, nonneg_omp

OMP_STEPS = 16  # default number of OMP steps: each adds up to ceil(budget / OMP_STEPS) atoms
OMP_POOL = 5.0  # ... pruned from a pool of OMP_POOL times as many top-correlated atoms
OMP_ROUNDS = 8  # ... in this many rounds of backward elimination (see omp._pool_picks)
OMP_TAPER = 0.25  # ... and at most ceil(OMP_TAPER * (budget - slots used)) atoms per step


def auto_picks_per_step(budget: int) -> int:
    """Atoms added per OMP step by default: ceil(budget / OMP_STEPS), at least 1.

    Each step's atoms are pruned from a pool of OMP_POOL times as many, and the blocks taper
    as the budget fills (`nonneg_omp(..., pool=OMP_POOL, rounds=OMP_ROUNDS, taper=OMP_TAPER)`).
    Measured (docs/gradmatch.md, 2026-12-03): on every problem of scripts/bench_omp.py the
    relative residual is at most 3.6 % above one pick per step (mostly 7-15 % below it), at
    3-11x less OMP time than our one pick and 45-426x less than the textbook re-solve; the
    earlier default, ceil(budget / 32) top-correlated atoms per step, ended 4-46 % above."""
    return max(1, math.ceil(budget / OMP_STEPS))


def class_budgets(k: int, counts: torch.Tensor) -> torch.Tensor:
    """Split budget k over classes with `counts` (int64 (C,)) examples: the quotas k*n_c/N
    rounded down, then +1 (i.e. rounded up) for the classes with the largest fractional parts
    (ties: lower class id) until they sum to exactly min(k, N). Returns int64 (C,), <= counts."""
    counts = counts.to(torch.int64).cpu()
    total = int(counts.sum())
    k = min(k, total)
    if total == 0:
        return torch.zeros_like(counts)
    quota = counts.double() * k / total
    base = quota.floor().to(torch.int64)
    extra = k - int(base.sum())
    frac = torch.where(base < counts, quota - base.double(), -1.0)
    order = torch.sort(-frac, stable=True).indices[:extra]
    base[order] += 1
    return base


def validation_split(
    y: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified seeded split of range(len(y)): (train positions, validation positions), sorted.

    Each class with n_c >= 2 examples gives max(1, round(fraction * n_c)) (at most n_c - 1) to
    validation; the draw depends only on the seed, so every round holds out the same examples.
    """
    y = y.detach().cpu()
    gen = round_generator(seed, 0, salt=31)
    val = []
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).squeeze(1)
        n_c = members.numel()
        if n_c < 2:
            continue
        m_c = min(n_c - 1, max(1, round(fraction * n_c)))
        val.append(members[torch.randperm(n_c, generator=gen)[:m_c]])
    val_idx = torch.cat(val).sort().values if val else torch.zeros(0, dtype=torch.int64)
    mask = torch.ones(y.numel(), dtype=torch.bool)
    mask[val_idx] = False
    return torch.nonzero(mask).squeeze(1), val_idx


@dataclass
class _GradMatchBase(Strategy):
    """Shared parameters; see the module docstring and docs/gradmatch.md."""

    lam: float = field(default=0.5, metadata={"help": "ridge penalty of the NN-OMP solve"})
    eps: float = field(default=1e-6, metadata={"help": "stop when the residual norm is below"})
    valid: bool = field(default=False, metadata={
        "help": "match a held-out share's mean gradient instead of the training set's"})
    valid_fraction: float = 0.1
    random_first: bool = field(default=False, metadata={
        "help": "the first round random (the model is untrained)"})
    memory_share: float = field(default=0.5, metadata={
        "help": "share of free device memory the gradient factors may take (else pinned CPU)"})
    check_every: int = 16
    picks_per_step: int | None = field(default=None, metadata={
        "help": "most atoms added per OMP step (unset: ceil(budget/16), pruned from a pool "
                "of 5x, fewer as the budget fills; 1: textbook one-pick NN-OMP)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"--lam must be a finite number >= 0, got {self.lam}")
        if not self.eps >= 0:
            raise ValueError(f"--eps must be >= 0, got {self.eps}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"--valid-fraction must be in (0, 1), got {self.valid_fraction}")
        if not 0.0 < self.memory_share <= 1.0:
            raise ValueError(f"--memory-share must be in (0, 1], got {self.memory_share}")
        if self.check_every < 1:
            raise ValueError(f"--check-every must be >= 1, got {self.check_every}")
        if self.picks_per_step is not None and self.picks_per_step < 1:
            raise ValueError(f"--picks-per-step must be >= 1, got {self.picks_per_step}")
        self.last_info: dict[str, Any] = {}

    def select(self, ctx: SelectionContext) -> Selection:
        data = ctx.dataset
        n = len(data)
        labels = data.labels()
        if self.valid:
            cand, val = validation_split(labels, self.valid_fraction, self.seed)
        else:
            cand, val = torch.arange(n), torch.zeros(0, dtype=torch.int64)
        k = min(budget(self.fraction, n), cand.numel())
        if self.random_first and ctx.epoch == 0:
            self.last_info = {"random_first": True}
            return self._random(ctx, cand, k)
        layer = final_linear(ctx.model)
        dist = ctx.dist or Dist.local(ctx.device)
        shape = Shape(n, labels, cand, k, layer.in_features, layer.out_features, ctx.batch_size,
                      dist.world)
        storage, group = self._placement(shape, ctx.device)
        mine = own_positions(n, dist)  # this rank's examples (all of them in one process)
        start = time.perf_counter()
        try:
            chunks = data.eval_batches(None if not dist.active else mine,
                                       chunk=selection_chunk(ctx.device, data.input_shape))
            factors = collect_factors(ctx.model, chunks, int(mine.numel()),
                                      class_slice=self._class_slice(), storage=storage,
                                      precision=ctx.precision)
        except FloatingPointError as err:
            raise DivergenceError(f"selection at epoch {ctx.epoch}: {err}") from None
        if ctx.device.type == "cuda":  # the forward runs asynchronously: time it, not its launch
            torch.cuda.synchronize(ctx.device)
        grad_seconds = time.perf_counter() - start
        device = ctx.device
        sent = dist.sent_bytes
        selection = self._choose(ctx, factors, labels.to(device), cand.to(device),
                                 val.to(device), k, group, dist)
        self.last_info.update(gradient_seconds=grad_seconds, factor_storage=str(storage),
                              classes_per_solve=group, sent_bytes=dist.sent_bytes - sent)
        return selection

    def _placement(self, shape: Shape, device: torch.device) -> tuple[torch.device, int]:
        """Where the gradient factors live and how many problems are solved at once.

        The factors and the work of all problems together on the device when they fit in
        `memory_share` of its free memory; else the factors in (pinned) host memory when the
        device is a GPU, and the per-class problems in groups of as many classes as fit.
        Raises GradientMemoryError, suggesting settings that fit, when nothing does."""
        factors = self._factor_bytes(shape)
        problems = self._problems(shape)
        free = memory.free_memory(device)
        if free is None:
            return device, problems
        room = self.memory_share * free
        host = torch.device("cpu")
        host_room = (self.memory_share * (memory.free_memory(host) or 0)
                     if device.type != "cpu" else 0.0)
        for group in sorted({problems, *_halvings(problems)}, reverse=True):
            work = self._work_bytes(shape, group)
            if factors + work <= room:
                return device, group
            if device.type != "cpu" and work <= room and factors <= host_room:
                return host, group
        check_memory(factors + self._work_bytes(shape, 1), device, self.memory_share,
                     f"{self.name} on {shape.n} examples",
                     [(option, alt._factor_bytes(shape) + alt._work_bytes(shape, 1))
                      for option, alt in self._alternatives()])
        return device, 1  # unreachable: check_memory raised

    def _problems(self, shape: Shape) -> int:
        """Number of independent OMP problems of a round."""
        return 1

    def _factor_bytes(self, shape: Shape) -> int:
        c = 1 if self._class_slice() else shape.classes
        return 4 * -(-shape.n // shape.world) * (c + shape.dim)

    def _work_bytes(self, shape: Shape, group: int) -> int:
        raise NotImplementedError

    def _solve(self, atoms: Any, budgets: torch.Tensor, max_budget: int | None = None
               ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Batched NN-OMP on `atoms` with int64 (B,) budgets, completed to the budgets.

        Returns (OMPResult, positions (B, k) int64, weights (B, k) float32) and records in
        last_info what the solver did: seconds, the pick mode (`pool` = each step's atoms
        pruned from a pool of `omp_pool` x picks_per_step top-correlated atoms in `omp_rounds`
        rounds, `top` = plain top-m, `one` = one atom per step), steps, residuals, fills.
        max_budget: the largest budget of the whole round (default: of these problems), which
        sets the atoms per step, so that problems solved in groups or on other ranks are solved
        exactly as all together."""
        start = time.perf_counter()
        if max_budget is None:
            max_budget = int(budgets.max()) if budgets.numel() else 0
        picks = self._picks(max_budget)
        pool = OMP_POOL if picks > 1 else 1.0
        result = nonneg_omp(atoms, budgets, lam=self.lam, eps=self.eps,
                            check_every=self.check_every, picks_per_step=picks, pool=pool,
                            rounds=OMP_ROUNDS, taper=OMP_TAPER, taper_from=max_budget)
        pos, weights, filled = complete_to_budget(result, budgets, atoms.counts)
        self.last_info = {
            "omp_seconds": time.perf_counter() - start,
            "omp_mode": "pool" if pool > 1 else "one",
            "picks_per_step": picks,
            "omp_pool": pool,
            "omp_rounds": OMP_ROUNDS if pool > 1 else 0,
            "omp_taper": OMP_TAPER if pool > 1 else 0.0,
            "omp_steps": int(result.objective.shape[1]) - 1,
            "residual": result.residual.cpu().tolist(),
            "filled": int(filled.sum()),
            "zero_weight_picks": int(((result.slots >= 0) & (result.weights <= 0)).sum()),
        }
        return result, pos, weights

    def _class_slice(self) -> bool:
        return False

    def _picks(self, budget: int) -> int:
        """Atoms per OMP step for the largest budget of a round (never more than the budget: a
        step adds at most that many, and the memory estimate grows with the picks)."""
        if self.picks_per_step is not None:
            return min(self.picks_per_step, max(1, budget))
        return auto_picks_per_step(budget)

    def _random(self, ctx: SelectionContext, cand: torch.Tensor, k: int) -> Selection:
        """The random first round, drawn from the candidates (never the validation split)."""
        raise NotImplementedError

    def _alternatives(self) -> list[tuple[str, _GradMatchBase]]:
        """Other settings to suggest when memory does not suffice: (CLI option, strategy)."""
        raise NotImplementedError

    def _choose(
        self, ctx: SelectionContext, factors: LastLayerFactors, y: torch.Tensor,
        cand: torch.Tensor, val: torch.Tensor, k: int, group: int, dist: Dist,
    ) -> Selection:
        """The round from this rank's factors (rows of `own_positions`): y (n,) labels, cand /
        val positions, all on the device; `group` problems are solved at once."""
        raise NotImplementedError


def _factor_sums(delta: torch.Tensor, emb: torch.Tensor, bias: bool) -> torch.Tensor:
    """float64 (B, c(1+D)): sums of the rows [delta | delta (x) e] over dim 1 of (B, m, .) factors
    (padding rows must have delta = 0)."""
    outer = torch.bmm(delta.transpose(1, 2).double(), emb.double()).flatten(1)
    return torch.cat([delta.double().sum(1), outer], 1) if bias else outer


@register_strategy
@dataclass
class GradMatch(_GradMatchBase):
    """Grad-Match per class: one NN-OMP per class (budgets `class_budgets`), batched.

    per_gradient: match only each class's own slice of the gradient (bias entry c and row c of
    dL/dW), the reference's PerClassPerGradient variant (1 + D floats per sample instead of
    C(1+D)).
    """

    name = "gradmatch"
    lam: float = 0.5
    per_gradient: bool = False

    def _class_slice(self) -> bool:
        return self.per_gradient

    def _random(self, ctx: SelectionContext, cand: torch.Tensor, k: int) -> Selection:
        # the draw of `Random` (same generator), restricted to the candidates
        gen = round_generator(self.seed, ctx.round_index, salt=1)
        indices = cand[torch.randperm(cand.numel(), generator=gen)[:k]].sort().values
        return Selection(indices, torch.ones(k), epoch=ctx.epoch)

    def _alternatives(self) -> list[tuple[str, _GradMatchBase]]:
        pb = GradMatchPB(fraction=self.fraction, seed=self.seed, valid=self.valid,
                         valid_fraction=self.valid_fraction)
        out: list[tuple[str, _GradMatchBase]] = [("--strategy gradmatchpb", pb)]
        if not self.per_gradient:
            out.append(("--per-gradient", dataclasses.replace(self, per_gradient=True)))
        return out

    def _problems(self, shape: Shape) -> int:
        return int((torch.bincount(shape.labels[shape.cand], minlength=shape.classes) > 0).sum())

    def _work_bytes(self, shape: Shape, group: int) -> int:
        c = 1 if self.per_gradient else shape.classes
        counts = torch.bincount(shape.labels[shape.cand], minlength=shape.classes)
        kmax = int(class_budgets(shape.k, counts).max()) if shape.k else 0
        cap = capacity(kmax, self._picks(kmax))
        width = int(counts.max()) if counts.numel() else 0
        padded = 4 * group * width * (3 * (c + shape.dim) + 2 * c)  # factors (3 copies), products
        row = 12 * (c + shape.dim + 1)  # a chosen atom's factor row, float64 and float32
        support = group * cap * (row + 8 * (2 * cap + 8))  # chosen rows, G, H, vectors
        return padded + support

    def _choose(
        self, ctx: SelectionContext, factors: LastLayerFactors, y: torch.Tensor,
        cand: torch.Tensor, val: torch.Tensor, k: int, group: int, dist: Dist,
    ) -> Selection:
        classes = int(y.max()) + 1
        table = class_budgets(k, torch.bincount(y[cand].cpu(), minlength=classes)).to(y.device)
        max_budget = int(table.max()) if table.numel() else 0
        rows_at = own_positions(int(y.numel()), dist).to(y.device)  # position of each row
        if dist.active:  # each class's rows travel to the rank that owns the class
            factors, rows_at = exchange_by_class(factors, y, rows_at, dist)
        # the problems of the classes held here, in local row numbers
        local_y = y[rows_at]
        local_cand = _local(rows_at, cand)
        groups, counts = _group_by_class(local_y, local_cand)
        indices, weights, infos = [], [], []
        if local_cand.numel():
            budgets = table[local_y[groups[:, 0]]]
            vgroups = vcounts = None
            local_val = _local(rows_at, val)
            if local_val.numel():
                vgroups, vcounts = _group_by_class(local_y, local_val,
                                                   classes=local_y[groups[:, 0]])
            for lo in range(0, groups.shape[0], group):
                rows = slice(lo, lo + group)
                delta, emb = _gathered(factors, groups[rows], y.device)
                target = _factor_sums(delta, emb, factors.bias)
                if vgroups is not None and vcounts is not None:
                    vd, ve = _gathered(factors, vgroups[rows], y.device)
                    scale = (counts[rows].double()
                             / vcounts[rows].clamp_min(1).double()).unsqueeze(1)
                    vt = _factor_sums(vd, ve, factors.bias) * scale
                    target = torch.where((vcounts[rows] > 0).unsqueeze(1), vt, target)
                atoms = LastLayerAtoms(delta, emb, counts[rows], target, factors.bias)
                _, pos, w = self._solve(atoms, budgets[rows], max_budget)
                infos.append(self.last_info)
                keep = pos >= 0
                indices.append(rows_at[groups[rows].gather(1, pos.clamp_min(0))[keep]].cpu())
                weights.append(w[keep].cpu())
        self.last_info = _merged(infos) if infos else {"omp_seconds": 0.0}
        chosen = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64)
        chosen_w = torch.cat(weights) if weights else torch.zeros(0)
        if dist.active:  # every rank gets every class's picks
            parts = dist.all_gather_object((chosen, chosen_w))
            chosen = torch.cat([c for c, _ in parts])
            chosen_w = torch.cat([w for _, w in parts])
        order = chosen.argsort()
        return Selection(chosen[order], chosen_w[order], epoch=ctx.epoch)


def own_positions(n: int, dist: Dist) -> torch.Tensor:
    """The training positions whose gradient factors this rank computes: every world-th one
    from its rank (all of them in one process)."""
    return torch.arange(dist.rank, n, dist.world)


def class_owner(labels: torch.Tensor, world: int) -> torch.Tensor:
    """int64 (C,) rank that solves each class's problem: classes in turn."""
    return torch.arange(int(labels.max()) + 1, device=labels.device) % world


def exchange_by_class(factors: LastLayerFactors, y: torch.Tensor, rows_at: torch.Tensor,
                      dist: Dist) -> tuple[LastLayerFactors, torch.Tensor]:
    """Send each factor row to the rank owning its class; return this rank's received rows,
    sorted by position, with their positions. Positions do not travel: the owner knows which
    of every rank's positions it receives (their labels are known everywhere)."""
    owner = class_owner(y, dist.world)
    c, d = int(factors.delta.shape[1]), int(factors.emb.shape[1])
    row_owner = owner[y[rows_at]]
    packed = torch.cat([factors.delta, factors.emb], 1)
    parts = [packed[(row_owner == o).to(packed.device)] for o in range(dist.world)]
    received = dist.gather_rows(parts, c + d)
    n = int(y.numel())
    sources = [torch.arange(r, n, dist.world, device=y.device) for r in range(dist.world)]
    positions = torch.cat([p[owner[y[p]] == dist.rank] for p in sources])
    order = positions.argsort()
    received = received[order.to(received.device)]
    return (LastLayerFactors(received[:, :c].contiguous(), received[:, c:].contiguous(),
                             factors.bias), positions[order])


def _local(rows_at: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Local row numbers of those `positions` that are among the sorted `rows_at`."""
    if rows_at.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=positions.device)
    at = torch.searchsorted(rows_at, positions).clamp_max(rows_at.numel() - 1)
    return at[rows_at[at] == positions]


def _gathered(factors: LastLayerFactors, groups: torch.Tensor, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """delta (B, n_max, c) and emb (B, n_max, D) of padded position rows (-1 = padding, zeroed)
    on `device`, read from the factors wherever they are stored."""
    at = groups.clamp_min(0).to(factors.delta.device)
    mask = (groups >= 0).unsqueeze(2)
    delta = factors.delta[at].to(device, non_blocking=True) * mask
    emb = factors.emb[at].to(device, non_blocking=True) * mask
    return delta, emb


def _merged(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """One round's OMP info from the infos of its groups of problems."""
    if len(infos) == 1:
        return dict(infos[0])
    out = dict(infos[0])
    for key in ("omp_seconds", "filled", "zero_weight_picks"):
        if key in out:
            out[key] = sum(i[key] for i in infos)
    if "residual" in out:
        out["residual"] = [r for i in infos for r in i["residual"]]
    if "omp_steps" in out:
        out["omp_steps"] = max(i["omp_steps"] for i in infos)
    return out


def _halvings(n: int) -> list[int]:
    """n // 2, n // 4, ..., 1."""
    out = []
    while n > 1:
        n //= 2
        out.append(n)
    return out


@dataclass
class Shape:
    """The sizes of a round: n examples, labels (n,) on the CPU, candidate positions, budget k,
    embedding width D, classes C, the trainer's batch size."""

    n: int
    labels: torch.Tensor
    cand: torch.Tensor
    k: int
    dim: int
    classes: int
    batch_size: int
    world: int = 1


def selection_chunk(device: torch.device, input_shape: tuple[int, ...]) -> int:
    """Examples per selection forward: CHUNK on GPUs. On CPUs a chunk whose inputs hold about
    2^17 floats, as a power of two in [128, CHUNK]: large chunks of large images only cost
    cache misses, small inputs gain from fewer, larger calls (measured eval forwards, one
    thread: cnn1d on MNIST-1D 1.4x faster at 1024 than at 128; smallcnn on 28x28 fastest at
    128, 1.3x slower at 256)."""
    if device.type == "cuda":
        return CHUNK
    per_example = max(1, math.prod(input_shape))
    return max(128, min(CHUNK, 1 << max(0, (2**17 // per_example).bit_length() - 1)))


def _group_by_class(
    y: torch.Tensor, members: torch.Tensor, classes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad `members` (increasing positions into y) into one row per class.

    Returns (int64 (B, n_max) positions, -1 padded, increasing within a row; int64 (B,) counts)
    for the classes present in y[members] (sorted), or for the given class ids."""
    labels = y[members]
    if classes is None:
        classes = torch.unique(labels)
    order = torch.argsort(labels, stable=True)
    labels, members = labels[order], members[order]
    starts = torch.searchsorted(labels, classes)
    counts = torch.searchsorted(labels, classes, right=True) - starts
    width = max(1, int(counts.max())) if counts.numel() else 1
    offset = torch.arange(width, device=y.device).unsqueeze(0)
    inside = offset < counts.unsqueeze(1)
    if members.numel() == 0:
        return torch.full(inside.shape, -1, dtype=torch.int64, device=y.device), counts
    at = (starts.unsqueeze(1) + offset).clamp_max(members.numel() - 1)
    return torch.where(inside, members[at], -1), counts


@register_strategy
@dataclass
class GradMatchPB(_GradMatchBase):
    """Grad-Match per batch: NN-OMP over the mean gradients of a fixed partition into batches of
    the trainer's batch size (`fixed_partition` of the candidate examples, seeded); picks
    ceil(k / batch_size) batches; Selection.batch_ids are the chosen batches' ids."""

    name = "gradmatchpb"
    lam: float = 0.0

    def _random(self, ctx: SelectionContext, cand: torch.Tensor, k: int) -> Selection:
        # the draw of `RandomPB` (same partition and generator), restricted to the candidates
        batches = [cand[b] for b in fixed_partition(cand.numel(), ctx.batch_size, self.seed)]
        m = whole_batches(k, len(batches), ctx.batch_size, cand.numel(), self.fraction,
                          self.name)
        gen = round_generator(self.seed, ctx.round_index, salt=2)
        chosen = torch.randperm(len(batches), generator=gen)[:m].sort().values
        indices = torch.cat([batches[b] for b in chosen.tolist()])
        return Selection(indices, torch.ones(indices.numel()), epoch=ctx.epoch, batch_ids=chosen)

    def _alternatives(self) -> list[tuple[str, _GradMatchBase]]:
        per_class = GradMatch(fraction=self.fraction, seed=self.seed, valid=self.valid,
                              valid_fraction=self.valid_fraction, per_gradient=True)
        return [("--strategy gradmatch --per-gradient", per_class)]

    def _work_bytes(self, shape: Shape, group: int) -> int:
        m = math.ceil(shape.cand.numel() / shape.batch_size)
        kb = min(m, math.ceil(shape.k / shape.batch_size))
        cap = min(m, capacity(kb, self._picks(kb)))
        d = shape.classes * (shape.dim + 1)
        return 4 * m * d + 8 * cap * (d + 2 * cap + 8)

    def _choose(
        self, ctx: SelectionContext, factors: LastLayerFactors, y: torch.Tensor,
        cand: torch.Tensor, val: torch.Tensor, k: int, group: int, dist: Dist,
    ) -> Selection:
        store = factors.delta.device
        batches = [cand[b.to(cand.device)] for b in
                   fixed_partition(cand.numel(), ctx.batch_size, self.seed)]
        m = len(batches)
        sizes = torch.tensor([b.numel() for b in batches])
        # every rank sums the rows of its own members; the sums add up over ranks
        mine = [_own_rows(b, dist).to(store) for b in batches]
        rows = factors.batch_mean_rows(mine, mean=False).to(cand.device)
        if val.numel():
            vrows = _own_rows(val, dist).to(store)
            vd, ve = factors.delta[vrows].unsqueeze(0), factors.emb[vrows].unsqueeze(0)
            vsum = _factor_sums(vd, ve, factors.bias)[0].to(cand.device)
        if dist.active:
            rows = dist.all_reduce(rows)
            if val.numel():
                vsum = dist.all_reduce(vsum)
        rows = rows / sizes.clamp_min(1).to(rows).view(-1, 1)
        target = vsum * (m / val.numel()) if val.numel() else rows.double().sum(0)
        kb = whole_batches(k, m, ctx.batch_size, cand.numel(), self.fraction, self.name)
        result = None
        if dist.main:  # the batch atoms are few: one rank solves, every rank gets the answer
            atoms = DenseAtoms(rows, target)
            _, pos, weights = self._solve(atoms, torch.tensor([kb], device=rows.device))
            keep = pos[0] >= 0
            result = (pos[0][keep].cpu(), weights[0][keep].cpu(), self.last_info)
        ids, batch_w, info = dist.broadcast_object(result)
        self.last_info = dict(info)
        order = ids.argsort()
        ids, batch_w = ids[order], batch_w[order]
        chosen = [batches[i] for i in ids.tolist()]
        indices = torch.cat(chosen).cpu()
        per_sample = torch.repeat_interleave(batch_w, torch.tensor([b.numel() for b in chosen]))
        return Selection(indices, per_sample, epoch=ctx.epoch, batch_ids=ids)


def _own_rows(positions: torch.Tensor, dist: Dist) -> torch.Tensor:
    """This rank's factor rows of those `positions` it holds (`own_positions`: p = rank + world
    * row)."""
    mine = positions[positions % dist.world == dist.rank]
    return (mine - dist.rank) // dist.world
