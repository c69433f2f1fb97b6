"""The fused score_reduce op against the materialising reference."""
import math
import os
import subprocess
import sys

import pytest
import torch

import infomax_ext
from infomax_ext import ops, reference as ref
from helpers import make_bias, make_pair, sample_inputs

pytestmark = pytest.mark.skipif(not infomax_ext._backend.HAS_C, reason="compiled module not built")
ARGS = ("a", "b", "scale", "row_bias", "col_bias")


def run_both(kw, reductions=ops.ALL_REDUCTIONS, tau=2.0):
    fused = ops.score_reduce(**kw, reductions=reductions, clamp_tau=tau)
    oracle = ref.score_reduce(**kw, reductions=reductions, clamp_tau=tau)
    return fused, oracle


def grads_of(outputs, weights, kw):
    inputs = [kw[k] for k in ARGS if kw[k] is not None]
    loss = sum((w * o).sum() for w, o in zip(weights, outputs) if o.numel())
    return torch.autograd.grad(loss, inputs, allow_unused=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1])
def test_values_and_gradients_match_reference(device, dtype, seed):
    tol = {} if dtype == torch.float64 else dict(rtol=5e-5, atol=5e-5)
    for kw in sample_inputs(device, dtype, requires_grad=True, seed=seed):
        fused, oracle = run_both(kw)
        for f, o in zip(fused, oracle):
            torch.testing.assert_close(f, o, **tol)
        g = torch.Generator().manual_seed(seed)
        weights = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in oracle]
        for gf, go in zip(grads_of(fused, weights, kw), grads_of(oracle, weights, kw)):
            torch.testing.assert_close(gf, go, **tol)


@pytest.mark.parametrize("bit", [ops.ROW_LSE, ops.COL_LSE, ops.NEG_LSE, ops.NEG_CLAMP_LSE, ops.NEG_SOFTPLUS])
def test_single_reduction_only_fills_its_output(bit):
    a, b = make_pair(9, 70, 4, requires_grad=True)
    kw = dict(a=a, b=b, scale=torch.tensor(1.3, dtype=torch.float64), row_bias=None, col_bias=None,
              pos_offset=3)
    fused, oracle = run_both(kw, reductions=bit, tau=1.0)
    idx = [ops.ROW_LSE, ops.COL_LSE, ops.NEG_LSE, ops.NEG_CLAMP_LSE, ops.NEG_SOFTPLUS].index(bit)
    for n, (f, o) in enumerate(zip(fused, oracle)):
        assert f.shape == o.shape
        assert (f.numel() > 0) == (n == idx)
    torch.testing.assert_close(fused[idx], oracle[idx])
    (ga,) = torch.autograd.grad(fused[idx].sum(), [a])
    (go,) = torch.autograd.grad(oracle[idx].sum(), [a])
    torch.testing.assert_close(ga, go)


@pytest.mark.parametrize("shape", [(3, 5, 4, 1), (2, 2, 3, 0), (70, 520, 2, 7)])
def test_gradcheck_every_output_and_input(shape):
    K, M, d, off = shape
    a, b = make_pair(K, M, d, seed=K, requires_grad=True)
    scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    rb, cb = make_bias(K, seed=1, requires_grad=True), make_bias(M, seed=2, requires_grad=True)

    def f(a, b, scale, rb, cb):
        # tau 1.5 keeps a share of the scores inside the clamp so its gradient is exercised
        return ops.score_reduce(a, b, scale, rb, cb, off, ops.ALL_REDUCTIONS, 1.5)

    assert torch.autograd.gradcheck(f, (a, b, scale, rb, cb), fast_mode=K > 10)


def test_gradcheck_without_biases():
    a, b = make_pair(4, 6, 3, seed=3, requires_grad=True)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    f = lambda a, b, s: ops.score_reduce(a, b, s, None, None, 2, ops.ALL_REDUCTIONS, 3.0)
    assert torch.autograd.gradcheck(f, (a, b, scale))


def test_opcheck():
    a, b = make_pair(5, 9, 3, requires_grad=True)
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    rb, cb = make_bias(5, requires_grad=True), make_bias(9, requires_grad=True)
    torch.library.opcheck(torch.ops.infomax_ext.score_reduce, (a, b, scale, rb, cb, 2, 31, 2.0))
    torch.library.opcheck(torch.ops.infomax_ext.score_reduce, (a, b, scale, None, None, 0, ops.ROW_LSE, 5.0))
    outs = ops.score_reduce(a.detach(), b.detach(), scale.detach(), rb.detach(), cb.detach(), 2, 31, 2.0)
    grads = [torch.randn_like(o) for o in outs]
    torch.library.opcheck(torch.ops.infomax_ext._score_reduce_backward,
                          (*grads, a.detach(), b.detach(), scale.detach(), rb.detach(), cb.detach(),
                           *outs[:4], 2, 31, 2.0))


def test_masked_entries_never_nan():
    """-inf biases mask pairs: a row whose negatives are all masked has neg_lse -inf, and
    every gradient stays finite."""
    a, b = make_pair(4, 6, 3, requires_grad=True)
    cb = torch.zeros(6, dtype=torch.float64)
    cb[[0, 2, 3, 4, 5]] = -math.inf  # only column 1 survives
    rb = torch.zeros(4, dtype=torch.float64)
    rb[3] = -math.inf  # a fully masked row
    kw = dict(a=a, b=b, scale=torch.tensor(1.0, dtype=torch.float64), row_bias=rb, col_bias=cb, pos_offset=1)
    fused, oracle = run_both(kw)
    for f, o in zip(fused, oracle):
        torch.testing.assert_close(f, o)
    assert fused[2][0] == -math.inf  # row 0's only unmasked column is its positive
    assert fused[0][3] == -math.inf and fused[2][3] == -math.inf
    loss = fused[0][:3].sum() + fused[2][[1, 2]].sum() + fused[4].sum() + fused[3].sum() + fused[1][1]
    ga, gb = torch.autograd.grad(loss, [a, b])
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()


