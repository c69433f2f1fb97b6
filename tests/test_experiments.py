"""The experiments behind ``python -m infomax_ext`` (``infomax_ext/experiments``).

Structural facts on tiny runs: the known-MI sampler has the MI it claims, the staircase
schedule and statistics, InfoNCE never passes log K, InfoNCE and SMILE end near the truth
on a 2-nat level with the default settings, each command writes its files, the digits
probe beats chance. Each test takes seconds on a 2-core CPU.
"""
import csv
import math
import os
import sys
import types

import pytest
import torch

import infomax_ext as ie
from infomax_ext import __main__ as cli
from infomax_ext.experiments import gaussian as G

pytestmark = [pytest.mark.skipif(not ie._backend.HAS_C, reason="compiled module not built"),
              pytest.mark.usefixtures("one_thread")]


# ---------------------------------------------------------------------------
# The known-MI distribution
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mi,d", [(2.0, 20), (10.0, 20), (0.5, 3)])
def test_rho_and_mi_are_inverse(mi, d):
    rho = G.mi_to_rho(mi, d)
    assert 0 < rho < 1
    assert G.rho_to_mi(rho, d) == pytest.approx(mi, rel=1e-12)


@pytest.mark.parametrize("mi", [2.0, 6.0, 10.0])
def test_sampler_has_the_requested_correlation(mi):
    d, n = 20, 20000
    x, y = G.sample_correlated_gaussian(n, d, mi, generator=torch.Generator().manual_seed(1),
                                        dtype=torch.float64)
    assert x.shape == y.shape == (n, d)
    rho = G.mi_to_rho(mi, d)
    xc, yc = x - x.mean(0), y - y.mean(0)
    corr = (xc * yc).mean(0) / (xc.std(0) * yc.std(0))  # per dimension
    assert corr.mean().item() == pytest.approx(rho, abs=0.01)
    assert y.var(0).mean().item() == pytest.approx(1.0, abs=0.03)  # unit marginals
    # the MI implied by the empirical correlation
    assert G.rho_to_mi(corr.mean().item(), d) == pytest.approx(mi, rel=0.06)
    # cross-dimension correlations vanish (the d pairs are independent)
    assert (xc[:, 0] * yc[:, 1]).mean().abs().item() < 0.03


@pytest.mark.parametrize("mi,cubic", [(2.0, False), (8.0, False), (4.0, True), (10.0, True)])
def test_monte_carlo_of_the_log_density_ratio_gives_the_mi(mi, cubic):
    # E_{p(x, y)} log p(x, y) / p(x) p(y) = I(X; Y): the sample mean is within a few
    # standard errors of the closed form
    n = 40000
    x, y = G.sample_correlated_gaussian(n, 20, mi, cubic=cubic, generator=torch.Generator().manual_seed(2),
                                        dtype=torch.float64)
    r = G.log_density_ratio(x, y, mi, cubic=cubic)
    se = r.std().item() / math.sqrt(n)
    assert abs(r.mean().item() - mi) < 4 * se + 1e-3, (r.mean().item(), mi, se)


def test_cubic_transform_is_the_cube_of_the_same_sample():
    # invertible map of y: same pairs up to y -> y^3, so the MI is unchanged
    x0, y0 = G.sample_correlated_gaussian(500, 20, 6.0, generator=torch.Generator().manual_seed(3))
    x1, y1 = G.sample_correlated_gaussian(500, 20, 6.0, cubic=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x1, x0)
    torch.testing.assert_close(y1, y0 ** 3, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y1, y0)
    torch.testing.assert_close(torch.sign(y1) * y1.abs() ** (1 / 3), y0, rtol=1e-4, atol=1e-5)


def test_staircase_schedule():
    s = G.staircase_schedule([2, 4, 6, 8, 10], 7)
    assert s.shape == (35,) and s.dtype == torch.float64
    assert s[:7].eq(2).all() and s[7:14].eq(4).all() and s[-7:].eq(10).all()
    assert (s.diff() >= 0).all() and (s.diff() != 0).sum() == 4  # four switches, every 7 steps
    assert torch.nonzero(s.diff()).flatten().tolist() == [6, 13, 20, 27]
    with pytest.raises(ValueError):
        G.staircase_schedule([2], 0)


def test_summarize_bias_variance_mse():
    levels, n = [2.0, 4.0], 10
    v = torch.cat([torch.full((5,), 100.0), torch.tensor([1.0, 2.0, 3.0, 2.0, 2.0]),  # level 2: tail 5
                   torch.full((5,), -100.0), torch.tensor([4.0, 4.0, math.nan, 4.0, 4.0])]).double()
    rows = G.summarize(v, levels, n, tail=0.5)
    assert [r["true_mi"] for r in rows] == levels
    assert rows[0]["mean"] == pytest.approx(2.0) and rows[0]["bias"] == pytest.approx(0.0)
    assert rows[0]["variance"] == pytest.approx(0.4) and rows[0]["mse"] == pytest.approx(0.4)
    assert rows[1]["nonfinite"] == 1 and rows[1]["n"] == 5
    assert rows[1]["bias"] == pytest.approx(0.0) and rows[1]["variance"] == pytest.approx(0.0)
    for r in rows:
        assert r["mse"] == pytest.approx(r["bias"] ** 2 + r["variance"])


