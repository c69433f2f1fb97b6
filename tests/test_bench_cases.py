"""The cases of ``python -m infomax_ext bench`` compute what they claim: each
implementation's first call agrees with the float64 line a user would write (the check
the report prints), the fused losses included."""
import pytest

import infomax_ext
from infomax_ext import bench

pytestmark = pytest.mark.skipif(not infomax_ext._backend.HAS_C, reason="compiled module not built")


@pytest.mark.parametrize("op, impl", [(op, impl) for op in ("infonce", "clip", "ntxent")
                                      for impl in bench.OPS[op] if "compile" not in impl])
def test_case_checks_against_float64(op, impl):
    run = bench.make_case(op, impl, K=24, d=8)
    out = run()
    if impl.startswith("floor"):
        assert out is None
        return
    ok, message = run.check(out)
    assert ok, message


def test_fused_losses_equal_the_eager_lines():
    """The fused cases are the same losses as the eager lines (not merely close to their
    own oracle): log K - bound for InfoNCE and CLIP, lightly's NT-Xent."""
    for op in ("infonce", "clip", "ntxent"):
        fused, eager = bench.make_case(op, "fused", K=16, d=6), bench.make_case(op, "eager", K=16, d=6)
        assert abs(float(fused()) - float(eager())) < 1e-4, op