@pytest.mark.parametrize("scale", [30.0, 100.0])
def test_large_logits_match_float64(scale):
    a, b = make_pair(33, 600, 16, dtype=torch.float32, seed=5)
    a = torch.nn.functional.normalize(a, dim=1)
    b = torch.nn.functional.normalize(b, dim=1)
    fused = ops.score_reduce(a, b, scale, None, None, 0, ops.ALL_REDUCTIONS, 5.0)
    oracle = ref.score_reduce(a.double(), b.double(), scale, None, None, 0, ops.ALL_REDUCTIONS, 5.0)
    for f, o in zip(fused, oracle):
        assert torch.isfinite(f).all()
        torch.testing.assert_close(f.double(), o, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    a, b = make_pair(40, 700, 32, dtype=dtype, seed=9)
    fused = ops.score_reduce(a, b, 0.5, None, None, 3, ops.ALL_REDUCTIONS, 5.0)
    exact = ref.score_reduce(a.double(), b.double(), 0.5, None, None, 3, ops.ALL_REDUCTIONS, 5.0)
    # plain torch in the same dtype: S in low precision, then reduced in float32
    # (S @ I feeds the materialised S through the reference's reductions).
    S_low = ref.scores_dot(a, b, 0.5)
    plain = ref.score_reduce(S_low.float(), torch.eye(700), 1.0, None, None, 3, ops.ALL_REDUCTIONS, 5.0)
    for f, e, p in zip(fused, exact, plain):
        assert f.dtype == torch.float32
        err_fused = (f.double() - e).abs().max().item()
        err_plain = (p.double() - e).abs().max().item()
        assert err_fused <= 2 * err_plain + 1e-6 * e.abs().max().item()


def test_bad_inputs_raise_clear_errors():
    a, b = make_pair(3, 5, 4)
    one = torch.tensor(1.0, dtype=torch.float64)
    op = torch.ops.infomax_ext.score_reduce
    with pytest.raises(RuntimeError, match="a must be 2-D"):
        op(a[0], b, one, None, None, 0, 31, 5.0)
    with pytest.raises(RuntimeError, match="feature sizes differ"):
        op(a, b[:, :3], one, None, None, 0, 31, 5.0)
    with pytest.raises(RuntimeError, match="M >= K"):
        op(b, a, one, None, None, 0, 31, 5.0)
    with pytest.raises(RuntimeError, match="pos_offset"):
        op(a, b, one, None, None, 3, 31, 5.0)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        op(a, b.float(), one, None, None, 0, 31, 5.0)
    with pytest.raises(RuntimeError, match="row_bias"):
        op(a, b, one, torch.zeros(4, dtype=torch.float64), None, 0, 31, 5.0)
    with pytest.raises(RuntimeError, match="clamp_tau"):
        op(a, b, one, None, None, 0, ops.NEG_CLAMP_LSE, 0.0)
    with pytest.raises(RuntimeError, match="non-empty"):
        op(a[:0], b, one, None, None, 0, 31, 5.0)
    with pytest.raises(RuntimeError, match="floating point"):
        op(a.long(), b.long(), one, None, None, 0, 31, 5.0)


def test_reruns_are_bitwise_identical_and_threads_agree():
    a, b = make_pair(200, 1500, 16, dtype=torch.float32, seed=11)
    first = ops.score_reduce(a, b, 2.0)
    again = ops.score_reduce(a, b, 2.0)
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.score_reduce(a, b, 2.0)
    finally:
        torch.set_num_threads(n)
    for x, y in zip(first, single):
        torch.testing.assert_close(x, y)


def test_package_falls_back_to_reference_without_C(tmp_path):
    """With _C unloadable the package imports, warns and computes through reference.py."""
    code = r"""
import sys, warnings, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "infomax_ext._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import torch, infomax_ext
assert any("reference" in str(x.message) for x in w), [str(x.message) for x in w]
assert infomax_ext.backend() == "reference"
a = torch.randn(5, 3, dtype=torch.float64); b = torch.randn(6, 3, dtype=torch.float64)
S = infomax_ext.reference.scores_dot(a, b, 2.0)
# NB: the op wrapper is where the reference takes over: the same function, bit for bit;
# the estimator composed on it equals the reference estimator up to rounding order.
for x, y in zip(infomax_ext.ops.score_reduce(a, b, 2.0, pos_offset=1), infomax_ext.reference.score_reduce(a, b, 2.0, pos_offset=1)):
    assert torch.equal(x, y)
torch.testing.assert_close(infomax_ext.infonce(a, b, 2.0, pos_offset=1), infomax_ext.reference.infonce(S, 1), rtol=1e-14, atol=1e-14)
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_baseline_isa_clone_matches_reference():
    """The CPU epilogues exist for the baseline ISA and for AVX2 + FMA (picked at run
    time); INFOMAX_EXT_NO_AVX2=1 forces the baseline: rerun the float32 and float64
    comparisons in a fresh process on that path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, INFOMAX_EXT_NO_AVX2="1", PYTHONPATH=root)
    check = subprocess.run([sys.executable, "-c", "import infomax_ext; print(infomax_ext.build_info()['cpu_avx2'])"],
                           capture_output=True, text=True, env=env, cwd=root)
    assert check.stdout.strip() == "False", check.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_score_reduce.py", "-k", "values_and_gradients and cpu or large_logits"],
                         capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stdout[-3000:]
