"""Closed-form MI tasks of the "Beyond Normal" benchmark (Czyż et al., NeurIPS 2023).

Every task is a distribution of pairs ``(X, Y)`` whose mutual information is known in
closed form; ``task(name)`` builds one from its benchmark name and ``Task.sample(n, seed)``
draws ``n`` pairs (float64 tensors). The names compose: a base distribution, optionally
behind transforms applied to X and Y separately. Each transform is a diffeomorphism of
its space, so it leaves the MI of the base unchanged.

Base distributions:

- ``1v1-normal-RHO``: bivariate normal with correlation RHO; ``I = -log(1 - RHO^2) / 2``.
- ``1v1-additive-EPS``: ``X ~ U(0, 1)``, ``Y = X + N``, ``N ~ U(-EPS, EPS)``;
  ``I = h(Y) - h(N)``: ``EPS - log(2 EPS)`` for ``EPS <= 1/2``, ``1 / (4 EPS)`` above.
- ``multinormal-dense-DX-DY-C``: a (DX + DY)-variate normal, unit variances, every
  correlation C; ``I = (log det S_xx + log det S_yy - log det S) / 2``.
- ``multinormal-sparse-DX-DY-K-L``: the first K coordinates of X and of Y are pairs of
  correlation ``L^2 / (1 + L^2)`` (``X_i = L Z_i + E_i``, ``Y_i = L Z_i + E'_i``, all
  standard normal, standardised), every other coordinate independent;
  ``I = -K log(1 - r^2) / 2``.
- ``student-identity-DX-DY-NU``: a multivariate Student-t with NU degrees of freedom and
  identity dispersion, ``W = Z / sqrt(V / NU)``, ``Z ~ N(0, I)``, ``V ~ chi^2_NU``. X and Y
  are uncorrelated but share the scale V: ``I = g(DX) + g(DY) - g(DX + DY)`` with
  ``g(d) = log G(NU/2) - log G((NU+d)/2) + (NU+d)/2 (psi((NU+d)/2) - psi(NU/2))``
  (the d-dependent part of a d-variate t's entropy; G the gamma function, psi the digamma).

Transforms (prefixes, applied to X and to Y):

- ``half_cube-``: ``t -> sign(t) |t|^(3/2)`` per coordinate;
- ``normal_cdf-``: the standard normal CDF per coordinate (values in (0, 1));
- ``asinh-``: ``asinh`` per coordinate (tames the t's heavy tails);
- ``spiral-``: a rotation in one coordinate plane by the angle ``|t|^2 / d`` (X in the
  plane of coordinates 0 and 1, Y in that of 1 and 2; needs ``DX >= 2``, ``DY >= 3``);
  the inverse rotates back by the same angle, since rotations keep ``|t|``.
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Task", "task", "QUICK_TASKS", "FULL_TASKS", "student_t_mi", "gaussian_mi"]

_SPARSE = "multinormal-sparse-{d}-{d}-2-2.0"

# The four tasks of the quick run (1-d and 5-d, Gaussian and not).
QUICK_TASKS = ("1v1-normal-0.75", "1v1-additive-0.1", _SPARSE.format(d=5), "half_cube-" + _SPARSE.format(d=5))

# The closed-form tasks of the benchmark's list (those that need no learned or
# numerically integrated ground truth).
FULL_TASKS = (
    "1v1-normal-0.75", "normal_cdf-1v1-normal-0.75", "half_cube-1v1-normal-0.75",
    "1v1-additive-0.1", "1v1-additive-0.75",
    "student-identity-1-1-1", "asinh-student-identity-1-1-1",
    *(f"multinormal-dense-{d}-{d}-0.5" for d in (2, 3, 5, 25, 50)),
    *(_SPARSE.format(d=d) for d in (2, 3, 5, 25)),
    "student-identity-2-2-1", "student-identity-2-2-2", "student-identity-3-3-2",
    "student-identity-3-3-3", "student-identity-5-5-2", "student-identity-5-5-3",
    *(f"normal_cdf-{_SPARSE.format(d=d)}" for d in (3, 5, 25)),
    *(f"half_cube-{_SPARSE.format(d=d)}" for d in (3, 5, 25)),
    *(f"spiral-{_SPARSE.format(d=d)}" for d in (3, 5, 25)),
    *(f"spiral-normal_cdf-{_SPARSE.format(d=d)}" for d in (3, 5, 25)),
    "asinh-student-identity-2-2-1", "asinh-student-identity-3-3-2", "asinh-student-identity-5-5-2",
)


@dataclass(frozen=True)
class Task:
    """A distribution of pairs with a known MI (nats).

    ``sample(n, seed)`` returns ``(x (n, dim_x), y (n, dim_y))`` float64 tensors.
    """

    name: str
    dim_x: int
    dim_y: int
    mutual_information: float
    _draw: Callable = None

    def sample(self, n, seed=0):
        gen = torch.Generator().manual_seed(int(seed))
        return self._draw(int(n), gen)


def gaussian_mi(cov, dim_x):
    """``I(X; Y)`` of a jointly normal (X, Y) with covariance ``cov`` (X the first ``dim_x``)."""
    cov = torch.as_tensor(cov, dtype=torch.float64)
    return 0.5 * (torch.logdet(cov[:dim_x, :dim_x]) + torch.logdet(cov[dim_x:, dim_x:])
                  - torch.logdet(cov)).item()


def student_t_mi(dim_x, dim_y, nu):
    """``I(X; Y)`` of a multivariate Student-t with ``nu`` degrees of freedom and identity dispersion."""
    def g(d):
        a, b = nu / 2, (nu + d) / 2
        return (math.lgamma(a) - math.lgamma(b)
                + b * (torch.digamma(torch.tensor(b, dtype=torch.float64))
                       - torch.digamma(torch.tensor(a, dtype=torch.float64))).item())

    return g(dim_x) + g(dim_y) - g(dim_x + dim_y)


def _normal(cov, dim_x):
    chol = torch.linalg.cholesky(torch.as_tensor(cov, dtype=torch.float64))

    def draw(n, gen):
        w = torch.randn(n, chol.shape[0], generator=gen, dtype=torch.float64) @ chol.T
        return w[:, :dim_x], w[:, dim_x:]

    return draw


def _bivariate_normal(rho):
    if not -1 < rho < 1:
        raise ValueError(f"correlation must be in (-1, 1), got {rho}")
    cov = [[1.0, rho], [rho, 1.0]]
    return 1, 1, -0.5 * math.log1p(-rho * rho), _normal(cov, 1)


def _additive(eps):
    if not eps > 0:
        raise ValueError(f"noise half-width must be > 0, got {eps}")
    mi = eps - math.log(2 * eps) if eps <= 0.5 else 1 / (4 * eps)

    def draw(n, gen):
        x = torch.rand(n, 1, generator=gen, dtype=torch.float64)
        return x, x + eps * (2 * torch.rand(n, 1, generator=gen, dtype=torch.float64) - 1)

    return 1, 1, mi, draw


def _dense(dx, dy, c):
    d = dx + dy
    cov = torch.full((d, d), float(c), dtype=torch.float64)
    cov.diagonal().fill_(1.0)
    return dx, dy, gaussian_mi(cov, dx), _normal(cov, dx)


def _sparse(dx, dy, k, strength):
    if k > min(dx, dy):
        raise ValueError(f"{k} interacting pairs need dim_x, dim_y >= {k}, got {dx}, {dy}")
    r = strength ** 2 / (1 + strength ** 2)
    cov = torch.eye(dx + dy, dtype=torch.float64)
    for i in range(k):
        cov[i, dx + i] = cov[dx + i, i] = r
    return dx, dy, -0.5 * k * math.log1p(-r * r), _normal(cov, dx)


def _student(dx, dy, nu):
    nu = int(nu)
    if nu < 1:
        raise ValueError(f"degrees of freedom must be an int >= 1, got {nu}")

    def draw(n, gen):
        z = torch.randn(n, dx + dy, generator=gen, dtype=torch.float64)
        v = (torch.randn(n, nu, generator=gen, dtype=torch.float64) ** 2).sum(1, keepdim=True)  # chi^2_nu
        w = z / torch.sqrt(v / nu)
        return w[:, :dx], w[:, dx:]

    return dx, dy, student_t_mi(dx, dy, nu), draw


def _half_cube(t):
    return torch.sign(t) * t.abs() ** 1.5


def _normal_cdf(t):
    return 0.5 * (1 + torch.erf(t / math.sqrt(2)))


def _spiral(i, j):
    def f(t):
        theta = (t ** 2).sum(1) / t.shape[1]
        c, s = torch.cos(theta), torch.sin(theta)
        out = t.clone()
        out[:, i] = c * t[:, i] - s * t[:, j]
        out[:, j] = s * t[:, i] + c * t[:, j]
        return out

    return f


_BASES = {
    "1v1-normal-": (_bivariate_normal, (float,)),
    "1v1-additive-": (_additive, (float,)),
    "multinormal-dense-": (_dense, (int, int, float)),
    "multinormal-sparse-": (_sparse, (int, int, int, float)),
    "student-identity-": (_student, (int, int, int)),
}
_TRANSFORMS = {"half_cube-": None, "normal_cdf-": None, "asinh-": None, "spiral-": None}


def task(name):
    """The task of a benchmark name (see the module docstring), e.g. ``"half_cube-multinormal-sparse-5-5-2-2.0"``."""
    for prefix in _TRANSFORMS:
        if name.startswith(prefix):
            base = task(name[len(prefix):])
            if prefix == "spiral-":
                if base.dim_x < 2 or base.dim_y < 3:
                    raise ValueError(f"{name}: the spiral needs dim_x >= 2 and dim_y >= 3")
                fx, fy = _spiral(0, 1), _spiral(1, 2)
            else:
                fx = fy = {"half_cube-": _half_cube, "normal_cdf-": _normal_cdf, "asinh-": torch.asinh}[prefix]

            def draw(n, gen, base=base, fx=fx, fy=fy):
                x, y = base._draw(n, gen)
                return fx(x), fy(y)

            return Task(name, base.dim_x, base.dim_y, base.mutual_information, draw)
    for prefix, (make, types) in _BASES.items():
        if name.startswith(prefix):
            parts = name[len(prefix):].split("-")
            if len(parts) != len(types):
                break
            try:
                args = [t(p) for t, p in zip(types, parts)]
            except ValueError:
                break
            dx, dy, mi, draw = make(*args)
            return Task(name, dx, dy, float(mi), draw)
    raise ValueError(f"unknown task {name!r}: a base ({', '.join(p + '...' for p in _BASES)}) behind "
                     f"optional prefixes ({', '.join(_TRANSFORMS)})")
