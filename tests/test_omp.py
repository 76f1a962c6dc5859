"""Non-negative OMP: exactness against scipy's nnls, monotonicity, budgets, degenerate inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from subsetsel.selection import omp
from subsetsel.selection.omp import (
    DenseAtoms,
    complete_to_budget,
    nonneg_omp,
    nonneg_omp_dense,
)


def _problem(seed: int, n: int = 120, d: int = 30, shift: float = 0.0, target: str = "random"):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen) + shift
    b = a.sum(0) if target == "sum" else 5 * torch.randn(d, generator=gen)
    return a, b


def _scipy_weights(a: torch.Tensor, b: torch.Tensor, support: torch.Tensor, lam: float):
    """argmin ||A_S^T w - b||^2 + lam ||w||^2, w >= 0, via nnls on [A_S^T; sqrt(lam) I]."""
    a_s = a[support].double().numpy()
    m = np.vstack([a_s.T, math.sqrt(lam) * np.eye(len(support))])
    rhs = np.concatenate([b.double().numpy(), np.zeros(len(support))])
    return nnls(m, rhs, maxiter=50 * len(support))[0]


def _support(result, p: int = 0) -> torch.Tensor:
    return result.slots[p][result.slots[p] >= 0]


def _positive(result, p: int = 0) -> int:
    return int(((result.slots[p] >= 0) & (result.weights[p] > 0)).sum())


@pytest.mark.parametrize("lam", [0.0, 0.5, 3.0])
@pytest.mark.parametrize("seed,shift,target", [(0, 0.0, "random"), (1, 0.5, "random"),
                                               (2, 0.0, "sum"), (3, 0.3, "sum")])
@pytest.mark.parametrize("check_every,picks", [(1, 1), (16, 1), (1, 4), (4, 7)])
def test_weights_equal_scipy_nnls_on_the_chosen_support(lam, seed, shift, target, check_every,
                                                         picks):
    a, b = _problem(seed, shift=shift, target=target)
    result = nonneg_omp(DenseAtoms(a, b), 25, lam=lam, check_every=check_every,
                        picks_per_step=picks)
    support = _support(result)
    expected = _scipy_weights(a, b, support, lam)
    got = result.weights[0][result.slots[0] >= 0].numpy()
    assert (got >= 0).all()
    np.testing.assert_allclose(got, expected, atol=1e-6 * max(1.0, expected.max()), rtol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_active_constraints_are_handled_exactly(lam):
    """More atoms than dimensions and an off-centre cone: Lawson-Hanson must zero some chosen
    atoms (removals) and the result still equals nnls on the support."""
    zeros = 0
    for seed in range(4):
        a, b = _problem(seed, n=200, d=20, shift=0.5)
        result = nonneg_omp(DenseAtoms(a, b), 60, lam=lam)
        support = _support(result)
        expected = _scipy_weights(a, b, support, lam)
        got = result.weights[0][result.slots[0] >= 0].numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6 * expected.max(), rtol=1e-6)
        zeros += int((got == 0).sum())
        # stopped early only at the global optimum: no unchosen atom correlates positively
        if len(support) < 60:
            unchosen = torch.ones(200, dtype=torch.bool)
            unchosen[support] = False
            rnorm = result.residual[0] * b.double().norm()
            limit = 1e-5 * a.norm(dim=1).max() * rnorm + 1e-6
            assert result.correlations[0][unchosen].max() <= limit
    assert zeros > 0


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_objective_and_residual_never_increase(lam):
    a, b = _problem(4, n=300, d=100, target="sum")
    result = nonneg_omp(DenseAtoms(a, b), 60, lam=lam, check_every=8)
    f = result.objective[0]
    f = f[~torch.isnan(f)]
    assert len(f) == 61
    assert (f[1:] <= f[:-1] * (1 + 1e-12) + 1e-9).all()
    assert f[-1] < 0.2 * f[0]
    if lam == 0:  # then f is the squared residual itself
        assert math.isclose(float(f[-1]).__pow__(0.5) / b.double().norm(), result.residual[0],
                            rel_tol=1e-6)


def test_budget_is_met_exactly_and_result_is_deterministic():
    a, b = _problem(5, n=500, d=64, target="sum")
    r1 = nonneg_omp(DenseAtoms(a, b), 40, lam=0.5)
    r2 = nonneg_omp(DenseAtoms(a, b), 40, lam=0.5)
    assert _positive(r1) == 40  # atoms that end at weight 0 do not use up the budget
    assert torch.equal(r1.slots, r2.slots) and torch.equal(r1.weights, r2.weights)
    pos, weights, filled = complete_to_budget(r1, 40, torch.tensor([500]))
    assert pos.shape == (1, 40) and len(set(pos[0].tolist())) == 40
    assert (weights > 0).all() and int(filled[0]) == 0


def test_batched_problems_equal_separate_solves():
    """Three problems of different sizes and budgets, padded into one batch."""
    sizes, budgets, d = [90, 150, 60], [12, 30, 7], 24
    gen = torch.Generator().manual_seed(6)
    mats = [torch.randn(n, d, generator=gen) + 0.2 for n in sizes]
    targets = [m.sum(0) if i != 1 else 4 * torch.randn(d, generator=gen)
               for i, m in enumerate(mats)]
    padded = torch.zeros(3, max(sizes), d)
    for i, m in enumerate(mats):
        padded[i, : len(m)] = m
    batched = nonneg_omp(DenseAtoms(padded, torch.stack(targets), torch.tensor(sizes)),
                         torch.tensor(budgets), lam=0.5)
    for i, (m, t, k) in enumerate(zip(mats, targets, budgets, strict=True)):
        alone = nonneg_omp(DenseAtoms(m, t), k, lam=0.5)
        assert _positive(batched, i) == _positive(alone) <= k
        steps = int(alone.steps[0])
        assert int(batched.steps[i]) == steps
        assert torch.equal(batched.slots[i, :steps], alone.slots[0, :steps])
        torch.testing.assert_close(batched.weights[i, :steps], alone.weights[0, :steps],
                                   rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(batched.residual[i], alone.residual[0], rtol=1e-6, atol=1e-9)
        assert (batched.slots[i, steps:] == -1).all()
    assert (batched.correlations[2, 60:] == -math.inf).all()  # padding never chosen


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("picks", [1, 8])
def test_duplicate_and_zero_rows(lam, picks):
    a, b = _problem(7, n=40, d=16, target="sum")
    a = torch.cat([a, a[:20], torch.zeros(10, 16)])  # 20 duplicated rows, 10 all-zero rows
    result = nonneg_omp(DenseAtoms(a, b), 30, lam=lam, picks_per_step=picks)
    support = _support(result)
    assert torch.isfinite(result.weights).all() and (result.weights >= 0).all()
    assert not (support >= 60).any()  # zero rows are never picked
    expected = _scipy_weights(a, b, support, lam)
    got = result.weights[0][result.slots[0] >= 0].numpy()
    if lam > 0 or len(support) <= 16:
        np.testing.assert_allclose(got, expected, atol=1e-5 * expected.max())
    else:  # more atoms than dimensions and no ridge: the NNLS weights are not unique
        fit = a[support].double().numpy().T
        bn = b.double().numpy()
        assert np.linalg.norm(fit @ got - bn) <= np.linalg.norm(fit @ expected - bn) + 1e-9


def test_budget_at_least_n_and_zero_target():
    a, b = _problem(8, n=12, d=30, target="sum")
    result = nonneg_omp(DenseAtoms(a, b), 50, lam=0.0)
    assert int(result.steps[0]) <= 12
    pos, weights, _ = complete_to_budget(result, 50, torch.tensor([12]))
    assert sorted(pos[0].tolist()) == list(range(12))  # every atom, once
    assert (weights > 0).all()
    # zero target: nothing to match, OMP picks nothing, the fill uses count/budget weights
    zero = nonneg_omp(DenseAtoms(a, torch.zeros(30)), 4)
    assert int(zero.steps[0]) == 0 and zero.residual[0] == 0
    pos, weights, filled = complete_to_budget(zero, 4, torch.tensor([12]))
    assert int(filled[0]) == 4 and torch.allclose(weights, torch.full((1, 4), 3.0))


def test_tolerance_stops_early_and_fill_is_at_the_mean_weight():
    """b is a positive combination of 3 atoms: OMP reaches ||r|| <= eps ||b|| after 3 picks and
    complete_to_budget fills the rest by correlation at the mean OMP weight."""
    a, _ = _problem(9, n=50, d=30)
    b = 2.0 * a[3] + 1.0 * a[17] + 3.0 * a[30]
    result = nonneg_omp(DenseAtoms(a, b), 10, lam=0.0, eps=1e-6)
    assert sorted(_support(result).tolist()) == [3, 17, 30]
    assert result.residual[0] < 1e-6
    pos, weights, filled = complete_to_budget(result, 10, torch.tensor([50]))
    assert int(filled[0]) == 7
    chosen = {int(p): float(w) for p, w in zip(pos[0], weights[0], strict=True)}
    assert chosen[3] == pytest.approx(2.0) and chosen[30] == pytest.approx(3.0)
    fills = [w for p, w in chosen.items() if p not in (3, 17, 30)]
    assert fills == pytest.approx([2.0] * 7)
    order = result.correlations[0].clone()
    order[[3, 17, 30]] = -math.inf
    assert set(chosen) - {3, 17, 30} == set(order.topk(7).indices.tolist())


def test_dense_helper_and_argument_checks():
    a, b = _problem(10, target="sum")
    idx, w, result = nonneg_omp_dense(a, b, 5)
    assert len(idx) == len(w) == 5 and (w > 0).all()
    with pytest.raises(ValueError, match="lam"):
        nonneg_omp(DenseAtoms(a, b), 5, lam=-1.0)
    with pytest.raises(ValueError, match="check_every"):
        nonneg_omp(DenseAtoms(a, b), 5, check_every=0)
    with pytest.raises(ValueError, match="picks_per_step"):
        nonneg_omp(DenseAtoms(a, b), 5, picks_per_step=0)
    with pytest.raises(ValueError, match="need A"):
        DenseAtoms(a, b[:-1])


def test_cpu_thread_count_is_restored():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a, b = _problem(11)
        nonneg_omp(DenseAtoms(a, b), 3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("seed", [3, 21, 28])
def test_zero_weight_atoms_do_not_use_up_the_budget(seed):
    """OMP keeps picking until `budget` atoms have positive weight; where zeroed atoms re-enter
    and push the count over the budget, the smallest-weight ones are dropped from the support
    (here: these seeds trigger a drop). The result is still the exact NNLS on its support."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(300, 20, generator=gen) + 0.5
    b = 5 * torch.randn(20, generator=gen)
    result = nonneg_omp(DenseAtoms(a, b), 15, lam=1.0)
    slots = result.slots[0]
    last = int((slots >= 0).nonzero().max())
    assert (slots[:last] < 0).any()  # a dropped atom left a hole in the pick order
    assert _positive(result) == 15
    support = _support(result)
    expected = _scipy_weights(a, b, support, 1.0)
    got = result.weights[0][slots >= 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6 * expected.max(), rtol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_several_picks_per_step(lam):
    """Each step adds the `picks` unchosen atoms of largest positive correlation (fewer when the
    budget has less room): the objective still falls every step, the budget is met exactly, the
    weights are the exact NNLS on the support, and the fit stays close to one pick per step."""
    a, b = _problem(12, n=400, d=60, shift=0.2, target="sum")
    single = nonneg_omp(DenseAtoms(a, b), 50, lam=lam)
    for picks in (2, 5, 16):
        result = nonneg_omp(DenseAtoms(a, b), 50, lam=lam, picks_per_step=picks)
        f = result.objective[0]
        f = f[~torch.isnan(f)]
        assert len(f) - 1 < len(single.objective[0]) - 1  # fewer steps
        assert (f[1:] <= f[:-1] * (1 + 1e-12) + 1e-9).all()
        assert _positive(result) == 50
        support = _support(result)
        assert len(set(support.tolist())) == len(support)  # never re-picked
        expected = _scipy_weights(a, b, support, lam)
        got = result.weights[0][result.slots[0] >= 0].numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6 * expected.max(), rtol=1e-6)
        # coarser steps fit worse: within 3x of single picks up to a tenth of the budget a step
        # (measured: 1.4x / 2.3x at 2 / 5 picks), only roughly at a third (16 of 50)
        bound = 3.0 * float(single.residual[0]) if picks <= 5 else 0.05
        assert float(result.residual[0]) <= bound


