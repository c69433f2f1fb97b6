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


def test_interleaved_times_every_implementation_and_orients_its_ratios():
    """One round: each ratio is exactly fused's median over the other's (fused / other)."""
    ms, ratio = bench.interleaved("infonce", 16, ["fused", "eager", "floor3"], rounds=1, calls=3, d=4)
    assert set(ms) == {"fused", "eager", "floor3"} and set(ratio) == {"eager", "floor3"}
    for impl, r in ratio.items():
        assert ms[impl] > 0 and r == pytest.approx(ms["fused"] / ms[impl])


def test_interleaved_report_runs(capsys):
    assert bench.main(["--ops", "infonce", "ntxent", "--sizes", "16", "--d", "4", "--no-compile",
                       "--interleave", "2", "--calls", "2"]) == 0
    out = capsys.readouterr().out
    assert "infonce    K=16" in out and "ntxent     K=16" in out and "floor" in out
