"""estimate_mi (mi.py) on correlated Gaussians with a known MI.

x, eps ~ N(0, I_d), y = rho x + sqrt(1 - rho^2) eps: I(X; Y) = -d/2 log(1 - rho^2).
Small problems (d = 5, a few hundred steps, one split) so the file runs in seconds on a CPU.
"""
import math
import warnings

import pytest
import torch

import infomax_ext as ie
from infomax_ext import critics as C
from infomax_ext.losses import BoundLoss
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


FAST = dict(steps=300, batch_size=128, lr=1e-3, hidden=64, eval_batches=16, folds=1, progress=False)


@pytest.mark.parametrize("estimator,critic,seed", [("smile", "separable", 11), ("infonce", "concat", 12),
                                                   ("nwj", "separable", 13), ("mine", "concat", 14)])
def test_recovers_known_mi_on_correlated_gaussian(estimator, critic, seed):
    x, y = correlated_gaussian(6000, 5, 1.0, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a run that generalises raises no overfitting warning
        r = estimate_mi(x, y, estimator, critic, seed=2, **FAST)
    # true MI 1 nat; a few hundred steps of a small critic land within 0.3 of it, and far
    # from 0 (an untrained critic) and from 2 (no lower bound overshoots this far)
    assert abs(r.estimate - 1.0) < 0.3, r
    assert 0 < r.std < 0.2  # bootstrap spread of a 1200-pair estimate
    assert r.estimate <= 1.0 + 3 * r.std + 0.05  # a lower bound
    assert r.n_test == 1200 and r.spread == "bootstrap"


def test_infonce_on_the_whole_held_out_split_never_exceeds_log_of_its_size():
    # MI 6 nats >> log 40 = 3.69 > log 16 = 2.77: the bound saturates at the ceiling of the
    # split it is evaluated on (all 40 pairs at once), not at that of a training batch.
    x, y = correlated_gaussian(4000, 5, 6.0, seed=3)
    r = estimate_mi(x, y, "infonce", "separable", seed=1, test_fraction=0.01,
                    **dict(FAST, batch_size=16, steps=400))
    assert r.n_test == 40 and r.log_eval_size == pytest.approx(math.log(40))
    assert r.estimate <= math.log(40) + 1e-6
    assert (r.eval_values <= math.log(40) + 1e-6).all()  # every bootstrap resample too
    assert (r.curve <= math.log(16) + 1e-6).all()  # training batches: log K
    assert r.estimate > math.log(16) + 0.3  # more than any batch of 16 could give
    assert r.log_batch_size == pytest.approx(math.log(16))


def test_folds_evaluate_every_pair_once():
    x, y = correlated_gaussian(2000, 3, 4.0, seed=4)  # log 400 = 5.99 > 4
    r = estimate_mi(x, y, "infonce", "concat", seed=0, **dict(FAST, folds=5, steps=60))
    assert r.folds == 5 and r.fold_estimates.shape == (5,) and r.n_test == 400
    assert r.estimate == pytest.approx(r.fold_estimates.mean().item())  # equal folds: plain mean
    assert (r.fold_estimates <= math.log(400) + 1e-6).all()
    assert len(set(r.fold_estimates.tolist())) == 5  # five critics, five test splits


def test_with_folds_no_critic_sees_its_test_pairs():
    g = torch.Generator().manual_seed(10)
    x, y = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)  # independent: MI 0
    with pytest.warns(UserWarning, match="overfits"):  # memorises its training pairs ...
        r = estimate_mi(x, y, "infonce", "separable", steps=300, batch_size=64, lr=1e-2, hidden=256,
                        folds=2, val_fraction=0.0, progress=False)
    assert r.train_estimate > 1.0
    assert r.estimate < 0.1 and (r.fold_estimates < 0.1).all()  # ... and reads nothing on the others


def test_the_critic_of_the_best_validation_step_is_returned():
    x, y = correlated_gaussian(1000, 3, 1.0, seed=11)
    r = estimate_mi(x, y, "infonce", "concat", steps=300, batch_size=64, lr=1e-2, hidden=64, folds=1,
                    eval_every=10, patience=None, overfit_tol=None, seed=3, progress=False)
    # the split estimate_mi drew (seed 3; 200 test pairs, then 200 validation pairs)
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(3))
    val = perm[200:400]
    xs, ys = [(t - t.mean(0)) / t.std(0) for t in (x, y)]
    with torch.no_grad():
        again = -BoundLoss("infonce", r.critic)(xs[val], ys[val]).item()
    assert again == pytest.approx(r.val_estimate, abs=1e-5)
    assert r.best_step < 300  # the last step was not the best one (else the check is vacuous)


def test_standardisation_makes_the_estimate_invariant_to_affine_maps():
    x, y = correlated_gaussian(3000, 3, 1.0, seed=5)
    scale_x, scale_y = torch.tensor([1e3, 1e-3, 40.0]), torch.tensor([-200.0, 5e-3, 1.0])
    x2, y2 = x * scale_x + 7.0, y * scale_y - 300.0  # MI unchanged
    kw = dict(FAST, steps=150, lr=5e-3)
    a = estimate_mi(x, y, "infonce", "concat", **kw)
    b = estimate_mi(x2, y2, "infonce", "concat", **kw)
    assert abs(a.estimate - b.estimate) < max(0.02, a.std), (a.estimate, b.estimate)
    assert a.estimate > 0.6
    # without it the same run is far off (the check above is not vacuous)
    c = estimate_mi(x2, y2, "infonce", "concat", standardize=False, **kw)
    assert abs(c.estimate - a.estimate) > 0.1, (a.estimate, c.estimate)