def test_first_step_takes_the_top_correlated_atoms():
    a, b = _problem(13, n=200, d=40, target="sum")
    result = nonneg_omp(DenseAtoms(a, b), 30, lam=0.5, picks_per_step=6)
    first = (a.double() @ b.double()).topk(6).indices
    assert result.slots[0, :6].tolist() == first.tolist()


def test_blocked_problems_equal_separate_solves_with_several_picks():
    """Batched problems with different budgets: the block of a problem with less room is cut to
    its room; each problem's support and weights equal solving it alone."""
    sizes, budgets, d = [90, 150, 60], [12, 30, 7], 24
    gen = torch.Generator().manual_seed(14)
    mats = [torch.randn(n, d, generator=gen) + 0.2 for n in sizes]
    targets = [m.sum(0) for m in mats]
    padded = torch.zeros(3, max(sizes), d)
    for i, m in enumerate(mats):
        padded[i, : len(m)] = m
    batched = nonneg_omp(DenseAtoms(padded, torch.stack(targets), torch.tensor(sizes)),
                         torch.tensor(budgets), lam=0.5, picks_per_step=4)
    for i, (m, t, k) in enumerate(zip(mats, targets, budgets, strict=True)):
        alone = nonneg_omp(DenseAtoms(m, t), k, lam=0.5, picks_per_step=4)
        assert torch.equal(_support(batched, i), _support(alone))
        torch.testing.assert_close(batched.weights[i][batched.slots[i] >= 0],
                                   alone.weights[0][alone.slots[0] >= 0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("picks,check_every", [(1, 16), (6, 16), (6, 4)])
def test_cuda_schedule_is_exact_at_the_end(monkeypatch, picks, check_every):
    """On CUDA no exact solve runs between check points (`unsettled` is False there); forced on
    the CPU, the returned weights are still the exact NNLS on the support and the budget holds."""
    monkeypatch.setattr(omp._NNLS, "unsettled", lambda self, *args: False)
    a, b = _problem(15, n=300, d=40, shift=0.4, target="sum")
    result = nonneg_omp(DenseAtoms(a, b), 40, lam=0.5, picks_per_step=picks,
                        check_every=check_every)
    assert _positive(result) == 40
    support = _support(result)
    expected = _scipy_weights(a, b, support, 0.5)
    got = result.weights[0][result.slots[0] >= 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6 * expected.max(), rtol=1e-6)


def test_block_entry_gives_the_inverse_gram_matrix():
    """Block entry with and without the ridge shortcut (`always_ok`) gives the same state, and
    H is the inverse of G on the entered slots computed directly."""
    gen = torch.Generator().manual_seed(16)
    a = torch.randn(2, 9, 12, generator=gen, dtype=torch.float64)
    lam = 0.3
    gram = torch.bmm(a, a.transpose(1, 2)) + lam * torch.eye(9, dtype=torch.float64)
    take = torch.ones(2, 5, dtype=torch.bool)
    take[1, 3:] = False  # problem 1 takes only 3 of the 5 new slots
    h = torch.randn(2, 9, generator=gen, dtype=torch.float64)
    h[1, 7:] = 0.0
    states = []
    for always_ok in (True, False):
        state = omp._NNLS(2, 9, torch.device("cpu"))
        state.G[:, :9, :9] = gram
        state.h[:, :9] = h
        state.enter_block(0, torch.ones(2, 4, dtype=torch.bool), always_ok)  # slots 0-3
        state.G[1, 7:9, :] = 0.0  # slots 7, 8 of problem 1 are unused: identity rows/columns
        state.G[1, :, 7:9] = 0.0
        state.G[1, 7:9, 7:9] = torch.eye(2, dtype=torch.float64)
        state.enter_block(4, take, always_ok)  # slots 4-8
        states.append(state)
    torch.testing.assert_close(states[0].H, states[1].H)
    torch.testing.assert_close(states[0].z, states[1].z)
    assert torch.equal(states[0].passive, states[1].passive)
    for p, size in ((0, 9), (1, 7)):
        inverse = torch.linalg.inv(states[0].G[p, :size, :size])
        torch.testing.assert_close(states[0].H[p, :size, :size], inverse)
        assert (states[0].H[p, size:] == 0).all()
        torch.testing.assert_close(states[0].z[p, :size], inverse @ h[p, :size])


def test_small_bordering_skips_dependent_slots():
    """`_border_small` (used where the Cholesky shortcut cannot be trusted) inverts S on the
    taken slots and blocks a slot that is a combination of earlier ones (pivot below the
    threshold), exactly as entering the slots one at a time would."""
    gen = torch.Generator().manual_seed(17)
    rows = torch.randn(1, 4, 6, generator=gen, dtype=torch.float64)
    rows = torch.cat([rows, rows[:, :1] + rows[:, 1:2], rows[:, 2:3]], 1)  # slot 4, 5 dependent
    schur = torch.bmm(rows, rows.transpose(1, 2))
    take = torch.tensor([[True, True, False, True, True, True]])
    x, ok = omp._NNLS._border_small(schur, schur, take, omp.SIGMA_MIN)
    assert ok.tolist() == [[True, True, False, True, False, True]]  # 5 = 2, but 2 was not taken
    keep = torch.tensor([0, 1, 3, 5])
    expected = torch.zeros(6, 6, dtype=torch.float64)
    expected[keep.unsqueeze(1), keep] = torch.linalg.inv(schur[0][keep][:, keep])
    torch.testing.assert_close(x[0], expected)


def _objective(a, b, support, w, lam):
    fit = a[support].double().numpy().T @ w - b.double().numpy()
    return float(fit @ fit + lam * (w @ w))


@pytest.mark.parametrize("lam", [0.0, 1e-8])
@pytest.mark.parametrize("seed", [1, 7, 9])
def test_blocks_without_a_safe_ridge_stay_exact(lam, seed):
    """No ridge (or one too small to trust the Cholesky shortcut), more chosen atoms than
    dimensions, duplicated rows: a block may hold atoms that depend on earlier ones. They are
    blocked at entry and re-tested alone at the next exact solve, so the final weights still
    reach scipy's nnls objective on the same support."""
    a, b = _problem(seed, n=80, d=12, shift=0.3, target="sum")
    a = torch.cat([a, a[:20]])
    result = nonneg_omp(DenseAtoms(a, b), 30, lam=lam, picks_per_step=4)
    support = _support(result)
    got = result.weights[0][result.slots[0] >= 0].numpy()
    expected = _scipy_weights(a, b, support, lam)
    scale = float(b.double().norm()) ** 2
    excess = _objective(a, b, support, got, lam) - _objective(a, b, support, expected, lam)
    assert excess <= 1e-8 * scale
    assert (got >= 0).all() and np.isfinite(got).all()


def test_atoms_blocked_at_entry_can_enter_later():
    """Budget above the number of atoms with no ridge: whole blocks enter at once and atoms
    that fail the entry test while dependent are re-tested once others have left."""
    a, b = _problem(0, n=20, d=8)
    for picks in (3, 50):
        result = nonneg_omp(DenseAtoms(a, b), 100, lam=0.0, picks_per_step=picks)
        support = _support(result)
        got = result.weights[0][result.slots[0] >= 0].numpy()
        expected = _scipy_weights(a, b, support, 0.0)
        scale = float(b.double().norm()) ** 2
        assert (_objective(a, b, support, got, 0.0)
                <= _objective(a, b, support, expected, 0.0) + 1e-10 * scale)


def test_steps_and_slots_are_not_wasted():
    """Orthogonal atoms and a positive target on 100 of them: every pick keeps a positive
    weight, so k = 100 with 4 picks a step takes exactly 25 steps and 100 slots, and a problem
    that stops early (the tolerance) leaves no trailing empty slots on the CPU."""
    a = torch.eye(200)
    coef = torch.zeros(200)
    coef[::2] = torch.linspace(1.0, 2.0, 100)
    result = nonneg_omp(DenseAtoms(a, coef), 100, picks_per_step=4)
    assert result.objective.shape == (1, 26) and result.slots.shape == (1, 100)
    assert _positive(result) == 100
    assert sorted(_support(result).tolist()) == list(range(0, 200, 2))
    early = nonneg_omp(DenseAtoms(a, coef), 150, picks_per_step=4)  # only 100 can help
    assert early.slots.shape == (1, 100) and float(early.residual[0]) < 1e-6
    assert omp.capacity(15, 4) == 15 + 8 + 6 and omp.capacity(0, 4) == 0


# --- several picks per step pruned from a pool (the Grad-Match default) -----------------------

POOLED = {"pool": 5.0, "rounds": 8}


def _pooled(a, b, k, lam, picks=None, **kwargs):
    picks = picks or math.ceil(k / 16)
    return nonneg_omp(DenseAtoms(a, b), k, lam=lam, picks_per_step=picks, **POOLED, **kwargs)


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("shift,target", [(0.3, "sum"), (0.0, "random")])
def test_pooled_blocks_fit_as_well_as_one_pick(lam, shift, target):
    """~16 steps of pool-pruned blocks end, on average over six problems, within 5 % of the
    residual of one pick per step (measured: 0.73-0.91 of it; single problems 0.54-1.34), while
    the same blocks of plain top-correlated atoms end far above it (measured: 1.35-1.72)."""
    pooled, top = [], []
    for seed in range(6):
        a, b = _problem(seed, n=400, d=80, shift=shift, target=target)
        one = float(nonneg_omp(DenseAtoms(a, b), 48, lam=lam).residual[0])
        pooled.append(float(_pooled(a, b, 48, lam).residual[0]) / one)
        top.append(float(nonneg_omp(DenseAtoms(a, b), 48, lam=lam, picks_per_step=3)
                         .residual[0]) / one)
    assert sum(pooled) / 6 <= 1.05 and max(pooled) <= 1.5
    assert sum(top) / 6 >= 1.2


@pytest.mark.parametrize("lam", [0.0, 0.5, 3.0])
@pytest.mark.parametrize("seed,shift,target", [(0, 0.0, "random"), (1, 0.5, "random"),
                                               (2, 0.0, "sum"), (3, 0.3, "sum")])
@pytest.mark.parametrize("check_every", [1, 16])
def test_pooled_weights_equal_scipy_nnls_and_budget_holds(lam, seed, shift, target,
                                                           check_every):
    a, b = _problem(seed, shift=shift, target=target)
    result = _pooled(a, b, 25, lam, picks=4, check_every=check_every)
    support = _support(result)
    assert len(set(support.tolist())) == len(support)  # never re-picked
    if _positive(result) < 25:  # stopped only at the optimum over all atoms
        unchosen = torch.ones(len(a), dtype=torch.bool)
        unchosen[support] = False
        limit = 1e-5 * a.norm(dim=1).max() * result.residual[0] * b.double().norm() + 1e-6
        assert result.correlations[0][unchosen].max() <= limit
    else:
        assert _positive(result) == 25
    expected = _scipy_weights(a, b, support, lam)
    got = result.weights[0][result.slots[0] >= 0].numpy()
    assert (got >= 0).all()
    np.testing.assert_allclose(got, expected, atol=1e-6 * max(1.0, expected.max()), rtol=1e-6)
    f = result.objective[0]
    f = f[~torch.isnan(f)]
    assert (f[1:] <= f[:-1] * (1 + 1e-12) + 1e-9).all()


def test_pooled_batched_problems_equal_separate_solves():
    sizes, budgets, d = [90, 150, 60], [12, 30, 7], 24
    gen = torch.Generator().manual_seed(18)
    mats = [torch.randn(n, d, generator=gen) + 0.2 for n in sizes]
    targets = [m.sum(0) if i != 1 else 4 * torch.randn(d, generator=gen)
               for i, m in enumerate(mats)]
    padded = torch.zeros(3, max(sizes), d)
    for i, m in enumerate(mats):
        padded[i, : len(m)] = m
    batched = nonneg_omp(DenseAtoms(padded, torch.stack(targets), torch.tensor(sizes)),
                         torch.tensor(budgets), lam=0.5, picks_per_step=3, **POOLED)
    for i, (m, t, k) in enumerate(zip(mats, targets, budgets, strict=True)):
        alone = nonneg_omp(DenseAtoms(m, t), k, lam=0.5, picks_per_step=3, **POOLED)
        assert torch.equal(_support(batched, i), _support(alone))
        assert _positive(batched, i) == _positive(alone) == k
        torch.testing.assert_close(batched.weights[i][batched.slots[i] >= 0],
                                   alone.weights[0][alone.slots[0] >= 0], rtol=1e-6, atol=1e-9)
    assert (batched.correlations[2, 60:] == -math.inf).all()  # padding never chosen


def test_pool_takes_at_most_one_copy():
    """The two atoms of largest correlation are the same row: top-2 takes both (the copy is
    blocked at entry and the block adds one atom), the pool's fit sees only one of them (two
    copies would share one coefficient and both look useless) and takes two useful atoms: here
    a pair that fits better than the first pick of one-at-a-time OMP."""
    a, b = _problem(19, n=200, d=40, target="sum")
    first = int((a.double() @ b.double()).argmax())
    a = torch.cat([a, a[first : first + 1]])  # atom 200 duplicates the best atom
    top = nonneg_omp(DenseAtoms(a, b), 2, lam=0.0, picks_per_step=2, check_every=100)
    assert set(top.slots[0, :2].tolist()) == {first, 200}
    pooled = nonneg_omp(DenseAtoms(a, b), 2, lam=0.0, picks_per_step=2, pool=4.0, rounds=2,
                        check_every=100)
    picked = set(pooled.slots[0, :2].tolist())
    assert len(picked & {first, 200}) <= 1 and _positive(pooled) == 2
    one = nonneg_omp(DenseAtoms(a, b), 2, lam=0.0)
    assert pooled.residual[0] < min(top.residual[0], one.residual[0])


class _NoGram:
    """DenseAtoms without the optional `gram`: the pool is scored through `add` (float64)."""

    def __init__(self, atoms: DenseAtoms) -> None:
        self._atoms = atoms
        for name in ("batch", "size", "counts", "device"):
            setattr(self, name, getattr(atoms, name))
        for name in ("target_sq_norm", "sq_norms", "start", "add", "correlations"):
            setattr(self, name, getattr(atoms, name))


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_pool_without_a_gram_method_uses_add(lam):
    """Atoms without `gram` (e.g. LastLayerAtoms) write the pool into the support slots after
    the used ones; the chosen atoms are stored again, so the result is still exact and has the
    same support as with the float32 `gram` of DenseAtoms."""
    a, b = _problem(20, n=300, d=50, shift=0.3, target="sum")
    plain = nonneg_omp(_NoGram(DenseAtoms(a, b)), 30, lam=lam, picks_per_step=4, **POOLED)
    with_gram = _pooled(a, b, 30, lam, picks=4)
    assert torch.equal(_support(plain), _support(with_gram))
    expected = _scipy_weights(a, b, _support(plain), lam)
    got = plain.weights[0][plain.slots[0] >= 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6 * expected.max(), rtol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 1e-8])
def test_pooled_blocks_without_a_safe_ridge_stay_exact(monkeypatch, lam):
    """Duplicated rows, more chosen atoms than dimensions, the CUDA schedule (no exact solve
    between check points): the pool's fit must survive singular Schur complements (failed
    factorisations rank by correlation) and the final weights reach nnls's objective."""
    monkeypatch.setattr(omp._NNLS, "unsettled", lambda self, *args: False)
    a, b = _problem(9, n=80, d=12, shift=0.3, target="sum")
    a = torch.cat([a, a[:20]])
    result = nonneg_omp(DenseAtoms(a, b), 30, lam=lam, picks_per_step=4, **POOLED)
    support = _support(result)
    got = result.weights[0][result.slots[0] >= 0].numpy()
    expected = _scipy_weights(a, b, support, lam)
    scale = float(b.double().norm()) ** 2
    excess = _objective(a, b, support, got, lam) - _objective(a, b, support, expected, lam)
    assert excess <= 1e-8 * scale
    assert (got >= 0).all() and np.isfinite(got).all()


def test_pool_and_rounds_are_checked():
    a, b = _problem(10, target="sum")
    with pytest.raises(ValueError, match="pool"):
        nonneg_omp(DenseAtoms(a, b), 5, picks_per_step=2, pool=0.5)
    with pytest.raises(ValueError, match="pool"):
        nonneg_omp(DenseAtoms(a, b), 5, picks_per_step=2, pool=math.nan)
    with pytest.raises(ValueError, match="rounds"):
        nonneg_omp(DenseAtoms(a, b), 5, picks_per_step=2, pool=2.0, rounds=0)
    # one pick per step ignores the pool: the textbook picks
    one = nonneg_omp(DenseAtoms(a, b), 5)
    pooled = nonneg_omp(DenseAtoms(a, b), 5, pool=4.0)
    assert torch.equal(one.slots, pooled.slots)


def test_pool_on_factored_gradient_atoms_is_exact():
    """The Grad-Match path: LastLayerAtoms (its pool ranked by a float32 `gram` from the
    factors), batched classes with padding; weights equal nnls on each support, budgets hold,
    and the supports equal those of the same rows as DenseAtoms with the pool scored through
    `add` in float64."""
    from subsetsel.selection.gradients import LastLayerAtoms

    gen = torch.Generator().manual_seed(21)
    nb, n, c, d = 3, 90, 4, 9
    delta = torch.softmax(torch.randn(nb, n, c, generator=gen), 2) - 0.5
    emb = torch.relu(torch.randn(nb, n, d, generator=gen))
    counts = torch.tensor([90, 70, 84])
    pad = torch.arange(n).view(1, n, 1) >= counts.view(nb, 1, 1)
    delta, emb = delta.masked_fill(pad, 0.0), emb.masked_fill(pad, 0.0)
    rows = torch.cat([delta, (delta.unsqueeze(3) * emb.unsqueeze(2)).flatten(2)], 2)
    target = rows.double().sum(1)
    budgets = torch.tensor([16, 9, 20])
    factored = nonneg_omp(LastLayerAtoms(delta, emb, counts, target, True), budgets, lam=0.5,
                          picks_per_step=3, **POOLED)
    dense = nonneg_omp(_NoGram(DenseAtoms(rows, target, counts)), budgets, lam=0.5,
                       picks_per_step=3, **POOLED)
    for p in range(nb):
        support = _support(factored, p)
        assert torch.equal(support, _support(dense, p))
        assert _positive(factored, p) == int(budgets[p]) and (support < counts[p]).all()
        expected = _scipy_weights(rows[p], target[p], support, 0.5)
        got = factored.weights[p][factored.slots[p] >= 0].numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6 * expected.max(), rtol=1e-6)


