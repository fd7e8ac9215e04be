"""z^T H z for a block of directions without forming H z: forward mode plus one adjoint pass.

Hutchinson's estimator needs only the quadratic forms z^T H z. Move the parameters along a line,
theta(eps) = theta + eps z; every intermediate u_i = phi_i(inputs) of the forward pass then has
derivatives u_i' (first-order forward mode) and u_i'' = J_i u_in'' + Q_i(u_in'), where Q_i is the
op's own second-order term (x' W'^T twice for a matrix product, phi''(x) x'^2 for an elementwise
phi, ...). The u'' recursion is linear, so with the adjoints g_i = dL / du_i of one ordinary
backward pass,

    z^T H z = L''(0) = sum_i < g_i, Q_i(u_in') >

(the second-order adjoint identity: Griewank & Walther, *Evaluating Derivatives*, 2nd ed. 2008,
sec. 5.4; univariate Taylor propagation, ch. 13). One recorded forward + backward per batch gives
the primal values and every g_i; each block of k directions then costs one first-order forward
pass plus the contractions: three products per linear layer and direction (x' W^T, x W'^T and
g W' for < g, 2 x' W'^T >) against four for full second-order Taylor mode, six for a
double-backward Hessian-vector product and nine when the forward and first backward are re-run
per probe (the peers).

:class:`TaylorTape` records the ATen ops that depend on the parameters (a ``TorchDispatchMode``
over an ordinary autograd forward) and replays them with rules. An op without a rule, or an
in-place op on a recorded tensor, raises :class:`UnsupportedOp` while recording (callers fall back
to Hessian-vector products): a missing rule is never silently treated as a constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

_RULES: dict = {}


class UnsupportedOp(NotImplementedError):
    """An ATen op on a parameter-dependent tensor has no rule (or mutates one in place)."""


class Dual:
    """A parameter-dependent value during replay: the primal and its k first derivatives [k, ...]."""

    __slots__ = ("primal", "d1")

    def __init__(self, primal: torch.Tensor, d1: torch.Tensor):
        self.primal, self.d1 = primal, d1


@dataclass
class _Ctx:
    """What a rule sees besides its arguments: the recorded primal output(s), their adjoints
    (None where L does not depend on them, or with ``second=False``), a per-op cache that lives
    across probe blocks, and an accumulator for < g, Q >."""

    out: object
    adj: object
    cache: dict
    second: bool
    k: int
    func: object = None
    contrib: torch.Tensor | None = None

    def add(self, value: torch.Tensor) -> None:
        value = value.reshape(self.k)
        self.contrib = value if self.contrib is None else self.contrib + value


# ----------------------------------------------------------------------------------- helpers
def _p(x):
    return x.primal if isinstance(x, Dual) else x


def _t(x):
    return x.d1 if isinstance(x, Dual) else None


def _add(*terms):
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return out


def _lift(t, ndim: int):
    """[k, *s] -> [k, 1, ..., 1, *s] with 1 + ndim dims, so it broadcasts like its primal."""
    if t is None or t.dim() - 1 >= ndim:
        return t
    return t.reshape(t.shape[0], *([1] * (ndim - t.dim() + 1)), *t.shape[1:])


def _lift_plain(x, ndim: int):
    """A primal tensor (or scalar) broadcast against [k, ...] tangents of an ndim-dim result."""
    if not isinstance(x, torch.Tensor):
        return x
    return x.reshape(*([1] * (ndim + 1 - x.dim())), *x.shape)


def _dim(d: int, ndim: int) -> int:
    """Dimension d of an ndim-dim primal -> the same dimension of its [k, ...] tangent."""
    return (d % ndim if ndim else 0) + 1


def _dims(dims, ndim: int) -> list[int]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(1, ndim + 1))
    if isinstance(dims, int):
        dims = [dims]
    return [_dim(d, ndim) for d in dims]


def _dot(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sum over all but the probe dim of w * t (w broadcast like a primal) -> [k]."""
    if w.shape == t.shape[1:] and t.is_contiguous() and w.is_contiguous():
        return t.reshape(t.shape[0], -1) @ w.reshape(-1)
    return (t * w).reshape(t.shape[0], -1).sum(1)


