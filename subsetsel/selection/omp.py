"""Batched non-negative orthogonal matching pursuit (NN-OMP) with a ridge term, in pure torch.

Problem p of a batch: atoms a_1..a_n (the rows of A_p, n x d), a target b_p (d,), a budget k_p.

    minimise  f(w) = ||b - A_S^T w||^2 + lam * ||w||^2   over w >= 0 on a support S

with at most k_p atoms of positive weight. Greedy step: with r = b - A_S^T w the residual, pick
the not-yet-chosen atom with the largest positive correlation <a_i, r> (for w_i = 0 this is minus
half the gradient of f in w_i, so the pick is the steepest KKT violation over all atoms), add it
to S, and re-solve the non-negative ridge problem on S. Chosen atoms are masked: never re-picked.
With `picks_per_step` m > 1 a step adds the m unchosen atoms of largest positive correlation
(generalised OMP; fewer when the budget has less room), so the per-step costs (correlations of
all n atoms, a solve) are paid about k/m times instead of k times. Top-m correlation is a poor
block: the m atoms most correlated with r often explain the same direction, and the fit ends
4 % to 2x above one pick per step. With `pool` p > 1 (the Grad-Match default) a step instead
takes the ceil(p m) unchosen atoms of largest correlation and prunes them to m by backward
elimination of their joint least-squares fit to r, projected orthogonally to the current
support (see `_pool_picks`). With `taper` the blocks shrink as the budget fills, down to
single picks at the end (the last atoms are chosen against a residual that is almost final, where
a block errs most). The Grad-Match default, blocks of ceil(k/16) pruned from a pool of 5x and
tapered by 1/4, ends within 5 % of the residual of one pick per step on every problem of
`scripts/bench_omp.py` (docs/gradmatch.md).

The solve is a Lawson-Hanson active-set method restricted to S and warm-started from the previous
solution. It keeps, for the passive set P (the atoms of S with w > 0), the inverse of the ridge
Gram matrix G_PP = A_P A_P^T + lam*I, updated in O(|S|^2) per change: block bordering when new
atoms enter P, a rank-one Schur-complement downdate when one leaves it. Unlike a Cholesky
factor, this supports removing any atom with one vectorised rank-one update (no sequential Givens
sweep), so batched problems stay in lock-step on a GPU. The small matrices are float64 (each
exact solve also applies one step of iterative refinement against G); the correlations over all
n atoms (the O(n d) part) are float32.

No host synchronisation happens inside a single-pick step on CUDA: every problem runs the same
fixed sequence of tensor ops, stopped problems are masked. (A step of several picks without a
ridge reads one flag, see `_NNLS.enter_block`.) Each step does one Lawson-Hanson iteration
(a removal if the new unconstrained solution is infeasible). Whenever the number of used support
slots passes a multiple of `check_every`, and at the end, an exact Lawson-Hanson loop (with host
checks and the KKT re-entry test of zero-weight chosen atoms, including atoms that failed the
entry test of a block) runs to convergence, so the returned weights are the exact non-negative
ridge solution on the returned support (checked against scipy's nnls in the tests). On the CPU,
where reading a flag costs nothing, that exact loop also runs after every step that left
Lawson-Hanson unconverged, so every pick uses the exact solution on the current support (with
one pick per step: the same picks as re-solving from scratch each step), and the loop stops as
soon as no problem takes an atom; on CUDA the steps after such a step, up to the next check
point, pick with a feasible but not yet optimal w, and stopped problems run on to that point.

Budget: a chosen atom whose weight the constraint w >= 0 sets to 0 does not count; OMP continues
until k_p atoms have positive weight, using at most `capacity(k_p, m)` slots. If zeroed atoms
re-enter later and more than k_p end positive, the smallest-weight ones are dropped from the
support (and re-solved without them). Stopping early: when ||r|| <= eps * ||b||, or when no
unchosen atom has a correlation above tol * max_i ||a_i|| * ||r|| (the non-negative optimum over
all atoms is reached: more atoms would get weight 0), or when the slots run out. Then fewer
than k_p atoms have positive weight; `complete_to_budget` fills the rest (see there).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

SIGMA_MIN = 1e-10  # an atom enters P only if its Schur complement exceeds this share of G_ii
BLOCK_SIGMA_MIN = 1e-8  # the same test for the atoms of a block (their pivots carry more error)
POOL_SIGMA_MIN = 1e-5  # a pool atom joins the pool's fit only if S_ii exceeds this share of G_ii
POOL_COPY = 0.99  # pool atoms with a larger cosine to a better-correlated one count as copies
RIDGE_MARGIN = 1e-6  # lam > RIDGE_MARGIN * max G_ii: every block atom passes (see `_nonneg_omp`)
CPU_THREADS = 1  # torch threads while solving on the CPU (see `_cpu_threads`)
SPARE, SPARE_MIN = 0.25, 8  # extra slots beyond the budget for atoms that end at weight 0


class Atoms(Protocol):
    """The dictionaries and targets of a batch of B problems (n = padded number of atoms).

    Implementations hold the atoms in any form (dense rows, or factors as in
    `subsetsel.selection.gradients.LastLayerAtoms`) and a support buffer of chosen atoms.
    """

    batch: int  # B
    size: int  # n, atoms per problem including padding
    counts: torch.Tensor  # int64 (B,): real atoms per problem; rows >= counts[p] are padding
    device: torch.device

    def target_sq_norm(self) -> torch.Tensor:
        """float64 (B,): ||b_p||^2."""
        ...

    def sq_norms(self) -> torch.Tensor:
        """float32 (B, n): ||a_i||^2 (0 on padding)."""
        ...

    def start(self, capacity: int) -> None:
        """Allocate the support buffer for `capacity` chosen atoms per problem."""
        ...

    def add(self, t: int, j: torch.Tensor, take: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store atoms j[p, i] (int64 (B, m)) in support slots t + i where take[p, i] (bool
        (B, m)), else zero atoms. Returns (g, h): float64 (B, m, t+m) inner products of the new
        slots with slots 0..t+m-1, and float64 (B, m) <a_slot, b>."""
        ...

    def correlations(self, t: int, w: torch.Tensor) -> torch.Tensor:
        """float32 (B, n): <a_i, b - sum_{s<t} w[:, s] a_{slot s}> for weights w float64 (B, t)."""
        ...

    # Optional: `gram(t, j) -> float64 (B, L, t + L)`, the inner products of atoms j (int64
    # (B, L)) with support slots 0..t-1 and with each other, without storing anything; it may be
    # computed in float32 (it only ranks a step's candidate pool). Without it the pool is
    # scored through `add` into slots t..t+L-1, which `start` then must have room for.