# --- tapered blocks (the Grad-Match default) -----------------------------------------------------

TAPERED = {**POOLED, "taper": 0.25}


@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("seed,shift,target", [(4, 0.0, "random"), (5, 0.3, "sum")])
def test_tapered_blocks_shrink_to_single_picks_and_stay_exact(lam, seed, shift, target):
    """With taper 1/4 a step adds min(picks, ceil((k - t) / 4)) atoms: full blocks first, then
    fewer, single atoms at the end; the weights are still nnls's on the support, the budget
    holds."""
    a, b = _problem(seed, n=300, d=60, shift=shift, target=target)
    k = 40
    result = nonneg_omp(DenseAtoms(a, b), k, lam=lam, picks_per_step=5, **TAPERED)
    plain = nonneg_omp(DenseAtoms(a, b), k, lam=lam, picks_per_step=5, **POOLED)
    assert result.objective.shape[1] > plain.objective.shape[1]  # more, smaller steps
    widths, t = [], 0
    while t < k:
        widths.append(min(5, max(1, math.ceil(0.25 * (k - t)))))
        t += widths[-1]
    assert widths[:5] == [5, 5, 5, 5, 5] and widths[-2:] == [1, 1]
    support = _support(result)
    assert len(set(support.tolist())) == len(support) and _positive(result) == k
    expected = _scipy_weights(a, b, support, lam)
    got = result.weights[0][result.slots[0] >= 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6 * max(1.0, expected.max()), rtol=1e-6)