def _register(*ops):
    def deco(fn):
        for op in ops:
            _RULES[op] = fn
        return fn

    return deco


def _linear(apply: Callable):
    """Rule of an op linear in its first argument (the others constant): u' = apply(x', ...)."""

    def rule(ctx, x, *args, **kwargs):
        if any(isinstance(a, Dual) for a in (*args, *kwargs.values())):
            raise UnsupportedOp("only the first argument may depend on the parameters")
        return apply(x.d1, x.primal, *args, **kwargs)

    return rule


def _none_rule(ctx, *args, **kwargs):
    return None


# ------------------------------------------------------------------------------ linear ops
_register(aten.view.default, aten._unsafe_view.default, aten.reshape.default)(
    _linear(lambda t, p, size: t.reshape(t.shape[0], *size)))
_register(aten.t.default)(_linear(lambda t, p: t.transpose(1, 2) if p.dim() == 2 else t))
_register(aten.transpose.int)(_linear(lambda t, p, a, b: t.transpose(_dim(a, p.dim()), _dim(b, p.dim()))))
_register(aten.permute.default)(_linear(lambda t, p, dims: t.permute(0, *[_dim(d, p.dim()) for d in dims])))
_register(aten.unsqueeze.default)(_linear(lambda t, p, d: t.unsqueeze(_dim(d, p.dim() + 1))))
_register(aten.select.int)(_linear(lambda t, p, dim, i: t.select(_dim(dim, p.dim()), i)))
_register(aten.slice.Tensor)(_linear(
    lambda t, p, dim=0, start=None, end=None, step=1: aten.slice.Tensor(t, _dim(dim, p.dim()), start, end, step)))
_register(aten.clone.default, aten.alias.default, aten.contiguous.default, aten.lift_fresh.default)(
    _linear(lambda t, p, *a, **kw: t))
_register(aten._to_copy.default)(_linear(lambda t, p, **kw: t.to(kw["dtype"]) if kw.get("dtype") else t))
_register(aten.neg.default)(_linear(lambda t, p: -t))
_register(aten.mul.Scalar)(_linear(lambda t, p, s: t * s))
_register(aten.add.Scalar, aten.sub.Scalar)(_linear(lambda t, p, s, alpha=1: t))
_register(aten.rsub.Scalar)(_linear(lambda t, p, s, alpha=1: -alpha * t))
_register(aten.detach.default)(_none_rule)  # stop-gradient: a constant, as for autograd


_register(aten.div.Scalar)(_linear(lambda t, p, s: t / s))


@_register(aten.expand.default)
def _expand(ctx, x, size, implicit=False):
    t = x.d1
    t = t.reshape(t.shape[0], *([1] * (len(size) - x.primal.dim())), *t.shape[1:])
    return t.expand(t.shape[0], *size)


