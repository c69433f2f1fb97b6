"""The fused symmetric_softmax_mean op (half of the symmetric S) and the uniformity
built on it, against the materialising reference and Wang & Isola's pdist formula."""
import math
import os
import subprocess
import sys

import pytest
import torch

import infomax_ext
from infomax_ext import estimators as est, ops, reference as ref


pytestmark = pytest.mark.skipif(not infomax_ext._backend.HAS_C, reason="compiled module not built")

# (K, d): K=1 and 2, row-block edges (128 on CPU), column-tile edges (512), sizes
# that are neither, and a K with several column tiles per row block.
SIZES = [(1, 3), (2, 5), (3, 1), (63, 4), (127, 7), (128, 3), (129, 6), (300, 2), (513, 5), (1100, 9)]


def inputs(K, d, device="cpu", dtype=torch.float64, seed=0, noncontig=False, with_bias=True,
           requires_grad=False):
    g = torch.Generator().manual_seed(1000 * K + seed)
    x = torch.randn(K, d, generator=g, dtype=torch.float64)
    bias = torch.randn(K, generator=g, dtype=torch.float64) if with_bias else None
    x = x.to(device=device, dtype=dtype)
    if noncontig:
        x = x.t().contiguous().t()  # column-major: same values
    bias = bias.to(device=device, dtype=dtype) if bias is not None else None
    x.requires_grad_(requires_grad)
    if bias is not None:
        bias.requires_grad_(requires_grad)
    return x, bias


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("K, d", SIZES)
def test_values_match_reference(device, dtype, K, d):
    tol = {} if dtype == torch.float64 else dict(rtol=5e-5, atol=5e-5)
    for n, scale in enumerate([0.7, 2.5, -1.3]):
        x, bias = inputs(K, d, device, dtype, seed=n, noncontig=n == 1, with_bias=n != 2)
        lse, mean = ops.symmetric_softmax_mean(x, scale, bias)
        lse_o, mean_o = ref.symmetric_softmax_mean(x, scale, bias)
        torch.testing.assert_close(lse, lse_o, **tol)
        torch.testing.assert_close(mean, mean_o, **tol)


@pytest.mark.parametrize("K, d", [(1, 2), (2, 3), (129, 4), (1100, 5)])
def test_lse_only_without_mean(device, K, d):
    x, bias = inputs(K, d, device)
    lse, mean = ops.symmetric_softmax_mean(x, 1.7, bias, with_mean=False)
    assert mean.shape == (0,)
    torch.testing.assert_close(lse, ref.symmetric_softmax_mean(x, 1.7, bias)[0])


def test_one_row_has_no_pair():
    lse, mean = ops.symmetric_softmax_mean(torch.randn(1, 4, dtype=torch.float64), 1.0)
    assert lse.item() == -math.inf
    assert torch.equal(mean, torch.zeros(1, 4, dtype=torch.float64))


def test_masked_rows_and_columns_never_nan():
    """A -inf bias masks a row and its column: that row's lse is -inf and its mean 0;
    the other rows reduce over the unmasked entries only."""
    x, bias = inputs(70, 4)
    bias = bias.clone()
    bias[[0, 5, 69]] = -math.inf
    lse, mean = ops.symmetric_softmax_mean(x, 1.5, bias)
    lse_o, mean_o = ref.symmetric_softmax_mean(x, 1.5, bias)
    assert torch.isinf(lse[[0, 5, 69]]).all() and not torch.isnan(lse).any()
    assert not torch.isnan(mean).any() and (mean[[0, 5, 69]] == 0).all()
    torch.testing.assert_close(lse, lse_o)
    torch.testing.assert_close(mean, mean_o)


def test_nan_propagates():
    x, _ = inputs(80, 3)
    x = x.clone()
    x[7, 1] = math.nan
    lse, mean = ops.symmetric_softmax_mean(x, 1.0)
    assert torch.isnan(lse).all() and torch.isnan(mean).all()  # every row pairs with row 7