def test_taper_from_makes_parts_of_a_round_equal_the_whole():
    """Problems solved in parts follow the whole round's step widths when given its largest
    budget (`taper_from`), as the Grad-Match groups and class owners do."""
    sizes, budgets, d = [90, 150, 60], [12, 30, 7], 24
    gen = torch.Generator().manual_seed(19)
    mats = [torch.randn(n, d, generator=gen) + 0.2 for n in sizes]
    padded = torch.zeros(3, max(sizes), d)
    for i, m in enumerate(mats):
        padded[i, : len(m)] = m
    targets = torch.stack([m.sum(0) for m in mats])
    whole = nonneg_omp(DenseAtoms(padded, targets, torch.tensor(sizes)), torch.tensor(budgets),
                       lam=0.5, picks_per_step=3, **TAPERED)
    for i, (m, k) in enumerate(zip(mats, budgets, strict=True)):
        alone = nonneg_omp(DenseAtoms(m, targets[i]), k, lam=0.5, picks_per_step=3, **TAPERED,
                           taper_from=30)
        assert torch.equal(_support(whole, i), _support(alone))
        torch.testing.assert_close(whole.weights[i][whole.slots[i] >= 0],
                                   alone.weights[0][alone.slots[0] >= 0], rtol=1e-6, atol=1e-9)
    # alone without taper_from, problem 0 (budget 12) tapers from 12: widths 3, 3, 2, 1, 1, ...
    own = nonneg_omp(DenseAtoms(mats[0], targets[0]), 12, lam=0.5, picks_per_step=3, **TAPERED)
    part = nonneg_omp(DenseAtoms(mats[0], targets[0]), 12, lam=0.5, picks_per_step=3, **TAPERED,
                      taper_from=30)
    assert own.objective.shape[1] > part.objective.shape[1]


@pytest.mark.parametrize("taper", [-0.1, 1.5, math.nan])
def test_taper_is_checked(taper):
    a, b = _problem(10, target="sum")
    with pytest.raises(ValueError, match="taper"):
        nonneg_omp(DenseAtoms(a, b), 5, picks_per_step=2, taper=taper)