@_register(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(ctx, x, dims=None):
    p = x.primal
    if dims is None:
        dims = [d for d in range(p.dim()) if p.shape[d] == 1]
    elif isinstance(dims, int):
        dims = [dims]
    td = tuple(_dim(d, p.dim()) for d in dims if p.dim() and p.shape[d] == 1)
    return x.d1.squeeze(td) if td else x.d1


@_register(aten.split.Tensor, aten.split_with_sizes.default)
def _split(ctx, x, split, dim=0):
    return list(x.d1.split([o.shape[dim] for o in ctx.out], _dim(dim, x.primal.dim())))


@_register(aten.unbind.int)
def _unbind(ctx, x, dim=0):
    return list(x.d1.unbind(_dim(dim, x.primal.dim())))


def _tangents_of(ctx, tensors) -> list[torch.Tensor]:
    """[k, ...] tangents of a tensor list (zeros for constants; cat's legacy empty 1-D tensors dropped)."""
    return [t.d1 if isinstance(t, Dual) else t.new_zeros((ctx.k, *t.shape)) for t in tensors
            if isinstance(t, Dual) or not (t.dim() == 1 and t.numel() == 0)]


@_register(aten.cat.default)
def _cat(ctx, tensors, dim=0):
    return torch.cat(_tangents_of(ctx, tensors), _dim(dim, ctx.out.dim()))


@_register(aten.stack.default)
def _stack(ctx, tensors, dim=0):
    return torch.stack(_tangents_of(ctx, tensors), _dim(dim, ctx.out.dim()))


@_register(aten.embedding.default)
def _embedding(ctx, weight, indices, *args):
    if isinstance(indices, Dual):
        return None  # integer indices carry no derivative
    t = weight.d1
    return t.index_select(1, indices.reshape(-1)).reshape(t.shape[0], *indices.shape, t.shape[-1])


_register(aten.gather.default)(_linear(
    lambda t, p, dim, index, sparse_grad=False: t.gather(_dim(dim, p.dim()), index.expand(t.shape[0], *index.shape))))
_register(aten.index_select.default)(_linear(lambda t, p, dim, index: t.index_select(_dim(dim, p.dim()), index)))
# Advanced indexing can move dims; vmap over the probe dim applies exactly the same indexing.
_register(aten.index.Tensor)(_linear(lambda t, p, idx: torch.vmap(lambda u: aten.index.Tensor(u, idx))(t)))


@_register(aten.sum.dim_IntList, aten.sum.default)
def _sum(ctx, x, dims=None, keepdim=False, *, dtype=None):
    n = x.primal.dim()
    return x.d1.sum(_dims(dims, n), keepdim=keepdim, dtype=dtype) if n else x.d1


@_register(aten.mean.dim, aten.mean.default)
def _mean(ctx, x, dims=None, keepdim=False, *, dtype=None):
    n = x.primal.dim()
    return x.d1.mean(_dims(dims, n), keepdim=keepdim, dtype=dtype) if n else x.d1


@_register(aten.masked_fill.Scalar)
def _masked_fill(ctx, x, mask, value):
    return x.d1.masked_fill(_lift_plain(mask, x.primal.dim()), 0)


@_register(aten.where.self)
def _where(ctx, cond, a, b):
    n = ctx.out.dim()
    ta, tb = _lift(_t(a), n), _lift(_t(b), n)
    if ta is None and tb is None:
        return None
    return torch.where(_lift_plain(cond, n), ta if ta is not None else 0.0, tb if tb is not None else 0.0)


@_register(aten.add.Tensor, aten.sub.Tensor)
def _add_sub(ctx, a, b, alpha=1):
    n = ctx.out.dim()
    sign = alpha if ctx.func is aten.add.Tensor else -alpha
    tb = _lift(_t(b), n)
    if tb is not None and sign != 1:
        tb = tb * sign
    return _add(_lift(_t(a), n), tb)


@_register(aten.amax.default)
def _amax(ctx, x, dims=(), keepdim=False):
    # Piecewise linear: the derivative of the maximum (ties share evenly, as in autograd).
    p = x.primal
    red = _dims(dims, p.dim())
    mask = ctx.cache.get("mask")
    if mask is None:
        mask = (p == aten.amax.default(p, dims, True)).to(p.dtype)
        mask = ctx.cache.setdefault("mask", mask / mask.sum([r - 1 for r in red], keepdim=True))
    return (x.d1 * mask).sum(red, keepdim=keepdim)


@_register(aten.nll_loss_forward.default)
def _nll_loss(ctx, x, target, weight, reduction, ignore_index):
    # -sum_i w_i x[i, t_i] (/ sum_i w_i for reduction="mean"): linear in x.
    p, t = x.primal, x.d1
    out, total = ctx.out
    tgt = target.reshape(-1) if p.dim() == 1 else target
    valid = tgt != ignore_index
    safe = torch.where(valid, tgt, 0)
    w = valid.to(p.dtype) if weight is None else valid.to(p.dtype) * weight[safe]
    t = t.reshape(t.shape[0], -1, p.shape[-1])
    vals = -t.gather(2, safe.reshape(1, -1, 1).expand(t.shape[0], -1, 1))[..., 0] * w
    if reduction == 0:  # none
        return [vals.reshape(t.shape[0], *out.shape), None]
    s = vals.sum(1)
    return [s / total if reduction == 1 else s, None]


# ------------------------------------------------------------------------- bilinear products
@_register(aten.mul.Tensor)
def _mul(ctx, a, b):
    n = ctx.out.dim()
    ta, tb = _lift(_t(a), n), _lift(_t(b), n)
    d1 = _add(None if ta is None else ta * _lift_plain(_p(b), n), None if tb is None else _lift_plain(_p(a), n) * tb)
    if ctx.second and ta is not None and tb is not None and ctx.adj is not None:
        ctx.add(2 * _dot(ctx.adj, ta * tb))  # Q = 2 a' b'
    return d1


@_register(aten.div.Tensor)
def _div(ctx, a, b):
    n = ctx.out.dim()
    pb = _lift_plain(_p(b), n)
    ta, tb = _lift(_t(a), n), _lift(_t(b), n)
    # y = a / b: y' = (a' - y b') / b;  Q = y''|_(a''=b''=0) = -2 y' b' / b
    d1 = _add(ta, None if tb is None else -_lift_plain(ctx.out, n) * tb) / pb
    if ctx.second and tb is not None and ctx.adj is not None:
        w = ctx.cache.get("w")
        if w is None:
            w = ctx.cache.setdefault("w", -2 * ctx.adj / _p(b))
        ctx.add(_dot(w, d1 * tb))
    return d1


def _mm_tangent(a, b, ta, tb):
    """(a b)' = a' b + a b' for a [n, m] @ b [m, p], tangents [k, ...], as two GEMMs."""
    out = None
    if ta is not None:
        k = ta.shape[0]
        out = (ta.reshape(k * ta.shape[1], ta.shape[2]) @ b).view(k, ta.shape[1], b.shape[1])
    if tb is not None:
        k, m, p = tb.shape
        # [n, m] @ [m, k * p]: a view, no copy, when tb is a transposed weight direction.
        other = (a @ tb.permute(1, 0, 2).reshape(m, k * p)).view(a.shape[0], k, p).permute(1, 0, 2)
        out = other if out is None else out.add_(other)
    return out


def _mm_second(ctx, ta, tb, scale=1):
    """< g, 2 a' b' > = 2 < g b'^T, a' > with g b'^T for all k directions as one GEMM."""
    if not ctx.second or ta is None or tb is None or ctx.adj is None:
        return
    k, m, p = tb.shape
    g = ctx.adj  # [n, p]
    gb = (g @ tb.transpose(1, 2).permute(1, 0, 2).reshape(p, k * m)).view(g.shape[0], k, m)  # [n, k, m]
    ctx.add((2 * scale) * (gb.permute(1, 0, 2) * ta).sum((1, 2)))


@_register(aten.mm.default)
def _mm(ctx, a, b):
    ta, tb = _t(a), _t(b)
    _mm_second(ctx, ta, tb)
    return _mm_tangent(_p(a), _p(b), ta, tb)


@_register(aten.addmm.default)
def _addmm(ctx, bias, a, b, *, beta=1, alpha=1):
    ta, tb = _t(a), _t(b)
    _mm_second(ctx, ta, tb, alpha)
    d1 = _mm_tangent(_p(a), _p(b), ta, tb)
    if d1 is not None and alpha != 1:
        d1 = d1.mul_(alpha)
    tbias = _t(bias)
    if tbias is not None:
        tbias = _lift(tbias * beta if beta != 1 else tbias, ctx.out.dim())
        d1 = tbias.expand(ctx.k, *ctx.out.shape) if d1 is None else d1.add_(tbias)
    return d1


def _bmm_jet_plain(t, b):
    """[k, B, n, m] @ [B, m, p]: k folded into the rows, B GEMMs of [k n, m] @ [m, p]."""
    k, B, n, m = t.shape
    return torch.bmm(t.transpose(0, 1).reshape(B, k * n, m), b).view(B, k, n, -1).transpose(0, 1)


def _bmm_plain_jet(a, t):
    """[B, n, m] @ [k, B, m, p]: k folded into the columns, B GEMMs of [n, m] @ [m, k p]."""
    k, B, m, p = t.shape
    return torch.bmm(a, t.permute(1, 2, 0, 3).reshape(B, m, k * p)).view(B, -1, k, p).permute(2, 0, 1, 3)


@_register(aten.bmm.default)
def _bmm(ctx, a, b):
    ta, tb = _t(a), _t(b)
    if ctx.second and ta is not None and tb is not None and ctx.adj is not None:
        # < g, 2 a' b' > = 2 < g b'^T, a' >
        ctx.add(2 * (_bmm_plain_jet(ctx.adj, tb.transpose(-1, -2)) * ta).sum((1, 2, 3)))
    return _add(None if ta is None else _bmm_jet_plain(ta, _p(b)), None if tb is None else _bmm_plain_jet(_p(a), tb))


# ---------------------------------------------------------------------------- elementwise
def _unary(derivs: Callable):
    """Rule of an elementwise phi: u' = phi'(x) x', Q = phi''(x) x'^2.

    ``derivs(x, y, *args)`` returns (phi'(x), phi''(x)) from the primal input and output; the
    contraction weight g phi''(x) is cached across probe blocks.
    """

    def rule(ctx, x, *args, **kwargs):
        cache = ctx.cache
        if "g1" not in cache:
            g1, g2 = derivs(x.primal, ctx.out, *args, **kwargs)
            cache["g1"] = g1
            cache["w"] = None if ctx.adj is None else ctx.adj * g2
        d1 = cache["g1"] * x.d1
        if ctx.second and cache["w"] is not None:
            ctx.add(_dot(cache["w"], x.d1 * x.d1))
        return d1

    return rule


_INV_SQRT_2PI = 1.0 / math.sqrt(2 * math.pi)


def _gelu_derivs(x, y, approximate="none"):
    if approximate == "tanh":
        c, a = math.sqrt(2 / math.pi), 0.044715
        th = torch.tanh(c * (x + a * x**3))
        s = 1 - th * th
        du = c * (1 + 3 * a * x * x)
        return 0.5 * (1 + th) + 0.5 * x * s * du, s * du + 0.5 * x * s * (c * 6 * a * x - 2 * th * du * du)
    # phi(x) = x Phi(x): phi' = Phi + x pdf, phi'' = pdf (2 - x^2)
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    cdf = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2))))
    return cdf + x * pdf, pdf * (2 - x * x)


