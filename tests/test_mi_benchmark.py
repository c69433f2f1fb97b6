"""The closed-form MI tasks (experiments/mi_tasks.py) and ``python -m infomax_ext benchmark``.

The true MI of each base is checked against an independent computation (a Monte Carlo
mean of the log density ratio, or another closed form), and each transform against its
inverse (a diffeomorphism leaves the MI unchanged).
"""
import csv
import json
import math
import os
import stat
import sys

import numpy as np
import pytest
import torch

import infomax_ext as ie
from infomax_ext.experiments import mi_benchmark as mb
from infomax_ext.experiments.mi_tasks import FULL_TASKS, QUICK_TASKS, gaussian_mi, student_t_mi, task

pytestmark = pytest.mark.usefixtures("one_thread")


def _mc(values):
    """Monte Carlo mean and its standard error."""
    return values.mean().item(), values.std().item() / math.sqrt(len(values))


def test_every_listed_task_builds_and_samples_its_shapes():
    assert set(QUICK_TASKS) <= set(FULL_TASKS)
    for name in FULL_TASKS:
        t = task(name)
        x, y = t.sample(50, seed=1)
        assert x.shape == (50, t.dim_x) and y.shape == (50, t.dim_y), name
        assert x.dtype == torch.float64 and torch.isfinite(x).all() and torch.isfinite(y).all(), name
        assert t.mutual_information > 0, name
        x2, _ = t.sample(50, seed=1)
        assert torch.equal(x, x2), name  # seeded


def test_gaussian_tasks_match_the_determinant_formula_and_their_samples():
    # bivariate normal: -log(1 - rho^2) / 2 against log-determinants
    rho = 0.75
    assert task("1v1-normal-0.75").mutual_information == pytest.approx(
        gaussian_mi([[1, rho], [rho, 1]], 1), rel=1e-12)
    # dense: every correlation c; det of an m x m equicorrelation matrix (1-c)^(m-1) (1+(m-1)c)
    for d in (2, 5, 25):
        c = 0.5
        logdet = lambda m: (m - 1) * math.log(1 - c) + math.log(1 + (m - 1) * c)  # noqa: E731
        want = 0.5 * (2 * logdet(d) - logdet(2 * d))
        assert task(f"multinormal-dense-{d}-{d}-0.5").mutual_information == pytest.approx(want, rel=1e-9)
    # sparse: two pairs of correlation L^2 / (1 + L^2) = 0.8, the rest independent
    t = task("multinormal-sparse-5-5-2-2.0")
    assert t.mutual_information == pytest.approx(-math.log(1 - 0.8 ** 2), rel=1e-12)
    x, y = t.sample(20000, seed=2)
    corr = np.corrcoef(torch.cat([x, y], 1).T.numpy())[:5, 5:]
    want = np.zeros((5, 5))
    want[0, 0] = want[1, 1] = 0.8
    assert np.abs(corr - want).max() < 0.03


def test_additive_uniform_mi_matches_a_monte_carlo_of_the_log_density_ratio():
    for eps in (0.1, 0.75):
        t = task(f"1v1-additive-{eps}")
        x, y = t.sample(200000, seed=3)
        y = y[:, 0]
        # p(y | x) = 1 / (2 eps) on the support; p(y) = |[y - eps, y + eps] & [0, 1]| / (2 eps)
        overlap = (torch.minimum(y + eps, torch.ones_like(y)) - torch.maximum(y - eps, torch.zeros_like(y)))
        mean, se = _mc(-torch.log(overlap))  # log p(y|x) - log p(y) = -log overlap
        assert abs(mean - t.mutual_information) < 4 * se + 1e-3, (eps, mean, t.mutual_information)


def _log_t_density(w, nu):
    """log density of a d-variate Student-t with identity dispersion."""
    d = w.shape[1]
    return (math.lgamma((nu + d) / 2) - math.lgamma(nu / 2) - d / 2 * math.log(nu * math.pi)
            - (nu + d) / 2 * torch.log1p((w ** 2).sum(1) / nu))


