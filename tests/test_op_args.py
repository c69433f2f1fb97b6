"""Every op in torch.ops.infomax_ext (and its emulated CUDA twin) checks every tensor
argument's rank, length and dtype in C++ and names it: a wrong one is a clean
RuntimeError, never an out-of-bounds read."""
import os
import re

import pytest
import torch

from helpers import needs_emulated
from infomax_ext import ops, reference

K, M, D, H = 3, 5, 4, 6
F32 = torch.float32
NAMESPACES = ["infomax_ext", pytest.param("infomax_ext_emulated", marks=needs_emulated)]


def _vec(n):
    return torch.linspace(-0.5, 0.5, n, dtype=F32)


def _calls():
    """op name -> (tensor arguments by name, function of them making the call)."""
    a, b = torch.randn(K, D, generator=torch.Generator().manual_seed(0)), torch.randn(M, D)
    P, Q = torch.randn(K, H), torch.randn(M, H)
    s = torch.tensor(0.5)
    stats = {"row_lse": _vec(K), "col_lse": _vec(M), "neg_lse": _vec(K), "clamp_lse": _vec(K)}
    grads = {"grad_row_lse": _vec(K), "grad_col_lse": _vec(M), "grad_neg_lse": _vec(K),
             "grad_clamp_lse": _vec(K), "grad_softplus": _vec(K)}
    with_grads = {**grads, "grad_pos": _vec(K)}
    return {
        "score_reduce": (dict(a=a, b=b, scale=s, row_bias=_vec(K), col_bias=_vec(M)),
                         lambda ns, t: ns.score_reduce(t["a"], t["b"], t["scale"], t["row_bias"], t["col_bias"],
                                                       1, 31, 5.0)),
        "_score_reduce_backward": (
            dict(**grads, a=a, b=b, scale=s, row_bias=_vec(K), col_bias=_vec(M), **stats),
            lambda ns, t: ns._score_reduce_backward(
                *(t[k] for k in grads), t["a"], t["b"], t["scale"], t["row_bias"], t["col_bias"],
                *(t[k] for k in stats), 1, 31, 5.0)),
        "_score_reduce_with_grad": (
            dict(**with_grads, a=a, b=b, scale=s, row_bias=_vec(K), col_bias=_vec(M)),
            lambda ns, t: ns._score_reduce_with_grad(
                *(t[k] for k in with_grads), t["a"], t["b"], t["scale"], t["row_bias"], t["col_bias"], 1, 31, 5.0)),
        "symmetric_softmax_mean": (dict(x=b, scale=s, bias=_vec(M)),
                                   lambda ns, t: ns.symmetric_softmax_mean(t["x"], t["scale"], t["bias"], True)),
        "concat_score_reduce": (dict(P=P, Q=Q, w2=_vec(H), b2=s),
                                lambda ns, t: ns.concat_score_reduce(t["P"], t["Q"], t["w2"], t["b2"], 1, 1, 31, 5.0)),
        "_concat_score_reduce_backward": (
            dict(**grads, P=P, Q=Q, w2=_vec(H), b2=s, **stats),
            lambda ns, t: ns._concat_score_reduce_backward(
                *(t[k] for k in grads), t["P"], t["Q"], t["w2"], t["b2"], 1, *(t[k] for k in stats), 1, 31, 5.0)),
    }


def _wrong_versions(t, partner=True):
    """Wrong versions of a valid tensor argument: (what, tensor)."""
    out = [("integer dtype", t.to(torch.int64))]
    if t.dim() == 0:
        return out + [("two elements", t.reshape(1).repeat(2))]
    out.append(("rank + 1", t.unsqueeze(-1)))
    if t.dim() == 1:
        out.append(("one element short", t[:-1]))
        out.append(("one element more", torch.cat([t, t[:1]])))
    else:
        # NB: a 2-D input's row count defines K or M and, alone, its feature count: only
        # a column more than its partner's is wrong.
        out.append(("rank - 1", t[0]))
        if partner:
            out.append(("one more column", torch.cat([t, t[:, :1]], 1)))
    return out


def _versions(op, arg, t):
    return _wrong_versions(t, partner=(op, arg) != ("symmetric_softmax_mean", "x"))