_UNARY = {
    aten.exp.default: lambda x, y: (y, y),
    aten.log.default: lambda x, y: (1 / x, -1 / (x * x)),
    aten.tanh.default: lambda x, y: (1 - y * y, -2 * y * (1 - y * y)),
    aten.sigmoid.default: lambda x, y: (y * (1 - y), y * (1 - y) * (1 - 2 * y)),
    aten.rsqrt.default: lambda x, y: (-0.5 * y / x, 0.75 * y / (x * x)),
    aten.sqrt.default: lambda x, y: (0.5 / y, -0.25 / (y * x)),
    aten.reciprocal.default: lambda x, y: (-y * y, 2 * y * y * y),
    aten.erf.default: lambda x, y: (2 / math.sqrt(math.pi) * torch.exp(-x * x),
                                    -4 / math.sqrt(math.pi) * x * torch.exp(-x * x)),
    aten.silu.default: lambda x, y: ((s := torch.sigmoid(x)) * (1 + x * (1 - s)),
                                     s * (1 - s) * (2 + x * (1 - 2 * s))),
    aten.relu.default: lambda x, y: ((x > 0).to(x.dtype), torch.zeros_like(x)),
    aten.abs.default: lambda x, y: (torch.sign(x), torch.zeros_like(x)),
    aten.sin.default: lambda x, y: (torch.cos(x), -y),
    aten.cos.default: lambda x, y: (-torch.sin(x), -y),
    aten.gelu.default: _gelu_derivs,
    aten.pow.Tensor_Scalar: lambda x, y, e: (e * x.pow(e - 1), e * (e - 1) * x.pow(e - 2)),
}
for _op, _fn in _UNARY.items():
    _RULES[_op] = _unary(_fn)


