"""The seed slides' other experiments (``python -m infomax_ext experiments NAME``).

Facts that hold whatever the training does: coupling layers are invertible and their
log-determinant is that of the Jacobian; the identity-initialised skip MLP is the identity;
the condition-number helper is ``torch.linalg.cond``; the clamped objective never passes t
and has no gradient above it; S^1 features have unit norm; align / uniform follow the
formulas of REFERENCE.md and agree with the library's losses; tiny runs of each command
print their table and write their plot. Each test takes seconds on one thread.
"""
import pytest
import torch

from infomax_ext import __main__ as cli
from infomax_ext.experiments import alignuniform as AU
from infomax_ext.experiments import invertible as INV
from infomax_ext.experiments import jacobian as JAC
from infomax_ext.experiments import threshold as TH
from infomax_ext.experiments.represent import load_views
from infomax_ext.losses import AlignmentLoss, UniformityLoss


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return load_views()


def _png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------
# Invertible encoders
# ---------------------------------------------------------------------------


def _trained_like_realnvp(seed=0):
    torch.manual_seed(seed)
    f = INV.RealNVP(32, layers=4, hidden=16).double()
    with torch.no_grad():  # non-trivial scales and shifts (the last layer starts near zero)
        for p in f.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return f


def test_coupling_encoder_is_invertible_in_float64():
    f = _trained_like_realnvp()
    x = torch.rand(64, 32, dtype=torch.float64)
    y = f(x)
    assert not torch.allclose(y, x)
    assert (f.inverse(y) - x).abs().max().item() < 1e-5
    assert (f(f.inverse(x)) - x).abs().max().item() < 1e-5


def test_coupling_log_determinant_matches_slogdet():
    from torch.func import jacrev

    f = _trained_like_realnvp(1)
    x = torch.rand(5, 32, dtype=torch.float64)
    _, logdet = f.forward_logdet(x)
    for i in range(len(x)):
        J = jacrev(lambda v: f(v.unsqueeze(0)).squeeze(0))(x[i])
        sign, ld = torch.linalg.slogdet(J)
        assert sign.item() == 1.0
        assert logdet[i].item() == pytest.approx(ld.item(), abs=1e-8)


def test_single_coupling_layer_inverse_and_logdet():
    torch.manual_seed(2)
    layer = INV.AffineCoupling(torch.arange(32) % 2 == 0, hidden=8).double()
    x = torch.randn(10, 32, dtype=torch.float64)
    y, ld = layer.forward_logdet(x)
    torch.testing.assert_close(layer.inverse(y), x, atol=1e-10, rtol=0)
    # masked coordinates pass through unchanged
    torch.testing.assert_close(y[:, ::2], x[:, ::2])
    J = torch.func.jacrev(lambda v: layer(v.unsqueeze(0)).squeeze(0))(x[0])
    assert ld[0].item() == pytest.approx(torch.linalg.slogdet(J)[1].item(), abs=1e-10)