@pytest.mark.parametrize("scale", [40.0, 200.0])
def test_large_logits_match_float64(scale):
    """Scores up to ~1e3: the online max keeps float32 exact to its precision."""
    x, bias = inputs(600, 8, seed=3)
    x = torch.nn.functional.normalize(x, dim=1)
    lse64, mean64 = ref.symmetric_softmax_mean(x, scale, bias)
    lse, mean = ops.symmetric_softmax_mean(x.float(), scale, bias.float())
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    x, bias = inputs(130, 16, dtype=dtype)
    lse, mean = ops.symmetric_softmax_mean(x, 0.5, bias)
    assert lse.dtype == mean.dtype == torch.float32
    lse_o, mean_o = ref.symmetric_softmax_mean(x.double(), 0.5, bias.double())
    torch.testing.assert_close(lse.double(), lse_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), mean_o, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K, d", [(2, 3), (9, 4), (70, 3)])
def test_gradcheck_lse(K, d):
    x, bias = inputs(K, d, requires_grad=True)
    scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, s, b: ops.symmetric_softmax_mean(x, s, b)[0], (x, scale, bias))


def test_mean_has_no_gradient():
    x, _ = inputs(9, 3, requires_grad=True)
    lse, mean = ops.symmetric_softmax_mean(x, 1.0)
    assert lse.requires_grad and not mean.requires_grad


def test_opcheck():
    for K, d in [(2, 3), (70, 5)]:
        x, bias = inputs(K, d, requires_grad=True)
        torch.library.opcheck(torch.ops.infomax_ext.symmetric_softmax_mean.default,
                              (x, torch.tensor(0.6, dtype=torch.float64), bias))
        torch.library.opcheck(torch.ops.infomax_ext.symmetric_softmax_mean.default,
                              (x.detach().float(), torch.tensor(1.2), None))
        torch.library.opcheck(torch.ops.infomax_ext.symmetric_softmax_mean.default,
                              (x, torch.tensor(0.6, dtype=torch.float64), bias, False))


def test_compile_fullgraph():
    x, bias = inputs(70, 5, dtype=torch.float32, requires_grad=True)
    f = torch.compile(lambda x, b: ops.symmetric_softmax_mean(x, 1.5, b), fullgraph=True)
    lse, mean = f(x, bias)
    lse_e, mean_e = ops.symmetric_softmax_mean(x, 1.5, bias)
    torch.testing.assert_close(lse, lse_e)
    torch.testing.assert_close(mean, mean_e)
    ge = torch.autograd.grad(lse_e.sum(), [x, bias])
    for a, b in zip(torch.autograd.grad(lse.sum(), [x, bias]), ge):
        torch.testing.assert_close(a, b)


def test_bad_inputs_raise_clear_errors():
    f = torch.ops.infomax_ext.symmetric_softmax_mean
    one = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        f(torch.randn(3), one, None)
    with pytest.raises(RuntimeError, match="non-empty"):
        f(torch.randn(0, 3), one, None)
    with pytest.raises(RuntimeError, match="floating point"):
        f(torch.ones(3, 2, dtype=torch.int64), one, None)
    with pytest.raises(RuntimeError, match="one element"):
        f(torch.randn(3, 2), torch.ones(2), None)
    with pytest.raises(RuntimeError, match=r"symmetric_softmax_mean: bias must have shape \(K,\) = \(3,\)"):
        f(torch.randn(3, 2), one, torch.zeros(4))


