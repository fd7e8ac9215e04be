"""Second-order forward (Taylor) mode: z^T H z for a block of directions in one forward pass.

Hutchinson's estimator needs only the quadratic forms z^T H z, not H z. With the parameters
moving along a line, theta(eps) = theta + eps z, every intermediate value of the forward pass is a
univariate second-order Taylor polynomial x(eps) = x + eps x' + eps^2 / 2 x'' and
L''(0) = z^T H z (univariate Taylor propagation: Griewank & Walther, *Evaluating Derivatives*,
2nd ed. 2008, ch. 13; for randomized Hessian traces of networks, Dangel, Siebert, Zeinhofer &
Walther, "Collapsing Taylor Mode Automatic Differentiation", NeurIPS 2024). A linear layer
y = x W^T costs four products per direction (x' W^T, x W'^T, x'' W^T, x' W'^T) against six for a
Hessian-vector product by double backward (and nine when the forward and first backward are
re-run per probe, as the peers do); there is no backward pass and no autograd graph, so memory
is the forward activations times (1 + 2 k).

:class:`Jet` is a tensor subclass carrying ``(x, x', x'')``, the two derivative tensors with a
leading dimension of k directions; its ``__torch_dispatch__`` applies the rule of each ATen op.
Ops without a rule raise :class:`UnsupportedOp` (callers fall back to Hessian-vector products):
a missing rule can never silently be treated as a constant. ``order=1`` propagates x' only
(Jacobian-vector products, for the Gauss-Newton quadratic forms).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

aten = torch.ops.aten

_RULES: dict = {}


class UnsupportedOp(NotImplementedError):
    """An ATen op reached with a Jet argument has no Taylor rule."""


class Jet(torch.Tensor):
    """A tensor x with first and second directional derivatives d1 = x', d2 = x'' ([k, *x.shape]).

    ``d1``/``d2`` None means zero. ``order`` 1 drops every second-order term.
    """

    primal: torch.Tensor
    d1: torch.Tensor | None
    d2: torch.Tensor | None
    order: int

    @staticmethod
    def __new__(cls, primal: torch.Tensor, d1, d2, order: int = 2):
        r = torch.Tensor._make_wrapper_subclass(
            cls, primal.shape, strides=primal.stride(), storage_offset=primal.storage_offset(),
            dtype=primal.dtype, device=primal.device, requires_grad=False)
        r.primal, r.d1, r.d2, r.order = primal, d1, d2, order
        return r

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Jet({self.primal!r}, d1={None if self.d1 is None else tuple(self.d1.shape)})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULES.get(func) or _RULES.get(func.overloadpacket)
        if rule is None:
            raise UnsupportedOp(f"no second-order Taylor rule for {func}")
        return rule(func, *args, **kwargs)


# ----------------------------------------------------------------------------------- helpers
def _primal(x):
    return x.primal if isinstance(x, Jet) else x


def _d1(x):
    return x.d1 if isinstance(x, Jet) else None


def _d2(x):
    return x.d2 if isinstance(x, Jet) else None


def _order(*xs) -> int:
    return min((x.order for x in xs if isinstance(x, Jet)), default=2)


def _make(primal, d1, d2, order: int):
    """A Jet, or the plain primal when both derivatives vanish (a constant)."""
    if not isinstance(primal, torch.Tensor):
        return primal
    if order < 2:
        d2 = None
    if d1 is None and d2 is None:
        return primal
    return Jet(primal, d1, d2, order)


def _add(*terms):
    """Sum of the non-None terms (None if all are None)."""
    out = None
    for t in terms:
        if t is None:
            continue
        out = t if out is None else out + t
    return out


def _lift(t, ndim: int):
    """[k, *s] -> [k, 1, ..., 1, *s] with 1 + ndim dims, so it broadcasts like the primal."""
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


def _probes(*xs) -> int:
    for x in xs:
        if isinstance(x, Jet):
            return (x.d1 if x.d1 is not None else x.d2).shape[0]
    raise AssertionError("no Jet argument")  # pragma: no cover


def _register(*ops):
    def deco(fn):
        for op in ops:
            _RULES[op] = fn
        return fn

    return deco


def _linear_rule(apply: Callable):
    """Rule of an op linear in its first argument; ``apply(t, primal, *args, **kw)`` maps a
    [k, ...] tangent of the first argument (other arguments are constants)."""

    def rule(func, x, *args, **kwargs):
        p = _primal(x)
        out = func(p, *args, **kwargs)
        if not isinstance(x, Jet):
            return out
        d1 = None if x.d1 is None else apply(x.d1, p, *args, **kwargs)
        d2 = None if x.d2 is None else apply(x.d2, p, *args, **kwargs)
        return _make(out, d1, d2, x.order)

    return rule


def _check_constant_args(func, args, kwargs) -> None:
    if any(isinstance(a, Jet) for a in (*args, *kwargs.values())):
        raise UnsupportedOp(f"{func}: only the first argument may depend on the parameters")


# ------------------------------------------------------------------------------ linear ops
def _view_tangent(t, p, size, *_, **__):
    return t.reshape(t.shape[0], *size)


_register(aten.view.default, aten._unsafe_view.default, aten.reshape.default)(_linear_rule(_view_tangent))


@_register(aten.t.default)
def _t(func, x):
    return _linear_rule(lambda t, p: t.transpose(1, 2) if p.dim() == 2 else t)(func, x)


@_register(aten.transpose.int)
def _transpose(func, x, d0, d1):
    n = _primal(x).dim()
    return _linear_rule(lambda t, p, a, b: t.transpose(_dim(a, n), _dim(b, n)))(func, x, d0, d1)


@_register(aten.permute.default)
def _permute(func, x, dims):
    n = _primal(x).dim()
    return _linear_rule(lambda t, p, ds: t.permute(0, *[_dim(d, n) for d in ds]))(func, x, dims)


def _expand_tangent(t, p, size, implicit=False):
    new = len(size) - p.dim()
    t = t.reshape(t.shape[0], *([1] * new), *t.shape[1:])
    return t.expand(t.shape[0], *size)


_register(aten.expand.default)(_linear_rule(_expand_tangent))


@_register(aten.unsqueeze.default)
def _unsqueeze(func, x, d):
    n = _primal(x).dim() + 1
    return _linear_rule(lambda t, p, dd: t.unsqueeze(_dim(dd, n)))(func, x, d)


@_register(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(func, x, dims=None):
    p = _primal(x)
    n = p.dim()
    if dims is None:
        dims = [d for d in range(n) if p.shape[d] == 1]
    elif isinstance(dims, int):
        dims = [dims]
    dims = [d for d in dims if n and p.shape[d] == 1]
    td = tuple(_dim(d, n) for d in dims)
    out_rule = _linear_rule(lambda t, *_: t.squeeze(td) if td else t)
    return out_rule(func, x) if func is aten.squeeze.default else out_rule(func, x, dims if dims else [])


@_register(aten.slice.Tensor)
def _slice(func, x, dim=0, start=None, end=None, step=1):
    n = _primal(x).dim()
    return _linear_rule(lambda t, p, *a: aten.slice.Tensor(t, _dim(dim, n), start, end, step))(
        func, x, dim, start, end, step)


@_register(aten.select.int)
def _select(func, x, dim, index):
    n = _primal(x).dim()
    return _linear_rule(lambda t, p, *a: t.select(_dim(dim, n), index))(func, x, dim, index)


@_register(aten.split.Tensor, aten.split_with_sizes.default)
def _split(func, x, split, dim=0):
    p = _primal(x)
    outs = func(p, split, dim)
    if not isinstance(x, Jet):
        return outs
    d = _dim(dim, p.dim())
    sizes = [o.shape[dim] for o in outs]
    d1 = x.d1.split(sizes, d) if x.d1 is not None else [None] * len(outs)
    d2 = x.d2.split(sizes, d) if x.d2 is not None else [None] * len(outs)
    return [_make(o, a, b, x.order) for o, a, b in zip(outs, d1, d2, strict=True)]


@_register(aten.unbind.int)
def _unbind(func, x, dim=0):
    p = _primal(x)
    outs = func(p, dim)
    d = _dim(dim, p.dim())
    d1 = x.d1.unbind(d) if x.d1 is not None else [None] * len(outs)
    d2 = x.d2.unbind(d) if x.d2 is not None else [None] * len(outs)
    return [_make(o, a, b, x.order) for o, a, b in zip(outs, d1, d2, strict=True)]


@_register(aten.cat.default)
def _cat(func, tensors, dim=0):
    prim = [_primal(t) for t in tensors]
    out = func(prim, dim)
    k = _probes(*tensors)
    order = _order(*tensors)
    d = _dim(dim, out.dim())

    def part(get):
        if all(get(t) is None for t in tensors):
            return None
        return torch.cat([get(t) if get(t) is not None else p.new_zeros((k, *p.shape))
                          for t, p in zip(tensors, prim, strict=True)], d)

    return _make(out, part(_d1), part(_d2) if order > 1 else None, order)


@_register(aten.stack.default)
def _stack(func, tensors, dim=0):
    n = _primal(tensors[0]).dim() + 1
    dim = dim % n
    return _cat(aten.cat.default, [aten.unsqueeze.default(t, dim) for t in tensors], dim)


def _identity_tangent(t, *_, **__):
    return t


_register(aten.clone.default, aten.alias.default, aten.contiguous.default, aten.lift_fresh.default)(
    _linear_rule(_identity_tangent))


@_register(aten._to_copy.default)
def _to_copy(func, x, **kwargs):
    dtype = kwargs.get("dtype")
    return _linear_rule(lambda t, *_, **__: t.to(dtype) if dtype is not None else t)(func, x, **kwargs)


@_register(aten.detach.default)
def _detach(func, x):
    return _primal(x).detach()  # stop-gradient: a constant, as for autograd


@_register(aten.embedding.default)
def _embedding(func, weight, indices, *args):
    _check_constant_args(func, (indices, *args), {})

    def apply(t, p, idx, *_):
        return t.index_select(1, idx.reshape(-1)).reshape(t.shape[0], *idx.shape, p.shape[1])

    return _linear_rule(apply)(func, weight, indices, *args)


@_register(aten.gather.default)
def _gather(func, x, dim, index, sparse_grad=False):
    n = _primal(x).dim()
    return _linear_rule(lambda t, p, *_: t.gather(_dim(dim, n), index.expand(t.shape[0], *index.shape)))(
        func, x, dim, index, sparse_grad)


@_register(aten.index_select.default)
def _index_select(func, x, dim, index):
    n = _primal(x).dim()
    return _linear_rule(lambda t, p, *_: t.index_select(_dim(dim, n), index))(func, x, dim, index)


@_register(aten.index.Tensor)
def _index(func, x, indices):
    _check_constant_args(func, indices, {})
    # Advanced indexing can move dims; vmap over the probe dim applies exactly the same indexing.
    return _linear_rule(lambda t, p, idx: torch.vmap(lambda u: aten.index.Tensor(u, idx))(t))(func, x, indices)


@_register(aten.sum.dim_IntList, aten.sum.default)
def _sum(func, x, dims=None, keepdim=False, *, dtype=None):
    n = _primal(x).dim()
    args = () if func is aten.sum.default else (dims, keepdim)

    def apply(t, *_, **__):
        return t.sum(_dims(dims, n), keepdim=keepdim, dtype=dtype) if n else t

    return _linear_rule(apply)(func, x, *args, **({"dtype": dtype} if dtype is not None else {}))


@_register(aten.mean.dim, aten.mean.default)
def _mean(func, x, dims=None, keepdim=False, *, dtype=None):
    n = _primal(x).dim()
    args = () if func is aten.mean.default else (dims, keepdim)

    def apply(t, *_, **__):
        return t.mean(_dims(dims, n), keepdim=keepdim, dtype=dtype) if n else t

    return _linear_rule(apply)(func, x, *args, **({"dtype": dtype} if dtype is not None else {}))


@_register(aten.neg.default)
def _neg(func, x):
    return _linear_rule(lambda t, p: -t)(func, x)


@_register(aten.mul.Scalar, aten.div.Scalar)
def _scale(func, x, s):
    return _linear_rule(lambda t, p, c: func(t, c))(func, x, s)


@_register(aten.add.Scalar, aten.sub.Scalar)
def _shift(func, x, s, alpha=1):
    return _linear_rule(_identity_tangent)(func, x, s, alpha)


@_register(aten.rsub.Scalar)
def _rsub_scalar(func, x, s, alpha=1):
    return _linear_rule(lambda t, *_: -alpha * t)(func, x, s, alpha)


@_register(aten.masked_fill.Scalar)
def _masked_fill(func, x, mask, value):
    _check_constant_args(func, (mask,), {})
    n = _primal(x).dim()
    return _linear_rule(lambda t, p, m, v: t.masked_fill(_lift_plain(m, n), 0))(func, x, mask, value)


@_register(aten.where.self)
def _where(func, cond, a, b):
    _check_constant_args(func, (cond,), {})
    out = func(cond, _primal(a), _primal(b))
    n = out.dim()
    c = _lift_plain(cond, n)
    order = _order(a, b)

    def part(get):
        ta, tb = _lift(get(a), n), _lift(get(b), n)
        if ta is None and tb is None:
            return None
        return torch.where(c, ta if ta is not None else 0.0, tb if tb is not None else 0.0)

    return _make(out, part(_d1), part(_d2), order)


# ---------------------------------------------------------------------------- elementwise
@_register(aten.add.Tensor, aten.sub.Tensor)
def _add_sub(func, a, b, alpha=1):
    out = func(_primal(a), _primal(b), alpha=alpha)
    n = out.dim()
    sign = alpha if func is aten.add.Tensor else -alpha

    def part(get):
        ta, tb = _lift(get(a), n), _lift(get(b), n)
        if tb is not None and sign != 1:
            tb = tb * sign
        return _add(ta, tb)

    order = _order(a, b)
    return _make(out, part(_d1), part(_d2) if order > 1 else None, order)


@_register(aten.mul.Tensor)
def _mul(func, a, b):
    pa, pb = _primal(a), _primal(b)
    out = func(pa, pb)
    n = out.dim()
    order = _order(a, b)
    a1, b1 = _lift(_d1(a), n), _lift(_d1(b), n)
    la, lb = _lift_plain(pa, n), _lift_plain(pb, n)
    d1 = _add(None if a1 is None else a1 * lb, None if b1 is None else la * b1)
    d2 = None
    if order > 1:
        a2, b2 = _lift(_d2(a), n), _lift(_d2(b), n)
        cross = None if a1 is None or b1 is None else 2 * a1 * b1
        d2 = _add(None if a2 is None else a2 * lb, cross, None if b2 is None else la * b2)
    return _make(out, d1, d2, order)


@_register(aten.div.Tensor)
def _div(func, a, b):
    pa, pb = _primal(a), _primal(b)
    out = func(pa, pb)
    n = out.dim()
    order = _order(a, b)
    lb, lo = _lift_plain(pb, n), _lift_plain(out, n)
    a1, b1 = _lift(_d1(a), n), _lift(_d1(b), n)
    # y = a / b:  y' = (a' - y b') / b,  y'' = (a'' - 2 y' b' - y b'') / b
    d1 = _add(a1, None if b1 is None else -lo * b1)
    d1 = None if d1 is None else d1 / lb
    d2 = None
    if order > 1:
        a2, b2 = _lift(_d2(a), n), _lift(_d2(b), n)
        d2 = _add(a2, None if b1 is None or d1 is None else -2 * d1 * b1, None if b2 is None else -lo * b2)
        d2 = None if d2 is None else d2 / lb
    return _make(out, d1, d2, order)


def _unary(derivs: Callable):
    """Rule of an elementwise function phi: y' = phi'(x) x', y'' = phi'(x) x'' + phi''(x) x'^2.
    ``derivs(x, y, *args)`` returns (phi'(x), phi''(x)) from the primal input and output."""

    def rule(func, x, *args, **kwargs):
        p = _primal(x)
        out = func(p, *args, **kwargs)
        if not isinstance(x, Jet):
            return out
        g1, g2 = derivs(p, out, *args, **kwargs)
        d1 = None if x.d1 is None else g1 * x.d1
        d2 = None
        if x.order > 1:
            d2 = _add(None if x.d2 is None else g1 * x.d2, None if x.d1 is None else g2 * x.d1.square())
        return _make(out, d1, d2, x.order)

    return rule


_INV_SQRT_2PI = 1.0 / math.sqrt(2 * math.pi)


def _gelu_derivs(x, y, approximate="none"):
    if approximate == "tanh":
        c, a = math.sqrt(2 / math.pi), 0.044715
        u = c * (x + a * x**3)
        th = torch.tanh(u)
        s = 1 - th * th
        du = c * (1 + 3 * a * x * x)
        ddu = c * 6 * a * x
        g1 = 0.5 * (1 + th) + 0.5 * x * s * du
        g2 = s * du + 0.5 * x * s * (ddu - 2 * th * du * du)
        return g1, g2
    # phi(x) = x Phi(x): phi' = Phi + x phi_N, phi'' = phi_N (2 - x^2)
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    cdf = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2))))
    return cdf + x * pdf, pdf * (2 - x * x)


