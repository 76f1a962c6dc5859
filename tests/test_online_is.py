"""Importance sampling: scores, unbiased weights, the τ estimate and switch, and the policy's
presample reads when the switch is on or off."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from policy_harness import FakeEngine, IndexReader, logit_forward
from torch import nn

from subsetsel.online.base import Batch, create_policy
from subsetsel.online.importance import (
    ImportanceSampling,
    TauSwitch,
    capture_last_input,
    importance_scores,
    is_weights,
    presample_positions,
    resample,
    sampling_probabilities,
    tau_estimate,
    tau_threshold,
)


# ---- scores ----------------------------------------------------------------------------------
def test_gnorm_and_loss_scores_by_hand():
    logits = torch.zeros(2, 4)
    y = torch.tensor([0, 3])
    assert torch.allclose(importance_scores(logits, y, "gnorm"), torch.full((2,), math.sqrt(0.75)))
    assert torch.allclose(importance_scores(logits, y, "loss"), torch.full((2,), math.log(4)))
    confident = torch.tensor([[20.0, 0.0, 0.0, 0.0]])
    assert float(importance_scores(confident, torch.tensor([0]))) < 1e-6
    with pytest.raises(ValueError, match="gradnorm"):
        importance_scores(logits, y, "gradnorm")


def test_gradnorm_score_is_the_exact_last_layer_gradient_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.randn(6, 5), torch.randint(3, (6,))
    with capture_last_input(model) as inputs:
        logits = model(x)
    scores = importance_scores(logits, y, "gradnorm", inputs[-1])
    last = model[2]
    for i in range(6):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        exact = torch.cat([last.weight.grad.flatten(), last.bias.grad]).norm()
        assert float(scores[i]) == pytest.approx(float(exact), rel=1e-5)
    assert not last._forward_hooks  # the hook is removed after the block


# ---- unbiased weights ------------------------------------------------------------------------
def test_is_weights_make_the_weighted_mean_an_unbiased_estimate_of_the_batch_mean():
    g = torch.Generator().manual_seed(0)
    big, b, draws = 384, 128, 4000
    losses = torch.rand(big, generator=g) * 3
    scores = losses + 0.1 * torch.rand(big, generator=g)  # correlated with the loss, as in IS
    p = sampling_probabilities(scores)
    w = is_weights(p)
    rows = resample(p, b * draws, g).view(draws, b)
    estimates = (w[rows] * losses[rows]).mean(dim=1)
    se = float(estimates.std()) / math.sqrt(draws)
    assert abs(float(estimates.mean()) - float(losses.mean())) < 4 * se
    # exact expectation: sum_i p_i w_i l_i = mean(l)
    assert float((p * w * losses).sum()) == pytest.approx(float(losses.mean()), rel=1e-5)
    # and IS has lower variance than uniform sampling for these scores
    uniform = losses[torch.randint(big, (draws, b), generator=g)].mean(dim=1)
    assert float(estimates.var()) < float(uniform.var())


def test_selection_weights_compose_with_is_weights():
    """With selection weights, the estimate targets sum(w l) / sum(w) over the presample."""
    g = torch.Generator().manual_seed(1)
    big, b, draws = 96, 32, 6000
    idx = torch.arange(big)
    losses = torch.rand(big, generator=g)
    sel_w = torch.rand(big, generator=g) * 4 + 0.1
    batch = Batch(idx, torch.zeros(big, 1), torch.zeros(big, dtype=torch.int64), sel_w)
    scores = losses + torch.rand(big, generator=g)  # imperfect scores: the estimate varies
    p = sampling_probabilities(scores, sel_w)
    rows = resample(p, b * draws, g)
    chosen = ImportanceSampling._weighted(batch, p, rows)
    estimates = (chosen.w * losses[chosen.indices]).view(draws, b).mean(dim=1)
    target = float((sel_w * losses).sum() / sel_w.sum())
    se = float(estimates.std()) / math.sqrt(draws)
    assert se > 0 and abs(float(estimates.mean()) - target) < 4 * se
    exact = float((p * is_weights(p) * sel_w / sel_w.mean() * losses).sum())  # E over one draw
    assert exact == pytest.approx(target, rel=1e-5)


def test_sampling_probabilities_fall_back_to_uniform_for_zero_scores():
    assert torch.allclose(sampling_probabilities(torch.zeros(4)), torch.full((4,), 0.25))
    p = sampling_probabilities(torch.tensor([1.0, 3.0]))
    assert torch.allclose(p, torch.tensor([0.25, 0.75]))


# ---- τ ----------------------------------------------------------------------------------------
def test_tau_estimate_on_constructed_scores():
    assert tau_estimate(torch.ones(8)) == pytest.approx(1.0)
    assert tau_estimate(torch.zeros(8)) == 1.0
    assert tau_estimate(torch.tensor([1.0, 0.0, 0.0, 0.0])) == pytest.approx(2.0)  # sqrt(B/k)
    one_in_16 = torch.zeros(64)
    one_in_16[::16] = 5.0
    assert tau_estimate(one_in_16) == pytest.approx(4.0)
    s = torch.rand(50, generator=torch.Generator().manual_seed(2)).double()
    p, u = s / s.sum(), 1.0 / 50
    definition = 1.0 / math.sqrt(1 - float((p - u).pow(2).sum()) / float(p.pow(2).sum()))
    assert tau_estimate(s) == pytest.approx(definition, rel=1e-9)


def test_tau_threshold():
    assert tau_threshold(384, 128) == pytest.approx(2.0)
    assert tau_threshold(640, 128) == pytest.approx((640 + 384) / 384)
    assert tau_threshold(256, 128, backward_cost=1.0) == pytest.approx(2.0)


def test_tau_switch_turns_on_and_off_with_the_ema():
    switch = TauSwitch(threshold=2.0, momentum=0.9)
    assert not switch.on
    switch.update(3.0)  # first observation taken as is
    assert switch.on and switch.tau == 3.0
    taus, states = [], []
    for _ in range(12):
        switch.update(1.0)
        taus.append(switch.tau)
        states.append(switch.on)
    expected = [1 + 2 * 0.9 ** (k + 1) for k in range(12)]
    assert taus == pytest.approx(expected)
    assert states == [t > 2.0 for t in expected]
    assert states[:6] == [True] * 6 and states[6:] == [False] * 6  # 1 + 2 * 0.9^7 = 1.96
    for _ in range(30):
        switch.update(4.0)
    assert switch.on


def test_presample_positions_cover_own_block_and_draw_others_without_replacement():
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        pos = presample_positions(10, 20, 100, 30, g)
        assert pos[:10].tolist() == list(range(10, 20))
        assert pos.unique().numel() == 30 and int(pos.max()) < 100
    assert presample_positions(0, 10, 12, 30, g).sort().values.tolist() == list(range(12))


# ---- the policy with constructed scores -------------------------------------------------------
def run_is(policy, x: torch.Tensor, batch_size: int = 16) -> tuple[FakeEngine, dict]:
    """One epoch of `policy` over examples whose logits are x (B, 2), label 0."""
    n = x.shape[0]
    engine = FakeEngine(n, batch_size=batch_size, forward=logit_forward)
    source = IndexReader(torch.arange(n), inputs=x)
    extra = engine.run_epoch(policy, 0, source)
    extra["fresh"] = source.fresh
    return engine, extra


def _steps(engine: FakeEngine) -> list[tuple[int, bool, torch.Tensor]]:
    """(size, normalised loss, weights) of every step."""
    return [(len(b), not mean, b.w.clone())
            for b, mean in zip(engine.trained, engine.mean_loss, strict=True)]


def test_policy_stays_off_on_uniform_scores():
    x = torch.zeros(160, 2)  # every example equally wrong: τ = 1
    engine, extra = run_is(create_policy("is", presample=3), x)
    assert extra["is_on_fraction"] == 0.0 and extra["is_tau"] == pytest.approx(1.0)
    assert not engine.scored and extra["fresh"] == 160
    assert all(size == 16 and normalize for size, normalize, _ in _steps(engine))


def test_policy_switches_on_for_skewed_scores_and_reads_presamples():
    x = torch.zeros(320, 2)
    x[:, 0] = 30.0  # confidently right: score ~0
    x[::16, 0] = -30.0  # one in 16 confidently wrong: τ ~ 4 > τ_th = 2
    engine, extra = run_is(create_policy("is", presample=3), x)
    steps = 320 // 16
    on = len(engine.scored)
    assert extra["is_tau"] > 2.0 and extra["is_on_fraction"] == on / steps and on > steps // 2
    assert [len(s) for s in engine.scored] == [48] * on  # B = 3b per step while on
    assert extra["fresh"] == 16 * (steps - on) + 48 * on
    taken = _steps(engine)
    assert all(size == 16 for size, _, _ in taken)
    on_steps = [i for i, (_, normalize, _) in enumerate(taken) if not normalize]
    assert len(on_steps) == on
    for i in on_steps:  # only the k wrong examples are drawn: p = 1/k, w = 1/(48 p) = k/48
        assert bool((engine.trained[i].indices % 16 == 0).all())
        k = taken[i][2] * 48
        assert torch.allclose(k, k.round()) and bool((k == k[0]).all()) and 1 <= k[0] <= 48


def test_tau_th_zero_is_always_on_and_uniform_baseline_never_scores():
    x = torch.zeros(64, 2)
    engine, extra = run_is(create_policy("is", presample=2, tau_th=0.0), x)
    assert extra["is_on_fraction"] == 1.0 and [len(s) for s in engine.scored] == [32] * 4
    engine, extra = run_is(create_policy("is-uniform", presample=2), x)
    assert extra["is_on_fraction"] == 1.0 and not engine.scored and extra["fresh"] == 128
    assert [size for size, _, _ in _steps(engine)] == [16] * 4


def test_state_round_trip_keeps_tau():
    x = torch.zeros(64, 2)
    x[::8, 0] = -30.0
    policy = create_policy("is")
    run_is(policy, x)
    copy = create_policy("is")
    copy.load_state_dict(policy.state_dict())
    assert copy.switch.tau == policy.switch.tau and copy.switch.threshold == 2.0