@pytest.mark.parametrize("dx,dy,nu", [(1, 1, 1), (2, 2, 2), (5, 5, 3)])
def test_student_t_mi_matches_a_monte_carlo_of_the_log_density_ratio(dx, dy, nu):
    t = task(f"student-identity-{dx}-{dy}-{nu}")
    assert t.mutual_information == pytest.approx(student_t_mi(dx, dy, nu))
    x, y = t.sample(200000, seed=4)
    ratio = _log_t_density(torch.cat([x, y], 1), nu) - _log_t_density(x, nu) - _log_t_density(y, nu)
    mean, se = _mc(ratio)
    assert abs(mean - t.mutual_information) < 4 * se + 1e-3, (mean, t.mutual_information)


def _spiral_inverse(t, i, j):
    theta = -(t ** 2).sum(1) / t.shape[1]  # the rotation keeps |t|: rotate back by the same angle
    c, s = torch.cos(theta), torch.sin(theta)
    out = t.clone()
    out[:, i], out[:, j] = c * t[:, i] - s * t[:, j], s * t[:, i] + c * t[:, j]
    return out


@pytest.mark.parametrize("prefix,inv_x,inv_y", [
    ("half_cube-", lambda t: torch.sign(t) * t.abs() ** (2 / 3), None),
    ("normal_cdf-", lambda t: math.sqrt(2) * torch.erfinv(2 * t - 1), None),
    ("spiral-", lambda t: _spiral_inverse(t, 0, 1), lambda t: _spiral_inverse(t, 1, 2)),
])
def test_transforms_are_invertible_maps_of_the_base_samples(prefix, inv_x, inv_y):
    base = task("multinormal-sparse-3-3-2-2.0")
    t = task(prefix + base.name)
    assert t.mutual_information == base.mutual_information and (t.dim_x, t.dim_y) == (base.dim_x, base.dim_y)
    x0, y0 = base.sample(2000, seed=5)
    x, y = t.sample(2000, seed=5)
    assert not torch.allclose(x, x0)  # the transform does something
    torch.testing.assert_close(inv_x(x), x0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close((inv_y or inv_x)(y), y0, atol=1e-6, rtol=1e-6)


def test_asinh_of_the_student_task_is_its_samples_through_asinh():
    x0, y0 = task("student-identity-2-2-1").sample(500, seed=6)
    x, y = task("asinh-student-identity-2-2-1").sample(500, seed=6)
    torch.testing.assert_close(torch.sinh(x), x0)
    torch.testing.assert_close(torch.sinh(y), y0)


def test_bad_task_names_raise():
    with pytest.raises(ValueError, match="unknown task"):
        task("multinormal-sparse-5-5")
    with pytest.raises(ValueError, match="unknown task"):
        task("wiggly-1v1-normal-0.75")
    with pytest.raises(ValueError, match="spiral"):
        task("spiral-1v1-normal-0.75")


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.skipif(not ie._backend.HAS_C, reason="compiled module not built")
def test_benchmark_command_writes_table_csv_and_heat_map(tmp_path, capsys):
    out = tmp_path / "mb"
    from infomax_ext.__main__ import main as cli

    rc = cli(["benchmark", "--tasks", "1v1-normal-0.75", "student-identity-2-2-1",
                           "--estimators", "infonce", "dv", "--n", "600", "--steps", "30",
                           "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "1v1-normal-0.75" in printed and "mean |error|" in printed
    rows = _read_csv(out / "mi_benchmark.csv")
    assert [(r["task"], r["method"]) for r in rows] == [
        ("1v1-normal-0.75", "infonce"), ("1v1-normal-0.75", "dv"),
        ("student-identity-2-2-1", "infonce"), ("student-identity-2-2-1", "dv")]
    for r in rows:
        assert float(r["true_mi"]) == pytest.approx(task(r["task"]).mutual_information)
        assert float(r["error"]) == pytest.approx(float(r["estimate"]) - float(r["true_mi"]))
        assert math.isfinite(float(r["estimate"])) and r["samples"] == "mi_tasks" and r["n"] == "600"
    assert (out / "mi_benchmark.png").stat().st_size > 1000


_FAKE_BMI = r'''#!{python}
# Stands in for "python bmi_side.py ...": writes the samples and bmi.json that script writes.
import json, os, sys
import numpy as np
a = sys.argv[2:]
out, n, tasks = a[a.index("--out") + 1], int(a[a.index("--n") + 1]), a[a.index("--tasks") + 1:a.index("--estimators")]
os.makedirs(out, exist_ok=True)
rec = {{}}
for i, name in enumerate(tasks):
    rng = np.random.default_rng(i)
    x = rng.normal(size=(n, 1)); y = x + 0.1 * rng.normal(size=(n, 1))
    np.savez(os.path.join(out, name + ".npz"), x=x, y=y)
    bmi = {{"infonce": {{"estimate": 0.25, "seconds": 1.5}}}}
    rec[name] = {{"mi": 0.5 * float(np.log(1 / (1 - 0.75 ** 2))), "estimators": bmi}}
json.dump({{"n": n, "seed": 0, "tasks": rec}}, open(os.path.join(out, "bmi.json"), "w"))
'''


@pytest.mark.skipif(not ie._backend.HAS_C, reason="compiled module not built")
def test_benchmark_estimates_on_the_samples_the_bmi_side_drew(tmp_path):
    fake = tmp_path / "fake_python"
    fake.write_text(_FAKE_BMI.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "mb"
    rc = mb.main(["--tasks", "1v1-normal-0.75", "--estimators", "infonce", "--n", "600", "--steps", "200",
                  "--out", str(out), "--bmi-python", str(fake), "--bmi-estimators", "infonce",
                  "--no-progress", "--no-plot"])
    assert rc == 0
    rows = {r["method"]: r for r in _read_csv(out / "mi_benchmark.csv")}
    assert set(rows) == {"infonce", "bmi-infonce"}
    assert rows["infonce"]["samples"] == "benchmark-mi"  # ours ran on the drawn samples
    assert float(rows["bmi-infonce"]["estimate"]) == 0.25 and float(rows["bmi-infonce"]["seconds"]) == 1.5
    # the fake samples have MI -log(1 - 1/1.01)/2 = 2.31 nats, far above the task's 0.41:
    # an estimate above 1 shows they, not the task's own sampler, were used
    assert float(rows["infonce"]["estimate"]) > 1.0
    with open(out / "samples" / "bmi.json") as f:
        assert json.load(f)["tasks"]["1v1-normal-0.75"]["estimators"]["infonce"]["estimate"] == 0.25


def test_quick_defaults_and_full_flags():
    n, kw = mb.settings(mb.parse_args([]))
    assert n == 2000 and kw["folds"] == 1 and kw["steps"] == 400
    n, kw = mb.settings(mb.parse_args(["--full"]))
    assert n == 5000 and "folds" not in kw and "steps" not in kw  # estimate_mi's own defaults
    n, kw = mb.settings(mb.parse_args(["--full", "--n", "300", "--folds", "2", "--critic", "separable"]))
    assert n == 300 and kw["folds"] == 2 and kw["critic"] == "separable"


@pytest.mark.skipif(not os.environ.get("INFOMAX_BMI_PYTHON"), reason="set INFOMAX_BMI_PYTHON to a Python "
                    "with benchmark-mi to compare the true MI of every task with the package's own")
def test_true_mi_matches_benchmark_mi(tmp_path):
    import subprocess

    code = ("import json, sys; from bmi.benchmark import BENCHMARK_TASKS as B; "
            "print(json.dumps({n: B[n].mutual_information for n in sys.argv[1:] if n in B}))")
    got = json.loads(subprocess.run([os.environ["INFOMAX_BMI_PYTHON"], "-c", code, *FULL_TASKS],
                                    check=True, capture_output=True, text=True).stdout)
    assert set(got) == set(FULL_TASKS)
    for name, mi in got.items():
        assert task(name).mutual_information == pytest.approx(mi, abs=1e-6), name