def _pow_derivs(x, y, e):
    return e * x.pow(e - 1), e * (e - 1) * x.pow(e - 2)


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
    aten.sin.default: lambda x, y: (torch.cos(x), -y),
    aten.cos.default: lambda x, y: (-torch.sin(x), -y),
    aten.gelu.default: _gelu_derivs,
    aten.pow.Tensor_Scalar: _pow_derivs,
}
for _op, _fn in _UNARY.items():
    _RULES[_op] = _unary(_fn)


# ------------------------------------------------------------------------- matrix products
def _mm_jet_plain(t, b):
    """[k, n, m] @ [m, p] as one GEMM."""
    k, n, m = t.shape
    return (t.reshape(k * n, m) @ b).view(k, n, b.shape[1])


def _mm_plain_jet(a, t):
    """[n, m] @ [k, m, p] as one GEMM: [n, m] @ [m, k * p] (a view when t is a transposed weight)."""
    k, m, p = t.shape
    return (a @ t.permute(1, 0, 2).reshape(m, k * p)).view(a.shape[0], k, p).permute(1, 0, 2)


def _product(a, b, plain_jet: Callable, jet_plain: Callable, jet_jet: Callable):
    """(a b)' = a' b + a b'; (a b)'' = a'' b + 2 a' b' + a b'' for a bilinear product."""
    pa, pb = _primal(a), _primal(b)
    order = _order(a, b)
    a1, b1 = _d1(a), _d1(b)
    d1 = _add(None if a1 is None else jet_plain(a1, pb), None if b1 is None else plain_jet(pa, b1))
    d2 = None
    if order > 1:
        a2, b2 = _d2(a), _d2(b)
        cross = None if a1 is None or b1 is None else 2 * jet_jet(a1, b1)
        d2 = _add(None if a2 is None else jet_plain(a2, pb), cross, None if b2 is None else plain_jet(pa, b2))
    return d1, d2, order