def test_invertible_command_tiny_run(tmp_path, capsys):
    assert cli.main(["experiments", "invertible", "--epochs", "2", "--probe-every", "1", "--probe-iter", "30",
                     "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for name in ("infonce", "nwj", "adversarial", "probe acc"):
        assert name in text
    _png(tmp_path / "invertible.png")


def test_adversarial_control_history(data):
    h = INV.train_adversarial(data, epochs=2, probe_every=1, probe_iter=30, layers=2, hidden=8)
    assert h["probe_epoch"] == [0, 1, 2] and len(h["probe_acc"]) == 3
    assert all(k >= -1e-6 for k in h["kl"])  # a KL divergence


# ---------------------------------------------------------------------------
# Jacobian conditioning
# ---------------------------------------------------------------------------


def test_skip_mlp_is_the_identity_at_init():
    torch.manual_seed(0)
    f = JAC.SkipMLP(32, hidden=64, blocks=3)
    x = torch.randn(50, 32)
    assert torch.equal(f(x), x)
    c = JAC.jacobian_condition(f, x[:5])
    torch.testing.assert_close(c, torch.ones(5))


def test_condition_number_helper_agrees_with_linalg_cond():
    torch.manual_seed(0)
    A = torch.randn(6, 6, dtype=torch.float64) @ torch.diag(torch.tensor([1, 2, 3, 5, 10, 50.0],
                                                                        dtype=torch.float64))
    lin = lambda x: x @ A.T  # noqa: E731
    c = JAC.jacobian_condition(lin, torch.randn(4, 6, dtype=torch.float64))
    torch.testing.assert_close(c, torch.linalg.cond(A).expand(4))
    D = torch.diag(torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64))  # known: 4 / 0.5 = 8
    assert JAC.jacobian_condition(lambda x: x @ D, torch.ones(1, 3, dtype=torch.float64)).item() == \
        pytest.approx(8.0)


def test_jacobian_command_tiny_run(tmp_path, capsys):
    assert cli.main(["experiments", "jacobian", "--epochs", "2", "--probe-every", "1", "--n-jac", "20",
                     "--probe-iter", "30", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "cond(J) median" in text
    _png(tmp_path / "jacobian.png")


def test_jacobian_history_starts_at_condition_one(data):
    h = JAC.train(data, epochs=1, probe_every=1, n_jac=10, probe_iter=30)
    assert h["probe_epoch"] == [0, 1]
    assert h["cond_median"][0] == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------
# Threshold (architecture vs estimator)
# ---------------------------------------------------------------------------


def test_clamped_objective_never_passes_t_and_stops_the_gradient():
    b = torch.tensor([0.5, 1.9, 2.0, 2.5, 7.0], requires_grad=True)
    obj = TH.clamped_objective(b, 2.0)
    assert (obj <= 2.0).all()
    obj.sum().backward()
    assert b.grad.tolist() == [1.0, 1.0, pytest.approx(b.grad[2].item()), 0.0, 0.0]
    assert b.grad[3].item() == 0.0 and b.grad[4].item() == 0.0


def test_threshold_training_objective_never_passes_t(data):
    _, h = TH.train(data, "mlp", 0.3, epochs=4)
    assert all(o <= 0.3 + 1e-6 for o in h["objective"])  # float32 t
    assert h["steps_below"] < 4 * (len(data["x1_train"]) // 128)  # the bound passed 0.5: updates stopped


def test_conv_encoder_shape():
    enc = TH.ConvEncoder(embed=12)
    assert enc(torch.rand(7, 32)).shape == (7, 12)


def test_threshold_command_tiny_run(tmp_path, capsys):
    assert cli.main(["experiments", "threshold", "--epochs", "1", "--thresholds", "0.5", "2",
                     "--embed", "16", "--probe-iter", "30", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "mlp" in text and "conv" in text and "probe acc" in text
    _png(tmp_path / "threshold.png")


# ---------------------------------------------------------------------------
# Alignment and uniformity
# ---------------------------------------------------------------------------


def test_align_uniform_follow_the_reference_formulas():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 2, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(x + 0.1 * torch.randn_like(x), dim=-1)
    # REFERENCE.md: align = mean_i |x_i - y_i|^2; uniform = log mean_{i<j} exp(-2 |x_i - x_j|^2)
    a = sum(((x[i] - y[i]) ** 2).sum() for i in range(40)) / 40
    pairs = [torch.exp(-2 * ((x[i] - x[j]) ** 2).sum()) for i in range(40) for j in range(i + 1, 40)]
    u = torch.log(sum(pairs) / len(pairs))
    assert AU.align(x, y).item() == pytest.approx(a.item(), rel=1e-12)
    assert AU.uniform(x).item() == pytest.approx(u.item(), rel=1e-12)
    assert AlignmentLoss()(x, y).item() == pytest.approx(a.item(), rel=1e-10)
    assert UniformityLoss()(x).item() == pytest.approx(u.item(), rel=1e-10)


def test_alignuniform_features_lie_on_the_circle(data):
    for method in AU.METHODS:
        g1, g2 = AU.train(data, method, epochs=1)
        r = AU.evaluate(g1, g2, data, probe_iter=30)
        assert r["features"].shape == (len(data["x1_test"]), 2)
        torch.testing.assert_close(r["features"].norm(dim=1), torch.ones(len(data["x1_test"]),
                                                                         dtype=torch.float64))
        assert 0 <= r["align"] <= 4 and r["uniform"] <= 0


def test_alignuniform_command_tiny_run(tmp_path, capsys):
    assert cli.main(["experiments", "alignuniform", "--epochs", "2", "--probe-iter", "30",
                     "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for name in ("random init", "contrastive", "direct", "align", "uniform"):
        assert name in text
    _png(tmp_path / "alignuniform.png")


def test_experiments_usage():
    assert cli.main(["experiments"]) == 2
    assert cli.main(["experiments", "--help"]) == 0