@pytest.mark.parametrize("spec,expect", [("infonce", ("infonce", None)), ("smile1", ("smile", 1.0)),
                                         ("smile5", ("smile", 5.0)), ("smile", ("smile", 5.0)),
                                         ("smile:2.5", ("smile", 2.5)), ("MINE", ("mine", None))])
def test_parse_estimator(spec, expect):
    assert G.parse_estimator(spec) == expect
    G.make_loss(spec, G.make_critic("separable", 4, hidden=8, layers=1, embed=4))


def test_parse_estimator_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown estimator"):
        G.parse_estimator("cpc")


# ---------------------------------------------------------------------------
# The staircase
# ---------------------------------------------------------------------------


def test_infonce_never_exceeds_log_k_on_the_staircase():
    # MI far above log 16 = 2.77: the bound saturates below the ceiling, at every step
    K = 16
    v = G.run_staircase("infonce", "separable", [2.0, 10.0], 60, batch_size=K, hidden=32, layers=1, embed=8,
                        lr=2e-3, seed=1)
    assert torch.isfinite(v).all()
    assert (v <= math.log(K) + 1e-5).all(), v.max()
    assert v[-20:].mean() > 1.0  # and it did learn


@pytest.mark.parametrize("estimator", ["infonce", "smile5"])
def test_low_mi_level_is_recovered_with_the_default_settings(estimator):
    # a 2-nat level, batch 128, default critic and steps per level:
    # InfoNCE and SMILE end within 0.5 nats of the truth
    p = G.add_arguments(__import__("argparse").ArgumentParser())
    a = p.parse_args(["--batch-size", "128"])
    v = G.run_staircase(estimator, "separable", [2.0], a.steps_per_level, a.batch_size, a.dim, False, a.lr,
                        a.hidden, a.layers, a.embed, a.concat_layers, a.seed)
    end = G.summarize(v, [2.0], a.steps_per_level, a.tail)[0]
    assert abs(end["mean"] - 2.0) < 0.5, end
    assert end["mean"] < 2.0 + 0.2  # a lower bound (plus noise)


def test_concat_critic_runs_fused_and_deep():
    for layers in (1, 2):
        v = G.run_staircase("smile5", "concat", [2.0], 5, batch_size=8, hidden=16, concat_layers=layers)
        assert v.shape == (5,) and torch.isfinite(v).all()