# ---------------------------------------------------------------------- normalizations etc.
@_register(aten.native_layer_norm.default)
def _layer_norm(ctx, x, normalized_shape, weight, bias, eps):
    out, mean, rstd = ctx.out
    px, pw = _p(x), _p(weight)
    n = px.dim()
    red = list(range(n - len(normalized_shape) + 1, n + 1))  # normalized dims of a [k, ...] tangent
    cache = ctx.cache
    if "c" not in cache:
        cache["c"] = c = px - mean
        cache["xhat"] = c * rstd
        g_out, _, g_rstd = ctx.adj if ctx.adj is not None else (None, None, None)
        G = None if g_out is None else (g_out * pw if pw is not None else g_out)
        cache["G"] = G
        cache["Gc"] = None if G is None else (G * c).sum([r - 1 for r in red], keepdim=True)
        cache["g_rstd"] = g_rstd
        cache["g_out"] = g_out
    c, xhat = cache["c"], cache["xhat"]
    d_out = d_mean = d_rstd = h1 = None
    if isinstance(x, Dual):
        # c = x - mean(x); v = mean(c^2); r = (v + eps)^(-1/2); xhat = c r
        x1 = x.d1
        d_mean = x1.mean(red, keepdim=True)
        c1 = x1 - d_mean
        v1 = 2 * (c * c1).mean(red, keepdim=True)
        r3 = rstd ** 3
        d_rstd = -0.5 * r3 * v1
        h1 = c1 * rstd + c * d_rstd
        d_out = h1 * pw if pw is not None else h1
        if ctx.second and (cache["G"] is not None or cache["g_rstd"] is not None):
            # Q(r) = 3/4 r^5 v'^2 - 1/2 r^3 v''_Q with v''_Q = 2 mean(c'^2); Q(xhat) = 2 c' r' + c Q(r)
            q_r = 0.75 * r3 * rstd * rstd * v1 * v1 - r3 * (c1 * c1).mean(red, keepdim=True)
            total = None
            if cache["G"] is not None:
                s1 = (cache["G"] * c1).sum(red, keepdim=True)
                total = (2 * d_rstd * s1 + q_r * cache["Gc"]).reshape(ctx.k, -1).sum(1)
            if cache["g_rstd"] is not None:
                total = _add(total, (cache["g_rstd"] * q_r).reshape(ctx.k, -1).sum(1))
            ctx.add(total)
    w1 = _t(weight)
    if w1 is not None:
        w1 = _lift(w1, n)
        d_out = _add(d_out, w1 * xhat)
        if ctx.second and h1 is not None and cache["g_out"] is not None:
            ctx.add(2 * _dot(cache["g_out"], h1 * w1))  # Q = 2 xhat' gamma'
    d_out = _add(d_out, _lift(_t(bias), n))
    return [d_out, d_mean, d_rstd]