def test_overfitting_warning_fires_on_a_deliberately_overfit_run():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)  # independent: MI 0
    with pytest.warns(UserWarning, match="overfits"):
        r = estimate_mi(x, y, "infonce", "separable", steps=400, batch_size=64, lr=1e-2, hidden=256,
                        test_fraction=0.25, val_fraction=0.0, folds=1, progress=False)
    assert r.train_estimate > r.estimate + 0.2
    assert r.best_step == 400 and len(r.curve) == 400  # no validation split: the last step


def test_best_held_out_step_is_kept_and_training_stops_early():
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(1200, 8, generator=g), torch.randn(1200, 8, generator=g)  # nothing to learn
    r = estimate_mi(x, y, "infonce", "separable", steps=2000, batch_size=64, lr=1e-2, hidden=256,
                    folds=1, eval_every=10, patience=5, overfit_tol=None, progress=False)
    steps, values = r.val_curve
    assert len(r.curve) < 2000 and len(r.curve) == int(steps[-1])  # stopped early
    assert len(steps) - 1 - int(values.argmax()) == 5  # five evaluations without improvement
    assert r.val_estimate == values.max().item() and r.best_step == int(steps[values.argmax()])


def test_spread_by_batches_is_that_of_one_batch():
    x, y = correlated_gaussian(3000, 3, 1.0, seed=8)
    kw = dict(FAST, steps=100, batch_size=64)
    boot = estimate_mi(x, y, "nwj", "concat", **kw)
    bat = estimate_mi(x, y, "nwj", "concat", spread="batches", **kw)
    assert boot.estimate == bat.estimate  # the spread changes only how std is measured
    assert bat.std == pytest.approx(bat.eval_values.std().item()) and bat.eval_values.shape == (16,)
    # a 64-pair batch's value spreads more than the 600-pair estimate (~sqrt(600/64) = 3x)
    assert bat.std > 1.5 * boot.std


def test_result_holds_curve_spread_and_critic(capsys):
    x, y = correlated_gaussian(1000, 3, 0.5, seed=4)
    r = estimate_mi(x, y, "dv", "bilinear", steps=50, batch_size=32, eval_batches=5, eval_every=10,
                    folds=1, progress=False)
    assert isinstance(r, MIEstimate) and isinstance(r.critic, C.Bilinear)
    assert torch.isfinite(r.curve).all() and 0 < len(r.curve) <= 50
    assert r.eval_values.shape == (5,)
    assert r.std == pytest.approx(r.eval_values.std().item())
    assert r.val_curve.shape[0] == 2 and math.isfinite(r.val_estimate) and math.isfinite(r.train_estimate)
    assert float(r) == r.estimate and set(r.as_dict()) >= {"estimate", "std", "curve", "train_estimate"}
    assert capsys.readouterr().err == ""  # progress=False: no bar
    estimate_mi(x, y, "dv", "bilinear", steps=5, batch_size=32, eval_batches=2, folds=1, progress=True)
    assert "estimate_mi[dv]" in capsys.readouterr().err  # the tqdm bar


def test_seeded_runs_repeat_and_leave_the_global_rng_alone():
    x, y = correlated_gaussian(800, 2, 0.5, seed=5)
    kw = dict(steps=30, batch_size=32, eval_batches=3, hidden=16, folds=2, progress=False)
    state = torch.get_rng_state()
    a = estimate_mi(x, y, "js", "separable", seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    b = estimate_mi(x, y, "js", "separable", seed=7, **kw)
    torch.testing.assert_close(a.curve, b.curve)
    assert a.estimate == b.estimate
    c = estimate_mi(x, y, "js", "separable", seed=8, **kw)
    assert not torch.equal(a.curve, c.curve)


def test_every_estimator_and_a_critic_module_run():
    x, y = correlated_gaussian(600, 4, 1.0, seed=6)
    for est in ("infonce", "nwj", "dv", "mine", "js", "smile", "tuba"):
        r = estimate_mi(x, y, est, "concat", steps=20, batch_size=32, eval_batches=2, hidden=16,
                        folds=1, progress=False)
        assert math.isfinite(r.estimate), est
    critic = C.Cosine(0.5, learnable=True)
    before = critic.logit_scale.detach().clone()
    r = estimate_mi(x, y, "infonce", critic, steps=20, batch_size=32, eval_batches=2, folds=1, progress=False)
    assert r.critic is critic and not torch.equal(critic.logit_scale.detach(), before)


def test_defaults_scale_with_the_data():
    from infomax_ext.mi import _auto_hidden, _auto_lr

    assert _auto_hidden(1, 1) == 64 and _auto_hidden(5, 5) == 160 and _auto_hidden(50, 50) == 256
    assert _auto_lr(1, 1) == 5e-3 and _auto_lr(50, 50) == 1e-3
    assert _auto_lr(5, 5) == pytest.approx(1e-2 * 10 ** -0.7)
    x, y = correlated_gaussian(600, 4, 1.0, seed=9)
    r = estimate_mi(x, y, "infonce", steps=2, batch_size=32, folds=1, progress=False)
    assert isinstance(r.critic, C.ConcatMLP) and r.critic.first.out_features == 128


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
    with pytest.raises(ValueError, match="folds"):
        estimate_mi(x, y, folds=0, batch_size=16, progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        estimate_mi(x, y, val_fraction=0.8, batch_size=16, progress=False)
    with pytest.raises(ValueError, match="spread"):
        estimate_mi(x, y, spread="jackknife", batch_size=16, progress=False)