CASES = [(op, arg, what) for op, (args, _) in _calls().items() for arg in args
         for what, _ in _versions(op, arg, args[arg])]


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("op", list(_calls()))
def test_valid_call_runs(ns, op):
    args, call = _calls()[op]
    call(getattr(torch.ops, ns), args)


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("op, arg, what", CASES, ids=[f"{o}-{a}-{w.replace(' ', '_')}" for o, a, w in CASES])
def test_wrong_argument_is_a_clean_error(ns, op, arg, what):
    args, call = _calls()[op]
    wrong = dict(args)
    wrong[arg] = dict(_versions(op, arg, args[arg]))[what]
    with pytest.raises(RuntimeError) as info:
        call(getattr(torch.ops, ns), wrong)
    # the message names the argument (or, for the inputs' feature size, what differs)
    msg = str(info.value).splitlines()[0]
    assert re.search(rf"\b{arg}\b", msg) or ("sizes differ" in msg and what == "one more column"), msg


@pytest.mark.parametrize("ns", NAMESPACES)
def test_saved_statistic_missing_where_its_gradient_is_given(ns):
    args, call = _calls()["_score_reduce_backward"]
    for stat in ("row_lse", "col_lse", "neg_lse", "clamp_lse"):
        wrong = dict(args, **{stat: args[stat][:0]})
        with pytest.raises(RuntimeError, match=f"{stat} \\(the saved forward output\\)"):
            call(getattr(torch.ops, ns), wrong)
    # an empty gradient means "not given": its statistic may be empty too
    ok = dict(args, grad_row_lse=args["grad_row_lse"][:0], row_lse=args["row_lse"][:0])
    call(getattr(torch.ops, ns), ok)


# ---------------------------------------------------------------------------
# The constants shared with C++: defined once in Python (reference.py), checked here
# ---------------------------------------------------------------------------

_INCLUDE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "include",
                        "infomax_ext")


def _cpp_enum(header, names):
    """The values of the named enumerators in ``csrc/include/infomax_ext/<header>``."""
    with open(os.path.join(_INCLUDE, header)) as f:
        text = f.read()
    values = {}
    for name in names:
        found = re.search(rf"\b{name}\s*=\s*(\d+)\s*,", text)
        assert found, f"{name} not found in {header}"
        values[name] = int(found.group(1))
    return values


def test_reduction_bits_are_the_cpp_enum():
    cpp = _cpp_enum("score_math.h", ["kRowLse", "kColLse", "kNegLse", "kNegClampLse", "kNegSoftplus",
                                     "kAllReductions"])
    python = (ops.ROW_LSE, ops.COL_LSE, ops.NEG_LSE, ops.NEG_CLAMP_LSE, ops.NEG_SOFTPLUS, ops.ALL_REDUCTIONS)
    assert python == tuple(cpp.values())
    assert ops.ROW_LSE is reference.ROW_LSE and ops.ALL_REDUCTIONS is reference.ALL_REDUCTIONS  # defined once


def test_activation_codes_are_the_cpp_enum():
    cpp = _cpp_enum("concat_math.h", ["kRelu", "kElu", "kTanh", "kSoftplus", "kGelu", "kNumActivations"])
    assert ops.ACTIVATION_CODES == {"relu": cpp["kRelu"], "elu": cpp["kElu"], "tanh": cpp["kTanh"],
                                    "softplus": cpp["kSoftplus"], "gelu": cpp["kGelu"]}
    assert len(reference.ACTIVATIONS) == cpp["kNumActivations"]


@pytest.mark.parametrize("ns", NAMESPACES)
def test_each_activation_code_runs_its_activation_in_the_compiled_op(ns):
    """What the compiled op does with each code: the reference's activation of that name."""
    g = torch.Generator().manual_seed(3)
    P, Q, w2 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((K, H), (M, H), (H,)))
    b2 = torch.tensor(0.25, dtype=torch.float64)
    for name, code in ops.ACTIVATION_CODES.items():
        got = getattr(torch.ops, ns).concat_score_reduce(P, Q, w2, b2, code, 1, ops.ALL_REDUCTIONS, 2.0)
        want = reference.reduce_scores(reference.scores_concat_hidden(P, Q, w2, b2, name), 1, ops.ALL_REDUCTIONS, 2.0)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y)