@_register(aten.mm.default)
def _mm(func, a, b):
    out = func(_primal(a), _primal(b))
    d1, d2, order = _product(a, b, _mm_plain_jet, _mm_jet_plain, torch.bmm)
    return _make(out, d1, d2, order)


@_register(aten.addmm.default)
def _addmm(func, bias, a, b, *, beta=1, alpha=1):
    out = func(_primal(bias), _primal(a), _primal(b), beta=beta, alpha=alpha)
    d1, d2, order = _product(a, b, _mm_plain_jet, _mm_jet_plain, torch.bmm)
    n = out.dim()

    def combine(prod, tb):
        if prod is not None and alpha != 1:
            prod = prod * alpha
        tb = _lift(tb, n)
        if tb is not None and beta != 1:
            tb = tb * beta
        return _add(prod, tb)

    return _make(out, combine(d1, _d1(bias)), combine(d2, _d2(bias)) if order > 1 else None, order)


@_register(aten.bmm.default)
def _bmm(func, a, b):
    out = func(_primal(a), _primal(b))
    d1, d2, order = _product(a, b, torch.matmul, torch.matmul, torch.matmul)
    return _make(out, d1, d2, order)


# ---------------------------------------------------------------------- normalizations etc.
@_register(aten.native_layer_norm.default)
def _layer_norm(func, x, normalized_shape, weight, bias, eps):
    px, pw, pb = _primal(x), _primal(weight), _primal(bias)
    out, mean, rstd = func(px, normalized_shape, pw, pb, eps)
    order = _order(x, weight, bias)
    n = px.dim()
    red = list(range(n - len(normalized_shape) + 1, n + 1))  # normalized dims of a [k, ...] tangent
    c = px - mean  # centred input
    xhat = c * rstd
    r3 = rstd ** 3
    h1 = h2 = m1 = r1 = r2 = None
    if isinstance(x, Jet):
        # c = x - mean(x); v = mean(c^2); r = (v + eps)^(-1/2); xhat = c r
        x1 = x.d1
        m1 = x1.mean(red, keepdim=True)
        c1 = x1 - m1
        v1 = 2 * (c * c1).mean(red, keepdim=True)
        r1 = -0.5 * r3 * v1
        h1 = c1 * rstd + c * r1
        if order > 1:
            x2 = x.d2
            c2 = None if x2 is None else x2 - x2.mean(red, keepdim=True)
            v2 = 2 * (c1.square() + (0 if c2 is None else c * c2)).mean(red, keepdim=True)
            r2 = 0.75 * r3 * rstd * rstd * v1.square() - 0.5 * r3 * v2
            h2 = _add(None if c2 is None else c2 * rstd, 2 * c1 * r1, c * r2)
    w = pw if pw is not None else 1.0
    w1, w2 = _d1(weight), _d2(weight)
    d1 = _add(None if h1 is None else h1 * w, None if w1 is None else _lift(w1, n) * xhat, _lift(_d1(bias), n))
    d2 = None
    if order > 1:
        d2 = _add(None if h2 is None else h2 * w,
                  None if h1 is None or w1 is None else 2 * h1 * _lift(w1, n),
                  None if w2 is None else _lift(w2, n) * xhat, _lift(_d2(bias), n))
    mean_j = _make(mean, m1, None if not isinstance(x, Jet) or x.d2 is None else x.d2.mean(red, keepdim=True),
                   order)
    rstd_j = _make(rstd, r1, r2, order)
    return _make(out, d1, d2, order), mean_j, rstd_j