@_register(aten._softmax.default, aten._safe_softmax.default)
def _softmax(ctx, x, dim, *args):
    s = ctx.out  # _safe_softmax: rows of -inf give s = 0, so s' = 0 there too
    d = _dim(dim, s.dim())
    # s' = s a with a = x' - <s, x'>;  Q = s (a^2 - <s, a^2>)  ->  <g, Q> = sum a^2 s (g - <g, s>)
    a = x.d1 - (s * x.d1).sum(d, keepdim=True)
    if ctx.second and ctx.adj is not None:
        w = ctx.cache.get("w")
        if w is None:
            g = ctx.adj
            w = ctx.cache.setdefault("w", s * (g - (g * s).sum(d - 1, keepdim=True)))
        ctx.add(_dot(w, a * a))
    return s * a


@_register(aten._log_softmax.default)
def _log_softmax(ctx, x, dim, half_to_float):
    cache = ctx.cache
    if "s" not in cache:
        cache["s"] = torch.exp(ctx.out)
    s = cache["s"]
    d = _dim(dim, s.dim())
    # l' = x' - <s, x'>;  Q = -Var_s(x') = -<s, l'^2> on every entry of the row
    d1 = x.d1 - (s * x.d1).sum(d, keepdim=True)
    if ctx.second and ctx.adj is not None:
        w = cache.get("w")
        if w is None:
            w = cache.setdefault("w", -ctx.adj.sum(d - 1, keepdim=True) * s)
        ctx.add(_dot(w, d1 * d1))
    return d1