class DenseAtoms:
    """Atoms as dense rows: A float32 (B, n, d) (or (n, d)), targets b (B, d) (or (d,)).

    counts (B,) marks how many rows of each problem are real; padding rows must be zero.
    The support buffer keeps chosen rows in float64 (capacity x d per problem) so residuals and
    Gram entries are exact for the given float32 data, and a float32 copy for `gram`.
    """

    def __init__(
        self, a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor | None = None
    ) -> None:
        if a.dim() == 2:
            a, b = a.unsqueeze(0), b.reshape(1, -1)
        if a.dim() != 3 or b.dim() != 2 or b.shape != (a.shape[0], a.shape[2]):
            raise ValueError(
                f"need A (B, n, d) and b (B, d); got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        self.a = a.to(torch.float32)
        self.b = b.to(device=a.device, dtype=torch.float64)
        self.batch, self.size, self.dim = (int(s) for s in a.shape)
        self.device = a.device
        if counts is None:
            counts = torch.full((self.batch,), self.size, dtype=torch.int64)
        self.counts = torch.as_tensor(counts, dtype=torch.int64, device=a.device)
        self._rows = torch.arange(self.batch, device=a.device)
        self._support = self._support32 = torch.empty(0)

    def target_sq_norm(self) -> torch.Tensor:
        return (self.b * self.b).sum(1)

    def sq_norms(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.a, dim=2).square()

    def start(self, capacity: int) -> None:
        self._support = torch.zeros(
            self.batch, capacity, self.dim, dtype=torch.float64, device=self.device
        )
        self._support32 = torch.zeros(
            self.batch, capacity, self.dim, dtype=torch.float32, device=self.device
        )

    def add(self, t: int, j: torch.Tensor, take: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = int(j.shape[1])
        new32 = self.a[self._rows.unsqueeze(1), j] * take.unsqueeze(2)
        new = new32.to(torch.float64)
        self._support[:, t : t + m] = new
        self._support32[:, t : t + m] = new32
        g = torch.bmm(new, self._support[:, : t + m].transpose(1, 2))
        return g, torch.bmm(new, self.b.unsqueeze(2)).squeeze(2)

    def gram(self, t: int, j: torch.Tensor) -> torch.Tensor:
        """float64 (B, L, t + L) from float32 products: atoms j (B, L) against support slots
        0..t-1 and against each other (the optional `Atoms.gram`; ranks candidates only)."""
        new = self.a[self._rows.unsqueeze(1), j]  # (B, L, d)
        g = torch.cat([torch.bmm(new, self._support32[:, :t].transpose(1, 2)),
                       torch.bmm(new, new.transpose(1, 2))], 2)
        return g.to(torch.float64)

    def correlations(self, t: int, w: torch.Tensor) -> torch.Tensor:
        r = self.b - torch.bmm(w.unsqueeze(1), self._support[:, :t]).squeeze(1)
        return torch.bmm(self.a, r.to(torch.float32).unsqueeze(2)).squeeze(2)


@dataclass
class OMPResult:
    """Output of `nonneg_omp` for B problems; T = slots used (atoms chosen by the problem that
    chose most, plus the unused slots of its blocks), U = steps taken by the longest problem.

    slots: int64 (B, T) the support: chosen atom per slot in pick order, -1 for unused slots
      (also inside a step that added fewer than picks_per_step atoms) and for atoms dropped to
      keep the budget.
    weights: float64 (B, T) non-negative weight per slot (0 for unused slots; a chosen atom can
      also end with weight 0 when the non-negativity constraint is active for it). At most
      budget_p slots of problem p have positive weight.
    objective: float64 (B, U+1) f(w) before step u (column u) and at the end (column = steps
      taken by that problem); NaN after a problem stopped.
    residual: float64 (B,) final relative residual ||b - A_S^T w|| / ||b|| (0 when b = 0).
    correlations: float32 (B, n) final <a_i, r> for every atom (padding: -inf).
    steps: int64 (B,) atoms in the support (positive or zero weight).
    """

    slots: torch.Tensor
    weights: torch.Tensor
    objective: torch.Tensor
    residual: torch.Tensor
    correlations: torch.Tensor
    steps: torch.Tensor

    def dense_weights(self, n: int) -> torch.Tensor:
        """float64 (B, n): each atom's weight (0 for atoms not chosen)."""
        out = torch.zeros(self.slots.shape[0], n + 1, dtype=torch.float64, device=self.slots.device)
        out.scatter_(1, torch.where(self.slots < 0, n, self.slots), self.weights)
        return out[:, :n]


def capacity(budget: int, picks_per_step: int = 1) -> int:
    """Most support slots for a budget: budget + max(8, ceil(budget / 4)) + 2 (m - 1) with m the
    picks per step (0 for budget 0). The spare slots replace chosen atoms that end at weight 0;
    the 2 (m - 1) cover empty slots of steps that add fewer than m atoms."""
    if budget <= 0:
        return 0
    return budget + max(SPARE_MIN, math.ceil(SPARE * budget)) + 2 * (picks_per_step - 1)


@contextlib.contextmanager
def _cpu_threads(device: torch.device) -> Iterator[None]:
    """Run the solver single-threaded on the CPU, restoring the thread count after.

    The loop is thousands of small tensor ops; with more intra-op threads than free cores they
    spin-wait on each other. Measured on the 2-core dev VM under load (per-class default round,
    10 problems x 2000 atoms, budget 200): 1.6-1.9 s with 1 thread, 12-55 s with 2 threads.
    """
    old = torch.get_num_threads()
    change = device.type == "cpu" and old != CPU_THREADS
    if change:
        torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(old)


def _maybe(mask: torch.Tensor) -> bool:
    """False only when `mask` is known to be all False without a device synchronisation (on the
    CPU reading it is free); on CUDA always True, so masked updates run unconditionally there.
    Skipping a masked update that would change nothing gives identical results."""
    return mask.device.type != "cpu" or bool(mask.any())


def _matvec(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """m v for a batch of symmetric matrices m (B, s, s) and vectors v (B, s), computed as v^T m
    (the faster layout for batched matrix-vector products)."""
    return torch.bmm(v.unsqueeze(1), m).squeeze(1)


def _border(inv: torch.Tensor, g: torch.Tensor, diag: torch.Tensor, scale: torch.Tensor,
            do: torch.Tensor, threshold: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bordering of a batch of symmetric inverses inv (B, s, s) by one new slot: g (B, s) its
    column (masked to the slots inv covers), diag (B,) its diagonal entry. Where do and the
    Schur complement sigma = diag - g.u (u = inv g) exceeds threshold * scale, adds u u^T / sigma
    to inv in place. Returns (ok, coef = 1/sigma (0 where not ok), u, v = -u coef, the slot's
    new off-diagonal row/column of the inverse)."""
    u = _matvec(inv, g)
    sigma = diag - (g * u).sum(1)
    ok = do & (sigma > threshold * scale)
    coef = torch.where(ok, 1.0 / torch.where(ok, sigma, 1.0), 0.0)
    v = u * -coef.unsqueeze(1)
    inv.baddbmm_(u.unsqueeze(2), v.unsqueeze(1), alpha=-1.0)
    return ok, coef, u, v


class _NNLS:
    """Lawson-Hanson state on the support slots of B problems (all float64, capacity k).

    G: ridge Gram matrix of the slots (identity on unused slots), h: <a_slot, b>,
    H: inverse of G restricted to the passive set P (zero outside P), z: H h (the unconstrained
    solution on P), w: the current feasible iterate, live: slot holds a chosen atom, blocked: a
    chosen atom that failed the entry test (numerically a combination of passive atoms); it is
    re-tested at the next exact solve. dropped: removed by `_trim` for the budget, never again.
    w_is_z: True when w == z is known on the host (then f(w) = ||b||^2 - h.w).
    """

    def __init__(self, batch: int, capacity: int, device: torch.device) -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self.rows = torch.arange(batch, device=device)
        self.G = torch.eye(capacity, **f64).repeat(batch, 1, 1)
        self.H = torch.zeros(batch, capacity, capacity, **f64)
        self.h = torch.zeros(batch, capacity, **f64)
        self.z = torch.zeros(batch, capacity, **f64)
        self.w = torch.zeros(batch, capacity, **f64)
        self.passive = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.live = torch.zeros_like(self.passive)
        self.blocked = torch.zeros_like(self.passive)
        self.dropped = torch.zeros_like(self.passive)
        self.w_is_z = True

    @staticmethod
    def _border_small(schur: torch.Tensor, gnn: torch.Tensor, take: torch.Tensor,
                      threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(X, ok): the inverse of S (B, m, m) restricted to the slots whose Schur complement
        exceeds threshold * G_ii, built one slot at a time (zero rows and columns for slots that
        fail or are not taken)."""
        m = int(take.shape[1])
        x = torch.zeros_like(schur)
        ok = torch.zeros_like(take)
        for i in range(m):
            ok[:, i], coef, _, v = _border(x[:, :i, :i], schur[:, :i, i], schur[:, i, i],
                                           gnn[:, i, i], take[:, i], threshold)
            x[:, :i, i] = v
            x[:, i, :i] = v
            x[:, i, i] = coef
        return x, ok

    def enter_block(self, t: int, take: torch.Tensor, always_ok: bool) -> None:
        """Move the new slots t..t+m-1 (none in P yet) into P where take (B, m) holds.

        Block bordering: with U = H G_PN and the Schur complement S = G_NN - G_PN^T U, the new
        inverse is [[H + U X U^T, -U X], [-X U^T, X]] with X the inverse of S on the entering
        slots. A slot enters only if its Schur complement given P and the slots before it
        exceeds SIGMA_MIN * G_ii for a single slot, BLOCK_SIGMA_MIN * G_ii in a block of m > 1
        (the pivots of later block slots are computed through the earlier ones and carry their
        rounding error); a slot that fails is blocked until the next exact solve re-tests it on
        its own. X comes from one batched Cholesky factorisation of S when every slot passes:
        known beforehand when always_ok (the ridge makes S >= lam I, and lam exceeds
        RIDGE_MARGIN * G_ii for every atom), else, for m > 1, read from the factor's diagonal:
        one host read per step (a device synchronisation on CUDA, instead of m sequential
        bordering steps of ~12 small kernels each). Otherwise (a single slot without the
        guarantee, or a failing slot) X is built by bordering on the small m x m matrix S one slot
        at a time."""
        m = int(take.shape[1])
        s = t + m
        gpn = self.G[:, :t, t:s] * self.passive[:, :t].unsqueeze(2)  # (B, t, m)
        gnn = self.G[:, t:s, t:s]
        u = torch.bmm(self.H[:, :t, :t], gpn)
        schur = gnn - torch.bmm(gpn.transpose(1, 2), u)
        threshold = SIGMA_MIN if m == 1 else BLOCK_SIGMA_MIN
        x = None
        if always_ok or m > 1:
            # the squared diagonal of S's Cholesky factor holds the one-by-one Schur complements;
            # slots not taken are identity rows of S (zero atoms) and are masked out of X
            factor, info = torch.linalg.cholesky_ex(schur)
            if always_ok or bool(((info == 0) & (
                    torch.diagonal(factor, dim1=1, dim2=2) ** 2
                    > threshold * torch.diagonal(gnn, dim1=1, dim2=2)).all(1)).all()):
                x = torch.cholesky_inverse(factor) * (take.unsqueeze(2) & take.unsqueeze(1))
                ok = take
        if x is None:  # a slot may fail the entry test: skip it, as entering one by one would
            x, ok = self._border_small(schur, gnn, take, threshold)
        zn = _matvec(x, self.h[:, t:s] - torch.bmm(self.z[:, :t].unsqueeze(1), gpn).squeeze(1))
        self.z[:, :t] -= torch.bmm(u, zn.unsqueeze(2)).squeeze(2)
        self.z[:, t:s] = zn
        ux = torch.bmm(u, x)  # (B, t, m)
        self.H[:, :t, :t].baddbmm_(ux, u.transpose(1, 2))
        self.H[:, :t, t:s] = -ux
        self.H[:, t:s, :t] = -ux.transpose(1, 2)
        self.H[:, t:s, t:s] = x
        self.passive[:, t:s] = ok
        self.blocked[:, t:s] |= take & ~ok

    def enter(self, s: int, i: torch.Tensor, do: torch.Tensor) -> None:
        """Move slot i[p] (not in P) into P where do[p] (bordering update of H and z)."""
        rows = self.rows
        gii = self.G[rows, i, i]
        gi = self.G[rows, :s, i] * self.passive[:, :s]
        ok, coef, u, v = _border(self.H[:, :s, :s], gi, gii, gii, do, SIGMA_MIN)
        zi = coef * (self.h[rows, i] - (gi * self.z[:, :s]).sum(1))  # its new z entry
        self.z[:, :s] -= u * zi.unsqueeze(1)
        v[rows, i] = coef
        keep = ~ok.unsqueeze(1)  # rows that do not enter keep their (possibly passive) slot i
        self.H[rows, :s, i] = torch.where(keep, self.H[rows, :s, i], v)
        self.H[rows, i, :s] = torch.where(keep, self.H[rows, i, :s], v)
        self.z[rows, i] = torch.where(ok, zi, self.z[rows, i])
        self.passive[rows, i] |= ok
        self.blocked[rows, i] |= do & ~ok

    def leave(self, s: int, j: torch.Tensor, do: torch.Tensor) -> None:
        """Move slot j[p] out of P where do[p]: H -= H[:, j] H[j, :] / H[j, j], z likewise."""
        rows, H = self.rows, self.H[:, :s, :s]
        hj = self.H[rows, :s, j]
        hjj = self.H[rows, j, j]
        coef = torch.where(do & (hjj > 0), 1.0 / torch.where(hjj > 0, hjj, 1.0), 0.0)
        self.z[:, :s] -= hj * (self.z[rows, j] * coef).unsqueeze(1)
        H.baddbmm_(hj.unsqueeze(2), (hj * coef.unsqueeze(1)).unsqueeze(1), alpha=-1.0)
        keep = ~do.unsqueeze(1)
        self.H[rows, :s, j] = torch.where(keep, self.H[rows, :s, j], 0.0)
        self.H[rows, j, :s] = torch.where(keep, self.H[rows, j, :s], 0.0)
        self.z[rows, j] = torch.where(do, 0.0, self.z[rows, j])
        self.passive[rows, j] &= ~do

    def step(self, s: int) -> torch.Tensor:
        """One Lawson-Hanson move: w <- z where z is feasible on P; elsewhere step from w towards
        z until the first passive weight reaches 0 and drop that slot from P. Returns the
        infeasible mask (B,)."""
        z, w, passive = self.z[:, :s], self.w[:, :s], self.passive[:, :s]
        neg = passive & (z <= 0)
        infeasible = neg.any(1)
        if not _maybe(infeasible):
            self.w[:, :s] = z
            self.w_is_z = True
            return infeasible
        ratio = torch.where(neg, w / (w - z).clamp_min(1e-300), math.inf)
        alpha, first = ratio.min(1)
        alpha = torch.where(infeasible, alpha.clamp(0.0, 1.0), 1.0).unsqueeze(1)
        new = (w + alpha * (z - w)).clamp_min(0.0) * passive
        new[self.rows, first] = torch.where(infeasible, 0.0, new[self.rows, first])
        self.w[:, :s] = new
        self.w_is_z = False
        self.leave(s, first, infeasible)
        return infeasible

    def unsettled(self, s: int, infeasible: torch.Tensor, bb: torch.Tensor, lam: float,
                  thr: torch.Tensor) -> bool:
        """On the CPU (reading flags is free): whether the last step left Lawson-Hanson
        unconverged: a removal happened, or a zero-weight chosen atom violates its KKT
        condition. On CUDA: False, the exact solve waits for the next check point."""
        if infeasible.device.type != "cpu":
            return False
        if bool(infeasible.any()):
            return True
        candidate = self._candidates(s)
        if not bool(candidate.any()):
            return False
        return bool(self._entering(s, bb, lam, thr, candidate)[0].any())

    def _entering(self, s: int, bb: torch.Tensor, lam: float, thr: torch.Tensor,
                  candidate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask (B,), slot (B,)): the candidate slot with the largest KKT violation
        q_i = <a_i, r> - lam w_i, where it exceeds thr[p] * ||r||."""
        q = self.gradient(s)
        w = self.w[:, :s]
        rsq = (bb - (w * (self.h[:, :s] + q)).sum(1) - lam * (w * w).sum(1)).clamp_min(0.0)
        viol, i = torch.where(candidate, q, -math.inf).max(1)
        return viol > thr * rsq.sqrt(), i

    def gradient(self, s: int) -> torch.Tensor:
        """q = h - G w (B, s): minus half the gradient of f; q_i = <a_i, r> - lam w_i."""
        return self.h[:, :s] - _matvec(self.G[:, :s, :s], self.w[:, :s])

    def objective(self, s: int, bb: torch.Tensor) -> torch.Tensor:
        """f(w) = ||b||^2 - 2 h.w + w.G.w (B,); = ||b||^2 - h.w when w solves G_PP w = h_P."""
        h, w = self.h[:, :s], self.w[:, :s]
        if self.w_is_z:
            return bb - (h * w).sum(1)
        return bb - (w * (h + h - _matvec(self.G[:, :s, :s], w))).sum(1)

    def refine(self, s: int) -> None:
        """Recompute z = H h with one step of iterative refinement against G (drift control)."""
        H, h, passive = self.H[:, :s, :s], self.h[:, :s], self.passive[:, :s]
        z = _matvec(H, h)
        rho = (h - _matvec(self.G[:, :s, :s], z)) * passive
        self.z[:, :s] = (z + _matvec(H, rho)) * passive

    def solve(self, s: int, bb: torch.Tensor, lam: float, thr: torch.Tensor) -> None:
        """Run Lawson-Hanson to convergence on the first s slots (host-checked loop).

        z is first recomputed from H with iterative refinement (drift control); a zero-weight
        chosen atom re-enters P when its KKT violation q_i = <a_i, r> exceeds thr[p] * ||r||.
        A problem whose iteration changed nothing has converged; once at most half of the
        problems still iterate, they are copied into a smaller state (and back at the end), so
        the O(s^2) updates touch only the problems that need them."""
        self.refine(s)
        self.blocked[:, :s] = False  # re-test atoms that failed an entry test, one at a time
        state, members = self, self.rows
        for _ in range(3 * s + 10):
            infeasible = state.step(s)
            candidate = state._candidates(s)
            violated, i = state._entering(s, bb[members], lam, thr[members], candidate)
            enter = ~infeasible & violated
            busy = infeasible | enter
            if not bool(busy.any()):
                break
            if _maybe(enter):
                state.enter(s, i, enter)
            if 2 * int(busy.sum()) <= len(members):
                if state is not self:
                    self._store(members, state, s)
                members = members[busy]
                state = self._subset(members, s)
        else:
            warnings.warn("NN-OMP: Lawson-Hanson did not converge; weights are feasible but may "
                          "be slightly sub-optimal", RuntimeWarning, stacklevel=3)
        if state is not self:
            self._store(members, state, s)
            self.w_is_z = False

    def _candidates(self, s: int) -> torch.Tensor:
        """(B, s): chosen atoms outside P that may enter it (not blocked, not dropped)."""
        return (self.live[:, :s] & ~self.passive[:, :s] & ~self.blocked[:, :s]
                & ~self.dropped[:, :s])

    def _subset(self, members: torch.Tensor, s: int) -> _NNLS:
        """A copy of the problems `members` (int64 (m,)), first s slots only."""
        sub = object.__new__(_NNLS)
        for name in _SQUARE:
            setattr(sub, name, getattr(self, name)[members, :s, :s])
        for name in _VECTORS:
            setattr(sub, name, getattr(self, name)[members, :s])
        sub.rows = torch.arange(len(members), device=members.device)
        sub.w_is_z = self.w_is_z
        return sub

    def _store(self, members: torch.Tensor, sub: _NNLS, s: int) -> None:
        """Write the solver state of a `_subset` back (G, h and live are never changed)."""
        self.H[members, :s, :s] = sub.H
        for name in ("z", "w", "passive", "blocked"):
            getattr(self, name)[members, :s] = getattr(sub, name)


_SQUARE = ("G", "H")
_VECTORS = ("h", "z", "w", "passive", "live", "blocked", "dropped")


def nonneg_omp(
    atoms: Atoms,
    budgets: torch.Tensor | int,
    *,
    lam: float = 0.0,
    eps: float = 1e-6,
    tol: float = 1e-5,
    check_every: int = 16,
    picks_per_step: int = 1,
    pool: float = 1.0,
    rounds: int = 8,
    taper: float = 0.0,
    taper_from: int | None = None,
) -> OMPResult:
    """Solve B non-negative ridge OMP problems together (see the module docstring).

    budgets: int or int64 (B,) atoms to choose per problem (clamped to the problem's atom count).
    lam: ridge weight lambda >= 0. eps: relative residual tolerance ||r|| <= eps ||b||.
    tol: relative threshold for a positive correlation, in units of max_i ||a_i|| * ||r||.
    check_every: support slots (chosen atoms, and the empty slots of steps that add fewer than
      picks_per_step atoms) between host-synchronised exact Lawson-Hanson solves (>= 1; 1 makes
      every pick use the exact non-negative solution on the current support).
    picks_per_step: atoms added per step (>= 1; 1 is textbook OMP).
    pool: with picks_per_step m > 1, each step's m atoms are pruned from the ceil(pool * m)
      unchosen atoms of largest correlation (>= 1; 1: the top m themselves; see `_pool_picks`).
    rounds: backward-elimination rounds of that pruning (>= 1).
    taper: 0 <= taper <= 1; with taper > 0 a step adds at most ceil(taper * (K - t)) atoms (at
      least 1), t the slots used: full blocks early, fewer atoms per step as the budget fills,
      single picks at the end (0: blocks of picks_per_step throughout).
    taper_from: K (default: the largest of budgets). When one round's problems are solved in
      parts (groups, ranks), give every part the round's largest budget, as for picks_per_step,
      so that each part takes the steps it would take in one batch.
    """
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if picks_per_step < 1:
        raise ValueError(f"picks_per_step must be >= 1, got {picks_per_step}")
    if not pool >= 1.0 or not math.isfinite(pool):
        raise ValueError(f"pool must be a finite number >= 1, got {pool}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 0.0 <= taper <= 1.0:
        raise ValueError(f"taper must be a number in [0, 1], got {taper}")
    with _cpu_threads(atoms.device), torch.no_grad():
        return _nonneg_omp(atoms, budgets, lam, eps, tol, check_every, picks_per_step, pool,
                           rounds, taper, taper_from)


def _nonneg_omp(
    atoms: Atoms, budgets: torch.Tensor | int, lam: float, eps: float, tol: float,
    check_every: int, picks_per_step: int, pool: float, rounds: int, taper: float,
    taper_from: int | None,
) -> OMPResult:
    device, nb, n = atoms.device, atoms.batch, atoms.size
    counts = atoms.counts.to(device)
    budgets = torch.as_tensor(budgets, dtype=torch.int64, device=device).expand(nb)
    budgets = torch.minimum(budgets.clamp_min(0), counts)
    k = int(budgets.max()) if nb else 0
    cap = min(n, capacity(k, picks_per_step))
    rows = torch.arange(nb, device=device)
    size = min(n, math.ceil(pool * picks_per_step)) if picks_per_step > 1 else 1
    span = k if taper_from is None else taper_from
    atoms.start(max(cap, 1) + size)
    state = _NNLS(nb, max(cap, 1), device)
    bb = atoms.target_sq_norm().to(torch.float64)
    amax = atoms.sq_norms().max(1).values.to(torch.float64).sqrt() if n else bb * 0
    thr = tol * amax
    # with a ridge every Schur complement is >= lam in exact arithmetic; with a margin of
    # RIDGE_MARGIN of the largest G_ii (condition number <= 1e6, so float64 keeps it) no atom
    # can fail the entry test (read once, before the loop)
    always_ok = nb > 0 and n > 0 and lam > RIDGE_MARGIN * (float(amax.max()) ** 2 + lam)
    chosen = torch.arange(n, device=device).unsqueeze(0) >= counts.unsqueeze(1)  # padding
    slots = torch.full((nb, max(cap, 1)), -1, dtype=torch.int64, device=device)
    objective = torch.full((nb, cap + 1), math.nan, dtype=torch.float64, device=device)
    active = (budgets > 0) & (bb > 0)
    taken = torch.zeros_like(budgets)  # OMP steps in which each problem took atoms
    t = step = 0
    solved = True  # the weights are the exact solution on the current support
    while t < cap:
        w = state.w[:, :t]
        corr = atoms.correlations(t, w).masked_fill(chosen, -math.inf)
        f = state.objective(t, bb)
        rsq = (f - lam * (w * w).sum(1)).clamp_min(0.0)
        objective[:, step] = torch.where(active, f, math.nan)
        room = budgets - (state.passive[:, :t] & (w > 0)).sum(1)
        m = min(picks_per_step, cap - t)
        if taper > 0:  # blocks shrink as the budget fills: the last picks are single atoms
            m = min(m, max(1, math.ceil(taper * (span - t))))
        go = active & (rsq > eps * eps * bb)
        msize = min(n, math.ceil(pool * m))
        if m > 1 and msize > m:
            take, j = _pool_picks(atoms, state, corr, t, m, msize, room, thr * rsq.sqrt(), go,
                                  lam, rounds)
        else:
            best, j = corr.max(1, keepdim=True) if m == 1 else corr.topk(m, 1)
            take = ((torch.arange(m, device=device) < room.unsqueeze(1))
                    & (best.double() > (thr * rsq.sqrt()).unsqueeze(1)) & go.unsqueeze(1))
        active = take[:, 0]
        if device.type == "cpu" and not bool(active.any()):  # free to read on the CPU
            break
        taken += active
        j = torch.where(take, j, n)  # index n: a sink column, never a real atom
        hits = torch.zeros(nb, n + 1, dtype=torch.bool, device=device).scatter_(1, j, True)
        chosen |= hits[:, :n]
        j = j.clamp_max(n - 1)
        slots[:, t : t + m] = torch.where(take, j, -1)
        g, ht = atoms.add(t, j, take)
        s = t + m
        state.G[:, t:s, :s] = g
        state.G[:, :t, t:s] = g[:, :, :t].transpose(1, 2)
        diag = torch.diagonal(state.G[:, t:s, t:s], dim1=1, dim2=2)
        diag.copy_(torch.where(take, diag + lam, 1.0))
        state.h[:, t:s] = torch.where(take, ht, 0.0)
        state.live[:, t:s] = take
        state.enter_block(t, take, always_ok)
        t, step = s, step + 1
        infeasible = state.step(t)
        check = t // check_every > (t - m) // check_every or t == cap
        solved = check or state.unsettled(t, infeasible, bb, lam, thr)
        if solved:
            state.solve(t, bb, lam, thr)
            if not bool(active.any()):
                break
    if not solved:  # also re-tests atoms that failed a block's entry test
        state.solve(t, bb, lam, thr)
    dropped = _trim(state, t, budgets, bb, lam, thr)
    slots[:, :t] = slots[:, :t].masked_fill(dropped, -1)
    w = state.w[:, :t]
    state.w_is_z = False
    f = state.objective(t, bb)
    rsq = (f - lam * (w * w).sum(1)).clamp_min(0.0)
    objective[rows, taken] = f
    corr = atoms.correlations(t, w).masked_fill(
        torch.arange(n, device=device).unsqueeze(0) >= counts.unsqueeze(1), -math.inf
    )
    residual = torch.where(bb > 0, (rsq / bb.clamp_min(1e-300)).sqrt(), 0.0)
    return OMPResult(
        slots=slots[:, :t],
        weights=(state.w[:, :t] * (slots[:, :t] >= 0)),
        objective=objective[:, : step + 1],
        residual=residual,
        correlations=corr,
        steps=(slots[:, :t] >= 0).sum(1),
    )


def _pool_picks(atoms: Atoms, state: _NNLS, corr: torch.Tensor, t: int, m: int, size: int,
                room: torch.Tensor, limit: torch.Tensor, go: torch.Tensor, lam: float,
                rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(take bool (B, m), atoms int64 (B, m)): the m atoms of one step, pruned from a pool.

    The pool is the `size` unchosen atoms of largest correlation q_i = <a_i, r> (those above
    `limit` (B,) where go (B,) holds are available). Projected orthogonally to the passive atoms
    (Schur complement S = G_NN + lam I - G_NP H G_PN: the metric in which they would enter P),
    they define the least-squares fit of the residual on the pool, c = S^-1 q. `rounds` rounds
    of backward elimination shrink the pool geometrically to m atoms: each round keeps the atoms
    whose removal would raise that fit's residual most (c_i^2 / (S^-1)_ii, and only c_i > 0) and
    re-fits on them. So of two atoms that explain the same direction, or of an atom the support
    already explains, one is dropped, and atoms that only together match the residual are kept;
    top-m correlation sees neither. Atoms with S_ii <= POOL_SIGMA_MIN G_ii stay out of the fit.
    If fewer than m atoms are kept, the block is filled with the other available pool atoms by
    correlation, as top-m would. Kept atoms come first, best score first; take is False past
    `room` (B,). The pool's Gram matrix comes from `atoms.gram` where the atoms have one (it may
    be float32: it only ranks), else from `atoms.add` into slots t..t+size-1 (the caller then
    stores the chosen atoms there again). No host synchronisation."""
    best, cand = corr.topk(size, 1)
    q = best.double()
    avail = (q > limit.unsqueeze(1)) & go.unsqueeze(1)
    gram = getattr(atoms, "gram", None)
    g = gram(t, cand) if gram is not None else atoms.add(t, cand, avail)[0]
    gps = g[:, :, :t] * state.passive[:, :t].unsqueeze(1)
    schur = g[:, :, t:] - torch.bmm(gps, torch.bmm(state.H[:, :t, :t], gps.transpose(1, 2)))
    d0 = torch.diagonal(g[:, :, t:], dim1=1, dim2=2) + lam
    diag = torch.diagonal(schur, dim1=1, dim2=2)
    diag.add_(lam)
    valid = avail & (diag > POOL_SIGMA_MIN * d0)
    # of near-copies (cosine > POOL_COPY in the projected metric) only the best correlated
    # joins the fit: together they would share one coefficient and look useless, so every
    # round would drop all of them (an elimination of one at a time would keep one)
    sd = diag.clamp_min(1e-300).sqrt()
    cosine = schur / (sd.unsqueeze(2) * sd.unsqueeze(1))
    earlier = torch.ones(size, size, dtype=torch.bool, device=q.device).tril(-1)
    valid &= ~((cosine > POOL_COPY) & earlier & valid.unsqueeze(1)).any(2)
    pos = torch.arange(size, device=q.device).expand(len(q), size)  # pool position per entry
    qk, dk = q, d0
    for r in range(rounds):
        target = round(m * (size / m) ** ((rounds - 1 - r) / rounds))
        both = valid.unsqueeze(2) & valid.unsqueeze(1)
        sm = torch.where(both, schur, 0.0) + torch.diag_embed(
            torch.where(valid, BLOCK_SIGMA_MIN * dk, 1.0))
        factor, info = torch.linalg.cholesky_ex(sm)
        inv = torch.cholesky_inverse(factor)  # identity outside the valid entries
        c = _matvec(inv, torch.where(valid, qk, 0.0))
        score = torch.where(valid & (c > 0), c * c / torch.diagonal(inv, dim1=1, dim2=2),
                            -math.inf)
        # a failed factorisation (S numerically singular) ranks that problem by correlation
        score = torch.where((info != 0).unsqueeze(1), torch.where(valid, qk, -math.inf), score)
        v, p = score.topk(target, 1)
        valid = v > -math.inf
        pos, qk, dk = pos.gather(1, p), qk.gather(1, p), dk.gather(1, p)
        schur = schur.gather(1, p.unsqueeze(2).expand(-1, -1, schur.shape[2]))
        schur = schur.gather(2, p.unsqueeze(1).expand(-1, target, -1))
    # keys: kept atoms 2..3 (by score), other available atoms 1..2 (by correlation), else -inf
    key = torch.where(avail, 1.0 + q / q.max(1, keepdim=True).values.clamp_min(1e-300),
                      -math.inf)
    rank = 3.0 - torch.arange(m, dtype=key.dtype, device=key.device) / m
    key.scatter_(1, pos, torch.where(valid, rank, key.gather(1, pos)))
    v, p = key.topk(m, 1)
    take = (v > -math.inf) & (torch.arange(m, device=v.device) < room.unsqueeze(1))
    return take, cand.gather(1, p)


def _trim(state: _NNLS, s: int, budgets: torch.Tensor, bb: torch.Tensor, lam: float,
          thr: torch.Tensor) -> torch.Tensor:
    """Where more than budget atoms ended with positive weight (zeroed atoms re-entered),
    drop the smallest-weight one and re-solve until the budget holds. Returns the dropped
    slots (B, s); they never re-enter and leave the support."""
    for _ in range(s):
        positive = state.passive[:, :s] & (state.w[:, :s] > 0)
        over = positive.sum(1) > budgets
        if not bool(over.any()):
            break
        j = torch.where(positive, state.w[:, :s], math.inf).argmin(1)
        state.leave(s, j, over)
        state.w[state.rows, j] = torch.where(over, 0.0, state.w[state.rows, j])
        state.dropped[state.rows, j] |= over
        state.solve(s, bb, lam, thr)
    return state.dropped[:, :s].clone()


def complete_to_budget(
    result: OMPResult, budgets: torch.Tensor | int, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exactly min(budget_p, count_p) atoms per problem, with their weights.

    Atoms with positive OMP weight come first. When OMP stopped before budget_p atoms had
    positive weight (tolerance reached, no positively correlated atom left, or the step cap), the
    remaining places go to the other atoms in decreasing order of their final correlation with
    the residual (the directions the matched gradient still misses most; ties by index), each at
    the mean positive OMP weight of that problem (count_p / budget_p if there is none): a filled
    example then counts like a typical chosen one in the weighted loss, instead of the ~k/N share
    that weight 1 would give it next to OMP weights of scale N/k.

    Returns (positions int64 (B, m), weights float32 (B, m), filled int64 (B,)) with m the largest
    budget; positions are -1 and weights 0 past each problem's budget.
    """
    counts = torch.as_tensor(counts, dtype=torch.int64, device=result.slots.device)
    nb, n = result.correlations.shape
    budgets = torch.as_tensor(budgets, dtype=torch.int64, device=counts.device).expand(nb)
    budgets = torch.minimum(budgets.clamp_min(0), counts)
    m = int(budgets.max()) if nb else 0
    dense = result.dense_weights(n)
    positive = dense > 0
    npos = positive.sum(1)
    mean_w = torch.where(npos > 0, dense.sum(1) / npos.clamp_min(1),
                         counts.double() / budgets.clamp_min(1).double())
    # positive atoms first (index order), then the rest by correlation; padding (-inf) last
    key = torch.where(positive, math.inf, result.correlations.double())
    pos = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :m]
    within = torch.arange(m, device=counts.device).unsqueeze(0) < budgets.unsqueeze(1)
    weights = torch.where(positive.gather(1, pos), dense.gather(1, pos), mean_w.unsqueeze(1))
    filled = (within & ~positive.gather(1, pos)).sum(1)
    return (
        torch.where(within, pos, -1),
        torch.where(within, weights, 0.0).to(torch.float32),
        filled,
    )


def nonneg_omp_dense(
    a: torch.Tensor,
    b: torch.Tensor,
    budget: int,
    *,
    lam: float = 0.0,
    eps: float = 1e-6,
    tol: float = 1e-5,
    check_every: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, OMPResult]:
    """One problem with dense rows a (n, d), target b (d,): (indices (k,), weights (k,), result).

    indices are the chosen atoms with positive weight, in pick order, as returned by OMP (no fill).
    """
    result = nonneg_omp(DenseAtoms(a, b), budget, lam=lam, eps=eps, tol=tol,
                        check_every=check_every)
    keep = (result.slots[0] >= 0) & (result.weights[0] > 0)
    return result.slots[0][keep], result.weights[0][keep], result