@_register(aten._softmax.default, aten._safe_softmax.default)
def _softmax(func, x, dim, *args):
    p = _primal(x)
    s = func(p, dim, *args)  # _safe_softmax: rows of -inf give s = 0, so s' = s'' = 0 there too
    if not isinstance(x, Jet):
        return s
    d = _dim(dim, p.dim())
    # s' = s a, a = x' - <s, x'>;  s'' = s (a^2 - <s, a^2> + x'' - <s, x''>)
    a = x.d1 - (s * x.d1).sum(d, keepdim=True)
    d1 = s * a
    d2 = None
    if x.order > 1:
        a2 = a.square()
        b = a2 - (s * a2).sum(d, keepdim=True)
        if x.d2 is not None:
            b = b + x.d2 - (s * x.d2).sum(d, keepdim=True)
        d2 = s * b
    return _make(s, d1, d2, x.order)


@_register(aten._log_softmax.default)
def _log_softmax(func, x, dim, half_to_float):
    p = _primal(x)
    out = func(p, dim, half_to_float)
    if not isinstance(x, Jet):
        return out
    d = _dim(dim, p.dim())
    s = torch.exp(out)
    # l' = x' - <s, x'>;  l'' = x'' - <s, x''> - Var_s(x')
    mean1 = (s * x.d1).sum(d, keepdim=True)
    d1 = x.d1 - mean1
    d2 = None
    if x.order > 1:
        d2 = -(s * d1.square()).sum(d, keepdim=True)
        if x.d2 is not None:
            d2 = d2 + x.d2 - (s * x.d2).sum(d, keepdim=True)
        d2 = d2.expand_as(d1)
    return _make(out, d1, d2, x.order)


