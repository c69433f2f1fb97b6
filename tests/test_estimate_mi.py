"""estimate_mi (mi.py) on correlated Gaussians with a known MI.

x, eps ~ N(0, I_d), y = rho x + sqrt(1 - rho^2) eps: I(X; Y) = -d/2 log(1 - rho^2).
Small problems (d = 5, a few hundred steps) so the file runs in seconds on a CPU.
"""
import math

import pytest
import torch

import infomax_ext as ie
from infomax_ext import critics as C
from infomax_ext.mi import MIEstimate, estimate_mi

pytestmark = [pytest.mark.skipif(not ie._backend.HAS_C, reason="compiled module not built"),
              pytest.mark.usefixtures("one_thread")]


def correlated_gaussian(n, d, mi, seed, cubic=False):
    g = torch.Generator().manual_seed(seed)
    rho = math.sqrt(1 - math.exp(-2 * mi / d))
    x = torch.randn(n, d, generator=g)
    y = rho * x + math.sqrt(1 - rho ** 2) * torch.randn(n, d, generator=g)
    assert abs(-d / 2 * math.log(1 - rho ** 2) - mi) < 1e-9
    return x, (y ** 3 if cubic else y)


FAST = dict(steps=300, batch_size=128, lr=1e-3, hidden=64, eval_batches=16, progress=False)


@pytest.mark.parametrize("estimator,critic,seed", [("smile", "separable", 11), ("infonce", "concat", 12),
                                                   ("nwj", "separable", 13), ("mine", "concat", 14)])
def test_recovers_known_mi_on_correlated_gaussian(estimator, critic, seed):
    x, y = correlated_gaussian(6000, 5, 1.0, seed=seed)
    r = estimate_mi(x, y, estimator, critic, seed=2, **FAST)
    # true MI 1 nat; a few hundred steps of a small critic land within 0.3 of it, and far
    # from 0 (an untrained critic) and from 2 (no lower bound overshoots this far)
    assert abs(r.estimate - 1.0) < 0.3, r
    assert 0 < r.std < 0.5
    assert r.estimate <= 1.0 + 3 * r.std / math.sqrt(len(r.eval_values)) + 0.1  # a lower bound


def test_infonce_estimate_stays_below_log_batch_size():
    x, y = correlated_gaussian(4000, 5, 6.0, seed=3)  # MI 6 nats >> log 16 = 2.77
    r = estimate_mi(x, y, "infonce", "separable", seed=1, **dict(FAST, batch_size=16, steps=400))
    assert (r.eval_values <= math.log(16) + 1e-6).all()
    assert (r.curve <= math.log(16) + 1e-6).all()
    assert r.estimate > math.log(16) - 0.6  # and saturates near the ceiling
    assert r.log_batch_size == pytest.approx(math.log(16))


def test_result_holds_curve_spread_and_critic(capsys):
    x, y = correlated_gaussian(1000, 3, 0.5, seed=4)
    r = estimate_mi(x, y, "dv", "bilinear", steps=50, batch_size=32, eval_batches=5, progress=False)
    assert isinstance(r, MIEstimate) and isinstance(r.critic, C.Bilinear)
    assert r.curve.shape == (50,) and torch.isfinite(r.curve).all()
    assert r.eval_values.shape == (5,)
    assert r.estimate == pytest.approx(r.eval_values.mean().item())
    assert r.std == pytest.approx(r.eval_values.std().item())
    assert float(r) == r.estimate and set(r.as_dict()) >= {"estimate", "std", "curve"}
    assert capsys.readouterr().err == ""  # progress=False: no bar
    estimate_mi(x, y, "dv", "bilinear", steps=5, batch_size=32, eval_batches=2, progress=True)
    assert "estimate_mi[dv]" in capsys.readouterr().err  # the tqdm bar


def test_seeded_runs_repeat_and_leave_the_global_rng_alone():
    x, y = correlated_gaussian(800, 2, 0.5, seed=5)
    state = torch.get_rng_state()
    a = estimate_mi(x, y, "js", "separable", steps=30, batch_size=32, eval_batches=3, hidden=16,
                    seed=7, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = estimate_mi(x, y, "js", "separable", steps=30, batch_size=32, eval_batches=3, hidden=16,
                    seed=7, progress=False)
    torch.testing.assert_close(a.curve, b.curve)
    c = estimate_mi(x, y, "js", "separable", steps=30, batch_size=32, eval_batches=3, hidden=16,
                    seed=8, progress=False)
    assert not torch.equal(a.curve, c.curve)


def test_every_estimator_and_a_critic_module_run():
    x, y = correlated_gaussian(600, 4, 1.0, seed=6)
    for est in ("infonce", "nwj", "dv", "mine", "js", "smile", "tuba"):
        r = estimate_mi(x, y, est, "concat", steps=20, batch_size=32, eval_batches=2, hidden=16,
                        progress=False)
        assert math.isfinite(r.estimate), est
    critic = C.Cosine(0.5, learnable=True)
    before = critic.logit_scale.detach().clone()
    r = estimate_mi(x, y, "infonce", critic, steps=20, batch_size=32, eval_batches=2, progress=False)
    assert r.critic is critic and not torch.equal(critic.logit_scale.detach(), before)


def test_bad_arguments_raise():
    x, y = correlated_gaussian(100, 2, 0.5, seed=7)
    with pytest.raises(ValueError, match="same number of pairs"):
        estimate_mi(x, y[:50], progress=False)
    with pytest.raises(ValueError, match="too few"):
        estimate_mi(x, y, batch_size=64, progress=False)
    with pytest.raises(ValueError, match="unknown estimator"):
        estimate_mi(x, y, "foo", batch_size=16, progress=False)
    with pytest.raises(ValueError, match="unknown critic"):
        estimate_mi(x, y, critic="foo", batch_size=16, progress=False)
    with pytest.raises(ValueError, match="dot"):
        estimate_mi(x, y[:, :1], critic="dot", batch_size=16, progress=False)
