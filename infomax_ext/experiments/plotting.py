"""Plots of the experiments, written with matplotlib's Agg backend (no display needed)."""
import math

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def ema(values, span):
    """Exponential moving average (pandas' ``ewm(span=span, adjust=True).mean()``), skipping
    non-finite values."""
    alpha = 2.0 / (span + 1.0)
    out = torch.empty(len(values), dtype=torch.float64)
    num = den = 0.0
    last = math.nan
    for i, v in enumerate(values.tolist()):
        if math.isfinite(v):
            num = (1 - alpha) * num + v
            den = (1 - alpha) * den + 1.0
            last = num / den
        out[i] = last
    return out


def staircase_plot(values, schedule, batch_size, path, smooth=None, title=None, dpi=80):
    """Poole / Song & Ermon style: one panel per estimator and critic; the raw per-step bound
    (light blue), its EMA (red; span ``smooth``, default an eighth of a level) and the true MI
    staircase (black); InfoNCE panels also show the ``log K`` ceiling (dashed). Values are
    clipped to ``[-2, max MI + 10]`` before drawing and smoothing (non-finite ones skipped)."""
    from .gaussian import estimator_label

    plt = _plt()
    critics = list(dict.fromkeys(c for c, _ in values))
    ests = list(dict.fromkeys(e for _, e in values))
    n = len(schedule)
    span = smooth or max(10.0, n / len(torch.unique(schedule)) / 8)
    top = schedule.max().item()
    # NB: one row of panels per critic; the estimators of a critic wrap after 4 columns.
    ncols = min(4, len(ests))
    per = math.ceil(len(ests) / ncols)
    nrows = per * len(critics)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols + 0.4, 2.2 * nrows + 0.6),
                             sharex=True, sharey=True, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    steps = torch.arange(n)
    for ci, c in enumerate(critics):
        for k, e in enumerate(ests):
            r, col = ci * per + k // ncols, k % ncols
            ax = axes[r][col]
            v = values.get((c, e))
            if v is None:
                continue
            ax.set_visible(True)
            # NB: blow-ups (NWJ / JS reach -1e20 on the cubic task) are clipped to the chart's edge
            # before smoothing, so one overflow does not drag the line off it for hundreds of steps
            shown = v.clamp(-2, top + 10)
            ax.plot(steps, shown, color="C0", alpha=0.3, lw=0.5)
            ax.plot(steps, ema(shown, span), color="C3", lw=1.2)
            ax.plot(steps, schedule, color="k", lw=1.0)
            if e == "infonce":
                ax.axhline(math.log(batch_size), color="k", ls="--", lw=0.8)
                ax.text(0, math.log(batch_size) + 0.25, "log K", fontsize=7)
            ax.set_ylim(-2.5, top + 4)
            ax.set_title(estimator_label(e) + (f" [{c}]" if len(critics) > 1 else ""), fontsize=9)
            if col == 0:
                ax.set_ylabel("MI (nats)", fontsize=8)
            ax.set_xlabel("step", fontsize=8)
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def bias_variance_plot(rows, path, title=None, dpi=80):
    """Song & Ermon Fig. 3 style: bias, variance and MSE against the true MI, one line per
    estimator (solid: first critic; dashed: second)."""
    from .gaussian import estimator_label

    plt = _plt()
    critics = list(dict.fromkeys(r["critic"] for r in rows))
    ests = list(dict.fromkeys(r["estimator"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ci, c in enumerate(critics):
        for ei, e in enumerate(ests):
            rs = [r for r in rows if r["critic"] == c and r["estimator"] == e]
            mi = [r["true_mi"] for r in rs]
            for ax, key in zip(axes, ("bias", "variance", "mse")):
                ax.plot(mi, [r[key] for r in rs], marker="o", ms=3, color=f"C{ei}",
                        ls="-" if ci == 0 else "--", label=f"{estimator_label(e)}" + (f" [{c}]" if len(critics) > 1 else ""))
    for ax, key in zip(axes, ("bias", "variance", "MSE")):
        ax.set_xlabel("true MI (nats)")
        ax.set_title(key)
        if key != "bias":
            ax.set_yscale("log")
    axes[0].axhline(0, color="k", lw=0.7)
    axes[2].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def estimates_plot(results, batch_size, path, dpi=80):
    """Tour: final estimate (mean +- std over evaluation batches) against the true MI per
    estimator, with ``y = x`` and InfoNCE's ``log K``."""
    from .gaussian import estimator_label

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    mis = sorted({m for m, _ in results})
    ests = list(dict.fromkeys(e for _, e in results))
    for k, e in enumerate(ests):
        m = [x for x in mis if (x, e) in results]
        ax.errorbar([x + 0.08 * (k - len(ests) / 2) for x in m], [results[(x, e)].estimate for x in m],
                    yerr=[results[(x, e)].std for x in m], marker="o", ms=4, capsize=2, label=estimator_label(e))
    ax.plot([0, max(mis)], [0, max(mis)], color="k", lw=0.8, label="true MI")
    ax.axhline(math.log(batch_size), color="k", ls="--", lw=0.8, label=f"log K = {math.log(batch_size):.2f}")
    ax.set_xlabel("true MI (nats)")
    ax.set_ylabel("estimate (nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def speed_plot(rows, path, dpi=80):
    """Tour: time and peak memory of fused vs reference against K."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for impl, style in (("fused", "o-"), ("reference", "s--")):
        rs = [r for r in rows if r["impl"] == impl]
        K = [r["K"] for r in rs]
        axes[0].plot(K, [r["time_ms"] for r in rs], style, label=impl)
        if all(r.get("peak_mib") is not None for r in rs):
            axes[1].plot(K, [max(r["peak_mib"], 1e-2) for r in rs], style, label=f"{impl} (measured)")
    Ks = sorted({r["K"] for r in rows})
    axes[1].plot(Ks, [k * k * 4 / 2**20 for k in Ks], "k:", label="K*M*4 bytes (one S)")
    for ax, lab in zip(axes, ("fwd+bwd time (ms)", "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("K = M")
        ax.set_ylabel(lab)
        ax.legend(fontsize=7)
    fig.suptitle("InfoNCE forward+backward, d=128, float32", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def represent_plot(histories, path, dpi=80, pixel_acc=None):
    """Two-view experiment: the training bound per epoch and the probe's test accuracy per
    evaluation, one line per critic x estimator (colour: critic, style: estimator); a grey
    line at log K (when the histories carry ``log_k``) and at the raw-pixel probe's accuracy
    (``pixel_acc``)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    critics = list(dict.fromkeys(c for c, _ in histories))
    ests = list(dict.fromkeys(e for _, e in histories))
    styles = ["-", "--", ":", "-."]
    for (c, e), h in histories.items():
        col, ls = f"C{critics.index(c)}", styles[ests.index(e) % len(styles)]
        lab = f"{c} / {e}"
        axes[0].plot(h["epoch"], h["bound"], color=col, ls=ls, label=lab)
        axes[1].plot(h["probe_epoch"], h["probe_acc"], color=col, ls=ls, marker="o", ms=3, label=lab)
    log_k = next((h["log_k"] for h in histories.values() if "log_k" in h), None)
    if log_k is not None:
        axes[0].axhline(log_k, color="0.6", ls=":", lw=1, label="log K")
        axes[0].legend(fontsize=7)
    if pixel_acc is not None:
        axes[1].axhline(pixel_acc, color="0.4", ls=":", lw=1.2, label="raw view-1 pixels")
    axes[0].set_ylabel("train bound (nats, epoch mean)")
    axes[1].set_ylabel("linear probe test accuracy")
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