@_register(aten.nll_loss_forward.default)
def _nll_loss(func, x, target, weight, reduction, ignore_index):
    _check_constant_args(func, (target, weight), {})
    p = _primal(x)
    out, total = func(p, target, weight, reduction, ignore_index)
    if not isinstance(x, Jet):
        return out, total
    # -sum_i w_i x[i, t_i] (/ sum_i w_i for reduction="mean"): linear in x.
    if p.dim() == 1:
        x2d, tgt = p[None], target.reshape(1)
    else:
        x2d, tgt = p, target
    valid = tgt != ignore_index
    safe = torch.where(valid, tgt, 0)
    w = valid.to(p.dtype)
    if weight is not None:
        w = w * weight[safe]

    def apply(t):
        t = t.reshape(t.shape[0], *x2d.shape)
        picked = t.gather(2, safe[None, :, None].expand(t.shape[0], -1, 1))[..., 0]
        vals = -picked * w
        if reduction == 0:  # none
            return vals.reshape(t.shape[0], *out.shape)
        s = vals.sum(1)
        return s / total if reduction == 1 else s

    d1 = None if x.d1 is None else apply(x.d1)
    d2 = None if x.d2 is None else apply(x.d2)
    return _make(out, d1, d2, x.order), total


@_register(aten.amax.default)
def _amax(func, x, dims=(), keepdim=False):
    p = _primal(x)
    out = func(p, dims, keepdim)
    if not isinstance(x, Jet):
        return out
    n = p.dim()
    red = _dims(dims, n)
    full = func(p, dims, True)
    mask = (p == full).to(p.dtype)
    mask = mask / mask.sum([r - 1 for r in red], keepdim=True)  # ties share evenly, as autograd does

    def apply(t):
        return (t * mask).sum(red, keepdim=keepdim)

    return _make(out, None if x.d1 is None else apply(x.d1), None if x.d2 is None else apply(x.d2), x.order)


