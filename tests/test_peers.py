"""Our losses against the peers users swap them for: the installed packages where they are
available (pytorch-metric-learning, info-nce-pytorch), and the published formulas of
open_clip's ClipLoss, lightly's NTXentLoss and Wang & Isola's align/uniform losses written
out here (their packages pull torchvision or are not packaged).

"Same number" means: within 1e-5 in float32 (the issue's bar) and to float64 precision,
gradients included.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import infomax_ext as ie
from infomax_ext import losses as L

pytestmark = [pytest.mark.skipif(not ie._backend.HAS_C, reason="compiled module not built"),
              pytest.mark.usefixtures("one_thread")]
F32 = dict(rtol=1e-5, atol=1e-5)


def rand(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()


def check(ours, theirs, inputs, dtype):
    tol = F32 if dtype == torch.float32 else {}
    torch.testing.assert_close(ours, theirs, **tol)
    go = torch.autograd.grad(ours, inputs)
    gt = torch.autograd.grad(theirs, inputs)
    for a, b in zip(go, gt):
        torch.testing.assert_close(a, b, **tol)


DTYPES = [torch.float64, torch.float32]


# ---------------------------------------------------------------------------
# installed peers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [2, 33])
def test_ntxent_equals_pytorch_metric_learning(N, dtype):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    z1, z2 = rand(N, 12, seed=N, dtype=dtype), rand(N, 12, seed=N + 1, dtype=dtype)
    labels = torch.cat([torch.arange(N), torch.arange(N)])  # paired labels: one positive each
    theirs = pml.NTXentLoss(temperature=0.07)(torch.cat([z1, z2]), labels)
    check(L.NTXentLoss(temperature=0.07)(z1, z2), theirs, [z1, z2], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_infonce_equals_info_nce_pytorch(dtype):
    info_nce = pytest.importorskip("info_nce")
    q, k = rand(24, 10, seed=3, dtype=dtype), rand(24, 10, seed=4, dtype=dtype)
    bank = rand(50, 10, seed=5, dtype=dtype)
    # without negative keys: the other positive keys are the negatives
    check(L.InfoNCELoss(0.1)(q, k), info_nce.InfoNCE(temperature=0.1)(q, k), [q, k], dtype)
    # with unpaired negative keys: positive + bank only (MoCo)
    check(L.InfoNCELoss(0.1, bank_only=True)(q, k, negatives=bank),
          info_nce.InfoNCE(temperature=0.1, negative_mode="unpaired")(q, k, bank), [q, k, bank], dtype)


# ---------------------------------------------------------------------------
# published formulas, written out
# ---------------------------------------------------------------------------


def open_clip_loss(image_features, text_features, logit_scale, logit_bias=None):
    """open_clip ``ClipLoss.forward`` (world_size 1): logit_scale already exponentiated."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    labels = torch.arange(logits_per_image.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_loss_equals_open_clip(dtype):
    img = F.normalize(rand(40, 16, seed=6, dtype=dtype), dim=-1)
    txt = F.normalize(rand(40, 16, seed=7, dtype=dtype), dim=-1)
    ours = L.ClipLoss().to(dtype)  # logit_scale = log(1 / 0.07)
    theirs_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=dtype))
    out = ours(img, txt)
    ref = open_clip_loss(img, txt, theirs_scale.exp())
    check(out, ref, [img, txt], dtype)
    g_ours = torch.autograd.grad(ours(img, txt), ours.logit_scale)[0]
    g_theirs = torch.autograd.grad(open_clip_loss(img, txt, theirs_scale.exp()), theirs_scale)[0]
    torch.testing.assert_close(g_ours, g_theirs, **(F32 if dtype == torch.float32 else {}))
    # open_clip's call signature: the model's exponentiated scale and a bias passed in
    scale = torch.tensor(20.0, dtype=dtype, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=dtype)
    check(ours(img, txt, scale, bias), open_clip_loss(img, txt, scale, bias), [img, txt, scale], dtype)