def test_estimate_command_writes_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["estimate", "--steps-per-level", "6", "--levels", "2", "4", "--estimators", "infonce",
                   "nwj", "smile1", "--critics", "separable", "concat", "--hidden", "16", "--batch-size", "16",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    with open(out / "staircase_b16.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == G.CSV_COLUMNS
    for col in ("bias", "variance", "mse"):
        assert col in rows[0]
    assert len(rows) == 2 * 3 * 2  # critics x estimators x levels
    assert {r["estimator"] for r in rows} == {"infonce", "nwj", "smile1"}
    assert {float(r["true_mi"]) for r in rows} == {2.0, 4.0}
    for r in rows:
        if r["nonfinite"] == "0":
            assert float(r["mse"]) == pytest.approx(float(r["bias"]) ** 2 + float(r["variance"]), rel=1e-4,
                                                    abs=1e-5)
    with open(out / "staircase_b16_steps.csv") as f:
        steps = list(csv.reader(f))
    assert steps[0][:2] == ["step", "true_mi"] and "concat/smile1" in steps[0]
    assert len(steps) == 1 + 2 * 6 and steps[-1][1] == "4"
    for png in ("staircase_b16.png", "staircase_b16_bvm.png"):
        assert (out / png).stat().st_size > 5000
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "variance" in text and str(out) in text


def test_estimate_command_cubic_names_its_files(tmp_path):
    rc = cli.main(["estimate", "--cubic", "--steps-per-level", "3", "--levels", "2", "--estimators", "js",
                   "--hidden", "8", "--batch-size", "8", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    with open(tmp_path / "staircase_cubic_b8.csv") as f:
        assert next(csv.DictReader(f))["cubic"] == "1"
    assert (tmp_path / "staircase_cubic_b8.png").exists()


# ---------------------------------------------------------------------------
# The two-view digits experiment
# ---------------------------------------------------------------------------


def test_digits_views_are_the_top_and_bottom_halves():
    from sklearn.datasets import load_digits

    from infomax_ext.experiments.represent import load_views

    v = load_views()
    assert v["x1_train"].shape[1] == 32 and v["x2_train"].shape[1] == 32
    assert len(v["x1_train"]) + len(v["x1_test"]) == 1797
    X = torch.tensor(load_digits().data, dtype=torch.float32) / 16
    # every training row is one image's top half next to the same image's bottom half
    full = torch.cat([v["x1_train"][:5], v["x2_train"][:5]], 1)
    assert all((X == row).all(1).any() for row in full)
    assert v["x1_train"].max() <= 1.0 and v["x1_train"].min() >= 0.0


def test_represent_trains_and_the_probe_beats_chance(tmp_path, capsys):
    from infomax_ext.experiments import represent

    p = represent.add_arguments(__import__("argparse").ArgumentParser())
    args = p.parse_args(["--data", "digits", "--critics", "bilinear", "concat", "--estimators", "infonce", "nwj",
                         "--epochs", "4",
                         "--probe-every", "2", "--hidden", "64", "--embed", "16", "--critic-hidden", "32",
                         "--probe-iter", "50", "--out", str(tmp_path), "--no-progress"])
    res = represent.run(args)
    assert len(res["rows"]) == 4
    for r in res["rows"]:
        assert r["acc"] > 0.3  # chance is 0.1
        assert math.isfinite(r["test_bound"])
    for (c, e), (h,) in res["histories"].items():
        assert h["probe_epoch"] == [0, 2, 4]
        assert h["bound"][-1] > h["bound"][0]  # the bound rises
        if e == "infonce":
            assert max(h["bound"]) <= math.log(128) + 1e-5
    assert 0.5 < res["pixel_acc"] <= 1.0
    assert (tmp_path / "represent_digits.png").stat().st_size > 5000
    text = capsys.readouterr().out
    assert "probe acc (final)" in text and "bilinear" in text and "raw view-1 pixels" in text


def test_represent_command_line_with_seeds(tmp_path, capsys):
    rc = cli.main(["represent", "--data", "digits", "--critics", "separable", "--estimators", "infonce",
                   "--epochs", "1", "--seeds", "2",
                   "--hidden", "16", "--embed", "8", "--critic-hidden", "8", "--probe-iter", "20",
                   "--out", str(tmp_path), "--no-progress"])
    assert rc == 0 and (tmp_path / "represent_digits.png").exists()
    assert "2 seed(s)" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# The tour and the command dispatch
# ---------------------------------------------------------------------------

TINY_TOUR = ["--batches", "2", "--mi", "2", "6", "--check", "32", "--est-mi", "2", "6", "--est-estimators",
             "infonce", "smile5", "--est-steps", "5", "--est-samples", "400", "--est-batch", "32",
             "--est-hidden", "16", "--sizes", "64", "128", "--repeats", "1", "--no-memory", "--no-progress"]


def test_tour_runs_with_tiny_sizes(tmp_path, capsys):
    rc = cli.main(TINY_TOUR + ["--out", str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    for part in ("[1/3]", "[2/3]", "[3/3]", "Fused vs reference", "InfoNCE", "SMILE (tau=5)", "fwd+bwd ms",
                 str(tmp_path)):
        assert part in text, part
    for png in ("tour_estimates.png", "tour_speed.png"):
        assert (tmp_path / png).stat().st_size > 5000


def test_speed_measures_memory_in_a_fresh_process():
    from infomax_ext.experiments import speed

    rows = speed.compare([1024], repeats=1, memory=True)
    by = {r["impl"]: r for r in rows}
    assert "error" not in by["fused"] and "error" not in by["reference"], rows
    # the reference holds S (4 MiB at K = M = 1024) and its gradient; the fused op does not
    assert by["reference"]["peak_mib"] >= 4.0
    assert by["fused"]["peak_mib"] < by["reference"]["peak_mib"] / 2
    assert by["reference"]["s_mib"] == pytest.approx(4.0)
    assert "peak extra MiB" in speed.table(rows)


def test_bench_hook_calls_bench_main(monkeypatch):
    seen = []
    fake = types.ModuleType("infomax_ext.bench")
    fake.main = lambda args: seen.append(args) or 0
    monkeypatch.setitem(sys.modules, "infomax_ext.bench", fake)
    assert cli.main(["bench", "--sizes", "64"]) == 0
    assert seen == [["--sizes", "64"]]


def test_bench_hook_without_the_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "infomax_ext.bench", None)  # import fails: "not found"
    assert cli.main(["bench"]) == 2
    assert "not in this checkout" in capsys.readouterr().err


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["nonsense"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_default_output_folder_is_ignored_by_git():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, ".gitignore")) as f:
        assert "infomax_out/" in f.read().split()