def test_reruns_are_bitwise_identical_and_threads_agree():
    x, bias = inputs(1100, 9, dtype=torch.float32)
    first = ops.symmetric_softmax_mean(x, 0.9, bias)
    again = ops.symmetric_softmax_mean(x, 0.9, bias)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.symmetric_softmax_mean(x, 0.9, bias)
    finally:
        torch.set_num_threads(n)
    for a, b in zip(first, single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_narrower_isa_clones_match_reference(isa):
    """INFOMAX_EXT_CPU_ISA caps the clone of the epilogues (base, avx2; the default run
    takes the widest): rerun the value comparisons in a fresh process on that path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, INFOMAX_EXT_CPU_ISA=isa, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_symmetric.py",
                          "-k", "values_match_reference and cpu or large_logits"],
                         capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stdout[-3000:]


# ---------------------------------------------------------------------------
# Uniformity on the op: value and the gradient from the forward pass
# ---------------------------------------------------------------------------


def pairwise_uniformity(x, t):
    """Independent of both kernels: every pair's squared distance, written out."""
    K = x.shape[0]
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    logits = (-t * sq).masked_fill(torch.eye(K, dtype=torch.bool, device=x.device), -math.inf)
    rows = torch.logsumexp(logits, 1)
    return torch.logsumexp(rows, 0) - math.log(K * (K - 1)), rows - math.log(K - 1)


@pytest.mark.parametrize("K", [2, 3, 65, 600])
def test_uniformity_value_rows_and_gradients(device, K):
    x, _ = inputs(K, 6, device, seed=K, with_bias=False)
    x = torch.nn.functional.normalize(x, dim=1).requires_grad_()
    value, rows = est.uniformity_terms(x, t=1.5)
    value_o, rows_o = pairwise_uniformity(x, 1.5)
    torch.testing.assert_close(value, value_o)
    torch.testing.assert_close(rows, rows_o)
    torch.testing.assert_close(value, ref.uniformity_pdist(x, t=1.5))
    # the value alone (the fast gradient), and value plus weighted rows (the general one)
    torch.testing.assert_close(torch.autograd.grad(value, x, retain_graph=True)[0],
                               torch.autograd.grad(value_o, x, retain_graph=True)[0])
    w = torch.randn(K, generator=torch.Generator().manual_seed(K), dtype=torch.float64).to(device)
    mixed = torch.autograd.grad(0.3 * value + (w * rows).sum(), x)[0]
    torch.testing.assert_close(mixed, torch.autograd.grad(0.3 * value_o + (w * rows_o).sum(), x)[0])


def test_uniformity_without_grad_takes_the_lse_only_path(monkeypatch):
    """Under no_grad (or for inputs without requires_grad) no weighted means are
    computed; the value and rows are those of the gradient path."""
    x, _ = inputs(300, 6, with_bias=False, requires_grad=True)
    value, rows = est.uniformity_terms(x, t=2.0)
    seen = []
    real = ops.symmetric_softmax_mean
    monkeypatch.setattr(ops, "symmetric_softmax_mean", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    with torch.no_grad():
        value_ng, rows_ng = est.uniformity_terms(x, t=2.0)
    value_d, _ = est.uniformity_terms(x.detach(), t=2.0)
    assert seen == [{"with_mean": False}] * 2
    torch.testing.assert_close(value_ng, value.detach())
    torch.testing.assert_close(rows_ng, rows.detach())
    torch.testing.assert_close(value_d, value.detach())


@pytest.mark.parametrize("K", [2, 5, 70])
def test_uniformity_gradcheck(K):
    x, _ = inputs(K, 4, with_bias=False, requires_grad=True)
    torch.autograd.gradcheck(lambda x: est.uniformity_terms(x, 0.7), (x,))
    torch.autograd.gradcheck(lambda x: est.uniformity(x, 2.0), (x,))


def test_uniformity_compiles_fullgraph():
    x, _ = inputs(37, 6, dtype=torch.float32, with_bias=False, requires_grad=True)
    f = torch.compile(lambda x: est.uniformity(x, 2.0), fullgraph=True)
    value = f(x)
    (g,) = torch.autograd.grad(value, x)
    value_e = est.uniformity(x, 2.0)
    torch.testing.assert_close(value, value_e)
    torch.testing.assert_close(g, torch.autograd.grad(value_e, x)[0])


@pytest.mark.parametrize("t", [0.0, -1.0, torch.tensor(2.0)])
def test_uniformity_rejects_bad_t(t):
    with pytest.raises(ValueError, match="t must be a number > 0"):
        est.uniformity(torch.randn(5, 3), t)