# ------------------------------------------------------------------------ constant outputs
for _op in (aten.eq.Scalar, aten.eq.Tensor, aten.ne.Scalar, aten.ne.Tensor, aten.lt.Scalar, aten.lt.Tensor,
            aten.le.Scalar, aten.le.Tensor, aten.gt.Scalar, aten.gt.Tensor, aten.ge.Scalar, aten.ge.Tensor,
            aten.isnan.default, aten.isinf.default, aten.argmax.default, aten.argmin.default,
            aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
            aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
            aten.sign.default, aten.is_same_size.default, aten._local_scalar_dense.default):
    _RULES[_op] = _none_rule


# -------------------------------------------------------------------------------- the tape
# An argument template: ("c", constant) | ("s", slot) | ("l", list or tuple type, [templates]).
def _template(x, slot):
    if isinstance(x, (list, tuple)):
        parts = [_template(v, slot) for v in x]
        if any(p[0] != "c" for p in parts):
            return ("l", type(x), parts)
        return ("c", x)
    s = slot(x)
    return ("c", x) if s is None else ("s", s)


def _build(t, values, tang):
    kind = t[0]
    if kind == "c":
        return t[1]
    if kind == "s":
        s = t[1]
        d = tang.get(s)
        return values[s] if d is None else Dual(values[s], d)
    return t[1](_build(u, values, tang) for u in t[2])


@dataclass
class _Entry:
    func: object
    rule: Callable
    args: list  # argument templates
    kwargs: dict
    in_slots: list  # slots read
    out_slots: list  # slot of each tensor leaf of the output (None: not floating point)
    out: object  # the primal output (a tensor, or a tuple/list of them)
    cache: dict = field(default_factory=dict)
    adj: object = None


class _Recorder(TorchDispatchMode):
    """Records every ATen op that reads a parameter-dependent tensor, in execution order."""

    def __init__(self, params: list[torch.Tensor]):
        super().__init__()
        self.values: list[torch.Tensor] = list(params)
        self.slot_of = {id(p): i for i, p in enumerate(params)}
        self.entries: list[_Entry] = []
        self.constants: set[int] = set()

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps __torch_dispatch__ in torch._disable_dynamo by default, which imports
        # torch._dynamo (6 s here) on the first op; nothing is compiled inside a recording.
        return False

    def _slot(self, x):
        if isinstance(x, torch.Tensor):
            s = self.slot_of.get(id(x))
            if s is not None and self.values[s] is x:
                return s
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        slots = [self._slot(x) for x in leaves]
        if func._schema.is_mutable and any(s is not None or id(x) in self.constants
                                           for s, x in zip(slots, leaves, strict=True) if isinstance(x, torch.Tensor)):
            raise UnsupportedOp(f"in-place {func} on a tensor the loss depends on; use an out-of-place op")
        out = func(*args, **kwargs)
        if all(s is None for s in slots):
            return out
        rule = _RULES.get(func)
        if rule is None:
            raise UnsupportedOp(f"no forward rule for {func}")
        out_leaves, _ = tree_flatten(out)
        out_slots = []
        for o in out_leaves:
            if isinstance(o, torch.Tensor) and o.is_floating_point():
                self.slot_of[id(o)] = len(self.values)
                out_slots.append(len(self.values))
                self.values.append(o)
            else:
                out_slots.append(None)
        for sl, x in zip(slots, leaves, strict=True):
            if sl is None and isinstance(x, torch.Tensor):
                self.constants.add(id(x))
        self.entries.append(_Entry(
            func, rule, [_template(x, self._slot) for x in args], {k: _template(v, self._slot) for k, v in kwargs.items()},
            [sl for sl in slots if sl is not None], out_slots, out))
        return out


def _detached(x):
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (list, tuple)):
        return type(x)(_detached(v) for v in x)
    return x