def lightly_ntxent(out0, out1, temperature, negatives=None):
    """lightly ``NTXentLoss.forward`` (single process); ``negatives`` (d, bank) as lightly stores them."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    n = out0.shape[0]
    if negatives is not None:
        sim_pos = torch.einsum("nc,nc->n", out0, out1).unsqueeze(-1)
        sim_neg = torch.einsum("nc,ck->nk", out0, negatives)
        logits = torch.cat([sim_pos, sim_neg], dim=1) / temperature
        labels = torch.zeros(n, dtype=torch.long)
    else:
        diag = torch.eye(n, dtype=torch.bool)
        l00 = torch.einsum("nc,mc->nm", out0, out0) / temperature
        l01 = torch.einsum("nc,mc->nm", out0, out1) / temperature
        l10 = torch.einsum("nc,mc->nm", out1, out0) / temperature
        l11 = torch.einsum("nc,mc->nm", out1, out1) / temperature
        l00, l11 = l00[~diag].view(n, -1), l11[~diag].view(n, -1)
        logits = torch.cat([torch.cat([l01, l00], 1), torch.cat([l10, l11], 1)])
        labels = torch.arange(n).repeat(2)
    return F.cross_entropy(logits, labels)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ntxent_and_moco_equal_lightly(dtype):
    z1, z2 = rand(31, 8, seed=8, dtype=dtype), rand(31, 8, seed=9, dtype=dtype)
    check(L.NTXentLoss(0.5)(z1, z2), lightly_ntxent(z1, z2, 0.5), [z1, z2], dtype)
    # lightly's bank holds normalised, detached keys (we normalise them again: a no-op)
    bank = F.normalize(rand(100, 8, seed=10, dtype=dtype), dim=1).detach()
    check(L.InfoNCELoss(0.5, bank_only=True)(z1, z2, negatives=bank),
          lightly_ntxent(z1, z2, 0.5, bank.T), [z1, z2], dtype)


def align_loss(x, y, alpha=2):  # Wang & Isola, README of SsnL/align_uniform
    return (x - y).norm(p=2, dim=1).pow(alpha).mean()


def uniform_loss(x, t=2):
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()


@pytest.mark.parametrize("dtype", DTYPES)
def test_align_uniform_equal_wang_isola(dtype):
    x = F.normalize(rand(64, 32, seed=11, dtype=dtype), dim=1)
    y = F.normalize(x + 0.3 * rand(64, 32, seed=12, dtype=dtype), dim=1)
    x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
    check(L.AlignmentLoss()(x, y), align_loss(x, y), [x, y], dtype)
    check(L.AlignmentLoss(alpha=3)(x, y), align_loss(x, y, 3), [x, y], dtype)
    check(L.UniformityLoss()(x), uniform_loss(x), [x], dtype)
    check(L.UniformityLoss(t=5)(y), uniform_loss(y, 5), [y], dtype)
    # the STL-10 recipe: align * align_w + (uniform(x) + uniform(y)) / 2 * unif_w
    # on the encoder's raw outputs, which the recipe L2-normalises first
    xr, yr = (3 * x).detach().requires_grad_(), (0.5 * y).detach().requires_grad_()
    xn, yn = F.normalize(xr, dim=1), F.normalize(yr, dim=1)
    recipe = align_loss(xn, yn) + 0.5 * (uniform_loss(xn) + uniform_loss(yn)) / 2
    check(L.AlignUniformLoss(lam=0.5)(xr, yr), recipe, [xr, yr], dtype)


def test_uniformity_finite_where_wang_isola_underflows():
    # 8 nearly orthogonal unit vectors: |x_i - x_j|^2 ~ 2, exp(-120) underflows float32
    x = F.normalize(torch.eye(8) + 0.01 * rand(8, 8, seed=13, dtype=torch.float32), dim=1).detach()
    t = 60.0
    assert uniform_loss(x, t) == -math.inf
    ours = L.UniformityLoss(t=t)(x)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours.double(), ie.reference.uniformity(x.double(), t), rtol=1e-4, atol=1e-4)