# ------------------------------------------------------------------------ constant outputs
def _constant(func, *args, **kwargs):
    """Ops whose result does not depend on the values (comparisons, shape queries, *_like)."""
    return func(*[_primal(a) for a in args], **{k: _primal(v) for k, v in kwargs.items()})


for _op in (aten.eq.Scalar, aten.eq.Tensor, aten.ne.Scalar, aten.ne.Tensor, aten.lt.Scalar, aten.lt.Tensor,
            aten.le.Scalar, aten.le.Tensor, aten.gt.Scalar, aten.gt.Tensor, aten.ge.Scalar, aten.ge.Tensor,
            aten.isnan.default, aten.isinf.default, aten.argmax.default, aten.argmin.default,
            aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
            aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
            aten.sign.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
            aten.is_same_size.default):
    _RULES[_op] = _constant


@_register(aten._local_scalar_dense.default)
def _item(func, x):
    return func(_primal(x))


# ------------------------------------------------------------------------------- entry point
def taylor_forward(fn: Callable, params: list[torch.Tensor], directions: list[torch.Tensor], *, order: int = 2):
    """``fn(params + eps directions)`` as a Taylor polynomial in eps: fn's output with Jets in it.

    ``directions[i]`` is [k, *params[i].shape] (k directions at once); ``fn`` takes the list of
    parameter tensors. Outputs that do not depend on the parameters come back as plain tensors.
    Raises :class:`UnsupportedOp` if fn reaches an ATen op without a rule.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    jets = [Jet(p.detach(), d, None, order) for p, d in zip(params, directions, strict=True)]
    with torch.no_grad():
        return fn(jets)


def jet_parts(out, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, x', x'') of a ``taylor_forward`` output, zeros for derivatives that vanish."""
    primal = _primal(out)

    def full(t):
        if t is None:
            return primal.new_zeros((k, *primal.shape))
        return t.expand(k, *primal.shape)

    return primal, full(_d1(out)), full(_d2(out))


def directional_derivatives(fn: Callable, params: list[torch.Tensor], directions: list[torch.Tensor],
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(f, f', f'') of ``f(eps) = fn(params + eps directions)`` at eps = 0 for scalar fn.

    For k directions z_c: f' = z_c . grad f and f'' = z_c^T H z_c, each [k].
    """
    out = taylor_forward(fn, params, directions)
    if _primal(out).numel() != 1:
        raise ValueError(f"fn must return a scalar, got shape {tuple(_primal(out).shape)}")
    k = directions[0].shape[0]
    f, d1, d2 = jet_parts(out, k)
    return f.reshape(()), d1.reshape(k), d2.reshape(k)