class TaylorTape:
    """``fn(params)`` recorded once; :meth:`push` gives directional derivatives for k directions.

    ``second_order=True`` (scalar ``fn``): one backward pass at recording gives the adjoints, and
    :meth:`push` returns (f' [k], f'' [k]) with f'' = z^T H z. ``second_order=False``: push
    returns (u' [k, *u.shape], None) for the output u of fn (Jacobian-vector products).
    """

    def __init__(self, fn: Callable, params: list[torch.Tensor], *, second_order: bool = True):
        leaves = [p.detach().requires_grad_(second_order) for p in params]
        rec = _Recorder(leaves)
        with torch.enable_grad() if second_order else torch.no_grad(), rec:
            out = fn(leaves)
        self.n_params = len(params)
        self.entries = rec.entries
        self.values = rec.values
        self.out_slot = rec._slot(out)
        self.second_order = second_order
        if second_order:
            if out.numel() != 1:
                raise ValueError(f"fn must return a scalar for second-order forms, got shape {tuple(out.shape)}")
            self._adjoints(out)
        # Drop the autograd graph: from here on only values, adjoints and rule caches are kept.
        self.values = [v.detach() for v in self.values]
        for e in self.entries:
            e.out = _detached(e.out)
        self.out = out.detach()
        # A slot's tangent is freed after its last reader.
        self.last_use: dict[int, int] = {}
        for i, e in enumerate(self.entries):
            for sl in e.in_slots:
                self.last_use[sl] = i
        self.free_after = [[sl for sl in set(e.in_slots) if self.last_use[sl] == i and sl != self.out_slot]
                           for i, e in enumerate(self.entries)]

    def _adjoints(self, out: torch.Tensor) -> None:
        targets = [sl for e in self.entries for sl in e.out_slots if sl is not None and self.values[sl].requires_grad]
        grads = torch.autograd.grad(out, [self.values[sl] for sl in targets], allow_unused=True) if targets else ()
        adj = dict(zip(targets, grads, strict=True))
        for e in self.entries:
            parts = [adj.get(sl) if sl is not None else None for sl in e.out_slots]
            if all(g is None for g in parts):
                e.adj = None
            elif isinstance(e.out, torch.Tensor):
                e.adj = parts[0]
            else:
                e.adj = type(e.out)(parts)

    def push(self, directions: list[torch.Tensor]):
        """Directions [k, *p.shape] per parameter -> (first derivative of the output, z^T H z or None)."""
        if len(directions) != self.n_params:
            raise ValueError(f"expected {self.n_params} direction tensors, got {len(directions)}")
        k = directions[0].shape[0] if directions and directions[0].dim() else 0
        for i, d in enumerate(directions):
            if d.dim() == 0 or d.shape[0] != k or d.shape[1:] != self.values[i].shape:
                raise ValueError(f"directions[{i}] must be [k={k}, *{tuple(self.values[i].shape)}] "
                                 f"(k directions of parameter {i}), got {tuple(d.shape)}")
        tang: dict[int, torch.Tensor] = dict(enumerate(directions))
        # Contributions come in the model's dtype; their sum over ops is kept in float64.
        second = torch.zeros(k, dtype=torch.float64, device=self.out.device) if self.second_order else None
        values = self.values
        for e, free in zip(self.entries, self.free_after, strict=True):
            if any(sl in tang for sl in e.in_slots):
                self._apply(e, values, tang, k, second)
            for sl in free:
                tang.pop(sl, None)
        d1 = tang.get(self.out_slot) if self.out_slot is not None else None
        if d1 is None:
            d1 = self.out.new_zeros((k, *self.out.shape))
        return d1, second

    def _apply(self, e: _Entry, values, tang, k: int, second) -> None:
        args = [_build(t, values, tang) for t in e.args]
        kwargs = {key: _build(t, values, tang) for key, t in e.kwargs.items()}
        ctx = _Ctx(e.out, e.adj, e.cache, self.second_order, k, e.func)
        try:
            result = e.rule(ctx, *args, **kwargs)
        except UnsupportedOp:
            raise
        except Exception as err:  # an argument combination the rule does not cover
            raise UnsupportedOp(f"the forward rule of {e.func} failed: {type(err).__name__}: {err}") from err
        if ctx.contrib is not None:
            second += ctx.contrib.to(second.dtype)
        results = result if isinstance(result, (list, tuple)) else [result]
        for sl, r in zip(e.out_slots, results, strict=False):
            if sl is not None and r is not None:
                shape = values[sl].shape
                # Rules may return a tangent that only broadcasts to the output (a' of a + b for a
                # constant, larger b): expand it (a view) so that later reductions count it.
                tang[sl] = r if r.shape[1:] == shape else r.expand(k, *shape)
